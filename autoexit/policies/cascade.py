"""Cascades of exits on recorded predictions: scores, simulation, the ordered family, risk control, exit set.

Terms. A *chain* is the ordered list of kept exits (candidate indices). A
*table* (:class:`ExitTable`) holds, for one split, every candidate exit's
temperature-scaled logits (float32, as the model computes them), optional
activation statistics, the backbone's logits and the labels when known.
Rules (:mod:`autoexit.policies.rules`) turn a chain and a table into a score
matrix ``S[j, i]`` (exit j of the chain, sample i); thresholds ``theta[j]``
decide: sample i leaves at the first j with ``S[j, i] >= theta[j]``.

The family. :func:`greedy_path` builds, on *fit* data only, an ordered
sequence of threshold vectors from "nobody exits" to "many exit": each step
lowers one exit's threshold by a small chunk of samples, choosing the exit
whose next chunk saves the most FLOPs per unit of added risk (a knapsack
greedy, with look-ahead over chunk sizes so a single bad sample does not wall
off a good stretch). Thresholds only go down along the path, so every
sample's exit only moves earlier: cost falls monotonically and risk rises
(almost) monotonically, which is what fixed-sequence testing needs for power.
:func:`certify` then runs Learn-then-Test over the path on the *calibration*
data, which nothing else has seen.

The exit set. :func:`select_chain` chooses the kept exits by the expected
FLOPs on fit data at the risk the calibration step is expected to certify
(K(S) generalised to any rule: a head that rarely fires costs more than it
saves and is dropped), by greedy forward selection and backward pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import AutoExitError
from .risk import RiskControlResult, fixed_sequence, max_admissible_count
from .rules import GateRule, activation_stats, gate_features

__all__ = [
    "RISKS",
    "ExitTable",
    "ExitCosts",
    "rule_scores",
    "chain_scores",
    "loss_matrix",
    "chain_costs",
    "simulate",
    "greedy_path",
    "certify",
    "select_chain",
    "target_risk",
]

RISKS = {"disagreement": "binomial", "harm": "binomial", "drop": "wsr"}
RISK_TEXT = {
    "disagreement": "share of answers that differ from the backbone's (an upper bound of the accuracy drop)",
    "harm": "share of samples the backbone gets right and the early-exit model gets wrong "
            "(an upper bound of the accuracy drop)",
    "drop": "accuracy drop",
}


@dataclass
class ExitTable:
    """One split: every candidate exit's scaled logits (float32), optional activation stats, backbone logits."""

    names: list[str]
    z: list[torch.Tensor]
    backbone_logits: torch.Tensor
    labels: torch.Tensor | None = None
    stats: list[torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.backbone_logits.shape[0])

    @classmethod
    def from_predictions(cls, preds, temperatures: Sequence[float], stats: Sequence[torch.Tensor] | None = None,
                         labels: bool = True) -> ExitTable:
        """From :class:`autoexit.calibrate.ExitPredictions` and one temperature per exit (same order)."""
        t = torch.as_tensor(list(temperatures), dtype=torch.float32)
        z = [(preds.logits[i].float() / t[i]) for i in range(len(preds.names))]
        return cls(list(preds.names), z, preds.backbone_logits, preds.labels if labels else None,
                   list(stats) if stats is not None else None)

    def subset_rows(self, idx: np.ndarray | torch.Tensor) -> ExitTable:
        ix = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ExitTable(self.names, [z[ix] for z in self.z], self.backbone_logits[ix],
                         self.labels[ix] if self.labels is not None else None,
                         [s[ix] for s in self.stats] if self.stats is not None else None)

    @property
    def bpred(self) -> np.ndarray:
        return self.backbone_logits.argmax(1).numpy()

    def pred(self, chain: Sequence[int]) -> np.ndarray:
        return np.stack([self.z[i].argmax(1).numpy() for i in chain]) if chain else np.zeros((0, self.n), int)


