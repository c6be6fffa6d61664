"""Partitioned early-exit models from a real backbone (paper 004 sections 2 and 3.3, paper 002).

:mod:`autoexit.perfmodel` holds the numbers-only model; this module connects it
to real models:

* **Profiling** (:func:`profile_result`, :func:`profile_model`): from an
  ``EnableResult`` or from a traced backbone, its recording and trained heads,
  measure per-block ``CK_i`` and per-head ``CB_i`` (99th percentile, through the
  device evaluator: :class:`autoexit.evaluator.LocalEvaluator` by default, a
  ``RemoteEvaluator`` for a real device), take the output sizes ``O_i`` from the
  exit points' shapes and the exit rates / accuracies from the recorded
  predictions (both criteria) -> :class:`perfmodel.Profile`, cached as JSON per
  backbone + data + heads + device.
* **Plans** (:class:`PartitionPlan`): which blocks each partition holds, the
  exits inside it, the exit rule and thresholds, the tier it runs on. Built from
  a perfmodel ``Configuration`` (paper 004: one exit at the end of each
  partition, trimming allowed), a paper-002 ``SplitPlan`` (exits inside parts),
  an outer-search ``ExitPlan`` with a partition, or by hand (:func:`make_plan`).
* **Partition modules** (:class:`PartitionModule`, TorchScript): the
  partition's backbone stages and its local exits. ``forward(x)`` takes the
  feature tensor entering the partition (the model input for the first) and
  returns ``(logits [n, C], exit_index [n], features [m, ...])``:
  ``exit_index[i]`` is the global exit that answered sample ``i`` (0-based over
  the plan's exits, block order) or :data:`FORWARD` (-1) when the sample goes
  on; ``features`` holds the activation to send to the next partition for the
  forwarded samples only, in their input order (``logits`` rows of forwarded
  samples are zero). The last partition never forwards.
* **Artifact** (:func:`emit_partitioned`): ``partitions/k.pt`` per partition,
  ``model.pt`` = the same exits unpartitioned (a ``MultiExitModel``),
  ``profile.json``, and a ``partitioning`` section in the manifest (placement
  plan, shapes and bytes per partition, thresholds, estimated and measured
  figures).
* **Validation** (:func:`validate_estimates`): paper 004 section 3.2 -- the
  model's estimated accuracy / exit rates vs those of the actual partitioned
  model run on the test split.
* **User exit networks** (:func:`custom_heads`): a ``HeadSpec`` or a Python
  factory ``module:function(in_shape, num_classes) -> nn.Module`` per exit point,
  trained label-free like the default heads.
* **Outer search** (:class:`PartitionSpace`): split points, placement and exits
  per part as Optuna parameters (wired into ``autoexit.search.outer``).

The multi-process reference runtime is :mod:`autoexit.partition_runtime`.
Blocks and tiers are 1-based as in the paper; exit indices 0-based as in the
rest of autoexit.

This file does not use ``from __future__ import annotations``: TorchScript needs
real annotations.
"""

import copy
import hashlib
import importlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, List, Tuple

import numpy as np
import torch
from torch import nn

from . import perfmodel as pm
from .calibrate import exit_score
from .errors import AutoExitError
from .search.outer import PARTITION_KEYS

__all__ = [
    "FORWARD",
    "CRITERIA",
    "PartitionModule",
    "CriterionRule",
    "Blocks",
    "Components",
    "PartitionPlan",
    "make_plan",
    "plan_from_configuration",
    "plan_from_split",
    "plan_from_exit_plan",
    "choose_plan",
    "profile_result",
    "profile_model",
    "measured_tier",
    "exit_arrays",
    "build_partitions",
    "build_reference",
    "run_chain",
    "emit_partitioned",
    "load_partitioned",
    "validate_estimates",
    "random_partitionings",
    "FactoryHead",
    "resolve_head_factory",
    "custom_heads",
    "PartitionSpace",
    "PartitionedObjective",
    "optimize_partitioned",
    "plan_from_search",
    "PARTITION_SCHEMA",
]

#: ``exit_index`` of a sample that leaves the partition to be sent on.
FORWARD = -1
PARTITION_SCHEMA = 1

#: Exit rules of a plan -> score id of :func:`criterion_score`. ``confidence`` and
#: ``entropy`` have the perfmodel's meaning (max softmax ``>= T``; softmax entropy
#: normalised by ``log C`` ``< T``); ``margin`` and ``signal:entropy`` are
#: ``autoexit.calibrate`` signals (score ``>= T``; ``signal:entropy`` is ``1 - H/log C``).
CRITERIA = {"confidence": 0, "max_softmax": 0, "margin": 1, "signal:entropy": 2, "entropy": 3}
_SIGNAL_CRITERIA = {"max_softmax": "confidence", "margin": "margin", "entropy": "signal:entropy"}


# --------------------------------------------------------------------------- scriptable pieces


def criterion_score(z: torch.Tensor, score: int) -> torch.Tensor:
    """Exit score of temperature-scaled logits ``z``; a sample exits when ``score >= threshold``.

    0 max softmax, 1 margin, 2 one minus normalised entropy (``autoexit.calibrate.exit_score``),
    3 minus the normalised entropy (the perfmodel's entropy criterion, negated).
    """
    if score == 3:
        p = torch.softmax(z, dim=1)
        logp = torch.log_softmax(z, dim=1)
        return (p * logp).sum(dim=1) / math.log(float(z.shape[1]))
    return exit_score(z, score)


def score_threshold(criterion: str, threshold: float) -> float:
    """The float32 threshold ``t`` with ``score >= t`` <=> the criterion's rule at ``threshold``, exactly.

    Scores are float32; ``confidence >= T`` holds iff the score is >= the smallest float32 >= T, and
    ``entropy < T`` iff ``-entropy >= -(largest float32 < T)``.
    """
    if criterion not in CRITERIA:
        raise AutoExitError(f"unknown exit criterion {criterion!r}; use one of {sorted(CRITERIA)}")
    t = float(threshold)
    if math.isnan(t):
        raise AutoExitError(f"the threshold of criterion {criterion!r} is NaN; give a number")
    if CRITERIA[criterion] == 3:
        e = np.float32(t)
        if float(e) >= t:
            e = np.nextafter(e, np.float32(-np.inf))
        return float(-e)
    c = np.float32(t)
    if float(c) < t:
        c = np.nextafter(c, np.float32(np.inf))
    return float(c)


