"""Core CLI commands: ``quickstart``, ``enable``, ``inspect``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _policy_flags(p) -> None:
    from .policies import DEFAULT_POLICY, POLICIES, RISKS
    from .policies.gate import GATE_TARGETS

    p.add_argument("--policy", choices=list(POLICIES), default=DEFAULT_POLICY,
                   help=f"exit policy (default {DEFAULT_POLICY}; paper003 = T/2^n thresholds without a guarantee; "
                   "see docs/policies.md)")
    p.add_argument("--auto-candidates", nargs="+", metavar="POLICY", default=None,
                   help="with --policy auto: the guaranteed policies it chooses among (default: max_softmax margin "
                   "entropy patience gate); NAME[key=value,...] adds a policy with options of its own, e.g. "
                   "'gate[target=harmless]' beside gate (quote it for the shell)")
    p.add_argument("--auto-select", choices=["cal", "fit"], default=None,
                   help="with --policy auto: choose the cheapest on the calibration split, each candidate tested at "
                   "delta/m (cal, default), or on the fit split before calibration, at the full delta (fit)")
    p.add_argument("--gate-target", choices=list(GATE_TARGETS), default=None,
                   help="with --policy gate (or auto): what the gates learn to predict, agreement with the backbone "
                   "(label-free, default) or harmless exits (reads the train labels; with --risk drop or harm)")
    p.add_argument("--delta", type=float, default=0.1,
                   help="the budget holds on new data with probability >= 1 - delta (default 0.1)")
    p.add_argument("--risk", choices=list(RISKS), default="disagreement",
                   help="what the guarantee bounds: disagreement with the backbone (label-free, default), "
                   "harm or drop (need labels)")
    p.add_argument("--cross-fit", type=int, default=0, metavar="K",
                   help="fit the policy on out-of-fold head predictions of the train split, K >= 2 folds "
                   "(about K - 1 more head trainings; default 0: off)")
    p.add_argument("--teacher", choices=["recorded", "augmented", "mixup"], default="recorded",
                   help="what the heads learn from: the recorded activations (default, fast), or the backbone run "
                   "on new inputs, flipped and shifted (augmented) and also mixed (mixup: function matching, the "
                   "best label-free heads measured; wants --head-epochs/--epochs around 120)")
    p.add_argument("--teacher-shift", type=int, default=None, metavar="PX",
                   help="largest random shift in pixels of the on-the-fly teachers' images (default 4; 1 for "
                   "quickstart's 8x8 digits)")
    p.add_argument("--cost", choices=["flops", "latency"], default="flops",
                   help="what the policy minimises: counted FLOPs (default) or latency timed on a device "
                   "evaluator (this CPU unless --evaluator-url; heads that cost more time than they save are "
                   "dropped)")
    p.add_argument("--cost-batch-size", type=int, default=1, help="batch size the latency is timed at (default 1)")
    p.add_argument("--cost-stat", choices=["min", "median", "mean"], default="min",
                   help="with --cost latency: the statistic of each timing's groups of runs (default min, the "
                   "fastest group: steadier than the median on a busy or throttling device)")
    p.add_argument("--cost-optimized", nargs="?", const="onednn", choices=["onednn", "freeze"], default=None,
                   metavar="MODE",
                   help="with --cost latency: time the stages and heads frozen and optimised for the device, as "
                   "autoexit.load(path, optimize=MODE) runs the emitted model there (MODE onednn, the default, or "
                   "freeze)")
    p.add_argument("--evaluator-url", help="with --cost latency: a device running `autoexit evaluator serve`")
    p.add_argument("--evaluator-token-file", help="bearer-token file for --evaluator-url")
    p.add_argument("--head", default=None, metavar="PRESET|JSON",
                   help="the exit heads' design at every point: a preset, default (separable conv > BN > ReLU > "
                   "pool > FC128 > FC) or cheap (SDN's 2x2 average pool + one linear layer, about 0.3 %% of the "
                   "default's FLOPs), or a HeadSpec as JSON")


def _head_setting(value: str | None):
    """``--head``: None, a preset name (kept as is; EnableConfig checks it) or a HeadSpec from JSON."""
    from .errors import AutoExitError
    from .heads import HeadSpec

    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return HeadSpec.from_json(value)
    except AutoExitError as exc:
        raise AutoExitError(f"--head: {exc}") from None


def _policy_settings(args: argparse.Namespace) -> dict:
    from .errors import AutoExitError

    auto = {k: v for k, v in (("candidates", args.auto_candidates), ("select", args.auto_select)) if v is not None}
    if auto and args.policy != "auto":
        raise AutoExitError(f"--auto-candidates / --auto-select apply to --policy auto, not {args.policy}; "
                            "add --policy auto or drop them")
    options = dict(auto)
    if args.gate_target is not None:
        if args.policy == "gate":
            options["target"] = args.gate_target
        elif args.policy == "auto" and "gate" in (args.auto_candidates or ["gate"]):
            options["options"] = {"gate": {"target": args.gate_target}}
        else:
            raise AutoExitError(f"--gate-target applies to --policy gate (or auto with gate among its candidates), "
                                f"not {args.policy}; drop it or change the policy")
    ev = {}
    if args.evaluator_url:
        ev = {"url": args.evaluator_url, **({"token_file": args.evaluator_token_file}
                                            if args.evaluator_token_file else {})}
    if args.cost_optimized:
        if args.cost != "latency":
            raise AutoExitError("--cost-optimized applies to --cost latency (FLOPs do not depend on the runtime); "
                                "add --cost latency or drop it")
        ev["settings"] = {"optimize": args.cost_optimized}
    return {"head": _head_setting(args.head), "cost": args.cost, "cost_batch_size": args.cost_batch_size,
            "cost_stat": f"{args.cost_stat}_ms",
            "cost_evaluator": ev,
            "cross_fit": args.cross_fit, "policy_options": options}


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train a small CNN on scikit-learn's digits and early-exit enable it (no downloads)",
        description="Train a small CNN backbone on half of scikit-learn's digits (seconds), then run the whole "
        "label-free pipeline on the other half and emit an artifact.",
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--tolerance", type=float, default=2.0, help="accepted accuracy drop in %% (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30, help="backbone training epochs")
    p.add_argument("--head-epochs", type=int, default=30, help="exit-head training epochs")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _policy_flags(p)
    p.set_defaults(func=_quickstart)

    p = sub.add_parser(
        "enable",
        help="early-exit enable your own model on your unlabelled data",
        description="Early-exit enable a pre-trained classifier on unlabelled inference data and emit an artifact.",
    )
    p.add_argument("--model", required=True,
                   help="TorchScript file, torch.export .pt2 program, or package.module:factory")
    p.add_argument("--weights", help="state_dict file for --model module:factory (loaded with weights_only)")
    p.add_argument("--data", required=True,
                   help="image folder, .pt file ({'x': inputs, 'y': labels}) or IDX images file, or 'digits'")
    p.add_argument("--labels", help="IDX labels file (optional; used only to report accuracy)")
    p.add_argument("--size", type=int, nargs="+", help="resize images to this size (image folders)")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean (image folders)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std (image folders)")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--tolerance", type=float, required=True, help="accepted accuracy drop in %%")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--scheme", choices=["halving", "equal"], default="halving", help="tolerance split over exits")
    p.add_argument("--granularity", default="auto", help="auto, a module depth (1, 2, ...) or node")
    p.add_argument("--points", help="comma-separated exit points (module paths) instead of discovery")
    p.add_argument("--epochs", type=int, default=40, help="head training epochs")
    p.add_argument("--cache-dir", help="recording cache (default ~/.cache/autoexit or $AUTOEXIT_CACHE)")
    p.add_argument("--onnx", action="store_true", help="also export each stage and head to ONNX")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true")
    _policy_flags(p)
    p.set_defaults(func=_enable)

    p = sub.add_parser("inspect", help="validate an emitted artifact and print its summary")
    p.add_argument("artifact")
    p.set_defaults(func=_inspect)


def print_summary(result, title: str, artifact: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in result.summary_rows():
        t.add_row(k, v)
    if artifact is not None:
        t.add_row("artifact", str(artifact))
        t.add_row("report", str(artifact / "report.html"))
    Console().print(t)


def _quickstart(args: argparse.Namespace) -> int:
    import torch

    from .data import load_digits
    from .distill import TrainConfig
    from .pipeline import EnableConfig, enable
    from .zoo import trained_digits_cnn

    torch.set_num_threads(2)
    out = Path(args.out)
    progress = not args.quiet
    model = trained_digits_cnn(epochs=args.epochs, seed=args.seed, augment_shift=1, progress=progress)
    data = load_digits("inference", seed=args.seed, shifts=True)
    cfg = EnableConfig(tolerance=args.tolerance, seed=args.seed, cache_dir=str(out / "cache"),
                       train=TrainConfig(epochs=args.head_epochs, batch_size=128, seed=args.seed,
                                         teacher=args.teacher,
                                         shift=1 if args.teacher_shift is None else args.teacher_shift),
                       policy=args.policy, delta=args.delta, risk=args.risk, **_policy_settings(args))
    result = enable(model, data, config=cfg, progress=progress)
    artifact = result.emit(out / "artifact", overwrite=True, latency=not args.no_latency)
    print_summary(result, "autoexit quickstart: DigitsCNN on scikit-learn digits", artifact)
    return 0


def _enable(args: argparse.Namespace) -> int:
    from .data import as_inference_data, load_idx, load_image_folder
    from .distill import TrainConfig
    from .pipeline import EnableConfig, enable
    from .zoo import load_backbone

    # settings first: a bad flag fails before the data and the model are loaded
    gran = args.granularity if args.granularity in ("auto", "node") else int(args.granularity)
    cfg = EnableConfig(
        tolerance=args.tolerance,
        scheme=args.scheme,
        granularity=gran,
        policy=args.policy,
        delta=args.delta,
        risk=args.risk,
        **_policy_settings(args),
        points=tuple(p.strip() for p in args.points.split(",")) if args.points else None,
        cache_dir=args.cache_dir,
        train=TrainConfig(epochs=args.epochs, teacher=args.teacher,
                          shift=4 if args.teacher_shift is None else args.teacher_shift),
    )
    dpath = Path(args.data)
    if dpath.is_dir():
        data = load_image_folder(dpath, size=args.size, mean=args.mean, std=args.std, limit=args.limit)
    elif args.labels or "idx" in dpath.name:
        data = load_idx(dpath, args.labels, limit=args.limit)
    else:
        data = as_inference_data(args.data)
    model = load_backbone(args.model, args.weights, data.example())
    result = enable(model, data, config=cfg, progress=not args.quiet)
    artifact = result.emit(args.out, overwrite=args.overwrite, onnx=args.onnx, latency=not args.no_latency)
    print_summary(result, f"autoexit enable: {args.model}", artifact)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .artifact import load

    art = load(args.artifact)
    m = art.manifest
    t = Table(title=f"{args.artifact} (checksums OK)", title_justify="left")
    for col in ("exit", "point", "head", "threshold", "temperature", "head FLOPs", "test hit rate"):
        t.add_column(col)
    from .heads import HeadSpec

    for e in m["exits"]:
        t.add_row(str(e["index"]), e["name"], HeadSpec.from_dict(e["head_spec"]).describe(),
                  f"{e['threshold']:.4f}", f"{e['temperature']:.3f}", f"{e['head_flops']:,}",
                  f"{100 * e['hit_rate_test']:.1f} %")
    Console().print(t)
    exp = m["expected"]["test"]
    line = f"backbone {m['backbone']['class']} ({m['backbone']['flops']:,} FLOPs); test: saving {100 * exp['saving']:.1f} %"
    if exp.get("accuracy") is not None:
        line += f", accuracy {100 * exp['accuracy']:.2f} % (drop {100 * exp['accuracy_drop']:.2f} points)"
    print(line)
    lat = m.get("latency") or {}
    if lat.get("ratio"):  # what emit measured on its machine
        print("CPU latency vs the backbone (TorchScript): "
              + ", ".join(f"batch {b}: {r:.2f}x" for b, r in lat["ratio"].items()))
    if lat.get("ratio_deployed"):
        print(f"optimised (autoexit.load(path, optimize={lat.get('optimized_mode', 'onednn')!r})) vs the plain "
              "backbone: " + ", ".join(f"batch {b}: {r:.2f}x" for b, r in lat["ratio_deployed"].items()))
    return 0
