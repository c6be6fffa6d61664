"""Shared plumbing for the benchmark scripts: fixtures, tables, JSON results.

The fixtures (pre-trained CIFAR-10 ResNets, the CIFAR-10 test set as JPEGs)
live outside the repository, in ``../shared/fixtures`` or ``$AUTOEXIT_FIXTURES``.
Scripts call :func:`require_fixtures` first: without them they print why and
exit 0. The JPEG tarball is extracted once into ``~/.cache/autoexit/fixtures``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def fixtures_dir() -> Path:
    return Path(os.environ.get("AUTOEXIT_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixtures_available() -> bool:
    d = fixtures_dir()
    return (d / "cifar10-resnet").is_dir() and (d / "cifar10-test-jpeg" / "test.tar").is_file()


def require_fixtures() -> None:
    if not fixtures_available():
        print(f"skipping: the CIFAR-10 fixtures are not at {fixtures_dir()} "
              "(set AUTOEXIT_FIXTURES to the folder holding cifar10-resnet/ and cifar10-test-jpeg/)")
        sys.exit(0)


def cifar_checkpoint(depth: int) -> Path:
    found = sorted((fixtures_dir() / "cifar10-resnet").glob(f"resnet{depth}-*.th"))
    if not found:
        raise SystemExit(f"no resnet{depth} checkpoint in {fixtures_dir() / 'cifar10-resnet'}")
    return found[0]


def cifar_resnet(depth: int):
    from autoexit.zoo import load_cifar_resnet

    return load_cifar_resnet(cifar_checkpoint(depth))


def cifar10_test_dir() -> Path:
    """The extracted ImageFolder of the CIFAR-10 JPEG test set (extracted once)."""
    cache = Path(os.environ.get("AUTOEXIT_CACHE", Path.home() / ".cache" / "autoexit")) / "fixtures"
    root = cache / "cifar10-test-jpeg" / "test"
    if not (root / "truck").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".extract-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        with tarfile.open(fixtures_dir() / "cifar10-test-jpeg" / "test.tar") as tf:
            tf.extractall(tmp, filter="data")
        (cache / "cifar10-test-jpeg").mkdir(exist_ok=True)
        os.replace(tmp / "test", root)
        tmp.rmdir()
    return root


def cifar10_data(limit: int | None = None):
    """The CIFAR-10 JPEG test set as inference data (labels kept for reporting only)."""
    from autoexit.data import load_image_folder
    from autoexit.zoo import CIFAR_MEAN, CIFAR_STD

    return load_image_folder(cifar10_test_dir(), mean=CIFAR_MEAN, std=CIFAR_STD, limit=limit)


def environment() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def val_selected_training(**kw):
    """The ``TrainConfig`` of the heads behind the benchmark results made before ``select`` existed: each head
    kept its best val-KL epoch (``select="val"``; ``patience`` 8 unless given). ``head_levers`` and
    ``guarantee_check`` keep it, so that their merged tables stay one set of heads (and their caches hit);
    the core's default now keeps the last epoch and never reads val (docs/policies.md)."""
    from autoexit.distill import TrainConfig

    kw.setdefault("patience", 8)
    return TrainConfig(select="val", **kw)


def print_table(rows: list[dict], title: str = "", columns: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    columns = columns or list(rows[0].keys())
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    from rich.markup import escape

    for r in rows:  # cells are text, not markup: a label like "auto[fit]" must print as it is
        t.add_row(*[escape(_fmt(r.get(c))) for c in columns])
    Console(width=200).print(t)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def latency_environment(results: dict) -> dict | None:
    """Where the latency of a results file of ``bench/policies.py`` was measured: its own record, or the file's
    environment when a later run (``--latency-only``) re-measured it and kept the rows' in ``environment_of_rows``."""
    return results.get("latency_environment") or (results.get("environment") if "environment_of_rows" in results
                                                   else None)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"environment": environment(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def run_resplit_benchmark(description: str, argv, run_depth, name: str, title: str, columns: list[str],
                          preface=None, **payload) -> int:
    """The command line of the cheap-heads re-split benchmarks (``bench/class_thresholds.py``,
    ``bench/drop_test_power.py``): ``--depths`` and ``--resplits`` (checked), the fixtures required, torch on 2
    threads; ``preface(log) -> dict`` (optional) runs first and is stored under ``simulated``; then
    ``run_depth(depth, resplits, log) -> rows`` per network, the table printed and ``bench/results/<name>.json``
    written with ``payload``, the rows and the wall time."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--resplits", type=int, default=100)
    args = ap.parse_args(argv)
    if args.resplits < 1:
        raise SystemExit(f"--resplits must be >= 1, got {args.resplits}")
    require_fixtures()
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    if preface is not None:
        payload["simulated"] = preface(log)
    rows = [row for depth in args.depths for row in run_depth(depth, args.resplits, log)]
    print_table(rows, title, columns)
    write_results(name, {"args": vars(args), **payload, "rows": rows, "seconds": time.perf_counter() - t0})
    return 0
