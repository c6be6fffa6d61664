"""Render benchmark JSON results as Markdown tables into docs/benchmarks.md.

Each generated table sits between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``
markers in ``docs/benchmarks.md``; this script replaces only those blocks, so the
hand-written text (and other benchmarks' sections) stay as they are.

Blocks from ``bench/results/policies.json``, ``head_levers.json`` and ``guarantee_check.json`` go to ``docs/policies.md`` and those from
``bench/results/nni_heads.json`` to ``docs/nni.md`` (same marker convention).

Usage: ``python bench/md_tables.py`` (after ``bench/peers.py``, ``bench/generality.py``,
``bench/cifar10_resnet.py``, ``bench/policies.py``, ``bench/head_levers.py``, ``bench/guarantee_check.py``,
``bench/nni_heads.py``); ``--print`` writes the
blocks to stdout instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, latency_environment  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
POLICIES_DOC = REPO / "docs" / "policies.md"
NNI_DOC = REPO / "docs" / "nni.md"


def _load(name: str) -> dict:
    """``bench/results/<name>.json``, or ``{}`` when that benchmark has not been recorded."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """Markdown table; ``columns``: (key, header, decimals)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k), d) for k, _, d in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


PEER_COLUMNS = [("method", "method", 0), ("labels", "labels", 0), ("budget %", "budget %", 0),
                ("exits", "exits used/placed", 0), ("acc %", "test acc %", 2), ("drop pts", "drop pts", 2),
                ("MFLOPs", "MFLOPs/sample", 2), ("saving %", "FLOPs saved %", 1), ("oracle %", "oracle %", 1),
                ("of oracle", "share of oracle", 2), ("bs1 ratio", "CPU bs1 vs backbone", 2),
                ("bs32 ratio", "CPU bs32 vs backbone", 2), ("exit shares %", "exit shares % (point:share)", 0)]


def peers_blocks() -> dict[str, str]:
    res = _load("peers")
    if not res:
        return {}
    out = {}
    for wl, r in res.get("workloads", {}).items():
        d = r["details"]
        env = r.get("environment", {})
        lat = d.get("latency", {})
        loads = ", ".join(f"{t} %: {v['loadavg_before'][0]:.1f}" for t, v in lat.items())
        base = d["base_flops"] / 1e6
        bacc = next((x["acc %"] + x["drop pts"] for x in r["rows"] if x.get("acc %") is not None), None)
        note = (f"Backbone: {d['backbone']}, {base:.2f} MFLOPs/sample, test accuracy {_fmt(bacc)} %; data: {d['data']}; "
                f"candidate points: {len(d['points'])}. Run {env.get('date', '?')} at commit {env.get('commit', '?')}, "
                f"{r.get('seconds', 0) / 60:.1f} min"
                + (f"; load average (1 min) when latency was measured: {loads}" if loads else "") + ".")
        out[f"peers-{wl}"] = note + "\n\n" + table(r["rows"], PEER_COLUMNS)
    if res.get("paper003_table3"):
        out["paper003-table3"] = table(res["paper003_table3"], [
            ("dataset", "dataset", 0), ("model", "model", 0), ("MFLOPs", "MFLOPs", 0),
            ("early-exit MFLOPs", "early-exit MFLOPs", 0), ("saving %", "FLOPs saved %", 2), ("drop pts", "drop pts", 2)])
    return out


def generality_blocks() -> dict[str, str]:
    res = _load("generality")
    if not res:
        return {}
    rows = [{"model": r["model"], "ok": "yes" if r["ok"] else "**no**", "points": r["n_points"],
             "equal": {True: "yes", False: "no", None: "-"}[r.get("equal")], "s": r["seconds"],
             "first / last point": f"{r['points'][0]} ... {r['points'][-1]}" if r.get("points") else "-",
             "reason": r.get("reason") or ""} for r in res["results"]]
    env = res.get("environment", {})
    head = (f"{res['passed']} of {res['total']} builders pass (torchvision {res.get('torchvision')}, input "
            f"{res['size']}x{res['size']}, granularity {res['granularity']}); run {env.get('date', '?')} at commit "
            f"{env.get('commit', '?')} in {res['seconds'] / 60:.1f} min on {env.get('threads')} threads.")
    return {"generality": head + "\n\n" + table(rows, [("model", "builder", 0), ("ok", "pass", 0),
                                                        ("points", "exit points", 0), ("equal", "torch.equal", 0),
                                                        ("first / last point", "first ... last point", 0),
                                                        ("s", "seconds", 1), ("reason", "reason", 0)])}


