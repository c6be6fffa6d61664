"""Exit-subset selection with the score K(S) (paper 003, 3.4, eq. 4).

For a subset S of trained exits (kept in backbone order), thresholds are
re-derived for S from the tolerance, the samples each exit actually receives
are found by removing those taken by earlier exits, and

    K(S) = sum over exits in S of |H| * (C2 - C1) - |M| * C1

where H / M are the exit's hits / misses, C1 its head FLOPs and C2 the FLOPs
of the rest of the backbone after its point. K(S) is the total FLOPs the
early-exit model saves on the split, so the expected FLOPs per sample are
``base - K(S) / n``. Everything is computed from recorded predictions; no
model is run.

``best_subset`` scores every subset exhaustively (vectorised over subsets,
level by level) up to ``exhaustive_limit`` candidates (16 by default) and
falls back to greedy forward selection beyond.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibrate import ThresholdResult, assign_thresholds, check_tolerance
from .errors import AutoExitError

__all__ = [
    "SubsetResult",
    "ExitOutcome",
    "k_score",
    "evaluate_subset",
    "all_subset_scores",
    "best_subset",
    "best_by_size",
    "simulate_exits",
    "oracle_flops",
]


@dataclass
class SubsetResult:
    """A kept subset of exits, its thresholds and its cost on the split it was chosen on."""

    names: list[str]
    indices: list[int]
    thresholds: ThresholdResult
    k: float
    n: int
    base_flops: float

    @property
    def expected_flops(self) -> float:
        return self.base_flops - self.k / self.n

    @property
    def saving(self) -> float:
        return self.k / (self.n * self.base_flops) if self.base_flops else 0.0

    def to_dict(self) -> dict:
        return {
            "names": self.names,
            "indices": self.indices,
            "k_score": self.k,
            "n": self.n,
            "base_flops": self.base_flops,
            "expected_flops": self.expected_flops,
            "saving": self.saving,
            "thresholds": self.thresholds.to_dict(),
        }


def _check(scores, agree, c1, c2):
    s = np.asarray(scores, dtype=np.float64)
    a = np.asarray(agree, dtype=bool)
    c1 = np.asarray(c1, dtype=np.float64)
    c2 = np.asarray(c2, dtype=np.float64)
    if s.ndim != 2 or s.shape != a.shape or c1.shape != (s.shape[0],) or c2.shape != (s.shape[0],):
        raise AutoExitError(
            f"scores {s.shape}, agreement {a.shape}, C1 {c1.shape} and C2 {c2.shape} must be "
            "[exits, samples], [exits, samples], [exits], [exits]"
        )
    return s, a, c1, c2


def k_score(scores, thresholds, c1, c2) -> float:
    """K(S) for exits given as rows (in order) with fixed ``thresholds``; eq. 4."""
    s = np.asarray(scores, dtype=np.float64)
    reaching = np.ones(s.shape[1], dtype=bool)
    k = 0.0
    for i in range(s.shape[0]):
        hit = reaching & (s[i] >= thresholds[i])
        nh, nr = int(hit.sum()), int(reaching.sum())
        k += nh * (c2[i] - c1[i]) - (nr - nh) * c1[i]
        reaching &= ~hit
    return float(k)


def evaluate_subset(
    scores,
    agree,
    c1,
    c2,
    subset: Sequence[int],
    tolerance: float,
    scheme="halving",
    basis: str = "total",
    names: Sequence[str] | None = None,
    base_flops: float | None = None,
) -> SubsetResult:
    """Thresholds for ``subset`` (exit row indices) re-derived from the tolerance, and its K(S)."""
    s, a, c1, c2 = _check(scores, agree, c1, c2)
    subset = sorted(int(i) for i in subset)
    names = list(names) if names is not None else [str(i) for i in range(s.shape[0])]
    thr = assign_thresholds(s[subset], a[subset], tolerance, scheme, [names[i] for i in subset], basis)
    k = k_score(s[subset], thr.thresholds, c1[subset], c2[subset])
    base = float(base_flops) if base_flops is not None else 0.0
    return SubsetResult([names[i] for i in subset], subset, thr, k, s.shape[1], base)


def all_subset_scores(
    scores,
    agree,
    c1,
    c2,
    tolerance: float,
    scheme="halving",
    basis: str = "total",
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """K(S) and thresholds for every subset S, as arrays indexed by bitmask (bit i = exit i kept).

    Returns ``(k, thresholds)`` with shapes [2^E] and [2^E, E] (inf where an exit is
    not in S). Same results as :func:`evaluate_subset` per subset, computed level by
    level over exits with all subsets of the earlier exits at once. ``equal`` splits
    depend on the final subset size, so they take one pass per size.
    """
    s, a, c1, c2 = _check(scores, agree, c1, c2)
    e_count = s.shape[0]
    if e_count > 20:
        raise AutoExitError(f"exhaustive search over {e_count} exits would score 2^{e_count} subsets; use greedy")
    t = check_tolerance(tolerance)
    if scheme in ("halving", "T/2^n", "pow2"):
        return _all_subsets_pass(s, a, c1, c2, lambda size: t / 2.0 ** size, basis, chunk)
    if scheme == "equal":
        pop = np.array([bin(m).count("1") for m in range(1 << e_count)])
        k_out = np.zeros(1 << e_count)
        thr_out = np.full((1 << e_count, e_count), np.inf)
        for size in range(1, e_count + 1):
            kk, tt = _all_subsets_pass(s, a, c1, c2, lambda _n, size=size: np.full_like(_n, t / size, dtype=float),
                                       basis, chunk, size=size)
            sel = pop == size
            k_out[sel], thr_out[sel] = kk[sel], tt[sel]
        return k_out, thr_out
    raise AutoExitError("exhaustive subset search needs a named split scheme (halving or equal)")


def _all_subsets_pass(s, a, c1, c2, share_of, basis, chunk, size=None):
    """One level-by-level pass; with ``size``, only subsets of exactly that size are scored."""
    e_count, n = s.shape
    order = np.argsort(-s, axis=1, kind="stable")
    cs = np.take_along_axis(s, order, axis=1)
    wrong_sorted = np.take_along_axis(~a, order, axis=1)
    # for each sorted position, the last position of its tie group
    grp_end = np.stack([np.searchsorted(-cs[e], -cs[e], side="right") - 1 for e in range(e_count)])
    arange_n = np.arange(n, dtype=np.int32)[None, :]

    masks = np.ones((1, n), dtype=bool)
    n_incl = np.zeros(1, dtype=np.int64)
    k = np.zeros(1, dtype=np.float64)
    bits = np.zeros(1, dtype=np.int64)
    thr = np.full((1, e_count), np.inf)
    for e in range(e_count):
        new_masks, new_k, new_thr = [], [], []
        last_level = e == e_count - 1
        for lo in range(0, masks.shape[0], chunk):
            m = masks[lo : lo + chunk]
            share = share_of(n_incl[lo : lo + chunk] + 1)
            nr = m.sum(1)
            denom = n if basis == "total" else nr
            allowed = np.floor(share * denom + 1e-9)
            mr = m[:, order[e]]
            wc = np.cumsum(mr & wrong_sorted[e][None, :], axis=1, dtype=np.int32)
            ok = mr & (wc[:, grp_end[e]] <= allowed[:, None] + 1e-9)
            any_ok = ok.any(1)
            last = n - 1 - np.argmax(ok[:, ::-1], axis=1)
            # next reaching position after the admitted tie group: its score bounds the threshold from below
            nxt = np.minimum.accumulate(np.where(mr, arange_n, n)[:, ::-1], axis=1)[:, ::-1]
            p = grp_end[e][last] + 1
            nxt_at = np.where(p < n, nxt[np.arange(len(p)), np.minimum(p, n - 1)], n)
            lower = np.where(nxt_at < n, cs[e][np.minimum(nxt_at, n - 1)], 0.0)
            theta = np.where(any_ok, (cs[e][last] + lower) / 2.0, np.inf)
            hits = m & (s[e][None, :] >= theta[:, None])
            nh = hits.sum(1)
            new_k.append(k[lo : lo + chunk] + nh * (c2[e] - c1[e]) - (nr - nh) * c1[e])
            tt = thr[lo : lo + chunk].copy()
            tt[:, e] = theta
            new_thr.append(tt)
            if not last_level:
                new_masks.append(m & ~hits)
        k = np.concatenate([k, *new_k])
        thr = np.concatenate([thr, *new_thr])
        bits = np.concatenate([bits, bits | (1 << e)])
        n_incl = np.concatenate([n_incl, n_incl + 1])
        if not last_level:
            masks = np.concatenate([masks, *new_masks])
        if size is not None:  # drop states that can no longer end with exactly ``size`` exits
            keep = (n_incl <= size) & (n_incl + (e_count - 1 - e) >= size)
            k, thr, bits, n_incl = k[keep], thr[keep], bits[keep], n_incl[keep]
            if not last_level:
                masks = masks[keep]
    out_k = np.full(1 << e_count, -np.inf)
    out_thr = np.full((1 << e_count, e_count), np.inf)
    out_k[bits] = k
    out_thr[bits] = thr
    return out_k, out_thr


def _greedy(s, a, c1, c2, tolerance, scheme, basis, max_size=None) -> list[int]:
    chosen: list[int] = []
    best_k = 0.0
    limit = max_size or s.shape[0]
    while len(chosen) < limit:
        cand = None
        for i in range(s.shape[0]):
            if i in chosen:
                continue
            sub = sorted(chosen + [i])
            sch = scheme if isinstance(scheme, str) else [scheme[j] for j in sub]
            thr = assign_thresholds(s[sub], a[sub], tolerance, sch, basis=basis)
            kk = k_score(s[sub], thr.thresholds, c1[sub], c2[sub])
            if kk > best_k + 1e-9:
                best_k, cand = kk, i
        if cand is None:
            break
        chosen = sorted(chosen + [cand])
    return chosen


def best_subset(
    scores,
    agree,
    c1,
    c2,
    tolerance: float,
    scheme="halving",
    basis: str = "total",
    names: Sequence[str] | None = None,
    base_flops: float | None = None,
    exhaustive_limit: int = 16,
    size: int | None = None,
) -> SubsetResult:
    """The subset with the largest K(S) (exhaustive up to ``exhaustive_limit`` exits, greedy beyond).

    ``size`` restricts the search to subsets of exactly that many exits.
    An empty subset (no early exit pays off) is a valid answer.
    """
    s, a, c1, c2 = _check(scores, agree, c1, c2)
    e_count = s.shape[0]
    if size is not None and not 0 <= size <= e_count:
        raise AutoExitError(f"subset size must be between 0 and {e_count}, got {size}")
    if e_count <= exhaustive_limit and isinstance(scheme, str):
        k_all, _ = all_subset_scores(s, a, c1, c2, tolerance, scheme, basis)
        masks = np.arange(1 << e_count)
        pop = np.array([bin(m).count("1") for m in masks])
        cand = masks if size is None else masks[pop == size]
        # best K; ties broken by fewer exits, then by the lowest mask
        best = cand[np.lexsort((cand, pop[cand], -k_all[cand]))[0]]
        subset = [i for i in range(e_count) if best >> i & 1]
    elif e_count <= exhaustive_limit:
        subsets = [
            [i for i in range(e_count) if m >> i & 1]
            for m in range(1 << e_count)
            if size is None or bin(m).count("1") == size
        ]
        scored = []
        for sub in subsets:
            sch = scheme if isinstance(scheme, str) else [scheme[j] for j in sub]
            thr = assign_thresholds(s[sub], a[sub], tolerance, sch, basis=basis) if sub else None
            scored.append((k_score(s[sub], thr.thresholds, c1[sub], c2[sub]) if sub else 0.0, -len(sub), sub))
        subset = max(scored, key=lambda x: (x[0], x[1]))[2]
    else:
        subset = _greedy(s, a, c1, c2, tolerance, scheme, basis, max_size=size)
    sch = scheme if isinstance(scheme, str) else [scheme[j] for j in subset]
    return evaluate_subset(s, a, c1, c2, subset, tolerance, sch, basis, names, base_flops)


def best_by_size(scores, agree, c1, c2, tolerance: float, scheme="halving", basis="total",
                 names=None, base_flops=None, exhaustive_limit: int = 16) -> list[SubsetResult]:
    """For each k = 1..E, the best subset of exactly k exits (the K(S) ranking by size)."""
    s = np.asarray(scores)
    return [
        best_subset(scores, agree, c1, c2, tolerance, scheme, basis, names, base_flops, exhaustive_limit, size=k)
        for k in range(1, s.shape[0] + 1)
    ]



@dataclass
class ExitOutcome:
    """Per-sample outcome of exits with fixed thresholds on recorded predictions."""

    exit_index: np.ndarray  # [n]; len(subset) = the backbone answered
    pred: np.ndarray  # [n] final predicted class
    flops: np.ndarray  # [n] FLOPs spent on each sample
    hits: np.ndarray  # [exits + 1] samples answered by each exit, then by the backbone

    def exit_rates(self) -> np.ndarray:
        return self.hits / max(len(self.pred), 1)


def path_costs(c1, flops_before, base_flops, fixed: float = 0.0) -> np.ndarray:
    """[k + 1] cost of a sample answered at each of the k kept exits (last: through the backbone): the
    backbone up to the exit and every kept head up to and including it; ``fixed`` is paid by every path that
    goes on past the first kept exit (``ExitCosts.fixed``: measured latency's cost of resuming the backbone
    after an exit; 0 for FLOPs). No exit kept: the backbone alone. The one definition of a path's cost, for
    the outer search's simulation and the policies' chains alike. With ``c1`` [k, n] (what each of n samples
    pays for each head, e.g. a head that runs only on some inputs): [k + 1, n], one column per sample."""
    c1 = np.asarray(c1, dtype=np.float64)
    before = np.asarray(flops_before, dtype=np.float64).reshape(-1, *([1] * (c1.ndim - 1)))
    out = np.concatenate([before + np.cumsum(c1, axis=0), (float(base_flops) + c1.sum(0))[None]])
    out[1:] += float(fixed)
    return out


def simulate_exits(scores, exit_pred, backbone_pred, thresholds, c1, flops_before, base_flops,
                   fixed: float = 0.0) -> ExitOutcome:
    """Run the exit rule on recorded predictions: which exit answers each sample, with what, at what cost.

    ``scores``/``exit_pred`` are [exits, n] for the kept exits in order, ``c1`` their
    head FLOPs and ``flops_before`` the backbone FLOPs up to each exit point; each sample costs its path
    (:func:`path_costs`, with ``fixed``).
    """
    s = np.asarray(scores, dtype=np.float64)
    ep = np.asarray(exit_pred)
    k, n = s.shape
    exit_index = np.full(n, k, dtype=np.int64)
    pred = np.asarray(backbone_pred).copy()
    reaching = np.ones(n, dtype=bool)
    hits = np.zeros(k + 1, dtype=np.int64)
    for i in range(k):
        hit = reaching & (s[i] >= thresholds[i])
        exit_index[hit] = i
        pred[hit] = ep[i][hit]
        hits[i] = int(hit.sum())
        reaching &= ~hit
    hits[k] = int(reaching.sum())
    flops = path_costs(c1, flops_before, base_flops, fixed)[exit_index]
    return ExitOutcome(exit_index, pred, flops, hits)


def oracle_flops(agree, c1, flops_before, base_flops) -> np.ndarray:
    """Per-sample FLOPs if each sample left at the first head that agrees with the backbone.

    Heads are evaluated in order, as a threshold policy would, so each earlier head's
    cost is paid too; samples no head agrees on pay the whole backbone and every head.
    This is the best any exit rule can reach with these heads at zero accuracy change.
    """
    a = np.asarray(agree, dtype=bool)
    k, n = a.shape
    return simulate_exits(np.where(a, 1.0, 0.0), np.zeros((k, n), dtype=np.int64), np.zeros(n, dtype=np.int64),
                          np.full(k, 0.5), c1, flops_before, base_flops).flops
