"""Exit policies on the CIFAR-10 fixture (issue 8): FLOPs saving, real accuracy drop, share of the
oracle and budget violations over random re-splits, for every policy against the paper-003 baseline.

Setup: akamaster ResNet-20 / ResNet-56 on the CIFAR-10 JPEG test set (10,000 images), exits after
every residual block (``EnableConfig(granularity=2)``), default heads (separable conv > BN > ReLU >
GAP > FC128 > FC, KL-distilled, label-free), split 50/20/30 (train / val / test, seed 0).

- ``paper003``: T/2^n thresholds + max softmax + K(S) subset, chosen on val (no guarantee).
- ``max_softmax`` / ``margin`` / ``entropy`` / ``patience`` / ``gate``: exit set, gates and the
  threshold family fitted on train; Learn-then-Test on val (delta = 0.1); label-free risk
  (disagreement with the backbone, an upper bound of the drop).
- ``max_softmax+drop`` / ``gate+drop``: the same policies with the labelled risk (the accuracy drop
  itself, Waudby-Smith--Ramdas p-values): needs labels on the calibration split.
- ``gate[harmless]+drop``: ``gate+drop`` with gates trained on the train labels to predict harmless exits
  (``GatePolicy(target="harmless")``: not "head wrong and backbone right") instead of agreement.
- ``gate+cascade``: gate policy, then the kept heads retrained to read the previous exit's logits.
- ``auto`` / ``auto+drop``: the cheapest of the five guaranteed policies above (``max_softmax``, ``margin``,
  ``entropy``, ``patience``, ``gate``), each certified at delta / 5 and chosen on the calibration split;
  ``auto[fit]``: chosen on train before calibration, certified at delta; ``auto[ms,gate]``: only ``max_softmax``
  and ``gate`` as candidates, each at delta / 2; ``auto[+harmless]+drop``: the five and ``gate[target=harmless]``
  (the gate of ``gate[harmless]+drop``), each at delta / 6. Rows record the candidate deployed (``chosen``) and, per
  re-split, which one was (``resplit picks``).

Violations: val and test (5,000 samples) are pooled and re-split at random into 2,000 calibration
and 3,000 test samples ``--resplits`` times (default 100); every guaranteed policy keeps its exits,
rules and family (fitted on train) and is recalibrated on each calibration draw; paper003 is re-run
on each draw. A violation is a test accuracy drop above the tolerance.

Hindsight (no guarantee; a reference): what each guaranteed policy's exits and signal could save at a
test drop <= T with thresholds picked on the test labels themselves, along its own threshold family and
along a new greedy path built on test. It separates what the guarantee costs (saving vs hindsight) from
what the heads and the signal allow at all (hindsight vs the oracle).

Latency (last, noisy: the machine is shared): batch-1 and batch-32 CPU time per sample of the
TorchScript early-exit model vs the backbone, ``autoexit.cost.compare_latency``, at T = 1 % for the
default policy, ``gate`` and ``paper003``, and for the default policy choosing its exits by latency
(``cost="latency"``: every stage and head timed on this CPU at batch 1 or 32) instead of FLOPs.

Heads: the core's default training (``TrainConfig()``: each head keeps its last epoch and never reads val),
and, as ``autoexit.enable`` does, the guaranteed policies' temperatures fitted on train (their fit split;
paper003's on val, as the paper does), so nothing they deploy but the certified thresholds depends on val.
``--teacher mixup`` runs all of it with the heads trained by function matching instead
(``TrainConfig(teacher="mixup", epochs=--mixup-epochs)``, default 120; results in ``policies_mixup.json``).
Those heads were trained before ``select`` existed (best val-KL epoch) and take hours to retrain, so that
run keeps how it was measured: val-selected heads, every temperature fitted on val
(``bench.common.val_selected_training``). ``--temperatures val`` fits every temperature on val with the
default heads (an ablation: what the val fit gave, outside the guarantee's proof; ``policies_valtemps.json``).
Both of these runs keep the latency recorded with their tables (the latency variants run ``enable``'s own
``assemble``, which fits the guaranteed policies' temperatures on train). ``--cross-fit K`` fits the guaranteed
policies and their temperatures on out-of-fold predictions of the train split (K folds; fold heads trained as the
default heads are, cached by ``bench.head_levers.out_of_fold``), as ``EnableConfig(cross_fit=K)`` does, latency
included and no cascade rows (``policies_crossfit.json``).

Run: ``python bench/policies.py`` (``--teacher mixup``, ``--depths 20``, ``--resplits 50``, ``--no-latency`` (keeps the latency
recorded before, with its date); ``--latency-only``
re-measures the latency of a recorded run, e.g. on a quieter machine; ``--only gate+drop 'gate[harmless]+drop'``
runs just those rows into the recorded file, each row keeping its own run, or starts a depth or file with just them).
Results: ``bench/results/policies.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoexit.policies import AUTO_CANDIDATES  # noqa: E402
from bench.common import (  # noqa: E402
    cifar10_data,
    cifar_resnet,
    environment,
    latency_environment,
    print_table,
    require_fixtures,
    val_selected_training,
    write_results,
)

TOLERANCES = (0.5, 1.0, 2.0)
VARIANTS = [  # (label, policy, risk, options)
    ("paper003", "paper003", "disagreement", {}),
    ("max_softmax", "max_softmax", "disagreement", {}),
    ("margin", "margin", "disagreement", {}),
    ("entropy", "entropy", "disagreement", {}),
    ("patience", "patience", "disagreement", {}),
    ("gate", "gate", "disagreement", {}),
    ("max_softmax+drop", "max_softmax", "drop", {}),
    ("gate+drop", "gate", "drop", {}),
    ("gate[harmless]+drop", "gate", "drop", {"target": "harmless"}),
    ("auto", "auto", "disagreement", {}),
    ("auto+drop", "auto", "drop", {}),
    ("auto[fit]", "auto", "disagreement", {"select": "fit"}),
    ("auto[fit]+drop", "auto", "drop", {"select": "fit"}),
    ("auto[ms,gate]", "auto", "disagreement", {"candidates": ["max_softmax", "gate"]}),
    ("auto[ms,gate]+drop", "auto", "drop", {"candidates": ["max_softmax", "gate"]}),
    ("auto[+harmless]+drop", "auto", "drop", {"candidates": [*AUTO_CANDIDATES, "gate[target=harmless]"]}),
]


def _cache_root() -> Path:
    from autoexit.data import default_cache_dir

    return default_cache_dir() / "bench-heads"


def cached_heads(rec, specs: dict, train_cfg, progress: bool = False) -> dict:
    """Trained heads for ``rec``, cached as state_dicts keyed by recording path + specs + training config."""
    from autoexit.distill import TrainedHead, train_heads
    from autoexit.heads import build_head, default_head_spec

    names = [p.name for p in rec.points]
    spec_of = {n: specs.get(n) or default_head_spec(rec.point(n).shape, rec.num_classes) for n in names}
    key_src = json.dumps({"rec": str(rec.path), "specs": {n: s.to_dict() for n, s in spec_of.items()},
                          "train": asdict(train_cfg), "cascade": False}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = _cache_root() / f"{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        out = {}
        for n in names:
            meta = blob["meta"][n]
            p = rec.point(n)
            mod = build_head(spec_of[n], p.shape, rec.num_classes)
            mod.load_state_dict(blob["state"][n])
            mod.eval()
            out[n] = TrainedHead(point=p, spec=spec_of[n], module=mod, **meta)
        return out
    t0 = time.perf_counter()
    heads = train_heads(rec, spec_of, train_cfg, progress=progress)
    print(f"trained {len(heads)} heads in {time.perf_counter() - t0:.0f} s", flush=True)
    meta = {}
    for n, h in heads.items():
        meta[n] = {"flops": h.flops, "params": h.params, "param_bytes": h.param_bytes,
                   "val_agreement": h.val_agreement, "val_kl": h.val_kl, "epochs": h.epochs,
                   "seconds": h.seconds, "history": h.history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key_src, "meta": meta, "state": {n: h.module.state_dict() for n, h in heads.items()}}, tmp)
    tmp.replace(path)
    return heads


def plain_heads(rec, progress: bool = False, train=None, head: str = "default") -> dict:
    """Heads for every point of ``rec`` (``head``: a preset of ``autoexit.heads.HEAD_PRESETS``, the core's default
    design, paper 003's, or ``cheap``, SDN's 2x2 average pool + FC), trained with ``train`` or the default
    TrainConfig, cached per head.

    Uses the search package's per-head cache (shared with the other benchmarks) when it is there.
    """
    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.heads import preset_head_spec

    train = train or TrainConfig()
    specs = {p.name: preset_head_spec(head, p.shape, rec.num_classes) for p in rec.points} if head != "default" else {}
    try:
        from autoexit.search.pipeline import train_heads_cached
    except ImportError:  # pragma: no cover - the search package is optional here
        return cached_heads(rec, specs, train, progress=progress)
    return train_heads_cached(rec, specs, train, cache_dir=default_cache_dir() / "heads", progress=progress)


def oracle_saving(agree, costs) -> float:
    """Share of the backbone's cost the oracle saves: each sample leaves at the first head that agrees
    (``agree`` [exits, n] bool, ``autoexit.subset.oracle_flops``), with ``costs`` an ``ExitCosts``."""
    from autoexit.subset import oracle_flops

    return float(1 - oracle_flops(np.asarray(agree), costs.c1, costs.before, costs.base).mean() / costs.base)


def setup(depth: int, progress: bool = False, teacher: str = "recorded", epochs: int = 120, train=None,
          head: str = "default"):
    """Backbone, exit points after every residual block, recording and trained heads (all cached).

    ``train``: how the default heads are trained (default: the core's ``TrainConfig()``; the levers and
    guarantee-check benchmarks pass ``bench.common.val_selected_training()``, what their tables were measured
    with). ``teacher="mixup"``: the default heads trained instead by function matching for ``epochs`` epochs
    (``TrainConfig(teacher="mixup", epochs=epochs, patience=0, select="val")``, the core's training), through
    ``bench.head_levers.augmented_heads`` and its cache, which the mixup lever of that benchmark fills; the
    val-selected default heads give their specs. ``head="cheap"``: every point gets the core's cheap preset instead
    of the default design (``EnableConfig(head="cheap")``), trained as the default heads are."""
    from autoexit.pipeline import EnableConfig, prepare

    if teacher == "mixup":
        if head != "default":
            raise SystemExit("--teacher mixup was measured with the default heads: drop --head")
        train = val_selected_training()
    cfg = EnableConfig(granularity=2, **({"train": train} if train is not None else {}),
                       **({"head": head} if head != "default" else {}))
    tb, points, rec = prepare(cifar_resnet(depth).eval(), cifar10_data(), cfg, progress=progress)
    heads = plain_heads(rec, progress=progress, train=train, head=head)
    if teacher == "mixup":
        from bench.head_levers import augmented_heads

        heads = augmented_heads(depth, tb, rec, heads, epochs, print, mixup=True)
    elif teacher != "recorded":
        raise SystemExit(f"--teacher must be recorded or mixup, got {teacher!r}")
    return cfg, tb, points, rec, heads


def _heads_digest(heads: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(heads):
        for k, v in heads[name].module.state_dict().items():
            h.update(name.encode() + k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def split_data(rec, heads: dict) -> dict:
    """Per split: ExitPredictions and per-exit activation statistics (cached on disk)."""
    from autoexit.calibrate import ExitPredictions
    from autoexit.pipeline import predictions_for, split_stats

    key = hashlib.sha256(f"{rec.path}|{_heads_digest(heads)}|v1".encode()).hexdigest()[:20]
    path = _cache_root().parent / "bench-tables" / f"{key}.pt"
    names = [p.name for p in rec.points if p.name in heads]
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
    else:
        blob = {}
        for split in ("train", "val", "test"):
            p = predictions_for(rec, heads, split)
            blob[split] = {"logits": p.logits, "stats": torch.stack(split_stats(rec, names, split))}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    out = {}
    for split, d in blob.items():
        preds = ExitPredictions(names, d["logits"], rec.logits(split), rec.labels(split))
        out[split] = (preds, list(d["stats"]))
    return out


def _pool(a, b):
    from autoexit.policies import ExitTable

    return ExitTable(a.names, [torch.cat([x, y]) for x, y in zip(a.z, b.z)],
                     torch.cat([a.backbone_logits, b.backbone_logits]),
                     torch.cat([a.labels, b.labels]) if a.labels is not None else None,
                     [torch.cat([x, y]) for x, y in zip(a.stats, b.stats)] if a.stats is not None else None)


def hindsight(fp, test, costs, tol: float) -> dict:
    """What the policy's exits and signal could save with thresholds picked on the test split itself, at a
    test accuracy drop <= ``tol`` (no guarantee; an upper reference that separates what the guarantee costs
    from what the exit signal allows):

    - ``hindsight family %``: the best row of the policy's own threshold family (the one Learn-then-Test walks);
    - ``hindsight signal %``: a new greedy threshold path built on the test labels (the labelled drop as the
      loss) over the same chain and rules: roughly, "perfect thresholds chosen on the test labels".
    """
    from autoexit.policies import evaluate_thresholds
    from autoexit.policies.cascade import chain_costs, greedy_path, loss_matrix

    fp = replace(fp, alternatives=None)  # auto: the deployed candidate's own family
    _, chain, rules = fp.full_chain
    if not chain or fp.family is None:
        return {"hindsight family %": 0.0, "hindsight signal %": 0.0}
    s = fp.full_scores(test)
    best = 0.0
    for row in fp.family:
        m = evaluate_thresholds(chain, s, row, test, costs)
        if m["drop"] <= tol / 100 + 1e-12:
            best = max(best, m["saving"])
    cc = chain_costs(costs, chain)
    path = greedy_path(s, loss_matrix(test, chain, "drop"), cc, chunk=max(1, test.n // 1000),
                       max_risk=2 * tol / 100)
    return {"hindsight family %": 100 * best,
            "hindsight signal %": 100 * (1 - path.flops_at(tol / 100) / costs.base)}


def resplit_violations(fp, policy: str, pool, splits, n_val: int, costs, tol: float) -> dict:
    """Budget violations of a fitted policy over random re-splits of ``pool`` (val + test pooled): on each
    permutation the first ``n_val`` rows re-certify the policy (its exits, signal and threshold family are
    kept; paper003 is refitted, having no certificate) and the rest are the test. A violation is a test
    drop (or disagreement) above ``tol`` %."""
    from autoexit.policies import PolicyContext, make_policy

    s_pool = fp.full_scores(pool) if policy != "paper003" else None
    viol_drop = viol_dis = 0
    savings, drops, picks = [], [], {}
    for perm in splits:
        cal_idx, test_idx = perm[:n_val], perm[n_val:]
        cal_t, test_t = pool.subset_rows(cal_idx), pool.subset_rows(test_idx)
        if policy == "paper003":
            fr = make_policy("paper003").fit(PolicyContext(cal_t, cal_t, costs, tol, 0.1, "disagreement"))
            mr = fr.evaluate(test_t, costs)
        else:
            fr = fp.recertify(cal_t)
            mr = fr.evaluate(test_t, costs, scores=fr.kept_scores(s_pool)[:, test_idx])
            if "auto" in fr.info:  # which candidate auto deployed on this draw
                picks[fr.policy] = picks.get(fr.policy, 0) + 1
        savings.append(mr["saving"])
        drops.append(mr["drop"])
        viol_drop += mr["drop"] > tol / 100
        viol_dis += mr["disagreement"] > tol / 100
    n = max(len(splits), 1)
    return {"viol(drop)": viol_drop / n, "viol(disagree)": viol_dis / n,
            "resplit saving %": 100 * float(np.mean(savings)) if savings else None,
            "resplit drop % (p90)": 100 * float(np.quantile(drops, 0.9)) if drops else None,
            **({"resplit picks": picks} if picks else {})}


def independent_test_violation(risk: str, value: float, harm: float, n_test: int, tol: float) -> float:
    """Chance that a deployed setting whose true risk is ``value`` (a fraction) shows a risk above ``tol`` % on an
    independent test set of ``n_test`` samples drawn from the same population. The disagreement is a share of
    samples: exact binomial. The drop is a mean of per-sample +1 (harm: backbone right, answer wrong), -1 (help)
    and 0, with harm ``harm`` and help ``harm - value``: normal approximation with a continuity correction."""
    from scipy.stats import binom, norm

    limit = math.floor(tol / 100 * n_test + 1e-9)  # a violation is more than ``limit`` net errors
    if risk == "disagreement":
        return float(binom.sf(limit, n_test, min(max(value, 0.0), 1.0)))
    var = harm + (harm - value) - value ** 2
    if var <= 1e-15:
        return float(value * n_test > limit)
    return float(norm.sf((limit + 0.5 - n_test * value) / math.sqrt(n_test * var)))


def population_violations(fp, pool, draws, costs, tol: float, n_test: int | None = None) -> dict:
    """Budget violations of a guaranteed policy measured against a population whose risk is known exactly:
    ``pool`` itself. Each of ``draws`` (index arrays into ``pool``, drawn with replacement: i.i.d. samples of
    the pool's distribution) re-certifies the policy (its exits, rules and family kept, as fitted on train);
    the certified setting's *true* risk is its risk on the whole pool, with no test-set noise. This is exactly
    what the guarantee promises - P(true risk > T) <= delta over calibration draws - for the population
    "pick a pool sample at random". A violation is a true risk above ``tol`` %: for the policy's own risk
    (``disagreement`` or ``drop``) and, for reference, the accuracy drop whatever the risk.
    Also returns the mean true risk (in %) of the deployed settings: how far under T the guarantee lands, and with
    ``n_test``, the expected violation rate had each deployed setting been tested on an independent test set of
    ``n_test`` samples (:func:`independent_test_violation`): the population rate plus test noise, without the link
    between the calibration and test halves that a re-split of one pool has."""
    s_pool = fp.full_scores(pool)
    own = fp.risk
    viol_own = viol_drop = 0
    viol_test = 0.0
    risks, savings = [], []
    for idx in draws:
        fr = fp.recertify(pool.subset_rows(idx))
        m = fr.evaluate(pool, costs, scores=fr.kept_scores(s_pool))
        risks.append(m[own])
        savings.append(m["saving"])
        viol_own += m[own] > tol / 100 + 1e-12
        viol_drop += m["drop"] > tol / 100 + 1e-12
        if n_test:
            viol_test += independent_test_violation(own, m[own], m.get("harm", 0.0), n_test, tol)
    n = max(len(draws), 1)
    return {"risk": own, "draws": len(draws), "violations": int(viol_own), "viol(pop)": viol_own / n,
            "viol(pop, drop)": viol_drop / n, "viol(pop + test noise)": viol_test / n if n_test else None,
            "pop risk % (mean)": 100 * float(np.mean(risks)) if risks else None,
            "pop risk % (p90)": 100 * float(np.quantile(risks, 0.9)) if risks else None,
            "pop saving %": 100 * float(np.mean(savings)) if savings else None}


def rate_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate seen ``k`` times in ``n`` draws."""
    from scipy.stats import beta

    lo = float(beta.ppf((1 - level) / 2, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - (1 - level) / 2, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def above_delta_pvalue(k: int, n: int, delta: float) -> float:
    """One-sided p-value of "the true violation rate is at most ``delta``" after ``k`` violations in ``n``
    draws: P(Binomial(n, delta) >= k). Small values say the rate is above delta beyond noise."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, delta))


def cross_fitted_data(depth: int, rec, heads: dict, data: dict, folds: int, train, log) -> dict:
    """``data`` with the train split's predictions replaced by their out-of-fold copies (``folds`` folds, each
    predicted by heads trained with ``train`` on the others: ``bench.head_levers.out_of_fold``, cached), what
    ``EnableConfig(cross_fit=folds)`` fits the guaranteed policies and their temperatures on."""
    from autoexit.calibrate import ExitPredictions
    from bench.head_levers import out_of_fold

    tr, stats = data["train"]
    oof = out_of_fold(depth, rec, heads, folds, log, train)
    return {**data, "train": (ExitPredictions(tr.names, oof, tr.backbone_logits, tr.labels), stats)}


def run_depth(depth: int, resplits: int, cascade: bool, log, teacher: str = "recorded", epochs: int = 120,
              val_temperatures: bool = False, cross_fit: int = 0, only: tuple = (), head: str = "default") -> dict:
    """One network's rows (``only``: just the VARIANTS of these labels)."""
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.distill import train_cascade_heads
    from autoexit.pipeline import flops_costs, predictions_for_splits, temperature_split
    from autoexit.policies import ExitTable, PolicyContext, make_policy

    t_setup = time.perf_counter()
    cfg, tb, points, rec, heads = setup(depth, teacher=teacher, epochs=epochs, head=head)
    data = split_data(rec, heads)
    if cross_fit:  # the guaranteed policies (and their temperatures) fitted on out-of-fold train predictions
        data = cross_fitted_data(depth, rec, heads, data, cross_fit, cfg.train, log)
    names = [p.name for p in rec.points if p.name in heads]
    val = data["val"][0]
    # temperatures as autoexit.enable fits them (pipeline.temperature_split): paper003 on val, the guaranteed
    # policies on their fit split (train); the val-selected mixup run keeps val for all, as it was measured.
    # main() decides that (it must know before any work whether latency may be re-measured); heads that keep
    # their best val epoch read val already, so nothing may be fitted on train beside them
    if cfg.train.keeps_best and not val_temperatures:
        raise SystemExit(f"resnet{depth}: these heads keep their best val epoch; their tables must fit every "
                         "temperature on val (main() passes val_temperatures=True for them)")
    fit_split = "val" if val_temperatures else temperature_split(cfg, guaranteed=True)

    def tables_for(split: str) -> dict:
        temps = calibrate_temperatures(data[split][0])
        return {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in data.items()}

    tables_of = {"val": tables_for("val")}
    tables_of["fit"] = tables_of["val"] if fit_split == "val" else tables_for(fit_split)
    tables = tables_of["fit"]
    costs = flops_costs(heads, names, float(tb.total_flops))
    log(f"resnet{depth}: {len(names)} candidate exits, setup {time.perf_counter() - t_setup:.0f} s")
    train_agree = (data["train"][0].agree().float().mean(1)).tolist()
    val_agree = (val.agree().float().mean(1)).tolist()
    test = tables["test"]
    oracle = {s: oracle_saving(data[s][0].agree().numpy(), costs) for s in ("val", "test")}
    y_test = test.labels.numpy()
    backbone_acc = float((test.bpred == y_test).mean())

    pools = {"val": _pool(tables_of["val"]["val"], tables_of["val"]["test"])}
    pools["fit"] = pools["val"] if fit_split == "val" else _pool(tables["val"], tables["test"])
    n_val = tables["val"].n
    rng = np.random.default_rng(12345)
    splits = [rng.permutation(pools["fit"].n) for _ in range(resplits)]

    rows, fitted_all = [], {}
    for tol in TOLERANCES:
        for label, policy, risk, opts in VARIANTS:
            if only and label not in only:
                continue
            tabs = tables_of["val" if policy == "paper003" else "fit"]
            t0 = time.perf_counter()
            ctx = PolicyContext(tabs["train"], tabs["val"], costs, tol, 0.1, risk)
            fp = make_policy(policy, **opts).fit(ctx)
            fit_s = time.perf_counter() - t0
            m = fp.evaluate(tabs["test"], costs)
            fitted_all[(tol, label)] = fp
            rs = resplit_violations(fp, policy, pools["val" if policy == "paper003" else "fit"], splits, n_val,
                                    costs, tol)
            g = fp.guarantee
            hind = hindsight(fp, tabs["test"], costs, tol) if policy != "paper003" else {}
            row = {
                "model": f"resnet{depth}", "T %": tol, "policy": label, "exits": len(fp.chain),
                **({"chosen": fp.policy} if "auto" in fp.info else {}),
                "saving %": 100 * m["saving"], "drop %": 100 * m["drop"], "disagree %": 100 * m["disagreement"],
                "oracle share": m["saving"] / oracle["test"] if oracle["test"] else None,
                **rs,
                "guaranteed": g is not None and g.certified,
                **hind,
                "earlyon": None,
                "fit s": fit_s,
            }
            rows.append(row)
            log(f"  T={tol} {label:12s} exits={len(fp.chain):2d} saving={100 * m['saving']:5.1f}% "
                f"drop={100 * m['drop']:5.2f}% dis={100 * m['disagreement']:5.2f}% "
                f"viol={rs['viol(drop)'] * resplits:.0f}/{resplits} ({fit_s:.0f} s)"
                + (f" hindsight {hind['hindsight family %']:.1f}/{hind['hindsight signal %']:.1f}%" if hind else ""))

    cascade_rows = []
    if cascade:
        for tol in TOLERANCES:
            base_fp = fitted_all[(tol, "gate")]
            chain_names = base_fp.names
            if not chain_names:
                continue
            tsplit = "val" if val_temperatures else temperature_split(cfg, guaranteed=False, cascade=True)  # as enable
            chained = train_cascade_heads(rec, heads, chain_names, cfg.train, num_prev=1, temperature_split=tsplit)
            cpreds = predictions_for_splits(rec, chained, ("train", "val", "test"), tsplit)
            ctemps = calibrate_temperatures(cpreds[tsplit])
            ctab = {s: ExitTable.from_predictions(p, ctemps, [data[s][1][names.index(n)] for n in chain_names])
                    for s, p in cpreds.items()}
            ccosts = flops_costs(chained, chain_names, costs.base)
            ctx = PolicyContext(ctab["train"], ctab["val"], ccosts, tol, 0.1, "disagreement", fixed_chain=True)
            fp = make_policy("gate").fit(ctx)
            m = fp.evaluate(ctab["test"], ccosts)
            cpool = _pool(ctab["val"], ctab["test"])
            viol = resplit_violations(fp, "gate", cpool, splits, n_val, ccosts, tol)["viol(drop)"]
            same_chain = base_fp.evaluate(test, costs)
            cascade_rows.append({"model": f"resnet{depth}", "T %": tol, "policy": "gate+cascade",
                                 "exits": len(fp.chain), "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                                 "disagree %": 100 * m["disagreement"],
                                 "oracle share": m["saving"] / oracle["test"],
                                 "viol(drop)": viol,
                                 "gate saving % (same chain, plain heads)": 100 * same_chain["saving"]})
            log(f"  T={tol} gate+cascade saving={100 * m['saving']:5.1f}% drop={100 * m['drop']:5.2f}% "
                f"viol={viol * resplits:.0f}/{resplits}")

    return {
        "depth": depth, "candidates": names, "n": {s: tables[s].n for s in tables},
        "oracle_saving": oracle, "backbone_test_accuracy": backbone_acc,
        "agreement": {"train (out-of-fold)" if cross_fit else "train": train_agree, "val": val_agree},
        "cross_fit": cross_fit,
        "rows": rows, "cascade_rows": cascade_rows, "latency": None,
        "kept": {f"{t}/{lbl}": fp.names for (t, lbl), fp in fitted_all.items()},
        "guarantees": {f"{t}/{lbl}": fp.statement() for (t, lbl), fp in fitted_all.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--resplits", type=int, default=100)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-cascade", action="store_true")
    ap.add_argument("--teacher", choices=["recorded", "mixup"], default="recorded",
                    help="how the default heads are trained: on the recorded activations (default) or by function "
                         "matching (TrainConfig(teacher='mixup')); results go to policies_mixup.json unless --out")
    ap.add_argument("--mixup-epochs", type=int, default=120, help="epochs of --teacher mixup (default 120)")
    ap.add_argument("--temperatures", choices=["enable", "val"], default="enable",
                    help="where the guaranteed policies' temperatures are fitted: as autoexit.enable does (train, "
                         "default) or on val (an ablation outside the guarantee's proof; no latency; results go to "
                         "policies_valtemps.json unless --out)")
    ap.add_argument("--cross-fit", type=int, default=0, metavar="K",
                    help="fit the guaranteed policies and their temperatures on out-of-fold predictions of the train "
                         "split (K folds), as EnableConfig(cross_fit=K) does; no cascade rows; results go to "
                         "policies_crossfit.json unless --out")
    ap.add_argument("--head", choices=["default", "cheap"], default="default",
                    help="the heads' design, a preset of autoexit.heads.HEAD_PRESETS: the core's default (paper "
                         "003's) or cheap (SDN's 2x2 average pool + FC, EnableConfig(head='cheap')), trained as the "
                         "default heads are; results go to policies_cheap*.json unless --out")
    ap.add_argument("--out", default=None, help="results file name under bench/results (default policies, or "
                                                 "policies_mixup with --teacher mixup)")
    ap.add_argument("--merge", action="store_true", help="keep other depths' results already in the output file")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure only the latency of the depths' entries already in the output file")
    ap.add_argument("--only", nargs="+", metavar="POLICY", choices=[v[0] for v in VARIANTS], default=None,
                    help="run only these rows (labels as in the tables) and put them in place of the same rows of "
                         "the depths already in the output file, which keeps everything else (no cascade, no "
                         "latency); each such row records its own run. A depth (or file) not recorded yet is "
                         "written with just these rows")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = ("policies" if args.teacher == "recorded" else "policies_mixup") + (
            "_valtemps" if args.temperatures == "val" else "") + ("_cheap" if args.head == "cheap" else "") + (
            "_crossfit" if args.cross_fit else "")
    if args.cross_fit == 1 or args.cross_fit < 0:
        raise SystemExit(f"--cross-fit must be 0 (off) or a number of folds >= 2, got {args.cross_fit}")
    if args.cross_fit and (args.teacher != "recorded" or args.temperatures != "enable"):
        raise SystemExit("--cross-fit runs with the core's default heads and temperatures: drop --teacher and "
                         "--temperatures")
    if args.cross_fit:
        args.no_cascade = True  # the cascade rows retrain a chain in-sample; enable's cross_fit does not cover them
    legacy_temps = args.temperatures == "val" or args.teacher == "mixup"  # every temperature fitted on val
    if legacy_temps and args.latency_only:
        raise SystemExit("--latency-only runs enable's own assemble, which fits the guaranteed policies' temperatures "
                         "on train; the tables of this run fit them on val: re-measure without --teacher mixup / "
                         "--temperatures val")
    if legacy_temps:  # the same reason: the latency recorded with these tables is kept (with its date)
        args.no_latency = True
    if args.head != "default" and args.teacher != "recorded":
        raise SystemExit("--teacher mixup was measured with the default heads: drop --head")
    heads_of = {"teacher": args.teacher, "epochs": args.mixup_epochs, "cross_fit": args.cross_fit, "head": args.head}
    require_fixtures()
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from bench.common import RESULTS

    prior = RESULTS / f"{args.out}.json"
    if args.latency_only:
        if not prior.exists():
            raise SystemExit(f"--latency-only needs {prior}; run the benchmark once without it")
        blob = json.loads(prior.read_text())
        for r in blob["results"]:
            if r["depth"] in args.depths:
                r["latency"] = run_depth_latency(r["depth"], log, **heads_of)
        rows_env = blob.get("environment_of_rows", blob.get("environment"))
        write_results(args.out, {k: v for k, v in blob.items() if k != "environment"}
                      | {"environment_of_rows": rows_env, "latency_remeasured_s": time.perf_counter() - t0})
        return 0
    if args.only:
        return _run_only(args, prior, heads_of, legacy_temps, log, argv)
    kept = []
    if prior.exists() and args.merge:  # results of other depths from an earlier run
        kept = [r for r in json.loads(prior.read_text()).get("results", []) if r["depth"] not in args.depths]
    results, latency_env = [], None
    old_latency, old_latency_env = {}, None
    if prior.exists():  # read before the partial writes below replace the file
        old = json.loads(prior.read_text())
        old_latency = {r["depth"]: r.get("latency") for r in old.get("results", []) if r.get("latency")}
        old_latency_env = old.get("latency_environment") or old.get("environment")
    for d in args.depths:
        results.append(run_depth(d, args.resplits, not args.no_cascade, log, **heads_of,
                                 val_temperatures=legacy_temps))
        env = environment()  # each depth's own run: a later --merge run of another depth keeps it
        results[-1]["run"] = {"date": env["date"], "commit": env["commit"],
                              "argv": "python bench/policies.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        write_results(args.out, {"args": vars(args), "results": kept + results, "partial": True,
                                 "seconds": time.perf_counter() - t0})
    if not args.no_latency:  # latency last: the machine is shared and timings are noisy
        for r in results:
            r["latency"] = run_depth_latency(r["depth"], log, **heads_of)
    elif old_latency:  # --no-latency: keep the latency recorded earlier for these depths (and say when)
        for r in results:
            r["latency"] = old_latency.get(r["depth"])
        if any(r["latency"] for r in results):
            latency_env = old_latency_env
    results = kept + results
    cols = ["model", "T %", "policy", "exits", "saving %", "drop %", "disagree %", "oracle share", "viol(drop)",
            "viol(disagree)", "resplit saving %", "hindsight family %", "hindsight signal %", "guaranteed"]
    for r in results:
        print_table(r["rows"] + r["cascade_rows"], title=f"resnet{r['depth']}: oracle saving (test) "
                    f"{100 * r['oracle_saving']['test']:.1f} %, backbone accuracy {100 * r['backbone_test_accuracy']:.2f} %",
                    columns=cols)
        if r.get("latency"):
            for label, lat in r["latency"].items():
                print(f"resnet{r['depth']} {label}: CPU latency ratio vs backbone {lat['ratio']}, "
                      f"per-sample ms {lat['per_sample_ms']}")
    write_results(args.out, {"args": vars(args), "results": results, "seconds": time.perf_counter() - t0}
                  | ({"latency_environment": latency_env} if latency_env else {}))
    return 0


def put_rows(recorded: dict, new: dict, only, run: dict) -> None:
    """Put ``new``'s rows (a ``run_depth(..., only=only)`` result) in place of ``recorded``'s rows of the same
    policies, each stamped with ``run``; every other row stays. Rows stay ordered by tolerance, then as in
    VARIANTS; the exits kept and the guarantee statements of those policies are replaced too."""
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    for row in new["rows"]:
        row["run"] = run
    rows = [x for x in recorded["rows"] if x["policy"] not in only] + new["rows"]
    recorded["rows"] = sorted(rows, key=lambda x: (x["T %"], order.get(x["policy"], len(order))))
    for key in ("kept", "guarantees"):
        recorded[key] = {**recorded.get(key, {}), **new[key]}


def _run_only(args, prior: Path, heads_of: dict, legacy_temps: bool, log, argv) -> int:
    """``--only``: the named rows of each depth, put in place of the same rows of the recorded results."""
    blob = json.loads(prior.read_text()) if prior.exists() else {"args": vars(args), "results": []}
    by_depth = {r["depth"]: r for r in blob.get("results", [])}
    env = environment()
    run = {"date": env["date"], "commit": env["commit"],
           "argv": "python bench/policies.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for d in args.depths:
        new = run_depth(d, args.resplits, False, log, **heads_of, val_temperatures=legacy_temps,
                        only=tuple(args.only))
        if d in by_depth:
            put_rows(by_depth[d], new, args.only, run)
        else:  # a depth not recorded yet: it holds just these rows
            new["run"] = run
            blob.setdefault("results", []).append(new)
            by_depth[d] = new
    # the file's environment becomes this run's: keep where the other rows and the latency were measured
    lat_env = latency_environment(blob)
    rows_env = blob.get("environment_of_rows", blob.get("environment"))  # None for a file this run starts
    write_results(args.out, {k: v for k, v in blob.items() if k != "environment"}
                  | ({"environment_of_rows": rows_env} if rows_env else {})
                  | ({"latency_environment": lat_env} if lat_env else {}))
    return 0


def run_depth_latency(depth: int, log, teacher: str = "recorded", epochs: int = 120, cross_fit: int = 0,
                      head: str = "default") -> dict:
    from autoexit.pipeline import EnableConfig, assemble

    cfg, tb, points, rec, heads = setup(depth, teacher=teacher, epochs=epochs, head=head)
    data = split_data(rec, heads)
    if cross_fit:
        data = cross_fitted_data(depth, rec, heads, data, cross_fit, cfg.train, log)
    preds = {s: data[s][0] for s in data}
    stats = {s: data[s][1] for s in data}
    out = {}
    from autoexit.evaluator import LocalEvaluator, MeasureSettings
    from autoexit.policies import DEFAULT_POLICY

    ev = LocalEvaluator(settings=MeasureSettings(warmup=3, repeat=7, min_repeat_ms=20.0))
    variants = [(p, {"policy": p}) for p in dict.fromkeys((DEFAULT_POLICY, "gate", "paper003"))]
    # the same guaranteed policy choosing exits by milliseconds timed on this CPU (at the batch size it is
    # deployed at) instead of FLOPs
    variants += [(f"{DEFAULT_POLICY}, cost=latency (bs{b})", {"policy": DEFAULT_POLICY, "cost": "latency",
                                                              "cost_batch_size": b}) for b in (1, 32)]
    for label, over in variants:
        ecfg = EnableConfig(granularity=2, tolerance=1.0, **over, head=cfg.head,
                            **({"cross_fit": cross_fit} if cross_fit and over["policy"] != "paper003" else {}))
        t1 = time.perf_counter()
        res = assemble(ecfg, tb, points, rec, heads, predictions=preds, stats=stats, evaluator=ev)
        fit_s = time.perf_counter() - t1
        res.measure_latency(batch_sizes=(1, 32), rounds=7)
        pol = res.extra["policy"]
        out[label] = {"kept": res.kept, "test_saving": res.metrics["test"]["saving"],
                      "test_drop": res.metrics["test"]["accuracy_drop"], "cost": ecfg.cost,
                      "cost_batch_size": ecfg.cost_batch_size, "fit_s": fit_s, **res.latency}
        if ecfg.cost == "latency":  # what the policy expected (val, calibrated profile) beside what was measured
            out[label]["predicted_ratio_val"] = pol["cal_ms"] / pol["costs"]["base"]
            out[label]["cost_source"] = pol["cost_source"]
            out[label]["cost_calibration"] = pol.get("cost_calibration")  # anchors, rounds, consistent
        log(f"resnet{depth} latency {label}: ratio {res.latency['ratio']} "
            f"(saving {100 * res.metrics['test']['saving']:.1f} %, exits {res.kept})")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