class CriterionRule(nn.Module):
    """An exit rule for ``MultiExitModel`` (``rule(z, prev, h) -> score``) scoring like a partition's exit."""

    history: Final[int]
    score: Final[int]

    def __init__(self, score: int):
        super().__init__()
        self.history = 0
        self.score = int(score)

    def forward(self, z: torch.Tensor, prev: List[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return criterion_score(z, self.score)


class _Segment(nn.Module):
    """One piece of backbone, then: no exit (0), a conditional exit (1), the always-taken exit of a trimmed
    model (2), or the backbone's own output (3)."""

    mode: Final[int]
    exit_id: Final[int]
    score: Final[int]

    def __init__(self, stage: nn.Module, head: nn.Module | None, temperature: float, threshold: float,
                 mode: int, exit_id: int, score: int):
        super().__init__()
        self.stage = stage
        self.head = head if head is not None else nn.Identity()
        self.mode = int(mode)
        self.exit_id = int(exit_id)
        self.score = int(score)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - driven by PartitionModule
        return self.stage(x)


class PartitionModule(nn.Module):
    """One partition: backbone stages with its local exits (see the module docstring for the contract)."""

    index: Final[int]
    is_last: Final[bool]
    num_classes: Final[int]
    out_shape: List[int]
    exits: List[int]

    def __init__(self, segments: Sequence[_Segment], index: int, is_last: bool, num_classes: int,
                 out_shape: Sequence[int]):
        super().__init__()
        self.segments = nn.ModuleList(list(segments))
        self.index = int(index)
        self.is_last = bool(is_last)
        self.num_classes = int(num_classes)
        self.out_shape = [int(s) for s in out_shape]
        self.exits = [int(s.exit_id) for s in segments if s.mode > 0]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        out = torch.zeros(n, self.num_classes, dtype=torch.float32, device=x.device)
        exit_index = torch.full([n], -1, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        h = x
        for seg in self.segments:
            if remaining.shape[0] > 0:
                h = seg.stage(h)
                if seg.mode == 3:
                    out[remaining] = h.to(torch.float32)
                    exit_index[remaining] = seg.exit_id
                    remaining = remaining[:0]
                elif seg.mode == 2:
                    out[remaining] = (seg.head(h) / seg.temperature).to(torch.float32)
                    exit_index[remaining] = seg.exit_id
                    remaining = remaining[:0]
                elif seg.mode == 1:
                    z = seg.head(h) / seg.temperature
                    take = criterion_score(z, seg.score) >= seg.threshold
                    if bool(take.any()):
                        sel = remaining[take]
                        out[sel] = z[take].to(torch.float32)
                        exit_index[sel] = seg.exit_id
                        keep = ~take
                        h = h[keep]
                        remaining = remaining[keep]
        if remaining.shape[0] == 0:
            shape: List[int] = [0]
            shape.extend(self.out_shape)
            h = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return out, exit_index, h

    @torch.jit.export
    def exit_ids(self) -> List[int]:
        return self.exits


class _HeadEnd(nn.Module):
    """The last stage of a trimmed model as ``MultiExitModel`` sees it: stage, head, temperature."""

    def __init__(self, stage: nn.Module, head: nn.Module, temperature: float):
        super().__init__()
        self.stage = stage
        self.head = head
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x)) / self.temperature


# --------------------------------------------------------------------------- blocks of a real backbone


def _is_cascade(module: nn.Module) -> bool:
    return hasattr(module, "num_prev") and type(module).__name__ == "CascadeHead"


@dataclass
class Components:
    """What partitioning needs from a run: the traced backbone, its recording, heads and temperatures.

    Build it from an ``EnableResult`` (:meth:`from_result`) or directly (e.g. from
    ``pipeline.prepare`` + ``train_heads_cached`` in a benchmark). ``temperatures``
    default to the ones calibrated on val.
    """

    backbone: Any  # TracedBackbone
    recording: Any  # Recording
    heads: dict
    temperatures: dict = field(default_factory=dict)
    result: Any = None  # the EnableResult, when there is one

    @classmethod
    def from_result(cls, result, heads: Mapping | None = None) -> "Components":
        merged = dict(result.heads)
        temps = dict(result.temperatures)
        if heads:
            merged.update(heads)
            for n in heads:
                temps.pop(n, None)
        return cls(result.backbone, result.recording, merged, temps, result)

    def __post_init__(self):
        names = {p.name for p in self.recording.points}
        unknown = sorted(set(self.heads) - names)
        if unknown:
            raise AutoExitError(f"heads given for unknown exit point(s) {', '.join(unknown)}; the recording has "
                                f"{', '.join(p.name for p in self.recording.points)}")
        cascade = [n for n, h in self.heads.items() if _is_cascade(h.module)]
        if cascade:
            raise AutoExitError(f"cascade heads ({', '.join(cascade)}) read earlier exits' logits, which a partition "
                                "does not receive; partition a model with plain heads (cascade_heads=0)")
        if not self.heads:
            raise AutoExitError("no trained exit heads to partition with; train heads at one or more exit points")
        missing = [n for n in self.names if n not in self.temperatures]
        if missing:
            self.temperatures.update(self._calibrate(missing))

    @property
    def names(self) -> list[str]:
        """Exit points with a head, in backbone order: blocks 1..N-1."""
        return [p.name for p in self.recording.points if p.name in self.heads]

    def _calibrate(self, names: list[str]) -> dict[str, float]:
        from .calibrate import fit_temperature
        from .distill import predict_head

        target = self.recording.logits("val").argmax(1)
        return {n: float(fit_temperature(predict_head(self.heads[n].module, self.recording.activations(n, "val")),
                                         target)) for n in names}

    def blocks(self) -> "Blocks":
        pts = [self.heads[n].point for n in self.names]
        return Blocks(tuple(self.names) + ("output",), tuple(pts), int(self.backbone.num_classes))


def _components(source, heads: Mapping | None = None) -> Components:
    if isinstance(source, Components):
        if heads:
            merged = {**source.heads, **heads}
            temps = {k: v for k, v in source.temperatures.items() if k not in heads}
            return Components(source.backbone, source.recording, merged, temps, source.result)
        return source
    if hasattr(source, "recording") and hasattr(source, "heads") and hasattr(source, "backbone"):
        return Components.from_result(source, heads)
    if isinstance(source, (tuple, list)) and len(source) in (3, 4):
        tb, rec, hs = source[0], source[1], source[2]
        temps = dict(source[3]) if len(source) == 4 else {}
        return Components(tb, rec, {**hs, **(heads or {})}, temps)
    raise AutoExitError(f"expected an EnableResult, Components or (backbone, recording, heads), got "
                        f"{type(source).__name__}")


@dataclass(frozen=True)
class Blocks:
    """The chain of blocks of a backbone: block ``i`` (1-based) ends at exit point ``names[i-1]``; the last
    block (``output``) ends with the backbone's own classifier."""

    names: tuple[str, ...]
    points: tuple[Any, ...]  # ExitPoint of blocks 1..N-1
    num_classes: int

    @property
    def n(self) -> int:
        return len(self.names)

    def index(self, name: str | int) -> int:
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if not 1 <= int(name) <= self.n:
                raise AutoExitError(f"block {name} is out of range; blocks are 1..{self.n}")
            return int(name)
        if name not in self.names:
            raise AutoExitError(f"{name!r} is not a block; blocks are {list(self.names)} (or 1..{self.n})")
        return self.names.index(name) + 1

    def shape(self, block: int) -> tuple[int, ...]:
        """Per-sample shape of block ``block``'s output."""
        return tuple(self.points[block - 1].shape) if block < self.n else (self.num_classes,)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PartitionPlan:
    """Where each partition ends, the exits inside it, the exit rule, and the tier it runs on.

    ``partitions``: ``P_k``, the last block of partition ``k`` (1-based, strictly
    increasing; ``P_L < N`` is a trimmed model whose last exit takes every sample
    left). ``exits[k]``: blocks of partition ``k`` with an exit; the last
    partition's last exit is ``P_L`` (the backbone's own output when
    ``P_L = N``). ``criterion``: a key of :data:`CRITERIA`; ``thresholds``: one per
    conditional exit (every exit but the last), in block order. ``placement``: tier
    names (distinct). ``topology``: the :class:`perfmodel.Topology` (optional for
    building modules, needed to emit and serve).
    """

    blocks: tuple[str, ...]
    partitions: tuple[int, ...]
    exits: tuple[tuple[int, ...], ...]
    criterion: str
    thresholds: tuple[float, ...]
    placement: tuple[str, ...] = ()
    topology: Any = None  # perfmodel.Topology
    origin: str = ""

    def __post_init__(self):
        s = object.__setattr__
        s(self, "blocks", tuple(str(b) for b in self.blocks))
        s(self, "partitions", tuple(int(p) for p in self.partitions))
        s(self, "exits", tuple(tuple(sorted(int(x) for x in xs)) for xs in self.exits))
        s(self, "thresholds", tuple(float(t) for t in self.thresholds))
        s(self, "placement", tuple(str(a) for a in self.placement))
        n, P = len(self.blocks), self.partitions
        if n < 1:
            raise AutoExitError("a plan needs the backbone's blocks")
        if not P or any(p < 1 or p > n for p in P) or any(b <= a for a, b in zip(P, P[1:])):
            raise AutoExitError(f"partitions {list(P)} must be strictly increasing block indices in 1..{n} "
                                "(P_k = the last block of partition k)")
        if len(self.exits) != len(P):
            raise AutoExitError(f"exits must list the exit blocks of each of the {len(P)} partitions, "
                                f"got {len(self.exits)}")
        for k, xs in enumerate(self.exits):
            lo = P[k - 1] + 1 if k else 1
            if any(x < lo or x > P[k] for x in xs) or len(set(xs)) != len(xs):
                raise AutoExitError(f"exits {list(xs)} of partition {k + 1} must be distinct blocks in {lo}..{P[k]} "
                                    "(an exit never crosses a split)")
        if not self.exits[-1] or self.exits[-1][-1] != P[-1]:
            raise AutoExitError(f"the last partition must end with an exit at block {P[-1]} (the final exit)")
        if self.criterion not in CRITERIA:
            raise AutoExitError(f"unknown exit criterion {self.criterion!r}; use one of {sorted(CRITERIA)}")
        k = self.n_exits - 1
        if len(self.thresholds) == 1 and k > 1:
            s(self, "thresholds", self.thresholds * k)
        if len(self.thresholds) != k:
            raise AutoExitError(f"give one threshold per conditional exit ({k}; the last exit takes every "
                                f"sample left), got {len(self.thresholds)}")
        if any(math.isnan(t) for t in self.thresholds):
            raise AutoExitError("thresholds must be numbers, got NaN")
        if self.placement:
            if len(self.placement) != len(P):
                raise AutoExitError(f"placement {list(self.placement)} has {len(self.placement)} tiers for "
                                    f"{len(P)} partitions; give one tier per partition")
            if len(set(self.placement)) != len(self.placement):
                raise AutoExitError(f"placement {list(self.placement)} puts two partitions on one tier; "
                                    "a tier hosts at most one partition")
            if self.topology is not None:
                for a in self.placement:
                    if a not in self.topology.names:
                        raise AutoExitError(f"unknown tier {a!r} in the placement; topology "
                                            f"{self.topology.name!r} has {list(self.topology.names)}")

    # ---- queries
    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_partitions(self) -> int:
        return len(self.partitions)

    @property
    def exit_blocks(self) -> tuple[int, ...]:
        return tuple(x for xs in self.exits for x in xs)

    @property
    def n_exits(self) -> int:
        return len(self.exit_blocks)

    @property
    def trimmed(self) -> bool:
        return self.partitions[-1] < self.n_blocks

    def partition_blocks(self, k: int) -> tuple[int, int]:
        """(first, last) block of partition ``k`` (0-based ``k``)."""
        return (self.partitions[k - 1] + 1 if k else 1), self.partitions[k]

    def exit_owner(self) -> list[int]:
        return [k for k, xs in enumerate(self.exits) for _ in xs]

    def float32_thresholds(self) -> list[float]:
        return [score_threshold(self.criterion, t) for t in self.thresholds]

    def perfmodel_criterion(self) -> str | None:
        return self.criterion if self.criterion in pm.CRITERIA else None

    def tiers(self) -> list[int]:
        if self.topology is None or not self.placement:
            raise AutoExitError("this plan has no placement on a topology; give placement=[tier, ...] and a topology")
        return [self.topology.tier_index(a) for a in self.placement]

    def describe(self) -> str:
        parts = []
        for k, (lo, hi) in enumerate(self.partition_blocks(k) for k in range(self.n_partitions)):
            tier = f"@{self.placement[k]}" if self.placement else ""
            parts.append(f"[{lo}..{hi}]{tier} exits {list(self.exits[k])}")
        if not self.thresholds:
            thr = "no early exit"
        elif len(set(self.thresholds)) == 1:
            thr = f"T={self.thresholds[0]:.4g}"
        else:
            thr = "T=" + "/".join(f"{t:.3g}" for t in self.thresholds)
        trim = ", trimmed" if self.trimmed else ""
        return f"{self.criterion} {thr}{trim}: " + " | ".join(parts)

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "partitions": list(self.partitions),
                "exits": [list(x) for x in self.exits], "criterion": self.criterion,
                "thresholds": [_jf(t) for t in self.thresholds], "placement": list(self.placement),
                "topology": self.topology.to_dict() if self.topology is not None else None,
                "origin": self.origin}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PartitionPlan":
        topo = d.get("topology")
        return cls(tuple(d["blocks"]), tuple(d["partitions"]), tuple(tuple(x) for x in d["exits"]), d["criterion"],
                   tuple(_fj(t) for t in d["thresholds"]), tuple(d.get("placement") or ()),
                   pm.Topology.from_dict(topo) if topo else None, d.get("origin", ""))


def _jf(x: float) -> float | str:
    return float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _fj(x) -> float:
    return float(x)


def _blocks_of(profile_or_blocks) -> tuple[str, ...]:
    if isinstance(profile_or_blocks, pm.Profile):
        return tuple(profile_or_blocks.block_names)
    if isinstance(profile_or_blocks, Blocks):
        return profile_or_blocks.names
    return tuple(profile_or_blocks)


def _placement_names(topology, placement) -> tuple[str, ...]:
    if topology is None:
        return tuple(str(a) for a in placement)
    return tuple(topology.names[topology.tier_index(a) - 1] for a in placement)


