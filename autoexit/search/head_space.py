"""Exit-head search spaces as data, and everything of the head search that does not need NNI.

A head search space is a YAML file in ``search_spaces/`` (``heads_default.yaml``,
``heads_ci.yaml``, or any path): one key per :class:`~autoexit.heads.HeadSpec`
field, a list is a choice, a scalar is fixed::

    description: my space
    conv: [none, separable, dilated]   # registry keys of autoexit.heads (plus none)
    kernel: [3, 5]
    conv_layers: [1, 2]
    fc_layers: [1, 2]
    fc_width: 128                      # fixed

:class:`HeadSpace` validates it (every value must make a valid ``HeadSpec``) and
turns a sample (``{field: value}``) into the canonical ``HeadSpec`` for an exit
point's activation shape: fields a head ignores (the kernel of ``conv: none``,
the width of a depthwise conv, ``fc_width`` of a single linear layer, ...) are
reset so that two samples building the same head train it once.

The trial objective (:func:`run_trial`) trains one head on the recorded
activations of one exit point with the core's label-free distillation
(:func:`autoexit.distill.train_head`; the backbone never runs) and scores it::

    score = agreement with the backbone on val - cost_weight * head cost / base cost

where the cost is the head's FLOPs (or its latency measured by the device
evaluator) and the base is the backbone after the exit point (``cost_basis:
remaining``, what a hit saves) or the whole backbone (``backbone``). A head
whose agreement is not above chance (the val share of the backbone's most
frequent class, plus ``chance_margin``) is failed; a point with no head above
chance is discarded (paper 003, 3.2.1). Every trial appends one JSON line to
``trials.jsonl`` of its point and saves its weights, so results survive the
search engine and a finished point is reused by the next search with the same
settings.

:mod:`autoexit.search.nni_heads` drives these with NNI; this module imports no NNI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AutoExitError

__all__ = [
    "SPACE_FIELDS",
    "STRATEGIES",
    "ENGINES",
    "HeadSpace",
    "load_head_space",
    "head_space_names",
    "canonical_spec",
    "HeadSearchConfig",
    "TrialStore",
    "PointResult",
    "HeadSearchResult",
    "chance_agreement",
    "run_trial",
    "trial_context",
    "point_dir",
    "search_key",
]

SEARCH_SPACES_DIR = Path(os.environ.get("AUTOEXIT_SEARCH_SPACES",
                                        Path(__file__).resolve().parents[2] / "search_spaces"))
SPACE_FIELDS = ("conv", "kernel", "conv_layers", "conv_width", "stride", "pool", "fc_layers", "fc_width",
                "batchnorm", "dropout")
STRATEGIES = ("random", "tpe", "evolution")
_STRATEGY_ALIASES = {"regularized_evolution": "evolution", "regularized-evolution": "evolution",
                     "regularizedevolution": "evolution", "rand": "random"}
ENGINES = ("ts", "sequential")
COSTS = ("flops", "latency")
COST_BASES = ("remaining", "backbone")
NAS_HINT = "pip install 'autoexit[nas]'"

# Used only when search_spaces/ is not shipped (a wheel install); tests keep them equal to the YAML files.
BUILTIN_SPACES: dict[str, dict] = {
    "default": {
        "description": "paper 003 stack (up to 2 convs, then 1-3 linear layers) x the MEEdge branch zoo",
        "conv": ["none", "standard", "depthwise", "separable", "spatial", "dilated"],
        "kernel": [3, 5, 7],
        "conv_layers": [1, 2],
        "conv_width": [0, 32, 64, 128],
        "stride": [1, 2],
        "pool": ["avg", "max", "avg2"],
        "fc_layers": [1, 2, 3],
        "fc_width": [64, 128, 256],
    },
    "ci": {
        "description": "reduced space for CI and smoke tests: 4 distinct heads",
        "conv": ["none", "separable"],
        "kernel": 3,
        "conv_layers": 1,
        "conv_width": 0,
        "stride": 1,
        "pool": "avg",
        "fc_layers": [1, 2],
        "fc_width": 64,
    },
}


# --------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class HeadSpace:
    """Choices per HeadSpec field (a one-value tuple is a fixed field); fields not named keep HeadSpec defaults."""

    name: str
    choices: tuple[tuple[str, tuple], ...]
    description: str = ""

    @classmethod
    def from_dict(cls, d: Mapping, name: str = "custom") -> HeadSpace:
        from ..heads import HeadSpec

        if not isinstance(d, Mapping):
            raise AutoExitError(f"head search space {name!r} must be a mapping of HeadSpec fields to choices")
        d = dict(d)
        description = str(d.pop("description", "") or "")
        unknown = sorted(set(d) - set(SPACE_FIELDS))
        if unknown:
            raise AutoExitError(f"head search space {name!r}: unknown field(s) {', '.join(unknown)}; valid: "
                                f"{', '.join(SPACE_FIELDS)} (and description)")
        choices = []
        for key in SPACE_FIELDS:
            if key not in d:
                continue
            v = d[key]
            values = tuple(v) if isinstance(v, (list, tuple)) else (v,)
            if not values:
                raise AutoExitError(f"head search space {name!r}: {key} has no values; give a list or one value")
            if len(set(map(repr, values))) != len(values):
                raise AutoExitError(f"head search space {name!r}: {key} lists a value twice: {list(values)}")
            for x in values:
                if isinstance(x, (list, tuple, Mapping)) or x is None:
                    raise AutoExitError(f"head search space {name!r}: {key} values must be plain values, got {x!r}")
                if key in ("kernel", "conv_layers", "conv_width", "stride", "fc_layers", "fc_width") and (
                        isinstance(x, bool) or not isinstance(x, int)):
                    raise AutoExitError(f"head search space {name!r}: {key} values must be integers, got {x!r}")
                try:
                    HeadSpec(**{key: x})
                except AutoExitError as exc:
                    raise AutoExitError(f"head search space {name!r}: {exc}") from None
                except TypeError:
                    raise AutoExitError(f"head search space {name!r}: bad value {x!r} for {key}") from None
            choices.append((key, values))
        if not choices:
            raise AutoExitError(f"head search space {name!r} names no HeadSpec field; give at least one choice")
        return cls(name=name, choices=tuple(choices), description=description)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"description": self.description} if self.description else {}
        for k, v in self.choices:
            out[k] = list(v) if len(v) > 1 else v[0]
        return out

    @property
    def searched(self) -> dict[str, list]:
        """Fields with more than one value: what a strategy samples."""
        return {k: list(v) for k, v in self.choices if len(v) > 1}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.choices if len(v) == 1}

    @property
    def size(self) -> int:
        return math.prod(len(v) for _, v in self.choices)

    def distinct_specs(self, in_shape: Sequence[int]) -> int:
        """How many different heads the space builds at a point of ``in_shape`` (after canonicalisation)."""
        import itertools

        keys = [k for k, _ in self.choices]
        seen = set()
        for combo in itertools.product(*[v for _, v in self.choices]):
            seen.add(canonical_spec(dict(zip(keys, combo)), in_shape).to_json())
        return len(seen)

    def spec(self, sample: Mapping, in_shape: Sequence[int]):
        """The canonical HeadSpec of ``sample`` (searched fields; extra keys such as ``exit_point`` ignored)."""
        values = dict(self.fixed)
        for k in self.searched:
            if k not in sample:
                raise AutoExitError(f"sample {dict(sample)} lacks the searched field {k!r} of space {self.name!r}")
            values[k] = sample[k]
        return canonical_spec(values, in_shape)

    def describe(self) -> str:
        parts = [f"{k} {'/'.join(map(str, v))}" for k, v in self.choices]
        return f"{self.name}: " + ", ".join(parts)


def canonical_spec(values: Mapping, in_shape: Sequence[int]):
    """The HeadSpec ``values`` describe, with every field the built head ignores at ``in_shape`` reset."""
    from ..heads import HeadSpec

    d = {**HeadSpec().to_dict(), **dict(values)}
    shape = tuple(int(s) for s in in_shape)
    rank3 = len(shape) == 3
    if not rank3 or d["conv"] == "none" or d["conv_layers"] == 0:
        d.update(conv="none", conv_layers=0, kernel=3, stride=1, conv_width=0, batchnorm=True)
    else:
        if d["conv"] == "depthwise" or d["conv_width"] == shape[0]:
            d["conv_width"] = 0  # depthwise keeps the channels; the input's width is written 0
    if rank3:
        if d["pool"] not in ("avg", "max", "avg2", "flatten"):
            d["pool"] = "avg"
    elif len(shape) == 2:
        if d["pool"] != "cls":
            d["pool"] = "mean"
    else:
        d["pool"] = "flatten"
    if d["fc_layers"] == 1:
        d.update(fc_width=HeadSpec.fc_width, dropout=0.0)
    return HeadSpec(**d)


def head_space_names() -> list[str]:
    names = {p.stem[len("heads_"):] for p in SEARCH_SPACES_DIR.glob("heads_*.yaml")} if SEARCH_SPACES_DIR.is_dir() \
        else set()
    return sorted(names | set(BUILTIN_SPACES))


def load_head_space(space: str | Path | Mapping | HeadSpace | None = None) -> HeadSpace:
    """A head space from a :class:`HeadSpace`, a mapping, a YAML path, or a name (``default``, ``ci``:
    ``search_spaces/heads_<name>.yaml``)."""
    if isinstance(space, HeadSpace):
        return space
    if space is None:
        space = "default"
    if isinstance(space, Mapping):
        return HeadSpace.from_dict(space)
    if not isinstance(space, (str, Path)):
        raise AutoExitError(f"a head search space is a name, a YAML file or a mapping, got {type(space).__name__}")
    p = Path(os.path.expanduser(str(space)))
    if not p.suffix:
        stem = p.name[len("heads_"):] if p.name.startswith("heads_") else p.name
        cand = SEARCH_SPACES_DIR / f"heads_{stem}.yaml"
        if cand.is_file():
            p = cand
        elif stem in BUILTIN_SPACES:
            return HeadSpace.from_dict(BUILTIN_SPACES[stem], name=stem)
        else:
            raise AutoExitError(f"no head search space named {str(space)!r}; known: {', '.join(head_space_names())} "
                                f"(search_spaces/heads_<name>.yaml in {SEARCH_SPACES_DIR}), or give a YAML file path")
    if not p.is_file():
        raise AutoExitError(f"head search space file {p} does not exist")
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise AutoExitError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    name = p.stem[len("heads_"):] if p.stem.startswith("heads_") else p.stem
    return HeadSpace.from_dict(d or {}, name=name)


# --------------------------------------------------------------------------- the search settings


def _train_config(v, where: str):
    from ..distill import TrainConfig

    if v is None or isinstance(v, TrainConfig):
        return v
    if not isinstance(v, Mapping):
        raise AutoExitError(f"{where} must be a mapping of TrainConfig fields (epochs, lr, ...), got {v!r}")
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(v) - known)
    if bad:
        raise AutoExitError(f"unknown {where} setting(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    return TrainConfig(**dict(v))


def _default_trial_train():
    from ..distill import TrainConfig

    return TrainConfig(epochs=10, patience=3, select="val")  # trials are scored on val anyway


@dataclass(frozen=True)
class HeadSearchConfig:
    """Settings of an NNI head search (the ``heads:`` section of an experiment file).

    space: a head space name or file; strategy: ``random``, ``tpe`` or ``evolution``
    (regularized evolution); max_trials: trials per exit point; port: NNI web UI / REST
    port; engine: ``ts`` (every trial a process, web UI and REST API) or ``sequential``
    (in-process, no web UI: fast, for benchmarks); concurrency: parallel trials (``ts``);
    points: the exit points to search (default all); cost: ``flops`` or ``latency``
    (needs an evaluator); cost_weight: weight of the normalised cost in the score;
    cost_basis: normalise by the backbone after the point (``remaining``) or the whole
    backbone; train: how a trial trains its head (a short schedule); retrain: train the
    winner again with ``final_train`` (default: the core's training settings) instead of
    keeping the trial's weights; chance_margin: agreement must exceed chance by this;
    max_cost_fraction: a head whose normalised cost exceeds this fails untrained (1.0: it
    would cost more than the backbone it lets samples skip);
    trial_samples: train samples a trial uses (default all of the train split);
    threads: torch threads per trial; max_duration: per point, NNI syntax (``10m``);
    resume: reuse finished points of an identical earlier search;
    score_on: the data a trial is scored (and its epoch chosen) on: ``val`` (default), or
    ``holdout``, a random ``holdout`` share of the train split that the trials do not train
    on, so that nothing the search chooses reads val, the split the exit policies'
    guarantee is certified on (docs/policies.md).
    """

    space: str = "default"
    strategy: str = "random"
    max_trials: int = 20
    port: int = 8081
    engine: str = "ts"
    concurrency: int = 1
    points: tuple[str, ...] | None = None
    cost: str = "flops"
    cost_weight: float = 1.0
    cost_basis: str = "remaining"
    train: Any = field(default_factory=_default_trial_train)
    retrain: bool = True
    final_train: Any = None
    chance_margin: float = 0.01
    max_cost_fraction: float | None = 1.0
    seed: int = 0
    trial_samples: int | None = None
    threads: int | None = 1
    max_duration: str | None = None
    resume: bool = True
    top_k: int = 5
    score_on: str = "val"
    holdout: float = 0.2

    def __post_init__(self):
        s = str(self.strategy).lower()
        s = _STRATEGY_ALIASES.get(s, s)
        if s not in STRATEGIES:
            raise AutoExitError(f"unknown head-search strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategy", s)
        if isinstance(self.space, (HeadSpace, Mapping)):
            load_head_space(self.space)
        elif not isinstance(self.space, (str, Path)):
            raise AutoExitError(f"space must be a head space name or YAML file, got {self.space!r}")
        for k in ("max_trials", "concurrency", "top_k"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AutoExitError(f"heads.{k} must be an integer >= 1, got {v!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1024 <= self.port <= 65535:
            raise AutoExitError(f"heads.port must be a TCP port in 1024-65535, got {self.port!r}")
        if self.engine not in ENGINES:
            raise AutoExitError(f"heads.engine must be 'ts' (trial processes, web UI, REST) or 'sequential' "
                                f"(in-process, no web UI), got {self.engine!r}")
        if self.engine == "sequential" and self.concurrency != 1:
            raise AutoExitError("heads.concurrency must be 1 with the sequential engine (use engine: ts for parallel "
                                "trials)")
        if self.cost not in COSTS:
            raise AutoExitError(f"heads.cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.cost_basis not in COST_BASES:
            raise AutoExitError(f"heads.cost_basis must be one of {', '.join(COST_BASES)}, got {self.cost_basis!r}")
        if isinstance(self.cost_weight, bool) or not isinstance(self.cost_weight, (int, float)) or \
                not self.cost_weight >= 0:
            raise AutoExitError(f"heads.cost_weight must be a number >= 0, got {self.cost_weight!r}")
        if not isinstance(self.chance_margin, (int, float)) or not 0 <= self.chance_margin < 1:
            raise AutoExitError(f"heads.chance_margin must be in [0, 1), got {self.chance_margin!r}")
        if self.max_cost_fraction is not None and (isinstance(self.max_cost_fraction, bool) or not isinstance(
                self.max_cost_fraction, (int, float)) or not self.max_cost_fraction > 0):
            raise AutoExitError(f"heads.max_cost_fraction must be a number > 0 or null, got {self.max_cost_fraction!r}")
        if self.trial_samples is not None and (not isinstance(self.trial_samples, int) or self.trial_samples < 10):
            raise AutoExitError(f"heads.trial_samples must be an integer >= 10 or null, got {self.trial_samples!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise AutoExitError(f"heads.threads must be an integer >= 1 or null, got {self.threads!r}")
        if self.points is not None:
            if isinstance(self.points, str) or not all(isinstance(p, str) for p in self.points) or not self.points:
                raise AutoExitError(f"heads.points must be a list of exit point names, got {self.points!r}")
            object.__setattr__(self, "points", tuple(self.points))
        if self.max_duration is not None and not re.fullmatch(r"\d+(\.\d+)?[smhd]", str(self.max_duration)):
            raise AutoExitError(f"heads.max_duration must look like 30s, 10m, 2h or 1d, got {self.max_duration!r}")
        object.__setattr__(self, "train", _train_config(self.train, "heads.train") or _default_trial_train())
        if self.train.on_the_fly:
            raise AutoExitError(f"heads.train.teacher {self.train.teacher!r}: the head-search trials train on the "
                                "recorded activations; set the teacher in heads.final_train (the winners' "
                                "retraining) instead")
        if self.score_on not in SCORE_ON:
            raise AutoExitError(f"heads.score_on must be 'val' or 'holdout' (a share of the train split, keeping val "
                                f"for the guarantee), got {self.score_on!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise AutoExitError(f"heads.holdout must be a share of the train split in (0, 1), e.g. 0.2, got "
                                f"{self.holdout!r}")
        object.__setattr__(self, "final_train", _train_config(self.final_train, "heads.final_train"))
        object.__setattr__(self, "cost_weight", float(self.cost_weight))
        object.__setattr__(self, "chance_margin", float(self.chance_margin))

    @classmethod
    def from_dict(cls, d: Mapping | None, **overrides) -> HeadSearchConfig:
        d = {k: v for k, v in dict(d or {}).items() if k != "search"}
        d.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AutoExitError(f"unknown heads setting(s) {', '.join(unknown)}; valid: search, "
                                f"{', '.join(sorted(known))}")
        if isinstance(d.get("points"), list):
            d["points"] = tuple(d["points"])
        return cls(**d)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["space"] = load_head_space(self.space).to_dict() if not isinstance(self.space, (str, Path)) \
            else str(self.space)
        out["train"] = self.train.to_dict()
        out["final_train"] = self.final_train.to_dict() if self.final_train is not None else None
        out["points"] = list(self.points) if self.points is not None else None
        return out


# --------------------------------------------------------------------------- persistence


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "point"


def search_key(recording, point: str, space: HeadSpace, cfg: HeadSearchConfig, evaluator_key: str | None) -> str:
    """What a finished point's results depend on (not the port, the engine, the concurrency)."""
    payload = {
        "v": 1, "recording": Path(recording.path).name, "backbone": recording.backbone_hash,
        "data": recording.data_identity, "seed": recording.seed, "split": list(recording.split_fractions),
        "point": point, "space": space.to_dict(), "strategy": cfg.strategy, "max_trials": cfg.max_trials,
        "search_seed": cfg.seed, "cost": cfg.cost, "cost_weight": cfg.cost_weight, "cost_basis": cfg.cost_basis,
        "train": cfg.train.to_dict(), "chance_margin": cfg.chance_margin, "trial_samples": cfg.trial_samples,
        "max_cost_fraction": cfg.max_cost_fraction,
        "evaluator": evaluator_key if cfg.cost == "latency" else None,
    }
    if cfg.score_on != "val":  # (only then: searches scored on val keep the keys they were saved under)
        payload.update(score_on=cfg.score_on, holdout=cfg.holdout)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def point_dir(workdir: str | Path, point: str, key: str) -> Path:
    return Path(workdir) / "points" / f"{_safe(point)}-{key}"


class TrialStore:
    """``trials.jsonl`` (one line per trial, appended atomically) and ``weights/<trial>.pt`` of one exit point."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.file = self.dir / "trials.jsonl"

    def records(self) -> list[dict]:
        if not self.file.is_file():
            return []
        out = []
        for line in self.file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed writer
        return out

    def count(self) -> int:
        if not self.file.is_file():
            return 0
        with open(self.file, "rb") as f:
            return sum(1 for _ in f)

    def append(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, default=float) + "\n").encode()
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one write with O_APPEND: lines of concurrent trials never interleave
        finally:
            os.close(fd)

    def find(self, spec_json: str) -> dict | None:
        for r in self.records():
            if r.get("spec_json") == spec_json and not r.get("duplicate_of"):
                return r
        return None

    def weights(self, trial: str) -> Path:
        return self.dir / "weights" / f"{_safe(trial)}.pt"


# --------------------------------------------------------------------------- the trial objective


SCORE_ON = ("val", "holdout")


def holdout_split(n: int, fraction: float, seed: int):
    """``(fit, holdout)`` row indices of a split of ``n`` samples: a seeded random ``fraction`` held out."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    k = min(max(1, int(round(fraction * n))), n - 1)
    return perm[k:], perm[:k]


def chance_agreement(recording, split: str = "val", rows=None) -> float:
    """Agreement of a constant head: the share of the backbone's most frequent class on ``split`` (its
    ``rows`` only, when given)."""
    import torch

    pred = recording.logits(split).argmax(1)
    if rows is not None:
        pred = pred[rows]
    if not len(pred):
        return 0.0
    return float(torch.bincount(pred, minlength=recording.num_classes).max()) / len(pred)


def open_recording(ctx: Mapping):
    """The Recording a trial context names (trials re-open it from disk; nothing is re-recorded)."""
    from ..data import Recording
    from ..points import ExitPoint

    r = ctx["recording"]
    return Recording(Path(r["path"]), [ExitPoint.from_dict(p) for p in r["points"]], int(r["num_classes"]),
                     r["backbone_hash"], r["data_identity"], int(r["n"]), int(r["seed"]), tuple(r["split"]))


def recording_context(recording) -> dict:
    return {"path": str(Path(recording.path).resolve()), "points": [p.to_dict() for p in recording.points],
            "num_classes": recording.num_classes, "backbone_hash": recording.backbone_hash,
            "data_identity": recording.data_identity, "n": recording.n, "seed": recording.seed,
            "split": list(recording.split_fractions)}


def scoring_chance(recording, cfg: HeadSearchConfig) -> float:
    """:func:`chance_agreement` on the data the trials are scored on (val, or the train split's holdout)."""
    if cfg.score_on == "holdout":
        n = len(recording.logits("train"))
        return chance_agreement(recording, "train", holdout_split(n, cfg.holdout, cfg.seed)[1])
    return chance_agreement(recording)


def trial_context(recording, point, cfg: HeadSearchConfig, store: str | Path, *, total_flops: float,
                  chance: float | None = None, evaluator: Mapping | None = None,
                  base_latency_ms: float | None = None) -> dict:
    """Everything a trial at ``point`` needs, as plain JSON (written to ``context.json`` for trial processes)."""
    base_flops = point.flops_after if cfg.cost_basis == "remaining" and point.flops_after else total_flops
    ctx = {"point": point.name, "recording": recording_context(recording), "store": str(store),
           "engine": cfg.engine, "train": {k: v for k, v in cfg.train.to_dict().items() if k != "threads"},
           "threads": cfg.threads, "trial_samples": cfg.trial_samples, "search_seed": cfg.seed,
           "chance": scoring_chance(recording, cfg) if chance is None else float(chance),
           "score_on": cfg.score_on, "holdout": cfg.holdout,
           "chance_margin": cfg.chance_margin, "max_cost_fraction": cfg.max_cost_fraction, "cost": cfg.cost,
           "cost_weight": cfg.cost_weight, "cost_basis": cfg.cost_basis, "base_flops": float(base_flops),
           "evaluator": evaluator}
    if cfg.cost == "latency" and base_latency_ms is None:
        raise AutoExitError("cost: latency needs the backbone's measured latency (base_latency_ms)")
    if base_latency_ms is not None:
        ctx["base_latency_ms"] = float(base_latency_ms)
    return ctx


_DATA_CACHE: dict[tuple, tuple] = {}


def _trial_data(ctx: Mapping):
    """Train/val activations and teacher logits of the context's point (kept in memory for in-process trials)."""
    import torch

    score_on = ctx.get("score_on", "val")
    key = (ctx["recording"]["path"], ctx["point"], ctx.get("trial_samples"), ctx["search_seed"], score_on,
           ctx.get("holdout"))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        rec = open_recording(ctx)
        x_tr, t_tr = rec.activations(ctx["point"], "train"), rec.logits("train")
        if score_on == "holdout":  # val is never read: a share of train scores the trials
            fit, held = holdout_split(len(x_tr), float(ctx["holdout"]), int(ctx["search_seed"]))
            x_va, t_va = x_tr[held], t_tr[held]
            x_tr, t_tr = x_tr[fit], t_tr[fit]
        else:
            x_va, t_va = rec.activations(ctx["point"], "val"), rec.logits("val")
        n = ctx.get("trial_samples")
        if n and n < len(x_tr):
            idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(int(ctx["search_seed"])))[:n]
            x_tr, t_tr = x_tr[idx], t_tr[idx]
        _DATA_CACHE[key] = (x_tr, t_tr, x_va, t_va)
    return _DATA_CACHE[key]