def core_blocks() -> dict[str, str]:
    res = _load("cifar10_resnet")
    if not res:
        return {}
    cols = [("model", "model", 0), ("tolerance %", "tolerance %", 1), ("exits kept", "exits kept", 0),
            ("backbone acc %", "backbone acc %", 2), ("early-exit acc %", "early-exit acc %", 2),
            ("drop pts", "drop pts", 2), ("MFLOPs/sample", "MFLOPs/sample", 2), ("saving %", "FLOPs saved %", 1),
            ("oracle saving %", "oracle %", 1), ("share of oracle", "share of oracle", 2),
            ("bs1 ratio", "CPU bs1 vs backbone", 2), ("bs32 ratio", "CPU bs32 vs backbone", 2)]
    env = res.get("environment", {})
    return {"core": f"Run {env.get('date', '?')} at commit {env.get('commit', '?')}.\n\n" + table(res["rows"], cols)}


def _earlyon_rows(workload: str) -> dict[float, dict]:
    """earlyon's row per budget from peers.json (its own heads and calibration), for the policies table."""
    rows = _load("peers").get("workloads", {}).get(workload, {}).get("rows", [])
    return {float(r["budget %"]): r for r in rows if r.get("method") == "earlyon"}


def policies_blocks(name: str = "policies") -> dict[str, str]:
    """bench/policies.py's tables per network from ``<name>.json`` (``policies``: default heads; ``policies_mixup``:
    function-matching heads), as blocks ``<name>-resnet<depth>``."""
    res = _load(name)
    if not res:
        return {}
    env = res.get("environment_of_rows", res.get("environment", {}))
    lat_env = latency_environment(res)
    out = {}
    cols = [("T %", "T %", 1), ("policy", "policy", 0), ("exits", "exits", 0), ("saving %", "FLOPs saved %", 1),
            ("drop %", "test drop pts", 2), ("disagree %", "disagreement %", 2), ("oracle share", "share of oracle", 2),
            ("resplit saving %", "saved % (re-splits)", 1), ("resplit drop % (p90)", "drop p90 (re-splits)", 2),
            ("viol(drop)", "violation rate (drop)", 2), ("guaranteed", "certified", 0),
            ("hindsight family %", "hindsight: its family %", 1), ("hindsight signal %", "hindsight: its signal %", 1)]
    for r in res.get("results", []):
        depth = r["depth"]
        rows = [dict(x, guaranteed=("yes" if x.get("guaranteed") else "no") if x["policy"] != "paper003" else "-",
                     policy=x["policy"] + (f" -> {x['chosen']}" if x.get("chosen") else ""))
                for x in r["rows"] + r.get("cascade_rows", [])]
        rows.sort(key=lambda x: (x["T %"], 0 if x["policy"] != "gate+cascade" else 1))
        for tol, e in sorted(_earlyon_rows(f"resnet{depth}").items()):
            rows.append({"T %": tol, "policy": "earlyon (peers.py, labels)", "exits": e.get("exits"),
                         "saving %": e["saving %"], "drop %": e["drop pts"], "oracle share": e.get("of oracle"),
                         "guaranteed": "no"})
        lat = r.get("latency") or {}
        lat_txt = ""
        lat_table = ""
        if lat:
            when = f" (measured {lat_env.get('date', '?')} at commit {lat_env.get('commit', '?')})" if lat_env else ""
            lat_txt = f" CPU latency per sample vs the backbone in TorchScript at T = 1 %{when}: the second table."
            lrows = [{"policy": k, "cost": v.get("cost", "flops") + (f" (bs{v['cost_batch_size']})"
                                                                      if v.get("cost") == "latency" else ""),
                      "exits": len(v.get("kept", [])), "saving": 100 * v["test_saving"],
                      "drop": 100 * v["test_drop"], "bs1": v["ratio"]["1"], "bs32": v["ratio"]["32"],
                      "pred": v.get("predicted_ratio_val")}
                     for k, v in lat.items() if isinstance(v, dict) and "ratio" in v]
            lat_table = "\n\n" + table(lrows, [("policy", "policy (T = 1 %)", 0), ("cost", "exits chosen by", 0),
                                                ("exits", "exits", 0), ("saving", "FLOPs saved %", 1),
                                                ("drop", "test drop pts", 2), ("bs1", "batch 1 vs backbone", 2),
                                                ("bs32", "batch 32 vs backbone", 2),
                                                ("pred", "predicted (val, profile)", 2)])
        run = r.get("run") or env  # the depth's own run (results written since it was recorded), else the file's
        later: dict = {}  # rows added by a later ``--only`` run, each with its own run
        for x in r["rows"]:
            if x.get("run"):
                later.setdefault((x["run"]["date"], x["run"]["commit"], x["run"]["argv"]), []).append(x["policy"])
        later_txt = "".join(f" Rows {', '.join(f'`{p}`' for p in dict.fromkeys(pols))}: run {date} at commit "
                            f"{commit} (`{argv}`)." for (date, commit, argv), pols in later.items())
        note = (f"ResNet-{depth}: backbone test accuracy {100 * r['backbone_test_accuracy']:.2f} %, "
                f"{len(r['candidates'])} candidate exits, oracle saving {100 * r['oracle_saving']['test']:.1f} % "
                f"(test), {res.get('args', {}).get('resplits', '?')} re-splits of val + test, delta = 0.1. "
                f"Run {run.get('date', '?')} at commit {run.get('commit', '?')}"
                + (f", {r['seconds'] / 60:.1f} min" if r.get("seconds") else "") + "." + later_txt + lat_txt)
        out[f"{name}-resnet{depth}"] = note + "\n\n" + table(rows, cols) + lat_table
    return out


