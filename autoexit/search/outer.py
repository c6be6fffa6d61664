"""The Optuna outer search: tolerance, its split over exits, which exits to keep, how many.

A trial never runs the backbone or a head: it reads :class:`Recorded` - every
head's temperature-scaled exit scores and predicted classes on the val (and
test) split, the backbone's predictions, the labels when known, and per-exit
costs - and takes milliseconds.

One trial (see :func:`make_objective`):

1. samples a tolerance ``T`` (percent), a split scheme (``halving`` = T/2^n,
   paper 003 eq. 3; ``equal``; ``weights`` = a searched weight per kept exit),
   an exit signal, and the kept exits: either ``ranking`` (the best subset of
   size ``k`` by K(S), paper 003 eq. 4, via :func:`autoexit.subset.best_subset`)
   or ``flags`` (one include flag per candidate exit);
2. derives the thresholds on val (:func:`autoexit.calibrate.assign_thresholds`);
3. simulates the exit rule on val (:func:`autoexit.subset.simulate_exits`) and
   returns ``(expected cost per sample, accuracy drop in points)`` - or one
   scalarised value - with the budgets as ``trial.set_constraint`` values and the
   configuration as user attributes (``plan``, ``val``).

Costs come through :class:`ExitCosts` (per-exit head cost ``c1``, backbone cost
before the point, the whole backbone): FLOPs by default, device latency when a
segment profile is given (:func:`latency_costs`). The accuracy drop is the GT
drop when labels are known, else the disagreement with the backbone.

:func:`optimize` runs the study (the user's own, or one it creates on a local
SQLite file or any Optuna storage), caps its total trials exactly across
workers (:class:`TrialCap`), picks the configuration from the feasible Pareto
front by a :class:`PickRule`, and reports the pick's test-split numbers apart
from the val numbers it was chosen on. With ``PickRule(rule="certified")`` the
trials read the train split instead (:meth:`Recorded.search_view`) and val only
certifies the front afterwards (:func:`certify_front`, Learn-then-Test), so the
emitted configuration keeps its budget on new data with probability >= 1 - delta.
Optuna is imported lazily (extra ``search``).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..calibrate import SIGNALS, ThresholdResult, assign_thresholds, check_tolerance
from ..errors import AutoExitError, require
from ..policies.cascade import ExitCosts
from ..subset import SubsetResult, best_subset, k_score, simulate_exits

if TYPE_CHECKING:  # pragma: no cover
    import optuna

    from ..pipeline import EnableResult

__all__ = [
    "SCHEMES",
    "SELECTIONS",
    "OuterSpace",
    "Budgets",
    "PickRule",
    "OuterSettings",
    "ExitCosts",
    "SplitData",
    "Recorded",
    "ExitPlan",
    "plan_from_params",
    "evaluate_plan",
    "fixed_rule",
    "make_objective",
    "Objective",
    "TrialCap",
    "make_storage",
    "optimize",
    "OuterSearchResult",
    "pareto_mask",
    "load_space",
    "latency_costs",
    "verify_end_to_end",
    "plan_outcome",
    "SEARCH_SPACES_DIR",
]

SCHEMES = ("halving", "equal", "weights")
# the settings of a space's partition block (autoexit.partition.PartitionSpace takes these)
PARTITION_KEYS = ("topology", "profile", "destination", "max_partitions", "exits_per_part", "placement")
SELECTIONS = ("ranking", "flags")
SEARCH_SPACES_DIR = Path(os.environ.get("AUTOEXIT_SEARCH_SPACES", Path(__file__).resolve().parents[2] / "search_spaces"))


def _optuna():
    return require("optuna", "search", "the Optuna outer search")


# --------------------------------------------------------------------------- configuration (frozen, validated)


def _pair(v, what: str, cast=float) -> tuple:
    if isinstance(v, Mapping):
        unknown = sorted(set(v) - {"low", "high", "log", "step"})
        if unknown:
            raise AutoExitError(f"{what}: unknown key(s) {', '.join(unknown)}; use low, high (and log)")
        v = (v.get("low"), v.get("high"))
    try:
        lo, hi = (cast(x) for x in v)
    except (TypeError, ValueError):
        raise AutoExitError(f"{what} must be a range [low, high] or {{low: .., high: ..}}, got {v!r}") from None
    if not lo <= hi:
        raise AutoExitError(f"{what}: low {lo} must not exceed high {hi}")
    return lo, hi


def _choices(v, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    v = tuple(str(x) for x in (v or ()))
    bad = [x for x in v if x not in allowed]
    if not v or bad:
        raise AutoExitError(f"{what} must list one or more of {', '.join(allowed)}, got {list(v)}")
    return tuple(dict.fromkeys(v))


def _check_keys(d: Mapping, known: Iterable[str], where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise AutoExitError(f"unknown {where} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class OuterSpace:
    """What the outer search samples (``search_spaces/outer*.yaml`` hold it as data).

    tolerance: range of T in percent (log-uniform when ``tolerance_log``);
    schemes: split schemes to try; weights: range of each per-exit weight for the
    ``weights`` scheme; selection: ``ranking`` (K(S) best subset of size k) and/or
    ``flags`` (an include flag per candidate exit); exits: range of k (clipped to the
    number of candidates); signals: exit scores to try (keys of
    ``autoexit.calibrate.SIGNALS``); partition: for partitioned models, the
    :class:`autoexit.partition.PartitionSpace` settings (topology, max_partitions,
    exits_per_part, placement, destination, profile); searched by
    ``autoexit.partition.optimize_partitioned`` and ``autoexit search --config``.
    """

    tolerance: tuple[float, float] = (0.05, 8.0)
    tolerance_log: bool = True
    schemes: tuple[str, ...] = SCHEMES
    weights: tuple[float, float] = (0.05, 1.0)
    selection: tuple[str, ...] = SELECTIONS
    exits: tuple[int, int] = (1, 12)
    signals: tuple[str, ...] = tuple(SIGNALS)
    partition: Mapping | None = None
    name: str = "outer"

    def __post_init__(self):
        lo, hi = self.tolerance
        check_tolerance(lo)
        check_tolerance(hi)
        if not 0 < self.weights[0] <= self.weights[1]:
            raise AutoExitError(f"split weights range must satisfy 0 < low <= high, got {list(self.weights)}")
        if not 0 <= self.exits[0] <= self.exits[1] or self.exits[1] < 1:
            raise AutoExitError(f"exits range must satisfy 0 <= low <= high and high >= 1, got {list(self.exits)}")
        _choices(self.schemes, SCHEMES, "split schemes")
        _choices(self.selection, SELECTIONS, "exit selection")
        _choices(self.signals, tuple(SIGNALS), "signals")
        if self.partition is not None:
            if not isinstance(self.partition, Mapping):
                raise AutoExitError("the outer space's 'partition' block must be a mapping (topology, max_partitions, "
                                    "exits_per_part, placement, destination, profile) or null")
            unknown = sorted(set(self.partition) - set(PARTITION_KEYS))
            if unknown:
                raise AutoExitError(f"unknown partition setting(s) {', '.join(map(str, unknown))} in the outer space; "
                                    f"valid: {', '.join(PARTITION_KEYS)}")
            if self.partition and "topology" not in self.partition:
                raise AutoExitError("the outer space's partition block needs 'topology' (a topology YAML path, e.g. "
                                    "experiments/topologies/iiot.yaml)")

    @classmethod
    def from_dict(cls, d: Mapping | None, name: str = "outer") -> OuterSpace:
        d = dict(d or {})
        _check_keys(d, ("tolerance", "split_scheme", "exits", "signal", "partition", "name", "description"),
                    "outer space")
        kw: dict[str, Any] = {"name": str(d.get("name", name))}
        if "tolerance" in d:
            t = d["tolerance"]
            kw["tolerance"] = _pair(t, "tolerance")
            if isinstance(t, Mapping) and "log" in t:
                kw["tolerance_log"] = bool(t["log"])
        sch = d.get("split_scheme")
        if sch is not None:
            if isinstance(sch, Mapping):
                _check_keys(sch, ("choices", "weights"), "split_scheme")
                if "choices" in sch:
                    kw["schemes"] = _choices(sch["choices"], SCHEMES, "split_scheme.choices")
                if "weights" in sch:
                    kw["weights"] = _pair(sch["weights"], "split_scheme.weights")
            else:
                kw["schemes"] = _choices(sch, SCHEMES, "split_scheme")
        ex = d.get("exits")
        if ex is not None:
            if not isinstance(ex, Mapping):
                raise AutoExitError("exits must be a mapping with 'selection' and/or 'k'")
            _check_keys(ex, ("selection", "k"), "exits")
            if "selection" in ex:
                kw["selection"] = _choices(ex["selection"], SELECTIONS, "exits.selection")
            if "k" in ex:
                kw["exits"] = _pair(ex["k"], "exits.k", int)
        if "signal" in d:
            kw["signals"] = _choices(d["signal"], tuple(SIGNALS), "signal")
        if d.get("partition"):
            kw["partition"] = dict(d["partition"])
        return cls(**kw)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tolerance": {"low": self.tolerance[0], "high": self.tolerance[1], "log": self.tolerance_log},
            "split_scheme": {"choices": list(self.schemes),
                             "weights": {"low": self.weights[0], "high": self.weights[1]}},
            "exits": {"selection": list(self.selection), "k": {"low": self.exits[0], "high": self.exits[1]}},
            "signal": list(self.signals),
            "partition": dict(self.partition) if self.partition else None,
        }


def load_space(space: str | Path | Mapping | OuterSpace | None = None) -> OuterSpace:
    """An outer space from an :class:`OuterSpace`, a mapping, a YAML path, or a name in ``search_spaces/``.

    ``None`` and ``"outer"`` give the default space (``search_spaces/outer.yaml``,
    or the built-in defaults when the file is not shipped, as in a wheel install).
    """
    if isinstance(space, OuterSpace):
        return space
    if space is None:
        space = "outer"
    if isinstance(space, Mapping):
        return OuterSpace.from_dict(space)
    p = Path(space)
    if not p.suffix:
        cand = SEARCH_SPACES_DIR / f"{p.name}.yaml"
        if cand.is_file():
            p = cand
        elif str(space) == "outer":
            return OuterSpace()
        else:
            names = sorted(x.stem for x in SEARCH_SPACES_DIR.glob("outer*.yaml"))
            raise AutoExitError(f"no outer search space named {space!r}; known: {', '.join(names) or 'outer'} "
                                f"(in {SEARCH_SPACES_DIR}), or give a YAML file path")
    if not p.is_file():
        raise AutoExitError(f"outer search space file {p} does not exist")
    import yaml

    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AutoExitError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(d, Mapping):
        raise AutoExitError(f"{p} must hold a mapping of outer-space settings")
    return OuterSpace.from_dict(d, name=p.stem)


@dataclass(frozen=True)
class Budgets:
    """Hard budgets, set on every trial as Optuna constraints (feasible when value <= 0).

    max_drop: accuracy drop in points on val; max_flops: expected FLOPs per sample;
    max_latency_ms: expected latency per sample (needs latency costs); max_cost_fraction:
    expected cost relative to the backbone (0.5 = half); max_head_param_bytes: parameter
    memory of the kept heads, in bytes.
    """

    max_drop: float | None = None
    max_flops: float | None = None
    max_latency_ms: float | None = None
    max_cost_fraction: float | None = None
    max_head_param_bytes: float | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise AutoExitError(f"budget {f.name} must be a non-negative number, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> Budgets:
        d = dict(d or {})
        _check_keys(d, [f.name for f in fields(cls)], "budgets")
        return cls(**{k: (None if v is None else float(v)) for k, v in d.items()})

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


PICK_RULES = ("min_cost", "min_drop", "certified")


@dataclass(frozen=True)
class PickRule:
    """How the emitted configuration is chosen from the feasible Pareto front.

    ``min_cost``: the cheapest point whose val drop (plus ``z`` standard errors, when
    ``z`` > 0) is at most ``max_drop`` points; ``min_drop``: the most accurate point
    whose val cost is at most ``max_cost_fraction`` of the backbone's. Ties go to the
    lower drop, then the lower cost, then the earlier trial. Both choose on the val
    split the trials were scored on: no guarantee.

    ``certified``: the trials are scored on the *train* split (thresholds, exits and
    the front all come from it) and val certifies the front afterwards with
    Learn-then-Test: the train front in (cost, disagreement) is tested most costly point
    first (fixed-sequence, at level ``delta``) against ``max_drop``, and the cheapest certified point on val is
    emitted (the backbone alone when none is). With probability >= 1 - ``delta`` over the
    val data, the emitted configuration's drop on new data from the same distribution
    is then <= ``max_drop`` points: the guarantee of ``autoexit.policies``. The drop is
    the disagreement with the backbone (label-free, exact binomial test) or, with
    ``accuracy: gt`` (or ``auto`` with labels), the labelled accuracy drop
    (Waudby-Smith--Ramdas test).
    """

    rule: str = "min_cost"
    max_drop: float | None = 1.0
    max_cost_fraction: float | None = None
    z: float = 0.0
    delta: float = 0.1

    def __post_init__(self):
        if self.rule not in PICK_RULES:
            raise AutoExitError(f"pick rule must be one of {', '.join(PICK_RULES)}, got {self.rule!r}")
        if self.rule == "min_drop" and self.max_cost_fraction is None:
            raise AutoExitError("pick rule 'min_drop' needs max_cost_fraction (e.g. 0.6 = 60 % of the backbone)")
        if self.z < 0:
            raise AutoExitError(f"pick z must be >= 0, got {self.z}")
        if self.rule == "certified":
            if self.max_drop is None or not (isinstance(self.max_drop, (int, float)) and 0 < self.max_drop < 100):
                raise AutoExitError(f"pick rule 'certified' needs max_drop, the guaranteed drop in points "
                                    f"(0 < max_drop < 100, e.g. 1.0), got {self.max_drop!r}")
            if self.z:
                raise AutoExitError("pick z is a margin for min_cost; the certified pick's test already accounts "
                                    "for the val sample's noise: drop z")
            if self.max_cost_fraction is not None:
                raise AutoExitError("pick max_cost_fraction belongs to min_drop; the certified pick emits the "
                                    "cheapest certified point: drop max_cost_fraction or use a budget")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise AutoExitError(f"pick delta must be in (0, 1) (the allowed probability of breaking the certified "
                                f"budget, e.g. 0.1), got {self.delta!r}")

    @property
    def certified(self) -> bool:
        return self.rule == "certified"

    @classmethod
    def from_dict(cls, d: Mapping | None) -> PickRule:
        d = dict(d or {})
        _check_keys(d, [f.name for f in fields(cls)], "pick")
        return cls(**d)

    def describe(self) -> str:
        if self.certified:
            return (f"certified: drop <= {self.max_drop:g} % with probability >= {1 - self.delta:.0%} "
                    "(trials on train, Learn-then-Test on val)")
        if self.rule == "min_cost":
            z = f" + {self.z:g} s.e." if self.z else ""
            lim = f" with drop{z} <= {self.max_drop:g} %" if self.max_drop is not None else ""
            return f"min cost{lim} (val)"
        return f"min drop with cost <= {100 * self.max_cost_fraction:g} % of the backbone (val)"


@dataclass(frozen=True)
class OuterSettings:
    """How the outer search runs (everything but the space and the data).

    objective: ``multi`` (cost, drop) or ``scalar`` (relative cost + drop_weight x drop);
    cost: ``flops`` or ``latency`` (needs latency costs in the recorded data);
    accuracy: ``auto`` (GT drop when labels exist, else disagreement), ``gt``, ``agreement``;
    basis: threshold budget basis (see autoexit.calibrate); sampler: ``tpe``, ``nsga2``,
    ``random``; n_trials: trials per ``optimize`` call when no cap is given;
    latency_stat: with cost ``latency``, the statistic of each timing the segment profile is built from
    (``min_ms``, the default: each timing's fastest group, steadier on a busy device; ``median_ms``,
    ``mean_ms``);
    exhaustive_limit: exact K(S) ranking up to this many candidate exits, greedy beyond;
    baseline_tolerance: enqueue the fixed rule (T/2^n at this T, K(S) best subset) as the
    first trial of a fresh study (None: don't); heartbeat_interval / grace_period /
    max_retry: the RDB heartbeat that fails trials of killed workers and retries them.
    """

    objective: str = "multi"
    cost: str = "flops"
    latency_stat: str = "min_ms"
    accuracy: str = "auto"
    basis: str = "total"
    drop_weight: float = 0.1
    budgets: Budgets = Budgets()
    pick: PickRule = PickRule()
    sampler: str = "tpe"
    seed: int | None = 0
    n_trials: int = 200
    exhaustive_limit: int = 12
    baseline_tolerance: float | None = 1.0
    heartbeat_interval: int = 10
    grace_period: int | None = None
    max_retry: int = 3

    def __post_init__(self):
        if self.objective not in ("multi", "scalar"):
            raise AutoExitError(f"objective must be 'multi' or 'scalar', got {self.objective!r}")
        if self.cost not in ("flops", "latency"):
            raise AutoExitError(f"cost must be 'flops' or 'latency', got {self.cost!r}")
        from ..cost import check_latency_stat

        check_latency_stat(self.latency_stat, "latency_stat")
        if self.accuracy not in ("auto", "gt", "agreement"):
            raise AutoExitError(f"accuracy must be 'auto', 'gt' or 'agreement', got {self.accuracy!r}")
        if self.basis not in ("total", "reaching"):
            raise AutoExitError(f"basis must be 'total' or 'reaching', got {self.basis!r}")
        if self.sampler not in ("tpe", "nsga2", "random"):
            raise AutoExitError(f"sampler must be tpe, nsga2 or random (or pass your own), got {self.sampler!r}")
        if self.n_trials < 1:
            raise AutoExitError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.heartbeat_interval < 1:
            raise AutoExitError(f"heartbeat_interval must be a whole number of seconds >= 1, got {self.heartbeat_interval}")
        if self.baseline_tolerance is not None:
            check_tolerance(self.baseline_tolerance)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> OuterSettings:
        d = dict(d or {})
        _check_keys(d, [f.name for f in fields(cls)], "outer search")
        if not isinstance(d.get("budgets", Budgets()), Budgets):
            d["budgets"] = Budgets.from_dict(d["budgets"])
        if not isinstance(d.get("pick", PickRule()), PickRule):
            d["pick"] = PickRule.from_dict(d["pick"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- what a trial reads


@dataclass
class SplitData:
    """Recorded predictions on one split: per exit (rows, backbone order) and per sample (columns)."""

    pred: np.ndarray  # [E, n] class predicted by each exit head
    scores: dict[str, np.ndarray]  # signal -> [E, n] exit score after temperature scaling (float32, as the model)
    backbone_pred: np.ndarray  # [n]
    labels: np.ndarray | None = None  # [n] or None when unknown

    @property
    def n(self) -> int:
        return int(self.backbone_pred.shape[0])

    def take(self, idx) -> SplitData:
        """The samples ``idx`` of this split (e.g. one calibration draw of a re-certification)."""
        return SplitData(self.pred[:, idx], {k: v[:, idx] for k, v in self.scores.items()}, self.backbone_pred[idx],
                         None if self.labels is None else self.labels[idx])

    @property
    def agree(self) -> np.ndarray:
        if not hasattr(self, "_agree"):
            self._agree = self.pred == self.backbone_pred[None, :]
        return self._agree


@dataclass
class Recorded:
    """Everything an outer-search trial reads: recorded predictions and per-exit costs. No model, no torch.

    Build it from the core pipeline's result (:meth:`from_result`) or from a
    recording and trained heads (:meth:`from_heads`); :meth:`save` / :meth:`load`
    move it between machines (an ``.npz``), so distributed workers evaluate trials
    on identical numbers (:attr:`fingerprint` is checked against the study's).
    """

    names: list[str]
    val: SplitData
    test: SplitData | None
    flops: ExitCosts
    head_param_bytes: np.ndarray
    temperatures: np.ndarray
    latency: ExitCosts | None = None
    info: dict = field(default_factory=dict)
    fit: SplitData | None = None  # the train split, for the certified pick (trials scored here, val certifies)
    source: Any = field(default=None, repr=False, compare=False)  # the EnableResult it came from, if any

    def __post_init__(self):
        e = len(self.names)
        for split in (self.val, self.test, self.fit):
            if split is None:
                continue
            if split.pred.shape[0] != e or any(s.shape != split.pred.shape for s in split.scores.values()):
                raise AutoExitError(f"recorded predictions must have one row per exit ({e}); got "
                                    f"{split.pred.shape} and scores {[s.shape for s in split.scores.values()]}")
        if self.flops.c1.shape != (e,):
            raise AutoExitError(f"FLOPs costs must have one entry per exit ({e}), got {self.flops.c1.shape}")
        if self.latency is not None and self.latency.c1.shape != (e,):
            raise AutoExitError(f"latency costs must have one entry per exit ({e}), got {self.latency.c1.shape}")
        self.head_param_bytes = np.asarray(self.head_param_bytes, dtype=np.float64)
        self.temperatures = np.asarray(self.temperatures, dtype=np.float64)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_result(cls, result: EnableResult, signals: Sequence[str] = tuple(SIGNALS),
                    latency: ExitCosts | None = None, fit: bool = False) -> Recorded:
        """From ``autoexit.enable`` / ``pipeline.assemble``: its val/test predictions, temperatures and costs.

        fit: also record the train split, with every temperature fitted there (not the result's), as the
        certified pick (``PickRule(rule="certified")``) needs: its trials never read val. When the result was
        cross-fitted (``EnableConfig(cross_fit=K)``), the train split is its out-of-fold predictions.
        """
        if fit:
            folds = int(getattr(result.config, "cross_fit", 0) or 0) if result.fit_predictions is not None else 0
            return cls.from_heads(result.backbone, result.recording, result.heads, signals, latency, fit=True,
                                  fit_predictions=result.fit_predictions, folds=folds, _source=result)
        temps = [float(result.temperatures[n]) for n in result.val.names]
        rec = cls._build(result.val, result.test, temps, result.heads, float(result.backbone.total_flops), signals,
                         latency, _info(result.backbone, result.recording))
        rec.source = result
        return rec

    @classmethod
    def from_heads(cls, backbone, recording, heads: Mapping, signals: Sequence[str] = tuple(SIGNALS),
                   latency: ExitCosts | None = None, fit: bool = False, fit_predictions=None, folds: int = 0,
                   _source=None) -> Recorded:
        """From a traced backbone, its recording and trained heads (temperatures fitted on val here; with
        ``fit``, on the train split, which is recorded too: what the certified pick needs).

        fit_predictions: the train split's ``ExitPredictions`` to record instead of the heads' own, namely
        out-of-fold ones (``autoexit.pipeline.out_of_fold_predictions``, ``folds`` folds): trials and
        temperatures then see the heads as new data will, not as the data they were trained on.
        """
        from ..calibrate import calibrate_temperatures
        from ..pipeline import predictions_for_splits

        if fit_predictions is not None:
            if not fit:
                raise AutoExitError("fit_predictions are the train split of the certified pick; pass fit=True too")
            if int(folds) < 2:
                raise AutoExitError(f"fit_predictions are out-of-fold predictions: pass the number of folds they were "
                                    f"made with (folds >= 2), got folds={folds}")
            names = [p.name for p in recording.points if p.name in heads]
            n = len(recording.logits("train"))
            if list(fit_predictions.names) != names or tuple(fit_predictions.logits.shape[:2]) != (len(names), n):
                raise AutoExitError(
                    f"fit_predictions must hold the train split's logits of exits {names} ({n} samples), got "
                    f"{list(fit_predictions.names)} with shape {tuple(fit_predictions.logits.shape)}; build "
                    "them with autoexit.pipeline.out_of_fold_predictions on this recording and these heads")
        splits = ("val", "test", "train") if fit and fit_predictions is None else ("val", "test")
        preds = predictions_for_splits(recording, heads, splits, "train" if fit else "val")
        if fit_predictions is not None:
            preds["train"] = fit_predictions
        tsplit = "train" if fit else "val"
        temps = calibrate_temperatures(preds[tsplit]).tolist()
        info = {**_info(backbone, recording), "temperature_split": tsplit}
        if fit:
            info["fit_predictions"] = f"out-of-fold ({folds} folds)" if fit_predictions is not None else "in-sample"
        rec = cls._build(preds["val"], preds["test"], temps, heads, float(backbone.total_flops), signals, latency,
                         info, fit=preds["train"] if fit else None)
        rec.source = _source
        return rec

    @classmethod
    def _build(cls, val, test, temps, heads, base_flops, signals, latency, info, fit=None) -> Recorded:
        signals = _choices(signals, tuple(SIGNALS), "signals")
        names = list(val.names)

        def split(p) -> SplitData:
            return SplitData(
                pred=p.pred().numpy().astype(np.int64),
                scores={s: p.scores(temps, s).numpy().astype(np.float32) for s in signals},
                backbone_pred=p.backbone_pred.numpy().astype(np.int64),
                labels=None if p.labels is None else p.labels.numpy().astype(np.int64),
            )

        flops = ExitCosts(np.array([heads[n].flops for n in names], dtype=float),
                          np.array([heads[n].point.flops_before for n in names], dtype=float), base_flops,
                          "flops", "torch FlopCounterMode (2 per multiply-add)")
        return cls(names, split(val), split(test) if test is not None else None, flops,
                   np.array([heads[n].param_bytes for n in names], dtype=float), np.asarray(temps), latency, info,
                   split(fit) if fit is not None else None)

    def with_latency(self, latency: ExitCosts) -> Recorded:
        return replace(self, latency=latency)

    def search_view(self) -> Recorded:
        """What the certified pick's trials read: the train split in the place of val, and no test split.

        Trials, thresholds and the Pareto front then come from the train split only, so that val, which
        certifies the front afterwards (Learn-then-Test), is read by nothing the search chose.
        """
        if self.fit is None:
            raise AutoExitError("the certified pick scores trials on the train split, which these recorded "
                                "predictions lack; build them with Recorded.from_result(result, fit=True) (or "
                                "from_heads(..., fit=True)), or use pick rule min_cost")
        view = replace(self, val=self.fit, test=None, fit=None,
                       info={**self.info, "search_split": "train"})
        view.source = self.source
        return view

    # ------------------------------------------------------------------ properties
    @property
    def has_labels(self) -> bool:
        return self.val.labels is not None

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(self.val.scores)

    def costs(self, kind: str) -> ExitCosts:
        if kind == "latency":
            if self.latency is None:
                raise AutoExitError("cost 'latency' needs measured latency costs: build Recorded with latency="
                                    "latency_costs(...) or configure an evaluator; or use cost: flops")
            return self.latency
        return self.flops

    @property
    def fingerprint(self) -> str:
        """SHA-256 prefix of every array a trial reads (val predictions, scores, costs)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.names).encode())
        for arr in (self.val.pred, self.val.backbone_pred, self.flops.c1, self.flops.before, self.head_param_bytes):
            h.update(np.ascontiguousarray(arr).tobytes())
        for s in sorted(self.val.scores):
            h.update(s.encode())
            h.update(np.ascontiguousarray(self.val.scores[s]).tobytes())
        if self.val.labels is not None:
            h.update(np.ascontiguousarray(self.val.labels).tobytes())
        if self.latency is not None:
            h.update(np.ascontiguousarray(self.latency.c1).tobytes())
            h.update(np.ascontiguousarray(self.latency.before).tobytes())
            if self.latency.fixed:  # (only when set: files recorded before it existed keep their fingerprint;
                # the tag: since 2026-12-01 it is paid past the first exit only, so earlier profiles do not match)
                h.update(b"fixed past the first exit:" + repr(self.latency.fixed).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (atomically) that :meth:`load` reads back; arrays and JSON only, no pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for sname, sp in (("val", self.val), ("test", self.test), ("fit", self.fit)):
            if sp is None:
                continue
            arrays[f"{sname}_pred"] = sp.pred
            arrays[f"{sname}_backbone_pred"] = sp.backbone_pred
            if sp.labels is not None:
                arrays[f"{sname}_labels"] = sp.labels
            for sig, a in sp.scores.items():
                arrays[f"{sname}_score_{sig}"] = a
        meta = {"version": 1, "names": self.names, "flops": self.flops.to_dict(),
                "latency": self.latency.to_dict() if self.latency else None,
                "head_param_bytes": self.head_param_bytes.tolist(), "temperatures": self.temperatures.tolist(),
                "info": self.info, "signals": list(self.signals)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recorded:
        path = Path(path)
        if not path.is_file():
            raise AutoExitError(f"no recorded predictions at {path}; `autoexit search outer` writes "
                                "<run_dir>/recorded.npz, copy it to this machine")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(z["meta"]).decode())
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(f"{path} is not a recorded-predictions file ({str(exc).splitlines()[0]})") from None

        def split(s: str) -> SplitData | None:
            if f"{s}_pred" not in z:
                return None
            return SplitData(z[f"{s}_pred"], {sig: z[f"{s}_score_{sig}"] for sig in meta["signals"]},
                             z[f"{s}_backbone_pred"], z[f"{s}_labels"] if f"{s}_labels" in z else None)

        lat = meta.get("latency")
        return cls(list(meta["names"]), split("val"), split("test"), ExitCosts.from_dict(meta["flops"]),
                   np.asarray(meta["head_param_bytes"]), np.asarray(meta["temperatures"]),
                   ExitCosts.from_dict(lat) if lat else None, dict(meta.get("info", {})), split("fit"))


def _info(backbone, recording) -> dict:
    return {"backbone_class": type(backbone.model).__name__, "backbone_hash": backbone.hash,
            "data_identity": recording.data_identity, "recording": Path(recording.path).name, "n": recording.n}


def latency_costs(result: EnableResult, evaluator=None, batch_size: int = 1, settings=None,
                  calibrate: bool = True, samples: int = 64, rounds: int = 3, stat: str = "min_ms",
                  round_stat: str | None = None) -> ExitCosts:
    """Per-exit latency costs (ms per sample) of ``result``'s candidate exits, measured by a device evaluator
    (``autoexit.evaluator``; local CPU by default): :func:`autoexit.cost.exit_latency_costs` on the result's
    backbone, heads, temperatures and val inputs, as an :class:`ExitCosts` in ``ms``. See that function for
    the segment profile, its calibration (``calibrate``, ``samples``), the interleaved ``rounds``, ``stat`` and
    ``round_stat``.
    """
    from ..cost import exit_latency_costs

    names = list(result.val.names)
    try:
        x = result.recording.inputs("val")
    except AutoExitError:
        x = None  # the recording kept no inputs: the segment profile alone
    d = exit_latency_costs(result.backbone, [result.heads[n] for n in names],
                           [float(result.temperatures[n]) for n in names], x, evaluator, batch_size=batch_size,
                           settings=settings, calibrate=calibrate, samples=samples, rounds=rounds, stat=stat,
                           round_stat=round_stat)
    return ExitCosts.from_dict(d)


def plan_outcome(recorded: Recorded, plan: ExitPlan, costs: ExitCosts, n: int | None = None, split: str = "test"):
    """Which exit each of the first ``n`` samples of ``split`` takes under ``plan``, and its cost in ``costs``
    (:func:`autoexit.subset.simulate_exits` on the recorded predictions)."""
    sp = recorded.test if split == "test" else recorded.val
    idx = [recorded.names.index(k) for k in plan.kept]
    cut = slice(None, n)
    return simulate_exits(sp.scores[plan.signal][idx][:, cut], sp.pred[idx][:, cut], sp.backbone_pred[cut],
                          np.asarray(plan.thresholds, dtype=np.float64), costs.c1[idx], costs.before[idx], costs.base,
                          costs.fixed)


def verify_end_to_end(result: EnableResult, recorded: Recorded, evaluator=None, samples: int = 256,
                      settings=None) -> dict:
    """Time the chosen configuration end to end on the evaluator and set it beside the prediction.

    ``result``: the applied plan (:meth:`OuterResult.apply`); ``recorded``: its recorded
    predictions with the latency costs the search used. The TorchScript multi-exit model is
    timed at batch 1 over the first ``samples`` test inputs (real early exits, so the exit
    mix is the deployed one); the prediction is the segment profile x the exits those same
    inputs take in the recorded predictions. The backbone is timed on the same device. With a
    calibrated profile, the no-exit anchor is timed again too: ``device_drift`` is its time now over
    its time when the profile was taken, and ``relative_error_drift_corrected`` the prediction's error
    once the device's change of speed is taken out. The record goes to
    ``result.extra["device_latency"]`` (the manifest's ``device_latency``).
    """
    from ..evaluator import LocalEvaluator
    from ..model import to_torchscript

    if recorded.latency is None or recorded.test is None:
        raise AutoExitError("verifying the configuration end to end needs latency costs and a test split "
                            "(build them with latency_costs(...) and Recorded.with_latency)")
    if "outer_plan" not in result.extra:
        raise AutoExitError("verify_end_to_end needs the result of OuterResult.apply(...) (it names the plan)")
    ev = evaluator if evaluator is not None else LocalEvaluator()
    plan = ExitPlan.from_dict(result.extra["outer_plan"])
    x = result.recording.inputs("test")[: int(samples)]
    n = int(len(x))
    if n < 1:
        raise AutoExitError("no test inputs to time the configuration on (the recording kept no inputs)")
    lat, k = recorded.latency, len(plan.kept)
    sim = plan_outcome(recorded, plan, lat, n)
    scripted = to_torchscript(result.model, result.backbone.example_input)
    m = ev.measure_end_to_end(scripted, x, batch_sizes=(1,), settings=settings).at(1)
    bb = ev.measure(result.backbone.model.eval(), x[:1], batch_sizes=(1,), settings=settings).at(1)
    counts = [0] * (k + 1)
    for e, v in (m.exit_counts or {}).items():
        counts[int(e)] = int(v)
    predicted = float(sim.flops.mean())
    cal = lat.calibration or {}
    stat = str(cal.get("stat", "min_ms"))  # measured as the profile was: fastest group (default) or median
    measured, bb_ms = float(getattr(m, stat)), float(getattr(bb, stat))
    out = {"device": str(ev.device_key), "batch_size": 1, "samples": n, "predicted_ms": predicted, "stat": stat,
           "measured_ms": measured, "relative_error": (predicted - measured) / measured,
           "backbone_ms": bb_ms, "ratio_to_backbone": measured / bb_ms,
           "exit_counts": counts, "predicted_exit_counts": np.bincount(sim.exit_index, minlength=k + 1).tolist(),
           "profile_source": lat.source}
    if "no_exit_ms" in cal and cal.get("samples"):
        # the device's change of speed since the profile: the no-exit anchor again, now (a new seed: not the
        # cached timing). Scaling the prediction by it separates prediction error from drift.
        from ..cost import reseeded
        from ..model import scripted_backbone

        xv = result.recording.inputs("val")[: int(cal["samples"])]
        now = float(getattr(ev.measure_end_to_end(scripted_backbone(result.backbone), xv, batch_sizes=(1,),
                                          settings=reseeded(ev, settings, 7919)).at(1), stat))
        drift = now / float(cal["no_exit_ms"])
        out["device_drift"] = drift
        out["relative_error_drift_corrected"] = (predicted * drift - out["measured_ms"]) / out["measured_ms"]
    result.extra["device_latency"] = out
    return out


# --------------------------------------------------------------------------- a configuration and its numbers


@dataclass(frozen=True)
class ExitPlan:
    """One outer configuration: kept exits (backbone order), their thresholds, and how they were derived."""

    tolerance: float
    scheme: str | tuple[float, ...]
    selection: str
    signal: str
    kept: tuple[str, ...]
    thresholds: tuple[float, ...]
    k: int | None = None
    step: float = 1.0  # < 1: a safer step of the plan (certified pick): each exit lets out this share of its inputs

    def to_dict(self) -> dict:
        d = {"tolerance": self.tolerance, "scheme": list(self.scheme) if isinstance(self.scheme, tuple)
             else self.scheme, "selection": self.selection, "signal": self.signal, "kept": list(self.kept),
             "thresholds": [_jsonable_float(t) for t in self.thresholds], "k": self.k}
        if self.step != 1.0:
            d["step"] = self.step
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ExitPlan:
        sch = d["scheme"]
        return cls(float(d["tolerance"]), tuple(float(x) for x in sch) if isinstance(sch, list) else str(sch),
                   str(d["selection"]), str(d["signal"]), tuple(d["kept"]),
                   tuple(float(t) for t in d["thresholds"]), d.get("k"), float(d.get("step", 1.0)))

    def describe(self) -> str:
        sch = "weights " + "/".join(f"{w:.2f}" for w in self.scheme) if isinstance(self.scheme, tuple) else self.scheme
        step = f" (step: {self.step:.3g} of its exits on train)" if self.step != 1.0 else ""
        return (f"T={self.tolerance:.3g} %, {sch}, {self.selection}, {self.signal}: "
                f"{', '.join(self.kept) or 'no exit'}{step}")


def _jsonable_float(x: float) -> float | str:
    return float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _rank_scheme(scheme: str) -> str:
    return "equal" if scheme == "equal" else "halving"


def plan_from_params(recorded: Recorded, params: Mapping[str, Any], settings: OuterSettings = OuterSettings(),
                     space: OuterSpace | None = None) -> ExitPlan:
    """The configuration a parameter set means: kept exits and thresholds derived on val.

    params: ``tolerance``, ``scheme``, ``selection``, ``signal``, ``k`` (ranking),
    ``include:<point>`` (flags), ``weight_<j>`` (weights scheme, j-th kept exit).
    Missing categorical params take the space's only choice.
    """
    space = space or OuterSpace()
    names = recorded.names
    t = float(params["tolerance"])
    scheme = params.get("scheme", space.schemes[0])
    selection = params.get("selection", space.selection[0])
    signal = params.get("signal", space.signals[0])
    if signal not in recorded.val.scores:
        raise AutoExitError(f"signal {signal!r} was not recorded; recorded: {', '.join(recorded.signals)}")
    scores = recorded.val.scores[signal]
    agree = recorded.val.agree
    costs = recorded.costs(settings.cost)
    k = None
    if selection == "ranking":
        k = int(params["k"])
        k = max(0, min(k, len(names)))
        sub = best_subset(scores, agree, costs.c1, costs.c2, t, _rank_scheme(scheme), settings.basis, names,
                          costs.base, settings.exhaustive_limit, size=k)
        idx = list(sub.indices)
    else:
        idx = [i for i, n in enumerate(names) if _truthy(params.get(f"include:{n}", False))]
    split: str | tuple[float, ...] = scheme
    if scheme == "weights":
        split = tuple(float(params.get(f"weight_{j}", 1.0)) for j in range(len(idx)))
    if idx:
        thr = assign_thresholds(scores[idx], agree[idx], t, split, [names[i] for i in idx], settings.basis).thresholds
    else:
        thr = np.zeros(0)
    return ExitPlan(t, split, selection, signal, tuple(names[i] for i in idx), tuple(float(x) for x in thr), k)


def _truthy(v) -> bool:
    return v in (True, 1, "1", "true", "True", "yes")


def _simulate(recorded: Recorded, plan: ExitPlan, split: str, costs: ExitCosts | None = None):
    sp = {"val": recorded.val, "test": recorded.test, "fit": recorded.fit}[split]
    if sp is None:
        raise AutoExitError(f"no {split} split in the recorded predictions")
    c = costs or recorded.flops
    idx = [recorded.names.index(n) for n in plan.kept]
    out = simulate_exits(sp.scores[plan.signal][idx], sp.pred[idx], sp.backbone_pred,
                         np.asarray(plan.thresholds, dtype=np.float64), c.c1[idx], c.before[idx], c.base, c.fixed)
    return sp, out


def _accuracy_mode(accuracy: str, sp: SplitData) -> str:
    """``agreement`` or ``gt``: what the drop is on ``sp`` (``auto``: the GT drop when it is labelled)."""
    mode = ("gt" if sp.labels is not None else "agreement") if accuracy == "auto" else accuracy
    if mode == "gt" and sp.labels is None:
        raise AutoExitError("accuracy 'gt' needs labelled data; use accuracy: agreement (label-free) or auto")
    return mode


def _losses(sp, pred: np.ndarray, mode: str) -> np.ndarray:
    if mode == "gt":
        return (sp.backbone_pred == sp.labels).astype(np.float64) - (pred == sp.labels).astype(np.float64)
    return (pred != sp.backbone_pred).astype(np.float64)


def evaluate_plan(recorded: Recorded, plan: ExitPlan, split: str = "val", accuracy: str = "auto") -> dict:
    """What ``plan`` does on ``split`` of the recorded predictions: cost, accuracy drop, exit rates."""
    sp, out_f = _simulate(recorded, plan, split)
    idx = [recorded.names.index(n) for n in plan.kept]
    n = sp.n
    m: dict[str, Any] = {
        "n": n,
        "flops": float(out_f.flops.mean()),
        "flops_fraction": float(out_f.flops.mean() / recorded.flops.base),
        "saving": float(1 - out_f.flops.mean() / recorded.flops.base),
        "exit_rates": (out_f.hits / max(n, 1)).tolist(),
        "head_param_bytes": float(recorded.head_param_bytes[idx].sum()),
        "k": len(idx),
    }
    if recorded.latency is not None:
        lat = recorded.latency
        out_l = _simulate(recorded, plan, split, lat)[1]
        m["latency_ms"] = float(out_l.flops.mean())
        m["latency_fraction"] = float(out_l.flops.mean() / lat.base)
    d_dis = _losses(sp, out_f.pred, "agreement")
    m["agreement"] = float((out_f.pred == sp.backbone_pred).mean())
    m["disagreement_pp"] = 100.0 * (1.0 - m["agreement"])
    m["disagreement_se_pp"] = 100.0 * float(d_dis.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    if sp.labels is not None:
        d = _losses(sp, out_f.pred, "gt")
        m.update(accuracy=float((out_f.pred == sp.labels).mean()),
                 backbone_accuracy=float((sp.backbone_pred == sp.labels).mean()), gt_drop_pp=100.0 * float(d.mean()),
                 gt_drop_se_pp=100.0 * float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0)
    else:
        m.update(accuracy=None, backbone_accuracy=None, gt_drop_pp=None, gt_drop_se_pp=None)
    mode = _accuracy_mode(accuracy, sp)
    m["drop_kind"] = mode
    m["drop_pp"] = m["gt_drop_pp"] if mode == "gt" else m["disagreement_pp"]
    m["drop_se_pp"] = m["gt_drop_se_pp"] if mode == "gt" else m["disagreement_se_pp"]
    return m


def fixed_rule(recorded: Recorded, tolerance: float = 1.0, scheme: str = "halving", signal: str = "max_softmax",
               basis: str = "total", exhaustive_limit: int = 16, cost: str = "flops") -> ExitPlan:
    """The core pipeline's choice without search: T split by ``scheme``, the K(S) best subset of any size."""
    costs = recorded.costs(cost)
    scores = recorded.val.scores[signal]
    sub = best_subset(scores, recorded.val.agree, costs.c1, costs.c2, tolerance, scheme, basis, recorded.names,
                      costs.base, exhaustive_limit, size=None)
    return ExitPlan(float(tolerance), scheme, "ranking", signal, tuple(sub.names),
                    tuple(float(x) for x in sub.thresholds.thresholds), len(sub.names))


def subset_result(recorded: Recorded, plan: ExitPlan, basis: str = "total", split: str = "val") -> SubsetResult:
    """The core's :class:`SubsetResult` for a plan (thresholds re-derived on ``split``, the one the plan's trial
    was scored on: val, or ``fit`` for the certified pick), for ``pipeline.assemble``."""
    sp = recorded.fit if split == "fit" else recorded.val
    if sp is None:
        raise AutoExitError(f"no {split} split in the recorded predictions")
    idx = [recorded.names.index(n) for n in plan.kept]
    scores = sp.scores[plan.signal][idx]
    agree = sp.agree[idx]
    if idx:
        thr = assign_thresholds(scores, agree, plan.tolerance, plan.scheme, list(plan.kept), basis)
        if plan.step != 1.0:  # a safer step of the searched plan (certified pick): its thresholds from the plan's
            stepped = _step_thresholds(scores, thr.thresholds, plan.step)
            out = simulate_exits(scores, sp.pred[idx], sp.backbone_pred, stepped, recorded.flops.c1[idx],
                                 recorded.flops.before[idx], recorded.flops.base)
            reached = np.array([(out.exit_index >= i).sum() for i in range(len(idx))])
            wrong = np.array([((out.exit_index == i) & (out.pred != sp.backbone_pred)).sum()
                              for i in range(len(idx))])
            thr = ThresholdResult(list(plan.kept), stepped, thr.budgets, reached, out.hits[:-1], wrong, sp.n, basis)
        if not np.allclose(thr.thresholds, np.asarray(plan.thresholds, dtype=np.float64), rtol=0, atol=1e-9):
            raise AutoExitError("the chosen plan's thresholds cannot be reproduced from these predictions; the heads "
                                "differ from the ones the study was run on (re-run the search on this machine)")
        k = k_score(scores, thr.thresholds, recorded.flops.c1[idx], recorded.flops.c2[idx])
    else:
        thr = ThresholdResult([], np.zeros(0), np.zeros(0), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int),
                              sp.n, basis)
        k = 0.0
    return SubsetResult(list(plan.kept), idx, thr, k, sp.n, recorded.flops.base)


# --------------------------------------------------------------------------- the objective


def _k_bounds(space: OuterSpace, e: int) -> tuple[int, int]:
    hi = min(space.exits[1], e)
    lo = min(space.exits[0], hi)
    return lo, hi


class Objective:
    """``objective(trial)`` for ``study.optimize``: samples a plan, scores it on val, sets constraints and attrs.

    Returns ``(cost, drop)`` (``multi``) or ``relative cost + drop_weight x drop``
    (``scalar``). Cost is expected FLOPs (or ms) per sample; drop is in accuracy
    points. User attrs: ``plan`` (:meth:`ExitPlan.to_dict`), ``val`` (headline
    metrics). Constraints (feasible <= 0): one per active budget, plus ``exits``
    when include flags are searched (k outside the space's range).
    """

    def __init__(self, recorded: Recorded, space: OuterSpace | None = None,
                 settings: OuterSettings = OuterSettings()):
        self.recorded = recorded
        self.space = load_space(space)
        self.settings = settings
        missing = [s for s in self.space.signals if s not in recorded.val.scores]
        if missing:
            raise AutoExitError(f"signal(s) {', '.join(missing)} not recorded; recorded: {', '.join(recorded.signals)}")
        if not recorded.names:
            raise AutoExitError("no candidate exits to search over; train heads at one or more exit points first")
        self.costs = recorded.costs(settings.cost)
        b = settings.budgets
        if b.max_latency_ms is not None and recorded.latency is None:
            raise AutoExitError("budget max_latency_ms needs measured latency costs (configure an evaluator); "
                                "or use max_flops / max_cost_fraction")
        if settings.accuracy == "gt" and not recorded.has_labels:
            raise AutoExitError("accuracy 'gt' needs labelled data; use accuracy: agreement (label-free) or auto")
        self.k_bounds = _k_bounds(self.space, len(recorded.names))
        # the user attr a trial's metrics go under: the split they were measured on
        self.key = "fit" if recorded.info.get("search_split") == "train" else "val"

    @property
    def metric_names(self) -> list[str]:
        if self.settings.objective == "scalar":
            return ["scalarised"]
        cost = "latency_ms" if self.settings.cost == "latency" else "flops"
        return [cost, "drop_pp"]

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.metric_names)

    def suggest(self, trial) -> dict[str, Any]:
        """Sample the parameters (define-by-run: weights and flags appear only when used)."""
        sp = self.space
        p: dict[str, Any] = {"tolerance": trial.suggest_float("tolerance", sp.tolerance[0], sp.tolerance[1],
                                                              log=sp.tolerance_log)}
        p["scheme"] = trial.suggest_categorical("scheme", list(sp.schemes)) if len(sp.schemes) > 1 else sp.schemes[0]
        p["selection"] = (trial.suggest_categorical("selection", list(sp.selection)) if len(sp.selection) > 1
                          else sp.selection[0])
        p["signal"] = trial.suggest_categorical("signal", list(sp.signals)) if len(sp.signals) > 1 else sp.signals[0]
        lo, hi = self.k_bounds
        if p["selection"] == "ranking":
            p["k"] = trial.suggest_int("k", lo, hi) if hi > lo else lo
            n_kept = p["k"]
        else:
            for n in self.recorded.names:
                p[f"include:{n}"] = trial.suggest_categorical(f"include:{n}", [False, True])
            n_kept = sum(bool(p[f"include:{n}"]) for n in self.recorded.names)
        if p["scheme"] == "weights":
            for j in range(min(n_kept, len(self.recorded.names))):
                p[f"weight_{j}"] = trial.suggest_float(f"weight_{j}", sp.weights[0], sp.weights[1])
        return p

    def values(self, m: dict) -> tuple[float, ...]:
        cost = m["latency_ms"] if self.settings.cost == "latency" else m["flops"]
        if self.settings.objective == "scalar":
            return (cost / self.costs.base + self.settings.drop_weight * m["drop_pp"],)
        return (cost, m["drop_pp"])

    def constraints(self, m: dict, plan: ExitPlan) -> dict[str, float]:
        b = self.settings.budgets
        c: dict[str, float] = {}
        if b.max_drop is not None:
            c["max_drop"] = m["drop_pp"] - b.max_drop
        if b.max_flops is not None:
            c["max_flops"] = (m["flops"] - b.max_flops) / self.recorded.flops.base
        if b.max_latency_ms is not None:
            c["max_latency_ms"] = m["latency_ms"] - b.max_latency_ms
        if b.max_cost_fraction is not None:
            frac = m["latency_fraction"] if self.settings.cost == "latency" else m["flops_fraction"]
            c["max_cost_fraction"] = frac - b.max_cost_fraction
        if b.max_head_param_bytes is not None:
            c["max_head_param_bytes"] = (m["head_param_bytes"] - b.max_head_param_bytes) / max(
                b.max_head_param_bytes, 1.0)
        if "flags" in self.space.selection:
            lo, hi = self.k_bounds
            c["exits"] = float(max(m["k"] - hi, lo - m["k"]))
        return c

    def __call__(self, trial) -> tuple[float, ...] | float:
        params = self.suggest(trial)
        plan = plan_from_params(self.recorded, params, self.settings, self.space)
        m = evaluate_plan(self.recorded, plan, "val", self.settings.accuracy)
        for key, v in self.constraints(m, plan).items():
            trial.set_constraint(key, float(v))
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr(self.key, _headline(m))
        vals = self.values(m)
        return vals[0] if len(vals) == 1 else vals


def _headline(m: dict) -> dict:
    keys = ("flops", "flops_fraction", "saving", "latency_ms", "latency_fraction", "drop_pp", "drop_se_pp",
            "drop_kind", "agreement", "accuracy", "k", "head_param_bytes", "exit_rates")
    return {k: m[k] for k in keys if k in m}


def make_objective(recorded: Recorded, space: str | Path | Mapping | OuterSpace | None = None,
                   settings: OuterSettings | Mapping | None = None) -> Objective:
    """The objective for your own loop: ``study.optimize(make_objective(recorded), ...)``.

    Create the study with ``directions=objective.directions`` and call
    ``study.set_metric_names(objective.metric_names)``.
    """
    if settings is None or isinstance(settings, Mapping):
        settings = OuterSettings.from_dict(settings)
    return Objective(recorded, space, settings)


# --------------------------------------------------------------------------- storage, cap, locks


def make_storage(storage: Any = None, run_dir: str | Path | None = None, settings: OuterSettings = OuterSettings()):
    """An Optuna storage: a URL (RDB, with heartbeat + retry of killed workers' trials), a journal file, or as given.

    ``None``: SQLite ``<run_dir>/optuna.db`` (``run_dir`` default ``runs/outer``).
    ``*.log`` / ``*.journal`` paths: a journal file (no heartbeat).
    """
    optuna = _optuna()
    if storage is None:
        d = Path(run_dir or "runs/outer")
        d.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{d.resolve() / 'optuna.db'}"
    if not isinstance(storage, (str, os.PathLike)):
        return storage
    s = str(storage)
    if s.endswith((".log", ".journal")) or s.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(s.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in s:
        raise AutoExitError(f"storage {s!r} is neither a database URL (sqlite:///path.db, postgresql://user@host/db) "
                            "nor a journal file (*.log)")
    s = _pg_driver(s)
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    kw: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat API is marked experimental
        if retry_cls is not None:
            kw["heartbeat_stale_trial_callback"] = retry_cls(max_retry=settings.max_retry)
        else:  # optuna < 4.9
            kw["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=settings.max_retry)
    engine_kwargs: dict[str, Any] = {}
    if s.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
        db = s.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        # workers starting together would race on creating the schema: one at a time
        lock = _lock_for_url(s, "autoexit-storage-init")
        lock.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(
                    s, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period or 3 * settings.heartbeat_interval, **kw)
        finally:
            with contextlib.suppress(Exception):
                lock.release()
            lock.close()
    except ImportError as exc:
        raise AutoExitError(f"cannot open storage {_redact(s)}: {exc}; PostgreSQL needs "
                            "pip install 'autoexit[search]' (psycopg2-binary)") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy errors on a bad URL or unreachable server
        raise AutoExitError(f"cannot open storage {_redact(s)}: {str(exc).splitlines()[0]}") from None


def _pg_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    ``search`` extra ships psycopg2; an explicit ``postgresql+driver://`` is kept."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    import sqlalchemy

    major_minor = tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2])
    default_is_v3 = major_minor >= (2, 1)
    has_v3 = importlib.util.find_spec("psycopg") is not None
    has_v2 = importlib.util.find_spec("psycopg2") is not None
    if default_is_v3 and not has_v3 and has_v2:
        return f"postgresql+psycopg2{sep}{rest}"
    if not default_is_v3 and not has_v2 and has_v3:
        return f"postgresql+psycopg{sep}{rest}"
    return f"postgresql{sep}{rest}"


def _redact(url: str) -> str:
    """A storage URL without its password."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in cred else f"{scheme}://{user}@{host}"
    return url


def _storage_url(storage) -> str | None:
    inner = getattr(storage, "_backend", storage)
    url = getattr(inner, "url", None)
    if url is None:
        backend = getattr(inner, "_backend", None)
        path = getattr(backend, "_file_path", None)
        if path:
            return f"journal:{path}"
    return url


class _ThreadLock:
    _locks: dict[str, threading.Lock] = {}

    def __init__(self, key: str):
        self._lock = self._locks.setdefault(key, threading.Lock())
        self.cross_process = False

    def acquire(self):
        self._lock.acquire()

    def release(self):
        self._lock.release()

    def close(self):
        pass


class _FileLock:
    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self.cross_process = True

    def acquire(self):
        import fcntl

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self):
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _SqlLock:
    """A PostgreSQL advisory lock (or MySQL GET_LOCK) on a dedicated connection: freed if the worker dies."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self._conn = None
        self.cross_process = True
        self._pg = url.startswith("postgres")
        self._num = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)

    def acquire(self):
        import sqlalchemy

        if self._conn is None:
            eng = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = eng.connect().execution_options(isolation_level="AUTOCOMMIT")
        if self._pg:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._num})
        else:
            self._conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"autoexit-{self._num}"})

    def release(self):
        import sqlalchemy

        if self._pg:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._num})
        else:
            self._conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"autoexit-{self._num}"})

    def close(self):
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _lock_for_url(url: str | None, key: str, fallback: str = ""):
    """A lock every worker on ``url`` shares: advisory (PostgreSQL/MySQL), a file beside SQLite/journal files."""
    if url:
        if url.startswith(("postgres", "mysql")):
            return _SqlLock(url, key)
        tag = hashlib.sha256(key.encode()).hexdigest()[:8]
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:" and os.name == "posix":
            return _FileLock(url.split(":///", 1)[1] + f".{tag}.lock")
        if url.startswith("journal:") and os.name == "posix":
            return _FileLock(url.removeprefix("journal:") + f".{tag}.lock")
    return _ThreadLock(f"{fallback or url}:{key}")


