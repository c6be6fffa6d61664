"""NNI-searched exit heads vs the default head on the CIFAR-10 fixtures (issue 3; paper 003, appendix D).

Setup: akamaster ResNet-20 / ResNet-56 on the CIFAR-10 JPEG test set (10,000 images), an exit
point after every residual block (``EnableConfig(granularity=2)``: 9 / 27 points), split
50/20/30 (train / val / test, seed 0), label-free throughout.

Per exit point an NNI experiment samples ``--trials`` heads from ``search_spaces/heads_default.yaml``
(``--strategy``, default random) and scores each by ``val agreement - cost_weight * head FLOPs /
FLOPs of the backbone after the point``; heads costing more than a quarter of that fail untrained.
The default head (``autoexit.heads.default_head_spec``: separable 3x3 conv > BN > ReLU > GAP > FC128
> FC) is scored by the very same objective at every point. Budget (2 shared cores, about 30
minutes for both networks): NNI's ``sequential`` engine (trials in-process, no web UI), and a
short training schedule for every head, searched or default alike (``--epochs`` 3 epochs on
``--samples`` 1,500 of the 5,000 train samples) - so absolute agreements are below those of the
core's 40-epoch heads; the comparison is like for like.

End to end: the core pipeline (``pipeline.assemble``) on the default heads and on the searched
heads, first as the search trained them, then (unless ``--no-full-schedule``) with both the
winning architectures and the default ones retrained by the core's own schedule (``TrainConfig()``
on every train sample, cached under ``~/.cache/autoexit/heads``), which is how an exported winner
is used (points where no head beat chance are discarded) at 1 % tolerance, with the default exit
policy (``max_softmax``, guaranteed budget) and with paper 003's rule (``paper003``: T/2^n +
K(S)); expected FLOPs and accuracy drop on the held-out test split. Paper 003 (appendix D,
table 10) reports that NAS heads cut the FLOPs of the early-exit model by about 16 % on average
at about equal accuracy; the last table says whether autoexit reproduces that.

Run: ``python bench/nni_heads.py`` (``--depths 20``, ``--trials 8``, ``--epochs 4``, ``--samples 2500``,
``--strategy evolution``; ``--full-points layer3.`` retrains with the core schedule only the last
stage's points and compares end to end on them; ``--merge`` keeps other depths' results in the JSON).
Searches are cached (``~/.cache/autoexit/bench-nni-heads``): a second run only re-assembles.
Results: ``bench/results/nni_heads.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS,
    cifar10_data,
    cifar_resnet,
    print_table,
    require_fixtures,
    write_results,
)

POLICIES = ("max_softmax", "paper003")
PAPER_FLOPS_CUT = 0.16


def _cache_root() -> Path:
    from autoexit.data import default_cache_dir

    return default_cache_dir() / "bench-nni-heads"


def default_heads(rec, tb, points, cfg, workdir: Path) -> dict:
    """The default head at every point, trained and scored by the search's own trial objective."""
    import torch

    from autoexit.cost import count_params, param_bytes
    from autoexit.distill import TrainedHead
    from autoexit.heads import HeadSpec, build_head, default_head_spec
    from autoexit.search.head_space import TrialStore, chance_agreement, run_trial, trial_context

    chance = chance_agreement(rec)
    out = {}
    for p in points:
        store_dir = workdir / "default" / p.name
        spec = default_head_spec(p.shape, rec.num_classes)
        ctx = trial_context(rec, p, cfg, store_dir, total_flops=tb.total_flops, chance=chance)
        ctx["max_cost_fraction"] = None  # the default head is always trained
        r = TrialStore(store_dir).find(spec.to_json()) or run_trial(ctx, spec, "default")
        module = build_head(HeadSpec.from_dict(r["spec"]), p.shape, rec.num_classes)
        module.load_state_dict(torch.load(store_dir / "weights" / r["weights"], map_location="cpu",
                                          weights_only=True))
        module.eval()
        m = r["metrics"]
        out[p.name] = (TrainedHead(point=p, spec=spec, module=module, flops=int(m["flops"]),
                                   params=count_params(module), param_bytes=param_bytes(module),
                                   val_agreement=m["agreement"], val_kl=m["kl"], epochs=int(m["epochs"]),
                                   seconds=m["train_seconds"], history=r["history"]), r)
    return out