def make_plan(blocks, *, partitions: Sequence[int | str], placement: Sequence[int | str] = (),
              threshold: float | Sequence[float] = 0.9, criterion: str = "confidence",
              exits: Sequence[Sequence[int | str]] | None = None, topology=None) -> PartitionPlan:
    """A plan by hand. ``blocks``: a Profile, :class:`Blocks` or block names. ``partitions``: last block of
    each partition (index or name). ``exits``: exit blocks per partition (default: one at the end of each,
    as paper 004). ``threshold``: one for every exit or one per conditional exit."""
    names = _blocks_of(blocks)
    bl = Blocks(names, (), 0)
    P = [bl.index(p) for p in partitions]
    X = [[P[k]] for k in range(len(P))] if exits is None else [[bl.index(x) for x in xs] for xs in exits]
    if exits is not None and X and (not X[-1] or X[-1][-1] != P[-1]) and P:
        X[-1] = sorted(set(X[-1]) | {P[-1]})  # the final exit is implied
    n_cond = sum(len(x) for x in X) - 1
    thr = (float(threshold),) * max(n_cond, 0) if isinstance(threshold, (int, float)) else tuple(threshold)
    return PartitionPlan(names, tuple(P), tuple(tuple(x) for x in X), criterion, thr,
                         _placement_names(topology, placement), topology, "manual")


def plan_from_configuration(config: "pm.Configuration", profile: "pm.Profile", topology) -> PartitionPlan:
    """The plan of a perfmodel triplet ``(T, P, A)`` (paper 004: one exit at the end of every partition)."""
    config.check(profile, topology)
    P = config.partitions
    return PartitionPlan(profile.block_names, P, tuple((p,) for p in P), config.criterion,
                         (config.threshold,) * (len(P) - 1), _placement_names(topology, config.placement),
                         topology, f"perfmodel {config.describe(topology)}")


def plan_from_split(split: "pm.SplitPlan", profile: "pm.Profile", topology, threshold: float | None = None,
                    min_accuracy: float | None = None) -> PartitionPlan:
    """The plan of a paper-002 ``SplitPlan``: edge part + cloud part with exits inside each.

    The threshold is ``threshold`` or the fastest of the plan's estimates reaching ``min_accuracy``.
    """
    if threshold is None:
        if min_accuracy is None:
            raise AutoExitError("give threshold=... or min_accuracy=... to pick the split plan's threshold")
        best = split.best(min_accuracy)
        threshold, crit = best.threshold, best.criterion
    else:
        crit = split.estimates[0].criterion if split.estimates else "confidence"
    ex = (tuple(split.edge_exits), tuple(split.cloud_exits))
    n_cond = len(ex[0]) + len(ex[1]) - 1
    return PartitionPlan(profile.block_names, (split.split, profile.n_blocks), ex, crit, (threshold,) * n_cond,
                         _placement_names(topology, (split.edge_tier, split.cloud_tier)), topology,
                         f"paper 002 split ({split.constraint}): {split.reason}")


def plan_from_exit_plan(exit_plan, blocks, partition: Mapping | None = None, topology=None) -> PartitionPlan:
    """The plan of an outer-search ``ExitPlan`` and the partition searched with it (``partitions``,
    ``placement``, ``topology``; see :func:`optimize_partitioned`): its kept exits and thresholds, its split
    points and placement."""
    names = _blocks_of(blocks)
    part = partition or getattr(exit_plan, "partition", None) or {}
    if not part:
        raise AutoExitError("this outer-search plan has no partition; search with a 'partition' block in the space")
    crit = _SIGNAL_CRITERIA.get(exit_plan.signal)
    if crit is None:
        raise AutoExitError(f"exit signal {exit_plan.signal!r} has no partition rule; use one of {list(_SIGNAL_CRITERIA)}")
    P = [int(p) for p in part["partitions"]]
    kept = [names.index(n) + 1 for n in exit_plan.kept]
    thr = dict(zip(kept, exit_plan.thresholds))
    X = [[x for x in kept if (P[k - 1] if k else 0) < x <= P[k]] for k in range(len(P))]
    X[-1] = X[-1] + [P[-1]] if not X[-1] or X[-1][-1] != P[-1] else X[-1]
    flat = [x for xs in X for x in xs]
    if any(x not in thr for x in flat[:-1]):
        raise AutoExitError("the outer plan's kept exits do not match its thresholds; re-run the search")
    ths = [thr[x] for x in flat[:-1]]
    topo = topology
    if topo is None and isinstance(part.get("topology"), Mapping):
        topo = pm.Topology.from_dict(part["topology"])
    return PartitionPlan(names, tuple(P), tuple(tuple(x) for x in X), crit, tuple(ths),
                         tuple(part.get("placement") or ()), topo, f"outer search: {exit_plan.describe()}")


def choose_plan(profile: "pm.Profile", topology, *, min_accuracy: float | None = None,
                max_latency_s: float | None = None, n_partitions: int | None = None,
                max_partitions: int | None = None, criteria: Sequence[str] | None = None,
                allow_trim: bool = True, allow_nonconsecutive: bool = True) -> tuple[PartitionPlan, "pm.Solution"]:
    """Enumerate every ``(T, P, A)`` and solve P_lat (``min_accuracy``) or P_acc (``max_latency_s``).

    ``n_partitions``: keep only configurations with exactly that many partitions.
    """
    if (min_accuracy is None) == (max_latency_s is None):
        raise AutoExitError("give exactly one of min_accuracy (P_lat: fastest reaching it) or max_latency_s "
                            "(P_acc: most accurate within it)")
    lmax = max_partitions if n_partitions is None else n_partitions
    if n_partitions is not None and not 1 <= n_partitions <= topology.n_tiers:
        raise AutoExitError(f"n_partitions must be in 1..{topology.n_tiers} (one partition per tier), "
                            f"got {n_partitions}")
    space = pm.enumerate_space(profile, topology, max_partitions=lmax, criteria=criteria, allow_trim=allow_trim,
                               allow_nonconsecutive=allow_nonconsecutive)
    if n_partitions is not None:
        keep = np.flatnonzero(space.n_partitions() == n_partitions)
        if keep.size == 0:
            raise AutoExitError(f"no configuration has {n_partitions} partitions (the backbone has "
                                f"{profile.n_blocks} blocks)")
        space = _subspace(space, keep)
    sol = space.solve_p_lat(min_accuracy) if min_accuracy is not None else space.solve_p_acc(max_latency_s)
    return plan_from_configuration(sol.configuration, profile, topology), sol


def _subspace(space: "pm.ConfigSpace", idx: np.ndarray) -> "pm.ConfigSpace":
    return pm.ConfigSpace(profile=space.profile, topology=space.topology, criteria=space.criteria,
                          criterion=space.criterion[idx], threshold_index=space.threshold_index[idx],
                          partitions=space.partitions[idx], placement=space.placement[idx],
                          accuracy=space.accuracy[idx], latency_s=space.latency_s[idx], cost=space.cost[idx])


# --------------------------------------------------------------------------- profiling


def exit_arrays(source, split: str = "val", accuracy: str = "auto", heads: Mapping | None = None) -> dict:
    """Per block and sample on ``split``: ``correct``, ``confidence``, ``entropy`` (normalised), ``pred``,
    shape ``[N, n]`` (row ``N-1``: the backbone), plus ``labels`` / ``backbone_pred``.

    Scores are computed in float32 exactly as the partition modules compute them.
    ``accuracy``: ``gt`` (labels), ``agreement`` (with the backbone, label-free) or ``auto``.
    """
    from .distill import predict_head

    c = _components(source, heads)
    rec = c.recording
    if accuracy not in ("auto", "gt", "agreement"):
        raise AutoExitError(f"accuracy must be 'auto', 'gt' or 'agreement', got {accuracy!r}")
    labels = rec.labels(split)
    if accuracy == "gt" and labels is None:
        raise AutoExitError("accuracy 'gt' needs labelled data; use accuracy='agreement' (label-free) or 'auto'")
    use_gt = labels is not None and accuracy != "agreement"
    blogits = rec.logits(split).float()
    bpred = blogits.argmax(1)
    conf, ent, pred = [], [], []
    with torch.no_grad():
        for n in c.names:
            z = predict_head(c.heads[n].module, rec.activations(n, split)).float()
            z = z / torch.tensor(float(c.temperatures[n]), dtype=torch.float32)
            conf.append(criterion_score(z, 0))
            ent.append(-criterion_score(z, 3))
            pred.append(z.argmax(1))
        conf.append(criterion_score(blogits, 0))
        ent.append(-criterion_score(blogits, 3))
        pred.append(bpred)
    P = torch.stack(pred).numpy()
    truth = labels.numpy() if use_gt else bpred.numpy()
    return {"names": c.names + ["output"], "pred": P, "correct": P == truth[None, :],
            "confidence": torch.stack(conf).double().numpy().clip(0.0, 1.0),
            "entropy": torch.stack(ent).double().numpy().clip(0.0, 1.0),
            "labels": None if labels is None else labels.numpy(), "backbone_pred": bpred.numpy(),
            "accuracy": "gt" if use_gt else "agreement", "split": split}


def _module_digest(m: nn.Module) -> str:
    h = hashlib.sha256(type(m).__qualname__.encode())
    for k, v in m.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _profile_key(c: Components, split: str, accuracy: str, device: str, settings: Any, batch_size: int,
                 thresholds, result_bits: float) -> str:
    h = hashlib.sha256()
    rec = c.recording
    h.update(f"profile-v1|{c.backbone.hash}|{rec.data_identity}|{rec.n}|{rec.seed}|{split}|{accuracy}".encode())
    h.update(f"|{device}|{json.dumps(settings, sort_keys=True, default=str)}|{batch_size}|{result_bits}".encode())
    h.update(json.dumps(thresholds, default=float).encode())
    for n in c.names:
        hd = c.heads[n]
        h.update(f"|{n}|{json.dumps(hd.spec.to_dict(), sort_keys=True)}|{c.temperatures[n]!r}".encode())
        h.update(_module_digest(hd.module).encode())
    return h.hexdigest()[:24]


def _stage_examples(stages: Sequence[nn.Module], example: torch.Tensor) -> list[torch.Tensor]:
    """The input of each stage for ``example`` (batch 1)."""
    xs, h = [], example
    with torch.no_grad():
        for st in stages:
            xs.append(h)
            h = st(h)
    return xs


def profile_model(backbone, recording, heads: Mapping, *, temperatures: Mapping[str, float] | None = None,
                  **kw) -> "pm.Profile":
    """:func:`profile_result` from a traced backbone, its recording and trained heads (points = heads' points)."""
    return profile_result(Components(backbone, recording, dict(heads), dict(temperatures or {})), **kw)