def _lock_for(storage, study_name: str):
    return _lock_for_url(_storage_url(storage), f"autoexit-cap:{study_name}", str(id(storage)))


class TrialCap:
    """``MaxTrialsCallback`` made exact across workers: the study ends with exactly ``n_trials`` live trials.

    Optuna's callback stops a worker after a trial finishes, so two workers that
    both see ``n - 1`` trials both start one. Here the check and the creation of the
    next trial happen under one lock shared by all workers (a PostgreSQL advisory
    lock, a file lock beside SQLite/journal files, a thread lock otherwise): the lock
    is taken when a trial ends (this callback, which must run last), held through
    Optuna's ``ask``, and released by the objective wrapper when the new trial starts.
    Live trials are COMPLETE, PRUNED, RUNNING and WAITING ones; a trial failed by the
    heartbeat (worker killed) frees its slot, and its retry (WAITING) is always run.
    """

    def __init__(self, n_trials: int, lock):
        if n_trials < 1:
            raise AutoExitError(f"the trial cap must be >= 1, got {n_trials}")
        self.n_trials = int(n_trials)
        self.lock = lock
        self._held = False

    @property
    def cross_process(self) -> bool:
        return bool(getattr(self.lock, "cross_process", False))

    def acquire(self):
        if not self._held:
            self.lock.acquire()
            self._held = True

    def release(self):
        if self._held:
            self._held = False
            self.lock.release()

    def live(self, study) -> tuple[int, int]:
        """(live trials, waiting trials) of ``study``."""
        optuna = _optuna()
        S = optuna.trial.TrialState
        live = study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING))
        return len(live), sum(t.state == S.WAITING for t in live)

    def admit(self, study) -> bool:
        """Whether another trial may start; call with the lock held."""
        optuna = _optuna()
        get_interval = getattr(study._storage, "get_heartbeat_interval", None)
        if get_interval is not None and get_interval() is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(study)
        live, waiting = self.live(study)
        return waiting > 0 or live < self.n_trials

    def remaining(self, study) -> int:
        live, waiting = self.live(study)
        return max(self.n_trials - live, 0) + waiting

    def __call__(self, study, trial) -> None:
        self.acquire()
        if not self.admit(study):
            study.stop()
            self.release()

    def wrap(self, objective: Callable) -> Callable:
        def wrapped(trial):
            self.release()
            return objective(trial)

        wrapped.__wrapped__ = objective  # type: ignore[attr-defined]
        return wrapped