def end_to_end(tb, points, rec, heads: dict, policy: str, tolerance: float) -> dict:
    from autoexit.pipeline import EnableConfig, assemble

    res = assemble(EnableConfig(granularity=2, tolerance=tolerance, policy=policy), tb, points, rec, heads)
    t, v = res.metrics["test"], res.metrics["val"]
    return {"kept": res.kept, "test_expected_flops": t["expected_flops"], "test_saving": t["saving"],
            "test_drop_pp": 100 * t["accuracy_drop"] if t.get("accuracy_drop") is not None else None,
            "test_agreement": t["agreement"], "val_saving": v["saving"], "oracle_saving": t["oracle_saving"],
            "base_flops": t["base_flops"]}


def run_depth(depth: int, args) -> dict:
    from autoexit.distill import TrainConfig
    from autoexit.pipeline import EnableConfig, prepare
    from autoexit.search.head_space import HeadSearchConfig
    from autoexit.search.nni_heads import search_heads

    t0 = time.perf_counter()
    tb, points, rec = prepare(cifar_resnet(depth).eval(), cifar10_data(), EnableConfig(granularity=2),
                              progress=True)
    t_rec = time.perf_counter() - t0
    cfg = HeadSearchConfig(space="default", strategy=args.strategy, max_trials=args.trials, engine="sequential",
                           train=TrainConfig(epochs=args.epochs, patience=0), trial_samples=args.samples,
                           retrain=False, cost_weight=args.cost_weight, max_cost_fraction=0.25, threads=1,
                           seed=0)
    workdir = _cache_root() / f"resnet{depth}"
    t0 = time.perf_counter()
    found = search_heads(prepared=(tb, points, rec), config=cfg, workdir=workdir, progress=True)
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    defaults = default_heads(rec, tb, points, cfg, workdir)
    t_default = time.perf_counter() - t0

    rows = []
    for p in points:
        dh, drec = defaults[p.name]
        pr = found.points[p.name]
        b = pr.best or {}
        bm = b.get("metrics", {})
        statuses = [r["status"] for r in pr.trials]
        rows.append({
            "point": p.name, "default head": dh.spec.describe(), "default agree": dh.val_agreement,
            "default FLOPs": dh.flops, "default score": drec["metrics"]["score"],
            "searched head": b.get("describe", f"discarded ({pr.status})"), "searched agree": bm.get("agreement"),
            "searched FLOPs": int(bm["flops"]) if bm else None, "searched score": bm.get("score"),
            "trials ok/costly/chance": f"{statuses.count('ok')}/{statuses.count('too_costly')}/"
                                       f"{statuses.count('chance')}",
        })
    searched_heads = dict(found.heads)
    default_only = {k: v[0] for k, v in defaults.items()}
    e2e = []

    def compare(default: dict, searched: dict, schedule: str, **extra) -> None:
        suffix = "" if schedule == "search" else f" ({schedule} schedule)"
        for policy in POLICIES:
            d = end_to_end(tb, points, rec, default, policy, args.tolerance)
            s = end_to_end(tb, points, rec, searched, policy, args.tolerance)
            e2e.append({"network": f"ResNet-{depth}", "policy": policy + suffix, "default kept": len(d["kept"]),
                        "default saving": d["test_saving"], "default drop pp": d["test_drop_pp"],
                        "searched kept": len(s["kept"]), "searched saving": s["test_saving"],
                        "searched drop pp": s["test_drop_pp"],
                        "FLOPs cut by NAS": 1 - s["test_expected_flops"] / d["test_expected_flops"],
                        "schedule": schedule, "default": d, "searched": s, **extra})

    compare(default_only, searched_heads, "search")
    core_train_s = None
    if args.full_schedule:  # the winners exported into the core pipeline: the core's own training schedule
        from autoexit.data import default_cache_dir
        from autoexit.search.pipeline import train_heads_cached

        hc = default_cache_dir() / "heads"
        chosen = [p.name for p in points
                  if not args.full_points or any(p.name.startswith(pre) for pre in args.full_points)]
        t0 = time.perf_counter()
        full_default = train_heads_cached(rec, {}, TrainConfig(), cache_dir=hc, points=chosen, progress=True)
        specs = {n: h.spec for n, h in searched_heads.items() if n in chosen}
        full_searched = train_heads_cached(rec, specs, TrainConfig(), cache_dir=hc, points=list(specs), progress=True)
        t_full = time.perf_counter() - t0
        core_train_s = sum(h.seconds for h in [*full_default.values(), *full_searched.values()])
        for row in rows:
            if row["point"] in full_default:
                row["default agree (full)"] = full_default[row["point"]].val_agreement
                row["searched agree (full)"] = (full_searched[row["point"]].val_agreement
                                                if row["point"] in full_searched else None)
        compare(full_default, full_searched, "core", train_s=t_full, points=chosen)
    heads_flops = {"default_total_head_flops": sum(v[0].flops for v in defaults.values()),
                   "searched_total_head_flops": sum(h.flops for h in searched_heads.values())}
    return {"depth": depth, "points": [p.name for p in points], "backbone_flops": tb.total_flops,
            "chance": found.points[points[0].name].trials[0]["metrics"]["chance"] if found.points else None,
            "rows": rows, "end_to_end": e2e, "heads_flops": heads_flops, "failed": found.failed,
            # this run's wall times (near zero when cached) and the times the cached work took when it ran
            "timings_s": {"record": t_rec, "search": t_search, "default_heads": t_default,
                          "search_as_run": sum(pr.seconds for pr in found.points.values()),
                          "default_heads_training": sum(v[0].seconds for v in defaults.values()),
                          **({"core_schedule_training": core_train_s} if core_train_s is not None else {})},
            "search_config": cfg.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    ap.add_argument("--trials", type=int, default=5, help="NNI trials per exit point")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of every head (searched and default)")
    ap.add_argument("--samples", type=int, default=1500, help="train samples every head is trained on")
    ap.add_argument("--strategy", default="random", choices=["random", "tpe", "evolution"])
    ap.add_argument("--cost-weight", type=float, default=1.0)
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--merge", action="store_true", help="keep other depths' results already in the output file")
    ap.add_argument("--no-full-schedule", dest="full_schedule", action="store_false",
                    help="skip retraining the winners and the default heads with the core's own schedule "
                         "(TrainConfig(), every train sample; cached) before the end-to-end comparison")
    ap.add_argument("--full-points", nargs="+", default=None, metavar="PREFIX",
                    help="retrain with the core's schedule only the points whose name starts with one of these "
                         "prefixes (e.g. layer3.: the last stage), and compare end to end on those points only")
    args = ap.parse_args()
    require_fixtures()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [run_depth(d, args) for d in args.depths]
    for r in results:
        r["command"] = "python bench/nni_heads.py " + " ".join(sys.argv[1:])
    path = RESULTS / "nni_heads.json"
    if args.merge and path.is_file():  # other depths' results from an earlier run stay
        done = {r["depth"] for r in results}
        results += [r for r in json.loads(path.read_text()).get("results", []) if r["depth"] not in done]
    results.sort(key=lambda r: r["depth"])
    for r in results:
        print_table(r["rows"], title=f"ResNet-{r['depth']}: searched vs default head per exit point "
                                     f"(val agreement with the backbone, head FLOPs, score; chance "
                                     f"{r['chance']:.3f})")
    cols = ["network", "policy", "default kept", "default saving", "default drop pp", "searched kept",
            "searched saving", "searched drop pp", "FLOPs cut by NAS"]
    e2e = [row for r in results for row in r["end_to_end"]]
    print_table(e2e, title=f"end to end at {args.tolerance} % tolerance (test split): expected-FLOPs saving "
                           "vs the backbone, accuracy drop, and the cut in expected FLOPs the searched heads "
                           "bring", columns=cols)
    # the verdict rests on the heads as the core pipeline would use them (core schedule) when that pass ran
    core = [row for row in e2e if row.get("schedule") == "core"]
    basis = core or e2e
    cuts = [row["FLOPs cut by NAS"] for row in basis]
    mean_cut = sum(cuts) / len(cuts)
    drops = [(row["default drop pp"], row["searched drop pp"]) for row in basis]
    verdict = ("reproduced" if abs(mean_cut - PAPER_FLOPS_CUT) <= 0.05 else
               "larger than the paper's" if mean_cut > PAPER_FLOPS_CUT else "not reproduced")
    print(f"paper 003 appendix D: NAS heads cut FLOPs by ~{100 * PAPER_FLOPS_CUT:.0f} % at about equal accuracy; "
          f"here the mean cut ({'core-schedule heads' if core else 'search-trained heads'}) is "
          f"{100 * mean_cut:.1f} % (per network/policy: " + ", ".join(f"{100 * c:.1f} %" for c in cuts)
          + "), accuracy drops (default, searched) " + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in drops)
          + f" -> {verdict}")
    write_results("nni_heads", {
        "command": "python bench/nni_heads.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "results": results,
        "mean_flops_cut": mean_cut, "verdict_basis": "core schedule" if core else "search-trained",
        "verdict": verdict, "paper_flops_cut": PAPER_FLOPS_CUT, "wall_s": time.perf_counter() - t0,
    })

if __name__ == "__main__":
    main()
