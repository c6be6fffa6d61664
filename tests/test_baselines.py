"""Classic baselines (BranchyNet / SDN / SPINN style) built from autoexit's pieces."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from autoexit.baselines import (
    BASELINES,
    BaselineSpec,
    baseline_head_specs,
    baseline_points,
    build_baseline,
    choose_thresholds,
    train_baseline_heads,
)
from autoexit.distill import TrainConfig
from autoexit.errors import AutoExitError
from autoexit.heads import HeadSpec
from autoexit.model import MultiExitModel
from autoexit.points import ExitPoint


def _points(fractions):
    total = 1000
    return [ExitPoint(f"p{i}", f"n{i}", (16, 32 if f < 0.5 else 8, 32 if f < 0.5 else 8), int(f * total),
                      total - int(f * total)) for i, f in enumerate(fractions)]


def test_placement_rules():
    pts = _points([0.05, 0.12, 0.2, 0.33, 0.41, 0.55, 0.7, 0.88])
    assert baseline_points(pts, "sdn") == pts
    assert [p.name for p in baseline_points(pts, "branchynet")] == ["p2", "p5"]  # nearest 1/4 and 1/2
    spinn = [p.name for p in baseline_points(pts, "spinn")]
    assert spinn == ["p1", "p3", "p4", "p5", "p6", "p7"]  # nearest 15, 30, 45, 60, 75, 90 %, in order
    # two fractions snapping to the same point keep it once
    assert [p.name for p in baseline_points(_points([0.1, 0.9]), "spinn")] == ["p0", "p1"]


def test_heads_are_homogeneous_with_stride_on_large_maps():
    pts = _points([0.2, 0.7])
    specs = baseline_head_specs(pts, "spinn")
    assert specs["p0"].stride == 2 and specs["p1"].stride == 1  # 32x32 map vs 8x8
    assert {(s.conv, s.conv_layers, s.fc_layers) for s in specs.values()} == {("standard", 1, 1)}
    assert baseline_head_specs(pts, "sdn")["p0"].conv == "none"


def test_bad_specs_are_rejected():
    with pytest.raises(AutoExitError):
        BaselineSpec("x", "fractions", (1.5,), HeadSpec(), "max_softmax", True)
    with pytest.raises(AutoExitError):
        BaselineSpec("x", "every", (), HeadSpec(), "nope", True)
    with pytest.raises(AutoExitError, match="unknown baseline"):
        baseline_points(_points([0.5]), "gati")


def _synthetic(n=400, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    bpred = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 5)
    scores = rng.random((k, n)).astype(np.float32).astype(np.float64)  # model scores are float32
    # confident exits mostly agree with the backbone, unconfident ones often do not
    agree = rng.random((k, n)) < 0.5 + 0.5 * scores
    exit_pred = np.where(agree, bpred[None, :], (bpred[None, :] + 2) % 5)
    return scores, exit_pred, bpred, labels


def _risk_and_flops(scores, exit_pred, bpred, labels, thr, c1, fb, base, risk):
    from autoexit.subset import simulate_exits

    out = simulate_exits(scores, exit_pred, bpred, thr, c1, fb, base)
    r = (out.pred != bpred).mean() if risk == "disagreement" else (bpred == labels).mean() - (out.pred == labels).mean()
    return r, out.flops.mean()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("risk", ["drop", "disagreement"])
def test_thresholds_meet_the_budget_and_beat_every_grid_point(shared, risk):
    scores, exit_pred, bpred, labels = _synthetic()
    c1, fb, base = [5.0, 5.0, 5.0], [20.0, 50.0, 80.0], 100.0
    thr, summary = choose_thresholds(scores, exit_pred, bpred, labels, c1, fb, base, 2.0, shared, risk, grid=2000)
    r, f = _risk_and_flops(scores, exit_pred, bpred, labels, thr, c1, fb, base, risk)
    assert r <= 0.02 + 1e-12
    assert f == pytest.approx(summary["expected_flops"])
    assert f < base  # something exits at 2 %
    if shared:  # the grid holds every distinct score: no shared threshold within the budget is cheaper
        for v in np.unique(scores):
            rv, fv = _risk_and_flops(scores, exit_pred, bpred, labels, np.full(3, v), c1, fb, base, risk)
            if rv <= 0.02 + 1e-12:
                assert f <= fv + 1e-9
    # a larger budget never costs more FLOPs
    thr5, s5 = choose_thresholds(scores, exit_pred, bpred, labels, c1, fb, base, 5.0, shared, risk, grid=2000)
    assert s5["expected_flops"] <= summary["expected_flops"] + 1e-9


def test_thresholds_need_labels_for_the_drop_risk():
    scores, exit_pred, bpred, _ = _synthetic()
    with pytest.raises(AutoExitError, match="labels"):
        choose_thresholds(scores, exit_pred, bpred, None, [1] * 3, [1, 2, 3], 10, 1.0, True, "drop")
    with pytest.raises(AutoExitError, match="tolerance"):
        choose_thresholds(scores, exit_pred, bpred, None, [1] * 3, [1, 2, 3], 10, 0.0, True, "disagreement")


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_builds_a_real_multi_exit_model(name, digits_result):
    tb, rec = digits_result.backbone, digits_result.recording
    res = build_baseline(name, tb, rec, tolerance=2.0, train=TrainConfig(epochs=3, batch_size=256))
    assert isinstance(res.model, MultiExitModel)
    assert set(res.kept) <= {p.name for p in res.points}
    assert len({replace(h.spec, stride=1) for h in res.heads.values()}) == 1  # homogeneous up to the stride
    val, test = res.metrics["val"], res.metrics["test"]
    assert val["accuracy_drop"] <= 0.02 + 1e-9  # the budget holds on the split it was chosen on
    # the oracle pays every head a sample passes, so with heads as costly as this tiny backbone's rest it
    # may save nothing (slightly negative); it can never save everything
    assert -1.0 < val["oracle_saving"] < 1.0
    # the model's own decisions on the test inputs are what the metrics simulated
    x = rec.inputs("test")
    with torch.no_grad():
        logits, exit_index = res.model(x)
    rates = np.bincount(exit_index.numpy(), minlength=len(res.kept) + 1) / len(x)
    assert np.allclose(rates, test["exit_rates"], atol=2.0 / len(x))
    acc = float((logits.argmax(1) == rec.labels("test")).float().mean())
    assert acc == pytest.approx(test["accuracy"], abs=2.0 / len(x))


def test_supervised_baseline_needs_labels(digits_result):
    rec = digits_result.recording
    rec_nolabels = type(rec)(rec.path, rec.points, rec.num_classes, rec.backbone_hash, rec.data_identity, rec.n,
                             rec.seed, rec.split_fractions)
    rec_nolabels.labels = lambda split=None: None  # an unlabelled workload
    with pytest.raises(AutoExitError, match="labels"):
        train_baseline_heads(rec_nolabels, "sdn", TrainConfig(epochs=1))
