"""The Optuna outer search with a guarantee (``outer.pick.rule: certified``) on the CIFAR-10 ResNet fixtures.

Same recording, heads and split as ``bench/policies.py`` (an exit after every residual block, the core's
default heads, 50/20/30, seed 0). In one process run, per network and tolerance T (1 and 2 %):

* ``outer, certified`` / ``outer, certified+drop``: the Optuna outer search (``search_spaces/outer.yaml``:
  T, split scheme, K(S) ranking or include flags, k, exit signal; ``--trials`` TPE trials, seed 0) with its
  trials scored on the **train** split (temperatures fitted there), label-free (disagreement) or with
  labels (accuracy drop); val then certifies the Pareto front with Learn-then-Test at delta = 0.1 and the
  cheapest certified point on val is deployed. One study per risk serves both tolerances (the tolerance
  is searched; only the certificate depends on T).
* ``max_softmax`` / ``max_softmax+drop``: the core's guaranteed default policy on the same heads (the rows
  of ``bench/policies.py``).
* ``... (cross-fitted, 2 folds)``: the four rows above again, with the train split replaced by its out-of-fold
  predictions (each half predicted by heads trained on the other half; ``--cross-fit``, 0 skips them): the
  certified search with ``enable.cross_fit: 2``, and the policies with ``EnableConfig(cross_fit=2)``. The
  deployed heads, val and test are the same; temperatures are fitted on the out-of-fold predictions.
* ``outer, min_cost (val)``: the search as it ran before (trials and pick on val, temperatures on val, the
  cheapest front point with val drop <= T): no guarantee. Test numbers only: re-splitting it would mean
  re-running the study per draw.

Columns: test FLOPs saving, drop (GT, points) and disagreement; exits kept; front points certified; over
100 re-splits of val + test into 2,000 calibration / 3,000 test images (the permutations of
``bench/policies.py``), the mean saving and the share of draws whose test drop exceeds T (the certificate
is recomputed on each draw; the front, chosen on train, stays); and the guarantee checked against a
population (``--draws`` calibration sets drawn with replacement from val + test, the deployed point's risk
on the whole pool: see :func:`outer_population`).

    python bench/outer_certified.py                  # ResNet-20 and -56, 400 trials
    python bench/outer_certified.py --depths 20 --trials 200
    python bench/outer_certified.py --cross-fit 0    # without the cross-fitted rows
    python bench/outer_certified.py --depths 56 --merge   # keeps ResNet-20's rows from the results file
    python bench/outer_certified.py --cross-fit 3 --out outer_certified_crossfit3   # 3 folds, its own file

Writes ``bench/results/outer_certified.json`` (``--out`` names another file). Heads come from the cache
``bench/policies.py`` fills; the out-of-fold predictions from the cache of ``bench.head_levers.out_of_fold``
(computed when missing: about 12 min for ResNet-20 and 40 for ResNet-56 on 2 cores with 2 folds; 3 folds took
31 min for ResNet-20 on a shared CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, require_fixtures, write_results  # noqa: E402

TOLERANCES = (1.0, 2.0)
RESPLITS = 100


def _concat(a, b):
    from autoexit.search.outer import SplitData

    return SplitData(np.concatenate([a.pred, b.pred], 1), {k: np.concatenate([a.scores[k], b.scores[k]], 1)
                                                          for k in a.scores},
                     np.concatenate([a.backbone_pred, b.backbone_pred]),
                     None if a.labels is None else np.concatenate([a.labels, b.labels]))


def study(recorded, accuracy: str, trials: int, certified: bool):
    """One study; the trials do not depend on the pick's budget (the tolerance is searched), so each T re-picks
    from it (``OuterSearchResult.from_study(..., pick=...)``)."""
    import optuna

    from autoexit.search.outer import optimize

    pick = {"rule": "certified" if certified else "min_cost", "max_drop": 1.0}
    return optimize(recorded, storage=optuna.storages.InMemoryStorage(), n_trials=trials, progress=False,
                    space="outer", settings={"accuracy": accuracy, "pick": pick, "seed": 0})


def outer_resplits(res, recorded, pool, splits, n_val: int, tol: float, accuracy: str) -> dict:
    from autoexit.search.outer import OuterSettings, PickRule, certify_front, evaluate_plan

    pick = PickRule("certified", tol, delta=0.1)
    settings = OuterSettings(accuracy=accuracy, pick=pick)
    savings, viol, chosen, ladders = [], 0, {}, {}
    for perm in splits:
        cal, tst = pool.take(perm[:n_val]), pool.take(perm[n_val:])
        t, plan, _ = certify_front(res.front, replace(recorded, val=cal), pick, settings, ladders)
        if t is None:
            savings.append(0.0)
            continue
        chosen[(t.number, plan.tolerance)] = chosen.get((t.number, plan.tolerance), 0) + 1
        m = evaluate_plan(replace(recorded, val=tst), plan, "val", "gt")
        savings.append(m["saving"])
        viol += m["drop_pp"] > tol + 1e-12
    return {"resplit saving %": 100 * float(np.mean(savings)), "viol(drop)": viol / len(splits),
            "resplit distinct picks": len(chosen)}


def outer_population(res, recorded, pool, draws: int, n_cal: int, tol: float, accuracy: str, seed: int = 0) -> dict:
    """The guarantee's own statement, as ``bench/guarantee_check.py`` tests the policies': val + test pooled
    is the population; ``draws`` calibration sets of ``n_cal`` are drawn from it with replacement, the front
    (fixed, chosen on train) is certified on each, and a violation is a deployed point whose risk on the whole
    population (the one the certificate controls: disagreement label-free, the accuracy drop labelled)
    exceeds T."""
    from autoexit.search.outer import OuterSettings, PickRule, certify_front, plan_losses

    pick = PickRule("certified", tol, delta=0.1)
    settings = OuterSettings(accuracy=accuracy, pick=pick)
    big = replace(recorded, val=pool)
    risk: dict = {}  # population risk per deployed setting (a front point or one of its ladder steps)
    rng = np.random.default_rng(seed)
    bad = none = 0
    ladders: dict = {}
    for _ in range(draws):
        t, plan, _ = certify_front(res.front, replace(recorded, val=pool.take(rng.integers(0, pool.n, n_cal))),
                                   pick, settings, ladders)
        if t is None:
            none += 1
            continue
        key = (t.number, plan.tolerance)
        if key not in risk:
            risk[key] = 100 * plan_losses(big, plan, "val", accuracy).mean()
        bad += risk[key] > tol + 1e-12
    return {"population viol": bad / draws, "population draws": draws, "population none certified": none / draws}


def _policy_rows(depth: int, tol: float, tables: dict, costs, splits, suffix: str) -> list[dict]:
    """The core's guaranteed default policy, label-free and labelled, on ``tables`` (its fit split: train)."""
    from autoexit.policies import PolicyContext, make_policy
    from bench.policies import _pool, resplit_violations

    pool_t, rows = _pool(tables["val"], tables["test"]), []
    for label, policy, risk in (("max_softmax", "max_softmax", "disagreement"),
                                ("max_softmax+drop", "max_softmax", "drop")):
        fp = make_policy(policy).fit(PolicyContext(tables["train"], tables["val"], costs, tol, 0.1, risk))
        m = fp.evaluate(tables["test"], costs)
        rs = resplit_violations(fp, policy, pool_t, splits, tables["val"].n, costs, tol)
        rows.append({"model": f"resnet{depth}", "T %": tol, "method": label + suffix, "exits": len(fp.chain),
                     "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                     "disagree %": 100 * m["disagreement"], "certified": f"{len(fp.chain) > 0}",
                     "resplit saving %": rs["resplit saving %"], "viol(drop)": rs["viol(drop)"]})
    return rows