def levers_blocks() -> dict[str, str]:
    """bench/head_levers.py: per (T, policy), saving and drop of each variant side by side; agreement per exit."""
    res = _load("head_levers")
    if not res:
        return {}
    from bench.head_levers import mixup_epochs

    env = res.get("environment", {})
    parts = []
    what_trained = {"joint": "joint fine-tuning", "feature": "feature-distilled heads",
                    "mixup": "mixup function-matching heads", "skip": "skip heads and their out-of-fold copies",
                    "two-stage": "two-stage exits (skip heads loaded, policies fitted)",
                    "mixup-cross-fitted": "mixup heads' out-of-fold copies",
                    "ensemble": "ensemble members (other seeds)", "cheap": "cheap heads"}

    def trained(k: str) -> str:  # a training-time key (lever, or mixup@N for a non-default schedule) in words
        lever, _, epochs = k.partition("@")
        return what_trained.get(lever, lever + " heads") + (f" ({epochs} epochs)" if epochs else "")

    for r in res.get("results", []):
        variants = list(dict.fromkeys(x["variant"] for x in r["rows"]))
        mixups = [v for v in variants if v.startswith("mixup")]  # schedules side by side, shortest first
        if mixups:
            at = variants.index(mixups[0])
            rest = [v for v in variants if v not in mixups]
            variants = rest[:at] + sorted(mixups, key=mixup_epochs) + rest[at:]
        short = {v: v.split(" (")[0] for v in variants}
        for v in variants:  # two runs of one lever (mixup schedules) keep their whole names apart
            if sum(s == short[v] for s in short.values()) > 1:
                short[v] = v
        rows: dict[tuple, dict] = {}
        for x in r["rows"]:
            row = rows.setdefault((x["T %"], x["policy"]), {"T %": x["T %"], "policy": x["policy"]})
            viol = f", {100 * x['viol(drop)']:.0f} %" if x.get("viol(drop)") is not None else ""
            row[short[x["variant"]]] = f"{x['saving %']:.1f} ({x['drop %']:.2f}{viol})"
        has_viol = all(x.get("viol(drop)") is not None for x in r["rows"])
        what = "saved % (drop pts, violations)" if has_viol else "saved % (drop pts)"
        cols = [("T %", "T %", 1), ("policy", "policy", 0)] + [(short[v], f"{v}: {what}", 0) for v in variants]
        names = r["candidates"]
        arows = [{"variant": k, **{n: v for n, v in zip(names, a)}} for k, a in r["val_agreement"].items()]
        acols = [("variant", "agreement with the backbone", 0)] + [(n, n, 3) for n in names]
        secs = ", ".join(f"{trained(k)} {v / 60:.1f} min" if v >= 60 else f"{trained(k)} from cache"
                         for k, v in r.get("seconds", {}).items())
        note = (" Violations: share of 100 random val/test re-splits whose test drop exceeds T (delta = 0.1)."
                if has_viol else "")
        runs = r.get("runs") or ({"all": r["run"]} if r.get("run") else {})
        groups: dict[tuple, list[str]] = {}
        for lever, run in runs.items():
            groups.setdefault((run.get("date", "?"), run.get("commit", "?"), tuple(run.get("argv", []))), []).append(lever)
        when = "".join(
            f" {'Run' if levers == ['all'] else ' and '.join(levers).capitalize() + ' run'} {d} at commit {c}: "
            f"`{' '.join(['python bench/head_levers.py', *argv])}`."
            for (d, c, argv), levers in sorted(groups.items()))
        j = r.get("joint")
        jtxt = ("" if not j else
                f"\n\nJoint fine-tune ({j['epochs']} epochs, backbone learning rate {j['lr']:g}, backbone output "
                f"weight {j['final_weight']:g}): its own final answer agrees with the original backbone on "
                f"{100 * j['final agreement val']:.1f} % of val and {100 * j['final agreement test']:.1f} % of test "
                f"(accuracy {100 * j['final accuracy test']:.2f} % vs the backbone's "
                f"{100 * j['backbone accuracy test']:.2f} % on test); the oracle with its heads saves "
                f"{100 * j['oracle saving test (joint)']:.1f} % (test) against "
                f"{100 * j['oracle saving test (original heads)']:.1f} % with the default heads.")
        labels = {"feature": lambda e: f"Feature distillation (penultimate-feature loss weight {e['weight']:g})",
                  "mixup": lambda e: f"Mixup function matching ({e['epochs']} epochs)",
                  "skip": lambda e: f"Skip heads (peak learning rate {e['lr']:g})",
                  "ensemble": lambda e: f"Ensembled heads ({e['members']} per exit, seeds "
                                        f"{', '.join(map(str, e['seeds'][:-1]))} and {e['seeds'][-1]})",
                  "cheap": lambda e: "Cheap heads (2x2 average pool + FC, "
                                     f"{sum(e['head flops'].values()) / sum(e['default head flops'].values()):.3f} "
                                     "of the default heads' FLOPs)"}
        for key in ["feature", *sorted((k for k in r if k.startswith("mixup")), key=mixup_epochs), "skip", "ensemble",
                    "cheap"]:
            if e := r.get(key):
                lever = key.split("@")[0]
                jtxt += (f"\n\n{labels[lever](e)}: the oracle with its heads saves "
                         f"{100 * e[f'oracle saving test ({lever})']:.1f} % (test) against "
                         f"{100 * e['oracle saving test (default heads)']:.1f} % with the default heads.")
        if (e := r.get("ensemble")) and "shared errors val (seeds 0, 1)" in e:
            same, shared = e["same answer val (seeds 0, 1)"], e["shared errors val (seeds 0, 1)"]
            jtxt += (f" The heads of seeds 0 and 1 give the same class on {100 * min(same):.0f}-{100 * max(same):.0f} % "
                     f"of val per exit, and of seed 0's disagreements with the backbone seed 1 makes "
                     f"{100 * min(shared):.0f}-{100 * max(shared):.0f} % with the same wrong class.")
        if e := r.get("skip"):
            flops = e["head flops"]
            cs = [(n, a, b) for n, a, b in zip(names, e["confident share val (default)"],
                                               e["confident share val (skip)"]) if n in e["exits"]]
            jtxt += ("\n\nSkip heads, share of val an exit could answer alone at <= 1 % disagreement (max-softmax "
                     "order, hindsight), default head -> skip head (the skip head's FLOPs as a share of the "
                     "backbone's): " + "; ".join(f"{n} {100 * a:.1f} -> {100 * b:.1f} % "
                                                 f"({100 * flops[n] / e['backbone flops']:.1f} %)" for n, a, b in cs)
                     + ".")
        two = [x for x in r["rows"] if "try share" in x]
        if two:
            jtxt += ("\n\nTwo-stage exits, per T and policy: the try share chosen on the fit split, and on test the "
                     "skip heads run per input against those an input reached: " + "; ".join(
                         f"T = {x['T %']:g} % {x['policy']}: {x['try share']:g}, "
                         f"{x['skip heads run per input (test)']:.2f} of {x['skip heads reached per input (test)']:.2f}"
                         for x in two) + ".")
            rec = (r.get("two-stage") or {}).get("try recall val")
            if rec:
                jtxt += (" Of what a skip head could let out alone at <= 1 % disagreement (val, hindsight), the share "
                         "held by the default head's most confident inputs, lowest to highest over the skip exits: "
                         + "; ".join(f"top {100 * float(q):.0f} %: {100 * min(v):.0f}-{100 * max(v):.0f} %"
                                     for q, v in rec.items()) + ".")
        curve = r.get("train_size")
        ctxt = ("" if not curve else "\n\nLearning curve (default heads and schedule on random subsets of the train "
                "split): " + "; ".join(f"{c['train images']:,} images: mean val agreement "
                                       f"{100 * c['mean val agreement']:.1f} %, oracle saving "
                                       f"{100 * c['oracle saving test']:.1f} %" for c in curve) + ".")
        parts.append(f"ResNet-{r['depth']} (test split; agreement on val unless marked train; {secs}).{when}{note}"
                     + jtxt + ctxt + "\n\n" + table(list(rows.values()), cols) + "\n\n" + table(arows, acols))
    return {"policies-levers": f"Results file written {env.get('date', '?')} at commit {env.get('commit', '?')} "
                               f"(`bench/results/head_levers.json`).\n\n" + "\n\n".join(parts)}