def profile_result(source, *, heads: Mapping | None = None, split: str = "val", evaluator=None, settings=None,
                   batch_size: int = 1, accuracy: str = "auto", thresholds=None, result_bits: float = 32.0,
                   cache: bool = True, cache_dir: str | Path | None = None, progress: bool = True) -> "pm.Profile":
    """The perfmodel :class:`Profile` of a run (an ``EnableResult``, :class:`Components` or a
    ``(backbone, recording, heads)`` tuple), made once and cached as JSON.

    Blocks are the exit points with a trained head, in backbone order, then the
    backbone's end. ``CK_i``/``CB_i``: 99th percentile per-sample latency of each
    stage / head at ``batch_size`` measured by ``evaluator`` (default
    :class:`~autoexit.evaluator.LocalEvaluator`; pass a ``RemoteEvaluator`` to
    profile on a device), ``settings`` its :class:`MeasureSettings` (default
    ``quick``). ``O_i``: bits of each point's activation (float32), ``O_N`` the
    logits. Exit rates and ``acc_i`` from the heads' predictions on ``split``
    (default val; ``accuracy``: ``gt``, ``agreement`` or ``auto``) for both
    criteria. ``heads`` (point -> TrainedHead) replace or add heads (see
    :func:`custom_heads`). The cache key covers the backbone, data, heads,
    temperatures, split, device and settings: a second call reads
    ``<cache_dir>/profiles/profile-<key>.json`` and measures nothing.
    """
    from .data import default_cache_dir
    from .evaluator import LocalEvaluator, MeasureSettings, block_head_latencies_s

    c = _components(source, heads)
    ev = evaluator if evaluator is not None else LocalEvaluator()
    settings = settings if settings is not None else MeasureSettings.quick(threads=1)
    device = getattr(ev, "device_key", "device")
    key = _profile_key(c, split, accuracy, str(device), settings.to_dict(), batch_size, thresholds, result_bits)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "profiles" / f"profile-{key}.json"
    if cache and path.is_file():
        try:
            return pm.Profile.from_json(path)
        except AutoExitError:
            pass  # a damaged cache entry is rebuilt
    t0 = time.perf_counter()
    arrays = exit_arrays(c, split, accuracy)
    blocks = c.blocks()
    tb = c.backbone
    stages = tb.split([p.node for p in blocks.points])
    examples = _stage_examples(stages, tb.example_input[:1])
    segments: dict[str, Any] = {}
    for i, st in enumerate(stages, 1):
        segments[f"block:{i}"] = (st, examples[i - 1].expand(batch_size, *examples[i - 1].shape[1:]).contiguous())
        if i < blocks.n:
            segments[f"head:{i}"] = (c.heads[blocks.names[i - 1]].module, tuple(blocks.points[i - 1].shape))
    if progress:
        print(f"profiling {blocks.n} blocks and {blocks.n - 1} heads on {device} (batch {batch_size})...",
              file=sys.stderr, flush=True)
    res = ev.measure_segments(segments, batch_sizes=(batch_size,), settings=settings)
    ck, cb = block_head_latencies_s(res, [f"block:{i}" for i in range(1, blocks.n + 1)],
                                    [f"head:{i}" for i in range(1, blocks.n)] + [None], batch_size, "p99_ms")
    ck = tuple(x / batch_size for x in ck)
    cb = tuple(x / batch_size for x in cb)
    bits = 8 * tb.example_input.element_size()
    out_bits = [32.0 * math.prod(blocks.shape(i)) for i in range(1, blocks.n + 1)]
    mem = []
    from .cost import param_bytes

    for i, st in enumerate(stages, 1):
        m = param_bytes(st)
        if i < blocks.n:
            m += param_bytes(c.heads[blocks.names[i - 1]].module)
        mem.append(float(max(m, 1)))
    info = ev.info()
    meta = {
        "backbone": tb.hash, "backbone_class": type(tb.model).__name__, "data": c.recording.data_identity,
        "split": split, "n_samples": int(arrays["correct"].shape[1]), "accuracy": arrays["accuracy"],
        "temperatures": {n: float(c.temperatures[n]) for n in c.names},
        "head_specs": {n: c.heads[n].spec.to_dict() for n in c.names},
        "device": _device_dict(info, device), "batch_size": batch_size, "stat": "p99 of timing groups",
        "criteria": {"confidence": "max softmax of the temperature-scaled head >= T",
                     "entropy": "softmax entropy / log(classes) < T"},
        "profiling_s": None, "key": key,
    }
    prof = pm.Profile.from_predictions(
        correct=arrays["correct"], confidence=arrays["confidence"], entropy=arrays["entropy"],
        block_time_s=ck, head_time_s=cb, output_bits=out_bits,
        input_bits=float(bits * math.prod(tb.example_input.shape[1:])), thresholds=thresholds,
        result_bits=result_bits, block_names=blocks.names, block_memory_bytes=mem, meta=meta)
    meta["profiling_s"] = time.perf_counter() - t0
    prof = pm.Profile(**{**_profile_fields(prof), "meta": meta})
    if cache:
        prof.to_json(path)
    return prof


def _profile_fields(p: "pm.Profile") -> dict:
    return {f: getattr(p, f) for f in ("block_time_s", "head_time_s", "output_bits", "input_bits", "head_accuracy",
                                      "thresholds", "exit_rates", "result_bits", "block_names",
                                      "block_memory_bytes", "percentile", "meta")}


def _device_dict(info, key) -> dict:
    d = info.to_dict() if hasattr(info, "to_dict") else {"info": str(info)}
    return {"key": str(key), **{k: v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}}


def measured_tier(name: str, profile: "pm.Profile", pricing=None) -> "pm.Tier":
    """A topology tier whose block / head latencies are those measured in ``profile`` (e.g. a profile taken on
    a Raspberry Pi through ``RemoteEvaluator``): the perfmodel uses them instead of ``ratio * CK_i``."""
    return pm.Tier(name, block_latency_s=tuple(profile.block_time_s), head_latency_s=tuple(profile.head_time_s),
                   pricing=pricing)


def profile_at(profile: "pm.Profile", arrays: Mapping, criterion: str, threshold: float) -> "pm.Profile":
    """``profile`` with exit rates for one extra threshold (from the same prediction arrays)."""
    grid = {c: tuple(profile.thresholds[c]) for c in profile.criteria}
    if criterion not in grid:
        raise AutoExitError(f"criterion {criterion!r} is not in the profile; use one of {list(grid)}")
    grid[criterion] = tuple(sorted(set(grid[criterion]) | {float(threshold)}))
    fresh = pm.Profile.from_predictions(
        correct=arrays["correct"], confidence=arrays["confidence"], entropy=arrays["entropy"],
        block_time_s=profile.block_time_s, head_time_s=profile.head_time_s, output_bits=profile.output_bits,
        input_bits=profile.input_bits, thresholds=grid, result_bits=profile.result_bits,
        block_names=profile.block_names, block_memory_bytes=profile.block_memory_bytes, meta=profile.meta)
    return fresh


# --------------------------------------------------------------------------- building modules


def _script(module: nn.Module, example: torch.Tensor, what: str):
    """TorchScript of ``module``: scripted, or traced when scripting fails (fx stages are straight-line code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(module)
        except Exception as first:  # noqa: BLE001 - fall back to tracing
            reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
        try:
            with torch.no_grad():
                return torch.jit.trace(module.eval(), (example,), check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(f"cannot export {what} to TorchScript (script: {reason}; trace: "
                                f"{(str(exc).splitlines() or [type(exc).__name__])[0]}); make it scriptable or "
                                "traceable") from None


def _check_plan_blocks(plan: PartitionPlan, blocks: Blocks) -> None:
    if tuple(plan.blocks) != tuple(blocks.names):
        raise AutoExitError(f"the plan's blocks {list(plan.blocks)} are not this model's {list(blocks.names)}; "
                            "plan on this model's profile")


def _pieces(c: Components, plan: PartitionPlan) -> tuple[list, list[int], list[torch.Tensor]]:
    """Backbone stages cut at every exit and partition end: (stages, end block of each, example inputs)."""
    blocks = c.blocks()
    _check_plan_blocks(plan, blocks)
    cut_blocks = sorted({b for b in (*plan.exit_blocks, *plan.partitions) if b < blocks.n})
    stages = c.backbone.split([blocks.points[b - 1].node for b in cut_blocks])
    ends = [*cut_blocks, blocks.n]
    return stages, ends, _stage_examples(stages, c.backbone.example_input[:1])


def build_partitions(source, plan: PartitionPlan, heads: Mapping | None = None,
                     script: bool = True) -> list:
    """One :class:`PartitionModule` per partition of ``plan`` (TorchScript when ``script``)."""
    c = _components(source, heads)
    blocks = c.blocks()
    stages, ends, examples = _pieces(c, plan)
    score = CRITERIA[plan.criterion]
    thr = plan.float32_thresholds()
    exit_id = {b: i for i, b in enumerate(plan.exit_blocks)}
    out = []
    for k in range(plan.n_partitions):
        lo, hi = plan.partition_blocks(k)
        last = k == plan.n_partitions - 1
        segs = []
        for j, end in enumerate(ends):
            if not lo <= end <= hi:
                continue
            stage = stages[j]
            if script:
                stage = _script(stage, examples[j], f"the stage ending at block {end} ({blocks.names[end - 1]})")
            head, temp, t, mode = None, 1.0, float("inf"), 0
            if last and end == hi:
                mode = 3 if end == blocks.n else 2
            elif end in exit_id:
                mode = 1
            if mode in (1, 2):
                name = blocks.names[end - 1]
                head = copy.deepcopy(c.heads[name].module).eval()
                if script:
                    with torch.no_grad():
                        act = stages[j](examples[j])
                    head = _script(head, act, f"the exit head at {name}")
                temp = float(c.temperatures[name])
                t = thr[exit_id[end]] if mode == 1 else float("-inf")
            segs.append(_Segment(stage, head, temp, t, mode, exit_id.get(end, -1), score))
        mod = PartitionModule(segs, k, last, blocks.num_classes, () if last else blocks.shape(hi)).eval()
        if script:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    mod = torch.jit.script(mod)
                except Exception as exc:  # noqa: BLE001
                    raise AutoExitError(f"cannot script partition {k}: {(str(exc).strip().splitlines() or [''])[0]}"
                                        ) from None
        out.append(mod)
    return out


def build_reference(source, plan: PartitionPlan, heads: Mapping | None = None, script: bool = True):
    """The plan's exits as one unpartitioned ``MultiExitModel`` (what ``model.pt`` holds)."""
    from .model import MultiExitModel, to_torchscript

    c = _components(source, heads)
    blocks = c.blocks()
    _check_plan_blocks(plan, blocks)
    cond = list(plan.exit_blocks[:-1])
    final = plan.exit_blocks[-1]
    cut = [b for b in cond if b < blocks.n]
    if plan.trimmed:
        cut = [*cut, final]
    stages = list(c.backbone.split([blocks.points[b - 1].node for b in cut]))
    if plan.trimmed:
        name = blocks.names[final - 1]
        stages = [*stages[:-2], _HeadEnd(stages[-2], copy.deepcopy(c.heads[name].module).eval(),
                                         c.temperatures[name])]
    names = [blocks.names[b - 1] for b in cond]
    score = CRITERIA[plan.criterion]
    model = MultiExitModel(stages, [copy.deepcopy(c.heads[n].module).eval() for n in names],
                           [c.temperatures[n] for n in names], plan.float32_thresholds(), names,
                           blocks.num_classes, "max_softmax", rules=[CriterionRule(score) for _ in names]).eval()
    return to_torchscript(model, c.backbone.example_input) if script else model