# --------------------------------------------------------------------------- optimize


def make_sampler(settings: OuterSettings, seed: int | None = None):
    optuna = _optuna()
    seed = settings.seed if seed is None else seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if settings.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=20)


def _baseline_params(objective: Objective, tolerance: float) -> dict | None:
    """Parameters that reproduce the core's fixed rule, when the space can express them."""
    sp = objective.space
    rec = objective.recorded
    lo, hi = sp.tolerance
    if not lo <= tolerance <= hi or "halving" not in sp.schemes or "ranking" not in sp.selection:
        return None
    sig = "max_softmax" if "max_softmax" in sp.signals else sp.signals[0]
    plan = fixed_rule(rec, tolerance, "halving", sig, objective.settings.basis,
                      objective.settings.exhaustive_limit, objective.settings.cost)
    klo, khi = objective.k_bounds
    k = len(plan.kept)
    if not klo <= k <= khi:
        return None
    p: dict[str, Any] = {"tolerance": float(tolerance)}
    if len(sp.schemes) > 1:
        p["scheme"] = "halving"
    if len(sp.selection) > 1:
        p["selection"] = "ranking"
    if len(sp.signals) > 1:
        p["signal"] = sig
    if khi > klo:
        p["k"] = k
    return p


def optimize(
    recorded: Recorded | EnableResult,
    study: optuna.Study | None = None,
    *,
    storage: Any = None,
    study_name: str | None = None,
    sampler: Any = None,
    n_trials: int | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    space: str | Path | Mapping | OuterSpace | None = None,
    settings: OuterSettings | Mapping | None = None,
    callbacks: Sequence[Callable] = (),
    objective: Callable | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    test: bool = True,
) -> OuterSearchResult:
    """Run (or continue) the outer search and pick the configuration to emit.

    recorded: a :class:`Recorded`, or an ``EnableResult`` of the core pipeline
    (``Recorded.from_result`` is applied, with ``fit=True`` for the certified pick). study: your own ``optuna.Study`` (its
    directions must match ``(minimize, minimize)``, or one ``minimize`` with
    ``objective: scalar``); without it one is created or loaded (``load_if_exists``)
    as ``study_name`` on ``storage`` (URL, journal file, storage object; default
    SQLite in ``run_dir``) with ``sampler`` (default TPE, seeded). n_trials: trials
    this call runs (Optuna's meaning); max_trials: total cap of the study across all
    workers and resumes (exact, :class:`TrialCap`); with neither, ``settings.n_trials``
    trials run. callbacks: Optuna callbacks, run after each trial. objective:
    replaces :func:`make_objective`'s (e.g. a wrapper around it). test: evaluate
    the front and the pick on the test split for reporting (never for choosing).

    Returns an :class:`OuterSearchResult`; ``study, plan = optimize(...)`` also works.
    """
    optuna = _optuna()
    if settings is None or isinstance(settings, Mapping):
        settings = OuterSettings.from_dict(settings)
    if not isinstance(recorded, Recorded):  # an EnableResult; the certified pick needs its train split too
        recorded = Recorded.from_result(recorded, fit=settings.pick.certified)
    # the certified pick: trials read the train split only; val certifies the front afterwards
    search = recorded.search_view() if settings.pick.certified else recorded
    obj = Objective(search, space, settings)
    if obj.space.partition and objective is None:
        raise AutoExitError("this outer space has a partition block: search it with "
                            "autoexit.partition.optimize_partitioned(...) or `autoexit search --config`, which also "
                            "sample split points and placement")
    t_start = time.perf_counter()
    created = study is None
    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if study is None:
            st = make_storage(storage, run_dir, settings)
            name = study_name or "autoexit-outer"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study = optuna.create_study(storage=st, study_name=name, directions=obj.directions,
                                            sampler=sampler or make_sampler(settings), load_if_exists=True)
        elif sampler is not None:
            study.sampler = sampler
        _check_study(study, obj, search)
    finally:
        optuna.logging.set_verbosity(old_verbosity)
    if max_trials is None and n_trials is None:
        n_trials = settings.n_trials
    cap = TrialCap(max_trials, _lock_for(study._storage, study.study_name)) if max_trials is not None else None
    if created and sampler is None and settings.seed is not None:
        # a resumed study continues with a sampler seeded by how far it got, so resumes do not repeat samples
        with contextlib.suppress(Exception):
            done = len(study.get_trials(deepcopy=False))
            if done:
                study.sampler = make_sampler(settings, settings.seed + done)
    func = objective or obj
    ran: list[int] = []
    cbs = [*callbacks, lambda _s, t: ran.append(t.number)]
    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            if cap is None:
                _enqueue_baseline(study, obj)
                study.optimize(func, n_trials=n_trials, timeout=timeout, callbacks=cbs,
                               show_progress_bar=progress and n_trials is not None)
            else:
                cap.acquire()
                try:
                    _enqueue_baseline(study, obj)
                    if cap.admit(study):
                        budget = cap.remaining(study)
                        if n_trials is not None:
                            budget = min(budget, n_trials)
                        study.optimize(cap.wrap(func), n_trials=budget, timeout=timeout, callbacks=[*cbs, cap],
                                       show_progress_bar=progress)
                finally:
                    cap.release()
                    cap.lock.close()
    finally:
        optuna.logging.set_verbosity(old_verbosity)
    t_opt = time.perf_counter() - t0
    res = OuterSearchResult.from_study(study, recorded, obj, test=test, cost_of=getattr(objective, "val_cost", None))
    res.timings.update({"optimize_s": t_opt, "total_s": time.perf_counter() - t_start,
                        "trials_this_call": len(ran), "trial_numbers": ran,
                        "trials_per_s": len(ran) / t_opt if t_opt > 0 and ran else None})
    return res


