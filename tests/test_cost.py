"""FLOPs: analytic values, and the cross-check against MAC counters (thop, DeepSpeed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoexit.cost import count_flops, count_params, measure_latency


def _convnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(1), nn.Linear(32 * 8 * 8, 10, bias=False),
    ).eval()


def _analytic_macs():
    return 3 * 16 * 9 * 16 * 16 + 16 * 32 * 9 * 8 * 8 + 32 * 8 * 8 * 10


def test_flops_are_two_per_multiply_add_and_per_sample():
    m = _convnet()
    assert count_flops(m, torch.randn(1, 3, 16, 16)) == 2 * _analytic_macs()
    assert count_flops(m, torch.randn(7, 3, 16, 16)) == 2 * _analytic_macs()
    assert count_params(m) == 3 * 16 * 9 + 16 * 32 * 9 + 2048 * 10


def test_cross_check_with_thop_macs():
    thop = pytest.importorskip("thop")
    m = _convnet()
    x = torch.randn(1, 3, 16, 16)
    macs, _ = thop.profile(m, inputs=(x,), verbose=False)
    assert count_flops(m, x) == pytest.approx(2 * macs, rel=0.01)


def test_cross_check_with_deepspeed_profiler():
    pytest.importorskip("deepspeed")
    from deepspeed.profiling.flops_profiler import get_model_profile

    m = _convnet()
    flops, macs, _ = get_model_profile(m, input_shape=(1, 3, 16, 16), print_profile=False, as_string=False)
    assert macs == _analytic_macs()
    assert count_flops(m, torch.randn(1, 3, 16, 16)) == 2 * macs
    # DeepSpeed also counts element-wise ops (ReLU), FlopCounterMode does not
    assert flops >= 2 * macs


def test_latency_stats_are_sane():
    m = _convnet()
    s = measure_latency(m, torch.randn(4, 3, 16, 16), repeat=5, warmup=1, threads=1)
    assert s.runs >= 5 and s.median_ms > 0 and s.p90_ms >= s.median_ms * 0.5 and s.batch == 4


def test_fixed_cost_of_going_past_an_exit_is_recovered_from_the_anchors_and_robust_to_one_slow_anchor():
    """fit_exit_overheads on anchors built from known costs: the fixed cost F and the per-decision cost d come
    back exactly from the one-exit anchors (quarter, middle, three-quarter candidates) and the every-exit
    anchor; one one-exit anchor inflated by a slow spell does not move them (their median stands for F + d);
    noise that makes F negative gives F = 0 and an equal share of the every-exit surplus."""
    import numpy as np
    import pytest

    from autoexit.cost import fit_exit_overheads, one_exit_anchors

    assert one_exit_anchors(9) == [2, 4, 6] and one_exit_anchors(2) == [0, 1] and one_exit_anchors(1) == []
    assert one_exit_anchors(26) == [6, 13, 19] and one_exit_anchors(4) == [1, 2, 3]
    rng = np.random.default_rng(0)
    n, scale, F, d = 9, 1.1, 0.1, 0.03
    hd = rng.uniform(0.1, 0.2, n)
    t_none = 1.7
    t_every = t_none + F + scale * hd.sum() + n * d
    ones = {j: t_none + F + scale * hd[j] + d for j in one_exit_anchors(n)}
    assert fit_exit_overheads(t_none, t_every, ones, scale, hd) == (pytest.approx(F), pytest.approx(d))
    assert fit_exit_overheads(t_none, t_every, {4: ones[4]}, scale, hd) == (pytest.approx(F), pytest.approx(d))
    # the middle one-exit model timed 2.4 ms slow (a slow spell): the other two anchors carry the median
    slow = dict(ones) | {4: ones[4] + 2.4}
    assert fit_exit_overheads(t_none, t_every, slow, scale, hd) == (pytest.approx(F), pytest.approx(d))
    # one-exit models timed fast enough to make F negative: no fixed cost
    fast = {j: t - 0.5 for j, t in ones.items()}
    f, dd = fit_exit_overheads(t_none, t_every, fast, scale, hd)
    assert f == 0.0 and dd == pytest.approx((t_every - t_none - scale * hd.sum()) / n)
    # one candidate: nothing to separate, the decision takes the whole surplus
    f, dd = fit_exit_overheads(t_none, t_none + 0.3 + scale * hd[0], None, scale, hd[:1])
    assert f == 0.0 and dd == pytest.approx(0.3)


def test_anchors_consistent_rejects_an_every_exit_model_faster_or_slower_than_its_parts():
    """The every-exit model does what the no-exit model does plus every head: timed faster than the no-exit model
    plus half its scaled heads (less 5 % of the no-exit time as noise), the two timings contradict each other;
    timed slower than the one-exit models' overheads once per exit allow (a negative fixed cost), too."""
    from autoexit.cost import ANCHOR_SLACK, anchors_consistent

    hd, scale, t_none = [0.1, 0.2, 0.3], 1.5, 4.0  # scaled heads: 0.9 ms; half: 0.45 ms; slack: 0.2 ms
    edge = t_none + 0.45 - ANCHOR_SLACK * t_none
    assert anchors_consistent(t_none, t_none + 0.9 + 0.3, scale, hd)  # heads and decision costs: consistent
    assert anchors_consistent(t_none, edge + 1e-9, scale, hd)
    assert not anchors_consistent(t_none, edge - 1e-6, scale, hd)
    assert not anchors_consistent(t_none, t_none - 1.0, scale, hd)  # faster than the backbone alone
    assert anchors_consistent(t_none, t_none - 0.1, scale, [0.0, 0.0, 0.0])  # no heads: noise within the slack
    # with one-exit anchors: the every-exit model does each one-exit model's extra work once per exit, so the
    # fixed cost F the two imply (every = none + F + heads + N d, one_j = none + F + head_j + d) is >= 0
    F, d = 0.1, 0.05
    ones = {j: t_none + F + scale * hd[j] + d for j in (0, 2)}
    every = t_none + F + scale * sum(hd) + 3 * d
    assert anchors_consistent(t_none, every, scale, hd, ones)
    # every-exit timed slow: F = (one-exit overhead) - d < 0; within 5 % of the no-exit time it is noise
    slow = every + 2 * (F + ANCHOR_SLACK * t_none) - 1e-6  # d grows by half of it, F falls by as much
    assert anchors_consistent(t_none, slow, scale, hd, ones)
    assert not anchors_consistent(t_none, slow + 2e-6 + 0.01, scale, hd, ones)
    assert not anchors_consistent(t_none, every + 5.0, scale, hd, ones)
    assert anchors_consistent(t_none, every + 5.0, scale, hd[:1] + [0, 0], None)  # no one-exit anchor: no bound
    # and what is wrong, for the warning
    from autoexit.cost import anchor_contradiction

    assert anchor_contradiction(t_none, every, scale, hd, ones) is None
    assert "plus half its heads" in anchor_contradiction(t_none, t_none - 1.0, scale, hd, ones)
    assert "fixed cost of -" in anchor_contradiction(t_none, every + 5.0, scale, hd, ones)
