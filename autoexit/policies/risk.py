"""Distribution-free risk control: Learn-then-Test with fixed-sequence testing.

Given per-sample losses of an ordered family of exit configurations
(``losses[j, i]``: loss of configuration j on calibration sample i; j = 0 is the
most conservative), :func:`fixed_sequence` returns the most aggressive j such
that, with probability at least ``1 - delta`` over the draw of the calibration
set, every configuration up to it (and so the chosen one) has true risk
``<= alpha``. This is Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei,
2021) with fixed-sequence testing: test ``H_j: R(j) > alpha`` in the fixed
order j = 0, 1, ...; reject while the p-value is ``<= delta``; stop at the first
failure. No multiplicity correction is needed for a fixed order, and risk
need not be monotone along the family for the guarantee to hold (only for
power). The order must be fixed without looking at the calibration data.

p-values:

- ``binomial``: exact, for 0/1 losses (disagreement with the backbone, or the
  labelled "harm": the backbone was right and the early answer is wrong):
  ``P(Binomial(n, alpha) <= k)`` for ``k`` losses. The tightest valid choice.
- ``wsr``: Waudby-Smith--Ramdas betting (hedged capital), for any loss in
  ``[lo, hi]``; used for the labelled accuracy drop, whose per-sample loss
  ``1[backbone right] - 1[early answer right]`` lies in {-1, 0, 1}.
- ``hb``: Hoeffding--Bentkus, for losses in [0, 1].

Everything here is numpy; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import AutoExitError

__all__ = [
    "PVALUES",
    "binomial_pvalue",
    "hb_pvalue",
    "wsr_pvalue",
    "pvalues",
    "fixed_sequence",
    "RiskControlResult",
    "max_admissible_count",
]

PVALUES = ("binomial", "wsr", "hb")


def _binom_cdf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    """P(Binomial(n, p) <= k), elementwise over integer ``k`` (numerically stable, via the regularised beta)."""
    from scipy.special import betainc  # scipy comes with scikit-learn, a core dependency

    k = np.asarray(k, dtype=np.float64)
    out = np.ones_like(k)
    inside = k < n
    kk = np.floor(k[inside])
    # P(X <= k) = I_{1-p}(n - k, k + 1)
    out[inside] = np.where(kk < 0, 0.0, betainc(n - np.maximum(kk, 0), np.maximum(kk, 0) + 1, 1.0 - p))
    return out


def binomial_pvalue(counts, n: int, alpha: float) -> np.ndarray:
    """Exact p-values of ``H: risk > alpha`` from 0/1-loss counts (``counts`` losses in ``n`` samples)."""
    if n <= 0:
        return np.ones_like(np.asarray(counts, dtype=float))
    return _binom_cdf(np.asarray(counts), n, alpha)


def hb_pvalue(mean_loss, n: int, alpha: float) -> np.ndarray:
    """Hoeffding--Bentkus p-values of ``H: risk > alpha`` for losses in [0, 1] with empirical means ``mean_loss``."""
    r = np.minimum(np.asarray(mean_loss, dtype=np.float64), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = np.where(r > 0, r * np.log(r / alpha), 0.0) + np.where(
            r < 1, (1 - r) * np.log((1 - r) / (1 - alpha)), 0.0)
    hoeff = np.exp(-n * h1)
    bentkus = math.e * _binom_cdf(np.ceil(n * np.asarray(mean_loss, dtype=np.float64)), n, alpha)
    return np.minimum(np.minimum(hoeff, bentkus), 1.0)


def wsr_pvalue(losses: np.ndarray, alpha: float, lo: float, hi: float, delta: float = 0.1) -> np.ndarray:
    """Waudby-Smith--Ramdas betting p-values of ``H: risk > alpha``, one per row of ``losses`` [configs, n].

    Capital ``K_t = prod_{i<=t} (1 + lam_i (alpha - l_i))`` is a non-negative supermartingale
    under H (bets ``lam_i >= 0`` are predictable: they use samples before i only), so
    ``p = min(1, 1 / max_t K_t)`` is valid by Ville's inequality. Samples are used in
    the given order, which must not depend on the losses (pass them shuffled by a fixed seed).
    """
    x = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    m, n = x.shape
    if n == 0:
        return np.ones(m)
    if not (lo <= alpha < hi):
        raise AutoExitError(f"risk level {alpha} must lie inside the loss range [{lo}, {hi})")
    # running mean / variance estimates from the WSR paper, shifted to [0, 1] scale
    scale = hi - lo
    z = (x - lo) / scale
    a = (alpha - lo) / scale
    t = np.arange(1, n + 1, dtype=np.float64)
    mu_hat = (0.5 + np.cumsum(z, axis=1)) / (t + 1)
    sig2 = (0.25 + np.cumsum((z - mu_hat) ** 2, axis=1)) / (t + 1)
    sig2_prev = np.concatenate([np.full((m, 1), 0.25), sig2[:, :-1]], axis=1)
    lam = np.sqrt(2 * math.log(1 / delta) / (n * sig2_prev))
    lam = np.minimum(lam, 0.75 / (1 - a))  # keeps 1 + lam (a - z) > 0 for z <= 1
    log_k = np.cumsum(np.log1p(lam * (a - z)), axis=1)
    return np.minimum(1.0, np.exp(-np.max(log_k, axis=1)))


def pvalues(losses: np.ndarray, alpha: float, method: str = "binomial", delta: float = 0.1,
            bounds: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """p-values of ``H_j: risk_j > alpha`` for each row of ``losses`` [configs, n]."""
    x = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    n = x.shape[1]
    if method == "binomial":
        if not np.isin(x, (0.0, 1.0)).all():
            raise AutoExitError("binomial p-values need 0/1 losses; use method='wsr' for other bounded losses")
        return binomial_pvalue(x.sum(1).round().astype(np.int64), n, alpha)
    if method == "hb":
        if x.size and (x.min() < 0 or x.max() > 1):
            raise AutoExitError("Hoeffding-Bentkus p-values need losses in [0, 1]; use method='wsr'")
        return hb_pvalue(x.mean(1) if n else np.zeros(x.shape[0]), n, alpha)
    if method == "wsr":
        return wsr_pvalue(x, alpha, bounds[0], bounds[1], delta)
    raise AutoExitError(f"unknown p-value method {method!r}; use one of: {', '.join(PVALUES)}")


@dataclass
class RiskControlResult:
    """Outcome of fixed-sequence testing over an ordered family."""

    index: int  # chosen configuration (-1: none certified, keep the backbone)
    alpha: float  # risk level (fraction)
    delta: float
    n: int  # calibration samples
    method: str
    pvalues: np.ndarray
    empirical_risk: np.ndarray  # per configuration, on the calibration set

    @property
    def certified(self) -> bool:
        return self.index >= 0

    def statement(self, what: str = "disagreement with the backbone") -> str:
        return (f"with probability >= {1 - self.delta:.0%} over the draw of the {self.n} calibration samples, "
                f"the {what} on new data from the same distribution is <= {100 * self.alpha:.3g} % "
                f"(Learn-then-Test, fixed-sequence, {self.method} p-values)")

    def to_dict(self) -> dict:
        return {"index": self.index, "alpha": self.alpha, "delta": self.delta, "n": self.n,
                "method": self.method,
                "empirical_risk": float(self.empirical_risk[self.index]) if self.index >= 0 else 0.0,
                "pvalue": float(self.pvalues[self.index]) if self.index >= 0 else None}


def fixed_sequence(losses: np.ndarray, alpha: float, delta: float = 0.1, method: str = "binomial",
                   bounds: tuple[float, float] = (0.0, 1.0)) -> RiskControlResult:
    """Learn-then-Test over configurations ordered from safest (row 0) to most aggressive.

    Returns the last configuration of the longest prefix whose hypotheses ``risk > alpha``
    are all rejected at level ``delta``.
    """
    if not 0 < delta < 1:
        raise AutoExitError(f"delta must be in (0, 1) (the allowed probability of breaking the budget), got {delta}")
    if not 0 < alpha < 1:
        raise AutoExitError(f"risk level must be in (0, 1), got {alpha}")
    x = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    p = pvalues(x, alpha, method, delta, bounds)
    fail = np.nonzero(p > delta)[0]
    stop = int(fail[0]) if fail.size else x.shape[0]
    emp = x.mean(1) if x.shape[1] else np.zeros(x.shape[0])
    return RiskControlResult(stop - 1, float(alpha), float(delta), int(x.shape[1]), method, p, emp)


def max_admissible_count(n: int, alpha: float, delta: float = 0.1) -> int:
    """Largest number of 0/1 losses in ``n`` calibration samples that still certifies ``risk <= alpha``
    (-1 when even zero losses do not)."""
    ks = np.arange(0, n + 1)
    ok = np.nonzero(binomial_pvalue(ks, n, alpha) <= delta)[0]
    return int(ok.max()) if ok.size else -1
