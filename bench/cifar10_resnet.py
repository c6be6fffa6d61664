"""The core pipeline on the real CIFAR-10 ResNets (issue 2's benchmark).

For ResNet-20 and ResNet-56 (pre-trained, ../shared/fixtures) on the CIFAR-10
JPEG test set, exits after every residual block (granularity 2), default heads
trained label-free, the paper-003 policy (T/2^n split, max-softmax, K(S)
subset) at tolerances 0.5 / 1 / 2 %:

- backbone accuracy, early-exit accuracy and drop (test split, GT labels used only here),
- expected FLOPs per sample (heads included) and the saving,
- the oracle saving with the same heads (each sample leaves at the first head that
  agrees with the backbone; zero accuracy change),
- CPU latency per sample at batch 1 and 32, early-exit model (TorchScript) beside the
  backbone in TorchScript too (`autoexit.model.scripted_backbone`), in the same run (2 threads, median of rounds).

Usage: python bench/cifar10_resnet.py [--depths 20 56] [--tolerances 0.5 1 2] [--rounds 5] [--no-latency]
Recordings and trained heads are cached under ~/.cache/autoexit (first run: ~20-40 min on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cifar10_data, cifar_resnet, print_table, require_fixtures, write_results  # noqa: E402


def run(depths, tolerances, rounds: int, latency: bool) -> dict:
    import torch

    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.model import scripted_backbone, to_torchscript
    from autoexit.pipeline import EnableConfig, assemble, prepare
    from autoexit.search.pipeline import train_heads_cached

    torch.set_num_threads(2)
    rows, details = [], {}
    data = cifar10_data()
    for depth in depths:
        model = cifar_resnet(depth)
        t0 = time.perf_counter()
        base_cfg = EnableConfig(granularity=2)
        tb, points, rec = prepare(model, data, base_cfg, progress=True)
        heads = train_heads_cached(rec, {}, TrainConfig(), cache_dir=default_cache_dir() / "heads", progress=True)
        setup_s = time.perf_counter() - t0
        # both in TorchScript: the ratio compares the models, not eager PyTorch with TorchScript
        sb = scripted_backbone(tb) if latency else None
        for tol in tolerances:
            res = assemble(EnableConfig(tolerance=tol, granularity=2), tb, points, rec, heads)
            m = res.metrics["test"]
            row = {
                "model": f"resnet{depth}",
                "tolerance %": tol,
                "exits kept": len(res.kept),
                "backbone acc %": 100 * m["backbone_accuracy"],
                "early-exit acc %": 100 * m["accuracy"],
                "drop pts": 100 * m["accuracy_drop"],
                "MFLOPs/sample": m["expected_flops"] / 1e6,
                "base MFLOPs": m["base_flops"] / 1e6,
                "saving %": 100 * m["saving"],
                "oracle saving %": 100 * m["oracle_saving"],
                "share of oracle": m["saving"] / m["oracle_saving"] if m["oracle_saving"] else None,
            }
            if latency:
                scripted = to_torchscript(res.model, tb.example_input)
                from autoexit.cost import compare_latency

                lat = compare_latency({"backbone": sb, "early_exit": scripted},
                                      rec.inputs("test"), (1, 32), rounds=rounds)
                for b in (1, 32):
                    row[f"bs{b} ms/sample (bb)"] = lat["backbone"][b].median_ms
                    row[f"bs{b} ms/sample (ee)"] = lat["early_exit"][b].median_ms
                    row[f"bs{b} ratio"] = lat["early_exit"][b].median_ms / lat["backbone"][b].median_ms
            rows.append(row)
            details[f"resnet{depth}@{tol}"] = {
                "kept": res.kept,
                "exit_rates_test": m["exit_rates"],
                "thresholds": res.subset.thresholds.thresholds.tolist(),
                "val": {k: v for k, v in res.metrics["val"].items() if k not in ("exit_index", "per_exit")},
                "test_per_exit": m["per_exit"],
            }
        details[f"resnet{depth}"] = {"points": [p.name for p in points], "setup_s": setup_s,
                                     "head_val_agreement": {n: h.val_agreement for n, h in heads.items()},
                                     "head_flops": {n: h.flops for n, h in heads.items()}}
    return {"rows": rows, "details": details}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    args = ap.parse_args(argv)
    require_fixtures()
    out = run(args.depths, args.tolerances, args.rounds, not args.no_latency)
    print_table(out["rows"], "autoexit core pipeline on CIFAR-10 (JPEG test set), test split")
    write_results("cifar10_resnet", {"command": "python bench/cifar10_resnet.py " + " ".join(argv or sys.argv[1:]),
                                     **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