def run_trial(ctx: Mapping, spec, trial_id: str, sample: Mapping | None = None, on_epoch=None) -> dict:
    """Train ``spec`` at the context's point, score it, persist it; return the trial record.

    The record's ``status`` is ``ok``, ``chance`` (no better than chance) or ``too_costly``
    (normalised cost above ``max_cost_fraction``: not trained); a spec already
    trained at this point (same canonical spec) is not trained again: its record is copied
    with ``duplicate_of``. ``on_epoch(history_entry)`` is called per epoch (after training).
    """
    import torch

    from ..cost import count_flops, count_params
    from ..distill import TrainConfig, agreement, kd_loss, predict_head, train_head
    from ..heads import build_head

    store = TrialStore(ctx["store"])
    spec_json = spec.to_json()
    prev = store.find(spec_json)
    if prev is not None:
        rec = {**prev, "trial": trial_id, "sample": dict(sample or {}), "duplicate_of": prev["trial"],
               "time": time.time()}
        store.append(rec)
        return rec
    shape = next(tuple(int(s) for s in p["shape"]) for p in ctx["recording"]["points"] if p["name"] == ctx["point"])
    tc = TrainConfig(**{**ctx["train"], "threads": ctx.get("threads")})
    torch.manual_seed(tc.seed)
    head = build_head(spec, shape, int(ctx["recording"]["num_classes"]))
    # the cost first: it needs no training, and a head too costly to pay off is not trained
    flops = count_flops(head, torch.zeros(1, *shape))
    metrics: dict[str, float] = {"chance": float(ctx["chance"]), "flops": float(flops),
                                 "params": float(count_params(head))}
    if ctx.get("evaluator") is not None:
        from ..evaluator import MeasureSettings, evaluator_from_config

        ev = evaluator_from_config(ctx["evaluator"])
        metrics["latency_ms"] = float(ev.measure(head, input_shapes=shape, settings=MeasureSettings.quick()).median_ms)
    if ctx["cost"] == "latency":
        cost_fraction = metrics["latency_ms"] / float(ctx["base_latency_ms"])
    else:
        cost_fraction = flops / float(ctx["base_flops"])
    metrics["cost_fraction"] = cost_fraction
    cap = ctx.get("max_cost_fraction")
    if cap is not None and cost_fraction > float(cap):
        rec = {"trial": trial_id, "point": ctx["point"], "status": "too_costly", "spec": spec.to_dict(),
               "spec_json": spec_json, "describe": spec.describe(), "sample": dict(sample or {}),
               "metrics": metrics, "history": [], "weights": None, "time": time.time()}
        store.append(rec)
        return rec
    x_tr, t_tr, x_va, t_va = _trial_data(ctx)
    t0 = time.perf_counter()
    head, history = train_head(head, x_tr, t_tr, x_va, t_va, tc, desc=ctx["point"])
    seconds = time.perf_counter() - t0
    if on_epoch is not None:
        for h in history:
            on_epoch(h)
    pv = predict_head(head, x_va)
    agree = agreement(pv, t_va)
    metrics.update(agreement=agree, kl=float(kd_loss(pv, t_va)), epochs=float(len(history)), train_seconds=seconds)
    metrics["score"] = agree - float(ctx["cost_weight"]) * cost_fraction
    ok = agree > float(ctx["chance"]) + float(ctx["chance_margin"])
    wpath = store.weights(trial_id)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = wpath.with_name(f".{wpath.name}.tmp-{os.getpid()}")
    torch.save(head.state_dict(), tmp)
    os.replace(tmp, wpath)
    rec = {"trial": trial_id, "point": ctx["point"], "status": "ok" if ok else "chance", "spec": spec.to_dict(),
           "spec_json": spec_json, "describe": spec.describe(), "sample": dict(sample or {}), "metrics": metrics,
           "history": history, "weights": wpath.name, "time": time.time()}
    store.append(rec)
    return rec


