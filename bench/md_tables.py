"""Render benchmark JSON results as Markdown tables into docs/benchmarks.md.

Each generated table sits between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``
markers in ``docs/benchmarks.md``; this script replaces only those blocks, so the
hand-written text (and other benchmarks' sections) stay as they are.

Usage: ``python bench/md_tables.py`` (after ``bench/peers.py``, ``bench/generality.py``,
``bench/cifar10_resnet.py``); ``--print`` writes the blocks to stdout instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"


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
    path = RESULTS / "peers.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
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
    path = RESULTS / "generality.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
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
    path = RESULTS / "cifar10_resnet.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    cols = [("model", "model", 0), ("tolerance %", "tolerance %", 1), ("exits kept", "exits kept", 0),
            ("backbone acc %", "backbone acc %", 2), ("early-exit acc %", "early-exit acc %", 2),
            ("drop pts", "drop pts", 2), ("MFLOPs/sample", "MFLOPs/sample", 2), ("saving %", "FLOPs saved %", 1),
            ("oracle saving %", "oracle %", 1), ("share of oracle", "share of oracle", 2),
            ("bs1 ratio", "CPU bs1 vs backbone", 2), ("bs32 ratio", "CPU bs32 vs backbone", 2)]
    env = res.get("environment", {})
    return {"core": f"Run {env.get('date', '?')} at commit {env.get('commit', '?')}.\n\n" + table(res["rows"], cols)}


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
    blocks = {**core_blocks(), **peers_blocks(), **generality_blocks()}
    if args.print:
        for name, body in blocks.items():
            print(f"<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\n")
        return 0
    text, done = replace_blocks(DOC.read_text(), blocks)
    DOC.write_text(text)
    missing = sorted(set(blocks) - set(done))
    print(f"updated {', '.join(done) or 'nothing'} in {DOC.relative_to(REPO)}"
          + (f"; no markers for {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
