"""Heads or rule? Why the SDN-style baseline saves more FLOPs than autoexit on the CIFAR ResNets.

``bench/peers.py`` measured that the SDN-style baseline (a 2x2-average-pool + FC head after every
block, trained with labels, one shared max-softmax threshold chosen on val for the budget, no
guarantee) saves more FLOPs at a 1 % budget than autoexit's default (separable-conv + FC128 + FC
heads trained label-free, thresholds with a guaranteed budget). This script separates the two
causes on the same recording and split (50/20/30, seed 0; test-split figures):

- **head architecture and training**: SDN's head spec trained with labels (as the baseline) and
  trained label-free (autoexit's KL distillation), beside autoexit's default heads;
- **rule**: on each set of heads, SDN's shared threshold (val, labelled drop, no guarantee),
  autoexit's default policy (guaranteed disagreement <= T with probability 0.9, label-free), the
  same with ``risk=drop`` (guaranteed labelled drop), and paper 003's T/2^n rule.

Heads are cached (``~/.cache/autoexit/heads``; shared with the other benchmarks).
Usage: ``python bench/head_ablation.py [--depths 20] [--tolerances 1 2]``.
Results: ``bench/results/head_ablation.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cifar10_data, cifar_resnet, print_table, require_fixtures, write_results  # noqa: E402

RULES = (("sdn rule (no guarantee)", None, None), ("autoexit default", "max_softmax", "disagreement"),
         ("autoexit, risk=drop", "max_softmax", "drop"), ("paper003", "paper003", "disagreement"))


def run(depth: int, tolerances) -> list[dict]:
    import torch

    from autoexit.baselines import BASELINES, fit_baseline, train_baseline_heads
    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.pipeline import EnableConfig, assemble, prepare
    from autoexit.search.pipeline import train_heads_cached

    torch.set_num_threads(2)
    tb, points, rec = prepare(cifar_resnet(depth).eval(), cifar10_data(), EnableConfig(granularity=2), progress=True)
    hc = default_cache_dir() / "heads"

    def trainer(r, specs, cfg, names):
        return train_heads_cached(r, specs, cfg, cache_dir=hc, points=names, progress=True)

    head_sets = {"autoexit default heads (label-free)": train_heads_cached(rec, {}, TrainConfig(), cache_dir=hc,
                                                                           progress=True)}
    for sup, label in ((True, "sdn heads, labels"), (False, "sdn heads, label-free")):
        spec = dataclasses.replace(BASELINES["sdn"], supervised=sup)
        head_sets[label] = train_baseline_heads(rec, spec, TrainConfig(), trainer=trainer)
    rows = []
    for hname, heads in head_sets.items():
        head_flops = sum(h.flops for h in heads.values()) / len(heads)
        for rule, policy, risk in RULES:
            for tol in tolerances:
                t0 = time.perf_counter()
                if policy is None:
                    r = fit_baseline(BASELINES["sdn"], tb, rec, heads, tol, risk="drop")
                    m, kept = r.metrics["test"], r.kept
                else:
                    res = assemble(EnableConfig(tolerance=tol, granularity=2, policy=policy, risk=risk), tb, points,
                                   rec, heads)
                    m, kept = res.metrics["test"], res.kept
                rows.append({"model": f"resnet{depth}", "heads": hname, "rule": rule, "budget %": tol,
                             "exits kept": len(kept), "saving %": 100 * m["saving"],
                             "drop pts": 100 * m["accuracy_drop"], "oracle %": 100 * m["oracle_saving"],
                             "mean head kFLOPs": head_flops / 1e3, "seconds": time.perf_counter() - t0})
                print(f"  {hname} / {rule} @ {tol} %: saving {rows[-1]['saving %']:.1f} %, "
                      f"drop {rows[-1]['drop pts']:.2f} pts", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1.0, 2.0])
    args = ap.parse_args(argv)
    require_fixtures()
    rows = [r for d in args.depths for r in run(d, args.tolerances)]
    print_table(rows, "heads x rule: FLOPs saved and accuracy drop on the test split",
                ["model", "heads", "rule", "budget %", "exits kept", "saving %", "drop pts", "oracle %",
                 "mean head kFLOPs"])
    write_results("head_ablation", {"command": "python bench/head_ablation.py " + " ".join(argv or sys.argv[1:]),
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
