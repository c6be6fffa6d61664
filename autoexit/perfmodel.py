"""Partition + early-exit performance model over multi-tier topologies.

Implements the performance model of Ebrahimi et al., "Combining DNN
Partitioning and Early Exit" (EdgeSys '22; ``papers/004``, section 2) and
the constraint-driven single split of EdgeLessPart (``papers/002``).

Vocabulary (paper symbols in brackets, indices are **1-based** as in the
paper):

* The backbone is a chain of ``N`` *blocks*; there is a potential exit
  after every block. Exit ``i`` is the head that reads block ``i``'s output;
  exit ``N`` is the backbone's own classifier (its head cost is normally 0
  because block ``N`` already ends in the classifier).
* A :class:`Topology` has ``M`` tiers in a chain, tier ``j`` connected to
  tier ``j+1`` by link ``j`` (bandwidth ``BW_j`` in bit/s, propagation
  latency ``PL_j`` in s). Each tier has a computation ratio ``R_j``
  (slowdown vs the reference device the profile was measured on) or
  measured per-block latencies. The input is produced at the *source* tier
  and the result is consumed at the *destination* tier ``D``.
* A :class:`Profile` holds what profiling once per backbone + dataset
  produces: ``CK_i``, ``CB_i``, ``O_i``, ``acc_i`` and the exit rates
  ``alpha_i(T)`` on a threshold grid, for the confidence and the entropy
  criteria.
* A configuration is a triplet ``(T, P, A)``: a threshold ``T`` (and its
  criterion), a partitioning ``P = [P_1 < ... < P_L]`` (``P_k`` is the last
  block of partition ``k``, and its exit; ``P_L < N`` is a *trimmed*
  model) and a placement ``A = [A_1, ..., A_L]`` (distinct tiers, in any
  order: a later partition may sit on an earlier tier).

Two evaluators compute the same numbers: :func:`estimate` is a loop-based
transcription of section 2.3 for one configuration, :func:`estimate_batch`
is vectorised over millions of configurations; :func:`enumerate_space`
builds and evaluates the whole space, and :func:`pareto_front`,
:func:`solve_p_lat`, :func:`solve_p_acc` answer the paper's questions
exactly over it. :func:`constraint_split` is paper 002's one-split planner.

Units: seconds, bits, bit/s; accuracies and rates are fractions in [0, 1].
numpy only; torch is never imported here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autoexit.errors import AutoExitError

__all__ = [
    "CRITERIA",
    "DEFAULT_THRESHOLDS",
    "CloudPricing",
    "Tier",
    "Link",
    "Topology",
    "Profile",
    "Configuration",
    "Estimate",
    "Estimates",
    "ConfigSpace",
    "Solution",
    "PlanEstimate",
    "SplitPlan",
    "estimate",
    "estimate_batch",
    "estimate_plan",
    "estimate_plan_rates",
    "enumerate_space",
    "pareto_front",
    "solve_p_lat",
    "solve_p_acc",
    "simulate_partitioned",
    "exit_positions",
    "constraint_split",
]

#: Exit criteria. ``confidence``: a sample exits at a head when its max
#: softmax is ``>= T``. ``entropy`` (the paper's): it exits when the entropy
#: of the head's softmax, normalised by ``log(n_classes)`` to [0, 1], is ``< T``.
CRITERIA: tuple[str, ...] = ("confidence", "entropy")

#: The paper's 20 thresholds between 0 and 1 (both ends included: they give
#: "no early exit" and "everything exits at the first exit").
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(x) for x in np.linspace(0.0, 1.0, 20))

_SCHEMA = 1


# --------------------------------------------------------------------------- validation helpers


def _num(value: Any, what: str, *, lo: float | None = None, lo_open: bool = False,
         hi: float | None = None, hint: str = "") -> float:
    """A finite float within bounds, or a one-line AutoExitError naming ``what``."""
    if isinstance(value, bool):
        raise AutoExitError(f"{what} must be a number, got {value!r}{hint}")
    if isinstance(value, str):  # YAML 1.1 reads '5e5' as a string; be forgiving
        try:
            value = float(value)
        except ValueError:
            raise AutoExitError(f"{what} must be a number, got {value!r}{hint}") from None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AutoExitError(f"{what} must be a number, got {value!r}{hint}") from None
    if not math.isfinite(x):
        raise AutoExitError(f"{what} must be finite, got {value!r}{hint}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        rel = ">" if lo_open else ">="
        raise AutoExitError(f"{what} must be {rel} {lo:g}, got {x:g}{hint}")
    if hi is not None and x > hi:
        raise AutoExitError(f"{what} must be <= {hi:g}, got {x:g}{hint}")
    return x


def _vec(value: Any, what: str, *, n: int | None = None, lo: float | None = 0.0,
         lo_open: bool = False, hi: float | None = None, hint: str = "") -> tuple[float, ...]:
    """A 1-D sequence of finite floats (length ``n`` when given), as a tuple."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise AutoExitError(f"{what} must be a list of numbers, got {type(value).__name__}{hint}")
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise AutoExitError(f"{what} must be a flat list of numbers, got shape {arr.shape}{hint}")
    out = tuple(_num(v, f"{what}[{i}]", lo=lo, lo_open=lo_open, hi=hi, hint=hint)
                for i, v in enumerate(value))
    if n is not None and len(out) != n:
        raise AutoExitError(f"{what} has {len(out)} entries but there are {n} blocks{hint}")
    if not out:
        raise AutoExitError(f"{what} is empty; give one value per block{hint}")
    return out


def _check_keys(d: Mapping, allowed: Sequence[str], where: str, required: Sequence[str] = ()) -> None:
    if not isinstance(d, Mapping):
        raise AutoExitError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(map(str, d)) - set(allowed))
    if unknown:
        raise AutoExitError(f"{where} has unknown key(s) {unknown}; allowed keys are {list(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise AutoExitError(f"{where} is missing {missing}; add {', '.join(repr(m) for m in missing)}")


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class CloudPricing:
    """Serverless pricing of a tier (paper 002's cost model, e.g. Google Cloud Functions).

    Cost of one invocation = ``per_invocation + per_gb_second * memory_gb * billed_s``
    where ``billed_s`` is the partition's computation time rounded up to
    ``billing_increment_s`` (0: no rounding).
    """

    per_invocation: float
    per_gb_second: float
    memory_gb: float
    billing_increment_s: float = 0.0

    def __post_init__(self) -> None:
        where = "pricing"
        _num(self.per_invocation, f"{where}.per_invocation", lo=0.0)
        _num(self.per_gb_second, f"{where}.per_gb_second", lo=0.0)
        _num(self.memory_gb, f"{where}.memory_gb", lo=0.0, lo_open=True)
        _num(self.billing_increment_s, f"{where}.billing_increment_s", lo=0.0)

    def invocation_cost(self, compute_s: float) -> float:
        billed = compute_s
        if self.billing_increment_s > 0:
            billed = math.ceil(compute_s / self.billing_increment_s - 1e-12) * self.billing_increment_s
        return self.per_invocation + self.per_gb_second * self.memory_gb * billed

    def to_dict(self) -> dict:
        return {"per_invocation": self.per_invocation, "per_gb_second": self.per_gb_second,
                "memory_gb": self.memory_gb, "billing_increment_s": self.billing_increment_s}


@dataclass(frozen=True)
class Tier:
    """One tier: a name and either a computation ratio ``R_j`` or measured latencies.

    ``ratio``: how many times slower than the reference device the profile's
    ``CK_i``/``CB_i`` were measured on (the paper's ``R_j``).
    ``block_latency_s``/``head_latency_s``: measured per-block and per-head
    latencies on this tier (one per block of the profile), used instead of
    ``ratio * CK_i`` when present (e.g. from the device evaluator).
    """

    name: str
    ratio: float | None = None
    block_latency_s: tuple[float, ...] | None = None
    head_latency_s: tuple[float, ...] | None = None
    pricing: CloudPricing | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise AutoExitError(f"every tier needs a non-empty 'name', got {self.name!r}")
        tw = f"tier {self.name!r}"
        if self.ratio is None and self.block_latency_s is None:
            raise AutoExitError(f"{tw} needs either 'ratio' (slowdown vs the reference device) "
                                "or 'block_latency_s' (measured per-block latencies); add one")
        if self.ratio is not None and self.block_latency_s is not None:
            raise AutoExitError(f"{tw} gives both 'ratio' and 'block_latency_s'; keep only one")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _num(self.ratio, f"{tw} ratio", lo=0.0, lo_open=True))
        if (self.block_latency_s is None) != (self.head_latency_s is None):
            raise AutoExitError(f"{tw} gives only one of 'block_latency_s' and 'head_latency_s'; "
                                "give both (one value per block each)")
        if self.block_latency_s is not None:
            b = _vec(self.block_latency_s, f"{tw} block_latency_s")
            object.__setattr__(self, "block_latency_s", b)
            object.__setattr__(self, "head_latency_s", _vec(self.head_latency_s, f"{tw} head_latency_s",
                                                            n=len(b)))
        if self.pricing is not None and not isinstance(self.pricing, CloudPricing):
            raise AutoExitError(f"{tw} pricing must be a CloudPricing (per_invocation, per_gb_second, memory_gb)")

    @property
    def measured(self) -> bool:
        return self.block_latency_s is not None


@dataclass(frozen=True)
class Link:
    """Link between tier ``j`` and ``j+1``: bandwidth ``BW_j`` (bit/s), propagation latency ``PL_j`` (s)."""

    bandwidth_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidth_bps", _num(self.bandwidth_bps, "link bandwidth_bps", lo=0.0,
                                                       lo_open=True, hint=" (bits per second)"))
        object.__setattr__(self, "latency_s", _num(self.latency_s, "link latency_s", lo=0.0, hint=" (seconds)"))


