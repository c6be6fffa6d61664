"""Classic early-exit baselines built from autoexit's own pieces, for comparison.

Paper 000 (section 4.1) and paper 003 (section 4.5) compare against three
designs; each is rebuilt here as a real :class:`~autoexit.model.MultiExitModel`
on the same backbone, exit points, recording and split as autoexit, so the only
differences are the ones the designs make:

==============  ==============================  ==============================  ===========================
name            where the exits go              head (the same at every exit)   exit rule
==============  ==============================  ==============================  ===========================
``branchynet``  fixed early positions: the      2 x (3x3 conv, BN, ReLU), global  entropy below a threshold,
                points nearest 1/4 and 1/2 of   average pool, one FC            one threshold per exit
                the backbone's FLOPs
``sdn``         after every block (every        2x2 average pool, one FC        max softmax, one shared
                candidate point)                                                threshold
``spinn``       at equal FLOPs fractions: the   one 3x3 conv (BN, ReLU), global  max softmax, one shared
                points nearest 15, 30, ... 90 % average pool, one FC            threshold
==============  ==============================  ==============================  ===========================

Differences from the original systems, on purpose: the backbone stays frozen
(autoexit's setting: a pre-trained model), heads read the same recorded
activations as autoexit's, positions snap to autoexit's candidate points, and
a conv head's first convolution has stride 2 on maps larger than 16x16 (the
rule autoexit's default heads use; full-resolution heads would cost the
baselines more FLOPs). Heads are trained *with labels* (cross-entropy only,
``TrainConfig(supervised=True, ce_weight=1.0)``), as in the papers; no
temperature scaling. Thresholds are chosen on the val split: the setting with
the lowest expected FLOPs whose val accuracy drop (``risk="drop"``, labels) or
disagreement with the backbone (``risk="disagreement"``) is within the
tolerance; per-exit thresholds are searched exhaustively on a grid of val
score quantiles when the grid is small, else exit by exit (shallow first).
Exits whose threshold lets no val sample out are removed from the built model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .calibrate import SIGNALS, ExitPredictions, check_tolerance, exit_score
from .data import Recording
from .distill import TrainConfig, TrainedHead, predict_head, train_heads
from .errors import AutoExitError
from .heads import HeadSpec
from .model import MultiExitModel
from .points import ExitPoint, TracedBackbone
from .subset import oracle_flops, simulate_exits

__all__ = [
    "BaselineSpec",
    "BASELINES",
    "BaselineResult",
    "baseline_points",
    "baseline_head_specs",
    "baseline_train_config",
    "train_baseline_heads",
    "choose_thresholds",
    "fit_baseline",
    "build_baseline",
    "exit_metrics",
]

RISKS = ("drop", "disagreement")


@dataclass(frozen=True)
class BaselineSpec:
    """One baseline design: where its exits go, its (homogeneous) head, its exit rule.

    placement: ``fractions`` (the candidate points nearest each FLOPs fraction in
    ``positions``) or ``every`` (every candidate point). head: the head's HeadSpec;
    ``conv_width=0`` keeps the input's channels and ``stride`` is set per point (2 on
    maps larger than 16x16). signal: ``entropy`` or ``max_softmax`` (any key of
    ``autoexit.calibrate.SIGNALS``). shared_threshold: one threshold for every exit
    (else one per exit).
    """

    name: str
    placement: str
    positions: tuple[float, ...]
    head: HeadSpec
    signal: str
    shared_threshold: bool
    supervised: bool = True
    description: str = ""

    def __post_init__(self):
        if self.placement not in ("fractions", "every"):
            raise AutoExitError(f"placement must be 'fractions' or 'every', got {self.placement!r}")
        if self.placement == "fractions" and (not self.positions or any(not 0 < f < 1 for f in self.positions)):
            raise AutoExitError(f"positions must be FLOPs fractions in (0, 1), got {self.positions}")
        if self.signal not in SIGNALS:
            raise AutoExitError(f"unknown exit signal {self.signal!r}; use one of: {', '.join(SIGNALS)}")

    def to_dict(self) -> dict:
        return {"name": self.name, "placement": self.placement, "positions": list(self.positions),
                "head": self.head.to_dict(), "signal": self.signal, "shared_threshold": self.shared_threshold,
                "supervised": self.supervised, "description": self.description}


BASELINES: dict[str, BaselineSpec] = {
    "branchynet": BaselineSpec(
        "branchynet", "fractions", (0.25, 0.5),
        HeadSpec(conv="standard", kernel=3, conv_layers=2, conv_width=0, pool="avg", fc_layers=1),
        "entropy", shared_threshold=False,
        description="BranchyNet-style: 2 exits at fixed early positions (nearest 1/4 and 1/2 of the FLOPs), "
                    "2-conv + FC heads, entropy threshold per exit, supervised"),
    "sdn": BaselineSpec(
        "sdn", "every", (),
        HeadSpec(conv="none", conv_layers=0, pool="avg2", fc_layers=1),
        "max_softmax", shared_threshold=True,
        description="SDN-style: a head after every block (2x2 pool + FC), one shared max-softmax threshold, "
                    "supervised (IC-only training on the frozen backbone)"),
    "spinn": BaselineSpec(
        "spinn", "fractions", (0.15, 0.30, 0.45, 0.60, 0.75, 0.90),
        HeadSpec(conv="standard", kernel=3, conv_layers=1, conv_width=0, pool="avg", fc_layers=1),
        "max_softmax", shared_threshold=True,
        description="SPINN-style: 6 exits at equal FLOPs fractions (nearest 15..90 %), one conv + one FC heads, "
                    "one shared max-softmax threshold, supervised"),
}


def _spec(name_or_spec: str | BaselineSpec) -> BaselineSpec:
    if isinstance(name_or_spec, BaselineSpec):
        return name_or_spec
    if name_or_spec not in BASELINES:
        raise AutoExitError(f"unknown baseline {name_or_spec!r}; use one of: {', '.join(BASELINES)}")
    return BASELINES[name_or_spec]


def baseline_points(points: Sequence[ExitPoint] | Recording, spec: str | BaselineSpec) -> list[ExitPoint]:
    """The baseline's exit points among ``points`` (autoexit's candidates, or a recording's points), in order."""
    spec = _spec(spec)
    pool = list(points.points if isinstance(points, Recording) else points)
    if not pool:
        raise AutoExitError(f"{spec.name}: no candidate exit points to place exits at")
    if spec.placement == "every":
        return pool
    chosen: list[ExitPoint] = []
    for f in spec.positions:
        p = min(pool, key=lambda q: (abs(q.depth_fraction - f), q.depth_fraction))
        if p not in chosen:
            chosen.append(p)
    return sorted(chosen, key=pool.index)


