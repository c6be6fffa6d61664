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

Writes ``bench/results/outer_certified.json``. Heads come from the cache ``bench/policies.py`` fills.
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


def run_depth(depth: int, trials: int, log, draws: int = 1000) -> dict:
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.policies import ExitCosts, ExitTable, PolicyContext, make_policy
    from autoexit.search.outer import OuterSearchResult, PickRule, Recorded, evaluate_plan
    from bench.policies import _pool, resplit_violations, setup, split_data

    t0 = time.perf_counter()
    cfg, tb, points, rec, heads = setup(depth)
    data = split_data(rec, heads)
    names = [p.name for p in rec.points if p.name in heads]
    log(f"resnet{depth}: {len(names)} candidate exits, setup {time.perf_counter() - t0:.0f} s")
    # the guaranteed policies, as bench/policies.py fits them (temperatures on train)
    temps = calibrate_temperatures(data["train"][0])
    tables = {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in data.items()}
    costs = ExitCosts([heads[n].flops for n in names], [heads[n].point.flops_before for n in names],
                      float(tb.total_flops))
    pool_t = _pool(tables["val"], tables["test"])
    n_val = tables["val"].n
    rng = np.random.default_rng(12345)  # bench/policies.py's re-splits
    splits = [rng.permutation(pool_t.n) for _ in range(RESPLITS)]

    recorded = Recorded.from_heads(tb, rec, heads, fit=True)
    assert np.allclose(recorded.temperatures, temps)
    pool = _concat(recorded.val, recorded.test)
    valrec = Recorded.from_heads(tb, rec, heads)  # the search as it ran before: everything on val

    rows = []
    t0 = time.perf_counter()
    studies = {acc: study(recorded, acc, trials, True) for acc in ("agreement", "gt")}
    t_cert = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = {acc: study(valrec, acc, trials, False) for acc in ("agreement", "gt")}
    t_plain = time.perf_counter() - t0
    log(f"  studies: certified {t_cert:.0f} s (2 x {trials} trials), min_cost on val {t_plain:.0f} s")
    for tol in TOLERANCES:
        for label, policy, risk in (("max_softmax", "max_softmax", "disagreement"),
                                    ("max_softmax+drop", "max_softmax", "drop")):
            fp = make_policy(policy).fit(PolicyContext(tables["train"], tables["val"], costs, tol, 0.1, risk))
            m = fp.evaluate(tables["test"], costs)
            rs = resplit_violations(fp, policy, pool_t, splits, n_val, costs, tol)
            rows.append({"model": f"resnet{depth}", "T %": tol, "method": label, "exits": len(fp.chain),
                         "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                         "disagree %": 100 * m["disagreement"], "certified": f"{len(fp.chain) > 0}",
                         "resplit saving %": rs["resplit saving %"], "viol(drop)": rs["viol(drop)"]})
        for acc, label in (("agreement", "outer, certified"), ("gt", "outer, certified+drop")):
            res = OuterSearchResult.from_study(studies[acc].study, recorded, pick=PickRule("certified", tol, delta=0.1))
            m = evaluate_plan(recorded, res.chosen, "test", "gt")
            rs = outer_resplits(res, recorded, pool, splits, n_val, tol, acc)
            t0 = time.perf_counter()
            rs.update(outer_population(res, recorded, pool, draws, n_val, tol, acc))
            log(f"  population check ({draws} draws): {time.perf_counter() - t0:.0f} s")
            c = res.certificate
            rows.append({"model": f"resnet{depth}", "T %": tol, "method": label, "exits": len(res.chosen.kept),
                         "saving %": 100 * m["saving"], "drop %": m["drop_pp"], "disagree %": m["disagreement_pp"],
                         "certified": f"{c['certified_points']}/{c['sequence_length']}", **rs,
                         "plan": res.chosen.describe()})
        for acc, label in (("agreement", "outer, min_cost (val)"), ("gt", "outer, min_cost+drop (val)")):
            res = OuterSearchResult.from_study(plain[acc].study, valrec, pick=PickRule("min_cost", tol))
            m = evaluate_plan(valrec, res.chosen, "test", "gt")
            rows.append({"model": f"resnet{depth}", "T %": tol, "method": label,
                         "exits": len(res.chosen.kept), "saving %": 100 * m["saving"], "drop %": m["drop_pp"],
                         "disagree %": m["disagreement_pp"], "certified": "no guarantee",
                         "resplit saving %": None, "viol(drop)": None, "plan": res.chosen.describe()})
        for r in rows[-6:]:
            log(f"  T={tol} {r['method']:24s} exits={r['exits']:2d} saving={r['saving %']:5.1f}% "
                f"drop={r['drop %']:5.2f} cert={r['certified']} resplit="
                + ("-" if r["resplit saving %"] is None else f"{r['resplit saving %']:.1f}% viol={r['viol(drop)']:.2f}"))
    return {"depth": depth, "candidates": names, "trials": trials, "n": {"val": int(recorded.val.n),
            "test": int(recorded.test.n), "train": int(recorded.fit.n)}, "rows": rows,
            "study_seconds": {"certified (2 studies)": t_cert, "min_cost on val (2 studies)": t_plain}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--draws", type=int, default=1000, help="population draws of the guarantee check")
    args = ap.parse_args(argv)
    require_fixtures()

    def log(msg: str) -> None:
        print(msg, flush=True)

    out = {"command": " ".join(["python bench/outer_certified.py", *(sys.argv[1:] if argv is None else argv)]),
           "depths": {}}
    for d in args.depths:
        out["depths"][str(d)] = run_depth(d, args.trials, log, args.draws)
    rows = [r for d in out["depths"].values() for r in d["rows"]]
    print_table(rows, "Outer search with a certificate vs the guaranteed policy (test split; re-splits)",
                ["model", "T %", "method", "exits", "saving %", "drop %", "disagree %", "certified",
                 "resplit saving %", "viol(drop)", "population viol"])
    path = write_results("outer_certified", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
