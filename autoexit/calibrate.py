"""Temperature scaling and exit thresholds from a tolerance (paper 003, 3.3).

Every exit head is calibrated on the val split with one temperature that
makes its softmax confidence predict agreement with the backbone (label-free:
the target is the backbone's predicted class). Then, for a tolerance T (the
accuracy drop, in percent, that the user accepts), exits are visited in order
(shallow first) and exit n of the kept set gets the lowest threshold whose
estimated drop ``HR x (1 - CA)`` on the val samples that reach it is within its
share of T: ``T / 2^n`` (eq. 3, the default ``halving`` scheme), ``T / k``
(``equal``) or a given weight vector. HR x (1 - CA) counts the samples that
exit there and disagree with the backbone: an upper bound of the accuracy
drop that exit causes. ``basis="total"`` (default) divides that count by all
val samples, so the per-exit shares add up to the drop in final accuracy;
``basis="reaching"`` divides by the samples that reach the exit, the stricter
literal reading of HR.

The exit decision is ``exit_score(logits / temperature) >= threshold`` with
``exit_score`` below, shared with the emitted TorchScript model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import AutoExitError

__all__ = [
    "SIGNALS",
    "exit_score",
    "ExitPredictions",
    "fit_temperature",
    "split_budget",
    "assign_thresholds",
    "ThresholdResult",
    "check_tolerance",
]

SIGNALS = {"max_softmax": 0, "margin": 1, "entropy": 2}


def exit_score(scaled_logits: torch.Tensor, signal: int) -> torch.Tensor:
    """Confidence of each row (higher = more confident), computed the same way in calibration and in the model.

    signal 0: max softmax probability; 1: margin between the two largest
    probabilities; 2: one minus the entropy normalised by log(classes).
    """
    p = torch.softmax(scaled_logits, dim=1)
    if signal == 1:
        top = torch.topk(p, 2, dim=1).values
        return top[:, 0] - top[:, 1]
    if signal == 2:
        logp = torch.log_softmax(scaled_logits, dim=1)
        ent = -(p * logp).sum(dim=1)
        return 1.0 - ent / math.log(float(scaled_logits.shape[1]))
    return p.max(dim=1).values


def check_tolerance(tolerance: float) -> float:
    """Validate a tolerance in percent and return it as a fraction."""
    try:
        t = float(tolerance)
    except (TypeError, ValueError):
        raise AutoExitError(f"tolerance must be a number (percent accuracy drop), got {tolerance!r}") from None
    if not np.isfinite(t) or t <= 0:
        raise AutoExitError(
            f"tolerance must be > 0: it is the accuracy drop in percent you accept (e.g. 1.0), got {tolerance!r}"
        )
    if t >= 100:
        raise AutoExitError(f"tolerance is a percentage below 100, got {tolerance!r}")
    return t / 100.0


def _signal_id(signal: str | int) -> int:
    if isinstance(signal, int):
        return signal
    if signal not in SIGNALS:
        raise AutoExitError(f"unknown exit signal {signal!r}; use one of: {', '.join(SIGNALS)}")
    return SIGNALS[signal]


@dataclass
class ExitPredictions:
    """Raw logits of every exit head on one split, with the backbone's logits (and labels if known).

    ``logits`` has shape [exits, samples, classes]; exits are in backbone order.
    """

    names: list[str]
    logits: torch.Tensor
    backbone_logits: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        if self.logits.dim() != 3 or self.logits.shape[1] != self.backbone_logits.shape[0]:
            raise AutoExitError(
                f"exit logits {tuple(self.logits.shape)} do not match backbone logits "
                f"{tuple(self.backbone_logits.shape)}"
            )
        if not torch.isfinite(self.logits).all():
            bad = [self.names[i] for i in range(len(self.names)) if not torch.isfinite(self.logits[i]).all()]
            raise AutoExitError(f"exit head(s) {', '.join(bad)} produce NaN/inf logits; retrain them")

    @property
    def n(self) -> int:
        return int(self.backbone_logits.shape[0])

    @property
    def backbone_pred(self) -> torch.Tensor:
        return self.backbone_logits.argmax(1)

    def pred(self) -> torch.Tensor:
        return self.logits.argmax(2)

    def agree(self) -> torch.Tensor:
        """[exits, samples] bool: the head predicts the backbone's class."""
        return self.pred() == self.backbone_pred[None, :]

    def correct(self) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return self.pred() == self.labels[None, :]

    def scores(self, temperatures: Sequence[float] | torch.Tensor, signal: str | int = "max_softmax") -> torch.Tensor:
        """[exits, samples] exit scores after temperature scaling (float32, as in the model)."""
        sid = _signal_id(signal)
        t = torch.as_tensor(temperatures, dtype=torch.float32)
        return torch.stack([exit_score(self.logits[i] / t[i], sid) for i in range(len(self.names))])

    def subset(self, names: Sequence[str]) -> ExitPredictions:
        idx = [self.names.index(n) for n in names]
        return ExitPredictions(list(names), self.logits[idx], self.backbone_logits, self.labels)


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature minimising the NLL of ``target`` classes (golden-section search over log T)."""
    logits = logits.double()
    target = target.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / np.exp(log_t), target))

    a, b = np.log(lo), np.log(hi)
    gr = (np.sqrt(5) - 1) / 2
    c, d = b - gr * (b - a), a + gr * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = nll(d)
    return float(np.exp((a + b) / 2))


def split_budget(tolerance: float, k: int, scheme: str | Sequence[float] = "halving") -> np.ndarray:
    """Per-exit shares of a tolerance fraction for ``k`` kept exits (shallow first).

    ``halving``: T/2^n (paper 003 eq. 3); ``equal``: T/k; a sequence of k
    non-negative weights: T * w / sum(w).
    """
    if k == 0:
        return np.zeros(0)
    if isinstance(scheme, str):
        if scheme in ("halving", "T/2^n", "pow2"):
            return tolerance / 2.0 ** np.arange(1, k + 1)
        if scheme == "equal":
            return np.full(k, tolerance / k)
        raise AutoExitError(f"unknown split scheme {scheme!r}; use halving, equal or a list of per-exit weights")
    w = np.asarray(list(scheme), dtype=np.float64)
    if w.shape != (k,) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise AutoExitError(f"split weights must be {k} non-negative numbers with a positive sum, got {list(w)}")
    return tolerance * w / w.sum()


@dataclass
class ThresholdResult:
    """Thresholds for kept exits and what they do on the calibration split."""

    names: list[str]
    thresholds: np.ndarray
    budgets: np.ndarray  # fraction of samples allowed to exit wrongly at each exit
    reached: np.ndarray  # samples reaching each exit
    hits: np.ndarray  # samples exiting at each exit
    wrong: np.ndarray  # exiting samples that disagree with the backbone
    n: int
    basis: str

    @property
    def est_drop(self) -> np.ndarray:
        """Per-exit estimated drop HR x (1 - CA), as a fraction, on the budget's basis."""
        denom = np.full(len(self.names), self.n, dtype=float) if self.basis == "total" else np.maximum(self.reached, 1)
        return self.wrong / denom

    @property
    def exit_mask(self) -> np.ndarray:
        return self.hits > 0

    def to_dict(self) -> dict:
        return {
            "names": self.names,
            "thresholds": [float(t) for t in self.thresholds],
            "budgets": [float(b) for b in self.budgets],
            "reached": [int(x) for x in self.reached],
            "hits": [int(x) for x in self.hits],
            "wrong": [int(x) for x in self.wrong],
            "est_drop": [float(x) for x in self.est_drop],
            "n": self.n,
            "basis": self.basis,
        }