def _enqueue_baseline(study, obj: Objective) -> None:
    tol = obj.settings.baseline_tolerance
    if tol is None or study.get_trials(deepcopy=False):
        return
    p = _baseline_params(obj, tol)
    if p is not None:
        study.enqueue_trial(p, user_attrs={"baseline": f"fixed rule: T/2^n at T={tol:g} %, K(S) best subset"})


def _check_study(study, obj: Objective, recorded: Recorded) -> None:
    want = obj.directions
    have = [d.name.lower() for d in study.directions]
    if have != want:
        raise AutoExitError(
            f"study {study.study_name!r} optimizes {have} but this outer search needs {want} "
            f"(objective: {obj.settings.objective}); create the study with directions={want} or use another name")
    fp = recorded.fingerprint
    attrs = study.user_attrs
    split = recorded.info.get("search_split", "val")
    old_split = attrs.get("autoexit:search_split", "val") if "autoexit:recorded" in attrs else split
    if old_split != split:
        raise AutoExitError(
            f"study {study.study_name!r} scored its trials on the {old_split} split, but this pick "
            f"({obj.settings.pick.rule}) needs them scored on {split}; use a new study name (--study-name)")
    source = recorded.info.get("fit_predictions", "in-sample")
    old_source = attrs.get("autoexit:fit_predictions", "in-sample") if "autoexit:recorded" in attrs else source
    if split == "train" and old_source != source:
        raise AutoExitError(
            f"study {study.study_name!r} scored its trials on {old_source} train predictions, these are {source}; "
            "set the same cross_fit as the study's first run, or use a new study name (--study-name)")
    old = attrs.get("autoexit:recorded")
    if old is not None and old != fp:
        raise AutoExitError(
            f"study {study.study_name!r} was run on other recorded predictions (fingerprint {old}, these are {fp}); "
            "give every worker the same <run_dir>/recorded.npz (--recorded) or use a new --study-name")
    if old is None:
        study.set_user_attr("autoexit:recorded", fp)
        study.set_user_attr("autoexit:space", obj.space.to_dict())
        study.set_user_attr("autoexit:settings", json.loads(json.dumps(obj.settings.to_dict(), default=str)))
        study.set_user_attr("autoexit:candidates", list(recorded.names))
        if split != "val":
            study.set_user_attr("autoexit:search_split", split)
            if source != "in-sample":
                study.set_user_attr("autoexit:fit_predictions", source)
    if not study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.set_metric_names(obj.metric_names)


