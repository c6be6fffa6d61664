"""Per-segment latency prediction vs end-to-end measurement (issue 5's benchmark).

The outer search never times a configuration: it predicts a configuration's latency
from a **segment profile** (each backbone stage and each exit head timed once by the
device evaluator) and the configuration's **exit rates** (``autoexit.search.outer``:
``latency_costs`` + ``evaluate_plan``). This script checks that prediction against the
real thing on the fixtures:

1. ResNet-20 / ResNet-56 (``../shared/fixtures``), exits after every residual block,
   default heads trained label-free (cached, shared with ``bench/cifar10_resnet.py``);
2. the segment profile at batch 1 on the evaluator (``LocalEvaluator``: this CPU;
   ``--url``/``--token-file`` for a Raspberry Pi or Jetson running ``autoexit evaluator serve``);
3. ``--configs`` (default 24) outer-search configurations drawn at random from the outer
   space (``search_spaces/outer.yaml``: tolerance, split scheme, K(S) ranking or flags, k,
   signal) through ``plan_from_params``, exactly as search trials derive them;
4. for each: the predicted per-sample latency on ``--samples`` test images (segment
   profile x that configuration's exits on those images) and the measured one: the
   configuration's TorchScript multi-exit model timed end to end on the same images at
   batch 1 (``measure_end_to_end``: real early exits).

Two predictions are compared with the measurement: "segments only" (the sum of the timed
segments a sample passes) and the calibrated profile (``latency_costs(calibrate=True)``): every
segment minus the measured cost of one call (an empty segment timed the same way), scaled so the
stages add up to the no-exit model's end-to-end time, plus one call per sample, a per-exit-decision
cost and a fixed cost of going on past an exit fitted on the model with every exit and the models with
the quarter, middle and three-quarter candidates alone at +inf (their median), and an early-answer cost
fitted on the model whose first exit takes every input. Profile and anchors are timed in ``--rounds`` interleaved
rounds; the main columns use each timing's median.

The machine's speed drifts while the benchmark runs (a shared VM, thermal limits on a Pi),
and the profile is measured once at the start, as a search does. To tell drift from
prediction error, each configuration is timed in ``--rounds`` paired rounds: the configuration,
then the no-exit model, alternately (new measurement seeds, so nothing comes from the cache).
"drift" is the no-exit model's median time in those rounds over its time when the profile was
taken, and the "drift-corrected" error scales the prediction by it: the error of the prediction
itself, with the device's change of speed taken out. The headline is the uncorrected error.

Reported: predicted vs measured ms/sample per configuration, the relative error (raw and
drift-corrected), the share within +-10 % (nn-Meter's anchor: 99 % on a Cortex-A76), whether
the real model's exit counts equal the simulated ones, and the measurement noise
(coefficient of variation within a timing, and the spread of a configuration's median over its rounds).

``--min-stat`` adds the same comparison with each timing's fastest group standing for it, the
search's default (``exit_latency_costs(stat="min_ms")`` for the profile and its anchors, ``min_ms``
of the very same end-to-end timings for the measurement), side by side with the median: on a machine
whose slow spells only add time the minimum is the steadier statistic (``bench/evaluator_noise.py``).
That calibration combines its rounds by their minimum (``round_stat="min"``, the default with
``min_ms``); the columns "(min, median of rounds)" take the very same timings (cache hits) combined by
their median (``round_stat="median"``, what ``min_ms`` did before), so the two are compared on one
measurement.

Usage: ``python bench/evaluator_predict.py [--depths 20 56] [--configs 24] [--samples 128]
[--rounds 3] [--threads 1] [--repeat 5] [--min-stat]``. Results: ``bench/results/evaluator_predict.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cifar10_data, cifar_resnet, print_table, require_fixtures, write_results  # noqa: E402

SETTINGS = {"warmup": 2, "repeat": 5, "min_repeat_ms": 20.0, "threads": 1}


def _draw_params(rng: np.random.Generator, space, names: list[str]) -> dict:
    """One parameter set from the outer space, as a random-sampler trial would draw it."""
    lo, hi = space.tolerance
    p: dict = {"tolerance": float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
               "scheme": str(rng.choice([s for s in space.schemes if s != "weights"])),
               "selection": str(rng.choice(space.selection)),
               "signal": str(rng.choice(space.signals))}
    if p["selection"] == "ranking":
        p["k"] = int(rng.integers(1, min(space.exits[1], len(names)) + 1))
    else:
        for n in names:
            p[f"include:{n}"] = bool(rng.random() < 0.35)
    return p


def run(depth: int, n_configs: int, n_samples: int, evaluator, seed: int, rounds: int = 3,
        with_min: bool = False) -> dict:
    from dataclasses import replace

    import torch

    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.evaluator import MeasureSettings
    from autoexit.model import scripted_backbone, to_torchscript
    from autoexit.pipeline import EnableConfig, assemble, prepare
    from autoexit.search.outer import (
        OuterSettings,
        Recorded,
        latency_costs,
        load_space,
        plan_from_params,
        plan_outcome,
        subset_result,
    )
    from autoexit.search.pipeline import train_heads_cached

    torch.set_num_threads(SETTINGS["threads"])
    settings = MeasureSettings(**SETTINGS)
    model = cifar_resnet(depth).eval()
    tb, points, rec = prepare(model, cifar10_data(), EnableConfig(granularity=2), progress=True)
    heads = train_heads_cached(rec, {}, TrainConfig(), cache_dir=default_cache_dir() / "heads", progress=True)
    base = assemble(EnableConfig(granularity=2, policy="paper003"), tb, points, rec, heads)
    t_start = t0 = time.perf_counter()
    raw = latency_costs(base, evaluator, batch_size=1, settings=settings, calibrate=False, stat="median_ms")
    lat = latency_costs(base, evaluator, batch_size=1, settings=settings, rounds=rounds,  # + the calibration
                        stat="median_ms")
    # the same calibrated profile with each timing's fastest group standing for it (--min-stat), side by side
    lat_min = latency_costs(base, evaluator, batch_size=1, settings=replace(settings, seed=settings.seed + 77),
                            rounds=rounds, stat="min_ms") if with_min else None
    # and the very same timings (cache hits) with the rounds combined by their median, as before round_stat
    lat_min_med = latency_costs(base, evaluator, batch_size=1, settings=replace(settings, seed=settings.seed + 77),
                                rounds=rounds, stat="min_ms", round_stat="median") if with_min else None
    min_calibrations = {"min": lat_min, "min, median of rounds": lat_min_med} if with_min else {}
    profile_s = time.perf_counter() - t0
    print(f"profile: {lat.source}; base {lat.base:.3f} ms (segments only {raw.base:.3f} ms)", flush=True)
    ref_model = scripted_backbone(tb)
    ref_x = rec.inputs("val")[: lat.calibration["samples"]]
    ref0 = lat.calibration["no_exit_ms"]
    ref0_min = lat_min.calibration["no_exit_ms"] if lat_min is not None else None
    recorded = Recorded.from_result(base).with_latency(lat)
    names = recorded.names
    space = load_space("outer")
    rng = np.random.default_rng(seed)
    x = rec.inputs("test")[:n_samples]
    rows, seen = [], set()
    tries = 0
    while len(rows) < n_configs and tries < 20 * n_configs:
        tries += 1
        params = _draw_params(rng, space, names)
        plan = plan_from_params(recorded, params, OuterSettings(), space)
        key = (plan.kept, plan.signal, tuple(round(t, 9) for t in plan.thresholds))
        if key in seen:
            continue
        seen.add(key)
        idx = [names.index(n) for n in plan.kept]
        sim = plan_outcome(recorded, plan, lat, n_samples)
        predicted = float(sim.flops.mean())
        predicted_raw = float(plan_outcome(recorded, plan, raw, n_samples).flops.mean())
        cfg = EnableConfig(granularity=2, policy="paper003", signal=plan.signal, tolerance=plan.tolerance)
        res = assemble(cfg, tb, points, rec, heads, subset=subset_result(recorded, plan))
        scripted = to_torchscript(res.model, tb.example_input)
        # paired rounds: the configuration and the no-exit model alternate (new seeds: nothing cached), so the
        # device's drift shows in the no-exit model's time at the moment the configuration is timed
        ms, ref_stats = [], []
        for r in range(rounds):
            seed = 1000 + 10 * len(rows) + r
            ms.append(evaluator.measure_end_to_end(scripted, x, batch_sizes=(1,),
                                                   settings=replace(settings, seed=seed)).at(1))
            ref_stats.append(evaluator.measure_end_to_end(ref_model, ref_x, batch_sizes=(1,),
                                                          settings=replace(settings, seed=seed)).at(1))
        refs = [float(r.median_ms) for r in ref_stats]
        m = ms[0]
        counts = np.zeros(len(idx) + 1)
        for k, v in (m.exit_counts or {}).items():
            counts[int(k)] = v
        sim_counts = np.bincount(sim.exit_index, minlength=len(idx) + 1)
        medians = [float(r.median_ms) for r in ms]
        measured = float(np.median(medians))
        drift = float(np.median(refs)) / ref0
        rows.append({
            "model": f"resnet{depth}", "config": plan.describe()[:70], "exits": len(idx),
            "early exit %": 100.0 * float(counts[:-1].sum() / max(counts.sum(), 1)),
            "segments only ms": predicted_raw, "predicted ms": predicted, "measured ms": measured,
            "segments only error %": 100.0 * (predicted_raw - measured) / measured,
            "error %": 100.0 * (predicted - measured) / measured,
            "drift": drift, "drift-corrected error %": 100.0 * (predicted * drift - measured) / measured,
            "cv %": float(np.median([100.0 * r.std_ms / r.mean_ms for r in ms if r.mean_ms])),
            "rounds spread %": 100.0 * (max(medians) - min(medians)) / measured,
            "exit counts match": bool(np.array_equal(sim_counts, counts)),
        })
        if lat_min is not None:  # the same timings, each standing for its fastest group
            m_min = float(np.median([float(r.min_ms) for r in ms]))
            d_min = float(np.median([float(r.min_ms) for r in ref_stats])) / ref0_min
            rows[-1].update({"measured ms (min)": m_min, "drift (min)": d_min,
                             "rounds spread % (min)": 100.0 * (max(r.min_ms for r in ms) - min(r.min_ms for r in ms))
                             / m_min})
            for tag, costs in min_calibrations.items():  # rounds by their minimum, and by their median
                p = float(plan_outcome(recorded, plan, costs, n_samples).flops.mean())
                rows[-1].update({f"predicted ms ({tag})": p, f"error % ({tag})": 100.0 * (p - m_min) / m_min,
                                 f"drift-corrected error % ({tag})": 100.0 * (p * d_min - m_min) / m_min})
        print(f"  [{len(rows)}/{n_configs}] {rows[-1]['config']}: predicted {predicted:.3f} ms, "
              f"measured {measured:.3f} ms ({rows[-1]['error %']:+.1f} %; drift {drift:.3f}, corrected "
              f"{rows[-1]['drift-corrected error %']:+.1f} %)", flush=True)
    err = np.array([abs(r["error %"]) for r in rows])
    err_d = np.array([abs(r["drift-corrected error %"]) for r in rows])
    err_raw = np.array([abs(r["segments only error %"]) for r in rows])
    mins = {}
    if lat_min is not None and rows:
        mins = {"median rounds spread % (min)": float(np.median([r["rounds spread % (min)"] for r in rows]))}
        for tag, costs in min_calibrations.items():
            e = np.array([abs(r[f"error % ({tag})"]) for r in rows])
            e_d = np.array([abs(r[f"drift-corrected error % ({tag})"]) for r in rows])
            mins |= {f"within 10 % ({tag})": float((e <= 10).mean()),
                     f"within 10 % ({tag}, drift-corrected)": float((e_d <= 10).mean()),
                     f"median |error| % ({tag})": float(np.median(e)), f"max |error| % ({tag})": float(e.max()),
                     f"max |drift-corrected error| % ({tag})": float(e_d.max()),
                     f"mean signed error % ({tag})": float(np.mean([r[f"error % ({tag})"] for r in rows])),
                     f"calibration ({tag})": costs.source}
    return {
        "rows": rows,
        "summary": {"model": f"resnet{depth}", "configs": len(rows), "samples": int(len(x)),
                    "within 10 %": float((err <= 10).mean()) if len(err) else None,
                    "within 10 % (segments only)": float((err_raw <= 10).mean()) if len(err) else None,
                    "within 10 % (drift-corrected)": float((err_d <= 10).mean()) if len(err) else None,
                    "within 5 %": float((err <= 5).mean()) if len(err) else None,
                    "drift range": [float(min(r["drift"] for r in rows)), float(max(r["drift"] for r in rows))]
                    if rows else None,
                    "median |error| %": float(np.median(err)) if len(err) else None,
                    "max |error| %": float(err.max()) if len(err) else None,
                    "exit counts as simulated": f"{sum(r['exit counts match'] for r in rows)}/{len(rows)}",
                    "mean signed error %": float(np.mean([r["error %"] for r in rows])) if rows else None,
                    "median e2e cv %": float(np.median([r["cv %"] for r in rows if r["cv %"] is not None]))
                    if rows else None,
                    "median rounds spread %": float(np.median([r["rounds spread %"] for r in rows])) if rows else None,
                    "rounds": rounds,
                    "backbone ms (profile)": float(lat.base), "profile s": profile_s,
                    "seconds": time.perf_counter() - t_start, "calibration": lat.source,
                    "device": str(evaluator.device_key), **mins},
        "profile_ms": {"c1": lat.c1.tolist(), "before": lat.before.tolist(), "base": lat.base, "names": names,
                       "calibration": dict(lat.calibration or {})},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--configs", type=int, default=24)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="paired rounds per configuration (configuration, then the no-exit model), and interleaved "
                         "rounds of the profile and its anchors (latency_costs(rounds=...))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=SETTINGS["threads"],
                    help="intra-op threads of every timing (default 1: on 2 shared cores a second thread "
                         "competes with the machine's own work and the timings scatter)")
    ap.add_argument("--repeat", type=int, default=SETTINGS["repeat"],
                    help=f"groups per timing (default {SETTINGS['repeat']}); more groups give --min-stat more to "
                         "choose from")
    ap.add_argument("--min-stat", action="store_true",
                    help="also predict and measure with each timing's fastest group (stat='min_ms') beside the "
                         "median, from the same end-to-end timings (a second calibrated profile is taken)")
    ap.add_argument("--out", default="evaluator_predict", help="results name under bench/results (default "
                                                                 "evaluator_predict)")
    ap.add_argument("--url", help="a device running `autoexit evaluator serve` (default: this CPU)")
    ap.add_argument("--token-file")
    args = ap.parse_args(argv)
    SETTINGS["threads"] = args.threads
    SETTINGS["repeat"] = args.repeat
    require_fixtures()
    from autoexit.evaluator import LocalEvaluator, RemoteEvaluator

    ev = RemoteEvaluator(args.url, token_file=args.token_file) if args.url else LocalEvaluator()
    out = {"rows": [], "summary": [], "details": {}}
    load_before = os.getloadavg()
    for depth in args.depths:
        r = run(depth, args.configs, args.samples, ev, args.seed, args.rounds, args.min_stat)
        out["rows"] += r["rows"]
        out["summary"].append(r["summary"])
        out["details"][f"resnet{depth}"] = {"profile_ms": r["profile_ms"]}
    print_table(out["rows"], "predicted (segment profile x exit rates) vs measured end to end, batch 1",
                ["model", "config", "exits", "early exit %", "segments only ms", "predicted ms", "measured ms",
                 "segments only error %", "error %", "drift", "drift-corrected error %", "cv %",
                 "rounds spread %"])
    print_table(out["summary"], "summary", ["model", "configs", "samples", "within 10 %", "within 10 % (segments only)",
                                            "within 10 % (drift-corrected)", "within 5 %", "median |error| %",
                                            "mean signed error %", "exit counts as simulated", "median e2e cv %",
                                            "median rounds spread %", "within 10 % (min)",
                                            "within 10 % (min, drift-corrected)", "median |error| % (min)",
                                            "within 10 % (min, median of rounds)",
                                            "within 10 % (min, median of rounds, drift-corrected)",
                                            "median |error| % (min, median of rounds)", "max |error| % (min)",
                                            "max |error| % (min, median of rounds)",
                                            "median rounds spread % (min)", "seconds"])
    for sm in out["summary"]:
        print(f"{sm['model']}: {sm['calibration']}")
        for key in ("calibration (min)", "calibration (min, median of rounds)"):
            if key in sm:
                print(f"{sm['model']} {key}: {sm[key]}")
    write_results(args.out, {"command": "python bench/evaluator_predict.py " + " ".join(argv or sys.argv[1:]),
                                        "settings": SETTINGS, "loadavg_before": load_before,
                                        "loadavg_after": os.getloadavg(), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
