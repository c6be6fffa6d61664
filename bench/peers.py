"""autoexit against a real peer (earlyon), three classic baselines and the oracle, on four workloads.

Workloads (each: one backbone, its inference data split 50/20/30 train/val/test by
``autoexit.data.split_indices``, exit candidates after every block: ``granularity=2``):

- ``resnet20`` / ``resnet56``: the pre-trained CIFAR-10 ResNets of ``../shared/fixtures`` on the
  CIFAR-10 JPEG test set (10,000 images; skipped with a message when the fixtures are absent);
- ``fmnist_resnet`` / ``fmnist_mobilenetv2``: backbones trained by ``bench/train_backbones.py``
  (trained on first use) on the Fashion-MNIST test set (10,000 images).

Methods, all in one process on the same recording and split:

- ``autoexit[<policy>]``: default heads trained label-free (KL to the backbone), the exit policy by
  name: the repository's default (``EnableConfig().policy``: guaranteed budget on the disagreement
  with the backbone, label-free), ``paper003`` (T/2^n + K(S), no guarantee) and the default with
  ``risk=drop`` (``NAME:RISK``: the guarantee bounds the labelled accuracy drop, like for like with
  the label-supervised methods). When ``EnableConfig`` has no policy field (before issue 8), the
  core pipeline's fixed rule (``core``). ``--policies NAME[:RISK] ...`` picks others.
- ``autoexit heads + sdn rule``: SDN's rule (one shared confidence threshold chosen on val for the
  labelled drop, no guarantee) on autoexit's heads: tells the heads' share of a gap from the rule's.
- ``earlyon`` (PyPI, MIT, ``bench/earlyon_runner.py``): its own heads, label-supervised with the backbone
  frozen, its own calibration at the budget (``earlyon+T``: with its per-head temperature scaling fitted
  on val); tested through its batch-1 router, and through its batched routing at batch 32.
- ``branchynet`` / ``sdn`` / ``spinn`` (``autoexit.baselines``): homogeneous label-supervised heads at
  fixed / every / equal-FLOPs positions, thresholds chosen on val for the budget (accuracy drop).
- the oracle with each method's own heads (every sample leaves at the first head that agrees with the
  backbone: zero accuracy change), and each method's saving as a share of it.

Reported on the test split: GT accuracy and drop, exit shares, expected true FLOPs per sample (heads
included, ``autoexit.cost.count_flops`` for every tool) and saving, and (last, noisy on a shared machine:
``os.getloadavg()`` is recorded) CPU latency per sample at batch 1 and 32 as a ratio to the backbone,
side by side in one ``autoexit.cost.compare_latency`` call per batch size and budget.

Usage: ``python bench/peers.py [--workloads resnet20 resnet56 fmnist_resnet fmnist_mobilenetv2]
[--tolerances 1 2] [--policies gate paper003] [--no-earlyon] [--no-baselines] [--no-latency]``.
Recordings, heads (autoexit, baselines, earlyon) and Fashion-MNIST backbones are cached under
``~/.cache/autoexit``; a first run trains everything (see docs/benchmarks.md for times).
Results: ``bench/results/peers.json`` (one entry per workload; a run updates the workloads it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment, print_table, write_results  # noqa: E402

WORKLOADS = ("resnet20", "resnet56", "fmnist_resnet", "fmnist_mobilenetv2")
BASELINE_NAMES = ("branchynet", "sdn", "spinn")

# paper 003, table 3 (early exits enabled label-free, ~2 % budget; other backbones, data and training)
PAPER003_TABLE3 = [
    {"dataset": "CIFAR-10", "model": "ResNet-18", "MFLOPs": 765, "early-exit MFLOPs": 414, "saving %": 45.88, "drop pts": 2.51},
    {"dataset": "CIFAR-10", "model": "ResNet-50", "MFLOPs": 1303, "early-exit MFLOPs": 601, "saving %": 53.87, "drop pts": 2.32},
    {"dataset": "CIFAR-100", "model": "ResNet-18", "MFLOPs": 766, "early-exit MFLOPs": 374, "saving %": 51.17, "drop pts": 1.91},
    {"dataset": "CIFAR-100", "model": "ResNet-50", "MFLOPs": 1304, "early-exit MFLOPs": 547, "saving %": 58.05, "drop pts": 2.46},
    {"dataset": "ImageNet", "model": "ResNet-18", "MFLOPs": 2343, "early-exit MFLOPs": 1673, "saving %": 28.6, "drop pts": 2.35},
    {"dataset": "ImageNet", "model": "ResNet-50", "MFLOPs": 2783, "early-exit MFLOPs": 2020, "saving %": 27.4, "drop pts": 2.68},
]

CANNOT = {
    "autoexit": [
        "label-free by design: the default policy bounds disagreement with the backbone, an upper bound of the "
        "accuracy drop, so it leaves labelled calibration savings on the table (risk='drop' needs labels)",
        "exit points must be single-activation cuts of the traced graph (no point inside a residual block)",
    ],
    "earlyon": [
        "no label-free mode: heads and calibration need labels",
        "exits only at submodule outputs (forward hooks): no exit after a functional op such as a top-level F.relu",
        "per-sample exits only at batch 1; batched routing exits a batch only when every sample is confident",
        "no exit-placement or head-architecture search; one head design (GAP > FC128 > FC)",
        "no TorchScript export (the router raises an exception inside hooks); ONNX export computes every exit",
        "its FLOPs estimate (fvcore MACs) leaves out the heads; a fixed confidence grid 0.99 ... 0.5",
    ],
    "branchynet": ["fixed positions and one head design; labels for training and thresholds"],
    "sdn": ["one shared threshold for every exit; labels for training and thresholds"],
    "spinn": ["fixed equal-FLOPs positions and one head design; labels for training and thresholds"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- workloads
def load_workload(name: str):
    """(backbone, inference data, description) or None with a printed reason when its data are absent."""
    if name in ("resnet20", "resnet56"):
        from bench.common import cifar10_data, cifar_resnet, fixtures_available, fixtures_dir

        if not fixtures_available():
            print(f"skipping {name}: the CIFAR-10 fixtures are not at {fixtures_dir()} (set AUTOEXIT_FIXTURES)")
            return None
        return cifar_resnet(int(name[6:])), cifar10_data(), "CIFAR-10 JPEG test set (10,000), pre-trained fixture"
    if name in ("fmnist_resnet", "fmnist_mobilenetv2"):
        from bench.train_backbones import FMNIST_DIR, fmnist, fmnist_available, load_backbone

        if not fmnist_available():
            print(f"skipping {name}: Fashion-MNIST is not at {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")
            return None
        return load_backbone(name), fmnist("test"), "Fashion-MNIST test set (10,000), backbone from bench/train_backbones.py"
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def autoexit_policies(requested: list[str] | None) -> list[str]:
    """Policies to run: the requested ones, else the repository default and paper003 ("core" before issue 8)."""
    from autoexit.pipeline import EnableConfig

    if "policy" not in {f.name for f in fields(EnableConfig)}:
        return ["core"]
    if requested:
        return list(dict.fromkeys(requested))
    default = EnableConfig().policy
    return list(dict.fromkeys([default, "paper003", f"{default}:drop"]))


def _policy_risk(policy: str) -> tuple[str, str | None]:
    """``name`` or ``name:risk`` (e.g. ``max_softmax:drop``: the guarantee bounds the labelled accuracy drop)."""
    name, _, risk = policy.partition(":")
    return name, (risk or None)


def _policy_label(policy: str) -> tuple[str, str]:
    """(method label, whether labels are used)."""
    name, risk = _policy_risk(policy)
    if risk is None or risk == "disagreement":
        return f"autoexit[{name}]", "no"
    return f"autoexit[{name}, risk={risk}]", "yes"


def _enable_config(tol: float, policy: str):
    from autoexit.pipeline import EnableConfig

    if policy == "core":
        return EnableConfig(tolerance=tol, granularity=2)
    name, risk = _policy_risk(policy)
    return EnableConfig(tolerance=tol, granularity=2, policy=name, **({"risk": risk} if risk else {}))


def _shares(names, rates, min_share: float = 0.005) -> str:
    parts = [f"{n}:{100 * r:.0f}" for n, r in zip(names, rates) if r >= min_share]
    return " ".join(parts)


def _row(workload, method, labels, tol, m, exits_used, exits_placed) -> dict:
    share = m["saving"] / m["oracle_saving"] if m.get("oracle_saving") else None
    return {
        "workload": workload, "method": method, "labels": labels, "budget %": tol,
        "exits": f"{exits_used}/{exits_placed}",
        "acc %": 100 * m["accuracy"] if m.get("accuracy") is not None else None,
        "drop pts": 100 * m["accuracy_drop"] if m.get("accuracy_drop") is not None else None,
        "MFLOPs": m["expected_flops"] / 1e6, "saving %": 100 * m["saving"],
        "oracle %": 100 * m["oracle_saving"], "of oracle": share,
        "exit shares %": _shares(m["exit_names"], m["exit_rates"]),
    }


# ---------------------------------------------------------------------------------------------- one workload
def run_workload(name: str, args) -> dict | None:
    import torch

    from autoexit.baselines import BASELINES, fit_baseline, train_baseline_heads
    from autoexit.cost import compare_latency
    from autoexit.data import default_cache_dir
    from autoexit.distill import TrainConfig
    from autoexit.model import scripted_backbone, to_torchscript
    from autoexit.pipeline import EnableConfig, assemble, prepare
    from autoexit.search.pipeline import train_heads_cached

    loaded = load_workload(name)
    if loaded is None:
        return None
    backbone, data, data_desc = loaded
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"{name}: tracing and recording (cached after the first run)")
    tb, points, rec = prepare(backbone, data, EnableConfig(granularity=2), progress=False)
    timings["record_s"] = time.perf_counter() - t0
    base = float(tb.total_flops)
    head_cache = default_cache_dir() / "heads"
    t0 = time.perf_counter()
    log(f"{name}: autoexit heads at {len(points)} points (cached)")
    heads = train_heads_cached(rec, {}, TrainConfig(), cache_dir=head_cache, progress=False)
    timings["autoexit_heads_s"] = time.perf_counter() - t0
    rows: list[dict] = []
    details: dict = {"points": [p.name for p in points], "base_flops": base, "data": data_desc,
                     "backbone": type(backbone).__name__, "methods": {}, "errors": {}}
    deploy: dict[float, dict[str, object]] = {tol: {} for tol in args.tolerances}  # tol -> label -> model

    # ---- autoexit
    for policy in autoexit_policies(args.policies):
        label, uses_labels = _policy_label(policy)
        for tol in args.tolerances:
            t0 = time.perf_counter()
            try:
                res = assemble(_enable_config(tol, policy), tb, points, rec, heads)
            except Exception as exc:  # noqa: BLE001 - a policy in progress elsewhere must not sink the run
                details["errors"][f"{label}@{tol}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log(f"{name}: {label} at {tol} % failed: {details['errors'][f'{label}@{tol}']}")
                traceback.print_exc()
                continue
            m = dict(res.metrics["test"])
            m["exit_names"] = [*res.kept, "backbone"]
            rows.append(_row(name, label, uses_labels, tol, m, len(res.kept), len(points)))
            details["methods"][f"{label}@{tol}"] = {
                "kept": res.kept, "thresholds": [float(x) for x in res.subset.thresholds.thresholds],
                "test": {k: v for k, v in m.items() if k not in ("exit_index", "per_exit")},
                "val": {k: v for k, v in res.metrics["val"].items() if k not in ("exit_index", "per_exit")},
                "policy": res.extra.get("policy"), "seconds": time.perf_counter() - t0,
            }
            deploy[tol][label] = res.model
    details["autoexit_head_flops"] = {n: h.flops for n, h in heads.items()}

    # ---- baselines
    if not args.no_baselines:
        def trainer(r, specs, cfg, names):
            return train_heads_cached(r, specs, cfg, cache_dir=head_cache, points=names, progress=False)

        for b in args.baselines:
            t0 = time.perf_counter()
            log(f"{name}: {b} heads (label-supervised, cached)")
            bheads = train_baseline_heads(rec, b, TrainConfig(), trainer=trainer)
            timings[f"{b}_heads_s"] = time.perf_counter() - t0
            for tol in args.tolerances:
                r = fit_baseline(b, tb, rec, bheads, tol, risk="drop")
                rows.append(_row(name, b, "yes", tol, r.metrics["test"], len(r.kept), len(r.points)))
                details["methods"][f"{b}@{tol}"] = r.to_dict()
                deploy[tol][b] = r.model
            details.setdefault("baselines", {})[b] = BASELINES[b].description
        if "sdn" in args.baselines:  # which matters, the heads or the rule? SDN's rule on autoexit's heads
            for tol in args.tolerances:
                r = fit_baseline("sdn", tb, rec, heads, tol, risk="drop")
                rows.append(_row(name, "autoexit heads + sdn rule", "yes", tol, r.metrics["test"], len(r.kept),
                                 len(r.points)))
                details["methods"][f"autoexit heads + sdn rule@{tol}"] = r.to_dict()

    # ---- earlyon
    eo = None
    if not args.no_earlyon:
        from bench.earlyon_runner import EarlyonRun, earlyon_available, earlyon_version

        if not earlyon_available():
            print("skipping earlyon: it is not installed (pip install 'autoexit[bench]' or earlyon==0.3.0)")
            details["earlyon"] = "not installed"
        else:
            t0 = time.perf_counter()
            log(f"{name}: earlyon heads (its stage-2 training, {args.earlyon_epochs} epochs; cached)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eo = EarlyonRun(backbone, rec, points, epochs=args.earlyon_epochs, log=log)
            timings["earlyon_heads_s"] = time.perf_counter() - t0
            details["earlyon"] = {"version": earlyon_version(), "exits": eo.names, "refused_points": eo.refused,
                                  "head_flops": eo.head_flops, "head_train_s": eo.head_train_s,
                                  "heads_from_cache": eo.cached, "own_flops_estimate": eo.own_estimate,
                                  "train": eo.train_cfg}
            for variant, temp in (("earlyon", False), ("earlyon+T", True)):
                for tol in args.tolerances:
                    t0 = time.perf_counter()
                    cal = eo.calibrate(tol / 100.0, temperature=temp)
                    preds, exits = eo.route_bs1()
                    m = eo.metrics(preds, exits, base)
                    sim_acc, sim_dist = eo.simulated()
                    used = sum(cal["enabled"])
                    rows.append(_row(name, variant, "yes", tol, m, used, len(eo.names)))
                    entry = {"calibration": cal, "test_bs1": m, "simulate_policy_accuracy": sim_acc,
                             "router_matches_simulation": abs(sim_acc - m["accuracy"]) < 1e-9}
                    bp, bx = eo.route_batched(32)
                    mb = eo.metrics(bp, bx, base)
                    entry["test_batched32"] = mb
                    rows.append(_row(name, f"{variant} (batched 32)", "yes", tol, mb, used, len(eo.names)))
                    entry["seconds"] = time.perf_counter() - t0
                    details["methods"][f"{variant}@{tol}"] = entry

    # ---- latency, last
    if not args.no_latency:
        inputs = rec.inputs("test")
        details["latency"] = {}
        # the backbone in the runtime the early-exit models use (TorchScript), so ratios compare models;
        # the eager backbone is timed beside it for reference (earlyon runs eagerly, as it ships)
        sb = scripted_backbone(tb)
        for tol in args.tolerances:
            fns1 = {"backbone": sb, "backbone (eager)": backbone}
            fns32 = dict(fns1)
            for label, model in deploy[tol].items():
                try:
                    scripted = to_torchscript(model, tb.example_input)
                except Exception as exc:  # noqa: BLE001
                    details["errors"][f"torchscript {label}@{tol}"] = str(exc).splitlines()[0]
                    scripted = model
                fns1[label] = fns32[label] = scripted
            if eo is not None:
                eo.calibrate(tol / 100.0, temperature=False)
                fns1["earlyon"] = eo.bs1_callable()
                fns32["earlyon"] = eo.batched_callable()
            load_before = os.getloadavg()
            log(f"{name}: latency at {tol} % ({len(fns1)} models, load {load_before[0]:.1f})")
            with torch.no_grad():
                lat1 = compare_latency(fns1, inputs, (1,), rounds=args.rounds)
                lat32 = compare_latency(fns32, inputs, (32,), rounds=args.rounds)
            entry = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(), "ms_per_sample": {},
                     "ratio": {}}
            for lat, b in ((lat1, 1), (lat32, 32)):
                bb = lat["backbone"][b].median_ms
                for label, stats in lat.items():
                    entry["ms_per_sample"].setdefault(label, {})[str(b)] = stats[b].median_ms
                    entry["ratio"].setdefault(label, {})[str(b)] = stats[b].median_ms / bb
            details["latency"][str(tol)] = entry
            for r in rows:
                if r["budget %"] != tol:
                    continue
                key = "earlyon" if r["method"].startswith("earlyon") and "+T" not in r["method"] else r["method"]
                if key in entry["ratio"]:
                    r["bs1 ratio"] = entry["ratio"][key]["1"]
                    r["bs32 ratio"] = entry["ratio"][key]["32"]
    details["timings"] = timings
    details["cannot"] = CANNOT
    return {"rows": rows, "details": details, "environment": environment(), "loadavg_end": os.getloadavg()}


COLUMNS = ["workload", "method", "labels", "budget %", "exits", "acc %", "drop pts", "MFLOPs", "saving %",
           "oracle %", "of oracle", "bs1 ratio", "bs32 ratio", "exit shares %"]


def headline(results: dict) -> list[str]:
    """One line per CIFAR ResNet: autoexit's saving and latency cut at <= 1 % drop vs earlyon and the oracle."""
    lines = []
    for wl in ("resnet20", "resnet56"):
        r = results.get(wl)
        if not r:
            continue
        rows = [x for x in r["rows"] if x["budget %"] == 1.0]
        ae = [x for x in rows if x["method"].startswith("autoexit")]
        eo = next((x for x in rows if x["method"] == "earlyon"), None)
        for a in ae:
            s = (f"{wl}: {a['method']} saves {a['saving %']:.1f} % FLOPs at {a['drop pts']:.2f} pts drop "
                 f"({100 * (a['of oracle'] or 0):.0f} % of its oracle {a['oracle %']:.1f} %)")
            if a.get("bs1 ratio") is not None:
                s += f", CPU latency x{a['bs1 ratio']:.2f} (bs1) / x{a['bs32 ratio']:.2f} (bs32)"
            if eo:
                s += (f"; earlyon {eo['saving %']:.1f} % at {eo['drop pts']:.2f} pts "
                      f"({100 * (eo['of oracle'] or 0):.0f} % of its oracle {eo['oracle %']:.1f} %)")
                if eo.get("bs1 ratio") is not None:
                    s += f", x{eo['bs1 ratio']:.2f} / x{eo['bs32 ratio']:.2f}"
            lines.append(s)
    return lines


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--policies", nargs="+", default=None,
                    help="autoexit exit policies (default: the repository default and paper003)")
    ap.add_argument("--baselines", nargs="+", default=list(BASELINE_NAMES), choices=BASELINE_NAMES)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-earlyon", action="store_true")
    ap.add_argument("--earlyon-epochs", type=int, default=20, help="earlyon stage-2 epochs (its default: 20)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and latency timing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    path = RESULTS / "peers.json"
    previous = json.loads(path.read_text()).get("workloads", {}) if path.is_file() else {}
    t_all = time.perf_counter()
    for wl in args.workloads:
        t0 = time.perf_counter()
        out = run_workload(wl, args)
        if out is None:
            continue
        out["seconds"] = time.perf_counter() - t0
        out["command"] = "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        previous[wl] = out
        print_table(out["rows"], f"{wl}: test split (30 % of 10,000 samples), budgets {args.tolerances} %", COLUMNS)
        write_results("peers", {"workloads": previous, "paper003_table3": PAPER003_TABLE3})
        log(f"{wl}: done in {out['seconds'] / 60:.1f} min")
    print_table(PAPER003_TABLE3, "external anchor: paper 003, table 3 (other backbones, data and training)")
    for line in headline(previous):
        print(line)
    log(f"all done in {(time.perf_counter() - t_all) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
