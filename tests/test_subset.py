"""K(S): vectorised == scalar, exhaustive == brute force, recorded == executed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from autoexit.model import MultiExitModel
from autoexit.subset import (
    all_subset_scores,
    best_subset,
    evaluate_subset,
    k_score,
    path_costs,
    simulate_exits,
)


def _synthetic(e=6, n=500, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.random((e, n))
    s[:, : n // 10] = 1.0  # saturated scores: ties
    a = rng.random((e, n)) < (0.3 + 0.65 * s)
    c1 = rng.random(e) * 10
    c2 = np.sort(rng.random(e) * 1000)[::-1]
    return s, a, c1, c2


@pytest.mark.parametrize("scheme", ["halving", "equal"])
@pytest.mark.parametrize("basis", ["total", "reaching"])
def test_vectorised_all_subsets_equals_scalar(scheme, basis):
    s, a, c1, c2 = _synthetic()
    k_all, thr_all = all_subset_scores(s, a, c1, c2, 3.0, scheme, basis)
    for mask in range(1, 1 << s.shape[0]):
        sub = [i for i in range(s.shape[0]) if mask >> i & 1]
        r = evaluate_subset(s, a, c1, c2, sub, 3.0, scheme, basis)
        assert r.k == pytest.approx(k_all[mask], abs=1e-6)
        np.testing.assert_allclose(r.thresholds.thresholds, thr_all[mask][sub])


def test_exhaustive_best_is_the_brute_force_best_and_greedy_is_reasonable():
    s, a, c1, c2 = _synthetic(e=5, seed=3)
    best = best_subset(s, a, c1, c2, 2.0, base_flops=1200)
    brute = max(
        (evaluate_subset(s, a, c1, c2, list(sub), 2.0).k, sub)
        for r in range(1, 6)
        for sub in itertools.combinations(range(5), r)
    )
    assert best.k == pytest.approx(max(brute[0], 0.0))
    greedy = best_subset(s, a, c1, c2, 2.0, base_flops=1200, exhaustive_limit=2)
    singles = max(evaluate_subset(s, a, c1, c2, [i], 2.0).k for i in range(5))
    assert greedy.k >= singles - 1e-9
    assert best.expected_flops == pytest.approx(1200 - best.k / s.shape[1])


def test_simulation_cost_matches_k_score():
    s, a, c1, c2 = _synthetic(e=4, seed=5)
    base = 1500.0
    before = base - c2
    r = evaluate_subset(s, a, c1, c2, [0, 2, 3], 2.0, base_flops=base)
    out = simulate_exits(s[[0, 2, 3]], np.zeros((3, s.shape[1]), int), np.zeros(s.shape[1], int),
                         r.thresholds.thresholds, c1[[0, 2, 3]], before[[0, 2, 3]], base)
    assert base - out.flops.mean() == pytest.approx(r.k / s.shape[1])
    assert k_score(s[[0, 2, 3]], r.thresholds.thresholds, c1[[0, 2, 3]], c2[[0, 2, 3]]) == pytest.approx(r.k)


def test_k_score_from_records_equals_executing_the_model(digits_result):
    """K(S) computed from recorded val predictions equals the FLOPs actually saved by running
    the early-exit model on the val inputs, for several subsets."""
    res = digits_result
    val = res.val
    names = val.names
    temps = [res.temperatures[n] for n in names]
    scores = val.scores(temps).numpy()
    agree = val.agree().numpy()
    heads = [res.heads[n] for n in names]
    c1 = np.array([h.flops for h in heads], float)
    c2 = np.array([h.point.flops_after for h in heads], float)
    base = float(res.backbone.total_flops)
    inputs = res.recording.inputs("val")
    subsets = [[0], [1, 3], [0, 2, 4], list(range(len(names)))]
    for sub in subsets:
        sub = [i for i in sub if i < len(names)]
        r = evaluate_subset(scores, agree, c1, c2, sub, 2.0, names=names, base_flops=base)
        model = MultiExitModel(
            res.backbone.split([heads[i].point.node for i in sub]),
            [heads[i].module for i in sub],
            [temps[i] for i in sub],
            r.thresholds.thresholds.tolist(),
            num_classes=res.backbone.num_classes,
        ).eval()
        with torch.no_grad():
            idx = torch.cat([model(inputs[i : i + 97])[1] for i in range(0, len(inputs), 97)]).numpy()
        spent = np.empty(len(idx))
        for j, e in enumerate(idx):
            if e < len(sub):
                spent[j] = heads[sub[e]].point.flops_before + c1[sub[: e + 1]].sum()
            else:
                spent[j] = base + c1[sub].sum()
        executed_k = len(idx) * base - spent.sum()
        assert executed_k == pytest.approx(r.k, rel=1e-9, abs=1e-3), sub
        assert np.bincount(idx, minlength=len(sub) + 1)[: len(sub)].tolist() == r.thresholds.hits.tolist()


def test_path_costs_per_sample_head_costs_are_per_column_paths():
    """With head costs per sample ([k, n]) each column is the path cost of that sample's heads, as the [k] form
    gives it (fixed cost included), and no exit is the backbone alone."""
    rng = np.random.default_rng(0)
    c1 = rng.random((4, 30)) * 5
    before = np.array([10.0, 20.0, 35.0, 60.0])
    got = path_costs(c1, before, 100.0, fixed=2.0)
    assert got.shape == (5, 30)
    for i in range(30):
        assert np.allclose(got[:, i], path_costs(c1[:, i], before, 100.0, fixed=2.0))
    assert np.allclose(path_costs(np.zeros((0, 3)), [], 100.0), 100.0)