# --------------------------------------------------------------------------- the front and the pick


def pareto_mask(costs: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """Non-dominated points when minimising both (duplicates of a front point are kept)."""
    c = np.asarray(costs, dtype=float)
    d = np.asarray(drops, dtype=float)
    n = len(c)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dom = (c <= c[i]) & (d <= d[i]) & ((c < c[i]) | (d < d[i]))
        keep[i] = not dom.any()
    return keep


def _feasible(t) -> bool:
    return all(v <= 0 for v in t.constraints.values())


@dataclass
class OuterSearchResult:
    """The study, its feasible Pareto front (on the split the trials were scored on), the pick, its val
    numbers (and certificate, for the certified pick) and its held-out test numbers.

    ``chosen_trial`` is None when the certified pick certified no front point: ``chosen`` then keeps no exit
    (the backbone alone)."""

    study: Any
    chosen: ExitPlan
    chosen_trial: Any
    front: list
    val: dict
    test: dict | None
    recorded: Recorded
    settings: OuterSettings
    space: OuterSpace
    baseline: dict | None = None
    front_rows: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    certificate: dict | None = None  # the certified pick's Learn-then-Test record (None for the other rules)
    pick: PickRule | None = None  # the rule the pick was made by (default: settings.pick)

    def __post_init__(self):
        if self.pick is None:
            self.pick = self.settings.pick

    @property
    def search_key(self) -> str:
        """The split the trials were scored on, as their user attr is named: ``val``, or ``fit`` (train)."""
        return "fit" if self.pick.certified else "val"

    def __iter__(self):
        yield self.study
        yield self.chosen

    @classmethod
    def from_study(cls, study, recorded: Recorded, obj: Objective | None = None, test: bool = True,
                   pick: PickRule | None = None, cost_of: Callable | None = None) -> OuterSearchResult:
        """The front and the pick of ``study``'s completed trials (see :func:`optimize`). ``cost_of(trial, plan)``:
        a setting's cost on val for the certified pick when it is not the recorded per-exit one (partitioned
        searches pass the partitioned latency; :func:`certify_front`)."""
        optuna = _optuna()
        # without an objective: the settings the study was run with (accuracy, cost, basis), as it stored them
        settings = obj.settings if obj is not None else OuterSettings.from_dict(
            study.user_attrs.get("autoexit:settings") or {})
        pick = pick or settings.pick
        # what the trials read: the train split for the certified pick (an error says how to record it)
        search = recorded.search_view() if pick.certified else recorded
        if obj is None:
            obj = Objective(search, OuterSpace.from_dict(study.user_attrs.get("autoexit:space")), settings)
        key = "fit" if pick.certified else "val"  # the split the trials were scored on (their user attr)
        done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if "plan" in t.user_attrs and key in t.user_attrs]
        feas = [t for t in done if _feasible(t)]
        if not feas:
            other = "val" if key == "fit" else "fit"
            hint = (f" (its trials were scored on {'train' if other == 'fit' else 'val'}: "
                    f"{'use the certified pick' if other == 'fit' else 'use pick rule min_cost'} or a new study)"
                    if any(other in t.user_attrs for t in study.get_trials(deepcopy=False)) else "")
            raise AutoExitError(
                f"study {study.study_name!r} has no feasible completed trial ({len(done)} completed){hint}; run "
                "more trials or loosen the budgets")
        cost_key = "latency_ms" if settings.cost == "latency" else "flops"
        base = recorded.costs(settings.cost).base
        # the certified pick's front is taken in (cost, disagreement with the backbone) on train, whatever the
        # accuracy: on the split the heads were trained on the labelled drop is often below zero, so a (cost,
        # drop) front there keeps no conservative point and its first test on val fails. The disagreement is
        # never negative and bounds the drop, so its front runs from the backbone alone to the cheapest point.
        risk = ((lambda t: 100.0 * (1.0 - t.user_attrs[key]["agreement"])) if pick.certified
                else (lambda t: t.user_attrs[key]["drop_pp"]))
        cost = np.array([t.user_attrs[key][cost_key] for t in feas])
        mask = pareto_mask(cost, np.array([risk(t) for t in feas]))
        front, seen = [], set()
        for t in sorted([t for t, m in zip(feas, mask) if m], key=lambda t: (t.user_attrs[key][cost_key], t.number)):
            k = (t.user_attrs[key][cost_key], risk(t))
            if k not in seen:  # the same point reached by several trials is listed once (the earliest)
                seen.add(k)
                front.append(t)
        certificate = None
        if pick.certified:
            chosen, plan, certificate = certify_front(front, recorded, pick, settings, cost_of=cost_of)
            if plan is None:  # nothing certified: no exit
                plan = ExitPlan(pick.max_drop, "halving", "certified", front[0].user_attrs["plan"]["signal"], (), ())
        else:
            chosen = _apply_pick(front, pick, cost_key, base)
            plan = ExitPlan.from_dict(chosen.user_attrs["plan"])
        val = evaluate_plan(recorded, plan, "val", settings.accuracy)
        tst = evaluate_plan(recorded, plan, "test", settings.accuracy) if test and recorded.test is not None else None
        by_trial = {c["trial"]: c for c in (certificate or {}).get("tested", []) if c["step"] == 1.0}
        rows = []
        for t in front:
            p = ExitPlan.from_dict(t.user_attrs["plan"])
            row = {"trial": t.number, "plan": p.describe(), "k": len(p.kept),
                   f"{key}_cost_fraction": t.user_attrs[key][cost_key] / base,
                   f"{key}_drop_pp": t.user_attrs[key]["drop_pp"], "chosen": chosen is not None and t.number == chosen.number}
            if pick.certified:
                m = evaluate_plan(recorded, p, "val", settings.accuracy)
                c = by_trial.get(t.number)  # None: the test stopped before this point
                vc = (m["latency_fraction"] if settings.cost == "latency" else m["flops_fraction"]) \
                    if cost_of is None else float(cost_of(t, p)) / base
                row.update(val_cost_fraction=vc, val_drop_pp=m["drop_pp"],
                           certified=bool(c and c["certified"]), pvalue=None if c is None else c["pvalue"])
            if test and recorded.test is not None:
                m = evaluate_plan(recorded, p, "test", settings.accuracy)
                row.update(test_cost_fraction=(m["latency_fraction"] if settings.cost == "latency"
                                               else m["flops_fraction"]), test_drop_pp=m["drop_pp"])
            rows.append(row)
        baseline = None
        if settings.baseline_tolerance is not None:
            sig = "max_softmax" if "max_softmax" in recorded.signals else recorded.signals[0]
            # the fixed rule as the core runs it (thresholds estimated on val; its temperatures are this recording's)
            bp = fixed_rule(recorded, settings.baseline_tolerance, "halving", sig, settings.basis, 16, settings.cost)
            baseline = {"plan": bp.to_dict(), "describe": bp.describe(),
                        "val": _headline(evaluate_plan(recorded, bp, "val", settings.accuracy))}
            if test and recorded.test is not None:
                baseline["test"] = _headline(evaluate_plan(recorded, bp, "test", settings.accuracy))
        return cls(study, plan, chosen, front, val, tst, recorded, settings, obj.space, baseline, rows,
                   certificate=certificate, pick=pick)

    # ------------------------------------------------------------------ reporting
    @property
    def cost_key(self) -> str:
        return "latency_ms" if self.settings.cost == "latency" else "flops"

    def importances(self) -> dict[str, dict[str, float]]:
        """Parameter importances for the cost and the drop (Optuna's PED-ANOVA evaluator: fast, fit for reports)."""
        optuna = _optuna()
        out: dict[str, dict[str, float]] = {}
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < 4:
            return out
        key = self.search_key
        done = [t for t in done if key in t.user_attrs]
        if len(done) < 4:
            return out
        targets = {"cost": lambda t: t.user_attrs[key][self.cost_key], "drop": lambda t: t.user_attrs[key]["drop_pp"]}
        for name, fn in targets.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ev_cls = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None)
                    imp = optuna.importance.get_param_importances(
                        self.study, target=fn, evaluator=ev_cls() if ev_cls is not None else None)
                out[name] = {k: float(v) for k, v in imp.items()}
            except Exception:  # noqa: BLE001 - importances are a report nicety, never a failure
                continue
        return out

    def to_dict(self, importances: dict | None = None) -> dict:
        storage = _storage_url(self.study._storage)
        return {
            "study_name": self.study.study_name,
            "storage": _redact(storage) if storage else type(self.study._storage).__name__,
            "metric_names": self.study.metric_names,
            "n_trials": len(self.study.get_trials(deepcopy=False)),
            "space": self.space.to_dict(),
            "settings": json.loads(json.dumps(self.settings.to_dict(), default=str)),
            "pick_rule": self.pick.describe(),
            "search_split": "train" if self.search_key == "fit" else "val",
            **({"train_predictions": self.recorded.info.get("fit_predictions", "in-sample")}
               if self.search_key == "fit" else {}),
            "chosen_trial": None if self.chosen_trial is None else self.chosen_trial.number,
            "chosen": self.chosen.to_dict(),
            "certificate": self.certificate,
            "val": _headline(self.val),
            "test": _headline(self.test) if self.test else None,
            "front": self.front_rows,
            "baseline": self.baseline,
            "importances": importances if importances is not None else self.importances(),
            "recorded_fingerprint": self.recorded.fingerprint,
            "timings": self.timings,
        }

    def pareto_figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        optuna = _optuna()
        base = self.recorded.costs(self.settings.cost).base
        key = self.search_key
        on = "train" if key == "fit" else "val"
        done = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if key in t.user_attrs]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ok = [t for t in done if _feasible(t)]
        bad = [t for t in done if not _feasible(t)]
        for group, style in ((bad, dict(c="#d9a0a0", marker="x", s=12, label="infeasible")),
                             (ok, dict(c="#9aa8b8", s=10, label="trials"))):
            if group:
                ax.scatter([100 * t.user_attrs[key][self.cost_key] / base for t in group],
                           [t.user_attrs[key]["drop_pp"] for t in group], **style)
        fx = [100 * r[f"{key}_cost_fraction"] for r in self.front_rows]
        fy = [r[f"{key}_drop_pp"] for r in self.front_rows]
        ax.plot(fx, fy, "-o", c="C0", ms=4, label=f"Pareto front ({on})")
        if key == "fit":
            cx = [100 * r["val_cost_fraction"] for r in self.front_rows if r["certified"]]
            cy = [r["val_drop_pp"] for r in self.front_rows if r["certified"]]
            ax.scatter(cx, cy, marker="s", s=16, c="C2", zorder=4, label="certified points (val)")
        if self.front_rows and "test_cost_fraction" in self.front_rows[0]:
            ax.plot([100 * r["test_cost_fraction"] for r in self.front_rows],
                    [r["test_drop_pp"] for r in self.front_rows], "--", c="C1", lw=1, label="same points on test")
        cf = self.val["latency_fraction"] if self.settings.cost == "latency" else self.val["flops_fraction"]
        ax.scatter([100 * cf], [self.val["drop_pp"]], marker="*", s=180, c="C3", zorder=5, label="chosen (val)")
        if self.test:
            tf = self.test["latency_fraction"] if self.settings.cost == "latency" else self.test["flops_fraction"]
            ax.scatter([100 * tf], [self.test["drop_pp"]], marker="*", s=120, facecolors="none", edgecolors="C3",
                       zorder=5, label="chosen (test)")
        if self.baseline:
            key = "latency_fraction" if self.settings.cost == "latency" else "flops_fraction"
            ax.scatter([100 * self.baseline["val"][key]], [self.baseline["val"]["drop_pp"]], marker="D", s=40,
                       c="k", zorder=5, label="fixed rule (val)")
        if self.pick.max_drop is not None and self.pick.rule in ("min_cost", "certified"):
            ax.axhline(self.pick.max_drop, color="C3", lw=0.8, ls=":")
        unit = "latency" if self.settings.cost == "latency" else "FLOPs"
        ax.set_xlabel(f"expected {unit} per sample (% of the backbone)")
        ax.set_ylabel(f"accuracy drop (points, {self.val['drop_kind']})")
        ax.set_title(f"Outer search: {len(done)} trials", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def importance_figure(self, importances: dict | None = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        imp = importances if importances is not None else self.importances()
        if not imp:
            return None
        keys = sorted({k for d in imp.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in imp.values()))
        keys = keys[:12]
        fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(keys) + 1.2))
        y = np.arange(len(keys))
        h = 0.8 / max(len(imp), 1)
        for j, (name, d) in enumerate(imp.items()):
            ax.barh(y + j * h, [d.get(k, 0.0) for k in keys], height=h, label=name)
        ax.set_yticks(y + h * (len(imp) - 1) / 2, keys, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("importance (PED-ANOVA)")
        ax.legend(fontsize=7)
        ax.set_title("Parameter importances", fontsize=10)
        fig.tight_layout()
        return fig

    def report_sections(self) -> list[tuple[str, str]]:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f} %"

        def pts(v):
            return "-" if v is None else f"{v:.2f}"

        cert = self.certificate is not None
        rows = []
        for r in self.front_rows:
            row = [r["trial"], "yes" if r["chosen"] else "", r["plan"]]
            if cert:
                row += [pct(r["fit_cost_fraction"]), pts(r["fit_drop_pp"]), pct(r["val_cost_fraction"]),
                        pts(r["val_drop_pp"]), "yes" if r["certified"] else "no",
                        "-" if r["pvalue"] is None else f"{r['pvalue']:.3g}"]
            else:
                row += [pct(r["val_cost_fraction"]), pts(r["val_drop_pp"])]
            row += [pct(r.get("test_cost_fraction")), pts(r.get("test_drop_pp"))]
            rows.append(row)
        head = ["trial", "chosen", "configuration"]
        head += (["train cost", "train drop (pts)", "val cost", "val drop (pts)", "certified", "p-value"] if cert
                 else ["val cost", "val drop (pts)"])
        head += ["test cost", "test drop (pts)"]
        table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
        for r in rows:
            table += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
        table += "</table>"
        chosen = (f"chosen trial {self.chosen_trial.number}: {html.escape(self.chosen.describe())}"
                  if self.chosen_trial is not None else "no trial chosen: the backbone alone")
        intro = (f"<p>Study <b>{html.escape(self.study.study_name)}</b>: "
                 f"{len(self.study.get_trials(deepcopy=False))} trials. Pick rule: "
                 f"{html.escape(self.pick.describe())}; {chosen}. ")
        if cert:
            c = self.certificate
            oof = str(self.recorded.info.get("fit_predictions", "in-sample"))
            where = f" ({html.escape(oof)} predictions)" if oof != "in-sample" else ""
            intro += (f"The trials, their thresholds and the front were computed on the <b>train</b> split{where} "
                      "only; "
                      f"the {c['tested_points']} front points were then tested on the {c['n']} <b>val</b> samples "
                      f"most costly first ({c['certified_points']} certified) and the cheapest "
                      f"certified one on val is emitted. <b>Guarantee:</b> {html.escape(c['statement'])}. The test "
                      "columns are held out and were not used to choose.</p>")
        else:
            intro += ("The front and the pick are chosen on <b>val</b>; the test columns are held out and were "
                      "not used to choose. No guarantee: use pick rule <code>certified</code> for one.</p>")
        out = [("Outer search: Pareto front", intro + table)]
        if self.baseline:
            b = self.baseline
            txt = (f"<p>{html.escape(b['describe'])}: val cost {pct(b['val']['flops_fraction'])}, "
                   f"drop {b['val']['drop_pp']:.2f} pts")
            if b.get("test"):
                txt += f"; test cost {pct(b['test']['flops_fraction'])}, drop {b['test']['drop_pp']:.2f} pts"
            out.append(("Fixed rule (no search) for comparison", txt + "</p>"))
        return out

    def attach(self, result: EnableResult, importances: dict | None = None) -> EnableResult:
        """Add this search's figures, sections and ``search`` record to ``result.extra`` (for the report)."""
        imp = importances if importances is not None else self.importances()
        figs = [("Outer search: Pareto front", self.pareto_figure())]
        f2 = self.importance_figure(imp)
        if f2 is not None:
            figs.append(("Outer search: parameter importances", f2))
        result.extra.setdefault("report_figures", []).extend(figs)
        result.extra.setdefault("report_sections", []).extend(self.report_sections())
        result.extra["search"] = {**(result.extra.get("search") or {}), "outer": self.to_dict(imp)}
        return result

    def apply(self, result: EnableResult | None = None) -> EnableResult:
        """The core pipeline's result for the chosen plan (model, val/test metrics), ready to ``emit``.

        ``result``: the ``EnableResult`` the recorded predictions came from
        (default: ``recorded.source``).
        """
        from dataclasses import replace as dc_replace

        from ..pipeline import EnableConfig, assemble

        base = result if result is not None else self.recorded.source
        if base is None:
            raise AutoExitError("applying the chosen plan needs the EnableResult (heads and backbone) the recorded "
                                "predictions came from; pass it: search_result.apply(enable_result)")
        plan = self.chosen
        cert = self.certificate
        sub = subset_result(self.recorded, plan, self.settings.basis, "fit" if cert else "val")
        scheme = plan.scheme if plan.scheme else "halving"  # weights (a tuple) are kept as such in the manifest
        over: dict[str, Any] = {"tolerance": plan.tolerance, "scheme": scheme, "signal": plan.signal,
                                "basis": self.settings.basis}
        if "policy" in {f.name for f in fields(base.config)}:
            over["policy"] = "paper003"  # thresholds from a split tolerance on one confidence signal
            over["cross_fit"] = 0  # (a core policy's option; the plan's thresholds were derived by the search)
        if cert:  # the budget is the certified one, at the pick's delta
            over.update(tolerance=float(cert["max_drop_pp"]), delta=float(cert["delta"]))
        cfg = dc_replace(base.config, **over)
        if not isinstance(cfg, EnableConfig):  # pragma: no cover
            raise AutoExitError("unexpected configuration type")
        oof = str(self.recorded.info.get("fit_predictions", "in-sample")).startswith("out-of-fold")
        if cert and oof and base.fit_predictions is None:
            raise AutoExitError("the study's trials read out-of-fold train predictions, which this EnableResult lacks; "
                                "apply it to the result the recorded predictions came from (enable with the same "
                                "cross_fit)")
        out = assemble(cfg, base.backbone, base.points, base.recording, base.heads, subset=sub,
                       timings=dict(base.timings), temperatures_on="train" if cert else None,
                       predictions={"train": base.fit_predictions} if cert and oof else None)
        if cert:
            out.fit_predictions = base.fit_predictions if oof else None
            temps = np.array([out.temperatures[n] for n in self.recorded.names])
            if not np.allclose(temps, self.recorded.temperatures, rtol=1e-6, atol=1e-9):
                raise AutoExitError("the heads' train-split temperatures differ from the recorded ones; the heads "
                                    "differ from the ones the study was run on (re-run the search on this machine)")
            out.extra["policy"] = {
                "policy": "outer search, certified", "risk": cert["risk"], "statement": cert["statement"],
                "guarantee": {k: cert[k] for k in ("delta", "max_drop_pp", "method", "n", "tested_points",
                                                   "certified_points")},
                "cal_n": cert["n"], "fitted_on": ("out-of-fold predictions of the train split" if oof else
                                                  "train split") + " (trials, thresholds, front); val certified "
                                                                   "the front",
                "plan": plan.describe()}
        out.extra["outer_plan"] = plan.to_dict()
        return self.attach(out)