_TIER_KEYS = ("name", "ratio", "block_latency_s", "head_latency_s", "pricing")
_LINK_KEYS = ("from", "to", "bandwidth_bps", "latency_s")
_TOPO_KEYS = ("name", "tiers", "links", "destination", "source", "description")


@dataclass(frozen=True)
class Topology:
    """An ``M``-tier chain of devices, validated on construction.

    ``source`` and ``destination`` are 1-based tier indices (the YAML file may
    name them). Build one with :meth:`from_yaml` / :meth:`from_dict`.
    """

    tiers: tuple[Tier, ...]
    links: tuple[Link, ...]
    destination: int | str
    source: int | str = 1
    name: str = ""

    def __post_init__(self) -> None:
        where = f"topology {self.name!r}" if self.name else "topology"
        tiers = tuple(self.tiers)
        links = tuple(self.links)
        if not tiers:
            raise AutoExitError(f"{where} has no tiers; list at least one under 'tiers'")
        for j, t in enumerate(tiers, 1):
            if not isinstance(t, Tier):
                raise AutoExitError(f"{where}: tier {j} must be a Tier, got {type(t).__name__}")
        names = [t.name for t in tiers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AutoExitError(f"{where} has duplicate tier names {dup}; give every tier its own name")
        if len(links) != len(tiers) - 1:
            raise AutoExitError(f"{where} has {len(tiers)} tiers but {len(links)} links; "
                                f"give exactly {len(tiers) - 1} (one between each consecutive pair of tiers)")
        for j, ln in enumerate(links, 1):
            if not isinstance(ln, Link):
                raise AutoExitError(f"{where}: link {j} ({names[j - 1]} -> {names[j]}) must be a Link, "
                                    f"got {type(ln).__name__}")
        for attr in ("destination", "source"):
            v = getattr(self, attr)
            if isinstance(v, str) and v in names:
                v = names.index(v) + 1
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= len(tiers):
                raise AutoExitError(f"{where}: {attr} must be a tier name or an index in 1..{len(tiers)}, "
                                    f"got {v!r}")
            object.__setattr__(self, attr, int(v))
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "links", links)

    # ---- construction ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping, *, where: str = "topology") -> Topology:
        """Build from a mapping (the YAML format, see ``docs/partitioning.md``)."""
        _check_keys(d, _TOPO_KEYS, where, required=("tiers", "links"))
        name = str(d.get("name", "") or "")
        if name:
            where = f"{where} {name!r}" if where == "topology" else where
        raw_tiers = d["tiers"]
        if not isinstance(raw_tiers, Sequence) or isinstance(raw_tiers, (str, bytes)) or not raw_tiers:
            raise AutoExitError(f"{where}: 'tiers' must be a non-empty list of tiers")
        tiers = []
        for j, t in enumerate(raw_tiers, 1):
            tw = f"{where}: tier {j}"
            _check_keys(t, _TIER_KEYS, tw, required=("name",))
            pricing = None
            if t.get("pricing") is not None:
                p = t["pricing"]
                _check_keys(p, ("per_invocation", "per_gb_second", "memory_gb", "billing_increment_s"),
                            f"{tw} pricing", required=("per_invocation", "per_gb_second", "memory_gb"))
                pricing = CloudPricing(
                    per_invocation=_num(p["per_invocation"], f"{tw} pricing.per_invocation", lo=0.0),
                    per_gb_second=_num(p["per_gb_second"], f"{tw} pricing.per_gb_second", lo=0.0),
                    memory_gb=_num(p["memory_gb"], f"{tw} pricing.memory_gb", lo=0.0, lo_open=True),
                    billing_increment_s=_num(p.get("billing_increment_s", 0.0),
                                             f"{tw} pricing.billing_increment_s", lo=0.0),
                )
            ratio = t.get("ratio")
            try:
                tiers.append(Tier(
                    name=str(t["name"]) if t["name"] is not None else "",
                    ratio=None if ratio is None else _num(ratio, f"{tw} ratio", lo=0.0, lo_open=True),
                    block_latency_s=(None if t.get("block_latency_s") is None
                                     else _vec(t["block_latency_s"], f"{tw} block_latency_s")),
                    head_latency_s=(None if t.get("head_latency_s") is None
                                    else _vec(t["head_latency_s"], f"{tw} head_latency_s")),
                    pricing=pricing,
                ))
            except AutoExitError as exc:
                if str(exc).startswith(where):
                    raise
                raise AutoExitError(f"{tw}: {exc}") from None
        names = [t.name for t in tiers]
        raw_links = d["links"]
        if not isinstance(raw_links, Sequence) or isinstance(raw_links, (str, bytes)):
            raise AutoExitError(f"{where}: 'links' must be a list (one link between each pair of "
                                "consecutive tiers)")
        links = []
        for j, ln in enumerate(raw_links, 1):
            lw = f"{where}: link {j}"
            _check_keys(ln, _LINK_KEYS, lw, required=("bandwidth_bps", "latency_s"))
            if j < len(names) and ("from" in ln or "to" in ln):
                if ln.get("from", names[j - 1]) != names[j - 1] or ln.get("to", names[j]) != names[j]:
                    raise AutoExitError(
                        f"{lw} connects {ln.get('from')!r} -> {ln.get('to')!r} but link {j} must connect "
                        f"consecutive tiers {names[j - 1]!r} -> {names[j]!r}; list links in tier order")
            links.append(Link(
                bandwidth_bps=_num(ln["bandwidth_bps"], f"{lw} bandwidth_bps", lo=0.0, lo_open=True,
                                   hint=" (bits per second)"),
                latency_s=_num(ln["latency_s"], f"{lw} latency_s", lo=0.0, hint=" (seconds)"),
            ))

        def tier_ref(key: str, default: int) -> int:
            v = d.get(key, default)
            if isinstance(v, str):
                if v not in names:
                    raise AutoExitError(f"{where}: {key} {v!r} is not a tier; use one of {names}")
                return names.index(v) + 1
            return v

        return cls(tiers=tuple(tiers), links=tuple(links), name=name,
                   destination=tier_ref("destination", 1), source=tier_ref("source", 1))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Topology:
        """Load a topology YAML file (format in ``docs/partitioning.md``)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise AutoExitError(f"cannot read topology file {str(path)!r}: {exc.strerror}; "
                                "check the path") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AutoExitError(f"topology file {str(path)!r} is not valid YAML ({first}); fix the syntax") from None
        if not isinstance(data, Mapping):
            raise AutoExitError(f"topology file {str(path)!r} must hold a mapping with 'tiers' and 'links'")
        return cls.from_dict(data, where=f"topology file {str(path)!r}")

    def to_dict(self) -> dict:
        tiers = []
        for t in self.tiers:
            td: dict[str, Any] = {"name": t.name}
            if t.ratio is not None:
                td["ratio"] = t.ratio
            if t.block_latency_s is not None:
                td["block_latency_s"] = list(t.block_latency_s)
                td["head_latency_s"] = list(t.head_latency_s or ())
            if t.pricing is not None:
                td["pricing"] = t.pricing.to_dict()
            tiers.append(td)
        names = self.names
        return {
            "name": self.name,
            "source": names[self.source - 1],
            "destination": names[self.destination - 1],
            "tiers": tiers,
            "links": [{"from": names[j], "to": names[j + 1], "bandwidth_bps": ln.bandwidth_bps,
                       "latency_s": ln.latency_s} for j, ln in enumerate(self.links)],
        }

    # ---- queries ----------------------------------------------------------------------

    @property
    def n_tiers(self) -> int:
        return len(self.tiers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tier_index(self, tier: int | str) -> int:
        """1-based index of a tier given by name or index."""
        if isinstance(tier, str):
            if tier not in self.names:
                raise AutoExitError(f"{tier!r} is not a tier of topology {self.name!r}; use one of "
                                    f"{list(self.names)}")
            return self.names.index(tier) + 1
        if isinstance(tier, bool) or not isinstance(tier, (int, np.integer)) or not 1 <= tier <= self.n_tiers:
            raise AutoExitError(f"tier must be a name or an index in 1..{self.n_tiers}, got {tier!r}")
        return int(tier)

    def with_destination(self, tier: int | str) -> Topology:
        """The same topology with the result consumed at another tier."""
        return replace(self, destination=self.tier_index(tier))

    def with_source(self, tier: int | str) -> Topology:
        """The same topology with the input produced at another tier."""
        return replace(self, source=self.tier_index(tier))

    def block_costs(self, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
        """Per-tier block and head computation times, shapes ``[M, N]`` each.

        ``R_j * CK_i`` and ``R_j * CB_i`` for ratio tiers, the measured values otherwise.
        """
        self.check(profile)
        n = profile.n_blocks
        blocks = np.empty((self.n_tiers, n))
        heads = np.empty((self.n_tiers, n))
        ck = np.asarray(profile.block_time_s)
        cb = np.asarray(profile.head_time_s)
        for j, t in enumerate(self.tiers):
            if t.block_latency_s is not None:
                blocks[j] = t.block_latency_s
                heads[j] = t.head_latency_s
            else:
                blocks[j] = t.ratio * ck
                heads[j] = t.ratio * cb
        return blocks, heads

    def check(self, profile: Profile) -> None:
        """Raise a one-line AutoExitError unless every measured tier covers the profile's blocks."""
        for t in self.tiers:
            if t.block_latency_s is not None and len(t.block_latency_s) != profile.n_blocks:
                raise AutoExitError(
                    f"tier {t.name!r} of topology {self.name!r} has measured latencies for "
                    f"{len(t.block_latency_s)} blocks but the profile has {profile.n_blocks}; "
                    "measure the same blocks")

    def hop_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """``[M, M]`` sums over the links between two tiers of ``PL_j`` and of ``1 / BW_j``."""
        m = self.n_tiers
        pl = np.array([ln.latency_s for ln in self.links], dtype=float)
        inv = np.array([1.0 / ln.bandwidth_bps for ln in self.links], dtype=float)
        cpl = np.concatenate([[0.0], np.cumsum(pl)])
        cinv = np.concatenate([[0.0], np.cumsum(inv)])
        idx = np.arange(m)
        return (np.abs(cpl[idx][:, None] - cpl[idx][None, :]),
                np.abs(cinv[idx][:, None] - cinv[idx][None, :]))