def guarantee_blocks() -> dict[str, str]:
    """``guarantee-check``: violation rates over re-splits and over population draws
    (``bench/guarantee_check.py``), per depth, head variant, tolerance and policy."""
    res = _load("guarantee_check")
    rows = res.get("rows", [])
    if not rows:
        return {}

    def rate(r, what: str) -> str:
        n = r["resplits"] if what == "re-split" else r["draws"]
        lo, hi = r[f"{what} 95% CI"]
        return (f"{100 * r[f'{what} viol']:.1f} % of {n} [{100 * lo:.1f}, {100 * hi:.1f}] "
                f"p={r[f'{what} p(<=delta)']:.2g}")

    from bench.guarantee_check import CHECK_POLICIES, core_folds
    from bench.head_levers import mixup_epochs

    policy_order = [p[0] for p in CHECK_POLICIES]  # the order the benchmark runs them in

    def heads(v: str) -> tuple[int, int]:  # baseline, cross-fitted, feature, mixup schedules, mixup cross-fitted,
        if v.isdigit():                    # skip, train-subset sizes
            return 1, int(v)
        if v == "mixup-cross-fitted":
            return -1, 10 ** 6
        if (folds := core_folds(v)) is not None:  # core, then its cross-fitted runs by fold count
            return -1, -10 + folds
        if v.startswith("mixup"):
            return -1, mixup_epochs(v)
        return {"baseline": -4, "cross-fitted": -3, "feature": -2, "skip": 0}.get(v, -1), 0

    def order(r):  # by network, heads, T, policy
        return int(r["model"].removeprefix("resnet")), heads(r["variant"]), r["T %"], policy_order.index(r["policy"])

    out = []
    for r in sorted(rows, key=order):
        out.append({"model": r["model"], "variant": r["variant"], "T %": r["T %"], "policy": r["policy"],
                    "risk": r["risk"], "saving %": r["saving %"], "rs": rate(r, "re-split"), "pop": rate(r, "pop"),
                    "indep": (f"{100 * r['independent-test viol']:.1f} %" if r.get("independent-test viol") is not None
                              else "-"),
                    "risk mean": r["pop risk % (mean)"], "risk p90": r["pop risk % (p90)"],
                    "pop saving %": r["pop saving %"]})
    runs = sorted({(r["run"]["date"], r["run"]["commit"], r["run"]["argv"]) for r in rows if r.get("run")})
    head = (f"delta = {res.get('delta', 0.1)}. Rates: share of draws whose risk exceeded T, [95 % Clopper-Pearson "
            "interval], p = one-sided p-value of \"the rate is at most delta\" (small: above delta beyond noise). "
            "*re-split*: the policy's own risk on the 3,000-image test half of a random val/test re-split; "
            "*population*: the deployed setting's risk on the whole 5,000-image pool, calibration drawn from it "
            "with replacement; *independent test*: the expected share of those draws whose deployed setting would show "
            "a risk above T on an independent 3,000-image test set of the population (the population check plus "
            "test noise, without the re-split's link between the halves). True risk: the population risk of the deployed settings (mean, 90th percentile). "
            + " ".join(f"Run {d} at commit {c}: `{a}`." for d, c, a in runs))
    cols = [("model", "model", 0), ("variant", "heads", 0), ("T %", "T %", 1), ("policy", "policy", 0),
            ("risk", "risk", 0), ("saving %", "saved % (test)", 1), ("rs", "violations: re-split", 0),
            ("pop", "violations: population", 0), ("indep", "violations: independent test", 0), ("risk mean", "true risk % (mean)", 2),
            ("risk p90", "true risk % (p90)", 2), ("pop saving %", "saved % (population)", 1)]
    return {"guarantee-check": head + "\n\n" + table(out, cols)}