# --------------------------------------------------------------------------- results


@dataclass
class PointResult:
    """One exit point's search: its experiment, trials, winner (or why it was discarded)."""

    point: str
    status: str  # ok | chance (no head above chance) | too_costly (every head over max_cost_fraction): discarded
    dir: Path
    experiment_id: str | None
    trials: list[dict]
    best: dict | None
    seconds: float = 0.0
    reused: bool = False
    nni: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"point": self.point, "status": self.status, "dir": str(self.dir),
                "experiment_id": self.experiment_id, "best": _slim(self.best) if self.best else None,
                "trials": [_slim(t) for t in self.trials], "seconds": self.seconds, "reused": self.reused,
                "nni": self.nni}

    @classmethod
    def from_dict(cls, d: Mapping) -> PointResult:
        return cls(d["point"], d["status"], Path(d["dir"]), d.get("experiment_id"), list(d.get("trials", [])),
                   d.get("best"), float(d.get("seconds", 0.0)), True, dict(d.get("nni", {})))


def _slim(r: Mapping) -> dict:
    return {k: v for k, v in r.items() if k not in ("history", "spec_json")}


@dataclass
class HeadSearchResult:
    """What ``search_heads`` found: the best head per exit point, trained, ready for ``pipeline.assemble``.

    ``specs`` / ``heads``: the winners of the points that have one (heterogeneous per point);
    ``failed``: points discarded because no sampled head beat chance (or every one was too
    costly); ``points``: every
    searched point's :class:`PointResult` (experiment id and directory, all trials).
    """

    config: HeadSearchConfig
    space: HeadSpace
    specs: dict
    heads: dict
    failed: list[str]
    points: dict[str, PointResult]
    workdir: Path
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        out = []
        for name, pr in self.points.items():
            b = pr.best or {}
            m = b.get("metrics", {})
            out.append({"point": name, "status": pr.status, "trials": len(pr.trials),
                        "head": b.get("describe", "-"), "agreement": m.get("agreement"), "chance": m.get("chance"),
                        "flops": m.get("flops"), "latency_ms": m.get("latency_ms"), "score": m.get("score"),
                        "experiment": pr.experiment_id})
        return out

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "space": self.space.to_dict(), "space_name": self.space.name,
                "specs": {k: v.to_dict() for k, v in self.specs.items()}, "failed": list(self.failed),
                "points": {k: v.to_dict() for k, v in self.points.items()}, "workdir": str(self.workdir),
                "seconds": self.seconds}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.workdir / "search.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        os.replace(tmp, path)
        return path
