"""Does the guaranteed budget hold? Issue 8's policies checked with 1,000 calibration draws, two ways.

The guarantee (docs/policies.md): with probability >= 1 - delta over the calibration data, the deployed
model's *true* risk (disagreement with the backbone, or the accuracy drop, on new data from the same
distribution) is <= T. ``bench/policies.py`` and ``bench/head_levers.py`` check it with 100 random re-splits
of val + test (5,000 CIFAR-10 images) into 2,000 calibration and 3,000 test images, counting a violation when
the *test* drop exceeds T. Three things blur that count: 100 draws (a true rate of 10 % is seen as 4-16 %);
the test set's own noise (a setting whose true drop is 0.9 % shows a test drop above 1 % on a good share of
3,000-image test sets); and the split itself: calibration and test halves share one fixed pool, so the test
half's risk is (5,000 x pool risk - 2,000 x calibration risk) / 3,000. A calibration half that happens to look
good - which is exactly when the certificate lets more inputs exit - leaves a test half that looks bad by as
much, which real new data, drawn independently of the calibration data, does not do. Stop 17 saw the labelled
policies at 11-14 % in four ResNet-56 rows of heads trained on few images; this benchmark tells a true rate
above delta from that noise.

For each depth, head variant (``baseline``: the default heads on the 5,000 train images, as trained before
``TrainConfig.select`` existed (best val-KL epoch, temperatures on val, ``bench.common.val_selected_training``),
like every other variant; ``core``, not run by default: what ``autoexit.enable`` runs now, heads that keep their
last epoch and temperatures fitted on train, ``bench/policies.py``'s heads; ``core-cross-fitted``: the same heads
with the policies and their temperatures fitted on 2-fold out-of-fold predictions of train, what
``enable(cross_fit=2)`` runs now (``bench/policies.py --cross-fit 2``; ``core-cross-fitted@K``: K folds);
``1250``/``2500``:
the same heads trained on that many train images, ``bench/head_levers.py --levers train-size``;
``cross-fitted``, not run by default: the policies fitted on 2-fold out-of-fold predictions of train,
``--levers cross-fitted`` there; ``feature``, not run by default: the heads distilled on the backbone's
penultimate features, ``--levers feature`` there; ``mixup``, not run by default: the heads trained by mixup function
matching for 120 epochs, ``--levers mixup`` there; ``mixup@N``: for ``N`` epochs, ``--mixup-epochs N`` there; ``skip``:
the heads built from the backbone's own stage-entry blocks, with the policies fitted out-of-fold, ``--levers skip``
there; ``mixup-cross-fitted``: the ``mixup`` heads with the policies fitted on out-of-fold predictions of fold heads
trained by mixup too, ``--levers mixup-cross-fitted`` there), tolerance
and policy (the five of ``bench/head_levers.py``; exits, gates and threshold family fitted on train; with
``--policies auto auto+drop`` also the ``auto`` policy, which picks the cheapest of the five on each calibration
draw, each certified at delta / 5; ``--policies auto[ms,gate] auto[ms,gate]+drop`` the cheaper of ``max_softmax``
and ``gate``, each at delta / 2):

- **re-split**: ``--resplits`` (default 1,000) random val + test re-splits, as in the other benchmarks
  (``bench.policies.resplit_violations``); a violation is a *test* value of the policy's own risk above T;
- **population**: the pool of 5,000 val + test images taken as the population, whose risk is known exactly.
  ``--draws`` (default 1,000) calibration sets of 2,000 drawn from it with replacement (i.i.d. draws of that
  population) re-certify the policy; a violation is the deployed setting's risk *on the whole pool* above T
  (``bench.policies.population_violations``). This is the guarantee's own statement, with no test noise: the
  rate must be <= delta up to binomial noise, for any population.

Each rate comes with its 95 % Clopper-Pearson interval and the one-sided p-value of "rate <= delta"
(small: above delta beyond noise). Also the deployed settings' mean and 90th-percentile true risk: how far
under T the certificate lands.

Run: ``python bench/guarantee_check.py`` (``--depths 20 56``, ``--variants baseline 1250 2500``,
``--draws 1000``, ``--resplits 1000``, ``--merge`` keeps the rows of depths and variants not run again).
Each row takes 10-70 s on 2 CPU cores with the defaults, so the default run (60 rows) takes about an hour once
the heads are cached. A first run also records the backbone and trains heads: about 6 min for ResNet-20 and
12 min for ResNet-56, plus per train-subset variant 2.5-3 min (ResNet-20) or 5.5-8 min (ResNet-56), and for
``cross-fitted`` about 5 min (ResNet-20) or 18 min (ResNet-56), for ``feature`` 4.5 or 10 min, for ``mixup``
19 min (ResNet-20) or about 50 min (ResNet-56).
Results: ``bench/results/guarantee_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, require_fixtures, val_selected_training, write_results  # noqa: E402
from bench.head_levers import POLICIES, mixup_epochs  # noqa: E402

DELTA = 0.1
# Checked only when named with --policies (each entry: (name, policy, risk, options)): ``auto`` (the cheapest of
# the five guaranteed policies, each certified at delta / 5 and chosen on the calibration draw) and
# ``auto[ms,gate]`` (the cheaper of max_softmax and gate, each at delta / 2; what bench/policies.py measures under
# that name), since each of their rows refits every candidate per draw; and ``gate[harmless]+drop``, gates trained
# on the train labels to predict harmless exits (bench/policies.py's row of that name).
NAMED_POLICIES = (("auto", "auto", "disagreement", {}), ("auto+drop", "auto", "drop", {}),
                  ("auto[ms,gate]", "auto", "disagreement", {"candidates": ["max_softmax", "gate"]}),
                  ("auto[ms,gate]+drop", "auto", "drop", {"candidates": ["max_softmax", "gate"]}),
                  ("gate[harmless]+drop", "gate", "drop", {"target": "harmless"}))
CHECK_POLICIES = tuple((*p, {}) for p in POLICIES) + NAMED_POLICIES
TOLERANCES = (1.0, 2.0)
VARIANTS = ("baseline", "1250", "2500")


def core_folds(variant: str) -> int | None:
    """The fold count of a ``core`` variant: 0 for ``core`` (fitted in-sample), K for ``core-cross-fitted@K``
    (2 for ``core-cross-fitted``); None for any other variant or a malformed one."""
    if variant == "core":
        return 0
    name, at, k = variant.partition("@")
    if name != "core-cross-fitted" or (at and not k.isdigit()):
        return None
    folds = int(k) if at else 2
    return folds if folds >= 2 else None


def variant_tables(depth: int, variant: str, log) -> tuple[dict, object]:
    """ExitTables per split of ``variant``'s heads (temperatures fitted on val) and the exit costs."""
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.pipeline import flops_costs
    from autoexit.policies import ExitTable
    from bench.head_levers import (
        FEATURE_WEIGHT,
        MIXUP_EPOCHS,
        SKIP_LR,
        augmented_heads,
        cross_fitted_table,
        feature_heads,
        mixup_cross_fitted_tables,
        skip_tables,
        subset_logits,
        subset_tables,
        trained_tables,
    )
    from bench.policies import cross_fitted_data, setup, split_data

    folds = core_folds(variant)
    core = folds is not None  # the heads enable trains now (last epoch)
    cfg, tb, points, rec, heads = setup(depth, train=None if core else val_selected_training())
    data = split_data(rec, heads)
    names = [p.name for p in rec.points]
    costs = flops_costs(heads, names, float(tb.total_flops))
    if variant == "feature":  # as head_levers --levers feature (default weight): their own FLOPs and temperatures
        fh = feature_heads(depth, rec, heads, FEATURE_WEIGHT, log)
        return (trained_tables(rec, fh, data)[1],
                flops_costs(fh, names, float(tb.total_flops)))
    if variant == "mixup-cross-fitted":  # as head_levers --levers mixup-cross-fitted: the mixup heads, fitted on
        _, mtables, _, oof_table = mixup_cross_fitted_tables(depth, tb, rec, heads, data, MIXUP_EPOCHS, 2, log)
        return {**mtables, "train": oof_table}, costs  # out-of-fold predictions of fold heads trained by mixup
    if variant.startswith("mixup"):  # as head_levers --levers mixup [--mixup-epochs N for mixup@N]: the default
        mx = augmented_heads(depth, tb, rec, heads, mixup_epochs(variant), log, mixup=True)  # heads' FLOPs, own temps
        return trained_tables(rec, mx, data)[1], costs
    if variant == "skip":  # as head_levers --levers skip: their own FLOPs and temperatures, fitted out-of-fold
        return skip_tables(depth, tb, rec, heads, data, SKIP_LR, 2, log)[3:]
    if folds:  # what enable(cross_fit=K) runs now: the policies and their temperatures fitted on out-of-fold train
        data = cross_fitted_data(depth, rec, heads, data, folds, cfg.train, log)  # predictions (policies.py --cross-fit K)
    if variant in ("baseline", "cross-fitted") or core:  # core: what autoexit.enable runs now, last-epoch heads
        temps = calibrate_temperatures(data["train" if core else "val"][0])  # and temperatures on train
        tables = {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in data.items()}
        if variant == "cross-fitted":  # fitted on out-of-fold predictions of train (2 folds), as head_levers
            tables["train"] = cross_fitted_table(depth, rec, heads, data, temps, 2, log)[1]
        return tables, costs
    return subset_tables(rec, data, subset_logits(depth, rec, heads, int(variant), log))[1], costs