def baseline_head_specs(points: Sequence[ExitPoint], spec: str | BaselineSpec) -> dict[str, HeadSpec]:
    """The homogeneous head at every point: the same design, stride 2 on maps larger than 16x16."""
    spec = _spec(spec)
    out = {}
    for p in points:
        h = spec.head
        if h.conv_layers and len(p.shape) == 3:
            h = replace(h, stride=2 if p.shape[1] > 16 else 1)
        out[p.name] = h
    return out


def baseline_train_config(spec: str | BaselineSpec, base: TrainConfig = TrainConfig()) -> TrainConfig:
    """``base`` with the baseline's supervision: cross-entropy on labels only (as the papers train)."""
    spec = _spec(spec)
    return replace(base, supervised=True, ce_weight=1.0) if spec.supervised else base


Trainer = Callable[[Recording, Mapping[str, HeadSpec], TrainConfig, Sequence[str]], Mapping[str, TrainedHead]]


def _default_trainer(rec, specs, config, points):
    return train_heads(rec, specs, config, points=list(points), progress=False)


def train_baseline_heads(rec: Recording, spec: str | BaselineSpec, train: TrainConfig = TrainConfig(),
                         trainer: Trainer | None = None) -> dict[str, TrainedHead]:
    """Train the baseline's heads on the recording's train split (``trainer``: e.g. a cached trainer)."""
    spec = _spec(spec)
    cfg = baseline_train_config(spec, train)
    if cfg.supervised and rec.labels("train") is None:
        raise AutoExitError(f"{spec.name} trains its heads with labels; the recording has none "
                            "(give labelled inference data, or a BaselineSpec with supervised=False)")
    pts = baseline_points(rec, spec)
    specs = baseline_head_specs(pts, spec)
    heads = (trainer or _default_trainer)(rec, specs, cfg, [p.name for p in pts])
    return {p.name: heads[p.name] for p in pts}


# ------------------------------------------------------------------------------------------ thresholds
def _risk(pred: np.ndarray, bpred: np.ndarray, labels: np.ndarray | None, risk: str) -> float:
    if risk == "disagreement":
        return float((pred != bpred).mean())
    return float((bpred == labels).mean() - (pred == labels).mean())


def _grid(scores: np.ndarray, size: int) -> np.ndarray:
    """Candidate thresholds: quantiles of the val scores (midpoints keep ties on one side), plus +inf."""
    s = np.unique(scores[np.isfinite(scores)])
    if s.size == 0:
        return np.array([np.inf])
    if s.size > size:
        s = np.unique(np.quantile(s, np.linspace(0.0, 1.0, size)))
    mids = (s[:-1] + s[1:]) / 2.0
    # float32 values: the model compares float32 scores with float32 thresholds, so the search sees its decisions
    return np.unique(np.r_[s[:1] - 1e-6, mids, np.inf].astype(np.float32)).astype(np.float64)