def plan_losses(recorded: Recorded, plan: ExitPlan, split: str = "val", accuracy: str = "auto") -> np.ndarray:
    """Per-sample loss of ``plan`` on ``split``: 1 where its answer differs from the backbone's (``agreement``),
    or ``1[backbone right] - 1[plan right]`` in {-1, 0, 1} (``gt``; ``auto``: ``gt`` when labelled)."""
    sp, out = _simulate(recorded, plan, split)
    return _losses(sp, out.pred, _accuracy_mode(accuracy, sp))


LADDER = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # the certified pick's steps towards each front point


def _step_thresholds(scores: np.ndarray, thresholds: np.ndarray, step: float) -> np.ndarray:
    """Each exit's threshold raised so that, on ``scores`` (the train split), ``step`` of the inputs that pass its
    own threshold still do (the highest-scoring ones); never lowered."""
    out = np.array(thresholds, dtype=np.float64)
    for i, (sc, th) in enumerate(zip(scores, thresholds)):
        passing = np.sort(sc[sc >= th].astype(np.float64))
        if len(passing):
            keep = int(np.floor(step * len(passing)))
            out[i] = max(th, np.inf if keep == 0 else float(passing[len(passing) - keep]))
    return out


def ladder(recorded: Recorded, plan: ExitPlan, steps: Sequence[float] = LADDER) -> list:
    """``plan`` and, before it, safer steps of it: the same exits, each letting out only ``step`` of the train
    inputs that pass its threshold (the most confident ones). The certified pick tests them on the way to the
    plan: on the data the heads were trained on even a cautious point looks safer than it is (its most
    confident train inputs are all right), and without these steps one such point early in the sequence would
    stop the whole test."""
    if not plan.kept or recorded.fit is None:
        return [plan]
    idx = [recorded.names.index(n) for n in plan.kept]
    sc = recorded.fit.scores[plan.signal][idx]
    thr = np.asarray(plan.thresholds, dtype=np.float64)
    return [*(replace(plan, thresholds=tuple(float(x) for x in _step_thresholds(sc, thr, f)), step=float(f))
              for f in steps), plan]