# --------------------------------------------------------------------------- profile


def _exit_rates_from(scores: np.ndarray, criterion: str, thresholds: Sequence[float]) -> np.ndarray:
    """Unconditional exit rates ``alpha_i(T)`` of the full configuration, shape ``[n_T, N]``.

    A sample exits at the first head whose criterion holds; every sample not
    exited before the last head exits there.
    """
    n_exits, n = scores.shape
    out = np.empty((len(thresholds), n_exits))
    for t, thr in enumerate(thresholds):
        ok = scores >= thr if criterion == "confidence" else scores < thr
        ok[-1] = True
        first = np.argmax(ok, axis=0)
        out[t] = np.bincount(first, minlength=n_exits) / n
    return out


def _pred_arrays(correct: Any, confidence: Any, entropy: Any, n_classes: int | None,
                 where: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    corr = np.asarray(correct)
    if corr.ndim != 2 or corr.shape[0] < 1 or corr.shape[1] < 1:
        raise AutoExitError(f"{where}: correct must have shape [n_exits, n_samples], got {corr.shape}")
    if corr.dtype != bool:
        if not np.all((corr == 0) | (corr == 1)):
            raise AutoExitError(f"{where}: correct must hold booleans (or 0/1)")
        corr = corr.astype(bool)
    scores: dict[str, np.ndarray] = {}
    if confidence is None and entropy is None:
        raise AutoExitError(f"{where}: give confidence and/or entropy arrays (shape [n_exits, n_samples])")
    if confidence is not None:
        c = np.asarray(confidence, dtype=float)
        if c.shape != corr.shape:
            raise AutoExitError(f"{where}: confidence has shape {c.shape} but correct has {corr.shape}; "
                                "give one row per exit and one column per sample")
        if not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 1 + 1e-6:
            raise AutoExitError(f"{where}: confidence must be max-softmax values in [0, 1]")
        scores["confidence"] = c
    if entropy is not None:
        e = np.asarray(entropy, dtype=float)
        if e.shape != corr.shape:
            raise AutoExitError(f"{where}: entropy has shape {e.shape} but correct has {corr.shape}; "
                                "give one row per exit and one column per sample")
        if n_classes is not None:
            if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
                raise AutoExitError(f"{where}: n_classes must be an integer >= 2, got {n_classes!r}")
            e = e / math.log(n_classes)
        if not np.all(np.isfinite(e)) or e.min() < -1e-9 or e.max() > 1 + 1e-6:
            raise AutoExitError(f"{where}: entropy must be normalised to [0, 1] (divide by log(n_classes)), "
                                "or pass n_classes=... to normalise raw entropies")
        scores["entropy"] = e
    return corr, scores


_PROFILE_KEYS = ("schema", "block_time_s", "head_time_s", "output_bits", "input_bits", "head_accuracy",
                 "thresholds", "exit_rates", "result_bits", "block_names", "block_memory_bytes",
                 "percentile", "meta")


@dataclass(frozen=True)
class Profile:
    """Profiling data of one backbone + dataset (paper 004, sections 2.1-2.2).

    All per-block sequences have one entry per block ``i = 1..N`` (position
    ``i-1``); entry ``N`` is the backbone's own classifier.

    * ``block_time_s`` (``CK_i``): time to compute block ``i`` from block ``i-1``'s
      output on the reference device (the paper: 99th percentile).
    * ``head_time_s`` (``CB_i``): time of exit head ``i`` on the reference device.
    * ``output_bits`` (``O_i``): size in bits of block ``i``'s output (what a
      partition ending at block ``i`` sends on); ``input_bits`` (``O_0``): the input's size.
    * ``head_accuracy`` (``acc_i``): accuracy of head ``i`` over *all* samples;
      ``final_accuracy`` is the last entry.
    * ``thresholds[criterion]``: the threshold grid (20 values in the paper) and
      ``exit_rates[criterion][t][i-1]`` = ``alpha_i(T_t)``: the fraction of *all*
      samples whose first exit in the full configuration (every head present)
      is head ``i`` -- unconditional, each row sums to 1 (the last head takes
      every sample not exited before).
    * ``result_bits``: size of the result sent to the destination (the paper's
      ``O_{A_k}`` in the result term; default one 32-bit class index).
    * ``block_memory_bytes`` (optional): memory per block, for the memory-constrained split.
    * ``block_names``: exit-point names (node paths), for reports and artifacts.
    """

    block_time_s: tuple[float, ...]
    head_time_s: tuple[float, ...]
    output_bits: tuple[float, ...]
    input_bits: float
    head_accuracy: tuple[float, ...]
    thresholds: Mapping[str, tuple[float, ...]]
    exit_rates: Mapping[str, tuple[tuple[float, ...], ...]]
    result_bits: float = 32.0
    block_names: tuple[str, ...] = ()
    block_memory_bytes: tuple[float, ...] | None = None
    percentile: float = 99.0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = "profile"
        ck = _vec(self.block_time_s, f"{w} block_time_s")
        n = len(ck)
        s = object.__setattr__
        s(self, "block_time_s", ck)
        s(self, "head_time_s", _vec(self.head_time_s, f"{w} head_time_s", n=n))
        s(self, "output_bits", _vec(self.output_bits, f"{w} output_bits", n=n, lo=0.0, lo_open=True))
        s(self, "input_bits", _num(self.input_bits, f"{w} input_bits", lo=0.0, lo_open=True))
        s(self, "head_accuracy", _vec(self.head_accuracy, f"{w} head_accuracy", n=n, hi=1.0,
                                      hint=" (accuracy is a fraction in [0, 1])"))
        s(self, "result_bits", _num(self.result_bits, f"{w} result_bits", lo=0.0))
        s(self, "percentile", _num(self.percentile, f"{w} percentile", lo=0.0, hi=100.0))
        if self.block_memory_bytes is not None:
            s(self, "block_memory_bytes", _vec(self.block_memory_bytes, f"{w} block_memory_bytes", n=n))
        names = tuple(self.block_names) if self.block_names else tuple(f"block{i}" for i in range(1, n + 1))
        if len(names) != n or not all(isinstance(x, str) and x for x in names):
            raise AutoExitError(f"{w} block_names must be {n} non-empty strings, got {len(names)}")
        s(self, "block_names", names)
        if not isinstance(self.thresholds, Mapping) or not isinstance(self.exit_rates, Mapping):
            raise AutoExitError(f"{w} thresholds and exit_rates must map a criterion "
                                f"({' or '.join(CRITERIA)}) to values")
        if not self.thresholds:
            raise AutoExitError(f"{w} has no exit rates; profile at least one criterion of {list(CRITERIA)}")
        if set(self.thresholds) != set(self.exit_rates):
            raise AutoExitError(f"{w} thresholds are given for {sorted(self.thresholds)} but exit_rates for "
                                f"{sorted(self.exit_rates)}; give both for the same criteria")
        unknown = sorted(set(self.thresholds) - set(CRITERIA))
        if unknown:
            raise AutoExitError(f"{w} has unknown criteria {unknown}; use {list(CRITERIA)}")
        thr: dict[str, tuple[float, ...]] = {}
        rates: dict[str, tuple[tuple[float, ...], ...]] = {}
        for c in CRITERIA:  # canonical order
            if c not in self.thresholds:
                continue
            grid = _vec(self.thresholds[c], f"{w} thresholds[{c!r}]", lo=None)
            if any(b <= a for a, b in zip(grid, grid[1:])):
                raise AutoExitError(f"{w} thresholds[{c!r}] must be strictly increasing")
            rows = self.exit_rates[c]
            if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__") or len(rows) != len(grid):
                got = len(rows) if hasattr(rows, "__len__") else type(rows).__name__
                raise AutoExitError(f"{w} exit_rates[{c!r}] must have one row per threshold ({len(grid)}), "
                                    f"got {got}")
            clean = []
            for t, row in enumerate(rows):
                r = _vec(row, f"{w} exit_rates[{c!r}][{t}]", n=n, hi=1.0)
                if abs(sum(r) - 1.0) > 1e-6:
                    raise AutoExitError(
                        f"{w} exit_rates[{c!r}][{t}] sums to {sum(r):.6g}, not 1; exit rates are unconditional "
                        "fractions of all samples and the last exit takes every remaining sample")
                clean.append(r)
            thr[c] = grid
            rates[c] = tuple(clean)
        s(self, "thresholds", thr)
        s(self, "exit_rates", rates)
        if not isinstance(self.meta, Mapping):
            raise AutoExitError(f"{w} meta must be a mapping")
        s(self, "meta", dict(self.meta))

    # ---- construction ---------------------------------------------------------------

    @classmethod
    def from_predictions(
        cls,
        *,
        correct: Any,
        block_time_s: Any,
        head_time_s: Any,
        output_bits: Any,
        input_bits: float,
        confidence: Any = None,
        entropy: Any = None,
        n_classes: int | None = None,
        thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        result_bits: float = 32.0,
        percentile: float = 99.0,
        block_names: Sequence[str] | None = None,
        block_memory_bytes: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Profile:
        """Profile from recorded per-exit predictions on one split, as paper 004 section 2.2 does.

        Prediction arrays have shape ``[N, n_samples]``: row ``i-1`` is exit ``i``
        (the head after block ``i``), the last row the backbone's own output.

        * ``correct``: bool, the exit's prediction is right.
        * ``confidence``: max softmax of the (calibrated) exit.
        * ``entropy``: entropy of the exit's softmax, either normalised to [0, 1]
          (divided by ``log(n_classes)``) or raw with ``n_classes`` given.
        At least one of ``confidence``/``entropy`` is needed; the profile holds
        exit rates for each one given.

        ``alpha_i(T)`` is computed as in the paper: the fraction of **all**
        samples (unconditional, not conditional on reaching exit ``i``) whose
        first exit is ``i`` in the full configuration where every head is
        present: a sample exits at the first head with ``confidence >= T``
        (resp. ``entropy < T``) and at head ``N`` otherwise; each row sums to 1.
        ``acc_i`` is head ``i``'s accuracy over all samples (the paper's
        separately-trained-branch accuracy: our heads are trained on a frozen
        backbone, independently of each other).

        ``block_time_s`` / ``head_time_s``: shape ``[N]`` (already reduced) or
        ``[N, n_runs]`` raw timings, reduced to their ``percentile`` (99 as the
        paper). ``output_bits``: shape ``[N]``, bits of each block's output;
        ``input_bits``: bits of one input sample. ``thresholds``: the grid (one
        for both criteria, or a mapping per criterion), default 20 values
        ``linspace(0, 1, 20)``.
        """
        w = "Profile.from_predictions"
        corr, scores = _pred_arrays(correct, confidence, entropy, n_classes, w)
        n = corr.shape[0]
        _num(percentile, f"{w}: percentile", lo=0.0, hi=100.0)

        def reduce(v: Any, what: str) -> tuple[float, ...]:
            a = np.asarray(v, dtype=float)
            if a.ndim == 2:
                if a.shape[1] < 1:
                    raise AutoExitError(f"{w}: {what} has no timing runs")
                a = np.percentile(a, percentile, axis=1)
            if a.ndim != 1 or a.shape[0] != n:
                raise AutoExitError(f"{w}: {what} must have shape [{n}] or [{n}, n_runs] "
                                    f"(one entry per exit), got {np.asarray(v).shape}")
            return tuple(float(x) for x in a)

        if thresholds is None:
            grids = {c: DEFAULT_THRESHOLDS for c in scores}
        elif isinstance(thresholds, Mapping):
            missing = [c for c in scores if c not in thresholds]
            if missing:
                raise AutoExitError(f"{w}: thresholds has no grid for {missing}; add one per criterion")
            grids = {c: tuple(float(x) for x in thresholds[c]) for c in scores}
        else:
            grids = {c: tuple(float(x) for x in thresholds) for c in scores}
        rates = {c: tuple(tuple(float(x) for x in row)
                          for row in _exit_rates_from(scores[c], c, grids[c])) for c in scores}
        return cls(
            block_time_s=reduce(block_time_s, "block_time_s"),
            head_time_s=reduce(head_time_s, "head_time_s"),
            output_bits=tuple(float(x) for x in np.asarray(output_bits, dtype=float).ravel()),
            input_bits=input_bits,
            head_accuracy=tuple(float(x) for x in corr.mean(axis=1)),
            thresholds=grids,
            exit_rates=rates,
            result_bits=result_bits,
            block_names=tuple(block_names) if block_names is not None else (),
            block_memory_bytes=(None if block_memory_bytes is None
                                else tuple(float(x) for x in np.asarray(block_memory_bytes).ravel())),
            percentile=percentile,
            meta=dict(meta or {}),
        )

    def to_dict(self) -> dict:
        return {
            "schema": _SCHEMA,
            "block_names": list(self.block_names),
            "block_time_s": list(self.block_time_s),
            "head_time_s": list(self.head_time_s),
            "output_bits": list(self.output_bits),
            "input_bits": self.input_bits,
            "result_bits": self.result_bits,
            "head_accuracy": list(self.head_accuracy),
            "thresholds": {c: list(v) for c, v in self.thresholds.items()},
            "exit_rates": {c: [list(r) for r in v] for c, v in self.exit_rates.items()},
            "block_memory_bytes": None if self.block_memory_bytes is None else list(self.block_memory_bytes),
            "percentile": self.percentile,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Profile:
        _check_keys(d, _PROFILE_KEYS, "profile",
                    required=("block_time_s", "head_time_s", "output_bits", "input_bits", "head_accuracy",
                              "thresholds", "exit_rates"))
        if d.get("schema", _SCHEMA) != _SCHEMA:
            raise AutoExitError(f"profile schema {d.get('schema')!r} is not supported (expected {_SCHEMA}); "
                                "re-run the profiling with this autoexit version")
        kw = {k: v for k, v in d.items() if k != "schema"}
        return cls(**kw)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (floats round-trip exactly)."""
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise AutoExitError(f"cannot read profile {str(path)!r}: {exc.strerror}; check the path") from None
        except json.JSONDecodeError as exc:
            raise AutoExitError(f"profile {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                                "re-write it with Profile.to_json") from None
        return cls.from_dict(data)

    # ---- queries ----------------------------------------------------------------------

    @property
    def n_blocks(self) -> int:
        return len(self.block_time_s)

    @property
    def criteria(self) -> tuple[str, ...]:
        return tuple(self.thresholds)

    @property
    def final_accuracy(self) -> float:
        return self.head_accuracy[-1]

    def rates(self, criterion: str) -> np.ndarray:
        """``alpha_i(T)`` as an array ``[n_T, N]``."""
        self._check_criterion(criterion)
        return np.asarray(self.exit_rates[criterion], dtype=float)

    def threshold_index(self, criterion: str, threshold: float) -> int:
        """Index of ``threshold`` in the criterion's grid (it must be one of the profiled values)."""
        self._check_criterion(criterion)
        grid = np.asarray(self.thresholds[criterion])
        hit = np.flatnonzero(np.isclose(grid, float(threshold), rtol=0, atol=1e-9))
        if hit.size == 0:
            shown = ", ".join(f"{x:.4g}" for x in grid)
            raise AutoExitError(f"threshold {threshold!r} was not profiled for {criterion!r}; "
                                f"use one of [{shown}]")
        return int(hit[0])

    def _check_criterion(self, criterion: str) -> None:
        if criterion not in self.thresholds:
            raise AutoExitError(f"criterion {criterion!r} is not in the profile; use one of {list(self.criteria)}")


# --------------------------------------------------------------------------- configurations and the scalar reference


@dataclass(frozen=True)
class Configuration:
    """A triplet ``(T, P, A)`` with its exit criterion; blocks and tiers are 1-based."""

    criterion: str
    threshold: float
    partitions: tuple[int, ...]
    placement: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "partitions", tuple(int(p) for p in self.partitions))
        object.__setattr__(self, "placement", tuple(int(a) for a in self.placement))
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def n_partitions(self) -> int:
        return len(self.partitions)

    def check(self, profile: Profile, topology: Topology) -> None:
        """Raise a one-line AutoExitError unless this is a valid configuration for the pair."""
        p, a, n, m = self.partitions, self.placement, profile.n_blocks, topology.n_tiers
        if not p:
            raise AutoExitError("a configuration needs at least one partition")
        if len(a) != len(p):
            raise AutoExitError(f"placement {list(a)} has {len(a)} tiers but partitioning {list(p)} has "
                                f"{len(p)} partitions; give one tier per partition")
        if any(x < 1 or x > n for x in p) or any(y <= x for x, y in zip(p, p[1:])):
            raise AutoExitError(f"partitioning {list(p)} must be strictly increasing block indices in 1..{n}")
        if any(x < 1 or x > m for x in a) or len(set(a)) != len(a):
            raise AutoExitError(f"placement {list(a)} must use distinct tier indices in 1..{m} "
                                "(at most one partition per tier)")
        profile.threshold_index(self.criterion, self.threshold)

    def is_consecutive(self) -> bool:
        return all(y > x for x, y in zip(self.placement, self.placement[1:]))

    def is_trimmed(self, profile: Profile) -> bool:
        return self.partitions[-1] < profile.n_blocks

    def describe(self, topology: Topology | None = None) -> str:
        tiers = ([topology.names[a - 1] for a in self.placement] if topology is not None
                 else list(self.placement))
        return (f"T={self.threshold:.4g} ({self.criterion}) P={list(self.partitions)} "
                f"A={tiers}")

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "threshold": self.threshold,
                "partitions": list(self.partitions), "placement": list(self.placement)}


@dataclass(frozen=True)
class Estimate:
    """Model estimates for one configuration; per-partition tuples follow the partitions."""

    accuracy: float
    latency_s: float
    exit_rates: tuple[float, ...]
    stay_rates: tuple[float, ...]
    propagation_s: float
    transmission_s: float
    computation_s: float
    cost: float = 0.0


def _links_between(a: int, b: int) -> range:
    """0-based indices of the links crossed going from tier ``a`` to tier ``b`` (1-based tiers).

    The paper writes the sum as ``j = A_k .. A_{k+1}``; with link ``j`` joining
    tiers ``j`` and ``j+1`` the links crossed are ``min(a, b) .. max(a, b) - 1``.
    """
    lo, hi = min(a, b), max(a, b)
    return range(lo - 1, hi - 1)


def estimate(profile: Profile, topology: Topology, config: Configuration) -> Estimate:
    """Reference estimate of one configuration: section 2.3 of paper 004, written out with loops.

    * ``E_k = sum(alpha_i, i = P_{k-1}+1 .. P_k)`` (``.. N`` for the last partition),
      ``S_k = 1 - sum(E_a, a <= k)``.
    * ``acc = sum_k acc_{P_k} E_k``.
    * ``Lat = input leg + sum_k (prop_k + trans_k + comp_k)`` with
      ``prop_k = S_k * sum(PL over links A_k -> A_{k+1}) + E_k * sum(PL over links A_k -> D)``,
      ``trans_k = S_k * sum(O_{P_k} / BW) + E_k * sum(result_bits / BW)`` over the same links,
      ``comp_k = (S_k + E_k) * (R_{A_k} CB_{P_k} + R_{A_k} sum(CK_i, i = P_{k-1}+1 .. P_k))``
      (measured per-block latencies of tier ``A_k`` replace ``R * C`` when the tier has them);
      the input leg sends ``input_bits`` from the source tier to ``A_1`` (all samples).
    * ``cost = sum_k (S_k + E_k) * invocation_cost(tier A_k, compute time)`` over priced tiers.
    """
    config.check(profile, topology)
    topology.check(profile)
    P, A = config.partitions, config.placement
    L, N = len(P), profile.n_blocks
    alpha = profile.exit_rates[config.criterion][profile.threshold_index(config.criterion, config.threshold)]
    links = topology.links
    D, src = topology.destination, topology.source

    # exit and stay rates
    E = []
    for k in range(L):
        first = P[k - 1] + 1 if k > 0 else 1
        last = P[k] if k < L - 1 else N
        E.append(sum(alpha[i - 1] for i in range(first, last + 1)))
    S = []
    for k in range(L):
        S.append(0.0 if k == L - 1 else 1.0 - sum(E[: k + 1]))

    acc = sum(profile.head_accuracy[P[k] - 1] * E[k] for k in range(L))

    def block_time(tier: int, i: int) -> float:
        t = topology.tiers[tier - 1]
        return t.block_latency_s[i - 1] if t.block_latency_s is not None else t.ratio * profile.block_time_s[i - 1]

    def head_time(tier: int, i: int) -> float:
        t = topology.tiers[tier - 1]
        return t.head_latency_s[i - 1] if t.head_latency_s is not None else t.ratio * profile.head_time_s[i - 1]

    prop = trans = comp = cost = 0.0
    # the input travels from the source tier to the first partition's tier
    for j in _links_between(src, A[0]):
        prop += links[j].latency_s
        trans += profile.input_bits / links[j].bandwidth_bps
    for k in range(L):
        first = P[k - 1] + 1 if k > 0 else 1
        if k < L - 1:
            for j in _links_between(A[k], A[k + 1]):
                prop += S[k] * links[j].latency_s
                trans += S[k] * profile.output_bits[P[k] - 1] / links[j].bandwidth_bps
        for j in _links_between(A[k], D):
            prop += E[k] * links[j].latency_s
            trans += E[k] * profile.result_bits / links[j].bandwidth_bps
        work = head_time(A[k], P[k])
        for i in range(first, P[k] + 1):
            work += block_time(A[k], i)
        comp += (S[k] + E[k]) * work
        pricing = topology.tiers[A[k] - 1].pricing
        if pricing is not None:
            cost += (S[k] + E[k]) * pricing.invocation_cost(work)
    return Estimate(accuracy=acc, latency_s=prop + trans + comp, exit_rates=tuple(E), stay_rates=tuple(S),
                    propagation_s=prop, transmission_s=trans, computation_s=comp, cost=cost)


# --------------------------------------------------------------------------- vectorised evaluation


@dataclass(frozen=True)
class Estimates:
    """Vectorised estimates, one entry per configuration."""

    accuracy: np.ndarray
    latency_s: np.ndarray
    cost: np.ndarray


class _Tables:
    """Lookup tables for the vectorised evaluator, built once per (profile, topology, criteria)."""

    def __init__(self, profile: Profile, topology: Topology, criteria: Sequence[str]):
        n, m = profile.n_blocks, topology.n_tiers
        self.n, self.m = n, m
        self.criteria = tuple(criteria)
        n_t = {len(profile.thresholds[c]) for c in self.criteria}
        self.n_thr = max(n_t)
        # cumulative exit rates per (criterion, threshold) row: C[r, i] = sum(alpha_1..alpha_i), C[r, 0] = 0
        rows = []
        for c in self.criteria:
            r = profile.rates(c)
            if r.shape[0] < self.n_thr:  # pad so that rows = criterion * n_thr + t
                r = np.vstack([r, np.repeat(r[-1:], self.n_thr - r.shape[0], axis=0)])
            rows.append(r)
        alpha = np.vstack(rows)
        self.cum = np.concatenate([np.zeros((alpha.shape[0], 1)), np.cumsum(alpha, axis=1)], axis=1).ravel()
        blocks, heads = topology.block_costs(profile)
        cumb = np.concatenate([np.zeros((m, 1)), np.cumsum(blocks, axis=1)], axis=1)  # [M, N+1]
        self.cumb = cumb.ravel()
        self.head = np.concatenate([np.zeros((m, 1)), heads], axis=1).ravel()  # [M, N+1]
        self.acc = np.concatenate([[0.0], profile.head_accuracy])
        self.out_bits = np.concatenate([[0.0], profile.output_bits])
        hop_pl, hop_inv = topology.hop_matrices()
        self.hop_pl = hop_pl.ravel()
        self.hop_inv = hop_inv.ravel()
        d, s = topology.destination - 1, topology.source - 1
        self.dest = hop_pl[:, d] + profile.result_bits * hop_inv[:, d]  # [M]
        self.inp = hop_pl[s, :] + profile.input_bits * hop_inv[s, :]  # [M]
        self.priced = any(t.pricing is not None for t in topology.tiers)
        self.p_inv = np.array([t.pricing.per_invocation if t.pricing else 0.0 for t in topology.tiers])
        self.p_gbs = np.array([t.pricing.per_gb_second * t.pricing.memory_gb if t.pricing else 0.0
                               for t in topology.tiers])
        self.p_inc = np.array([t.pricing.billing_increment_s if t.pricing else 0.0 for t in topology.tiers])


def _evaluate(tab: _Tables, crit: np.ndarray, thr: np.ndarray, parts: np.ndarray,
              tiers: np.ndarray) -> Estimates:
    """Core of the vectorised model; inputs already validated, ``parts``/``tiers`` 1-based, 0-padded."""
    n_cfg, lmax = parts.shape
    n1 = tab.n + 1
    row_off = (crit.astype(np.int64) * tab.n_thr + thr.astype(np.int64)) * n1
    lat = tab.inp[tiers[:, 0].astype(np.int64) - 1].copy()
    acc = np.zeros(n_cfg)
    cost = np.zeros(n_cfg) if tab.priced else None
    enter = np.ones(n_cfg)  # S_{k-1} = S_k + E_k: the fraction entering partition k (1 for k = 1)
    p_prev = np.zeros(n_cfg, dtype=np.int64)
    for k in range(lmax):
        p = parts[:, k].astype(np.int64)
        a = np.maximum(tiers[:, k].astype(np.int64) - 1, 0)
        if k + 1 < lmax:
            p_next = parts[:, k + 1]
            more = p_next > 0
            stay = np.where(more, 1.0 - tab.cum[row_off + p], 0.0)
            a2 = np.maximum(tiers[:, k + 1].astype(np.int64) - 1, 0)
        else:
            more = np.zeros(n_cfg, dtype=bool)
            stay = np.zeros(n_cfg)
            a2 = a
        # past the last partition enter == stay == 0, so padded positions add nothing
        ex = enter - stay  # E_k
        a_off = a * n1
        work = tab.cumb[a_off + p] - tab.cumb[a_off + p_prev] + tab.head[a_off + p]
        hop = a * tab.m + a2
        lat += enter * work + ex * tab.dest[a] + stay * (tab.hop_pl[hop] + tab.out_bits[p] * tab.hop_inv[hop])
        acc += ex * tab.acc[p]
        if cost is not None:
            inc = tab.p_inc[a]
            billed = np.where(inc > 0, np.ceil(work / np.where(inc > 0, inc, 1.0) - 1e-12) * inc, work)
            cost += enter * (tab.p_inv[a] + tab.p_gbs[a] * billed)
        enter = stay
        p_prev = p
    return Estimates(accuracy=acc, latency_s=lat, cost=cost if cost is not None else np.zeros(n_cfg))


_CHUNK = 1 << 18


def _evaluate_chunked(tab: _Tables, crit: np.ndarray, thr: np.ndarray, parts: np.ndarray,
                      tiers: np.ndarray) -> Estimates:
    """:func:`_evaluate` over cache-sized chunks: same numbers, bounded temporary memory."""
    n = parts.shape[0]
    if n <= _CHUNK:
        return _evaluate(tab, crit, thr, parts, tiers)
    acc, lat, cost = np.empty(n), np.empty(n), np.empty(n)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        e = _evaluate(tab, crit[lo:hi], thr[lo:hi], parts[lo:hi], tiers[lo:hi])
        acc[lo:hi], lat[lo:hi], cost[lo:hi] = e.accuracy, e.latency_s, e.cost
    return Estimates(accuracy=acc, latency_s=lat, cost=cost)


def _as_batch(profile: Profile, topology: Topology, criterion: str | Sequence[str] | np.ndarray,
              threshold_index: Any, partitions: Any, placement: Any,
              criteria: Sequence[str] | None = None) -> tuple[_Tables, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = np.asarray(partitions)
    tiers = np.asarray(placement)
    w = "estimate_batch"
    if parts.ndim != 2 or tiers.shape != parts.shape or parts.shape[1] < 1:
        raise AutoExitError(f"{w}: partitions and placement must be integer arrays of the same shape "
                            f"[n_configs, max_partitions], got {parts.shape} and {tiers.shape}")
    n_cfg = parts.shape[0]
    crit_names = tuple(criteria) if criteria is not None else profile.criteria
    if isinstance(criterion, str):
        profile._check_criterion(criterion)
        crit = np.full(n_cfg, crit_names.index(criterion), dtype=np.int64)
    else:
        crit = np.asarray(criterion)
        if crit.dtype.kind in "USO":
            bad = sorted(set(map(str, crit.ravel().tolist())) - set(crit_names))
            if bad:
                raise AutoExitError(f"{w}: unknown criteria {bad}; use {list(crit_names)}")
            lookup = {c: i for i, c in enumerate(crit_names)}
            crit = np.array([lookup[str(c)] for c in crit.ravel().tolist()], dtype=np.int64)
        crit = np.broadcast_to(crit, (n_cfg,)).astype(np.int64)
        if crit.size and (crit.min() < 0 or crit.max() >= len(crit_names)):
            raise AutoExitError(f"{w}: criterion indices must be in 0..{len(crit_names) - 1}")
    thr = np.broadcast_to(np.asarray(threshold_index), (n_cfg,)).astype(np.int64)
    tab = _Tables(profile, topology, crit_names)
    if n_cfg:
        n_thr_per = np.array([len(profile.thresholds[c]) for c in crit_names])
        if thr.min() < 0 or np.any(thr >= n_thr_per[crit]):
            raise AutoExitError(f"{w}: threshold indices must index the profiled grid (0..{tab.n_thr - 1})")
        if parts.dtype.kind not in "iu" or tiers.dtype.kind not in "iu":
            raise AutoExitError(f"{w}: partitions and placement must be integer arrays")
        used = parts > 0
        if not used[:, 0].all() or np.any(~used[:, :-1] & used[:, 1:]):
            raise AutoExitError(f"{w}: every row needs >= 1 partition and padding (0) only at the end")
        if np.any((tiers > 0) != used):
            raise AutoExitError(f"{w}: placement must have a tier (1-based) exactly where partitions has a block")
        if parts.max() > tab.n or parts.min() < 0:
            raise AutoExitError(f"{w}: block indices must be in 1..{tab.n}")
        if tiers.max() > tab.m or tiers.min() < 0:
            raise AutoExitError(f"{w}: tier indices must be in 1..{tab.m}")
        inc = np.where(used[:, 1:], parts[:, 1:] > parts[:, :-1], True)
        if not inc.all():
            raise AutoExitError(f"{w}: partitions must be strictly increasing in every row")
        srt = np.sort(np.where(used, tiers, -np.arange(1, tiers.shape[1] + 1)), axis=1)
        if np.any(srt[:, 1:] == srt[:, :-1]):
            raise AutoExitError(f"{w}: a tier hosts at most one partition; placements must be distinct per row")
    return tab, crit, thr, parts, tiers


def estimate_batch(profile: Profile, topology: Topology, criterion: str | Sequence[str] | np.ndarray,
                   threshold_index: Any, partitions: Any, placement: Any) -> Estimates:
    """Vectorised estimates for many configurations at once (same numbers as :func:`estimate`).

    ``partitions``, ``placement``: integer arrays ``[n_configs, max_partitions]``,
    1-based block / tier indices, each row padded with 0 after its last
    partition. ``criterion``: a name, or per-config names or indices into
    ``profile.criteria``. ``threshold_index``: per-config (or scalar) index into
    the criterion's threshold grid.
    """
    tab, crit, thr, parts, tiers = _as_batch(profile, topology, criterion, threshold_index, partitions, placement)
    return _evaluate_chunked(tab, crit, thr, parts, tiers)


# --------------------------------------------------------------------------- the configuration space


@dataclass(frozen=True)
class Solution:
    """One configuration picked from a space, with its estimates."""

    configuration: Configuration
    accuracy: float
    latency_s: float
    cost: float
    index: int


@dataclass(frozen=True, eq=False)
class ConfigSpace:
    """Every enumerated configuration (struct-of-arrays) and its estimates.

    ``criterion[i]`` indexes ``criteria``; ``threshold_index[i]`` the criterion's
    threshold grid; ``partitions``/``placement`` are ``[n, max_partitions]``,
    1-based and 0-padded.
    """

    profile: Profile
    topology: Topology
    criteria: tuple[str, ...]
    criterion: np.ndarray
    threshold_index: np.ndarray
    partitions: np.ndarray
    placement: np.ndarray
    accuracy: np.ndarray
    latency_s: np.ndarray
    cost: np.ndarray

    def __len__(self) -> int:
        return int(self.accuracy.shape[0])

    def configuration(self, i: int) -> Configuration:
        c = self.criteria[int(self.criterion[i])]
        row = self.partitions[i]
        used = row > 0
        return Configuration(
            criterion=c,
            threshold=self.profile.thresholds[c][int(self.threshold_index[i])],
            partitions=tuple(int(x) for x in row[used]),
            placement=tuple(int(x) for x in self.placement[i][used]),
        )

    def solution(self, i: int) -> Solution:
        return Solution(configuration=self.configuration(i), accuracy=float(self.accuracy[i]),
                        latency_s=float(self.latency_s[i]), cost=float(self.cost[i]), index=int(i))

    def n_partitions(self) -> np.ndarray:
        return (self.partitions > 0).sum(axis=1)

    def is_trimmed(self) -> np.ndarray:
        last = self.partitions[np.arange(len(self)), self.n_partitions() - 1]
        return last < self.profile.n_blocks

    def is_consecutive(self) -> np.ndarray:
        t = self.placement.astype(np.int64)
        ok = (t[:, 1:] > t[:, :-1]) | (t[:, 1:] == 0)
        return ok.all(axis=1)

    def pareto_front(self) -> np.ndarray:
        """Indices of the non-dominated configurations, by increasing latency."""
        return pareto_front(self.latency_s, self.accuracy)

    def solve_p_lat(self, min_accuracy: float) -> Solution:
        return solve_p_lat(self, min_accuracy)

    def solve_p_acc(self, max_latency_s: float) -> Solution:
        return solve_p_acc(self, max_latency_s)


def _structures(n: int, m: int, lmax: int, allow_trim: bool,
                allow_nonconsecutive: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for L in range(1, lmax + 1):
        ps = [c for c in itertools.combinations(range(1, n + 1), L) if allow_trim or c[-1] == n]
        if allow_nonconsecutive:
            As = list(itertools.permutations(range(1, m + 1), L))
        else:
            As = list(itertools.combinations(range(1, m + 1), L))
        if ps and As:
            out.append((np.array(ps, dtype=np.int16).reshape(-1, L), np.array(As, dtype=np.int8).reshape(-1, L)))
    return out


def enumerate_space(
    profile: Profile,
    topology: Topology,
    *,
    max_partitions: int | None = None,
    criteria: Sequence[str] | None = None,
    allow_trim: bool = True,
    allow_nonconsecutive: bool = True,
    max_configs: int = 50_000_000,
) -> ConfigSpace:
    """Enumerate and evaluate every ``(T, P, A)``: all thresholds of each criterion x every
    partitioning into ``1..max_partitions`` partitions (default ``M``; trimmed ones when
    ``allow_trim``) x every placement on distinct tiers (in any order when
    ``allow_nonconsecutive``, else increasing tiers only)."""
    n, m = profile.n_blocks, topology.n_tiers
    lmax = m if max_partitions is None else max_partitions
    if isinstance(lmax, bool) or not isinstance(lmax, (int, np.integer)) or not 1 <= lmax:
        raise AutoExitError(f"max_partitions must be an integer >= 1, got {max_partitions!r}")
    lmax = int(min(lmax, m, n))
    crits = tuple(criteria) if criteria is not None else profile.criteria
    if not crits:
        raise AutoExitError("criteria is empty; give at least one of " + str(list(profile.criteria)))
    for c in crits:
        profile._check_criterion(c)
    n_thr = {c: len(profile.thresholds[c]) for c in crits}
    structs = _structures(n, m, lmax, allow_trim, allow_nonconsecutive)
    total = sum(len(ps) * len(As) for ps, As in structs) * sum(n_thr.values())
    if total > max_configs:
        raise AutoExitError(f"the space has {total:,} configurations, more than max_configs={max_configs:,}; "
                            "lower max_partitions or raise max_configs")
    crit_l, thr_l, parts_l, tiers_l = [], [], [], []
    for ps, As in structs:
        L = ps.shape[1]
        n_s = len(ps) * len(As)
        p_rows = np.repeat(ps, len(As), axis=0)
        a_rows = np.tile(As, (len(ps), 1))
        for ci, c in enumerate(crits):
            nt = n_thr[c]
            crit_l.append(np.full(n_s * nt, ci, dtype=np.int8))
            thr_l.append(np.repeat(np.arange(nt, dtype=np.int16), n_s))
            pp = np.zeros((n_s * nt, lmax), dtype=np.int16)
            pp[:, :L] = np.tile(p_rows, (nt, 1))
            aa = np.zeros((n_s * nt, lmax), dtype=np.int8)
            aa[:, :L] = np.tile(a_rows, (nt, 1))
            parts_l.append(pp)
            tiers_l.append(aa)
    crit = np.concatenate(crit_l)
    thr = np.concatenate(thr_l)
    parts = np.concatenate(parts_l)
    tiers = np.concatenate(tiers_l)
    tab = _Tables(profile, topology, crits)
    est = _evaluate_chunked(tab, crit, thr, parts, tiers)
    return ConfigSpace(profile=profile, topology=topology, criteria=crits, criterion=crit, threshold_index=thr,
                       partitions=parts, placement=tiers, accuracy=est.accuracy, latency_s=est.latency_s,
                       cost=est.cost)


def pareto_front(latency: Any, accuracy: Any) -> np.ndarray:
    """Indices of the points not dominated in (lower latency, higher accuracy), sorted by latency.

    ``q`` dominates ``p`` when ``lat_q <= lat_p`` and ``acc_q >= acc_p`` with one
    strict. Exact duplicates do not dominate each other and are all returned.
    """
    lat = np.asarray(latency, dtype=float)
    acc = np.asarray(accuracy, dtype=float)
    if lat.shape != acc.shape or lat.ndim != 1:
        raise AutoExitError(f"pareto_front needs two 1-D arrays of the same length, got {lat.shape} and {acc.shape}")
    if lat.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-acc, lat))  # latency ascending, accuracy descending
    ls, as_ = lat[order], acc[order]
    new_group = np.empty(ls.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = ls[1:] != ls[:-1]
    starts = np.flatnonzero(new_group)
    group = np.cumsum(new_group) - 1
    gmax = as_[starts]  # accuracy descending inside a group: first is the max
    # best accuracy among strictly faster groups
    prev_best = np.concatenate([[-np.inf], np.maximum.accumulate(gmax)[:-1]])
    keep = (as_ == gmax[group]) & (as_ > prev_best[group])
    return order[keep]


def solve_p_lat(space: ConfigSpace, min_accuracy: float) -> Solution:
    """P_lat: the configuration of least latency with accuracy >= ``min_accuracy`` (a fraction).

    Ties in latency go to the higher accuracy, then to the lower index.
    """
    eps = _num(min_accuracy, "min_accuracy")
    if eps > 1.0:
        raise AutoExitError(f"min_accuracy is a fraction in [0, 1], got {eps:g}; did you mean {eps / 100:g}?")
    ok = space.accuracy >= eps
    if not ok.any():
        raise AutoExitError(f"no configuration reaches accuracy >= {eps:g} (the best is "
                            f"{float(space.accuracy.max()):.6g}); lower min_accuracy")
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((-space.accuracy[idx], space.latency_s[idx]))[0]]
    return space.solution(int(best))


def solve_p_acc(space: ConfigSpace, max_latency_s: float) -> Solution:
    """P_acc: the configuration of highest accuracy with latency <= ``max_latency_s`` (seconds).

    Ties in accuracy go to the lower latency, then to the lower index.
    """
    eps = _num(max_latency_s, "max_latency_s")
    ok = space.latency_s <= eps
    if not ok.any():
        raise AutoExitError(f"no configuration has latency <= {eps:g} s (the fastest takes "
                            f"{float(space.latency_s.min()):.6g} s); raise max_latency_s")
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((space.latency_s[idx], -space.accuracy[idx]))[0]]
    return space.solution(int(best))