def _certified_rows(depth: int, tol: float, studies: dict, recorded, splits, draws: int, log,
                    suffix: str) -> list[dict]:
    """The certified outer search's pick at ``tol`` from each study (label-free, labelled) on ``recorded``."""
    from autoexit.search.outer import OuterSearchResult, PickRule, evaluate_plan

    pool, n_val, rows = _concat(recorded.val, recorded.test), recorded.val.n, []
    for acc, label in (("agreement", "outer, certified"), ("gt", "outer, certified+drop")):
        res = OuterSearchResult.from_study(studies[acc].study, recorded, pick=PickRule("certified", tol, delta=0.1))
        m = evaluate_plan(recorded, res.chosen, "test", "gt")
        rs = outer_resplits(res, recorded, pool, splits, n_val, tol, acc)
        t0 = time.perf_counter()
        rs.update(outer_population(res, recorded, pool, draws, n_val, tol, acc))
        log(f"  population check ({draws} draws): {time.perf_counter() - t0:.0f} s")
        c = res.certificate
        rows.append({"model": f"resnet{depth}", "T %": tol, "method": label + suffix, "exits": len(res.chosen.kept),
                     "saving %": 100 * m["saving"], "drop %": m["drop_pp"], "disagree %": m["disagreement_pp"],
                     "certified": f"{c['certified_points']}/{c['sequence_length']}", **rs,
                     "plan": res.chosen.describe()})
    return rows