def certify_front(front: Sequence, recorded: Recorded, pick: PickRule, settings: OuterSettings,
                  ladders: dict | None = None, cost_of: Callable | None = None):
    """Learn-then-Test of the front on val; returns ``(trial, plan, certificate)``: the trial whose point (or one
    of its safer steps) is deployed and that plan, or ``(None, None, certificate)`` when nothing certifies
    (emit the backbone alone).

    The sequence, fixed before val is read: the front's points in the order of their disagreement with the
    backbone on train, lowest (most costly) first, each preceded by its :func:`ladder` of safer steps. The
    disagreement, not the labelled drop, orders them even when the drop is tested: on the heads' own training
    data the drop is biased low, often below zero. Fixed-sequence testing (level ``pick.delta``; exact binomial
    for the disagreement, Waudby-Smith--Ramdas for the drop) walks it until the first setting whose risk it
    cannot bound by ``pick.max_drop`` points; every setting before holds at once with probability >= 1 - delta,
    so the one cheapest on val is deployed.

    ``ladders``: a dict to keep the ladders in between calls on the same front and train split (they depend on
    nothing else), e.g. when re-certifying one front on many calibration draws. ``cost_of(trial, plan)``: a
    setting's cost on val when it is not the recorded per-exit one (a partitioned search: the partitioned
    latency of the trial's split points and placement with the plan's exit rates on val).
    """
    from ..policies.risk import fixed_sequence, pvalues

    cost_key = "latency_ms" if settings.cost == "latency" else "flops"
    costs = recorded.costs(settings.cost)
    order = sorted(front, key=lambda t: (1.0 - t.user_attrs["fit"]["agreement"], -t.user_attrs["fit"][cost_key],
                                         t.number))
    mode = _accuracy_mode(settings.accuracy, recorded.val)
    method, bounds = ("binomial", (0.0, 1.0)) if mode == "agreement" else ("wsr", (-1.0, 1.0))
    alpha = pick.max_drop / 100.0
    ladders = {} if ladders is None else ladders
    plans = [ExitPlan.from_dict(t.user_attrs["plan"]) for t in order]
    length = sum(len(LADDER) + 1 if p.kept else 1 for p in plans)

    def sequence():  # built as far as the walk goes: each ladder is derived (on train) when it is reached
        for t, plan in zip(order, plans):
            key = t.number
            if key not in ladders:
                ladders[key] = ladder(recorded, plan)
            for p in ladders[key]:
                yield t, p

    seq, losses, val_cost = [], [], []
    for item in sequence():  # the p-values are per setting: the walk stops at the first failure, as the test does
        seq.append(item)
        sp, out = _simulate(recorded, item[1], "val", costs)
        loss = _losses(sp, out.pred, mode)
        losses.append(loss)
        val_cost.append(float(out.flops.mean()) if cost_of is None else float(cost_of(*item)))
        if pvalues(loss[None], alpha, method, pick.delta, bounds)[0] > pick.delta:
            break
    rc = fixed_sequence(np.stack(losses) if losses else np.zeros((0, recorded.val.n)), alpha, pick.delta, method,
                        bounds)
    n_cert = rc.index + 1
    chosen = chosen_plan = None
    if n_cert:
        j = min(range(n_cert), key=lambda j: (val_cost[j], float(losses[j].mean()), j))
        chosen, chosen_plan = seq[j]
    what = "disagreement with the backbone" if mode == "agreement" else "accuracy drop"
    cert = {
        "delta": pick.delta, "max_drop_pp": pick.max_drop, "risk": "disagreement" if mode == "agreement" else "drop",
        "method": method, "n": int(recorded.val.n), "front_points": len(order), "sequence_length": length,
        "tested_points": len(losses), "certified_points": n_cert,
        "ladder": [float(f) for f in LADDER],
        "statement": rc.statement(what) if n_cert else (
            f"no setting could be certified at {pick.max_drop:g} % on the {recorded.val.n} val samples "
            f"(delta = {pick.delta:g}): the backbone alone is emitted"),
        "tested": [{"trial": t.number, "step": p.step, "order": j, "certified": j < n_cert,
                    "pvalue": float(rc.pvalues[j]), "val_risk_pp": 100.0 * float(rc.empirical_risk[j])}
                   for j, (t, p) in enumerate(seq)],
    }
    if chosen_plan is not None:
        cert["chosen_step"] = chosen_plan.step
    return chosen, chosen_plan, cert


def _apply_pick(front: list, pick: PickRule, cost_key: str, base: float):
    def drop(t):
        v = t.user_attrs["val"]
        return v["drop_pp"] + pick.z * v.get("drop_se_pp", 0.0)

    if pick.rule == "min_cost":
        ok = [t for t in front if pick.max_drop is None or drop(t) <= pick.max_drop + 1e-12]
        if not ok:
            best = min(front, key=drop)
            raise AutoExitError(
                f"no front point has a val drop <= {pick.max_drop:g} points (the lowest is {drop(best):.3f}); raise "
                "pick.max_drop, lower the tolerance range, or run more trials")
        return min(ok, key=lambda t: (t.user_attrs["val"][cost_key], drop(t), t.number))
    ok = [t for t in front if t.user_attrs["val"][cost_key] / base <= pick.max_cost_fraction + 1e-12]
    if not ok:
        raise AutoExitError(f"no front point costs <= {100 * pick.max_cost_fraction:g} % of the backbone; raise "
                            "pick.max_cost_fraction or run more trials")
    return min(ok, key=lambda t: (drop(t), t.user_attrs["val"][cost_key], t.number))


def figure_png(fig) -> bytes:  # pragma: no cover - convenience for scripts
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