# --------------------------------------------------------------------------- the real behaviour on recorded predictions


def simulate_partitioned(
    *,
    correct: Any,
    criterion: str,
    threshold: float,
    partitions: Sequence[int],
    confidence: Any = None,
    entropy: Any = None,
    n_classes: int | None = None,
) -> tuple[tuple[float, ...], float]:
    """Actual exit rates per partition and accuracy of the model whose only exits are ``P_k``.

    Arrays as in :meth:`Profile.from_predictions`. A sample exits at the first
    ``P_k`` whose criterion holds and at ``P_L`` otherwise. Heads are trained
    independently on a frozen backbone, so this is exactly what the
    partitioned model does on these samples: compare it with the estimate to
    measure the model's error (paper 004, section 3.2).
    """
    w = "simulate_partitioned"
    corr, scores = _pred_arrays(correct, confidence, entropy, n_classes, w)
    if criterion not in scores:
        raise AutoExitError(f"{w}: criterion {criterion!r} needs its array ({criterion}=...)")
    n = corr.shape[0]
    P = [int(p) for p in partitions]
    if not P or any(p < 1 or p > n for p in P) or any(b <= a for a, b in zip(P, P[1:])):
        raise AutoExitError(f"{w}: partitions {P} must be strictly increasing block indices in 1..{n}")
    s = scores[criterion][[p - 1 for p in P]]
    ok = s >= threshold if criterion == "confidence" else s < threshold
    ok[-1] = True
    first = np.argmax(ok, axis=0)
    rates = np.bincount(first, minlength=len(P)) / corr.shape[1]
    rows = np.array(P)[first] - 1
    accuracy = float(corr[rows, np.arange(corr.shape[1])].mean())
    return tuple(float(r) for r in rates), accuracy