def run_depth(depth: int, trials: int, log, draws: int = 1000, cross_fit: int = 2) -> dict:
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.pipeline import flops_costs
    from autoexit.policies import ExitTable
    from autoexit.search.outer import OuterSearchResult, PickRule, Recorded, evaluate_plan
    from bench.policies import cross_fitted_data, setup, split_data

    t0 = time.perf_counter()
    cfg, tb, points, rec, heads = setup(depth)
    data = split_data(rec, heads)
    names = [p.name for p in rec.points if p.name in heads]
    log(f"resnet{depth}: {len(names)} candidate exits, setup {time.perf_counter() - t0:.0f} s")
    costs = flops_costs(heads, names, float(tb.total_flops))

    def tables_of(d):  # the guaranteed policies, as bench/policies.py fits them (temperatures on train)
        temps = calibrate_temperatures(d["train"][0])
        return temps, {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in d.items()}

    temps, tables = tables_of(data)
    rng = np.random.default_rng(12345)  # bench/policies.py's re-splits
    splits = [rng.permutation(tables["val"].n + tables["test"].n) for _ in range(RESPLITS)]

    recorded = Recorded.from_heads(tb, rec, heads, fit=True)
    assert np.allclose(recorded.temperatures, temps)
    valrec = Recorded.from_heads(tb, rec, heads)  # the search as it ran before: everything on val
    variants = [("", recorded, tables)]
    if cross_fit:  # the same, with the trials (and the policies) on out-of-fold train predictions
        data_cf = cross_fitted_data(depth, rec, heads, data, cross_fit, cfg.train, log)
        temps_cf, tables_cf = tables_of(data_cf)
        rec_cf = Recorded.from_heads(tb, rec, heads, fit=True, fit_predictions=data_cf["train"][0], folds=cross_fit)
        assert np.allclose(rec_cf.temperatures, temps_cf)
        variants.append((f" (cross-fitted, {cross_fit} folds)", rec_cf, tables_cf))

    rows, timing = [], {}
    studies = {}
    for suffix, r, _ in variants:
        t0 = time.perf_counter()
        studies[suffix] = {acc: study(r, acc, trials, True) for acc in ("agreement", "gt")}
        timing[f"certified{suffix} (2 studies)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = {acc: study(valrec, acc, trials, False) for acc in ("agreement", "gt")}
    timing["min_cost on val (2 studies)"] = time.perf_counter() - t0
    log("  studies: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()))
    for tol in TOLERANCES:
        new = []
        for suffix, r, tabs in variants:
            new += _policy_rows(depth, tol, tabs, costs, splits, suffix)
            new += _certified_rows(depth, tol, studies[suffix], r, splits, draws, log, suffix)
        for acc, label in (("agreement", "outer, min_cost (val)"), ("gt", "outer, min_cost+drop (val)")):
            res = OuterSearchResult.from_study(plain[acc].study, valrec, pick=PickRule("min_cost", tol))
            m = evaluate_plan(valrec, res.chosen, "test", "gt")
            new.append({"model": f"resnet{depth}", "T %": tol, "method": label,
                        "exits": len(res.chosen.kept), "saving %": 100 * m["saving"], "drop %": m["drop_pp"],
                        "disagree %": m["disagreement_pp"], "certified": "no guarantee",
                        "resplit saving %": None, "viol(drop)": None, "plan": res.chosen.describe()})
        for r in new:
            log(f"  T={tol} {r['method']:45s} exits={r['exits']:2d} saving={r['saving %']:5.1f}% "
                f"drop={r['drop %']:5.2f} cert={r['certified']} resplit="
                + ("-" if r["resplit saving %"] is None else f"{r['resplit saving %']:.1f}% viol={r['viol(drop)']:.2f}"))
        rows += new
    return {"depth": depth, "candidates": names, "trials": trials, "cross_fit": cross_fit,
            "n": {"val": int(recorded.val.n), "test": int(recorded.test.n), "train": int(recorded.fit.n)},
            "rows": rows, "study_seconds": timing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--draws", type=int, default=1000, help="population draws of the guarantee check")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other depths of the existing results file (each row says which run made it)")
    ap.add_argument("--cross-fit", type=int, default=2,
                    help="also run every row on out-of-fold train predictions of this many folds (0: skip)")
    ap.add_argument("--out", default="outer_certified",
                    help="results name under bench/results (default outer_certified; e.g. outer_certified_crossfit3 "
                         "for --cross-fit 3, so the 2-fold rows stay)")
    args = ap.parse_args(argv)
    if args.cross_fit == 1 or args.cross_fit < 0:
        raise SystemExit(f"--cross-fit must be 0 (off) or a number of folds >= 2, got {args.cross_fit}")
    require_fixtures()

    def log(msg: str) -> None:
        print(msg, flush=True)

    from bench.common import RESULTS, environment

    command = " ".join(["python bench/outer_certified.py", *(sys.argv[1:] if argv is None else argv)])
    out = {"command": command, "depths": {}}
    prior = RESULTS / f"{args.out}.json"
    if args.merge and prior.exists():  # keep the other depths' rows, each with the run that made it
        import json

        old = json.loads(prior.read_text())
        for k, v in old.get("depths", {}).items():
            v.setdefault("run", {"command": old.get("command"), **{x: old.get("environment", {}).get(x)
                                                                    for x in ("date", "commit")}})
            out["depths"][k] = v
    env = environment()
    for d in args.depths:
        out["depths"][str(d)] = {**run_depth(d, args.trials, log, args.draws, args.cross_fit),
                                 "run": {"command": command, "date": env["date"], "commit": env["commit"]}}
    out["depths"] = dict(sorted(out["depths"].items(), key=lambda kv: int(kv[0])))
    rows = [r for d in out["depths"].values() for r in d["rows"]]
    print_table(rows, "Outer search with a certificate vs the guaranteed policy (test split; re-splits)",
                ["model", "T %", "method", "exits", "saving %", "drop %", "disagree %", "certified",
                 "resplit saving %", "viol(drop)", "population viol"])
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
