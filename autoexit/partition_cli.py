"""``autoexit partition``: plan, build, serve and run partitioned early-exit models.

    autoexit partition plan  --profile P.json | --artifact A  --topology T.yaml  (--min-accuracy X | --max-latency-ms L)
    autoexit partition build --digits | --model M --data D  --topology T.yaml  --out A  [objective or explicit plan]
    autoexit partition serve --artifact A --part K [--port P]
    autoexit partition run   --artifact A --data digits [--shape 1] [--addresses h:p,...]

``register`` imports nothing heavy: each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _objective(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--min-accuracy", type=float, help="P_lat: the fastest configuration with accuracy >= this "
                   "fraction (e.g. 0.9)")
    g.add_argument("--max-latency-ms", type=float, help="P_acc: the most accurate configuration within this latency")
    p.add_argument("--partitions", type=int, help="exactly this many partitions (default: any up to the tiers)")
    p.add_argument("--max-partitions", type=int, help="at most this many partitions")
    p.add_argument("--criterion", choices=["confidence", "entropy"], help="one exit criterion (default: both)")
    p.add_argument("--no-trim", action="store_true", help="only full-depth models (no trimming)")
    p.add_argument("--consecutive", action="store_true", help="only placements on increasing tiers")
    p.add_argument("--destination", help="override the topology's destination tier (paper 004 case IV)")


def register(sub) -> None:
    p = sub.add_parser(
        "partition",
        help="partitioned early-exit models over device/edge/cloud tiers (plan, build, serve, run)",
        description="Plan a partitioning with the paper-004 performance model, build a partitioned artifact, "
        "serve each partition in its own process, run inputs across them.",
    )
    ss = p.add_subparsers(dest="partition_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    q = ss.add_parser("plan", help="solve P_lat / P_acc over every (threshold, partitioning, placement)",
                      description="Enumerate every configuration with the performance model and print the best "
                      "for an accuracy or latency target.")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="profile JSON (autoexit.partition.profile_result(...).to_json)")
    src.add_argument("--artifact", help="a partitioned artifact (its profile.json and topology)")
    q.add_argument("--topology", help="topology YAML (default: the artifact's)")
    _objective(q)
    q.add_argument("--json", help="also write the answer as JSON here")
    q.set_defaults(func=_plan)

    b = ss.add_parser("build", help="profile a model, plan, and emit a partitioned artifact",
                      description="Record, train default heads (cached), profile per-block latency on this machine "
                      "(or --evaluator-url), choose the configuration (objective or explicit) and write the "
                      "partitioned artifact.")
    m = b.add_mutually_exclusive_group(required=True)
    m.add_argument("--digits", action="store_true", help="a small CNN trained on scikit-learn digits (no downloads)")
    m.add_argument("--model", help="TorchScript file, torch.export .pt2 program, or package.module:factory")
    b.add_argument("--weights", help="state_dict for --model module:factory (loaded with weights_only)")
    b.add_argument("--data", help="image folder, .pt file, IDX images or 'digits' (with --model)")
    b.add_argument("--size", type=int, nargs="+", help="resize images (image folders)")
    b.add_argument("--mean", type=float, nargs=3, help="normalisation mean (image folders)")
    b.add_argument("--std", type=float, nargs=3, help="normalisation std (image folders)")
    b.add_argument("--limit", type=int, help="use only the first N samples")
    b.add_argument("--topology", required=True, help="topology YAML (experiments/topologies/*.yaml)")
    b.add_argument("--out", required=True, help="artifact directory to create")
    _objective(b)
    b.add_argument("--split-after", help="explicit plan: comma-separated last blocks of every partition but the "
                   "last (block names or 1-based indices; see `plan`)")
    b.add_argument("--end", help="explicit plan: last block of the last partition (default: the backbone's output; "
                   "an earlier block trims the model)")
    b.add_argument("--placement", help="explicit plan: comma-separated tiers, one per partition")
    b.add_argument("--threshold", type=float, help="explicit plan: exit threshold")
    b.add_argument("--head", action="append", default=[], metavar="POINT=SPEC",
                   help="your own exit network at POINT: a HeadSpec as JSON or package.module:function "
                   "(called as function(in_shape, num_classes)); repeatable")
    b.add_argument("--granularity", default="auto", help="exit-point discovery: auto, a module depth, or node")
    b.add_argument("--epochs", type=int, default=20, help="head training epochs")
    b.add_argument("--cache-dir", help="recording / head / profile cache (default ~/.cache/autoexit)")
    b.add_argument("--evaluator-url", help="profile on a device running `autoexit evaluator serve`")
    b.add_argument("--token-file", help="token file of that device")
    b.add_argument("--no-measure", action="store_true", help="do not time the partitions for the manifest")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_build)

    s = ss.add_parser("serve", help="serve one partition of an artifact on a port (one process per partition)")
    s.add_argument("--artifact", required=True)
    s.add_argument("--part", type=int, required=True, help="partition index (0-based)")
    s.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one, printed)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    s.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    s.add_argument("--optimize", nargs="?", const="onednn", choices=["onednn", "freeze"], default=None,
                   metavar="MODE",
                   help="run the partition frozen and optimised for this machine: batch norms folded, and with "
                   "MODE onednn (the default) oneDNN convolutions; the same answers up to float rounding")
    s.set_defaults(func=_serve)

    r = ss.add_parser("run", help="run inputs through the partitions in separate processes and report",
                      description="Start one server per partition (or use --addresses), send every input to "
                      "partition 0, collect the results at this process (the destination), compare them with "
                      "the unpartitioned model.pt and with the estimates.")
    r.add_argument("--artifact", required=True)
    r.add_argument("--data", required=True, help="'digits', an image folder, a .pt file or IDX images")
    r.add_argument("--labels", help="IDX labels file")
    r.add_argument("--size", type=int, nargs="+")
    r.add_argument("--mean", type=float, nargs=3)
    r.add_argument("--std", type=float, nargs=3)
    r.add_argument("--limit", type=int, help="use only the first N samples")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--shape", type=float, default=0.0, help="link shaping: 0 off (default), 1 = the topology's "
                   "links in real time, 0.1 = ten times faster")
    r.add_argument("--addresses", help="comma-separated host:port of running servers, in partition order")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--optimize", nargs="?", const="onednn", choices=["onednn", "freeze"], default=None,
                   metavar="MODE", help="the servers this starts run their partitions optimised (as `serve "
                   "--optimize MODE`)")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a batch's results")
    r.add_argument("--json", help="also write the report as JSON here")
    r.set_defaults(func=_run)


# --------------------------------------------------------------------------- helpers


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _load_data(args):
    from .data import as_inference_data, load_digits, load_idx, load_image_folder
    from .errors import AutoExitError

    if args.data is None:
        raise AutoExitError("give --data (or --digits)")
    if args.data == "digits":
        return load_digits("inference", shifts=True)
    d = Path(args.data)
    if d.is_dir():
        return load_image_folder(d, size=args.size, mean=args.mean, std=args.std, limit=args.limit)
    if getattr(args, "labels", None) or "idx" in d.name:
        return load_idx(d, getattr(args, "labels", None), limit=args.limit)
    return as_inference_data(args.data)


def _tensors(data, limit: int | None):
    import torch
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for item in DataLoader(data.dataset, batch_size=512):
        x = item[0] if isinstance(item, (list, tuple)) else item
        xs.append(x)
        if isinstance(item, (list, tuple)) and len(item) > 1:
            ys.append(item[1])
        if limit is not None and sum(len(t) for t in xs) >= limit:
            break
    x = torch.cat(xs)[:limit] if limit else torch.cat(xs)
    y = torch.cat(ys)[: len(x)] if ys else (data.labels[: len(x)] if data.labels is not None else None)
    return x, y


def _topology(path: str | None, destination: str | None, fallback: dict | None = None):
    from .errors import AutoExitError
    from .perfmodel import Topology

    if path:
        topo = Topology.from_yaml(path)
    elif fallback:
        topo = Topology.from_dict(fallback)
    else:
        raise AutoExitError("give --topology (a topology YAML such as experiments/topologies/iiot.yaml)")
    return topo.with_destination(destination) if destination else topo


def _solve(profile, topo, args):
    from .partition import choose_plan

    return choose_plan(profile, topo, min_accuracy=args.min_accuracy,
                       max_latency_s=None if args.max_latency_ms is None else args.max_latency_ms / 1000.0,
                       n_partitions=args.partitions, max_partitions=args.max_partitions,
                       criteria=(args.criterion,) if args.criterion else None, allow_trim=not args.no_trim,
                       allow_nonconsecutive=not args.consecutive)


def _print_estimate(plan, est, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("plan", plan.describe())
    if est is not None:
        t.add_row("estimated accuracy", _pct(est.accuracy))
        t.add_row("estimated latency", f"{1000 * est.latency_s:.2f} ms (compute {1000 * est.computation_s:.2f}, "
                  f"propagation {1000 * est.propagation_s:.2f}, transmission {1000 * est.transmission_s:.2f})")
        t.add_row("exit rates per partition", ", ".join(_pct(r) for r in est.exit_rates))
        if est.cost:
            t.add_row("cost per sample", f"{est.cost:.3g}")
    Console(width=160).print(t)


# --------------------------------------------------------------------------- handlers


def _plan(args: argparse.Namespace) -> int:
    from . import perfmodel as pm
    from .errors import AutoExitError

    fallback = None
    if args.artifact:
        from .partition import load_partitioned

        art, info = load_partitioned(args.artifact)
        profile = pm.Profile.from_json(Path(args.artifact) / "profile.json")
        fallback = info["topology"]
    else:
        profile = pm.Profile.from_json(args.profile)
    if args.min_accuracy is None and args.max_latency_ms is None:
        raise AutoExitError("give --min-accuracy (P_lat) or --max-latency-ms (P_acc)")
    topo = _topology(args.topology, args.destination, fallback)
    plan, sol = _solve(profile, topo, args)
    est = pm.estimate(profile, topo, sol.configuration)
    _print_estimate(plan, est, f"autoexit partition plan on {topo.name or 'topology'} "
                    f"(destination {topo.names[topo.destination - 1]})")
    print(f"configuration: {sol.configuration.describe(topo)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan.to_dict(), "configuration": sol.configuration.to_dict(),
                                               "accuracy": sol.accuracy, "latency_s": sol.latency_s,
                                               "cost": sol.cost}, indent=1))
    return 0


def _build(args: argparse.Namespace) -> int:
    import torch

    from .data import default_cache_dir
    from .distill import TrainConfig
    from .errors import AutoExitError
    from .partition import Components, custom_heads, emit_partitioned, make_plan, profile_result
    from .pipeline import EnableConfig, prepare
    from .search.pipeline import train_heads_cached

    torch.set_num_threads(2)
    progress = not args.quiet
    topo = _topology(args.topology, args.destination)
    explicit = args.split_after is not None or args.placement is not None or args.threshold is not None
    if explicit and (args.min_accuracy is not None or args.max_latency_ms is not None):
        raise AutoExitError("give either an explicit plan (--split-after/--placement/--threshold) or an objective "
                            "(--min-accuracy/--max-latency-ms), not both")
    if not explicit and args.min_accuracy is None and args.max_latency_ms is None:
        raise AutoExitError("give an objective (--min-accuracy or --max-latency-ms) or an explicit plan "
                            "(--placement, --split-after, --threshold)")
    if args.digits:
        from .data import load_digits
        from .zoo import trained_digits_cnn

        model = trained_digits_cnn(width=16, epochs=12, seed=0, augment_shift=0, progress=progress)
        data = load_digits("inference", shifts=True)
    else:
        from .zoo import load_backbone

        data = _load_data(args)
        model = load_backbone(args.model, args.weights, data.example())
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    gran = args.granularity if args.granularity in ("auto", "node") else int(args.granularity)
    tb, points, rec = prepare(model, data, EnableConfig(granularity=gran, cache_dir=args.cache_dir), progress=progress)
    train = TrainConfig(epochs=args.epochs)
    heads = train_heads_cached(rec, {}, train, cache_dir=cache / "heads", progress=progress)
    comp = Components(tb, rec, heads)
    if args.head:
        specs = {}
        for item in args.head:
            point, sep, spec = item.partition("=")
            if not sep or not point or not spec:
                raise AutoExitError(f"--head must be POINT=SPEC (a HeadSpec JSON or module:function), got {item!r}")
            if spec.lstrip().startswith("{"):
                try:
                    specs[point] = json.loads(spec)
                except json.JSONDecodeError as exc:
                    raise AutoExitError(f"--head {point}: the HeadSpec is not valid JSON ({exc.msg})") from None
            else:
                specs[point] = spec
        comp = Components(tb, rec, {**heads, **custom_heads(comp, specs, train=train, progress=progress)})
    evaluator = None
    if args.evaluator_url:
        from .evaluator import RemoteEvaluator

        evaluator = RemoteEvaluator(args.evaluator_url, token_file=args.token_file)
    profile = profile_result(comp, evaluator=evaluator, cache_dir=cache, progress=progress)
    if explicit:
        if not args.placement:
            raise AutoExitError("an explicit plan needs --placement (one tier per partition)")
        cuts = [c.strip() for c in (args.split_after or "").split(",") if c.strip()]
        cuts = [int(c) if c.isdigit() else c for c in cuts]
        end = args.end if args.end is not None else profile.n_blocks
        end = int(end) if isinstance(end, str) and end.isdigit() else end
        plan = make_plan(profile, partitions=[*cuts, end], placement=[t.strip() for t in args.placement.split(",")],
                         threshold=0.9 if args.threshold is None else args.threshold,
                         criterion=args.criterion or "confidence", topology=topo)
    else:
        plan, _ = _solve(profile, topo, args)
    out = emit_partitioned(comp, plan, args.out, profile=profile, overwrite=args.overwrite,
                           measure=not args.no_measure, evaluator=evaluator, progress=progress)
    from .partition import load_partitioned

    _, info = load_partitioned(out)
    _report_artifact(out, info)
    return 0


def _report_artifact(out: Path, info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"partitioned artifact {out}: {info['describe']}", title_justify="left")
    for col in ("part", "tier", "blocks", "exits", "input", "sends on", "est. exit rate", "test exit rate"):
        t.add_column(col)
    est = (info.get("estimated") or {}).get("partition_rates") or [None] * len(info["partitions"])
    meas = ((info.get("measured") or {}).get("test") or {}).get("partition_rates") or [None] * len(info["partitions"])
    for p, e, m in zip(info["partitions"], est, meas):
        t.add_row(str(p["index"]), p["tier"], f"{p['blocks'][0]}..{p['blocks'][1]}",
                  ", ".join(x["name"] for x in p["exits"]), f"{p['input']['shape']} ({p['input']['bytes_per_sample']} B)",
                  "-" if p["output"] is None else f"{p['output']['shape']} ({p['output']['bytes_per_sample']} B)",
                  _pct(e), _pct(m))
    Console(width=200).print(t)
    e = info.get("estimated") or {}
    m = (info.get("measured") or {}).get("test") or {}
    if e:
        print(f"estimated: accuracy {_pct(e['accuracy'])}, latency {1000 * e['latency_s']:.2f} ms on "
              f"{info['topology']['name']} (destination {info['destination']})")
    if m:
        print(f"measured on the test split ({m['n']} samples): accuracy {_pct(m.get('accuracy'))}, agreement with "
              f"the backbone {_pct(m['agreement'])}, same results as model.pt on {_pct(m.get('agrees_with_model_pt'))}")


def _serve(args: argparse.Namespace) -> int:
    import signal

    from .partition_runtime import PartitionServer

    server = PartitionServer(args.artifact, args.part, host=args.host, port=args.port, threads=args.threads,
                             optimize=args.optimize or False)

    def _stop(*_):
        server._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    print(f"autoexit partition {args.part} (tier {server.spec['tier']}, blocks {server.spec['blocks'][0]}.."
          f"{server.spec['blocks'][1]}): listening on {server.address}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print(f"autoexit partition {args.part}: stopped after {server.handled} samples", file=sys.stderr, flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import perfmodel as pm
    from .partition import load_partitioned
    from .partition_runtime import run_partitioned

    art, info = load_partitioned(args.artifact)
    data = _load_data(args)
    x, y = _tensors(data, args.limit)
    addrs = [a.strip() for a in args.addresses.split(",")] if args.addresses else None
    run = run_partitioned(args.artifact, x, addresses=addrs, batch_size=args.batch_size, shaping=args.shape,
                          threads=args.threads, timeout_s=args.timeout, progress=True, optimize=args.optimize or False)
    with torch.no_grad():
        outs = [art.model(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    ref_logits = torch.cat([o[0] for o in outs])
    ref_exit = torch.cat([o[1] for o in outs])
    same = (ref_exit == run.exit_index) & (ref_logits.argmax(1) == run.logits.argmax(1))
    n_parts = len(info["partitions"])
    rates = run.partition_rates(n_parts)
    est = info.get("estimated") or {}
    # what this machine should take: every tier computes at the profiled speed, links scaled by --shape
    profile = pm.Profile.from_json(Path(args.artifact) / "profile.json")
    topo = pm.Topology.from_dict(info["topology"])
    local = pm.Topology(tuple(pm.Tier(t.name, ratio=1.0) for t in topo.tiers),
                        tuple(pm.Link(ln.bandwidth_bps / max(args.shape, 1e-12), ln.latency_s * args.shape)
                              for ln in topo.links) if args.shape > 0 else
                        tuple(pm.Link(1e15, 0.0) for _ in topo.links),
                        destination=topo.destination, source=topo.source, name="this machine")
    plan_d = info["plan"]
    emul = pm.estimate_plan_rates(profile, local, partitions=plan_d["partitions"], exits=plan_d["exits"],
                                  placement=plan_d["placement"], exit_rates=run.exit_rates(info["num_exits"]))
    report = {
        "artifact": str(args.artifact), "samples": run.n, "batch_size": run.batch_size, "shaping": run.shaping,
        "addresses": run.addresses, "spawned": run.spawned, "wall_s": run.wall_s,
        "latency_ms": {"mean": 1000 * float(run.latency_s.mean()), "median": 1000 * float(np.median(run.latency_s)),
                       "p99": 1000 * float(np.percentile(run.latency_s, 99))},
        "expected_latency_ms_this_machine": 1000 * emul.latency_s,
        "estimated_latency_ms_topology": None if not est else 1000 * est["latency_s"],
        "partition_rates": rates, "estimated_partition_rates": est.get("partition_rates"),
        "same_as_model_pt": float(same.float().mean()), "mismatches": int((~same).sum()),
    }
    if y is not None:
        report["accuracy"] = float((run.logits.argmax(1) == y).float().mean())
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"autoexit partition run: {info['describe']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("samples", f"{run.n} in batches of {run.batch_size}, {n_parts} processes "
              f"({'started here' if run.spawned else 'given'}: {', '.join(run.addresses)})")
    t.add_row("same result as model.pt", f"{run.n - report['mismatches']} / {run.n}")
    if "accuracy" in report:
        t.add_row("accuracy", _pct(report["accuracy"]))
    t.add_row("exit rate per partition", ", ".join(f"{p['tier']}: {_pct(r)}" for p, r in zip(info["partitions"], rates))
              + (f" (estimated {', '.join(_pct(r) for r in est['partition_rates'])})" if est else ""))
    lm = report["latency_ms"]
    t.add_row("latency per sample", f"mean {lm['mean']:.2f} ms, median {lm['median']:.2f}, p99 {lm['p99']:.2f} "
              f"(link shaping x{args.shape:g})")
    t.add_row("expected on this machine", f"{report['expected_latency_ms_this_machine']:.2f} ms (profiled compute, "
              f"links x{args.shape:g}, measured exit rates)")
    if est:
        t.add_row(f"estimated on {info['topology']['name']}", f"{report['estimated_latency_ms_topology']:.2f} ms "
                  "(tiers' compute ratios, real links)")
    t.add_row("wall time", f"{run.wall_s:.2f} s")
    Console(width=180).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["mismatches"] == 0 else 1