def nni_blocks() -> dict[str, str]:
    res = _load("nni_heads")
    if not res:
        return {}
    env = res.get("environment", {})
    out = {}
    for r in res.get("results", []):
        depth = r["depth"]
        rows = []
        for x in r["rows"]:
            rows.append({"point": x["point"],
                         "default": f"{x['default agree']:.3f}, {x['default FLOPs'] / 1e3:,.0f} k",
                         "searched head": x["searched head"],
                         "searched": (f"{x['searched agree']:.3f}, {x['searched FLOPs'] / 1e3:,.0f} k"
                                      if x.get("searched agree") is not None else "-"),
                         "trials": x["trials ok/costly/chance"],
                         "better": ("yes" if x.get("searched score") is not None
                                    and x["searched score"] > x["default score"] else "no")})
        t = r.get("timings_s", {})
        note = (f"ResNet-{depth}: {len(r['points'])} exit points, chance agreement {r['chance']:.3f}; search "
                f"{t.get('search_as_run', t.get('search', 0)) / 60:.1f} min, default heads "
                f"{t.get('default_heads_training', t.get('default_heads', 0)) / 60:.1f} min"
                + (f", core-schedule retraining {t['core_schedule_training'] / 60:.1f} min"
                   if t.get("core_schedule_training") else "") + ". "
                f"Run {env.get('date', '?')} at commit {env.get('commit', '?')}.")
        out[f"nni-resnet{depth}"] = note + "\n\n" + table(rows, [
            ("point", "point", 0), ("default", "default head: agreement, FLOPs", 0),
            ("searched head", "searched head", 0), ("searched", "agreement, FLOPs", 0),
            ("trials", "trials ok/too costly/chance", 0), ("better", "better score", 0)])
    e2e = [dict(x, **{"default saving": 100 * x["default saving"], "searched saving": 100 * x["searched saving"],
                      "FLOPs cut by NAS": 100 * x["FLOPs cut by NAS"]})
           for r in res.get("results", []) for x in r.get("end_to_end", [])]
    if e2e:
        s = res.get("settings", {})
        out["nni-e2e"] = (f"End to end at {s.get('tolerance', 1.0)} % tolerance (test split); mean cut in expected "
                          f"FLOPs by the searched heads {100 * res['mean_flops_cut']:.1f} % vs paper 003's "
                          f"~{100 * res['paper_flops_cut']:.0f} % -> {res['verdict']}. Command: `{res['command']}`."
                          "\n\n" + table(e2e, [
                              ("network", "network", 0), ("policy", "policy", 0), ("default kept", "default: exits", 0),
                              ("default saving", "saved %", 1), ("default drop pp", "drop pts", 2),
                              ("searched kept", "searched: exits", 0), ("searched saving", "saved %", 1),
                              ("searched drop pp", "drop pts", 2), ("FLOPs cut by NAS", "FLOPs cut by NAS %", 1)]))
    return out