def _threshold_for(conf: np.ndarray, wrong: np.ndarray, allowed: float) -> float:
    """Lowest threshold on ``conf`` (reaching samples only) letting at most ``allowed`` wrong samples exit.

    The threshold is placed midway between the lowest admitted score and the next
    lower score, so tiny numeric differences at run time do not flip decisions.
    """
    if conf.size == 0:
        return float("inf")
    order = np.argsort(-conf, kind="stable")
    cs = conf[order]
    wc = np.cumsum(wrong[order])
    # end of each tie group: a threshold at cs[j] admits every sample with score >= cs[j]
    ends = np.r_[np.nonzero(cs[1:] < cs[:-1])[0], cs.size - 1]
    ok = wc[ends] <= allowed + 1e-9
    if not ok[0]:
        return float("inf")
    last = ends[np.nonzero(ok)[0].max()]  # wc is non-decreasing, so ok is a prefix
    lower = cs[last + 1] if last + 1 < cs.size else 0.0
    return float((cs[last] + lower) / 2.0)


def assign_thresholds(
    scores: np.ndarray | torch.Tensor,
    agree: np.ndarray | torch.Tensor,
    tolerance: float,
    scheme: str | Sequence[float] = "halving",
    names: Sequence[str] | None = None,
    basis: str = "total",
) -> ThresholdResult:
    """Thresholds for exits (rows of ``scores``/``agree``, shallow first) from ``tolerance`` in percent.

    Each exit sees only the samples no earlier exit took.
    """
    t = check_tolerance(tolerance)
    s = np.asarray(scores, dtype=np.float64)
    a = np.asarray(agree, dtype=bool)
    if s.shape != a.shape or s.ndim != 2:
        raise AutoExitError(f"scores {s.shape} and agreement {a.shape} must both be [exits, samples]")
    if basis not in ("total", "reaching"):
        raise AutoExitError(f"basis must be 'total' or 'reaching', got {basis!r}")
    k, n = s.shape
    budgets = split_budget(t, k, scheme)
    reaching = np.ones(n, dtype=bool)
    thr = np.full(k, np.inf)
    reached, hits, wrong = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    for i in range(k):
        idx = np.nonzero(reaching)[0]
        denom = n if basis == "total" else idx.size
        allowed = np.floor(budgets[i] * denom + 1e-9)
        thr[i] = _threshold_for(s[i, idx], ~a[i, idx], allowed)
        hit = reaching & (s[i] >= thr[i])
        reached[i] = idx.size
        hits[i] = int(hit.sum())
        wrong[i] = int((hit & ~a[i]).sum())
        reaching &= ~hit
    return ThresholdResult(
        names=list(names) if names is not None else [str(i) for i in range(k)],
        thresholds=thr,
        budgets=budgets,
        reached=reached,
        hits=hits,
        wrong=wrong,
        n=n,
        basis=basis,
    )


def calibrate_temperatures(preds: ExitPredictions) -> np.ndarray:
    """One temperature per exit, fitted on ``preds`` (use the val split) against the backbone's classes."""
    target = preds.backbone_pred
    return np.array([fit_temperature(preds.logits[i], target) for i in range(len(preds.names))])


def thresholds_by_name(result: ThresholdResult) -> Mapping[str, float]:
    return dict(zip(result.names, (float(x) for x in result.thresholds)))
