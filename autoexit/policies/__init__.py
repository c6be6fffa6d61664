"""Exit policies: which exits to keep, what score decides an exit, and thresholds with a guaranteed budget.

A policy is chosen by name (``EnableConfig.policy``, ``--policy``) from a
registry; new ones register with ``@register_policy("name")``.

=============  ============================================================  ==========
name           exit score                                                    guarantee
=============  ============================================================  ==========
``gate``       learned gate per exit (own logits, 2 previous exits' logits,  yes
               activation mean/std), trained label-free on fit data
``patience``   previous exits predicting the same class, then max softmax    yes
``max_softmax`` / ``margin`` / ``entropy``  temperature-scaled confidence    yes
``paper003``   max softmax, thresholds by T/2^n on val, subset by K(S)       no
``auto``       the cheapest of several guaranteed policies (``candidates``)  yes
=============  ============================================================  ==========

``auto`` (:class:`AutoPolicy`) fits every candidate and deploys the cheapest. With ``select="cal"``
(default) each candidate is certified at ``delta / m`` for ``m`` candidates, so by the union bound every
certified configuration of every candidate is valid at once with probability >= 1 - delta, and the
cheapest one on the calibration data keeps the guarantee (the same argument as step 3 below). With
``select="fit"`` the candidate is chosen by its expected cost on the fit data alone, before calibration
is looked at, and certified at the full ``delta``.

Every guaranteed policy runs the same three steps (``RiskControlledPolicy``):

1. on *fit* data (the train split by default; never the calibration data):
   choose the exit set by expected FLOPs at the risk calibration can certify
   (:func:`~autoexit.policies.cascade.select_chain`), train the rules that need
   training (gates) and build the ordered family of threshold vectors
   (:func:`~autoexit.policies.cascade.greedy_path`);
2. on *calibration* data (the val split): Learn-then-Test with fixed-sequence
   testing along the family (:func:`~autoexit.policies.cascade.certify`);
3. among the certified configurations, the one that is cheapest on the
   calibration data is deployed, without the heads it never uses (an exit whose
   threshold is +inf, or that no sample can reach), and with no exit at all
   when no certified configuration is cheaper than the backbone
   (:func:`finalise`). Fixed-sequence testing controls the family-wise error,
   so every certified configuration (and the backbone, which has zero risk)
   is valid at once and this choice keeps the guarantee;
4. the result: with probability >= 1 - delta over the calibration draw, the
   risk of the deployed cascade on new data from the same distribution is
   <= the tolerance. ``risk="disagreement"`` (label-free, default) bounds the
   accuracy drop from above; ``risk="harm"`` / ``risk="drop"`` need labels on
   the calibration data and bound / control the accuracy drop itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..calibrate import SIGNALS, check_tolerance
from ..errors import AutoExitError
from .cascade import (
    RISK_TEXT,
    RISKS,
    ExitCosts,
    ExitTable,
    certify,
    chain_costs,
    chain_scores,
    greedy_path,
    loss_matrix,
    select_chain,
    simulate,
    target_risk,
)
from .gate import GateConfig, train_gate
from .risk import RiskControlResult, fixed_sequence
from .rules import ConfidenceRule, ExitRule, GateRule, PatienceRule

__all__ = [
    "POLICIES",
    "DEFAULT_POLICY",
    "register_policy",
    "make_policy",
    "PolicyContext",
    "FittedPolicy",
    "ExitPolicy",
    "RiskControlledPolicy",
    "ConfidencePolicy",
    "PatiencePolicy",
    "GatePolicy",
    "Paper003Policy",
    "AutoPolicy",
    "AUTO_CANDIDATES",
    "parse_candidate",
    "split_candidates",
    "needs_activation_stats",
    "ExitTable",
    "ExitCosts",
    "GateConfig",
    "RiskControlResult",
    "ExitRule",
    "ConfidenceRule",
    "PatienceRule",
    "GateRule",
    "fixed_sequence",
    "evaluate_thresholds",
    "finalise",
    "RISKS",
]

POLICIES: dict[str, Callable[..., ExitPolicy]] = {}
DEFAULT_POLICY = "max_softmax"


def register_policy(name: str):
    """Register a policy factory ``cls(**options) -> ExitPolicy`` under ``name``."""

    def deco(factory):
        POLICIES[name] = factory
        return factory

    return deco


def make_policy(name: str, **options) -> ExitPolicy:
    if name not in POLICIES:
        raise AutoExitError(f"unknown exit policy {name!r}; use one of: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**options)
    except TypeError as exc:
        raise AutoExitError(f"bad options for policy {name!r}: {exc}") from None


@dataclass
class PolicyContext:
    """What a policy sees. ``fit``: data for choosing exits, training gates and building the family;
    ``cal``: calibration data (the guarantee rests on it; nothing else may have used it)."""

    fit: ExitTable
    cal: ExitTable
    costs: ExitCosts
    tolerance: float  # percent
    delta: float = 0.1
    risk: str = "disagreement"
    max_exits: int | None = None
    seed: int = 0
    # paper-003 baseline settings
    scheme: str = "halving"
    basis: str = "total"
    signal: str = "max_softmax"
    exhaustive_limit: int = 16
    fixed_chain: bool = False  # keep every exit (cascade heads are trained along their chain)

    def __post_init__(self):
        check_tolerance(self.tolerance)
        if not 0 < self.delta < 1:
            raise AutoExitError(f"delta must be in (0, 1) (probability the budget may break), got {self.delta}")
        if self.risk not in RISKS:
            raise AutoExitError(f"unknown risk {self.risk!r}; use one of: {', '.join(RISKS)}")
        if self.fit.names != self.cal.names:
            raise AutoExitError("fit and calibration tables must list the same exits in the same order")

    @property
    def alpha(self) -> float:
        return self.tolerance / 100.0


@dataclass
class FittedPolicy:
    """A fitted policy: kept exits (chain of candidate indices), one rule and threshold per kept exit."""

    policy: str
    names: list[str]
    chain: list[int]
    rules: list[nn.Module]
    thresholds: np.ndarray
    risk: str
    guarantee: RiskControlResult | None = None
    info: dict = field(default_factory=dict)
    family: np.ndarray | None = None  # [M, k] the ordered threshold family the guarantee was tested along
    delta: float = 0.1
    alpha: float | None = None
    # the chain (names, candidate indices, rules) the family was built for, before finalise() dropped
    # unused heads, and the costs finalise() compared configurations with
    full: tuple[list[str], list[int], list[nn.Module]] | None = None
    costs: ExitCosts | None = None
    # ``auto``: every candidate's fitted policy (this one among them), to redo the choice on other data
    alternatives: list[FittedPolicy] | None = None

    @property
    def full_chain(self) -> tuple[list[str], list[int], list[nn.Module]]:
        """(names, candidate indices, rules) of the chain the family was built for (before finalise())."""
        return self.full if self.full is not None else (self.names, self.chain, self.rules)

    def recertify(self, cal: ExitTable, alpha: float | None = None, delta: float | None = None,
                  seed: int = 0) -> FittedPolicy:
        """Run the calibration step again on other calibration data (same exits, rules and family)."""
        if self.alternatives is not None:
            return _recertify_auto(self, cal, alpha, delta, seed)
        if self.family is None:
            raise AutoExitError(f"policy {self.policy!r} has no threshold family to recalibrate")
        a = self.alpha if alpha is None else alpha
        d = self.delta if delta is None else delta
        names, chain, rules = self.full_chain
        res, exit_of = certify(chain_scores(rules, chain, cal), loss_matrix(cal, chain, self.risk), self.family,
                               a, d, self.risk, seed)
        info = {**self.info, "cal_n": cal.n}
        if self.costs is None:
            return FittedPolicy(self.policy, names, chain, rules, self.family[max(res.index, 0)], self.risk, res,
                                info, self.family, d, a)
        return finalise(self.policy, names, chain, rules, self.family, res, exit_of, self.costs, self.risk, info)

    def full_scores(self, table: ExitTable) -> np.ndarray | dict[str, np.ndarray]:
        """Scores of the whole chain the threshold family was built for (before unused heads were dropped);
        compute them once and pass ``kept_scores(full)`` to :meth:`evaluate` of any recertified copy.
        For ``auto``: one such array per candidate, by name (a recertified copy may deploy another one)."""
        if self.alternatives is not None:
            return {n: a.full_scores(table) for n, a in zip(self.info["auto"]["candidates"], self.alternatives)}
        _, chain, rules = self.full_chain
        return chain_scores(rules, chain, table) if chain else np.zeros((0, table.n))

    def kept_scores(self, full_scores: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """This policy's rows of :meth:`full_scores` (an exit's score depends only on exits that are kept)."""
        if isinstance(full_scores, dict):
            full_scores = full_scores[self.info["auto"]["chosen"]]
        chain = self.full_chain[1]
        return full_scores[[chain.index(c) for c in self.chain]]

    def scores(self, table: ExitTable) -> np.ndarray:
        """[kept exits, n] scores of every sample of ``table`` (as the scripted model computes them)."""
        return chain_scores(self.rules, self.chain, table)

    def exit_positions(self, table: ExitTable) -> np.ndarray:
        """Exit of every sample (position in the kept chain; ``len(chain)`` = the backbone)."""
        return simulate(self.scores(table), self.thresholds)

    def evaluate(self, table: ExitTable, costs: ExitCosts, scores: np.ndarray | None = None) -> dict:
        """What the deployed cascade does on ``table``: FLOPs saving, disagreement, accuracy drop (if labels)."""
        return evaluate_thresholds(self.chain, self.scores(table) if scores is None else scores, self.thresholds,
                                   table, costs)

    def statement(self) -> str:
        if self.guarantee is None:
            return (f"no guarantee: thresholds estimated on the calibration split ({self.policy}); the budget "
                    "may be exceeded on new data")
        g = self.guarantee
        auto = self.info.get("auto")
        if auto is not None:  # the guarantee is the whole procedure's: delta over every candidate
            g = replace(g, delta=float(auto["delta"]))
        if not g.certified:
            return (f"nothing could be certified at {100 * g.alpha:.3g} % with {g.n} calibration samples "
                    f"(delta {g.delta}): no early exit is taken; give more data or a larger tolerance")
        out = g.statement(RISK_TEXT[self.risk])
        if auto is not None:
            m = len(auto["candidates"])
            out += (f"; {self.policy} chosen by auto among {m} policies "
                    + (f"on the calibration split, each tested at delta/{m}" if auto["select"] == "cal"
                       else "on the fit split, before calibration"))
        return out

    def to_dict(self) -> dict:
        d = {"policy": self.policy, "names": self.names, "thresholds": [float(t) for t in self.thresholds],
             "fit_chain": list(self.full_chain[0]), "risk": self.risk, "statement": self.statement(),
             "rules": [type(r).__name__ for r in self.rules], **{k: v for k, v in self.info.items()}}
        if self.guarantee is not None:
            d["guarantee"] = self.guarantee.to_dict()
        return d


def _kept_positions(thr: np.ndarray, history: bool) -> list[int]:
    """Positions of a chain whose heads a threshold vector uses: exits after one that takes every sample
    (-inf) are never reached; an exit at +inf never fires, and is dropped when no later rule reads its
    logits (rules without history; with history, only the never-firing exits after the last one that fires)."""
    k = len(thr)
    stop = next((j for j in range(k) if thr[j] == -np.inf), k - 1)
    reach = list(range(min(stop + 1, k)))
    fires = [j for j in reach if thr[j] != np.inf]
    if not history:
        return fires
    return reach[: fires[-1] + 1] if fires else []


def finalise(policy: str, names: Sequence[str], chain: Sequence[int], rules: Sequence[nn.Module],
             family: np.ndarray, res: RiskControlResult, exit_of: np.ndarray, costs: ExitCosts, risk: str,
             info: dict) -> FittedPolicy:
    """The deployed policy: the certified family row that is cheapest on the calibration data (its expected
    cost - FLOPs, or ms with latency costs - once unused heads are dropped), or no exit at all when none is
    cheaper than the backbone.

    ``exit_of`` [M, n]: exit position of every calibration sample under each family row (from
    :func:`~autoexit.policies.cascade.certify`). Every row up to ``res.index`` is certified at once
    (fixed-sequence testing controls the family-wise error) and the backbone alone has zero risk, so the
    choice keeps the guarantee. ``res.index`` becomes the chosen row; the last certified one is kept in
    ``info["last_certified_row"]``.
    """
    chain, names, rules = list(chain), list(names), list(rules)
    k = len(chain)
    history = any(int(getattr(r, "history", 0)) for r in rules)
    rows = range(res.index + 1) if res.index >= 0 else range(1)
    best = None  # (cal FLOPs, row, kept positions)
    for r in rows:
        keep = _kept_positions(family[r], history)
        where = np.full(k + 1, len(keep), dtype=np.int64)
        where[keep] = np.arange(len(keep))
        flops = float(chain_costs(costs, [chain[j] for j in keep])[where[exit_of[r]]].mean()) if k else costs.base
        if best is None or flops < best[0] - 1e-9 * costs.base:
            best = (flops, r, keep)
    flops, row, keep = best
    if flops >= costs.base:  # nothing certified beats running the backbone alone: row 0, nobody exits
        row, keep = 0, []
    chosen = replace(res, index=row if res.index >= 0 else -1)
    dropped = [names[j] for j in range(k) if j not in keep]
    info = {**info, "last_certified_row": res.index, "chosen_row": chosen.index, "dropped_exits": dropped,
            f"cal_{costs.unit}": min(flops, costs.base)}
    if costs.unit != "flops":
        info["cost_unit"] = costs.unit
        info["cost_source"] = costs.source
        info["costs"] = {"c1": [float(v) for v in costs.c1], "before": [float(v) for v in costs.before],
                         "base": float(costs.base), "fixed": float(costs.fixed)}  # per candidate exit, in backbone order
        if costs.calibration is not None:  # every figure of the timing (anchors, rounds, consistent, ...)
            info["cost_calibration"] = dict(costs.calibration)
    return FittedPolicy(policy, [names[j] for j in keep], [chain[j] for j in keep], [rules[j] for j in keep],
                        np.asarray(family[row], dtype=float)[keep], risk, chosen, info, family, res.delta, res.alpha,
                        (names, chain, rules), costs)


def evaluate_thresholds(chain: Sequence[int], scores: np.ndarray, thresholds: np.ndarray, table: ExitTable,
                        costs: ExitCosts, sample_costs: np.ndarray | None = None) -> dict:
    """FLOPs saving, disagreement with the backbone, accuracy drop and harm (backbone right, answer wrong; both
    when labelled) and exit rates: every risk a policy can certify (``RISKS``). ``sample_costs`` [k + 1, n]: what
    each sample pays at each chain position, when that depends on the sample (default: :func:`chain_costs`)."""
    k, n = len(chain), table.n
    pos = simulate(scores, thresholds) if k else np.zeros(n, dtype=np.int64)
    pred = np.vstack([table.pred(chain), table.bpred[None, :]])[pos, np.arange(n)]
    flops = chain_costs(costs, chain)[pos] if sample_costs is None else np.asarray(sample_costs)[pos, np.arange(n)]
    out = {"n": n, "saving": float(1 - flops.mean() / costs.base), "flops": float(flops.mean()),
           "disagreement": float((pred != table.bpred).mean()),
           "exit_rates": np.bincount(pos, minlength=k + 1).astype(float) / max(n, 1)}
    if table.labels is not None:
        y = table.labels.numpy()
        out["drop"] = float((table.bpred == y).mean() - (pred == y).mean())
        out["harm"] = float(((table.bpred == y) & (pred != y)).mean())
    return out


class ExitPolicy:
    """Base class: ``fit(context) -> FittedPolicy``."""

    name = "policy"
    guaranteed = True
    reads_activation_stats = False  # whether its rules read the activations' mean / std (ExitTable.stats)

    def fit(self, ctx: PolicyContext) -> FittedPolicy:  # pragma: no cover - interface
        raise NotImplementedError

    def check_risk(self, risk: str) -> None:
        """Raise a one-line ``AutoExitError`` if this policy, as configured, cannot serve ``risk``
        (checked before anything is trained)."""


class RiskControlledPolicy(ExitPolicy):
    """Exit set + ordered family on fit data, Learn-then-Test on calibration data (see the package doc).

    Subclasses provide ``rules_for(chain, fit, final) -> list of rules`` (``final=False``: cheap rules
    used while comparing exit sets).
    """

    search_chunk_divisor = 100  # coarse family while comparing exit sets: n_fit / 100 samples per step
    path_chunk_divisor = 400

    def rules_for(self, chain: Sequence[int], fit: ExitTable, final: bool) -> list[nn.Module]:
        raise NotImplementedError

    def fit_losses(self, ctx: PolicyContext, chain: Sequence[int]) -> np.ndarray:
        risk = ctx.risk if (ctx.risk == "disagreement" or ctx.fit.labels is not None) else "disagreement"
        return loss_matrix(ctx.fit, chain, risk)

    def fit(self, ctx: PolicyContext) -> FittedPolicy:
        if ctx.risk != "disagreement" and ctx.cal.labels is None:
            raise AutoExitError(f"risk {ctx.risk!r} needs labels on the calibration split; give labelled data "
                                "or use risk='disagreement' (label-free)")
        alpha, n_fit = ctx.alpha, ctx.fit.n
        r_star = target_risk(alpha, ctx.cal.n, ctx.delta, ctx.risk)
        max_risk = max(4 * alpha, alpha + 0.02)

        solo: dict[int, np.ndarray] = {}  # scores of rules that read no earlier exit depend on the exit only

        def scores_of(chain: list[int]) -> np.ndarray:
            rules = self.rules_for(chain, ctx.fit, final=False)
            if any(int(getattr(r, "history", 0)) for r in rules):
                return chain_scores(rules, chain, ctx.fit)
            for r, e in zip(rules, chain):
                if e not in solo:
                    solo[e] = chain_scores([r], [e], ctx.fit)[0]
            return np.stack([solo[e] for e in chain])

        def evaluate(chain: list[int]) -> float:
            if not chain:
                return ctx.costs.base
            s = scores_of(chain)
            path = greedy_path(s, self.fit_losses(ctx, chain), chain_costs(ctx.costs, chain),
                               chunk=max(1, n_fit // self.search_chunk_divisor), max_risk=2 * r_star + 1e-9)
            return path.flops_at(r_star)

        cand = list(range(len(ctx.fit.names)))
        if ctx.fixed_chain:
            chain, trace = cand, []
            fit_flops = evaluate(chain)
        else:
            chain, fit_flops, trace = select_chain(cand, evaluate, ctx.max_exits)
        rules = self.rules_for(chain, ctx.fit, final=True)
        s_fit = chain_scores(rules, chain, ctx.fit)
        path = greedy_path(s_fit, self.fit_losses(ctx, chain), chain_costs(ctx.costs, chain),
                           chunk=max(1, n_fit // self.path_chunk_divisor), max_risk=max_risk)
        s_cal = chain_scores(rules, chain, ctx.cal)
        res, exit_of = certify(s_cal, loss_matrix(ctx.cal, chain, ctx.risk), path.thresholds, alpha, ctx.delta,
                               ctx.risk, ctx.seed)
        info = {"fit_n": n_fit, "cal_n": ctx.cal.n, "target_fit_risk": r_star, "path_length": len(path.fit_risk),
                "fit_flops_at_target": fit_flops, "fit_cost_at_target": float(path.flops_at(r_star)),
                "subsets_scored": len(trace), "delta": ctx.delta,
                "tolerance_percent": ctx.tolerance}
        return finalise(self.name, [ctx.fit.names[i] for i in chain], chain, rules, path.thresholds, res, exit_of,
                        ctx.costs, ctx.risk, info)


@register_policy("max_softmax")
class ConfidencePolicy(RiskControlledPolicy):
    """Temperature-scaled confidence (``signal``: max_softmax, margin or entropy) with a guaranteed budget."""

    def __init__(self, signal: str = "max_softmax"):
        if signal not in SIGNALS:
            raise AutoExitError(f"unknown exit signal {signal!r}; use one of: {', '.join(SIGNALS)}")
        self.signal = signal
        self.name = signal

    def rules_for(self, chain, fit, final):
        return [ConfidenceRule(SIGNALS[self.signal]) for _ in chain]


register_policy("margin")(lambda **kw: ConfidencePolicy("margin", **kw))
register_policy("entropy")(lambda **kw: ConfidencePolicy("entropy", **kw))


@register_policy("patience")
class PatiencePolicy(RiskControlledPolicy):
    """Agreement of consecutive exits (``history`` previous ones), confidence as tie-break."""

    name = "patience"

    def __init__(self, history: int = 2, signal: str = "max_softmax"):
        if signal not in SIGNALS:
            raise AutoExitError(f"unknown exit signal {signal!r}; use one of: {', '.join(SIGNALS)}")
        if history < 1:
            raise AutoExitError(f"patience history must be >= 1, got {history}")
        self.history, self.signal = int(history), signal

    def rules_for(self, chain, fit, final):
        return [PatienceRule(self.history, SIGNALS[self.signal]) for _ in chain]


@register_policy("gate")
class GatePolicy(RiskControlledPolicy):
    """Learned exit gates (:class:`~autoexit.policies.rules.GateRule`), label-free by default.

    While exit sets are compared, each candidate exit has a gate that reads only its own head
    (trained once); the kept chain then gets gates that also read the previous ``history`` exits.
    ``target="harmless"`` trains them on the fit split's labels to predict "no accuracy lost by letting
    the sample out here" (:mod:`autoexit.policies.gate`): only with a labelled risk (``harm``, ``drop``).
    """

    name = "gate"

    def __init__(self, hidden: int = 16, history: int = 2, onehot: bool = True, act_stats: bool = True,
                 steps: int = 100, lr: float = 1.0, weight_decay: float = 1e-2, seed: int = 0,
                 target: str = "agree"):
        self.config = GateConfig(hidden, history, onehot, act_stats, steps, lr, weight_decay, seed, target)
        self._solo: dict[int, GateRule] = {}

    @property
    def reads_activation_stats(self) -> bool:
        return bool(self.config.act_stats)

    def _train(self, fit: ExitTable, e: int, prev: list[int], history: int) -> GateRule:
        cfg = GateConfig(**{**self.config.to_dict(), "history": history})
        stats = fit.stats[e] if fit.stats is not None else None
        if cfg.act_stats and stats is None:
            cfg = GateConfig(**{**cfg.to_dict(), "act_stats": False})
        return train_gate(fit.z[e], [fit.z[i] for i in prev], stats, fit.backbone_logits, cfg, labels=fit.labels)

    def rules_for(self, chain, fit, final):
        if not final:
            out = []
            for e in chain:
                if e not in self._solo:
                    self._solo[e] = self._train(fit, e, [], 0)
                out.append(self._solo[e])
            return out
        h = self.config.history
        return [self._train(fit, e, list(chain[max(0, j - h) : j]), h) for j, e in enumerate(chain)]

    def check_risk(self, risk: str) -> None:
        if self.config.target == "harmless" and risk == "disagreement":
            raise AutoExitError("gate target 'harmless' lets out samples the backbone gets wrong, which the "
                                "label-free risk counts against it: use it with risk='drop' or 'harm', or "
                                "target='agree'")

    def fit(self, ctx: PolicyContext) -> FittedPolicy:
        self.check_risk(ctx.risk)
        if self.config.target == "harmless" and ctx.fit.labels is None:  # before the exit set is searched
            raise AutoExitError("gate target 'harmless' needs labels on the fit split (the gates are trained on "
                                "them); give labelled data or use target='agree' (label-free)")
        self._solo = {}
        fp = super().fit(ctx)
        fp.info["gate_target"] = self.config.target
        return fp


@register_policy("paper003")
class Paper003Policy(ExitPolicy):
    """The paper-003 baseline: max-softmax (or ``signal``), T/2^n thresholds on the calibration split,
    exit subset by K(S). No statistical guarantee."""

    name = "paper003"
    guaranteed = False

    def fit(self, ctx: PolicyContext) -> FittedPolicy:
        from ..subset import best_subset

        cal = ctx.cal
        sid = SIGNALS[ctx.signal]
        scores = np.stack([ConfidenceRule(sid)(z, [], torch.zeros(1)).double().numpy() for z in cal.z])
        agree = cal.pred(list(range(len(cal.names)))) == cal.bpred[None, :]
        c2 = ctx.costs.base - ctx.costs.before
        sub = best_subset(scores, agree, ctx.costs.c1, c2, ctx.tolerance, ctx.scheme, ctx.basis, cal.names,
                          ctx.costs.base, ctx.exhaustive_limit)
        if ctx.max_exits is not None and len(sub.names) > ctx.max_exits:
            sub = best_subset(scores, agree, ctx.costs.c1, c2, ctx.tolerance, ctx.scheme, ctx.basis, cal.names,
                              ctx.costs.base, ctx.exhaustive_limit, size=ctx.max_exits)
        rules = [ConfidenceRule(sid) for _ in sub.indices]
        return FittedPolicy(self.name, list(sub.names), list(sub.indices), rules,
                            np.asarray(sub.thresholds.thresholds, dtype=float), "disagreement", None,
                            {"cal_n": cal.n, "k_score": sub.k, "scheme": ctx.scheme, "signal": ctx.signal})


AUTO_CANDIDATES = ("max_softmax", "margin", "entropy", "patience", "gate")
AUTO_SELECT = ("cal", "fit")


def split_candidates(text: str) -> list[str]:
    """``"max_softmax, gate[target=harmless,hidden=32]"`` -> ``["max_softmax", "gate[target=harmless,hidden=32]"]``:
    a comma-separated candidate list as a config file or a command line gives it (commas inside ``[...]`` separate
    a candidate's own options, not candidates)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [c.strip() for c in [*out, cur] if c.strip()]


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_candidate(label: str) -> tuple[str, dict]:
    """An ``auto`` candidate's label -> (policy name, options): ``"gate"`` -> ``("gate", {})``,
    ``"gate[target=harmless,hidden=32]"`` -> ``("gate", {"target": "harmless", "hidden": 32})`` (values read as
    bool, int, float or else text), so one policy can compete with itself under other options."""
    label = str(label).strip()
    name, sep, rest = label.partition("[")
    name = name.strip()
    if not sep:
        if "]" in label:
            raise AutoExitError(f"auto candidate {label!r} has a ']' without '['; write NAME or NAME[key=value,...]")
        return name, {}
    if not rest.endswith("]") or "[" in rest or "]" in rest[:-1] or not name:
        raise AutoExitError(f"auto candidate {label!r} is malformed; write NAME or NAME[key=value,...], "
                            "e.g. gate[target=harmless]")
    opts: dict = {}
    for item in (i.strip() for i in rest[:-1].split(",")):
        key, eq, val = (part.strip() for part in item.partition("="))
        if not eq or not key or not val:
            raise AutoExitError(f"auto candidate {label!r}: {item!r} is not key=value; write e.g. "
                                f"{name}[target=harmless]")
        if key in opts:
            raise AutoExitError(f"auto candidate {label!r} sets {key!r} twice; set it once")
        opts[key] = _option_value(val)
    return name, opts


def _choose(fitted: dict[str, FittedPolicy], select: str, delta: float, tested_delta: float) -> FittedPolicy:
    """The candidate ``auto`` deploys (cheapest on the calibration or the fit data, as ``select`` says; ties: the
    first listed), with the other candidates and the comparison attached."""
    table = {n: {"fit_cost": float(fp.info["fit_cost_at_target"]),
                 "cal_cost": float(fp.info[f"cal_{fp.costs.unit if fp.costs is not None else 'flops'}"]),
                 "certified": bool(fp.guarantee is not None and fp.guarantee.certified), "exits": len(fp.chain)}
             for n, fp in fitted.items()}
    best = min(fitted, key=lambda n: (table[n][f"{select}_cost"], list(fitted).index(n)))
    chosen = fitted[best]
    info = {**chosen.info, "auto": {"select": select, "delta": float(delta), "tested_delta": float(tested_delta),
                                    "candidates": table, "chosen": best}}
    # named by its candidate label: "gate[target=harmless]" says which of two gates was deployed
    return replace(chosen, policy=best, info=info, alternatives=list(fitted.values()))


def _recertify_auto(fp: FittedPolicy, cal: ExitTable, alpha: float | None, delta: float | None,
                    seed: int) -> FittedPolicy:
    """``auto`` on other calibration data: every candidate is recertified (at delta / m with ``select="cal"``) and
    the choice made again (with ``select="fit"`` it reads only the fit data, so it does not change)."""
    auto = fp.info["auto"]
    d = float(auto["delta"]) if delta is None else float(delta)
    named = dict(zip(auto["candidates"], fp.alternatives))
    tested = d / len(named) if auto["select"] == "cal" else d
    return _choose({n: a.recertify(cal, alpha, tested, seed) for n, a in named.items()}, auto["select"], d, tested)


@register_policy("auto")
class AutoPolicy(ExitPolicy):
    """Fit several guaranteed policies (``candidates``, default every guaranteed one) and deploy the cheapest,
    keeping the guarantee.

    ``select="cal"`` (default): each candidate is certified at ``delta / m`` (m candidates); every certified
    configuration of every candidate then holds at once with probability >= 1 - delta (union bound), so the one
    cheapest on the calibration data may be deployed. ``select="fit"``: the candidate with the lowest expected
    cost on the fit data at the planned risk is chosen before the calibration data is read, and certified at the
    full delta; cheaper to certify, but the fit data's estimate can be optimistic (gates are scored on the data
    they were trained on; heads on their own training data unless ``cross_fit``). ``options``: per-candidate
    policy options, e.g. ``{"gate": {"hidden": 32}}``. A candidate may carry its options in its label,
    ``NAME[key=value,...]`` (:func:`parse_candidate`), so one policy can compete with itself:
    ``candidates=["max_softmax", "gate", "gate[target=harmless]"]`` compares the label-free gate with the one
    trained on labels; the deployed policy is named by its label.
    """

    name = "auto"

    def __init__(self, candidates: Sequence[str] = AUTO_CANDIDATES, select: str = "cal",
                 options: dict | None = None):
        if isinstance(candidates, str):  # "max_softmax,gate" (as a config file or a command line may give it)
            candidates = split_candidates(candidates)
        cands = [str(c).strip() for c in (candidates or ())]
        if not cands:
            raise AutoExitError("auto needs at least one candidate policy, e.g. candidates=['max_softmax', 'gate']")
        parsed = {c: parse_candidate(c) for c in cands}
        bad = [c for c, (base, _) in parsed.items()
               if base not in POLICIES or base == "auto" or not getattr(POLICIES[base], "guaranteed", True)]
        if bad:
            ok = [n for n in POLICIES if n != "auto" and getattr(POLICIES[n], "guaranteed", True)]
            raise AutoExitError(f"auto candidates must be guaranteed policies; {', '.join(map(repr, bad))} "
                                f"cannot be used: pick from {', '.join(ok)}")
        if len(set(cands)) != len(cands):
            raise AutoExitError(f"auto candidates are listed twice: {cands}; list each policy once")
        if select not in AUTO_SELECT:
            raise AutoExitError(f"auto select must be 'cal' (cheapest on the calibration split, each candidate "
                                f"at delta/m) or 'fit' (chosen on the fit split), got {select!r}")
        options = dict(options or {})
        extra = sorted(set(options) - set(cands))
        if extra:
            raise AutoExitError(f"auto options given for {', '.join(extra)}, which are not candidates {cands}")
        for name, opts in options.items():
            if not isinstance(opts, dict):
                raise AutoExitError(f"auto options for {name!r} must be a mapping of option names to values, "
                                    f"e.g. {{'{name}': {{...}}}}, got {type(opts).__name__}")
        merged = {}
        for label, (_, inline) in parsed.items():
            twice = sorted(set(inline) & set(options.get(label, {})))
            if twice:
                raise AutoExitError(f"auto candidate {label!r}: {', '.join(twice)} given both in its label and in "
                                    "options; give each once")
            merged[label] = {**inline, **options.get(label, {})}
        same = [(a, b) for i, a in enumerate(cands) for b in cands[i + 1:]
                if (parsed[a][0], merged[a]) == (parsed[b][0], merged[b])]
        if same:
            raise AutoExitError(f"auto candidates {same[0][0]!r} and {same[0][1]!r} are the same policy with the "
                                "same options; list it once")
        # built now, so that a bad candidate option fails at once, with that policy's own message
        self.policies = {}
        for label, (base, _) in parsed.items():
            try:
                self.policies[label] = make_policy(base, **merged[label])
            except AutoExitError as e:
                raise AutoExitError(f"auto candidate {label!r}: {e}") from None
        self.candidates, self.select = cands, select

    def check_risk(self, risk: str) -> None:
        for label, p in self.policies.items():
            try:
                p.check_risk(risk)
            except AutoExitError as e:
                raise AutoExitError(f"auto candidate {label!r}: {e}") from None

    @property
    def reads_activation_stats(self) -> bool:
        return any(p.reads_activation_stats for p in self.policies.values())

    def fit(self, ctx: PolicyContext) -> FittedPolicy:
        tested = ctx.delta / len(self.candidates) if self.select == "cal" else ctx.delta
        sub = replace(ctx, delta=tested)
        return _choose({name: p.fit(sub) for name, p in self.policies.items()}, self.select, ctx.delta, tested)


def needs_activation_stats(policy: str, options: dict | None = None) -> bool:
    """Whether ``policy`` with ``options`` reads the activations' mean / std (gates do, unless act_stats=False):
    the policy says so itself (``ExitPolicy.reads_activation_stats``)."""
    return bool(make_policy(policy, **dict(options or {})).reads_activation_stats)