# --------------------------------------------------------------------------- constraint-driven split (paper 002)


@dataclass(frozen=True)
class PlanEstimate:
    """Estimates of a plan (exits per partition) at one threshold."""

    criterion: str
    threshold: float
    accuracy: float
    latency_s: float
    exit_rates: tuple[float, ...]  # one per exit, in block order
    offload_rate: float  # fraction of samples leaving the first partition
    computation_s: float
    propagation_s: float
    transmission_s: float
    cost: float  # expected cost per sample on priced tiers (e.g. the serverless cloud part)


def estimate_plan(profile: Profile, topology: Topology, *, criterion: str, threshold: float,
                  partitions: Sequence[int], exits: Sequence[Sequence[int]],
                  placement: Sequence[int | str]) -> PlanEstimate:
    """Paper 004's model generalised to several exits inside a partition (as paper 002 places them).

    Partition ``k`` holds blocks ``P_{k-1}+1 .. P_k`` and the exits ``exits[k]``
    (blocks inside it). Exit rates follow section 2.3.1 over the exits instead
    of the partition ends: exit ``x_m`` takes ``alpha_i`` for ``i`` in
    ``(x_{m-1}, x_m]`` and the last exit takes the rest up to ``N``. Samples
    compute a block or head only if they have not exited before it; samples
    exiting inside partition ``k`` send the result from ``A_k`` to the
    destination; those left after partition ``k`` send ``O_{P_k}`` to ``A_{k+1}``.
    With one exit per partition at ``P_k`` this equals :func:`estimate`.
    """
    Configuration(criterion, threshold, tuple(int(p) for p in partitions),
                  tuple(topology.tier_index(a) for a in placement)).check(profile, topology)
    P, A, X, owner = _plan_exits(profile, topology, partitions, exits, placement)
    N = profile.n_blocks
    alpha = profile.exit_rates[criterion][profile.threshold_index(criterion, threshold)]
    e = []
    for m_, x in enumerate(X):
        lo = X[m_ - 1] if m_ > 0 else 0
        hi = x if m_ < len(X) - 1 else N
        e.append(sum(alpha[lo:hi]))
    return _plan_figures(profile, topology, P, A, X, owner, e, None, criterion, float(threshold))