def outer_certified_blocks(name: str = "outer_certified", block: str = "outer-certified") -> dict[str, str]:
    """The outer-certified table of ``bench/results/<name>.json`` as block ``block``."""
    res = _load(name)
    if not res:
        return {}
    env = res.get("environment", {})
    rows = []
    for d in res.get("depths", {}).values():
        for r in d["rows"]:
            cert = {"True": "policy's own", "False": "none"}.get(r["certified"], r["certified"])
            rows.append({**r, "certified": cert,
                         "viol": "-" if r.get("viol(drop)") is None else f"{r['viol(drop)']:.2f}",
                         "pop": "-" if r.get("population viol") is None else f"{r['population viol']:.3f}"})
    runs = {}  # a --merge run says per depth which run made its rows
    for d in res["depths"].values():
        r = d.get("run") or {"command": res.get("command", "python bench/outer_certified.py"),
                             "date": env.get("date", "?"), "commit": env.get("commit", "?")}
        runs.setdefault((r["date"], r["commit"], r["command"]), []).append(
            f"ResNet-{d['depth']}: {d['trials']} trials per study")
    note = ("; ".join(f"Run {date} at commit {commit} (`{cmd}`), " + ", ".join(what)
                      for (date, commit, cmd), what in runs.items())
            + ". Drops in points on the 3,000-image test split; re-split and population columns as described above.")
    return {block: note + "\n\n" + table(rows, [
        ("model", "network", 0), ("T %", "T %", 1), ("method", "method", 0), ("exits", "exits", 0),
        ("saving %", "FLOPs saved %", 1), ("drop %", "test drop pts", 2), ("disagree %", "disagreement %", 2),
        ("certified", "certified points", 0), ("resplit saving %", "saved % (re-splits)", 1),
        ("viol", "violation rate (re-splits)", 0), ("pop", "violation rate (population)", 0)])}


