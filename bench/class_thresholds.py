"""Class-wise thresholds (issue 8, a tenth lever): one threshold per exit and predicted class instead of one per exit.

Every policy of ``autoexit.policies`` gives each exit one threshold on its score. The backbone is right far more
often on some classes than on others (ResNet-20 on the JPEG fixture: 67-90 % per class), so under the labelled
risk an input predicted as a hard class costs less when it leaves early; a threshold per (exit, class) could let
more of those out. This benchmark measures that on the cheap heads (``EnableConfig(head="cheap")``, the heads of
``bench/policies.py --head cheap``, from its cache), with max-softmax scores and temperatures fitted on train as
``autoexit.enable`` fits them, every candidate exit kept (no exit selection, for both kinds alike):

- ``per-exit``: one threshold per exit (what ``max_softmax`` deploys, without its exit selection);
- ``per-class``: one per exit and class. An exit j becomes C virtual exits (j, c) at the same place and cost, the
  virtual exit (j, c) scoring only the inputs head j predicts as c (:func:`class_exits`), so the core's own greedy
  family (``autoexit.policies.cascade.greedy_path``) and Learn-then-Test (``certify``) run on it unchanged.

Per kind, risk (``disagreement``: label-free; ``drop``: labelled) and tolerance:

- ``certified %``: the family built on train, Learn-then-Test on val (delta 0.1), the cheapest certified row on
  val deployed; its test saving, and ``resplit %`` / ``violations``: the mean saving and the share of test drops
  (or disagreements) above T over ``--resplits`` random re-splits of val + test (2,000 / 3,000), the family
  fixed: what ``bench/policies.py`` reports as "resplit saving %";
- ``family, test-picked %``: the best row of the train family whose test risk is <= T (hindsight along the
  family, the "hindsight family %" of ``bench/policies.py``);
- ``hindsight %``: a greedy family built on the test labels themselves, read at T (no guarantee; how far the
  thresholds could overfit);
- ``val->test %`` and ``val->test risk %``: a family built on val, its last row with val risk <= T applied to test
  (an estimate, as paper 003 picks thresholds: no guarantee).

Run: ``python bench/class_thresholds.py`` (``--depths 20``, ``--resplits 50``); about 10 min with the cheap heads
cached (``bench/policies.py --head cheap`` fills the cache), plus recording and training (about 3 min per network)
without. Results: ``bench/results/class_thresholds.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_resplit_benchmark  # noqa: E402

TOLERANCES = (0.5, 1.0, 2.0)
RISKS = ("disagreement", "drop")
DELTA = 0.1


def class_exits(scores: np.ndarray, pred: np.ndarray, losses: np.ndarray, exit_cost: np.ndarray,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chain of ``k`` exits as ``k * num_classes`` virtual exits, (j, c) at row ``j * num_classes + c``.

    ``scores`` [k, n], ``pred`` [k, n] (each exit's predicted class), ``losses`` [k + 1, n] and ``exit_cost``
    [k + 1] as :func:`autoexit.policies.cascade.greedy_path` takes them; ``scores`` must be >= 0 (max softmax, as
    every built-in score). The virtual exit (j, c) keeps head j's score for the inputs head j predicts as c and
    scores every other input -1, so a threshold vector of the virtual chain is one threshold per (exit, class)
    (:func:`class_threshold_matrix`); its losses and cost are those of exit j (the last row stays the backbone's)."""
    k, n = scores.shape
    if scores.size and scores.min() < 0:
        raise ValueError("class_exits needs scores >= 0 (the other classes' inputs score -1)")
    if pred.shape != (k, n) or losses.shape != (k + 1, n) or exit_cost.shape != (k + 1,):
        raise ValueError(f"shapes: scores {scores.shape}, pred {pred.shape}, losses {losses.shape}, "
                         f"exit_cost {exit_cost.shape}")
    vs = np.full((k * num_classes, n), -1.0)
    vl = np.repeat(losses[:k], num_classes, axis=0)
    vc = np.repeat(exit_cost[:k], num_classes)
    for j in range(k):
        for c in range(num_classes):
            hit = pred[j] == c
            vs[j * num_classes + c, hit] = scores[j, hit]
    return vs, np.vstack([vl, losses[k:]]), np.concatenate([vc, exit_cost[k:]])