def check_variant(depth: int, variant: str, tables: dict, costs, tolerances, draws: int, resplits: int,
                  log, policies=None) -> list[dict]:
    import numpy as np

    from autoexit.policies import PolicyContext, make_policy
    from bench.policies import (
        _pool,
        above_delta_pvalue,
        population_violations,
        rate_interval,
        resplit_violations,
    )

    pool = _pool(tables["val"], tables["test"])
    n_val = tables["val"].n
    rng = np.random.default_rng(12345)  # the same first 100 re-splits as the other benchmarks
    splits = [rng.permutation(pool.n) for _ in range(resplits)]
    rng = np.random.default_rng(54321)
    boot = [rng.integers(0, pool.n, n_val) for _ in range(draws)]
    rows = []
    for tol in tolerances:
        for name, policy, risk, options in CHECK_POLICIES:
            if name not in (policies or [p[0] for p in POLICIES]):
                continue
            t0 = time.perf_counter()
            fp = make_policy(policy, **options).fit(
                PolicyContext(tables["train"], tables["val"], costs, tol, DELTA, risk))
            m = fp.evaluate(tables["test"], costs)
            rs = resplit_violations(fp, policy, pool, splits, n_val, costs, tol)
            k_rs = round(rs["viol(drop)" if risk == "drop" else "viol(disagree)"] * resplits)
            pop = population_violations(fp, pool, boot, costs, tol, n_test=pool.n - n_val)
            k_pop = pop["violations"]
            row = {"model": f"resnet{depth}", "variant": variant, "T %": tol, "policy": name, "risk": risk,
                   "exits": len(fp.chain), "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                   "resplits": resplits, "draws": draws, "re-split viol": k_rs / max(resplits, 1),
                   "re-split 95% CI": [round(v, 4) for v in rate_interval(k_rs, resplits)],
                   "re-split p(<=delta)": above_delta_pvalue(k_rs, resplits, DELTA),
                   "re-split viol (drop)": rs["viol(drop)"],
                   "pop viol": pop["viol(pop)"],
                   "pop 95% CI": [round(v, 4) for v in rate_interval(k_pop, draws)],
                   "pop p(<=delta)": above_delta_pvalue(k_pop, draws, DELTA),
                   "pop viol (drop)": pop["viol(pop, drop)"],
                   "independent-test viol": pop["viol(pop + test noise)"],
                   "pop risk % (mean)": pop["pop risk % (mean)"], "pop risk % (p90)": pop["pop risk % (p90)"],
                   "pop saving %": pop["pop saving %"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            log(f"  resnet{depth} {variant} T={tol} {name:16s} re-split {k_rs}/{resplits} "
                f"population {k_pop}/{draws}, independent test {100 * pop['viol(pop + test noise)']:.1f} % "
                f"(true risk mean {pop['pop risk % (mean)']:.2f} %, p90 {pop['pop risk % (p90)']:.2f} %) {row['seconds']:.0f} s")
    return rows


def rows_not_redone(rows: list[dict], depths, variants, tolerances, policies=None) -> list[dict]:
    """The ``rows`` a run of ``depths`` x ``variants`` x ``tolerances`` x ``policies`` (None: all) does not redo."""
    return [r for r in rows if not (int(r["model"].removeprefix("resnet")) in depths and r["variant"] in variants
                                    and r["T %"] in tolerances and (not policies or r["policy"] in policies))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=[20, 56])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="baseline (default heads), core (last-epoch heads, temperatures on train; "
                         "core-cross-fitted: fitted out-of-fold), cross-fitted (policies fitted on 2-fold out-of-fold "
                         "predictions of train), feature (heads distilled on the penultimate features), mixup "
                         "(heads trained by mixup function matching; mixup@N: for N epochs), skip (heads built from "
                         "the backbone's stage-entry blocks, fitted out-of-fold) and/or "
                         "train-subset sizes (heads trained on that many images)")
    ap.add_argument("--tolerances", type=float, nargs="+", default=list(TOLERANCES))
    ap.add_argument("--policies", nargs="+", choices=[p[0] for p in CHECK_POLICIES], default=None,
                    help="only these policies (default: the five of bench/head_levers.py; auto and auto+drop, the "
                         "cheapest of them chosen on each calibration draw, and auto[ms,gate](+drop), the cheaper "
                         "of max_softmax and gate, and gate[harmless]+drop, only when named)")
    ap.add_argument("--draws", type=int, default=1000, help="population draws (calibration sets, with replacement)")
    ap.add_argument("--resplits", type=int, default=1000, help="random val/test re-splits")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other depths and variants already in the output file")
    args = ap.parse_args(argv)
    for v in args.variants:
        if (v not in ("baseline", "cross-fitted", "feature", "mixup", "skip", "mixup-cross-fitted")
                and core_folds(v) is None
                and not (v.isdigit() and 0 < int(v) < 5000)
                and not (v.startswith("mixup@") and v[6:].isdigit() and mixup_epochs(v) > 0)):
            ap.error(f"--variants: {v!r} is none of 'baseline', 'core', 'core-cross-fitted[@K]', 'cross-fitted', 'feature', "
                     "'mixup', 'mixup@N' (N epochs), "
                     "'skip', 'mixup-cross-fitted' or a train-subset size between 1 and 4999")
    for what in ("draws", "resplits"):
        if getattr(args, what) < 1:
            ap.error(f"--{what} must be at least 1, got {getattr(args, what)}")
    if any(not 0 < t < 100 for t in args.tolerances):
        ap.error("--tolerances are percentages between 0 and 100, e.g. 1 2")
    require_fixtures()
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from bench.common import RESULTS

    prior = RESULTS / "guarantee_check.json"

    def kept() -> list[dict]:
        """With ``--merge``, the rows of the output file this run does not redo, each with the run it came from;
        read again before every write, so that runs of other depths or variants at the same time keep theirs."""
        if not (args.merge and prior.exists()):
            return []
        return rows_not_redone(json.loads(prior.read_text()).get("rows", []), args.depths, args.variants,
                               args.tolerances, args.policies)

    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": environment().get("commit"),
           "argv": "python bench/guarantee_check.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for d in args.depths:
        for v in args.variants:
            tables, costs = variant_tables(d, v, log)
            rows += [{**r, "run": run} for r in check_variant(d, v, tables, costs, args.tolerances, args.draws,
                                                              args.resplits, log, args.policies)]
            write_results("guarantee_check", {"args": vars(args), "delta": DELTA, "rows": kept() + rows,
                                              "partial": True, "seconds": time.perf_counter() - t0})
    rows = kept() + rows
    print_table(rows, title=f"guarantee check: violation rates (delta = {DELTA}), {args.resplits} re-splits, "
                f"{args.draws} population draws",
                columns=["model", "variant", "T %", "policy", "saving %", "re-split viol", "re-split p(<=delta)",
                         "pop viol", "pop p(<=delta)", "pop risk % (mean)", "pop risk % (p90)"])
    write_results("guarantee_check", {"args": vars(args), "delta": DELTA, "rows": rows,
                                      "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