def runtime_blocks() -> dict[str, str]:
    """bench/runtime.py: latency ratios of the plain and the optimised runtime, per network and policy."""
    res = _load("runtime")
    if not res:
        return {}
    env = res.get("environment", {})
    rows = [{**r, "net": f"ResNet-{r['depth']}", "match": f"{100 * r['decisions_match']:.2f}",
             "bb b1": r["backbone optimized/plain b1"], "bb b32": r["backbone optimized/plain b32"]}
            for d in res["results"] for r in d["rows"]]
    note = (f"Run {env.get('date', '?')} at commit {env.get('commit', '?')} (`{res.get('command')}`, "
            f"{res['wall_s'] / 60:.0f} min, median of {res['rounds']} rounds, {env.get('threads', '?')} threads). Ratios of CPU ms per sample, < 1 is faster; \"plain\": the early-exit "
            "model against the backbone, both in TorchScript; \"optimised\": both optimised; \"deployed\": the "
            "optimised early-exit model against the plain TorchScript backbone; \"backbone opt/plain\": what the "
            "optimised runtime alone does to the backbone.")
    return {"runtime": note + "\n\n" + table(rows, [
        ("net", "network", 0), ("policy", "policy (T = 1 %)", 0), ("exits", "exits", 0),
        ("saving_pct", "FLOPs saved %", 1), ("drop_pts", "test drop pts", 2),
        ("plain b1", "plain bs1", 2), ("plain b32", "plain bs32", 2), ("optimized b1", "optimised bs1", 2),
        ("optimized b32", "optimised bs32", 2), ("deployed b1", "deployed bs1", 2),
        ("deployed b32", "deployed bs32", 2), ("bb b1", "backbone opt/plain bs1", 2),
        ("bb b32", "backbone opt/plain bs32", 2), ("match", "same exits % (3,000 test)", 0)])}


HEAD_COMPARISONS = {  # block: the results files compared, (file, label), the cheap heads' last
    "cheap-heads": [("policies_crossfit", "default heads, 2 folds"), ("policies_crossfit3", "default heads, 3 folds"),
                    ("policies_cheap_crossfit", "cheap heads, 3 folds")],
    "cheap-heads-in-sample": [("policies", "default heads"), ("policies_cheap", "cheap heads")],
}


def head_comparison_blocks() -> dict[str, str]:
    """The guaranteed policies' saving averaged over the re-splits (and their violation rate) with the default heads
    and with cheap heads (``bench/policies.py --head cheap``), side by side per network, tolerance and policy; only
    policies every compared file has. ``cheap-heads``: cross-fitted; ``cheap-heads-in-sample``: as the core runs by
    default (no cross-fitting)."""
    out = {}
    for block, files in HEAD_COMPARISONS.items():
        runs = [(label, _load(name)) for name, label in files]
        if not runs[-1][1] or sum(bool(res) for _, res in runs) < 2:
            continue
        runs = [(label, res) for label, res in runs if res]
        by = {label: {(r["depth"], x["T %"], x["policy"]): x for r in res["results"] for x in r["rows"]}
              for label, res in runs}
        oracle = {label: {r["depth"]: r["oracle_saving"]["test"] for r in res["results"]} for label, res in runs}
        cheap = runs[-1][0]
        rows = []
        for key in by[cheap]:
            depth, tol, policy = key
            if policy == "paper003" or any(key not in by[label] for label, _ in runs):
                continue
            row = {"net": f"ResNet-{depth}", "T %": tol, "policy": policy}
            for label, _ in runs:
                x = by[label][key]
                row[label] = f"{x['resplit saving %']:.1f} ({100 * x['viol(drop)']:.0f} %)"
            rows.append(row)
        rows.sort(key=lambda r: (r["net"], r["T %"]))
        cols = [("net", "network", 0), ("T %", "T %", 1), ("policy", "policy", 0)]
        cols += [(label, f"{label}: saved % over re-splits (violations)", 0) for label, _ in runs]
        how = "Cross-fitted guaranteed" if block == "cheap-heads" else "Guaranteed"
        note = (f"{how} policies (delta = 0.1): FLOPs saved averaged over 100 random re-splits of val + test, and the "
                "share of those re-splits whose test drop exceeded T. Oracles (test): "
                + "; ".join(f"{label} " + ", ".join(f"ResNet-{d} {100 * o:.1f} %" for d, o in sorted(oracle[label].items()))
                            for label, _ in runs if label in (runs[0][0], cheap)) + ".")
        out[block] = note + "\n\n" + table(rows, cols)
    return out


