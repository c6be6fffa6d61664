"""Does a gate trained with labels let more inputs out under the labelled budget? (issue 8, a signal lever)

The ``gate`` policy's exit gate (``autoexit.policies.gate.train_gate``) is trained label-free to predict "this
exit agrees with the backbone". Under the *labelled* risk (``+drop``: the accuracy drop itself) an exit also
costs nothing where the backbone is wrong: the drop counts only "exit wrong, backbone right" (+1) against
"exit right, backbone wrong" (-1). With labels on the fit split, a gate could be trained to predict "this
exit is harmless" (not: exit wrong and backbone right) instead, as ``GatePolicy(target="harmless")`` does. This
script measures, per exit and without the policies' machinery, whether that target ranks the inputs an exit may
let out any better (``bench/policies.py``'s row ``gate[harmless]+drop`` measures the policy itself).

Setup: the heads, recording and split of ``bench/policies.py`` (the core's default heads, an exit after
every residual block, 50/20/30, seed 0). Gates of the core's design (``GateConfig()``: features of the exit's
own logits, the two previous exits' and the activation; MLP of width 16; the core's ``train_gate``) are
trained per exit on the train split's 2-fold out-of-fold predictions (what ``EnableConfig(cross_fit=2)``
fits on, temperatures fitted there), one per target:

* ``agree``: the core's label-free target;
* ``harmless``: not (exit wrong and backbone right), which reads the train labels
  (``GateConfig(target="harmless")``, what ``GatePolicy(target="harmless")`` trains).

Score per exit and split (val, test), with ``max_softmax`` of the scaled logits as the reference: the share
of the split that the exit could let out *on its own*, its highest-scoring inputs first, before its accuracy
drop (labelled) or its disagreement with the backbone (label-free) exceeds 1 % of the split. This is
hindsight per exit (no certificate, no cascade); it says how well a score ranks the inputs for each risk.

    python bench/gate_targets.py                 # ResNet-20 and ResNet-56, about 1 min with cached heads
    python bench/gate_targets.py --depths 20

Writes ``bench/results/gate_targets.json``. Heads and out-of-fold predictions come from the caches of
``bench/policies.py`` and ``bench.head_levers.out_of_fold`` (computed when missing: about 12 min for
ResNet-20's fold heads and 40 for ResNet-56's on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, require_fixtures, write_results  # noqa: E402

BUDGET = 0.01
TARGETS = ("agree", "harmless")


def share_at_budget(score: np.ndarray, loss: np.ndarray, budget: float = BUDGET) -> float:
    """Largest share of the split that can exit in descending ``score`` order with the summed ``loss``
    (per input, e.g. +1 / 0 / -1 for the drop) at most ``budget`` times the split's size at that point."""
    order = np.argsort(-score, kind="stable")
    ok = np.nonzero(np.cumsum(loss[order]) <= budget * len(score))[0]
    return float(ok.max() + 1) / len(score) if len(ok) else 0.0


def losses(pred: np.ndarray, backbone: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per input, what letting it out at this exit costs: the drop (labelled) and the disagreement."""
    wrong, bb_wrong = pred != labels, backbone != labels
    return {"drop": (wrong & ~bb_wrong).astype(np.int64) - (~wrong & bb_wrong).astype(np.int64),
            "disagreement": (pred != backbone).astype(np.int64)}


def run_depth(depth: int, log) -> dict:
    import torch

    from autoexit.calibrate import calibrate_temperatures
    from autoexit.policies.gate import GateConfig, fit_gate_features, train_gate
    from bench.policies import cross_fitted_data, setup, split_data

    t0 = time.perf_counter()
    cfg, _, _, rec, heads = setup(depth)
    data = cross_fitted_data(depth, rec, heads, split_data(rec, heads), 2, cfg.train, log)
    fit, stats_fit = data["train"]
    temps = torch.as_tensor(calibrate_temperatures(fit), dtype=torch.float32)
    gcfg = GateConfig()  # the features (history, statistics) are the same for both targets

    def scaled(p):
        return p.logits.to(torch.float32) / temps.view(-1, 1, 1)

    z = {s: scaled(data[s][0]) for s in ("train", "val", "test")}
    rows = []
    for k, name in enumerate(fit.names):
        prev = {s: [z[s][j] for j in range(max(0, k - gcfg.history), k)] for s in z}
        feats = {s: fit_gate_features(z[s][k], prev[s], data[s][1][k], gcfg) for s in z}
        gates = {t: train_gate(z["train"][k], prev["train"], stats_fit[k], fit.backbone_logits,
                               GateConfig(target=t), labels=fit.labels) for t in TARGETS}
        for s in ("val", "test"):
            p = data[s][0]
            pred = z[s][k].argmax(1).numpy()
            loss = losses(pred, p.backbone_logits.argmax(1).numpy(), p.labels.numpy())
            scores = {"max_softmax": z[s][k].softmax(1).max(1).values.numpy(),
                      **{f"gate ({t})": gates[t].score_features(feats[s]).numpy() for t in TARGETS}}
            for risk, ls in loss.items():
                rows.append({"model": f"resnet{depth}", "exit": name, "split": s, "risk": risk,
                             **{sig: 100 * share_at_budget(sc, ls) for sig, sc in scores.items()}})
    log(f"resnet{depth}: {len(fit.names)} exits, {time.perf_counter() - t0:.0f} s")
    return {"depth": depth, "exits": list(fit.names), "rows": rows}


def summary(rows: list[dict]) -> list[dict]:
    """Mean share over exits, per network, split and risk."""
    out = []
    keys = sorted({(r["model"], r["split"], r["risk"]) for r in rows}, key=lambda t: (int(t[0][6:]), t[1], t[2]))
    for m, s, risk in keys:
        sel = [r for r in rows if (r["model"], r["split"], r["risk"]) == (m, s, risk)]
        out.append({"model": m, "split": s, "risk": risk, "exits": len(sel),
                    **{sig: float(np.mean([r[sig] for r in sel])) for sig in
                       ("max_softmax", "gate (agree)", "gate (harmless)")},
                    "harmless better at": f"{sum(r['gate (harmless)'] > r['gate (agree)'] for r in sel)}/{len(sel)}"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    args = ap.parse_args(argv)
    require_fixtures()
    command = " ".join(["python bench/gate_targets.py", *(sys.argv[1:] if argv is None else argv)])
    depths = {str(d): run_depth(d, lambda m: print(m, flush=True)) for d in args.depths}
    rows = [r for d in depths.values() for r in d["rows"]]
    summ = summary(rows)
    print_table(summ, f"Share of the split one exit could let out alone at <= {100 * BUDGET:g} % of the split "
                      "(mean over exits, %)")
    write_results("gate_targets", {"command": command, "budget": BUDGET, "depths": depths, "summary": summ})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