def class_threshold_matrix(row: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """A threshold vector of the virtual chain of :func:`class_exits` as [k, C] thresholds per (exit, class). A
    virtual threshold below -1 lets every input that reaches it leave at its exit whatever its class (the greedy
    family sets one when letting all of them out pays): that exit's row becomes -inf for every class."""
    t = np.asarray(row, dtype=np.float64).reshape(k, num_classes).copy()
    t[(t < -1).any(axis=1)] = -np.inf
    return t


def class_exit_positions(scores: np.ndarray, pred: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Where each input leaves under one threshold per (exit, class) (``thresholds`` [k, C]): the first exit j
    with ``scores[j] >= thresholds[j, pred[j]]``, ``k`` for the backbone. The direct rule that
    :func:`class_exits` turns into a plain chain."""
    k, n = scores.shape
    out = np.full(n, k, dtype=np.int64)
    left = np.ones(n, dtype=bool)
    for j in range(k):
        hit = left & (scores[j] >= thresholds[j, pred[j]])
        out[hit] = j
        left &= ~hit
    return out


def cheap_tables(depth: int):
    """The cheap heads' ``ExitTable`` per split (temperatures fitted on train, as ``autoexit.enable`` fits the
    guaranteed policies') and the ``ExitCosts`` of every candidate exit, from ``bench/policies.py``'s caches."""
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.pipeline import flops_costs
    from autoexit.policies import ExitTable
    from bench.policies import setup, split_data

    cfg, tb, points, rec, heads = setup(depth, head="cheap")
    data = split_data(rec, heads)
    names = [p.name for p in rec.points if p.name in heads]
    temps = calibrate_temperatures(data["train"][0])  # the guaranteed policies' fit split, as enable does
    tabs = {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in data.items()}
    costs = flops_costs(heads, names, float(tb.total_flops))
    return tabs, costs


def run_depth(depth: int, resplits: int, log) -> list[dict]:
    import torch

    from autoexit.policies.cascade import certify, chain_costs, greedy_path, loss_matrix, simulate
    from bench.policies import _pool

    t0 = time.perf_counter()
    tabs, costs = cheap_tables(depth)
    k = len(tabs["test"].names)
    chain = list(range(k))
    cvec = chain_costs(costs, chain)
    ncls = int(tabs["test"].z[0].shape[1])
    log(f"resnet{depth}: {k} exits, {ncls} classes, tables in {time.perf_counter() - t0:.0f} s")
    pool = _pool(tabs["val"], tabs["test"])
    n_val = tabs["val"].n
    rng = np.random.default_rng(12345)
    splits = [rng.permutation(pool.n) for _ in range(resplits)]

    def arrays(t, risk, kind):
        s = np.stack([torch.softmax(t.z[i], 1).max(1).values.numpy() for i in chain]).astype(np.float64)
        loss = loss_matrix(t, chain, risk)
        if kind == "per-exit":
            return s, loss, cvec
        return class_exits(s, t.pred(chain), loss, cvec, ncls)

    def outcome(s, loss, c, thr):
        pos = simulate(s, thr)
        idx = np.arange(s.shape[1])
        return float(loss[pos, idx].mean()), float(1 - c[pos].mean() / costs.base)

    def deployed(s_cal, l_cal, c, family, tol, risk):  # Learn-then-Test, then the cheapest certified row on cal
        res, exit_of = certify(s_cal, l_cal, family, tol / 100, DELTA, risk)
        rows = range(res.index + 1) if res.index >= 0 else range(1)
        return min(rows, key=lambda r: (c[exit_of[r]].mean(), r)), res.index >= 0

    rows = []
    for risk in RISKS:
        # each split's scores, losses and costs depend on the risk and the kind only, not on T
        per = {kind: {split: arrays(t, risk, kind) for split, t in (*tabs.items(), ("pool", pool))}
               for kind in ("per-exit", "per-class")}
        for tol in TOLERANCES:
            for kind in ("per-exit", "per-class"):
                t1 = time.perf_counter()
                s_tr, l_tr, c = per[kind]["train"]
                fam = greedy_path(s_tr, l_tr, c, chunk=max(1, tabs["train"].n // 400),
                                  max_risk=max(4 * tol / 100, tol / 100 + 0.02)).thresholds
                s_te, l_te, _ = per[kind]["test"]
                s_va, l_va, _ = per[kind]["val"]
                row_i, ok = deployed(s_va, l_va, c, fam, tol, risk)
                r_te, sav_te = outcome(s_te, l_te, c, fam[row_i])
                picked = max([sv for r_, sv in (outcome(s_te, l_te, c, th) for th in fam)
                              if r_ <= tol / 100 + 1e-12], default=0.0)
                hind = greedy_path(s_te, l_te, c, chunk=max(1, tabs["test"].n // 1000), max_risk=2 * tol / 100)
                pv = greedy_path(s_va, l_va, c, chunk=max(1, n_val // 1000), max_risk=2 * tol / 100)
                ok_rows = np.nonzero(pv.fit_risk <= tol / 100 + 1e-12)[0]
                r_vt, sav_vt = outcome(s_te, l_te, c, pv.thresholds[ok_rows[-1] if ok_rows.size else 0])
                s_po, l_po, _ = per[kind]["pool"]
                savings, viol = [], 0
                for perm in splits:
                    cal, te = perm[:n_val], perm[n_val:]
                    r_i, _ = deployed(s_po[:, cal], l_po[:, cal], c, fam, tol, risk)
                    r_, sv = outcome(s_po[:, te], l_po[:, te], c, fam[r_i])
                    savings.append(sv)
                    viol += r_ > tol / 100 + 1e-12
                row = {"model": f"resnet{depth}", "risk": risk, "T %": tol, "thresholds": kind,
                       "certified %": 100 * sav_te, "test risk %": 100 * r_te, "certified": bool(ok),
                       "resplit %": 100 * float(np.mean(savings)), "violations": viol / max(resplits, 1),
                       "family, test-picked %": 100 * picked,
                       "hindsight %": 100 * (1 - hind.flops_at(tol / 100) / costs.base),
                       "val->test %": 100 * sav_vt, "val->test risk %": 100 * r_vt,
                       "family rows": int(len(fam)), "seconds": time.perf_counter() - t1}
                rows.append(row)
                log(f"  {risk:12s} T={tol} {kind:9s} certified {row['certified %']:5.1f}% resplit "
                    f"{row['resplit %']:5.1f}% viol {100 * row['violations']:3.0f}% family/test "
                    f"{row['family, test-picked %']:5.1f}% hindsight {row['hindsight %']:5.1f}% val->test "
                    f"{row['val->test %']:5.1f}% (risk {row['val->test risk %']:.2f}%)")
    return rows


COLUMNS = ["model", "risk", "T %", "thresholds", "certified %", "resplit %", "violations", "family, test-picked %",
           "hindsight %", "val->test %", "val->test risk %"]


def main(argv=None) -> int:
    return run_resplit_benchmark(__doc__.splitlines()[0], argv, run_depth, "class_thresholds",
                                 "class-wise thresholds against one per exit (cheap heads, max softmax, every exit kept)",
                                 COLUMNS, delta=DELTA, heads="cheap")


if __name__ == "__main__":
    raise SystemExit(main())