def choose_thresholds(scores: np.ndarray, exit_pred: np.ndarray, backbone_pred: np.ndarray,
                      labels: np.ndarray | None, c1: Sequence[float], flops_before: Sequence[float],
                      base_flops: float, tolerance: float, shared: bool, risk: str = "drop",
                      grid: int = 200, exhaustive_limit: int = 4096) -> tuple[np.ndarray, dict]:
    """Thresholds (one per exit row of ``scores``) with the lowest expected FLOPs on these samples whose risk
    (accuracy drop with ``risk="drop"``, disagreement with the backbone otherwise) is within ``tolerance`` (%).

    ``shared``: one threshold for all exits (a 1-D sweep). Else one per exit: every combination of a grid
    of score quantiles per exit while there are at most ``exhaustive_limit`` of them, else exit by exit,
    shallow first, each taking the lowest threshold that keeps the risk within the tolerance.
    Returns the thresholds and a summary of the chosen setting on these samples.
    """
    t = check_tolerance(tolerance)
    if risk not in RISKS:
        raise AutoExitError(f"risk must be one of {', '.join(RISKS)}, got {risk!r}")
    if risk == "drop" and labels is None:
        raise AutoExitError("risk='drop' needs labels on the calibration split; use risk='disagreement'")
    s = np.asarray(scores, dtype=np.float64)
    k = s.shape[0]
    c1 = np.asarray(c1, dtype=float)
    fb = np.asarray(flops_before, dtype=float)

    def run(thr: np.ndarray) -> tuple[float, float]:
        out = simulate_exits(s, exit_pred, backbone_pred, thr, c1, fb, base_flops)
        return _risk(out.pred, backbone_pred, labels, risk), float(out.flops.mean())

    best = (np.full(k, np.inf), *run(np.full(k, np.inf)))
    tried = 0

    def consider(thr):
        nonlocal best, tried
        tried += 1
        r, f = run(thr)
        if r <= t + 1e-12 and f < best[2] - 1e-9:
            best = (np.array(thr, dtype=float), r, f)

    if k == 0:
        pass
    elif shared:
        for v in _grid(s.ravel(), grid):
            consider(np.full(k, v))
    else:
        per = max(2, int(exhaustive_limit ** (1.0 / k) + 1e-9) - 1)  # a grid holds at most per + 1 values
        grids = [_grid(s[i], min(grid, per)) for i in range(k)]
        if np.prod([len(g) for g in grids], dtype=float) <= exhaustive_limit:
            for combo in itertools.product(*grids):
                consider(np.array(combo))
        else:  # exit by exit, shallow first: lowest threshold within the tolerance
            thr = np.full(k, np.inf)
            for i in range(k):
                for v in _grid(s[i], grid):  # ascending: the first admissible value is the lowest
                    trial = thr.copy()
                    trial[i] = v
                    r, _ = run(trial)
                    tried += 1
                    if r <= t + 1e-12:
                        thr = trial
                        break
            consider(thr)
    return best[0], {"risk": best[1], "expected_flops": best[2], "settings_tried": tried}


# ------------------------------------------------------------------------------------------ results
def exit_metrics(preds: ExitPredictions, names: Sequence[str], thresholds: Sequence[float], signal: str,
                 temperatures: Sequence[float] | None, heads: Mapping[str, TrainedHead], base_flops: float,
                 oracle_names: Sequence[str] | None = None) -> dict:
    """Accuracy, drop, agreement, exit rates, expected FLOPs, saving and oracle saving of exits ``names``
    (with ``thresholds``) on one split's predictions. The oracle uses the heads ``oracle_names``
    (default: ``names``): every sample leaves at the first of them that agrees with the backbone."""
    n = preds.n
    bpred = preds.backbone_pred.numpy()
    names = list(names)
    if names:
        sub = preds.subset(names)
        temps = torch.as_tensor(list(temperatures) if temperatures is not None else [1.0] * len(names),
                                dtype=torch.float32)
        scores = sub.scores(temps, signal).numpy()
        epred = sub.pred().numpy()
    else:
        scores, epred = np.zeros((0, n)), np.zeros((0, n), dtype=np.int64)
    c1 = np.array([heads[x].flops for x in names], dtype=float)
    fb = np.array([heads[x].point.flops_before for x in names], dtype=float)
    out = simulate_exits(scores, epred, bpred, np.asarray(thresholds, dtype=float), c1, fb, base_flops)
    onames = list(oracle_names) if oracle_names is not None else names
    if onames:
        osub = preds.subset(onames)
        oracle = oracle_flops(osub.agree().numpy(), [heads[x].flops for x in onames],
                              [heads[x].point.flops_before for x in onames], base_flops).mean()
    else:
        oracle = float(base_flops)
    m = {
        "n": n,
        "agreement": float((out.pred == bpred).mean()),
        "expected_flops": float(out.flops.mean()),
        "base_flops": float(base_flops),
        "saving": float(1 - out.flops.mean() / base_flops),
        "oracle_flops": float(oracle),
        "oracle_saving": float(1 - oracle / base_flops),
        "exit_rates": out.exit_rates().tolist(),
        "exit_names": [*names, "backbone"],
    }
    if preds.labels is not None:
        y = preds.labels.numpy()
        acc, base_acc = float((out.pred == y).mean()), float((bpred == y).mean())
        m.update(accuracy=acc, backbone_accuracy=base_acc, accuracy_drop=base_acc - acc)
    else:
        m.update(accuracy=None, backbone_accuracy=None, accuracy_drop=None)
    return m