def class_thresholds_blocks() -> dict[str, str]:
    """bench/class_thresholds.py: one threshold per exit against one per exit and predicted class, side by side
    per network, risk and tolerance."""
    res = _load("class_thresholds")
    if not res:
        return {}
    env = res.get("environment", {})
    by = {(r["model"], r["risk"], r["T %"], r["thresholds"]): r for r in res["rows"]}
    rows = []
    for (model, risk, tol, kind), r in by.items():
        if kind != "per-exit" or (model, risk, tol, "per-class") not in by:
            continue
        c = by[(model, risk, tol, "per-class")]
        row = {"net": f"ResNet-{model.removeprefix('resnet')}", "risk": risk, "T %": tol}
        for key, label in (("resplit %", "resplit"), ("family, test-picked %", "family"),
                           ("hindsight %", "hindsight")):
            row[label] = f"{r[key]:.1f} / {c[key]:.1f}"
        row["viol"] = f"{100 * r['violations']:.0f} / {100 * c['violations']:.0f}"
        row["vt"] = f"{r['val->test %']:.1f} ({r['val->test risk %']:.2f}) / {c['val->test %']:.1f} ({c['val->test risk %']:.2f})"
        rows.append(row)
    note = (f"Results file written {env.get('date', '?')} at commit {env.get('commit', '?')} "
            f"(`python bench/class_thresholds.py`, {res['seconds'] / 60:.0f} min, "
            f"`bench/results/class_thresholds.json`). Cheap heads, max-softmax scores, every candidate exit kept; "
            "each cell: one threshold per exit / one per exit and predicted class. \"resplit\": FLOPs saved by the "
            "train family certified on val (delta = 0.1), averaged over "
            f"{res['args']['resplits']} re-splits of val + test, with the share of them whose test risk exceeded T "
            "(\"violations\"); \"family\": the best row of the train family on the test labels (hindsight along "
            "the family); \"hindsight\": a family built on the test labels, read at T; \"val -> test\": a family "
            "built on val, read at T on val and applied to test (saving, and test risk in %).")
    return {"class-thresholds": note + "\n\n" + table(rows, [
        ("net", "network", 0), ("risk", "risk", 0), ("T %", "T %", 1), ("resplit", "certified, saved % over re-splits", 0),
        ("viol", "violations %", 0), ("family", "train family, test-picked %", 0), ("hindsight", "hindsight on test %", 0),
        ("vt", "val -> test % (test risk %)", 0)])}


def drop_test_power_blocks() -> dict[str, str]:
    """bench/drop_test_power.py: the labelled drop certified by the core's WSR test against a z-test reference."""
    res = _load("drop_test_power")
    if not res:
        return {}
    env = res.get("environment", {})
    rows = [{**r, "net": f"ResNet-{r['model'].removeprefix('resnet')}",
             "wsr": f"{r['wsr saved %']:.1f} ({r['wsr mean drop %']:.2f}, {100 * r['wsr violations']:.0f} %)",
             "z": f"{r['z saved %']:.1f} ({r['z mean drop %']:.2f}, {100 * r['z violations']:.0f} %)",
             "gain": r["z saved %"] - r["wsr saved %"]} for r in res["rows"]]
    note = (f"Results file written {env.get('date', '?')} at commit {env.get('commit', '?')} "
            f"(`python bench/drop_test_power.py`, {res['seconds'] / 60:.0f} min, `bench/results/drop_test_power.json`). "
            f"Cheap heads; each policy fitted once on train, then certified on {res['args']['resplits']} re-splits of "
            "val + test (2,000 / 3,000) by each test along the same family; cells: FLOPs saved % averaged over the "
            "re-splits (mean test drop in points, share of re-splits whose test drop exceeded T).")
    sim = res.get("simulated")
    if sim:
        note += (f" Simulated first ({sim['draws']} calibration sets of {sim['n']:,} samples, T = {sim['alpha %']:g} %, "
                 f"gain {sim['gain %']:g} %): WSR certifies in half of them up to a true drop of "
                 f"{sim['wsr half-power drop %']:.2f} %, the z-test up to {sim['z half-power drop %']:.2f} %.")
    return {"drop-test-power": note + "\n\n" + table(rows, [
        ("net", "network", 0), ("T %", "T %", 1), ("policy", "policy", 0), ("wsr", "WSR (the core)", 0),
        ("z", "z-test reference (not valid)", 0), ("gain", "z - WSR, points", 1)])}


def replace_blocks(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    done = []
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
            done.append(name)
    return text, done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the blocks instead of updating the page")
    args = ap.parse_args(argv)
    pages = {DOC: {**core_blocks(), **peers_blocks(), **generality_blocks(), **runtime_blocks()},
             POLICIES_DOC: {**policies_blocks(), **policies_blocks("policies_mixup"), **levers_blocks(),
                            **guarantee_blocks(), **head_comparison_blocks(),
                            **policies_blocks("policies_cheap_crossfit"), **class_thresholds_blocks(),
                            **drop_test_power_blocks()}, NNI_DOC: nni_blocks(),
             REPO / "docs" / "optuna.md": {**outer_certified_blocks(), **outer_certified_blocks(
                 "outer_certified_crossfit3", "outer-certified-crossfit3")}}
    if args.print:
        for blocks in pages.values():
            for name, body in blocks.items():
                print(f"<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\n")
        return 0
    for doc, blocks in pages.items():
        if not blocks:
            continue
        text, done = replace_blocks(doc.read_text(), blocks)
        doc.write_text(text)
        missing = sorted(set(blocks) - set(done))
        print(f"updated {', '.join(done) or 'nothing'} in {doc.relative_to(REPO)}"
              + (f"; no markers for {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
