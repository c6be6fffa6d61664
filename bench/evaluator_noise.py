"""Measurement noise of the evaluator: how repeatable are its latency numbers?

For a few small models, measures each one ``--runs`` times from scratch with
the :class:`~autoexit.evaluator.LocalEvaluator` (no cache: every run reloads
the model and re-times it with the default TVM-style settings) and reports:

* ``cv_within``: coefficient of variation of the group samples inside one
  measurement (median over the runs) -- the noise one result's p90/p99 see;
* ``cv_between``: coefficient of variation of the run medians -- how much a
  repeated measurement of the same model moves, which is what decides
  whether the search can tell two configurations apart;
* ``within_5pct`` / ``within_10pct``: share of runs whose median lies within
  +-5 % / +-10 % of the median of all runs;
* the same two spreads for each run's *fastest* group (``min_ms``): ``cv_between_min``,
  ``within_10pct_min`` -- whether the minimum, which timeit recommends on a busy machine,
  is steadier than the median here.

``--cpus all,0,1`` measures every run once per CPU affinity (the whole process pinned to
that core, or ``all``: unpinned), interleaved run by run so that all of them see the same
drift: whether pinning the measurement to one core makes it repeatable.

Prints a table and writes ``bench/results/evaluator_noise.json``. Numbers are
reported, never asserted; the load average at start and end is recorded
because other jobs on the machine inflate the noise. Run from the repository
root::

    python bench/evaluator_noise.py                 # 4 models x batch 1, 8; 5 runs each
    python bench/evaluator_noise.py --runs 10 --threads 1
    python bench/evaluator_noise.py --runs 12 --batch-sizes 1 --threads 1 --cpus all,0,1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoexit.evaluator import LocalEvaluator, MeasureSettings  # noqa: E402
from bench.common import fixtures_available, print_table, write_results  # noqa: E402


def models() -> list[tuple[str, nn.Module, tuple[int, ...], str]]:
    torch.manual_seed(0)
    out: list[tuple[str, nn.Module, tuple[int, ...], str]] = [
        ("mlp-256-512-10", nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)), (256,), "torchscript"),
    ]
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    out.append(("cnn-2conv-32px", cnn, (3, 32, 32), "torchscript"))
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        out.append(("cnn-2conv-32px (onnx)", cnn, (3, 32, 32), "onnx"))
    except ImportError:
        pass
    if fixtures_available():
        from bench.common import cifar_resnet

        out.append(("cifar-resnet20", cifar_resnet(20), (3, 32, 32), "torchscript"))
    else:
        import torchvision

        out.append(("resnet18-32px (random weights)", torchvision.models.resnet18(num_classes=10), (3, 32, 32),
                    "torchscript"))
    return out


def _affinities(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    for a in out:
        if a != "all" and (not a.isdigit() or int(a) not in cores):
            raise SystemExit(f"--cpus: {a!r} is neither 'all' nor one of this process's cores {sorted(cores)}")
    if not out or (out != ["all"] and not hasattr(os, "sched_setaffinity")):
        raise SystemExit("--cpus needs 'all' or core numbers (pinning needs Linux's sched_setaffinity)")
    return out


def _spread(values: list[float], suffix: str) -> dict:
    """cv of ``values`` and the share within +-5 % / +-10 % of their median."""
    center, mean = statistics.median(values), statistics.fmean(values)
    return {f"cv_between{suffix}": statistics.pstdev(values) / mean if mean > 0 else 0.0,
            f"within_5pct{suffix}": sum(abs(v - center) <= 0.05 * center for v in values) / len(values),
            f"within_10pct{suffix}": sum(abs(v - center) <= 0.10 * center for v in values) / len(values)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="independent measurements per model (default 5)")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--threads", type=int, default=None, help="pin intra-op threads (default: runtime default)")
    ap.add_argument("--repeat", type=int, default=20, help="groups per measurement (default 20)")
    ap.add_argument("--min-repeat-ms", type=float, default=50.0, help="minimum group duration (default 50)")
    ap.add_argument("--cpus", default="all",
                    help="comma-separated CPU affinities to compare: 'all' (unpinned) or a core number "
                         "(default all)")
    args = ap.parse_args(argv)
    affinities = _affinities(args.cpus)
    warnings.filterwarnings("ignore", category=FutureWarning)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    settings = MeasureSettings(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, threads=args.threads,
                               timeout_s=600)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows, raw = [], []
    t0 = time.perf_counter()
    unpinned = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    for name, module, shape, fmt in models():
        runs: dict[str, list] = {a: [] for a in affinities}
        for _ in range(args.runs):
            for a in affinities:  # interleaved: every affinity sees the same drift
                if unpinned is not None:
                    os.sched_setaffinity(0, unpinned if a == "all" else {int(a)})
                ev = LocalEvaluator()  # fresh, no cache: a real re-measurement
                runs[a].append(ev.measure(module, input_shapes=shape, batch_sizes=batch_sizes, settings=settings,
                                          format=fmt))
        if unpinned is not None:
            os.sched_setaffinity(0, unpinned)
        for a in affinities:
            for b in batch_sizes:
                stats = [r.at(b) for r in runs[a]]
                medians = [s.median_ms for s in stats]
                mins = [s.min_ms for s in stats]
                row = {"model": name, "format": fmt, "cpu": a, "batch": b, "median_ms": statistics.median(medians),
                       "p99_ms": statistics.median(s.p99_ms for s in stats),
                       "cv_within": statistics.median(s.cv for s in stats),
                       **_spread(medians, ""), **_spread(mins, "_min"), "number": stats[0].number}
                rows.append(row)
                raw.append({**row, "run_medians_ms": medians, "run_mins_ms": mins, "threads": runs[a][0].threads})
    elapsed = time.perf_counter() - t0
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(rows, title=f"evaluator noise: {args.runs} runs per model, settings {settings.key_dict()}")
    print(f"{elapsed:.1f} s; load average at start {load_start}, at end {load_end}")
    write_results("evaluator_noise", {
        "settings": settings.to_dict(),
        "cpus": affinities,
        "runs": args.runs,
        "batch_sizes": list(batch_sizes),
        "load_average": {"start": load_start, "end": load_end},
        "elapsed_s": elapsed,
        "device": LocalEvaluator().info().to_dict(),
        "rows": raw,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