@dataclass(frozen=True)
class ExitCosts:
    """Per candidate exit, per sample: head cost ``c1[i]`` and backbone cost ``before[i]`` up to exit point i;
    ``base``: the whole backbone (C2 of K(S) is ``base - before``); ``fixed``: what a sample pays, once, for going on
    past an exit, beyond its stages, heads and decisions (measured latency only: the backbone resumed after
    an exit's head runs slower than the straight-line backbone; 0 for FLOPs), added to every path of a
    non-empty chain except an answer at its first exit.

    ``unit``: ``flops`` (counted; the default) or ``ms`` (timed on a device evaluator,
    :func:`autoexit.cost.exit_latency_costs`); ``source`` says how the costs were obtained; ``calibration``:
    how measured latency costs were corrected, or ``None``. The one cost type of the policies, the outer
    search and the partitioner.
    """

    c1: np.ndarray
    before: np.ndarray
    base: float
    unit: str = "flops"
    source: str = ""
    calibration: Mapping[str, Any] | None = None
    fixed: float = 0.0

    def __post_init__(self):
        c1 = np.asarray(self.c1, dtype=np.float64)
        before = np.asarray(self.before, dtype=np.float64)
        if c1.shape != before.shape or c1.ndim != 1:
            raise AutoExitError(f"cost arrays must be one value per exit: c1 {c1.shape}, before {before.shape}")
        if not (np.isfinite(c1).all() and np.isfinite(before).all() and (c1 >= 0).all() and (before >= 0).all()):
            raise AutoExitError("exit costs must be finite and non-negative")
        if not float(self.base) > 0:
            raise AutoExitError(f"the backbone's cost must be > 0, got {self.base}")
        if not (math.isfinite(float(self.fixed)) and float(self.fixed) >= 0):
            raise AutoExitError(f"the fixed cost of going on past an exit must be finite and >= 0, got {self.fixed}")
        object.__setattr__(self, "fixed", float(self.fixed))
        object.__setattr__(self, "c1", c1)
        object.__setattr__(self, "before", before)
        object.__setattr__(self, "base", float(self.base))

    @property
    def c2(self) -> np.ndarray:
        return np.maximum(self.base - self.before, 0.0)

    def to_dict(self) -> dict:
        d = {"unit": self.unit, "c1": self.c1.tolist(), "before": self.before.tolist(), "base": self.base,
             "fixed": self.fixed, "source": self.source}
        if self.calibration is not None:
            d["calibration"] = dict(self.calibration)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ExitCosts:
        return cls(np.asarray(d["c1"]), np.asarray(d["before"]), float(d["base"]), d.get("unit", "flops"),
                   d.get("source", ""), d.get("calibration"), float(d.get("fixed", 0.0)))