@dataclass
class BaselineResult:
    """A fitted baseline: its exits, thresholds, the MultiExitModel and its metrics on val and test."""

    spec: BaselineSpec
    tolerance: float
    risk: str
    points: list[ExitPoint]
    heads: dict[str, TrainedHead]
    kept: list[str]
    thresholds: list[float]
    model: MultiExitModel
    metrics: dict
    search: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "baseline": self.spec.to_dict(), "tolerance": self.tolerance, "risk": self.risk,
            "points": [p.name for p in self.points], "kept": self.kept, "thresholds": self.thresholds,
            "head_flops": {n: h.flops for n, h in self.heads.items()},
            "head_val_agreement": {n: h.val_agreement for n, h in self.heads.items()},
            "metrics": self.metrics, "search": self.search,
        }


def fit_baseline(spec: str | BaselineSpec, tb: TracedBackbone, rec: Recording, heads: Mapping[str, TrainedHead],
                 tolerance: float, risk: str = "drop", grid: int = 200) -> BaselineResult:
    """Thresholds on val for the baseline's trained ``heads``, the MultiExitModel, and val/test metrics."""
    spec = _spec(spec)
    pts = baseline_points(rec, spec)
    missing = [p.name for p in pts if p.name not in heads]
    if missing:
        raise AutoExitError(f"{spec.name}: no trained head for point(s) {', '.join(missing)}; "
                            "train them with train_baseline_heads")
    names = [p.name for p in pts]
    base = float(tb.total_flops)
    preds = {}
    for split in ("val", "test"):
        logits = torch.stack([predict_head(heads[n].module, rec.activations(n, split)) for n in names])
        preds[split] = ExitPredictions(names, logits, rec.logits(split), rec.labels(split))
    val = preds["val"]
    sid = SIGNALS[spec.signal]
    scores = torch.stack([exit_score(val.logits[i].float(), sid) for i in range(len(names))]).numpy()
    thr, summary = choose_thresholds(
        scores, val.pred().numpy(), val.backbone_pred.numpy(),
        val.labels.numpy() if val.labels is not None else None,
        [heads[n].flops for n in names], [heads[n].point.flops_before for n in names], base,
        tolerance, spec.shared_threshold, risk, grid)
    kept = [n for n, v in zip(names, thr) if np.isfinite(v)]
    kept_thr = [float(v) for v in thr if np.isfinite(v)]
    stages = tb.split([heads[n].point.node for n in kept])
    model = MultiExitModel(stages, [heads[n].module for n in kept], [1.0] * len(kept), kept_thr, kept,
                           tb.num_classes, spec.signal).eval()
    metrics = {split: exit_metrics(p, kept, kept_thr, spec.signal, None, heads, base, oracle_names=names)
               for split, p in preds.items()}
    return BaselineResult(spec, float(tolerance), risk, pts, {n: heads[n] for n in names}, kept, kept_thr, model,
                          metrics, summary)


def build_baseline(spec: str | BaselineSpec, tb: TracedBackbone, rec: Recording, tolerance: float,
                   train: TrainConfig = TrainConfig(), risk: str = "drop", trainer: Trainer | None = None,
                   heads: Mapping[str, TrainedHead] | None = None) -> BaselineResult:
    """Train the baseline's heads (unless given) and fit it: a real MultiExitModel with val-chosen thresholds."""
    heads = dict(heads) if heads is not None else train_baseline_heads(rec, spec, train, trainer)
    return fit_baseline(spec, tb, rec, heads, tolerance, risk)
