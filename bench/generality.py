"""Generality sweep: exit points and exact equivalence on every torchvision classification builder.

For each builder in ``torchvision.models.list_models(module=torchvision.models)``
(random weights, eval mode, input 1x3x224x224 unless the model needs another
size), the sweep

1. traces the model (``autoexit.points.TracedBackbone``) and asks for exit
   points at the default granularity (``candidates()``),
2. cuts the model at every point, puts a default head on each
   (``heads.default_head_spec`` / ``build_head``) and builds a
   ``MultiExitModel`` with every threshold at +inf (no exit taken),
3. checks that its output on a batch of two random inputs is bit-identical to
   the backbone's (``torch.equal``), and that every sample is reported as
   answered by the backbone.

A builder passes when it has at least one exit point and the outputs are equal.
Every failure is listed with its reason.

Usage::

    python bench/generality.py                 # all 80 builders at 224x224 (about 5 min on 2 idle cores)
    python bench/generality.py --models resnet18 vit_b_16 --size 64

Results: ``bench/results/generality.json`` (a run over some builders only: ``generality_partial.json``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the default test run checks these (small inputs); the slow test and this script check every builder
FAST_SUBSET = ("resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "vgg11", "regnet_x_400mf",
               "convnext_tiny", "vit_b_16")

# input sizes that differ from 224 (none of the current builders needs one at random weights; kept as the
# place to record "the model's minimum" should a builder refuse 224)
SIZE_OVERRIDES: dict[str, int] = {}


def builders() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build(name: str, size: int = 224, num_classes: int = 1000):
    """The builder's model with random weights, eval mode; ViTs are built for ``size`` (a constructor argument)."""
    import torch
    import torchvision

    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_"):
        kwargs["image_size"] = size  # ViT's position embedding is sized for one input resolution
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval()


def check_model(model, size: int = 224, granularity="auto", batch: int = 2, seed: int = 0) -> dict:
    """Exit points of ``model`` and whether the no-exit multi-exit model reproduces it exactly.

    Returns a dict: ``points`` (names), ``n_points``, ``equal`` (torch.equal of the outputs),
    ``all_backbone`` (every exit index says "backbone"), ``max_abs_diff``, ``ok`` and ``reason``
    (why not ok: the exception's first line, "no exit points" or "outputs differ").
    """
    import torch

    from autoexit.heads import build_head, default_head_spec
    from autoexit.model import MultiExitModel
    from autoexit.points import TracedBackbone

    out: dict = {"input": [batch, 3, size, size], "points": [], "n_points": 0, "equal": None,
                 "all_backbone": None, "max_abs_diff": None, "ok": False, "reason": None, "stage": "trace"}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tb = TracedBackbone(model, x[:1])
            out["stage"] = "candidates"
            pts = tb.candidates(granularity)
            out["points"] = [p.name for p in pts]
            out["n_points"] = len(pts)
            out["auto_leaves"] = list(tb.auto_leaves)
            if not pts:
                out["reason"] = "no exit points"
                return out
            out["stage"] = "split"
            heads = [build_head(default_head_spec(p.shape, tb.num_classes), p.shape, tb.num_classes).eval()
                     for p in pts]
            mm = MultiExitModel(tb.split([p.node for p in pts]), heads, num_classes=tb.num_classes).eval()
            out["stage"] = "run"
            with torch.no_grad():
                ref = model(x)
                got, exit_index = mm(x)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the sweep
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out["reason"] = f"{out['stage']}: {type(exc).__name__}: {first[:300]}"
        return out
    out["stage"] = "done"
    out["equal"] = bool(torch.equal(got, ref))
    out["all_backbone"] = bool((exit_index == len(pts)).all())
    out["max_abs_diff"] = float((got - ref).abs().max()) if got.shape == ref.shape else None
    out["ok"] = out["equal"] and out["all_backbone"]
    if not out["ok"]:
        out["reason"] = "outputs differ" if not out["equal"] else "exit index is not the backbone's"
    return out


def check_builder(name: str, size: int | None = None, granularity="auto", num_classes: int = 1000) -> dict:
    size = size or SIZE_OVERRIDES.get(name, 224)
    t0 = time.perf_counter()
    try:
        model = build(name, size, num_classes)
    except Exception as exc:  # noqa: BLE001
        return {"model": name, "ok": False, "reason": f"build: {type(exc).__name__}: {str(exc)[:300]}",
                "points": [], "n_points": 0, "seconds": time.perf_counter() - t0}
    res = check_model(model, size, granularity)
    del model
    gc.collect()
    return {"model": name, **res, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    import torch

    from bench.common import print_table, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="builder names (default: every classification builder)")
    ap.add_argument("--fast", action="store_true", help="only the fast subset the default test run checks")
    ap.add_argument("--size", type=int, default=None, help="input height/width (default 224)")
    ap.add_argument("--granularity", default="auto")
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = args.models or (list(FAST_SUBSET) if args.fast else builders())
    gran = args.granularity if args.granularity in ("auto", "node") else int(args.granularity)
    rows, results = [], []
    t_all = time.perf_counter()
    for name in names:
        r = check_builder(name, args.size, gran, args.num_classes)
        results.append(r)
        row = {"model": name, "ok": r["ok"], "points": r["n_points"], "equal": r.get("equal"),
               "s": round(r["seconds"], 1), "reason": r.get("reason") or ""}
        rows.append(row)
        print(f"{name:24s} ok={r['ok']!s:5s} points={r['n_points']:3d} equal={r.get('equal')!s:5s} "
              f"{r['seconds']:6.1f}s {r.get('reason') or ''}", flush=True)
    total = time.perf_counter() - t_all
    passed = sum(r["ok"] for r in results)
    print_table(rows, f"generality sweep: {passed}/{len(results)} builders pass")
    failures = {r["model"]: r["reason"] for r in results if not r["ok"]}
    full = set(names) >= set(builders())
    write_results("generality" if full else "generality_partial", {
        "command": "python bench/generality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torchvision": __import__("torchvision").__version__,
        "size": args.size or 224, "granularity": args.granularity,
        "passed": passed, "total": len(results), "failures": failures, "seconds": total,
        "loadavg": os.getloadavg(), "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
