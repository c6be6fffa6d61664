"""Synthetic recorded predictions for the outer-search tests (numpy only: no model, no training).

Imported by the other test_outer*.py files: ``from test_outer_support import make_recorded``.
"""

from __future__ import annotations

import numpy as np

from autoexit.search.outer import ExitCosts, Recorded, SplitData


def _split(rng: np.random.Generator, n: int, e: int, classes: int = 10, labels: bool = True) -> SplitData:
    y = rng.integers(0, classes, n)
    bb_ok = rng.random(n) < 0.9
    bb = np.where(bb_ok, y, (y + 1 + rng.integers(0, classes - 1, n)) % classes)
    easy = rng.random(n)  # per-sample difficulty shared by the exits: easy samples exit early and agree
    pred = np.empty((e, n), dtype=np.int64)
    scores = {}
    for i in range(e):
        p_agree = np.clip(0.45 + 0.12 * i + 0.4 * (easy - 0.5), 0.05, 0.99)
        agree = rng.random(n) < p_agree
        pred[i] = np.where(agree, bb, (bb + 1 + rng.integers(0, classes - 1, n)) % classes)
        conf = np.clip(0.35 + 0.45 * agree + 0.2 * easy + rng.normal(0, 0.12, n), 0.0, 1.0)
        scores.setdefault("max_softmax", []).append(conf)
        scores.setdefault("margin", []).append(np.clip(conf - 0.1 + rng.normal(0, 0.05, n), 0, 1))
        scores.setdefault("entropy", []).append(np.clip(conf - 0.05 + rng.normal(0, 0.08, n), 0, 1))
    sc = {k: np.stack(v).astype(np.float32) for k, v in scores.items()}
    return SplitData(pred, sc, bb.astype(np.int64), y.astype(np.int64) if labels else None)


def make_recorded(seed: int = 0, exits: int = 5, n: int = 1500, labels: bool = True, fit: bool = False) -> Recorded:
    """Synthetic val and test splits (and a train split, ``fit``, drawn like them) of ``n`` samples each."""
    rng = np.random.default_rng(seed)
    names = [f"layer{i}" for i in range(exits)]
    before = np.linspace(10.0, 80.0, exits) * 1e6
    c1 = np.full(exits, 1.5e6)
    flops = ExitCosts(c1, before, 100e6, "flops", "synthetic")
    latency = ExitCosts(c1 / 1e7, before / 1e7, 10.0, "ms", "synthetic device")
    val, test = _split(rng, n, exits, labels=labels), _split(rng, n, exits, labels=labels)
    return Recorded(names, val, test, flops, np.arange(1, exits + 1) * 40_000.0, np.ones(exits), latency,
                    {"backbone_class": "Synthetic", "seed": seed},
                    _split(rng, n, exits, labels=labels) if fit else None)


def synthetic_split(seed: int, n: int, exits: int = 5, labels: bool = True) -> SplitData:
    """One more split drawn like :func:`make_recorded`'s (e.g. a large population, or another val)."""
    return _split(np.random.default_rng(seed), n, exits, labels=labels)


def test_synthetic_recording_is_well_formed(tmp_path):
    rec = make_recorded(exits=4, n=300)
    assert rec.val.pred.shape == (4, 300) and rec.val.scores["max_softmax"].shape == (4, 300)
    # deeper exits agree more often with the backbone, as real heads do
    agree = rec.val.agree.mean(1)
    assert agree[-1] > agree[0]
    back = Recorded.load(rec.save(tmp_path / "r.npz"))
    assert back.fingerprint == rec.fingerprint and back.names == rec.names and back.fit is None
    with_fit = make_recorded(exits=4, n=300, fit=True)
    back = Recorded.load(with_fit.save(tmp_path / "f.npz"))
    assert np.array_equal(back.fit.pred, with_fit.fit.pred)
    assert np.array_equal(back.fit.scores["margin"], with_fit.fit.scores["margin"])