def run_chain(partitions: Sequence, x: torch.Tensor, batch_size: int = 256) -> dict:
    """Run partition modules one after another in this process, as the runtime does across processes.

    Returns ``logits`` [n, C], ``exit_index`` [n], ``partition`` [n] (where each sample left).
    """
    n = x.shape[0]
    logits, exit_index, part = [], [], []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            xb = x[lo:lo + batch_size]
            m = xb.shape[0]
            lb = torch.zeros(m, 0)
            eb = torch.full([m], FORWARD, dtype=torch.long)
            pb = torch.full([m], -1, dtype=torch.long)
            idx = torch.arange(m)
            h = xb
            for k, mod in enumerate(partitions):
                if idx.numel() == 0:
                    break
                z, e, h = mod(h)
                if lb.shape[1] == 0:
                    lb = torch.zeros(m, z.shape[1])
                done = e >= 0
                lb[idx[done]] = z[done]
                eb[idx[done]] = e[done]
                pb[idx[done]] = k
                idx = idx[~done]
            if idx.numel():
                raise AutoExitError(f"{idx.numel()} samples were forwarded past the last partition; the artifact's "
                                    "last partition must never forward (re-emit it)")
            logits.append(lb)
            exit_index.append(eb)
            part.append(pb)
    return {"logits": torch.cat(logits), "exit_index": torch.cat(exit_index), "partition": torch.cat(part)}


# --------------------------------------------------------------------------- metrics of a plan


def _plan_metrics(plan: PartitionPlan, arrays: Mapping, c: Components) -> dict:
    """What the plan does on recorded predictions (``exit_arrays``): exit rates per exit and partition,
    accuracy, agreement, expected FLOPs."""
    X = [x - 1 for x in plan.exit_blocks]
    n = arrays["pred"].shape[1]
    crit = plan.criterion
    if crit in ("confidence", "max_softmax"):
        s = arrays["confidence"][X]
        ok = s >= np.asarray(plan.thresholds + (0.0,))[:, None]
    elif crit == "entropy":
        s = arrays["entropy"][X]
        ok = s < np.asarray(plan.thresholds + (np.inf,))[:, None]
    else:
        raise AutoExitError(f"plan metrics from recorded arrays support confidence/entropy, not {crit!r}")
    ok[-1] = True
    first = np.argmax(ok, axis=0)
    rows = np.asarray(X)[first]
    pred = arrays["pred"][rows, np.arange(n)]
    owner = np.asarray(plan.exit_owner())
    m = {"n": int(n), "exit_rates": (np.bincount(first, minlength=len(X)) / n).tolist(),
         "partition_rates": (np.bincount(owner[first], minlength=plan.n_partitions) / n).tolist(),
         "agreement": float((pred == arrays["backbone_pred"]).mean())}
    if arrays.get("labels") is not None:
        m["accuracy"] = float((pred == arrays["labels"]).mean())
        m["backbone_accuracy"] = float((arrays["backbone_pred"] == arrays["labels"]).mean())
        m["accuracy_drop"] = m["backbone_accuracy"] - m["accuracy"]
    else:
        m.update(accuracy=None, backbone_accuracy=None, accuracy_drop=None)
    m.update(_flops(plan, c, m["exit_rates"]))
    return m


def _flops(plan: PartitionPlan, c: Components, exit_rates: Sequence[float]) -> dict:
    blocks = c.blocks()
    base = float(c.backbone.total_flops)
    before = [float(p.flops_before) for p in blocks.points] + [base]
    head = [float(c.heads[n].flops) for n in blocks.names[:-1]] + [0.0]
    cost, spent = [], 0.0
    for x in plan.exit_blocks:
        spent += head[x - 1]
        cost.append(before[x - 1] + spent)
    exp = float(np.dot(exit_rates, cost))
    return {"expected_flops": exp, "base_flops": base, "saving": 1 - exp / base if base else 0.0}


def _measured(plan: PartitionPlan, run: Mapping, split_labels, backbone_pred) -> dict:
    e = run["exit_index"].numpy()
    n = len(e)
    pred = run["logits"].argmax(1).numpy()
    m = {"n": int(n), "exit_rates": (np.bincount(e, minlength=plan.n_exits) / n).tolist(),
         "partition_rates": (np.bincount(run["partition"].numpy(), minlength=plan.n_partitions) / n).tolist(),
         "agreement": float((pred == backbone_pred).mean())}
    if split_labels is not None:
        m["accuracy"] = float((pred == split_labels).mean())
    return m


# --------------------------------------------------------------------------- the artifact


def _io_spec(shape: Sequence[int], dtype: str = "float32") -> dict:
    nbytes = int(math.prod(shape)) * int(np.dtype(dtype).itemsize)
    return {"shape": [int(s) for s in shape], "dtype": dtype, "bytes_per_sample": nbytes, "bits_per_sample": 8 * nbytes}


def _estimate(plan: PartitionPlan, profile: "pm.Profile", topology, arrays: Mapping | None) -> dict | None:
    crit = plan.perfmodel_criterion()
    if crit is None or topology is None or not plan.placement:
        return None
    thr = set(plan.thresholds) or {1.0}
    if len(thr) != 1:
        return None
    t = next(iter(thr))
    prof = profile
    try:
        prof.threshold_index(crit, t)
    except AutoExitError:
        if arrays is None:
            return None
        prof = profile_at(profile, arrays, crit, t)
    e = pm.estimate_plan(prof, topology, criterion=crit, threshold=t, partitions=plan.partitions,
                         exits=plan.exits, placement=plan.placement)
    owner = plan.exit_owner()
    per_part = [sum(r for r, o in zip(e.exit_rates, owner) if o == k) for k in range(plan.n_partitions)]
    return {"accuracy": e.accuracy, "latency_s": e.latency_s, "exit_rates": list(e.exit_rates),
            "partition_rates": per_part, "offload_rate": e.offload_rate, "computation_s": e.computation_s,
            "propagation_s": e.propagation_s, "transmission_s": e.transmission_s, "cost": e.cost,
            "profile_split": profile.meta.get("split"), "model": "paper 004 section 2.3 (autoexit.perfmodel)"}


def emit_partitioned(source, plan: PartitionPlan, out_dir: str | Path, *, profile: "pm.Profile | None" = None,
                     heads: Mapping | None = None, overwrite: bool = False, measure: bool = True,
                     evaluator=None, settings=None, progress: bool = True) -> Path:
    """Write a partitioned artifact (atomically): ``partitions/k.pt``, ``model.pt``, ``profile.json``, manifest.

    ``source``: an ``EnableResult`` (its manifest is extended) or :class:`Components`.
    ``plan``: needs a placement on a topology. ``profile``: the run's profile
    (default: :func:`profile_result`, cached). ``measure``: also time each
    partition with ``evaluator`` (default local) and record it as measured.
    The accuracy and exit rates of the real partitioned modules on the test split
    are always measured (run in this process on the recorded test inputs).
    """
    from .artifact import write_artifact

    c = _components(source, heads)
    if plan.topology is None or not plan.placement:
        raise AutoExitError("a partitioned artifact needs a placement on a topology; build the plan with "
                            "topology=... and placement=[tier, ...] (or from a perfmodel configuration)")
    t0 = time.perf_counter()
    if profile is None:
        profile = profile_result(c, evaluator=evaluator, settings=settings, progress=progress)
    blocks = c.blocks()
    _check_plan_blocks(plan, blocks)
    parts = build_partitions(c, plan)
    reference = build_reference(c, plan)
    rec = c.recording
    try:
        x_test = rec.inputs("test")
    except AutoExitError:
        x_test = None
    arrays = {s: exit_arrays(c, s) for s in ("val", "test")}
    expected = {s: _plan_metrics(plan, arrays[s], c) for s in ("val", "test")}
    measured: dict[str, Any] = {}
    if x_test is not None:
        run = run_chain(parts, x_test)
        measured["test"] = _measured(plan, run, arrays["test"]["labels"], arrays["test"]["backbone_pred"])
        with torch.no_grad():
            ref_logits, ref_exit = reference(x_test[:256])
        same = (ref_exit == run["exit_index"][:256]) & (ref_logits.argmax(1) == run["logits"][:256].argmax(1))
        measured["test"]["agrees_with_model_pt"] = float(same.float().mean())
    if measure:
        measured["compute"] = _time_partitions(parts, plan, blocks, c, evaluator, settings)
    estimated = _estimate(plan, profile, plan.topology, arrays["val"])
    manifest = _manifest(c, plan, blocks, profile, expected, estimated, measured)
    manifest["partitioning"]["build_s"] = time.perf_counter() - t0
    writers: dict[str, Callable[[Path], None]] = {"model.pt": lambda p: _jit_save(reference, p),
                                                  "profile.json": lambda p: profile.to_json(p)}
    for k, mod in enumerate(parts):
        writers[f"partitions/{k}.pt"] = (lambda m: lambda p: _jit_save(m, p))(mod)
    return write_artifact(out_dir, manifest, writers, overwrite=overwrite)


def _time_partitions(parts, plan, blocks, c, evaluator, settings) -> dict:
    from .evaluator import LocalEvaluator, MeasureSettings

    ev = evaluator if evaluator is not None else LocalEvaluator()
    settings = settings if settings is not None else MeasureSettings.quick(threads=1)
    segs = {}
    for k, mod in enumerate(parts):
        lo, _ = plan.partition_blocks(k)
        shape = tuple(c.backbone.example_input.shape[1:]) if lo == 1 else blocks.shape(lo - 1)
        segs[f"partition:{k}"] = (mod, shape)
    try:
        res = ev.measure_segments(segs, batch_sizes=(1,), settings=settings)
    except AutoExitError as exc:
        return {"error": str(exc)}
    info = ev.info()
    return {"what": "one forward of each partition module, batch 1, random input (exits as the data decides)",
            "device": _device_dict(info, getattr(ev, "device_key", "device")),
            "median_s": [res[f"partition:{k}"].stats[0].median_ms / 1000 for k in range(len(parts))],
            "p99_s": [res[f"partition:{k}"].stats[0].p99_ms / 1000 for k in range(len(parts))]}


