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
  +-5 % / +-10 % of the median of all runs.

Prints a table and writes ``bench/results/evaluator_noise.json``. Numbers are
reported, never asserted; the load average at start and end is recorded
because other jobs on the machine inflate the noise. Run from the repository
root::

    python bench/evaluator_noise.py                 # 4 models x batch 1, 8; 5 runs each
    python bench/evaluator_noise.py --runs 10 --threads 1
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="independent measurements per model (default 5)")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--threads", type=int, default=None, help="pin intra-op threads (default: runtime default)")
    ap.add_argument("--repeat", type=int, default=20, help="groups per measurement (default 20)")
    ap.add_argument("--min-repeat-ms", type=float, default=50.0, help="minimum group duration (default 50)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    settings = MeasureSettings(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, threads=args.threads,
                               timeout_s=600)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows, raw = [], []
    t0 = time.perf_counter()
    for name, module, shape, fmt in models():
        runs = []
        for _ in range(args.runs):
            ev = LocalEvaluator()  # fresh, no cache: a real re-measurement
            runs.append(ev.measure(module, input_shapes=shape, batch_sizes=batch_sizes, settings=settings,
                                   format=fmt))
        for b in batch_sizes:
            stats = [r.at(b) for r in runs]
            medians = [s.median_ms for s in stats]
            center = statistics.median(medians)
            mean = statistics.fmean(medians)
            cv_between = statistics.pstdev(medians) / mean if mean > 0 else 0.0
            row = {
                "model": name,
                "format": fmt,
                "batch": b,
                "median_ms": center,
                "p99_ms": statistics.median(s.p99_ms for s in stats),
                "cv_within": statistics.median(s.cv for s in stats),
                "cv_between": cv_between,
                "within_5pct": sum(abs(m - center) <= 0.05 * center for m in medians) / len(medians),
                "within_10pct": sum(abs(m - center) <= 0.10 * center for m in medians) / len(medians),
                "number": stats[0].number,
            }
            rows.append(row)
            raw.append({**row, "run_medians_ms": medians, "threads": runs[0].threads})
    elapsed = time.perf_counter() - t0
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(rows, title=f"evaluator noise: {args.runs} runs per model, settings {settings.key_dict()}")
    print(f"{elapsed:.1f} s; load average at start {load_start}, at end {load_end}")
    write_results("evaluator_noise", {
        "settings": settings.to_dict(),
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
