"""The optimised runtime (``autoexit.load(path, optimize=True)``) against the plain TorchScript one, on the
CIFAR-10 fixture: CPU latency per sample of the backbone and of early-exit models at T = 1 %, side by side in
one process run, at batch 1 and 32.

Models (every one timed on the same 256 real test images, alternating, median of ``--rounds`` rounds;
``autoexit.cost.compare_latency``):

- ``backbone (eager)``: the backbone as PyTorch runs it;
- ``backbone``: the backbone in TorchScript, the emitted model's runtime (``scripted_backbone``): the
  baseline of every ratio autoexit reported so far;
- ``backbone (optimized)``: the same, frozen and optimised (``optimize_for_runtime``: batch norms folded into
  the convolutions, oneDNN convolutions on pre-packed weights), what a user gets who optimises the backbone
  the same way;
- ``early_exit`` / ``early_exit (optimized)``: the emitted early-exit model, plain and optimised.

Three ratios per early-exit model: ``plain`` (early_exit / backbone: what the exits buy in TorchScript),
``optimized`` (both optimised: what the exits buy in the optimised runtime) and ``deployed`` (optimised
early-exit model / plain TorchScript backbone: what a user who ran the backbone in TorchScript gains by
deploying the artifact with ``optimize=True``, runtime and exits together). ``decisions match``: the share of
the 3,000 test images whose exit the optimised model takes as the plain one does.

Early-exit models (exits after every residual block, the core's default heads, split 50/20/30, seed 0):

- ``max_softmax``: the default guaranteed policy, label-free risk, exits chosen by FLOPs;
- ``gate[harmless]+drop``: the best guaranteed saving measured at T = 1 % (labelled risk, gates trained on
  the train labels, policy fitted with 3 folds: ``EnableConfig(policy="gate", risk="drop",
  policy_options={"target": "harmless"}, cross_fit=3)``);
- ``max_softmax, cost=latency bs32`` and the same ``(optimized)``: exits chosen by milliseconds timed at batch
  32 on this CPU, in the plain and in the optimised runtime (``cost_evaluator={"settings": {"optimize":
  True}}``, CLI ``--cost-optimized``).

Run: ``python bench/runtime.py`` (``--depths 56``, ``--rounds 7``). Needs the fixtures; the heads, out-of-fold
predictions and recordings come from the caches of ``bench/policies.py`` (computed when missing). Writes
``bench/results/runtime.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, require_fixtures, write_results  # noqa: E402


def _by_latency(optimize: bool) -> dict:
    settings = {"warmup": 3, "repeat": 7, "min_repeat_ms": 20.0, **({"optimize": True} if optimize else {})}
    return {"policy": "max_softmax", "cost": "latency", "cost_batch_size": 32, "cost_evaluator": {"settings": settings}}


VARIANTS = [
    ("max_softmax", {"policy": "max_softmax"}, 0),
    ("gate[harmless]+drop", {"policy": "gate", "risk": "drop", "policy_options": {"target": "harmless"}}, 3),
    ("max_softmax, cost=latency bs32", _by_latency(False), 0),
    ("max_softmax, cost=latency bs32 (optimized)", _by_latency(True), 0),
]


def run_depth(depth: int, rounds: int, only: tuple, log) -> dict:
    import torch

    from autoexit.cost import compare_latency
    from autoexit.model import optimize_for_runtime, scripted_backbone, to_torchscript
    from autoexit.pipeline import EnableConfig, assemble
    from bench.policies import cross_fitted_data, setup, split_data

    cfg, tb, points, rec, heads = setup(depth)
    data = split_data(rec, heads)
    inputs = rec.inputs("test")
    base = {"backbone": scripted_backbone(tb), "backbone (optimized)": optimize_for_runtime(scripted_backbone(tb)),
            "backbone (eager)": tb.model.eval()}
    rows = []
    for label, over, folds in VARIANTS:
        if only and label not in only:
            continue
        d = cross_fitted_data(depth, rec, heads, data, folds, cfg.train, log) if folds else data
        ecfg = EnableConfig(granularity=2, tolerance=1.0, **over, **({"cross_fit": folds} if folds else {}))
        t0 = time.perf_counter()
        res = assemble(ecfg, tb, points, rec, heads, predictions={s: d[s][0] for s in d},
                       stats={s: d[s][1] for s in d})
        fit_s = time.perf_counter() - t0
        plain = to_torchscript(res.model, tb.example_input)
        fast = optimize_for_runtime(plain)
        with torch.no_grad():
            match = float((plain(inputs)[1] == fast(inputs)[1]).float().mean())
        log(f"resnet{depth} {label}: exits {res.kept}, saving {100 * res.metrics['test']['saving']:.1f} %, "
            f"timing ...")
        lat = compare_latency({**base, "early_exit": plain, "early_exit (optimized)": fast}, inputs, (1, 32),
                              rounds=rounds)
        ms = {name: {b: s.median_ms for b, s in per.items()} for name, per in lat.items()}
        row = {"depth": depth, "policy": label, "exits": len(res.kept), "kept": res.kept,
               "saving_pct": 100 * res.metrics["test"]["saving"], "drop_pts": 100 * res.metrics["test"]["accuracy_drop"],
               "decisions_match": match, "fit_s": fit_s, "per_sample_ms": ms}
        for b in (1, 32):
            row[f"plain b{b}"] = ms["early_exit"][b] / ms["backbone"][b]
            row[f"optimized b{b}"] = ms["early_exit (optimized)"][b] / ms["backbone (optimized)"][b]
            row[f"deployed b{b}"] = ms["early_exit (optimized)"][b] / ms["backbone"][b]
            row[f"backbone optimized/plain b{b}"] = ms["backbone (optimized)"][b] / ms["backbone"][b]
            row[f"backbone eager/plain b{b}"] = ms["backbone (eager)"][b] / ms["backbone"][b]
        if ecfg.cost == "latency":
            row["cost_source"] = res.extra["policy"].get("cost_source")
        log(f"resnet{depth} {label}: plain {row['plain b1']:.2f}x / {row['plain b32']:.2f}x, optimised "
            f"{row['optimized b1']:.2f}x / {row['optimized b32']:.2f}x, deployed {row['deployed b1']:.2f}x / "
            f"{row['deployed b32']:.2f}x (batch 1 / 32), decisions match {100 * match:.2f} %")
        rows.append(row)
    return {"depth": depth, "rows": rows}


COLUMNS = ["depth", "policy", "exits", "saving_pct", "drop_pts", "plain b1", "plain b32", "optimized b1",
           "optimized b32", "deployed b1", "deployed b32", "backbone optimized/plain b1",
           "backbone optimized/plain b32", "decisions_match"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=[20, 56])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", nargs="+", default=(), choices=[v[0] for v in VARIANTS])
    ap.add_argument("--out", default="runtime")
    args = ap.parse_args(argv)
    require_fixtures()
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    results = [run_depth(d, args.rounds, tuple(args.only), log) for d in args.depths]
    rows = [r for res in results for r in res["rows"]]
    print_table(rows, "CPU latency vs the backbone, T = 1 % (ratios of ms per sample; 2 threads)", COLUMNS)
    write_results(args.out, {"command": " ".join(["python bench/runtime.py", *(argv or sys.argv[1:])]),
                             "rounds": args.rounds, "results": results, "wall_s": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
