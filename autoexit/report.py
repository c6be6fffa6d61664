"""The HTML/JSON report of an early-exit run.

``build_report(result)`` gathers the numbers (``report.json``);
``render_html(report, result)`` draws the plots with matplotlib (Agg, embedded
as PNG) and writes one self-contained page. Searches add sections through
``result.extra["report_sections"]``: a list of ``(title, html)`` and
``result.extra["report_figures"]``: a list of ``(title, matplotlib Figure)``.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import EnableResult

__all__ = ["build_report", "render_html", "threshold_curves", "fig_to_html"]


def threshold_curves(scores: np.ndarray, agree: np.ndarray, correct: np.ndarray | None, grid: np.ndarray):
    """Individual (no earlier exits) hit rate, agreement and GT accuracy among hits vs threshold."""
    hr, ag, ac = [], [], []
    for t in grid:
        hit = scores >= t
        hr.append(float(hit.mean()))
        ag.append(float(agree[hit].mean()) if hit.any() else np.nan)
        ac.append(float(correct[hit].mean()) if correct is not None and hit.any() else np.nan)
    return np.array(hr), np.array(ag), np.array(ac)


def build_report(result: EnableResult) -> dict:
    val = result.val
    temps = [result.temperatures[n] for n in val.names]
    scores = val.scores(temps, result.config.signal).numpy()
    agree = val.agree().numpy()
    correct = val.correct()
    correct = correct.numpy() if correct is not None else None
    grid = np.linspace(0.0, 1.0, 41)
    per_head = []
    for i, name in enumerate(val.names):
        h = result.heads[name]
        hr, ag, ac = threshold_curves(scores[i], agree[i], correct[i] if correct is not None else None, grid)
        per_head.append({
            **h.summary(),
            "temperature": result.temperatures[name],
            "kept": name in result.kept,
            "flops_before": h.point.flops_before,
            "flops_after": h.point.flops_after,
            "curve": {"threshold": grid.tolist(), "hit_rate": hr.tolist(),
                      "agreement": [None if np.isnan(v) else v for v in ag],
                      "accuracy": [None if np.isnan(v) else v for v in ac]},
        })
    return {
        "config": result.config.to_dict(),
        "backbone": {"class": type(result.backbone.model).__name__, "flops": result.backbone.total_flops,
                     "num_classes": result.backbone.num_classes, "hash": result.backbone.hash},
        "kept": result.kept,
        "subset": result.subset.to_dict(),
        "heads": per_head,
        "metrics": {k: {kk: vv for kk, vv in v.items() if kk != "exit_index"} for k, v in result.metrics.items()},
        "latency": result.latency,
        "timings": result.timings,
        "search": result.extra.get("search"),
    }


def fig_to_html(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _plots(rep: dict) -> list[tuple[str, object]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    heads = rep["heads"]
    if heads:
        cols = min(4, len(heads))
        rows = int(np.ceil(len(heads) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, h in zip(axes.flat, heads):
            c = h["curve"]
            t = np.array(c["threshold"])
            ax.plot(t, c["hit_rate"], label="hit rate")
            ax.plot(t, [np.nan if v is None else v for v in c["agreement"]], label="agreement on hits")
            if any(v is not None for v in c["accuracy"]):
                ax.plot(t, [np.nan if v is None else v for v in c["accuracy"]], label="GT accuracy on hits")
            ax.set_title(f"{h['point']}{' (kept)' if h['kept'] else ''}", fontsize=9)
            ax.set_xlabel("threshold", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(heads):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Each exit alone on val: hit rate / agreement / accuracy vs threshold", fontsize=10)
        fig.tight_layout()
        figs.append(("Exits vs threshold (val)", fig))

        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(heads) + 2), 3.2))
        names = [h["point"] for h in heads]
        before = np.array([h["flops_before"] for h in heads], dtype=float)
        head = np.array([h["flops"] for h in heads], dtype=float)
        ax.bar(names, before / 1e6, label="backbone up to the point")
        ax.bar(names, head / 1e6, bottom=before / 1e6, label="exit head")
        ax.axhline(rep["backbone"]["flops"] / 1e6, color="k", ls="--", lw=1, label="whole backbone")
        ax.set_ylabel("MFLOPs per sample")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.legend(fontsize=7)
        ax.set_title("FLOPs breakdown per exit point", fontsize=10)
        fig.tight_layout()
        figs.append(("FLOPs breakdown", fig))

    m = rep["metrics"]["test"]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(m["exit_rates"]) + 2), 3))
    ax.bar([*rep["kept"], "backbone"], np.array(m["exit_rates"]) * 100)
    ax.set_ylabel("% of test samples")
    ax.set_title("Where test samples leave", fontsize=10)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    figs.append(("Exit distribution (test)", fig))
    return figs


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def render_html(rep: dict, result: EnableResult | None = None) -> str:
    summary = _table(result.summary_rows()) if result is not None else ""
    splits = []
    for split in ("val", "test"):
        m = rep["metrics"][split]
        splits.append((split, m["n"], _pct(m.get("backbone_accuracy")), _pct(m.get("accuracy")),
                       _pct(m.get("accuracy_drop")), _pct(m["agreement"]), f"{m['expected_flops']:,.0f}",
                       _pct(m["saving"]), _pct(m["oracle_saving"])))
    split_table = _table(splits, ("split", "n", "backbone acc", "early-exit acc", "drop", "agreement",
                                  "FLOPs/sample", "saved", "oracle saved"))
    head_rows = [(h["point"], "yes" if h["kept"] else "", h["spec"] and _spec_str(h["spec"]), f"{h['flops']:,}",
                  f"{h['params']:,}", _pct(h["val_agreement"]), f"{h['temperature']:.3f}", h["epochs"])
                 for h in rep["heads"]]
    head_table = _table(head_rows, ("point", "kept", "head", "FLOPs", "params", "val agreement", "temperature",
                                    "epochs"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>autoexit report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f3f3f3}img{max-width:100%}h2{border-bottom:1px solid #ddd}</style></head><body>",
        f"<h1>autoexit report: {html.escape(rep['backbone']['class'])}</h1>",
        "<p>Thresholds and the kept exits were chosen on <b>val</b>; <b>test</b> numbers are held out. "
        "FLOPs are true FLOPs (torch FlopCounterMode, 2 per multiply-add), per sample, heads included.</p>",
        summary,
        "<h2>Val and test</h2>", split_table,
        "<h2>Exit heads</h2>", head_table,
    ]
    if rep.get("latency"):
        lat = rep["latency"]
        rows = [(name, *[f"{v:.3f}" for v in d.values()]) for name, d in lat["per_sample_ms"].items()]
        bs = list(next(iter(lat["per_sample_ms"].values())).keys())
        parts += ["<h2>CPU latency (ms per sample, same run)</h2>", _table(rows, ("model", *[f"batch {b}" for b in bs]))]
    for title, fig in _plots(rep):
        parts += [f"<h2>{html.escape(title)}</h2>", fig_to_html(fig)]
    if result is not None:
        for title, fig in result.extra.get("report_figures", []):
            parts += [f"<h2>{html.escape(title)}</h2>", fig_to_html(fig)]
        for title, body in result.extra.get("report_sections", []):
            parts += [f"<h2>{html.escape(title)}</h2>", body]
    parts.append("</body></html>")
    return "\n".join(parts)


def _spec_str(spec: dict) -> str:
    from .heads import HeadSpec

    return HeadSpec.from_dict(spec).describe()