def stats_from_activations(acts: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """:func:`~autoexit.policies.rules.activation_stats` of recorded activations, in chunks."""
    return torch.cat([activation_stats(acts[i : i + batch]) for i in range(0, len(acts), batch)]) \
        if len(acts) else torch.zeros(0, 2)


def rule_scores(rule: torch.nn.Module, z: torch.Tensor, prev: list[torch.Tensor],
                stats: torch.Tensor | None) -> torch.Tensor:
    """Scores of ``rule`` on recorded rows, exactly as the scripted model computes them."""
    with torch.no_grad():
        if isinstance(rule, GateRule):
            st = stats if (stats is not None and rule.act_stats) else torch.zeros(z.shape[0], 2)
            f = gate_features(z, prev, st, rule.history, rule.onehot, rule.act_stats)
            return rule.score_features(f)
        dummy = torch.zeros(z.shape[0], 1)
        return rule(z, prev, dummy)


def chain_scores(rules: Sequence[torch.nn.Module], chain: Sequence[int], table: ExitTable) -> np.ndarray:
    """[len(chain), n] scores (float64 copies of the float32 model scores)."""
    out = []
    for j, (rule, e) in enumerate(zip(rules, chain)):
        hist = int(getattr(rule, "history", 0))
        prev = [table.z[i] for i in chain[max(0, j - hist) : j]] if hist else []
        stats = table.stats[e] if table.stats is not None else None
        out.append(rule_scores(rule, table.z[e], prev, stats).double().numpy())
    return np.stack(out) if out else np.zeros((0, table.n))


def loss_matrix(table: ExitTable, chain: Sequence[int], risk: str = "disagreement") -> np.ndarray:
    """[len(chain) + 1, n] loss of each sample if it exits at chain position j (last row: the backbone, 0)."""
    if risk not in RISKS:
        raise AutoExitError(f"unknown risk {risk!r}; use one of: {', '.join(RISKS)}")
    pred = table.pred(chain)
    bpred = table.bpred
    k, n = len(chain), table.n
    out = np.zeros((k + 1, n), dtype=np.float64)
    if risk == "disagreement":
        out[:k] = pred != bpred[None, :]
        return out
    if table.labels is None:
        raise AutoExitError(f"risk {risk!r} needs labels on the calibration data; give labelled data or use "
                            "risk='disagreement' (label-free)")
    y = table.labels.numpy()
    b_ok = (bpred == y)[None, :]
    e_ok = pred == y[None, :]
    out[:k] = (b_ok & ~e_ok) if risk == "harm" else (b_ok.astype(float) - e_ok.astype(float))
    return out


def chain_costs(costs: ExitCosts, chain: Sequence[int]) -> np.ndarray:
    """[len(chain) + 1] FLOPs of a sample exiting at chain position j (last: through the backbone):
    :func:`autoexit.subset.path_costs` of the chain's exits (every kept head up to and including the exit is
    paid, and ``costs.fixed`` by every path that goes on past the first kept exit)."""
    from ..subset import path_costs

    idx = list(chain)
    return path_costs(costs.c1[idx], costs.before[idx], costs.base, costs.fixed)


def simulate(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit position of every sample for each row of ``thresholds`` [M, k] (or [k]): [M, n] (or [n])."""
    s = np.asarray(scores, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64)
    one = thr.ndim == 1
    thr = np.atleast_2d(thr)
    k, n = s.shape
    m = thr.shape[0]
    exit_of = np.full((m, n), k, dtype=np.int64)
    reaching = np.ones((m, n), dtype=bool)
    for j in range(k):
        hit = reaching & (s[j][None, :] >= thr[:, j][:, None])
        exit_of[hit] = j
        reaching &= ~hit
    return exit_of[0] if one else exit_of


@dataclass
class Path:
    """Ordered family of threshold vectors (row 0: nobody exits) with their fit-data risk and FLOPs."""

    thresholds: np.ndarray  # [M, k]
    fit_risk: np.ndarray  # [M]
    fit_flops: np.ndarray  # [M], mean per sample

    def flops_at(self, risk: float) -> float:
        ok = np.nonzero(self.fit_risk <= risk + 1e-12)[0]
        return float(self.fit_flops[ok[-1]]) if ok.size else float(self.fit_flops[0])


def greedy_path(scores: np.ndarray, losses: np.ndarray, exit_cost: np.ndarray, chunk: int | None = None,
                max_risk: float = 0.05, lookahead: Sequence[int] = (1, 2, 4, 8, 16)) -> Path:
    """The ordered family on fit data (see the module doc). ``losses`` [k + 1, n]; ``exit_cost`` [k + 1] (what a
    sample exiting at each position costs, :func:`chain_costs`) or [k + 1, n] (per sample, when what a sample pays
    depends on the sample, e.g. a head that runs only on some inputs)."""
    s = np.asarray(scores, dtype=np.float64)
    k, n = s.shape
    loss = np.asarray(losses, dtype=np.float64)
    cost = np.asarray(exit_cost, dtype=np.float64)
    if cost.shape not in ((k + 1,), (k + 1, n)):
        raise AutoExitError(f"exit costs must be [{k + 1}] or [{k + 1}, {n}] for {k} exits and {n} samples, "
                            f"got {list(cost.shape)}")
    first = float(cost[k]) if cost.ndim == 1 else (float(cost[k].mean()) if n else 0.0)
    if cost.ndim == 1:
        cost = np.broadcast_to(cost[:, None], (k + 1, n))
    thr = np.full(k, np.inf)
    rows, risks, flops = [thr.copy()], [0.0], [first]
    if k == 0 or n == 0:
        return Path(np.array(rows).reshape(1, k), np.array(risks), np.array(flops))
    order = np.argsort(-s, axis=1, kind="stable")
    ss = np.take_along_axis(s, order, axis=1)
    exit_of = np.full(n, k, dtype=np.int64)
    ptr = np.zeros(k, dtype=np.int64)
    b = int(chunk) if chunk else max(1, n // 400)
    total_loss = 0.0
    total_cost = float(cost[k].sum())
    while True:
        best = None
        for j in range(k):
            p0 = int(ptr[j])
            if p0 >= n:
                continue
            seq = order[j, p0:]
            reach = exit_of[seq] > j
            rel = np.flatnonzero(reach)
            if rel.size == 0:
                ptr[j] = n
                continue
            seen_end = -1
            for mult in lookahead:
                m = min(b * mult, rel.size)
                end = p0 + int(rel[m - 1]) + 1
                while end < n and ss[j, end] == ss[j, end - 1]:
                    end += 1
                if end == seen_end:
                    continue
                seen_end = end
                members = seq[: end - p0][reach[: end - p0]]
                old = exit_of[members]
                d_cost = float((cost[j, members] - cost[old, members]).sum())
                d_loss = float((loss[j, members] - loss[old, members]).sum())
                saving = -d_cost
                if saving <= 0:
                    continue
                key = (1, saving) if d_loss <= 0 else (0, saving / d_loss)
                if best is None or key > best[0]:
                    best = (key, j, end, members, d_cost, d_loss)
                if m == rel.size:
                    break
        if best is None:
            break
        _, j, end, members, d_cost, d_loss = best
        exit_of[members] = j
        ptr[j] = end
        thr[j] = (ss[j, end - 1] + ss[j, end]) / 2.0 if end < n else -np.inf
        total_loss += d_loss
        total_cost += d_cost
        rows.append(thr.copy())
        risks.append(total_loss / n)
        flops.append(total_cost / n)
        if total_loss / n > max_risk:
            break
    return Path(np.array(rows), np.array(risks), np.array(flops))


def target_risk(alpha: float, n_cal: int, delta: float, risk: str) -> float:
    """The empirical risk that calibration on ``n_cal`` samples can certify at level ``alpha``: the operating
    point at which to compare exit sets on fit data."""
    if RISKS.get(risk) == "binomial":
        k = max_admissible_count(n_cal, alpha, delta)
        return max(k, 0) / max(n_cal, 1)
    # WSR: roughly a normal margin on the drop's standard deviation (about sqrt(2 alpha))
    return max(0.0, alpha - 1.6 * np.sqrt(max(2 * alpha, 1e-6) / max(n_cal, 1)))


def certify(scores_cal: np.ndarray, losses_cal: np.ndarray, path_thresholds: np.ndarray, alpha: float,
            delta: float, risk: str = "disagreement", seed: int = 0) -> tuple[RiskControlResult, np.ndarray]:
    """Learn-then-Test (fixed sequence) over ``path_thresholds`` [M, k] on calibration data.

    Returns the result and the exit position of every calibration sample under each path row.
    The chosen thresholds are ``path_thresholds[result.index]`` (row 0, nobody exits, when
    nothing is certified: ``result.index == -1``).
    """
    exit_of = simulate(scores_cal, path_thresholds)
    n = exit_of.shape[1]
    per = np.take_along_axis(np.broadcast_to(losses_cal, (exit_of.shape[0], *losses_cal.shape)),
                             exit_of[:, None, :], axis=1)[:, 0, :] if n else np.zeros((exit_of.shape[0], 0))
    method = RISKS[risk]
    if method == "wsr":
        perm = np.random.default_rng(seed).permutation(n)  # a fixed order, independent of the losses
        per = per[:, perm]
        res = fixed_sequence(per, alpha, delta, "wsr", bounds=(-1.0, 1.0))
    else:
        res = fixed_sequence(per, alpha, delta, method)
    return res, exit_of


def select_chain(
    candidates: Sequence[int],
    evaluate: Callable[[list[int]], float],
    max_exits: int | None = None,
    rounds: int = 3,
) -> tuple[list[int], float, list[dict]]:
    """Greedy forward selection then backward pruning of exits by ``evaluate(chain) -> FLOPs per sample``
    (lower is better; the empty chain is the backbone). Returns (chain, FLOPs, trace)."""
    cand = sorted(int(c) for c in candidates)
    cache: dict[tuple[int, ...], float] = {}
    trace: list[dict] = []

    def ev(ch: list[int]) -> float:
        key = tuple(sorted(ch))
        if key not in cache:
            cache[key] = float(evaluate(list(key)))
            trace.append({"chain": list(key), "flops": cache[key]})
        return cache[key]

    chain: list[int] = []
    best = ev(chain)
    limit = max_exits if max_exits is not None else len(cand)
    for _ in range(rounds):
        changed = False
        while len(chain) < limit:  # forward: add the exit that lowers FLOPs most
            trials = [(ev(sorted(chain + [c])), c) for c in cand if c not in chain]
            if not trials:
                break
            f, c = min(trials)
            if f < best - 1e-9 * max(abs(best), 1.0):
                chain, best, changed = sorted(chain + [c]), f, True
            else:
                break
        while chain:  # backward: drop an exit whose removal lowers FLOPs
            trials = [(ev([x for x in chain if x != c]), c) for c in chain]
            f, c = min(trials)
            if f < best - 1e-9 * max(abs(best), 1.0):
                chain, best, changed = [x for x in chain if x != c], f, True
            else:
                break
        # swap: replace one kept exit by a candidate
        if chain:
            trials = [(ev(sorted([x for x in chain if x != c] + [d])), c, d)
                      for c in chain for d in cand if d not in chain]
            if trials:
                f, c, d = min(trials)
                if f < best - 1e-9 * max(abs(best), 1.0):
                    chain, best, changed = sorted([x for x in chain if x != c] + [d]), f, True
        if not changed:
            break
    return chain, best, trace