def _plan_exits(profile: Profile, topology: Topology, partitions: Sequence[int], exits: Sequence[Sequence[int]],
                placement: Sequence[int | str]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Validated ``(P, A, X, owner)``: partition ends, tiers (1-based), exit blocks in order, owning partition."""
    P = [int(p) for p in partitions]
    A = [topology.tier_index(a) for a in placement]
    if len(exits) != len(P):
        raise AutoExitError(f"exits must list the exits of each of the {len(P)} partitions, got {len(exits)}")
    N = profile.n_blocks
    if not P or any(x < 1 or x > N for x in P) or any(b <= a for a, b in zip(P, P[1:])):
        raise AutoExitError(f"partitioning {P} must be strictly increasing block indices in 1..{N}")
    if len(A) != len(P) or len(set(A)) != len(A):
        raise AutoExitError(f"placement {list(placement)} must give one distinct tier per partition ({len(P)})")
    X: list[int] = []
    owner: list[int] = []
    for k, xs in enumerate(exits):
        lo = P[k - 1] + 1 if k > 0 else 1
        xs = sorted(int(x) for x in xs)
        if any(x < lo or x > P[k] for x in xs) or len(set(xs)) != len(xs):
            raise AutoExitError(f"exits {xs} of partition {k + 1} must be distinct blocks in {lo}..{P[k]} "
                                "(an exit never crosses a split)")
        X += xs
        owner += [k] * len(xs)
    if not X or X[-1] != P[-1] or owner[-1] != len(P) - 1:
        raise AutoExitError(f"the last partition must end with an exit at block {P[-1]}; add it to its exits")
    return P, A, X, owner


def estimate_plan_rates(profile: Profile, topology: Topology, *, partitions: Sequence[int],
                        exits: Sequence[Sequence[int]], placement: Sequence[int | str],
                        exit_rates: Sequence[float], exit_accuracy: Sequence[float] | None = None) -> PlanEstimate:
    """:func:`estimate_plan` with the exit rates given instead of derived from ``alpha``.

    ``exit_rates``: the fraction of all samples leaving at each exit (block order, summing to 1), e.g.
    simulated on recorded predictions by an outer-search trial, or measured on the real partitioned
    model. ``exit_accuracy``: accuracy of the samples leaving at each exit (default: each head's
    accuracy over all samples, ``profile.head_accuracy``). Latency, cost and offload rate follow
    the same formulas as :func:`estimate_plan`.
    """
    P, A, X, owner = _plan_exits(profile, topology, partitions, exits, placement)
    e = [_num(r, f"exit_rates[{i}]", lo=0.0, hi=1.0 + 1e-9) for i, r in enumerate(exit_rates)]
    if len(e) != len(X):
        raise AutoExitError(f"exit_rates has {len(e)} entries but the plan has {len(X)} exits; give one per exit")
    if abs(sum(e) - 1.0) > 1e-6:
        raise AutoExitError(f"exit_rates sum to {sum(e):.6g}, not 1; every sample leaves at exactly one exit")
    acc = None
    if exit_accuracy is not None:
        acc = [_num(a, f"exit_accuracy[{i}]", lo=0.0, hi=1.0) for i, a in enumerate(exit_accuracy)]
        if len(acc) != len(X):
            raise AutoExitError(f"exit_accuracy has {len(acc)} entries but the plan has {len(X)} exits")
    return _plan_figures(profile, topology, P, A, X, owner, e, acc, "given", float("nan"))


def _plan_figures(profile: Profile, topology: Topology, P: list[int], A: list[int], X: list[int], owner: list[int],
                  e: list[float], exit_acc: list[float] | None, criterion: str, threshold: float) -> PlanEstimate:
    """Accuracy, latency and cost of a validated plan whose exit ``X[m]`` takes the fraction ``e[m]``."""
    blocks, heads = topology.block_costs(profile)
    hop_pl, hop_inv = topology.hop_matrices()
    D, src = topology.destination - 1, topology.source - 1
    prop = hop_pl[src, A[0] - 1]
    trans = profile.input_bits * hop_inv[src, A[0] - 1]
    comp = cost = 0.0
    if exit_acc is None:
        acc = sum(profile.head_accuracy[x - 1] * e[m_] for m_, x in enumerate(X))
    else:
        acc = sum(a * r for a, r in zip(exit_acc, e))
    exited = 0.0  # fraction exited so far
    offload = 0.0
    for k in range(len(P)):
        a = A[k] - 1
        lo = P[k - 1] + 1 if k > 0 else 1
        work_k = 0.0
        for i in range(lo, P[k] + 1):
            reach = 1.0 - exited
            work_k += reach * blocks[a, i - 1]
            if i in X:
                m_ = X.index(i)
                work_k += reach * heads[a, i - 1]
                exited += e[m_]
                prop += e[m_] * hop_pl[a, D]
                trans += e[m_] * profile.result_bits * hop_inv[a, D]
        comp += work_k
        stay = 0.0 if k == len(P) - 1 else 1.0 - exited
        if k == 0:
            offload = stay
        if k < len(P) - 1:
            a2 = A[k + 1] - 1
            prop += stay * hop_pl[a, a2]
            trans += stay * profile.output_bits[P[k] - 1] * hop_inv[a, a2]
        pricing = topology.tiers[a].pricing
        entering = 1.0 - sum(e[m_] for m_ in range(len(X)) if owner[m_] < k)
        if pricing is not None and entering > 0:
            # per invocation: the mean compute time of a sample entering this partition
            cost += entering * pricing.invocation_cost(work_k / entering)
    return PlanEstimate(criterion=criterion, threshold=float(threshold), accuracy=float(acc),
                        latency_s=float(prop + trans + comp), exit_rates=tuple(float(x) for x in e),
                        offload_rate=float(offload), computation_s=float(comp), propagation_s=float(prop),
                        transmission_s=float(trans), cost=float(cost))


_PARETO_SHAPE = math.log(5, 4)  # the 80-20 rule's Pareto shape, ~1.161


def exit_positions(first: int, last: int, n_exits: int, distribution: Literal["linear", "pareto"] = "linear",
                   *, include_last: bool = True) -> tuple[int, ...]:
    """Up to ``n_exits`` exit blocks inside blocks ``first..last`` (paper 002).

    ``linear``: evenly spaced. ``pareto``: at the quantiles ``j/(n+1)`` of a
    Pareto distribution with the 80-20 shape ``log_4 5``, rescaled to the part,
    so exits crowd towards its start (paper 002 gives no formula; this is our
    reading). With ``include_last`` the last exit sits at ``last``; otherwise
    the exits stay strictly before ``last`` (the positions of ``n+1`` exits with
    the last one dropped). Positions that round to the same block merge.
    """
    if distribution not in ("linear", "pareto"):
        raise AutoExitError(f"exit distribution must be 'linear' or 'pareto', got {distribution!r}")
    if isinstance(n_exits, bool) or not isinstance(n_exits, (int, np.integer)) or n_exits < 1:
        raise AutoExitError(f"exits per part must be an integer >= 1, got {n_exits!r}")
    span = last - first + 1
    if span < 1:
        return ()
    n = n_exits if include_last else n_exits + 1
    if distribution == "linear":
        fr = [j / n for j in range(1, n + 1)]
    else:
        q = [(1.0 - j / (n + 1)) ** (-1.0 / _PARETO_SHAPE) - 1.0 for j in range(1, n + 1)]
        fr = [x / q[-1] for x in q]
    if not include_last:
        fr = fr[:-1]
        pos = [first - 1 + max(1, min(span - 1, math.floor(f * span + 0.5))) for f in fr] if span > 1 else []
    else:
        pos = [first - 1 + max(1, min(span, math.floor(f * span + 0.5))) for f in fr]
    return tuple(sorted(set(pos)))


@dataclass(frozen=True)
class SplitPlan:
    """One edge/cloud split chosen from a constraint, its exits, and its estimates per threshold."""

    split: int  # last block on the edge (1-based)
    edge_tier: int
    cloud_tier: int
    edge_exits: tuple[int, ...]
    cloud_exits: tuple[int, ...]  # ends with N, the backbone's own classifier
    constraint: str
    reason: str
    estimates: tuple[PlanEstimate, ...]

    def best(self, min_accuracy: float) -> PlanEstimate:
        """The fastest threshold whose estimated accuracy is >= ``min_accuracy``."""
        ok = [e for e in self.estimates if e.accuracy >= min_accuracy]
        if not ok:
            raise AutoExitError(f"no threshold reaches accuracy >= {min_accuracy:g} with this split (best "
                                f"{max(e.accuracy for e in self.estimates):.4g}); lower min_accuracy")
        return min(ok, key=lambda e: (e.latency_s, -e.accuracy))


def constraint_split(
    profile: Profile,
    topology: Topology,
    *,
    constraint: Literal["latency", "memory"],
    edge: int | str = 1,
    cloud: int | str | None = None,
    memory_share: float | None = None,
    exits_per_part: int = 3,
    distribution: Literal["linear", "pareto"] = "linear",
    criterion: str | None = None,
) -> SplitPlan:
    """Paper 002's single split between an ``edge`` and a ``cloud`` tier (default: last tier).

    * ``constraint="latency"``: the edge runs the longest prefix of blocks whose
      edge time does not exceed the whole network's time in the cloud.
    * ``constraint="memory"``: the edge runs the longest prefix whose memory
      (``profile.block_memory_bytes``) fits ``memory_share`` of the whole network's.
    The edge keeps at least one block and the cloud at least one. Then
    ``exits_per_part`` (at most 3) early exits are placed inside each part,
    never across the split: on the edge the last one at the split (so confident
    samples never leave the edge), in the cloud strictly before the backbone's
    own classifier. Inference is edge-first: a sample is offloaded only if no
    edge exit is confident. Every threshold of the criterion is estimated with
    :func:`estimate_plan`; ``cost`` (from the cloud tier's ``pricing``) is reported next to latency.
    """
    if constraint not in ("latency", "memory"):
        raise AutoExitError(f"constraint must be 'latency' or 'memory', got {constraint!r}")
    if isinstance(exits_per_part, bool) or not isinstance(exits_per_part, int) or not 1 <= exits_per_part <= 3:
        raise AutoExitError(f"exits_per_part must be 1, 2 or 3 (paper 002 caps it at 3), got {exits_per_part!r}")
    N = profile.n_blocks
    if N < 2:
        raise AutoExitError("a split needs a backbone with at least 2 blocks")
    e_t = topology.tier_index(edge)
    c_t = topology.tier_index(cloud if cloud is not None else topology.n_tiers)
    if e_t == c_t:
        raise AutoExitError(f"edge and cloud are the same tier ({topology.names[e_t - 1]!r}); pick two tiers")
    blocks, heads = topology.block_costs(profile)
    if constraint == "latency":
        budget = float(blocks[c_t - 1].sum() + heads[c_t - 1, N - 1])
        cum = np.cumsum(blocks[e_t - 1])
        fits = np.flatnonzero(cum[: N - 1] <= budget + 1e-15)
        if fits.size == 0:
            raise AutoExitError(
                f"block 1 alone takes {cum[0]:.4g} s on {topology.names[e_t - 1]!r}, longer than the whole "
                f"network on {topology.names[c_t - 1]!r} ({budget:.4g} s); use constraint='memory' or a faster edge")
        split = int(fits[-1]) + 1
        reason = (f"edge blocks 1..{split} take {cum[split - 1]:.4g} s <= whole network in the cloud "
                  f"{budget:.4g} s")
    else:
        if memory_share is None:
            raise AutoExitError("constraint='memory' needs memory_share (the fraction of the network's memory "
                                "the edge may hold, e.g. 0.7)")
        share = _num(memory_share, "memory_share", lo=0.0, lo_open=True, hi=1.0)
        if profile.block_memory_bytes is None:
            raise AutoExitError("constraint='memory' needs profile.block_memory_bytes; profile the memory per block")
        mem = np.asarray(profile.block_memory_bytes)
        cum = np.cumsum(mem)
        fits = np.flatnonzero(cum[: N - 1] <= share * cum[-1] + 1e-9)
        if fits.size == 0:
            raise AutoExitError(f"block 1 alone needs {cum[0] / cum[-1]:.1%} of the network's memory, more than "
                                f"memory_share={share:g}; raise memory_share")
        split = int(fits[-1]) + 1
        reason = f"edge blocks 1..{split} hold {cum[split - 1] / cum[-1]:.1%} <= {share:.1%} of the memory"
    edge_exits = exit_positions(1, split, exits_per_part, distribution, include_last=True)
    cloud_early = exit_positions(split + 1, N, exits_per_part, distribution, include_last=False)
    cloud_exits = tuple(cloud_early) + (N,)
    crit = criterion or ("confidence" if "confidence" in profile.criteria else profile.criteria[0])
    profile._check_criterion(crit)
    ests = tuple(
        estimate_plan(profile, topology, criterion=crit, threshold=t, partitions=(split, N),
                      exits=(edge_exits, cloud_exits), placement=(e_t, c_t))
        for t in profile.thresholds[crit]
    )
    return SplitPlan(split=split, edge_tier=e_t, cloud_tier=c_t, edge_exits=edge_exits, cloud_exits=cloud_exits,
                     constraint=constraint, reason=reason, estimates=ests)