def _jit_save(m, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(m, str(path))


def _manifest(c: Components, plan: PartitionPlan, blocks: Blocks, profile, expected, estimated, measured) -> dict:
    from . import __version__

    topo = plan.topology
    if c.result is not None:
        base = c.result.manifest()
    else:
        tb, rec = c.backbone, c.recording
        base = {
            "autoexit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backbone": {"class": type(tb.model).__name__, "hash": tb.hash, "num_classes": tb.num_classes,
                         "input_shape": list(tb.example_input.shape[1:]), "flops": tb.total_flops},
            "data": {"identity": rec.data_identity, "n": rec.n, "split": list(rec.split_fractions), "seed": rec.seed},
            "candidate_points": [p.to_dict() for p in rec.points],
            "latency": None,
        }
    X = plan.exit_blocks
    thr = plan.thresholds
    thr32 = plan.float32_thresholds()
    owner = plan.exit_owner()
    exits = []
    for i, b in enumerate(X):
        if b == blocks.n:
            continue  # the backbone's own classifier is not an exit head
        name = blocks.names[b - 1]
        h = c.heads[name]
        factory = isinstance(h.spec, FactoryHead)
        always = i == len(X) - 1
        exits.append({
            "index": i, "name": name, "node": h.point.node, "shape": list(h.point.shape), "block": b,
            "partition": owner[i], "head_spec": None if factory else h.spec.to_dict(),
            "head_factory": h.spec.path if factory else None,
            "temperature": float(c.temperatures[name]), "threshold": 0.0 if always else float(thr[i]),
            "always_exits": always, "head_flops": h.flops, "head_params": h.params,
            "flops_before": h.point.flops_before, "flops_after": h.point.flops_after,
            "hit_rate_val": expected["val"]["exit_rates"][i], "hit_rate_test": expected["test"]["exit_rates"][i],
        })
    parts = []
    tiers = plan.tiers()
    for k in range(plan.n_partitions):
        lo, hi = plan.partition_blocks(k)
        last = k == plan.n_partitions - 1
        in_shape = list(c.backbone.example_input.shape[1:]) if lo == 1 else list(blocks.shape(lo - 1))
        pexits = []
        for i, b in enumerate(X):
            if owner[i] != k:
                continue
            always = i == len(X) - 1
            pexits.append({"exit_index": i, "block": b, "name": blocks.names[b - 1],
                           "threshold": None if always else _jf(thr[i]),
                           "threshold_float32": None if always else _jf(thr32[i]), "always": always,
                           "backbone_output": b == blocks.n})
        parts.append({
            "index": k, "file": f"partitions/{k}.pt", "tier": plan.placement[k], "tier_index": tiers[k],
            "blocks": [lo, hi], "block_names": list(blocks.names[lo - 1:hi]), "exits": pexits,
            "input": _io_spec(in_shape), "output": None if last else _io_spec(blocks.shape(hi)),
            "next": None if last else {"partition": k + 1, "tier": plan.placement[k + 1]},
            "results_to": topo.names[topo.destination - 1],
        })
    score = CRITERIA[plan.criterion]
    rule = {0: "max softmax of the temperature-scaled head logits >= threshold",
            1: "margin between the two largest softmax probabilities >= threshold",
            2: "1 - softmax entropy / log(classes) >= threshold",
            3: "softmax entropy / log(classes) < threshold"}[score]
    base["exits"] = exits
    base["dropped_points"] = [p.name for p in c.recording.points if p.name not in
                              {blocks.names[b - 1] for b in X if b < blocks.n}]
    base["policy"] = {"name": "partition", "criterion": plan.criterion, "rule": f"exit i answers when {rule}",
                      "thresholds": [_jf(t) for t in thr], "origin": plan.origin,
                      "source_policy": base.get("policy")}
    src = base["policy"]["source_policy"] or {}
    for key in ("statement", "guarantee", "delta"):  # a certified pick's guarantee holds for the partitioned model
        if src.get("guarantee") and key in src:  # too: the same exits, thresholds and temperatures answer
            base["policy"][key] = src[key]
    base["expected"] = {s: {k: expected[s].get(k) for k in ("n", "accuracy", "backbone_accuracy", "accuracy_drop",
                                                            "agreement", "expected_flops", "base_flops", "saving",
                                                            "exit_rates", "partition_rates")}
                        for s in ("val", "test")}
    for s in ("val", "test"):
        base["expected"][s]["oracle_saving"] = None
    base["outputs"] = {
        "forward": "model.pt: (logits [N, C], exit_index [N]); exit_index == num_exits means the final exit",
        "partition": "partitions/k.pt forward(x) -> (logits [n, C], exit_index [n], features [m, ...]): exit_index is "
                     "the global exit that answered (0-based, block order) or -1 = send on; features: the activation "
                     "of the forwarded samples only, in input order, to feed partition k+1; logits rows of forwarded "
                     "samples are zero; the last partition never forwards",
    }
    base["partitioning"] = {
        "schema": PARTITION_SCHEMA,
        "plan": plan.to_dict(),
        "describe": plan.describe(),
        "topology": topo.to_dict(),
        "source": topo.names[topo.source - 1],
        "destination": topo.names[topo.destination - 1],
        "criterion": plan.criterion,
        "score": score,
        "rule": rule,
        "num_exits": plan.n_exits,
        "num_classes": blocks.num_classes,
        "trimmed": plan.trimmed,
        "partitions": parts,
        "estimated": estimated,
        "measured": measured,
        "profile": {"file": "profile.json", "split": profile.meta.get("split"),
                    "device": profile.meta.get("device"), "blocks": list(profile.block_names)},
    }
    return base


def load_partitioned(path: str | Path, verify: bool = True):
    """Load a partitioned artifact (checksums verified): ``(Artifact, manifest['partitioning'])``."""
    from .artifact import load
    from .errors import ArtifactError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        art = load(path, verify=verify)
    part = art.manifest.get("partitioning")
    if not isinstance(part, Mapping) or not part.get("partitions"):
        raise ArtifactError(f"{path} is not a partitioned artifact (no 'partitioning' in its manifest); emit one "
                            "with autoexit.partition.emit_partitioned or `autoexit partition build`")
    if part.get("schema") != PARTITION_SCHEMA:
        raise ArtifactError(f"{path} has partitioning schema {part.get('schema')!r}; this autoexit reads "
                            f"{PARTITION_SCHEMA} (re-emit it)")
    return art, part


# --------------------------------------------------------------------------- validation (paper 004, 3.2)


def random_partitionings(n_blocks: int, count: int, *, max_partitions: int = 3, seed: int = 0,
                         allow_trim: bool = True) -> list[tuple[int, ...]]:
    """``count`` distinct random partitionings ``P`` (1 to ``max_partitions`` partitions)."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    tries = 0
    while len(out) < count and tries < 100 * count:
        tries += 1
        L = int(rng.integers(1, min(max_partitions, n_blocks) + 1))
        if allow_trim:
            P = tuple(sorted(int(x) for x in rng.choice(np.arange(1, n_blocks + 1), size=L, replace=False)))
        else:
            head = sorted(int(x) for x in rng.choice(np.arange(1, n_blocks), size=L - 1, replace=False))
            P = (*head, n_blocks)
        if P not in seen:
            seen.add(P)
            out.append(P)
    return out


def validate_estimates(source, profile: "pm.Profile", *, count: int = 12, seed: int = 0, max_partitions: int = 3,
                       split: str = "test", run_models: bool = True, batch_size: int = 256,
                       progress: bool = True) -> dict:
    """Paper 004 section 3.2: estimated vs actual accuracy and exit rates for ``count`` random partitionings.

    For each partitioning ``P`` and each threshold of each criterion, the model's
    estimate (from ``profile``) is compared with the actual model that keeps only
    the exits ``P_k``, on ``split`` (the paper's figure 3: errors averaged over the
    20 thresholds). With ``run_models`` the actual model for one random
    ``(criterion, T)`` per partitioning is the real partitioned TorchScript
    modules run on the recorded ``split`` inputs; the others are the same exits
    simulated on the heads' recorded predictions (checked equal to the real runs).
    Returns the rows and the mean absolute errors (fractions).
    """
    c = _components(source)
    arrays = exit_arrays(c, split)
    rng = np.random.default_rng(seed + 1)
    parts = random_partitionings(profile.n_blocks, count, max_partitions=max_partitions, seed=seed)
    x = c.recording.inputs(split) if run_models else None
    rows, real = [], []
    names = list(profile.block_names)
    for j, P in enumerate(parts):
        for crit in profile.criteria:
            for t in profile.thresholds[crit]:
                est = pm.estimate(profile, _any_topology(len(P)), pm.Configuration(crit, t, P, tuple(range(1, len(P) + 1))))
                rates, acc = pm.simulate_partitioned(correct=arrays["correct"], criterion=crit, threshold=t,
                                                     partitions=P, confidence=arrays["confidence"],
                                                     entropy=arrays["entropy"])
                rows.append({"partitions": list(P), "criterion": crit, "threshold": float(t),
                             "est_accuracy": est.accuracy, "actual_accuracy": acc,
                             "est_exit_rates": list(est.exit_rates), "actual_exit_rates": list(rates),
                             "accuracy_error": abs(est.accuracy - acc),
                             "exit_rate_error": float(np.mean(np.abs(np.subtract(est.exit_rates, rates))))})
        if run_models:
            crit = profile.criteria[int(rng.integers(len(profile.criteria)))]
            grid = profile.thresholds[crit]
            t = float(grid[int(rng.integers(1, len(grid) - 1))])
            plan = PartitionPlan(tuple(names), P, tuple((p,) for p in P), crit, (t,) * (len(P) - 1))
            t1 = time.perf_counter()
            mods = build_partitions(c, plan)
            run = run_chain(mods, x, batch_size)
            meas = _measured(plan, run, arrays["labels"], arrays["backbone_pred"])
            est = pm.estimate(profile, _any_topology(len(P)), pm.Configuration(crit, t, P, tuple(range(1, len(P) + 1))))
            sim_rates, sim_acc = pm.simulate_partitioned(correct=arrays["correct"], criterion=crit, threshold=t,
                                                         partitions=P, confidence=arrays["confidence"],
                                                         entropy=arrays["entropy"])
            acc_real = meas["accuracy"] if meas.get("accuracy") is not None and arrays["accuracy"] == "gt" \
                else meas["agreement"]
            real.append({"partitions": list(P), "criterion": crit, "threshold": t, "n": meas["n"],
                         "est_accuracy": est.accuracy, "real_accuracy": acc_real, "sim_accuracy": sim_acc,
                         "est_exit_rates": list(est.exit_rates), "real_exit_rates": meas["partition_rates"],
                         "sim_exit_rates": list(sim_rates),
                         "accuracy_error": abs(est.accuracy - acc_real),
                         "exit_rate_error": float(np.mean(np.abs(np.subtract(est.exit_rates,
                                                                             meas["partition_rates"])))),
                         "real_vs_sim_max_rate_diff": float(np.max(np.abs(np.subtract(sim_rates,
                                                                                      meas["partition_rates"])))),
                         "seconds": time.perf_counter() - t1})
            if progress:
                r = real[-1]
                print(f"  [{j + 1}/{len(parts)}] P={list(P)} {crit} T={t:.3f}: accuracy est {r['est_accuracy']:.4f} "
                      f"real {r['real_accuracy']:.4f}; exit-rate error {r['exit_rate_error']:.4f} "
                      f"({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
    summary = {
        "n_partitionings": len(parts), "split": split, "n_samples": int(arrays["correct"].shape[1]),
        "profile_split": profile.meta.get("split"), "accuracy_kind": arrays["accuracy"],
        "mean_accuracy_error": float(np.mean([r["accuracy_error"] for r in rows])),
        "max_accuracy_error": float(np.max([r["accuracy_error"] for r in rows])),
        "mean_exit_rate_error": float(np.mean([r["exit_rate_error"] for r in rows])),
        "max_exit_rate_error": float(np.max([r["exit_rate_error"] for r in rows])),
    }
    if real:
        summary.update(
            real_runs=len(real),
            real_mean_accuracy_error=float(np.mean([r["accuracy_error"] for r in real])),
            real_mean_exit_rate_error=float(np.mean([r["exit_rate_error"] for r in real])),
            real_vs_sim_max_rate_diff=float(np.max([r["real_vs_sim_max_rate_diff"] for r in real])),
        )
    return {"summary": summary, "rows": rows, "real": real}


def _any_topology(L: int):
    """A placeholder chain of ``L`` tiers: accuracy and exit rates do not depend on the placement."""
    return pm.Topology(tuple(pm.Tier(f"t{j}", ratio=1.0) for j in range(1, L + 1)),
                       tuple(pm.Link(1e9, 0.0) for _ in range(L - 1)), destination=1)


# --------------------------------------------------------------------------- user-supplied exit networks


@dataclass(frozen=True)
class FactoryHead:
    """A user's exit network made by ``module:function(in_shape, num_classes) -> nn.Module``."""

    path: str

    def to_dict(self) -> dict:
        return {"factory": self.path}

    def describe(self) -> str:
        return f"factory {self.path}"


def resolve_head_factory(path: str) -> Callable[..., nn.Module]:
    """Import ``package.module:function``; a one-line error when it is not there."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise AutoExitError(f"a head factory must be 'package.module:function', got {path!r}")
    mod_name, fn_name = path.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise AutoExitError(f"cannot import {mod_name!r} for head factory {path!r} ({exc}); check the name and "
                            "that it is on PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise AutoExitError(f"{mod_name!r} has no function {fn_name!r} (head factory {path!r})")
    return fn


def custom_heads(source, specs: Mapping[str, Any], *, train=None, progress: bool = True) -> dict:
    """Train user-chosen exit networks: ``{point: HeadSpec | dict | 'module:function' | callable}``.

    A factory is called as ``factory(in_shape, num_classes)`` (``in_shape`` without
    the batch) and must return an ``nn.Module`` mapping ``[n, *in_shape]`` to
    ``[n, num_classes]`` logits. Heads are trained label-free on the recording
    (KL to the backbone), like the default heads. Returns ``{point: TrainedHead}``
    to pass as ``heads=`` to :func:`profile_result`, :func:`build_partitions`,
    :func:`emit_partitioned` (they replace the run's heads at those points).
    """
    from .cost import count_flops, count_params, param_bytes
    from .distill import TrainConfig, TrainedHead, agreement, kd_loss, predict_head, train_head
    from .heads import HeadSpec, build_head

    c = _components(source)
    rec = c.recording
    train = train or TrainConfig()
    t_train, t_val = rec.logits("train"), rec.logits("val")
    out = {}
    for name, spec in specs.items():
        p = rec.point(name)
        torch.manual_seed(train.seed)
        if isinstance(spec, Mapping):
            spec = HeadSpec.from_dict(dict(spec))
        if isinstance(spec, HeadSpec):
            module, sp = build_head(spec, p.shape, rec.num_classes), spec
        elif isinstance(spec, str) or callable(spec):
            fn = resolve_head_factory(spec) if isinstance(spec, str) else spec
            label = spec if isinstance(spec, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', '?')}"
            try:
                module = fn(tuple(p.shape), rec.num_classes)
            except Exception as exc:  # noqa: BLE001 - the user's code
                raise AutoExitError(f"head factory {label} failed for point {name!r} (in_shape {tuple(p.shape)}, "
                                    f"{rec.num_classes} classes): {exc}") from None
            if not isinstance(module, nn.Module):
                raise AutoExitError(f"head factory {label} returned {type(module).__name__}, not a torch.nn.Module")
            sp = FactoryHead(label)
        else:
            raise AutoExitError(f"the head for {name!r} must be a HeadSpec, a mapping, 'module:function' or a "
                                f"callable, got {type(spec).__name__}")
        x_train, x_val = rec.activations(p, "train"), rec.activations(p, "val")
        with torch.no_grad():
            try:
                probe = module.eval()(x_val[:2])
            except Exception as exc:  # noqa: BLE001
                raise AutoExitError(f"the head for {name!r} fails on its input [n, {', '.join(map(str, p.shape))}]: "
                                    f"{(str(exc).splitlines() or [''])[0]}") from None
        if tuple(probe.shape) != (min(2, len(x_val)), rec.num_classes):
            raise AutoExitError(f"the head for {name!r} returns shape {tuple(probe.shape)}; it must return logits "
                                f"[n, {rec.num_classes}]")
        t0 = time.perf_counter()
        module, hist = train_head(module, x_train, t_train, x_val, t_val, train, desc=name, progress=progress)
        pv = predict_head(module, x_val)
        out[name] = TrainedHead(point=p, spec=sp, module=module, flops=count_flops(module, x_val[:1]),
                                params=count_params(module), param_bytes=param_bytes(module),
                                val_agreement=agreement(pv, t_val), val_kl=float(kd_loss(pv, t_val)),
                                epochs=len(hist), seconds=time.perf_counter() - t0, history=hist)
    return out


# --------------------------------------------------------------------------- outer search (Optuna)


@dataclass(frozen=True)
class PartitionSpace:
    """The partition parameters of the Optuna outer search (``partition:`` in ``search_spaces/outer*.yaml``).

    topology: a :class:`perfmodel.Topology` or a YAML path; destination: override
    its destination tier; profile: a :class:`perfmodel.Profile` or a JSON path
    (block costs and output sizes; its blocks must be the recorded exits then
    ``output``); max_partitions: 1..tiers; exits_per_part: at most this many kept
    exits inside one partition (paper 002: 3); placement: ``any`` (non-consecutive
    allowed) or ``consecutive``.

    A trial samples ``n_parts``, split points ``cut_1 < ...`` (block indices,
    duplicates merge) and the placement ``placement_<L>`` (tier names joined by
    ``>``); its latency is :func:`perfmodel.estimate_plan_rates` with the exit rates
    the trial simulates on the recorded predictions.
    """

    topology: Any
    profile: Any
    destination: str | None = None
    max_partitions: int = 3
    exits_per_part: int = 3
    placement: str = "any"

    KEYS = PARTITION_KEYS

    def __post_init__(self):
        s = object.__setattr__
        topo = self.topology
        if isinstance(topo, (str, Path)):
            topo = pm.Topology.from_yaml(_find(topo))
        elif isinstance(topo, Mapping):
            topo = pm.Topology.from_dict(topo)
        if not isinstance(topo, pm.Topology):
            raise AutoExitError("partition.topology must be a topology YAML path (e.g. experiments/topologies/iiot.yaml)")
        if self.destination is not None:
            topo = topo.with_destination(self.destination)
        s(self, "topology", topo)
        prof = self.profile
        if prof is None:
            raise AutoExitError("partition.profile is missing: give the profile JSON of this backbone + data "
                                "(autoexit.partition.profile_result(...).to_json(path), or `autoexit partition build`)")
        if isinstance(prof, (str, Path)):
            prof = pm.Profile.from_json(_find(prof))
        if not isinstance(prof, pm.Profile):
            raise AutoExitError("partition.profile must be a Profile or a profile JSON path")
        s(self, "profile", prof)
        if not isinstance(self.max_partitions, int) or not 1 <= self.max_partitions <= topo.n_tiers:
            raise AutoExitError(f"partition.max_partitions must be in 1..{topo.n_tiers} (one partition per tier), "
                                f"got {self.max_partitions!r}")
        if not isinstance(self.exits_per_part, int) or self.exits_per_part < 1:
            raise AutoExitError(f"partition.exits_per_part must be an integer >= 1, got {self.exits_per_part!r}")
        if self.placement not in ("any", "consecutive"):
            raise AutoExitError(f"partition.placement must be 'any' or 'consecutive', got {self.placement!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "PartitionSpace":
        if isinstance(d, PartitionSpace):
            return d
        if not isinstance(d, Mapping):
            raise AutoExitError(f"the outer space's partition block must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise AutoExitError(f"unknown partition setting(s) {', '.join(unknown)}; valid: {', '.join(cls.KEYS)}")
        if "topology" not in d:
            raise AutoExitError("the partition block needs 'topology' (a topology YAML path)")
        return cls(**{k: d[k] for k in cls.KEYS if k in d})

    def to_dict(self) -> dict:
        return {"topology": self.topology.name, "destination": self.topology.names[self.topology.destination - 1],
                "profile": self.profile.meta.get("key", "given"), "max_partitions": self.max_partitions,
                "exits_per_part": self.exits_per_part, "placement": self.placement}

    def hook(self, names: Sequence[str]) -> "PartitionHook":
        return PartitionHook(self, list(names))


def _find(p: str | Path) -> Path:
    path = Path(p)
    if path.is_file() or path.is_absolute():
        return path
    repo = Path(__file__).resolve().parents[1] / path
    return repo if repo.is_file() else path


class PartitionHook:
    """What the outer search calls for partitioned trials (see :class:`PartitionSpace`)."""

    def __init__(self, space: PartitionSpace, names: list[str]):
        prof = space.profile
        if list(prof.block_names[:-1]) != list(names):
            raise AutoExitError(f"the partition profile's blocks {list(prof.block_names)} are not the recorded exits "
                                f"{names} + output; profile the same backbone, points and heads")
        self.space = space
        self.names = names
        self.n = prof.n_blocks
        self.topology = space.topology
        tiers = list(self.topology.names)
        self.placements: dict[int, list[str]] = {}
        import itertools

        for L in range(1, space.max_partitions + 1):
            perms = itertools.permutations(tiers, L)
            if space.placement == "consecutive":
                perms = (p for p in perms if all(tiers.index(b) > tiers.index(a) for a, b in zip(p, p[1:])))
            self.placements[L] = [">".join(p) for p in perms]
        blocks, heads = self.topology.block_costs(prof)
        s = self.topology.source - 1
        d = self.topology.destination - 1
        hop_pl, hop_inv = self.topology.hop_matrices()
        # whole backbone on the source tier, no exit, result to the destination: the latency baseline
        self.base_s = float(blocks[s].sum() + hop_pl[s, d] + prof.result_bits * hop_inv[s, d])

    def latency_costs(self):
        """Per-exit latency costs (ms, reference device) from the profile, for ranking exits by K(S)."""
        from .policies import ExitCosts

        prof = self.space.profile
        ck = np.asarray(prof.block_time_s) * 1000
        return ExitCosts(np.asarray(prof.head_time_s[:-1]) * 1000, np.cumsum(ck)[:-1], float(ck.sum()), "ms",
                         "partition profile (reference device)")

    def suggest(self, trial) -> dict:
        sp = self.space
        p: dict[str, Any] = {}
        L = trial.suggest_int("n_parts", 1, min(sp.max_partitions, self.n)) if sp.max_partitions > 1 else 1
        p["n_parts"] = L
        cuts = sorted({trial.suggest_int(f"cut_{k}", 1, self.n - 1) for k in range(1, L)})
        for k in range(1, L):
            p[f"cut_{k}"] = trial.params[f"cut_{k}"]
        L = len(cuts) + 1
        choices = self.placements[L]
        p[f"placement_{L}"] = trial.suggest_categorical(f"placement_{L}", choices) if len(choices) > 1 else choices[0]
        return p

    def partition_of(self, params: Mapping) -> dict:
        L = int(params.get("n_parts", 1))
        cuts = sorted({int(params[f"cut_{k}"]) for k in range(1, L)})
        L = len(cuts) + 1
        place = str(params.get(f"placement_{L}", self.placements[L][0])).split(">")
        return {"partitions": [*cuts, self.n], "placement": place, "topology": self.topology.to_dict()}

    def metrics(self, kept: Sequence[str], part: Mapping, m: Mapping) -> dict:
        """Partitioned latency of the kept exits ``kept`` split as ``part`` (:meth:`partition_of`), given the
        exit rates the trial simulated (``m["exit_rates"]``: per kept exit, then the backbone)."""
        P = [int(x) for x in part["partitions"]]
        ks = [self.names.index(n) + 1 for n in kept]
        rates = list(m["exit_rates"])
        X = [[x for x in ks if (P[k - 1] if k else 0) < x <= P[k]] for k in range(len(P))]
        X[-1] = [*X[-1], self.n]
        e = pm.estimate_plan_rates(self.space.profile, self.topology, partitions=P, exits=X,
                                   placement=part["placement"], exit_rates=rates)
        per_part = [len(x) for x in X]
        per_part[-1] -= 1  # the backbone's own output is not an exit head
        return {"latency_ms": 1000 * e.latency_s, "latency_fraction": e.latency_s / self.base_s,
                "partition": {"partitions": P, "placement": list(part["placement"]), "exits_per_part": per_part,
                              "offload_rate": e.offload_rate, "computation_ms": 1000 * e.computation_s,
                              "network_ms": 1000 * (e.propagation_s + e.transmission_s), "cost": e.cost}}

    def constraint(self, m: Mapping) -> float:
        return float(max(m["partition"]["exits_per_part"]) - self.space.exits_per_part)


class PartitionedObjective:
    """The outer-search objective for partitioned configurations: ``autoexit.search.outer.Objective`` plus the
    partition parameters of a :class:`PartitionSpace`.

    A trial samples the outer parameters (tolerance, split scheme, kept exits,
    signal), then ``n_parts``, the split points and the placement; it scores the
    kept exits on val as the outer search does (accuracy drop, exit rates) and
    replaces the cost by the partitioned latency (:meth:`PartitionHook.metrics`:
    perfmodel's latency with the simulated exit rates). Constraints: the outer
    budgets (``max_latency_ms`` now bounds the partitioned latency) plus
    ``exits_per_part``. User attrs: ``plan``, ``val`` (with ``latency_ms``) and
    ``partition``. Directions and metric names are the outer search's with
    ``cost: latency``.
    """

    def __init__(self, recorded, partition, space=None, settings=None):
        from dataclasses import replace as dc_replace

        from .search.outer import Objective, OuterSettings

        if settings is None or isinstance(settings, Mapping):
            settings = OuterSettings.from_dict(settings)
        if not isinstance(partition, PartitionSpace):
            partition = PartitionSpace.from_dict(partition)
        self.partition = partition
        self.hook = partition.hook(recorded.names)
        if recorded.latency is None:  # rank exits by the profile's reference-device latency
            recorded = recorded.with_latency(self.hook.latency_costs())
        self.recorded = recorded
        self.settings = dc_replace(settings, cost="latency")
        # the certified pick: trials read the train split only; val certifies the front (certify_front, with
        # :meth:`val_cost` as each tested setting's cost)
        self.search = recorded.search_view() if self.settings.pick.certified else recorded
        self.base = Objective(self.search, space, self.settings)
        self.space = self.base.space

    @property
    def directions(self) -> list[str]:
        return self.base.directions

    @property
    def metric_names(self) -> list[str]:
        return self.base.metric_names

    def evaluate(self, params: Mapping, split: str = "val") -> tuple:
        """(ExitPlan, metrics, partition) of a parameter set, on ``split``."""
        from .search.outer import evaluate_plan, plan_from_params

        plan = plan_from_params(self.search, params, self.settings, self.space)
        m = evaluate_plan(self.search, plan, split, self.settings.accuracy)
        part = self.hook.partition_of(params)
        m.update(self.hook.metrics(plan.kept, part, m))
        return plan, m, part

    def val_cost(self, trial, plan) -> float:
        """Partitioned latency (ms) on val of ``plan`` (a front point or a safer step of it) with ``trial``'s split
        points and placement: what the certified pick compares the certified settings by."""
        from .search.outer import evaluate_plan

        m = evaluate_plan(self.recorded, plan, "val", self.settings.accuracy)
        return float(self.hook.metrics(plan.kept, trial.user_attrs["partition"], m)["latency_ms"])

    def __call__(self, trial):
        params = self.base.suggest(trial)
        params.update(self.hook.suggest(trial))
        plan, m, part = self.evaluate(params)
        cons = self.base.constraints(m, plan)
        cons["exits_per_part"] = self.hook.constraint(m)
        for key, v in cons.items():
            trial.set_constraint(key, float(v))
        from .search.outer import _headline

        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr(self.base.key, {**_headline(m), "partition": m["partition"]})  # val, or fit (train)
        trial.set_user_attr("partition", {"partitions": part["partitions"], "placement": part["placement"],
                                          "topology": self.partition.topology.name,
                                          "destination": self.partition.topology.names[
                                              self.partition.topology.destination - 1]})
        vals = self.base.values(m)
        return vals[0] if len(vals) == 1 else vals


def optimize_partitioned(recorded, partition=None, *, space=None, settings=None, **kw):
    """``autoexit.search.outer.optimize`` over partitioned configurations (see :class:`PartitionedObjective`).

    ``recorded``: a ``Recorded`` or an ``EnableResult``; ``partition``: a
    :class:`PartitionSpace` or its mapping (``topology``, ``profile``, ...), by default
    the space's ``partition`` block; ``space``/``settings``/``kw``: as for ``optimize``. The pick is made on the partitioned latency; the chosen
    trial's ``user_attrs["partition"]`` holds its split points and placement, and
    :func:`plan_from_search` turns the result into a :class:`PartitionPlan` to
    emit with :func:`emit_partitioned`.
    """
    from dataclasses import replace as dc_replace

    from .search.outer import OuterSettings, Recorded, load_space, optimize

    if not isinstance(recorded, Recorded):  # an EnableResult; the certified pick needs its train split too
        certified = OuterSettings.from_dict(settings).pick.certified if not isinstance(settings, OuterSettings) \
            else settings.pick.certified
        recorded = Recorded.from_result(recorded, fit=certified)
    space = load_space(space)
    if partition is None:
        partition = space.partition
    if not partition:
        raise AutoExitError("no partition settings: pass partition={topology: ..., profile: ...} or a space whose "
                            "'partition' block names them")
    obj = PartitionedObjective(recorded, partition, dc_replace(space, partition=None), settings)
    return optimize(obj.recorded, space=obj.space, settings=obj.settings, objective=obj, **kw)


def plan_from_search(result, partition=None) -> PartitionPlan:
    """The :class:`PartitionPlan` of an :func:`optimize_partitioned` result's chosen trial."""
    ps = partition if isinstance(partition, PartitionSpace) or partition is None else PartitionSpace.from_dict(partition)
    topo = ps.topology if ps is not None else None
    names = list(result.recorded.names) + ["output"]
    if result.chosen_trial is None and getattr(result, "certificate", None) is not None:
        # the certified pick certified nothing: no exit, the whole backbone on the source tier (the latency baseline)
        if topo is None:
            raise AutoExitError("nothing was certified, so the backbone alone is emitted on the source tier; pass "
                                "the partition settings (plan_from_search(result, partition)) to name that tier")
        part = {"partitions": [len(names)], "placement": [topo.names[topo.source - 1]]}
        return plan_from_exit_plan(result.chosen, names, part, topo)
    part = dict(result.chosen_trial.user_attrs.get("partition") or {})
    if not part:
        raise AutoExitError("the chosen trial has no partition; run the search with optimize_partitioned")
    return plan_from_exit_plan(result.chosen, names, part, topo)
