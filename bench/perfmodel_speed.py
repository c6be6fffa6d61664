"""Configurations per second of the performance model: vectorised vs the scalar reference.

Builds a synthetic profile (``--blocks`` blocks, both exit criteria, 20
thresholds each) on a shipped topology, enumerates the whole (T, P, A) space
and times, in this one process:

* ``enumerate_space``: building every configuration and evaluating it (vectorised);
* ``estimate_batch``: evaluating the already-built configurations (vectorised, validated input);
* ``estimate``: the loop-based scalar reference, on a random sample of the same configurations;
* the Pareto front and P_lat / P_acc over the whole space.

Prints a table and writes ``bench/results/perfmodel_speed.json``. Timings are
reported, never asserted. Run from the repository root::

    python bench/perfmodel_speed.py            # 20 blocks, mobile topology: 5.84 M configurations
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoexit.perfmodel import (  # noqa: E402
    Profile,
    Topology,
    enumerate_space,
    estimate,
    estimate_batch,
)


def synthetic_profile(n_blocks: int, seed: int = 0) -> Profile:
    """ResNet-like costs and an accuracy/confidence ramp over depth, from fake recorded predictions."""
    rng = np.random.default_rng(seed)
    n = 5000
    depth = np.linspace(0.1, 1.0, n_blocks)[:, None]
    conf = np.clip(rng.beta(2 + 8 * depth, 2.0, size=(n_blocks, n)), 0, 1)
    ent = np.clip(1 - conf + rng.normal(0, 0.05, size=(n_blocks, n)), 0, 1)
    correct = rng.random((n_blocks, n)) < (0.45 + 0.5 * depth)
    return Profile.from_predictions(
        correct=correct, confidence=conf, entropy=ent,
        block_time_s=rng.uniform(2e-4, 2e-3, size=(n_blocks, 200)),
        head_time_s=np.r_[rng.uniform(2e-5, 2e-4, n_blocks - 1), 0.0],
        output_bits=32 * np.geomspace(16 * 32 * 32, 64 * 8 * 8, n_blocks),
        input_bits=3 * 32 * 32 * 8,
        meta={"what": "synthetic bench profile"},
    )


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=20, help="blocks N of the synthetic backbone (default 20)")
    ap.add_argument("--topology", default=str(ROOT / "experiments/topologies/mobile.yaml"))
    ap.add_argument("--max-partitions", type=int, default=None, help="default: number of tiers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scalar-samples", type=int, default=20000)
    ap.add_argument("--out", default=str(ROOT / "bench/results/perfmodel_speed.json"))
    args = ap.parse_args(argv)

    profile = synthetic_profile(args.blocks)
    topo = Topology.from_yaml(args.topology)

    t_enum, space = timed(lambda: enumerate_space(profile, topo, max_partitions=args.max_partitions), args.repeats)
    n_cfg = len(space)
    crit = space.criterion.astype(np.int64)
    t_batch, est = timed(lambda: estimate_batch(profile, topo, crit, space.threshold_index, space.partitions,
                                                space.placement), args.repeats)

    rng = np.random.default_rng(1)
    sample = rng.choice(n_cfg, size=min(args.scalar_samples, n_cfg), replace=False)
    configs = [space.configuration(int(i)) for i in sample]
    t0 = time.perf_counter()
    scalar = [estimate(profile, topo, c) for c in configs]
    t_scalar = time.perf_counter() - t0
    max_rel = max(abs(s.latency_s - space.latency_s[i]) / s.latency_s for s, i in zip(scalar, sample))
    max_acc = max(abs(s.accuracy - space.accuracy[i]) for s, i in zip(scalar, sample))
    same = bool(np.array_equal(est.latency_s, space.latency_s) and max_rel < 1e-9 and max_acc < 1e-12)

    t_front, front = timed(space.pareto_front, args.repeats)
    eps_acc = float(np.quantile(space.accuracy, 0.9))
    eps_lat = float(np.quantile(space.latency_s, 0.1))
    t_plat, _ = timed(lambda: space.solve_p_lat(eps_acc), args.repeats)
    t_pacc, _ = timed(lambda: space.solve_p_acc(eps_lat), args.repeats)

    rows = [
        ("enumerate_space (build + evaluate)", n_cfg, t_enum),
        ("estimate_batch (evaluate built configs)", n_cfg, t_batch),
        ("estimate (scalar reference, sample)", len(configs), t_scalar),
    ]
    speedup = (n_cfg / t_batch) / (len(configs) / t_scalar)
    print(f"perfmodel speed: N={profile.n_blocks} blocks, topology {topo.name!r} ({topo.n_tiers} tiers), "
          f"criteria {list(profile.criteria)}, {len(profile.thresholds[profile.criteria[0]])} thresholds each, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'what':42s} {'configs':>12s} {'seconds':>9s} {'configs/s':>14s}")
    for name, n, t in rows:
        print(f"{name:42s} {n:12,d} {t:9.3f} {n / t:14,.0f}")
    print(f"vectorised / scalar speed-up: {speedup:,.0f}x; results agree: {same} "
          f"(max rel. latency diff {max_rel:.1e}, max accuracy diff {max_acc:.1e})")
    print(f"Pareto front of {n_cfg:,}: {len(front):,} points in {t_front:.3f} s; "
          f"P_lat {t_plat * 1e3:.1f} ms, P_acc {t_pacc * 1e3:.1f} ms")

    result = {
        "benchmark": "perfmodel_speed",
        "command": " ".join(["python bench/perfmodel_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "platform": platform.platform(), "processor": platform.processor()},
        "profile": {"blocks": profile.n_blocks, "criteria": list(profile.criteria),
                    "thresholds_per_criterion": len(profile.thresholds[profile.criteria[0]])},
        "topology": {"name": topo.name, "tiers": topo.n_tiers, "file": os.path.relpath(args.topology, ROOT)},
        "configurations": n_cfg,
        "repeats": args.repeats,
        "rows": [{"what": name, "configs": n, "seconds": t, "configs_per_s": n / t} for name, n, t in rows],
        "vectorised_over_scalar": speedup,
        "results_agree": same,
        "max_rel_latency_diff": max_rel,
        "max_abs_accuracy_diff": max_acc,
        "pareto": {"points": int(len(front)), "seconds": t_front},
        "p_lat_seconds": t_plat,
        "p_acc_seconds": t_pacc,
        "timing": "best of repeats (vectorised rows, Pareto, P_lat, P_acc); one pass for the scalar sample",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
