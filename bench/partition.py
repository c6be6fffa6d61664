"""Partitioned early exit on the CIFAR-10 ResNets (issue 6's benchmark; paper 004 sections 3.2 and 3.3).

For ResNet-20 and ResNet-56 (pre-trained, ../shared/fixtures) on the CIFAR-10
JPEG test set, exits after every residual block (granularity 2), default heads
trained label-free (cached; shared with the other benchmarks):

1. **Profile** (``autoexit.partition.profile_result``): per-block / per-head p99
   latency on this machine (LocalEvaluator, 1 thread), output sizes, exit rates
   and accuracies on the val split, both criteria, 20 thresholds. Cached JSON.
2. **Speed** of the vectorised model on these real profiles, over the shipped
   topologies (``bench/perfmodel_speed.py`` measures the synthetic 5.84 M space;
   this adds the real ones, with its timer).
3. **Estimation error** (paper 004 section 3.2): for 12 random partitionings, the
   model's accuracy and exit rates (profile on val) vs the actual partitioned
   model on the test split, averaged over the 20 thresholds of both criteria; for
   one (criterion, T) per partitioning the actual model is the real TorchScript
   partitions run on the test images. Also with a test-split profile (the model's
   own error, without the val->test shift).
4. **The four findings** of section 3.3 with the shipped topologies: trimming is
   sometimes optimal; several partitions beat one; a non-consecutive placement is
   optimal for some latency budget; the destination changes the optimal placement.
   Each is searched over a grid of accuracy targets (P_lat) or latency budgets
   (P_acc) by comparing the full space with the space without that feature.
5. **A real run**: the 3-partition P_lat answer on the IIoT topology emitted as
   an artifact and run across three processes on loopback, links shaped in real
   time; every result compared with model.pt, latency with the model's.

Usage: python bench/partition.py [--depths 20 56] [--count 12] [--run-samples 100]
Writes bench/results/partition.json. Timings are reported with the machine's load, never asserted.
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

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = {name: REPO / "experiments" / "topologies" / f"{name}.yaml" for name in ("mobile", "iiot")}


def _front(space, idx):
    """Pareto front (indices into ``space``) of the configurations ``idx``, by increasing latency."""
    from autoexit.perfmodel import pareto_front

    f = pareto_front(space.latency_s[idx], space.accuracy[idx])
    return idx[f]


def _best_within(space, front, budgets):
    """P_acc over a front for each latency budget: index of the chosen config (or -1)."""
    lat = space.latency_s[front]
    pos = np.searchsorted(lat, budgets, side="right") - 1
    return np.where(pos >= 0, front[np.maximum(pos, 0)], -1)


def _fastest_reaching(space, front, targets):
    """P_lat over a front for each accuracy target: index of the chosen config (or -1)."""
    acc = np.maximum.accumulate(space.accuracy[front])
    pos = np.searchsorted(acc, targets, side="left")
    return np.where(pos < len(front), front[np.minimum(pos, len(front) - 1)], -1)


def _cfg(space, i) -> dict:
    c = space.configuration(int(i))
    return {"configuration": c.describe(space.topology), "partitions": list(c.partitions),
            "placement": [space.topology.names[a - 1] for a in c.placement], "criterion": c.criterion,
            "threshold": c.threshold, "accuracy": float(space.accuracy[i]),
            "latency_ms": 1000 * float(space.latency_s[i])}


def _compare(space, full_idx, sub_idx, feature, kind: str, grid) -> dict:
    """Where the full space's answer has ``feature`` and strictly beats the best answer without it.

    Checked on a grid of budgets (``p_acc``: latency) or targets (``p_lat``: accuracy) and exactly at every
    breakpoint of the full space's Pareto front (where each front point becomes the answer).
    """
    f_full, f_sub = _front(space, full_idx), _front(space, sub_idx)
    exact = space.latency_s[f_full] if kind == "p_acc" else space.accuracy[f_full]

    def check(points):
        if kind == "p_acc":
            a, b = _best_within(space, f_full, points), _best_within(space, f_sub, points)
            val = space.accuracy
            gain = np.where(b >= 0, val[np.maximum(a, 0)] - val[np.maximum(b, 0)], np.inf)
        else:
            a, b = _fastest_reaching(space, f_full, points), _fastest_reaching(space, f_sub, points)
            val = space.latency_s
            gain = np.where(b >= 0, val[np.maximum(b, 0)] - val[np.maximum(a, 0)], np.inf)
        hold = (a >= 0) & (gain > 1e-12) & feature[np.maximum(a, 0)]
        return a, b, gain, hold

    _, _, _, hold_grid = check(grid)
    a, b, gain, hold = check(exact)
    scale = 1000 if kind == "p_acc" else 1
    out = {"grid_points": int(len(grid)), "holds_at": int(hold_grid.sum()), "front_points": int(len(exact)),
           "holds_at_front_points": int(hold.sum())}
    if hold.any():
        finite = np.where(hold & np.isfinite(gain), gain, -1)
        j = int(np.argmax(finite)) if (finite > 0).any() else int(np.flatnonzero(hold)[0])
        unit = "latency_budget_ms" if kind == "p_acc" else "min_accuracy"
        out.update({unit: float(exact[j]) * scale, "optimal": _cfg(space, a[j]),
                    "without": _cfg(space, b[j]) if b[j] >= 0 else None,
                    "gain": float(gain[j]) * (1 if kind == "p_acc" else 1000),
                    "gain_unit": "accuracy (fraction)" if kind == "p_acc" else "ms saved",
                    "range": [float(exact[hold].min()) * scale, float(exact[hold].max()) * scale]})
    return out


def findings(profile, topo_path, max_partitions: int | None) -> dict:
    from autoexit.perfmodel import Topology, enumerate_space

    topo = Topology.from_yaml(topo_path)
    space = enumerate_space(profile, topo, max_partitions=max_partitions)
    allidx = np.arange(len(space))
    lat_grid = np.geomspace(space.latency_s.min(), np.quantile(space.latency_s, 0.5), 400)
    acc_grid = np.linspace(np.quantile(space.accuracy, 0.5), space.accuracy.max(), 400)
    L = space.n_partitions()
    trimmed = space.is_trimmed()
    nonconsec = ~space.is_consecutive()
    out = {"topology": topo.name, "configurations": len(space)}
    # 1. trimming: P_lat answers that are trimmed and faster than every full-depth model
    out["trimming"] = _compare(space, allidx, np.flatnonzero(~trimmed), trimmed, "p_lat", acc_grid)
    # 2. several partitions beat one (and two): P_acc answers with more partitions, more accurate
    out["several_partitions_vs_one"] = _compare(space, allidx, np.flatnonzero(L == 1), L >= 2, "p_acc", lat_grid)
    out["several_partitions_vs_two"] = _compare(space, allidx, np.flatnonzero(L <= 2), L >= 3, "p_acc", lat_grid)
    # 3. non-consecutive placement: P_acc answers placing a later partition on an earlier tier, strictly better
    out["non_consecutive"] = _compare(space, allidx, np.flatnonzero(~nonconsec), nonconsec, "p_acc", lat_grid)
    out["non_consecutive_p_lat"] = _compare(space, allidx, np.flatnonzero(~nonconsec), nonconsec, "p_lat", acc_grid)
    # ... and with the result consumed in the last tier (the cloud)
    cloud = topo.with_destination(topo.n_tiers)
    sc = enumerate_space(profile, cloud, max_partitions=max_partitions)
    ncc = ~sc.is_consecutive()
    out["non_consecutive_dest_cloud"] = _compare(sc, allidx, np.flatnonzero(~ncc), ncc, "p_acc", lat_grid)
    # 4. the destination: P_lat with the result consumed at the source vs in the last tier
    far = topo.with_destination(topo.n_tiers)
    near = topo.with_destination(topo.source)
    s_near = enumerate_space(profile, near, max_partitions=max_partitions)
    s_far = enumerate_space(profile, far, max_partitions=max_partitions)
    fn, ff = _front(s_near, allidx), _front(s_far, allidx)
    a, b = _fastest_reaching(s_near, fn, acc_grid), _fastest_reaching(s_far, ff, acc_grid)
    diff, same_p = [], []
    for j, (i, k) in enumerate(zip(a, b)):
        if i < 0 or k < 0:
            continue
        ci, ck = s_near.configuration(int(i)), s_far.configuration(int(k))
        if ci.placement != ck.placement:
            diff.append(j)
            if ci.partitions == ck.partitions:
                same_p.append(j)
    d = {"destinations": [near.names[near.destination - 1], far.names[far.destination - 1]],
         "grid_points": len(acc_grid), "placement_differs_at": len(diff), "same_partitioning_differs_at": len(same_p)}
    pick = same_p or diff
    if pick:
        j = pick[len(pick) // 2]
        d.update(min_accuracy=float(acc_grid[j]), near=_cfg(s_near, a[j]), far=_cfg(s_far, b[j]))
    out["destination"] = d
    return out


def scaled_profile(profile, scale: float):
    """``profile`` with every block and head time multiplied by ``scale`` (e.g. 0.1: this CPU -> a GPU-class
    reference device, which the topologies' computation ratios are relative to)."""
    from dataclasses import replace

    return replace(profile, block_time_s=tuple(float(t) * scale for t in profile.block_time_s),
                   head_time_s=tuple(float(t) * scale for t in profile.head_time_s))


def paper_cases(profile, max_partitions) -> dict:
    """The paper's own questions, scaled to this backbone: case I (P_lat 3 points below the best, mobile),
    II (P_acc 300 ms, mobile), III (P_acc 80 ms, IIoT), IV (P_lat at 80 % of the best accuracy, IIoT, two
    destinations)."""
    from autoexit.errors import AutoExitError
    from autoexit.perfmodel import Topology, enumerate_space

    out = {}
    mobile = Topology.from_yaml(TOPOLOGIES["mobile"])
    iiot = Topology.from_yaml(TOPOLOGIES["iiot"])
    sm = enumerate_space(profile, mobile, max_partitions=max_partitions)
    si = enumerate_space(profile, iiot, max_partitions=max_partitions)
    best = float(sm.accuracy.max())
    for name, fn in (("I_plat_mobile_best_minus_3pts", lambda: sm.solve_p_lat(best - 0.03)),
                     ("II_pacc_mobile_300ms", lambda: sm.solve_p_acc(0.300)),
                     ("III_pacc_iiot_80ms", lambda: si.solve_p_acc(0.080))):
        try:
            out[name] = _cfg(sm if "mobile" in name else si, fn().index)
        except AutoExitError as exc:
            out[name] = {"infeasible": str(exc)}
    for dest in (iiot.source, iiot.n_tiers):
        t = iiot.with_destination(dest)
        s = enumerate_space(profile, t, max_partitions=max_partitions)
        try:
            out[f"IV_plat_iiot_dest_{t.names[dest - 1]}"] = _cfg(s, s.solve_p_lat(0.8 * best).index)
        except AutoExitError as exc:
            out[f"IV_plat_iiot_dest_{t.names[dest - 1]}"] = {"infeasible": str(exc)}
    return out


def speed(profile, max_partitions) -> list[dict]:
    from autoexit.perfmodel import Topology, enumerate_space, estimate_batch
    from bench.perfmodel_speed import timed

    rows = []
    for name, path in TOPOLOGIES.items():
        topo = Topology.from_yaml(path)
        t_enum, space = timed(lambda topo=topo: enumerate_space(profile, topo, max_partitions=max_partitions), 3)
        crit = space.criterion.astype(np.int64)
        t_batch, _ = timed(lambda space=space, topo=topo, crit=crit: estimate_batch(
            profile, topo, crit, space.threshold_index, space.partitions, space.placement), 3)
        t_front, front = timed(space.pareto_front, 3)
        rows.append({"topology": name, "configs": len(space), "enumerate_s": t_enum,
                     "enumerate_configs_per_s": len(space) / t_enum, "estimate_batch_configs_per_s": len(space) / t_batch,
                     "pareto_s": t_front, "pareto_points": int(len(front))})
    return rows


def real_run(comp, profile, n_samples: int, shaping: float, out_dir: Path) -> dict:
    import torch

    from autoexit.artifact import load
    from autoexit.partition import choose_plan, emit_partitioned
    from autoexit.partition_runtime import run_partitioned
    from autoexit.perfmodel import Link, Tier, Topology, estimate_plan_rates

    topo = Topology.from_yaml(TOPOLOGIES["iiot"])
    best = float(max(profile.head_accuracy))
    plan, sol = choose_plan(profile, topo, min_accuracy=best - 0.05, n_partitions=3)
    art = emit_partitioned(comp, plan, out_dir, profile=profile, overwrite=True, progress=True)
    x = comp.recording.inputs("test")[:n_samples]
    y = comp.recording.labels("test")[:n_samples]
    t0 = time.perf_counter()
    run = run_partitioned(art, x, batch_size=1, shaping=shaping, progress=True)
    total = time.perf_counter() - t0
    a = load(art)
    with torch.no_grad():
        ref = [a.model(x[i:i + 1]) for i in range(len(x))]
    ref_exit = torch.cat([r[1] for r in ref])
    ref_cls = torch.cat([r[0] for r in ref]).argmax(1)
    same = int(((ref_exit == run.exit_index) & (ref_cls == run.logits.argmax(1))).sum())
    local = Topology(tuple(Tier(t.name, ratio=1.0) for t in topo.tiers),
                     tuple(Link(ln.bandwidth_bps / shaping, ln.latency_s * shaping) for ln in topo.links),
                     destination=topo.destination, source=topo.source)
    info = a.manifest["partitioning"]
    emul = estimate_plan_rates(profile, local, partitions=plan.partitions, exits=plan.exits, placement=plan.placement,
                               exit_rates=run.exit_rates(plan.n_exits))
    return {"plan": plan.describe(), "configuration": sol.configuration.describe(topo), "samples": run.n,
            "same_as_model_pt": same, "accuracy": float((run.logits.argmax(1) == y).float().mean()),
            "partition_rates_measured": run.partition_rates(plan.n_partitions),
            "partition_rates_estimated": info["estimated"]["partition_rates"],
            "shaping": shaping, "latency_ms_mean": 1000 * float(run.latency_s.mean()),
            "latency_ms_p99": 1000 * float(np.percentile(run.latency_s, 99)),
            "expected_latency_ms_this_machine": 1000 * emul.latency_s,
            "estimated_latency_ms_iiot": 1000 * info["estimated"]["latency_s"],
            "wall_s_including_process_start": total}


def run(depths, count: int, run_samples: int, shaping: float, reference_scale: float = 0.1) -> dict:
    import torch

    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.partition import Components, profile_result, validate_estimates
    from autoexit.pipeline import EnableConfig, prepare
    from autoexit.search.pipeline import train_heads_cached

    torch.set_num_threads(2)
    data = cifar10_data()
    out: dict = {"load_before": os.getloadavg()}
    for depth in depths:
        name = f"resnet{depth}"
        t0 = time.perf_counter()
        model = cifar_resnet(depth)
        tb, points, rec = prepare(model, data, EnableConfig(granularity=2), progress=True)
        heads = train_heads_cached(rec, {}, TrainConfig(), cache_dir=default_cache_dir() / "heads", progress=True)
        comp = Components(tb, rec, heads)
        prof = profile_result(comp, progress=True)
        prof_test = profile_result(comp, split="test", progress=False)
        setup_s = time.perf_counter() - t0
        maxp = None if prof.n_blocks <= 12 else 3  # ResNet-56 (27 blocks): up to 3 partitions (2.9 M configs)
        print(f"{name}: {prof.n_blocks} blocks, setup {setup_s:.0f} s; findings...", flush=True)
        d: dict = {"blocks": list(prof.block_names), "setup_s": setup_s, "max_partitions": maxp,
                   "profile": {"block_time_ms": [1000 * t for t in prof.block_time_s],
                               "head_time_ms": [1000 * t for t in prof.head_time_s],
                               "output_kbit": [b / 1000 for b in prof.output_bits],
                               "head_accuracy": list(prof.head_accuracy), "device": prof.meta.get("device")}}
        d["findings"] = {t: findings(prof, p, maxp) for t, p in TOPOLOGIES.items()}
        # the topologies' ratios are relative to the paper's reference GPU; this CPU is ~10x slower per block,
        # so compute weighs ~10x more against the links than in the paper: the findings again at GPU scale
        ref = scaled_profile(prof, reference_scale)
        d["reference_scale"] = reference_scale
        d["findings_reference_scaled"] = {t: findings(ref, p, maxp) for t, p in TOPOLOGIES.items()}
        d["paper_cases"] = paper_cases(prof, maxp)
        d["speed"] = speed(prof, maxp)
        print(f"{name}: validation on {count} random partitionings...", flush=True)
        t1 = time.perf_counter()
        val = validate_estimates(comp, prof, count=count, seed=depth, progress=True)
        d["validation"] = {"summary": val["summary"], "real": val["real"], "seconds": time.perf_counter() - t1}
        own = validate_estimates(comp, prof_test, count=count, seed=depth, run_models=False, progress=False)
        d["validation_test_profile"] = own["summary"]
        if run_samples and depth == min(depths):
            print(f"{name}: a 3-partition artifact across 3 processes...", flush=True)
            d["real_run"] = real_run(comp, prof, run_samples, shaping, REPO / "runs" / "bench-partition" / name)
        out[name] = d
    out["load_after"] = os.getloadavg()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--count", type=int, default=12, help="random partitionings for the validation")
    ap.add_argument("--run-samples", type=int, default=100, help="test samples through the 3 processes (0: skip)")
    ap.add_argument("--shaping", type=float, default=1.0, help="link shaping of the real run (1 = real time)")
    ap.add_argument("--reference-scale", type=float, default=0.1,
                    help="compute-time factor from this machine to the topologies' reference device for the "
                         "second findings pass (paper 004 profiles on an RTX 3080; default 0.1)")
    args = ap.parse_args(argv)
    require_fixtures()
    res = run(args.depths, args.count, args.run_samples, args.shaping, args.reference_scale)
    rows, frows, vrows = [], [], []
    for depth in args.depths:
        d = res[f"resnet{depth}"]
        for scale_label, fkey in (("this CPU", "findings"),
                                  (f"x{args.reference_scale:g}", "findings_reference_scaled")):
            for t, f in d[fkey].items():
                def h(key, f=f):
                    x = f[key]
                    return f"{x['holds_at_front_points']}/{x['front_points']} ({x['holds_at']}/{x['grid_points']})"

                frows.append({"model": f"resnet{depth}", "compute": scale_label, "topology": t,
                              "configs": f["configurations"],
                              "trimming optimal (P_lat)": h("trimming"),
                              ">1 partition beats 1 (P_acc)": h("several_partitions_vs_one"),
                              "3+ beat <=2 (P_acc)": h("several_partitions_vs_two"),
                              "non-consecutive optimal (P_acc)": h("non_consecutive"),
                              "... P_lat": h("non_consecutive_p_lat"),
                              "... destination cloud": h("non_consecutive_dest_cloud"),
                              "destination changes placement": f"{f['destination']['placement_differs_at']}/"
                                                               f"{f['destination']['grid_points']}",
                              "... same P": f["destination"]["same_partitioning_differs_at"]})
        v = d["validation"]["summary"]
        o = d["validation_test_profile"]
        vrows.append({"model": f"resnet{depth}", "partitionings": v["n_partitionings"],
                      "acc err (val profile) pts": 100 * v["mean_accuracy_error"],
                      "exit-rate err (val profile) pts": 100 * v["mean_exit_rate_error"],
                      "acc err (test profile) pts": 100 * o["mean_accuracy_error"],
                      "exit-rate err (test profile) pts": 100 * o["mean_exit_rate_error"],
                      "real runs": v.get("real_runs"), "real acc err pts": 100 * v.get("real_mean_accuracy_error", 0),
                      "real vs sim max rate diff": v.get("real_vs_sim_max_rate_diff")})
        for s in d["speed"]:
            rows.append({"model": f"resnet{depth}", **s})
    print_table(frows, "Paper 004 findings: front breakpoints (grid points) where each holds strictly")
    print_table(vrows, "Estimation error vs the actual partitioned model (test split), mean absolute")
    print_table(rows, "Vectorised performance model on the real profiles")
    if "real_run" in res.get(f"resnet{min(args.depths)}", {}):
        print_table([res[f"resnet{min(args.depths)}"]["real_run"]], "Three processes on loopback")
    res["command"] = "python bench/partition.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results("partition", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
