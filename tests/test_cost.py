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


def test_fixed_cost_of_exits_is_recovered_from_the_anchors_and_bounded_by_the_first_exit_model():
    """fit_exit_overheads on anchors built from known costs: the fixed cost F and the per-decision cost d come
    back exactly; a one-exit anchor inflated by a slow spell cannot push F past what the first-exit model
    leaves (an early answer costs >= 0), and the every-exit anchor stays reproduced; noise that makes F
    negative gives F = 0 and an equal share of the every-exit surplus."""
    import numpy as np
    import pytest

    from autoexit.cost import fit_exit_overheads

    rng = np.random.default_rng(0)
    n, mid, scale, F, d, taken = 9, 4, 1.1, 0.1, 0.03, 0.02
    hd = rng.uniform(0.1, 0.2, n)
    t_none, before0 = 1.7, 0.08
    t_every = t_none + F + scale * hd.sum() + n * d
    t_one = t_none + F + scale * hd[mid] + d
    t_first = before0 + scale * hd[0] + d + F + taken
    f, dd, capped = fit_exit_overheads(t_none, t_every, t_first, t_one, scale, hd, before0, mid)
    assert (f, dd, capped) == (pytest.approx(F), pytest.approx(d), False)
    # the one-exit model timed 2.4 ms slow: F bounded, early answer 0, every-exit anchor still exact
    f, dd, capped = fit_exit_overheads(t_none, t_every, t_first, t_one + 2.4, scale, hd, before0, mid)
    assert capped and 0 < f <= F + d + taken  # far from the 2.4 ms the one-exit anchor alone implies
    assert t_first - before0 - scale * hd[0] - dd - f == pytest.approx(0.0, abs=1e-12)
    assert t_none + f + scale * hd.sum() + n * dd == pytest.approx(t_every)
    # a one-exit model timed fast enough to make F negative: no fixed cost
    f, dd, capped = fit_exit_overheads(t_none, t_every, t_first, t_one - 0.5, scale, hd, before0, mid)
    assert f == 0.0 and dd == pytest.approx((t_every - t_none - scale * hd.sum()) / n)
    # one candidate: nothing to separate, the decision takes the whole surplus
    f, dd, _ = fit_exit_overheads(t_none, t_none + 0.3 + scale * hd[0], t_first, None, scale, hd[:1], before0, 0)
    assert f == 0.0 and dd == pytest.approx(0.3)
