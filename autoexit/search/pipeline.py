"""The whole searched pipeline in one go, and the trained-head cache it resumes from.

``run_search(config)`` = record (cached) -> optional NNI head search
(:mod:`autoexit.search.nni_heads`, imported lazily) -> train heads (cached per
head) -> Optuna outer search (:mod:`autoexit.search.outer`) -> emit the
artifact of the chosen Pareto-front point. ``autoexit search --config X.yaml``
runs it; ``autoexit search outer --config X.yaml`` runs the same steps without
the head search (recording and heads come from the caches when present).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AutoExitError

__all__ = [
    "ExperimentConfig",
    "load_experiment",
    "SearchRun",
    "run_search",
    "run_outer",
    "build_backbone",
    "build_data",
    "train_heads_cached",
    "head_cache_key",
]

NAS_HINT = "pip install 'autoexit[nas]'"
BACKBONES = ("digits_cnn", "cifar_resnet", "file")
DATA_SOURCES = ("digits", "image_folder", "idx", "tensors")
NORMALISATIONS = {"cifar": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _nni_heads():
    """The NNI head-search module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("autoexit.search.nni_heads")
    except ModuleNotFoundError as exc:
        missing = exc.name or "nni"
        raise AutoExitError(f"the NNI head search needs '{missing}', which is not installed; install it with: "
                            f"{NAS_HINT}") from None


# --------------------------------------------------------------------------- the experiment file


def _section(d: Mapping, key: str, known: Sequence[str], where: str) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, Mapping):
        raise AutoExitError(f"{where}.{key} must be a mapping, got {type(v).__name__}")
    unknown = sorted(set(v) - set(known))
    if unknown:
        raise AutoExitError(f"unknown {where}.{key} setting(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return dict(v)


def _path(v) -> str | None:
    return None if v is None else os.path.expanduser(os.path.expandvars(str(v)))


@dataclass(frozen=True)
class ExperimentConfig:
    """One searched run, as an ``experiments/*.yaml`` file names it (registry keys, never code).

    backbone: ``{zoo: digits_cnn, epochs, width}`` (trained on the other half of digits, as the
    quickstart), ``{zoo: cifar_resnet, checkpoint: path}``, ``{zoo: file, path: model.pt2 |
    scripted.pt, weights: optional}``. data: ``{source: digits, shifts}``, ``{source:
    image_folder, path, size, normalize: cifar|imagenet | mean/std, limit}``, ``{source: idx,
    images, labels, limit}``, ``{source: tensors, path}``. enable: ``EnableConfig`` fields.
    heads: ``{search: bool, space, strategy, max_trials, port, ...}`` (the NNI head search; every key but
    ``search`` goes to ``autoexit.search.nni_heads.search_heads`` as its ``config``).
    outer: ``space`` (a name in search_spaces/ or a file), ``storage``, ``study_name`` and
    every ``OuterSettings`` field (``n_trials`` is the study's total). evaluator: device
    evaluator settings (``autoexit.evaluator.evaluator_from_config``), used when
    ``outer.cost`` is ``latency``. emit: ``{out, latency, onnx}``.
    """

    name: str
    run_dir: str
    seed: int = 0
    backbone: Mapping = field(default_factory=dict)
    data: Mapping = field(default_factory=dict)
    enable: Mapping = field(default_factory=dict)
    heads: Mapping = field(default_factory=dict)
    outer: Mapping = field(default_factory=dict)
    evaluator: Mapping | None = None
    emit: Mapping = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping, source: str | None = None) -> ExperimentConfig:
        from ..pipeline import EnableConfig
        from .outer import OuterSettings, load_space

        if not isinstance(d, Mapping):
            raise AutoExitError("an experiment file must hold a mapping (name, backbone, data, outer, ...)")
        known = [f.name for f in fields(cls) if f.name != "source"]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise AutoExitError(f"unknown experiment setting(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        name = str(d.get("name") or (Path(source).stem if source else "experiment"))
        bb = _section(d, "backbone", ("zoo", "epochs", "width", "checkpoint", "path", "weights"), "experiment")
        if bb.get("zoo") not in BACKBONES:
            raise AutoExitError(f"backbone.zoo must be one of {', '.join(BACKBONES)}, got {bb.get('zoo')!r}")
        if bb["zoo"] == "cifar_resnet" and not bb.get("checkpoint"):
            raise AutoExitError("backbone zoo cifar_resnet needs checkpoint: path/to/resnet20-*.th")
        if bb["zoo"] == "file" and not bb.get("path"):
            raise AutoExitError("backbone zoo file needs path: a torch.export .pt2 program or a TorchScript file")
        data = _section(d, "data", ("source", "shifts", "path", "size", "normalize", "mean", "std", "limit",
                                    "images", "labels"), "experiment")
        if data.get("source") not in DATA_SOURCES:
            raise AutoExitError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {data.get('source')!r}")
        if data.get("normalize") is not None and data["normalize"] not in NORMALISATIONS:
            raise AutoExitError(f"data.normalize must be one of {', '.join(NORMALISATIONS)}, got {data['normalize']!r}")
        heads = d.get("heads") or {}
        if not isinstance(heads, Mapping):
            raise AutoExitError("experiment.heads must be a mapping (search, space, strategy, max_trials, port, ...)")
        heads = dict(heads)  # validated by the head search itself (autoexit.search.head_space.HeadSearchConfig)
        if not isinstance(heads.get("search", False), bool):
            raise AutoExitError(f"heads.search must be true or false, got {heads['search']!r}")
        outer = dict(_section(d, "outer", ("space", "storage", "study_name",
                                           *[f.name for f in fields(OuterSettings)]), "experiment"))
        emit = _section(d, "emit", ("out", "latency", "onnx"), "experiment")
        seed = int(d.get("seed", 0))
        enable = dict(d.get("enable") or {})
        enable.setdefault("seed", seed)
        # validate every section now, so a typo fails before any recording or training
        EnableConfig.from_dict(enable)
        OuterSettings.from_dict({k: v for k, v in outer.items() if k not in ("space", "storage", "study_name")})
        load_space(outer.get("space"))
        ev = d.get("evaluator")
        if ev is not None and not isinstance(ev, (Mapping, str)):
            raise AutoExitError("evaluator must be a mapping (url, token_file, ...) or a URL")
        return cls(name=name, run_dir=str(d.get("run_dir") or f"runs/{name}"), seed=seed, backbone=bb, data=data,
                   enable=enable, heads=heads, outer=outer, evaluator=ev, emit=emit, source=source)

    def enable_config(self):
        from ..pipeline import EnableConfig

        return EnableConfig.from_dict(self.enable)

    def outer_settings(self, **overrides):
        from .outer import OuterSettings

        d = {k: v for k, v in self.outer.items() if k not in ("space", "storage", "study_name")}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return OuterSettings.from_dict(d)


def load_experiment(path: str | Path | Mapping | ExperimentConfig) -> ExperimentConfig:
    """An experiment from a YAML file, a mapping or as given."""
    if isinstance(path, ExperimentConfig):
        return path
    if isinstance(path, Mapping):
        return ExperimentConfig.from_dict(path)
    p = Path(path)
    if not p.is_file():
        cand = Path(__file__).resolve().parents[2] / "experiments" / f"{p.name}.yaml"
        if p.suffix or not cand.is_file():
            raise AutoExitError(f"experiment file {p} does not exist; give a YAML file such as experiments/*.yaml")
        p = cand
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise AutoExitError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return ExperimentConfig.from_dict(d or {}, source=str(p))


# --------------------------------------------------------------------------- registries


def build_backbone(cfg: ExperimentConfig, progress: bool = True, example=None):
    """The backbone an experiment names (``digits_cnn`` is trained once and cached in the run directory)."""
    import torch

    bb = cfg.backbone
    kind = bb["zoo"]
    if kind == "digits_cnn":
        from ..zoo import DigitsCNN, trained_digits_cnn

        epochs = int(bb.get("epochs", 30))
        width = int(bb.get("width", 32))
        model = DigitsCNN(width=width)
        f = Path(cfg.run_dir) / f"backbone-digits_cnn-w{width}-e{epochs}-s{cfg.seed}.pt"
        if f.is_file():
            try:
                model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
                return model.eval()
            except Exception:  # noqa: BLE001 - a damaged cache is retrained
                pass
        model = trained_digits_cnn(width, epochs, cfg.seed, augment_shift=1, progress=progress)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, f)
        return model.eval()
    if kind == "cifar_resnet":
        from ..zoo import load_cifar_resnet

        return load_cifar_resnet(_path(bb["checkpoint"]))
    from ..zoo import load_backbone

    path = Path(_path(bb["path"]))
    if not path.is_file():
        raise AutoExitError(f"backbone file {path} does not exist (experiments name files, never Python code)")
    return load_backbone(path, _path(bb.get("weights")), example)


def build_data(cfg: ExperimentConfig):
    """The inference data an experiment names (labels, when present, only for reporting)."""
    from .. import data as D

    d = cfg.data
    src = d["source"]
    limit = d.get("limit")
    if src == "digits":
        return D.load_digits("inference", seed=cfg.seed, shifts=bool(d.get("shifts", True)))
    if src == "image_folder":
        mean, std = d.get("mean"), d.get("std")
        if d.get("normalize"):
            mean, std = NORMALISATIONS[d["normalize"]]
        return D.load_image_folder(_path(d.get("path")), size=d.get("size"), mean=mean, std=std, limit=limit)
    if src == "idx":
        return D.load_idx(_path(d.get("images")), _path(d.get("labels")), limit=limit)
    return D.load_tensors(_path(d.get("path")))


def _specs_from_nni(found) -> tuple[dict, dict | None]:
    """(specs, trained heads or None) from whatever ``search_heads`` returns (specs, heads, or an object holding them)."""
    from ..distill import TrainedHead
    from ..heads import HeadSpec

    for attr in ("heads", "trained"):
        v = getattr(found, attr, None)
        if isinstance(v, Mapping) and v and all(isinstance(x, TrainedHead) for x in v.values()):
            return {k: h.spec for k, h in v.items()}, dict(v)
    for attr in ("specs", "head_specs", "best_specs"):
        v = getattr(found, attr, None)
        if isinstance(v, Mapping):
            found = v
            break
    if isinstance(found, Mapping):
        if found and all(isinstance(x, TrainedHead) for x in found.values()):
            return {k: h.spec for k, h in found.items()}, dict(found)
        return {k: v if isinstance(v, HeadSpec) else HeadSpec.from_dict(v) for k, v in found.items()}, None
    raise AutoExitError(f"the NNI head search returned {type(found).__name__}; expected head specs per exit point")


# --------------------------------------------------------------------------- the run


@dataclass
class SearchRun:
    """What ``run_search`` produced: the fixed-rule result, the search, the emitted result and artifact."""

    config: ExperimentConfig
    baseline: Any  # EnableResult of the core pipeline's fixed rule (same heads)
    outer: Any  # OuterSearchResult
    result: Any  # EnableResult of the chosen plan (None with emit=False and no heads)
    artifact: Path | None
    recorded_path: Path | None
    timings: dict = field(default_factory=dict)


def _heads_stage(cfg: ExperimentConfig, backbone, data, tb, points, rec, enable_cfg, progress: bool,
                 head_search: bool | None):
    from ..pipeline import _specs_for

    specs = _specs_for(points, enable_cfg, rec.num_classes)
    want = cfg.heads.get("search", False) if head_search is None else head_search
    names = None
    if want:
        mod = _nni_heads()
        ev = {"url": cfg.evaluator} if isinstance(cfg.evaluator, str) else cfg.evaluator
        found = mod.search_heads(prepared=(tb, points, rec), config={k: v for k, v in cfg.heads.items()
                                                                      if k != "search"},
                                 enable=enable_cfg, evaluator=ev, workdir=Path(cfg.run_dir) / "nni-heads",
                                 progress=progress)
        nni_specs, trained = _specs_from_nni(found)
        if trained:  # the winners come trained; points no head could learn are discarded (paper 003, 3.2)
            return {p.name: trained[p.name] for p in points if p.name in trained}
        specs.update(nni_specs)
        names = [p.name for p in points if p.name in nni_specs]
    return train_heads_cached(rec, specs, enable_cfg.train, cache_dir=Path(cfg.run_dir) / "heads",
                              points=names, progress=progress, backbone=tb)


def run_search(config: str | Path | Mapping | ExperimentConfig, *, head_search: bool | None = None,
               storage: Any = None, study_name: str | None = None, n_trials: int | None = None,
               seed: int | None = None, emit: bool = True, progress: bool = True) -> SearchRun:
    """The whole pipeline: record -> (NNI heads) -> train heads -> Optuna outer search -> emit.

    Every stage resumes: the recording and the trained heads are cached, the study
    lives in ``storage`` (default ``<run_dir>/optuna.db``) under ``study_name`` (default
    the experiment name) and ``n_trials`` (default ``outer.n_trials``) caps its total
    trials, so re-running continues it. ``head_search``: override ``heads.search``.
    The artifact goes to ``<run_dir>/<emit.out>`` (default ``artifact``), with the
    search's Pareto front and importances in its report.
    """
    import torch

    from ..pipeline import assemble, prepare
    from .outer import (
        Recorded,
        fixed_rule,
        latency_costs,
        load_space,
        optimize,
        subset_result,
        verify_end_to_end,
    )

    cfg = load_experiment(config)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.outer_settings(seed=seed)
    space = load_space(cfg.outer.get("space"))
    enable_cfg = cfg.enable_config()
    certified = settings.pick.certified  # its trials read the train split, with temperatures fitted there
    folds = int(enable_cfg.cross_fit)
    if folds and not certified:
        raise AutoExitError(f"enable.cross_fit: {folds} has the certified pick score its trials on out-of-fold train "
                            f"predictions, but outer.pick.rule is {settings.pick.rule!r}, whose trials read val; "
                            "set outer.pick.rule: certified, or drop cross_fit")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    backbone = build_backbone(cfg, progress=progress, example=data.example())
    timings["backbone_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tb, points, rec = prepare(backbone, data, enable_cfg, progress=progress)
    timings["record_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    heads = _heads_stage(cfg, backbone, data, tb, points, rec, enable_cfg, progress, head_search)
    timings["heads_s"] = time.perf_counter() - t0
    oof = None
    if folds:  # the trials see the heads as new data will (their own train data flatters the late ones)
        t0 = time.perf_counter()
        oof = out_of_fold_cached(rec, heads, enable_cfg, run_dir / "heads", progress=progress, backbone=tb)
        timings["cross_fit_s"] = time.perf_counter() - t0
    # every signal: any outer space can run on it
    recorded = Recorded.from_heads(tb, rec, heads, fit=certified, fit_predictions=oof, folds=folds)
    # the core's fixed rule with these heads: the baseline the report compares with, and the base to emit from
    sig = enable_cfg.signal if enable_cfg.signal in recorded.signals else "max_softmax"
    fixed = fixed_rule(recorded, enable_cfg.tolerance, enable_cfg.scheme if isinstance(enable_cfg.scheme, str)
                       else "halving", sig, enable_cfg.basis, enable_cfg.exhaustive_limit)
    base_cfg = _paper003(enable_cfg)
    baseline = assemble(base_cfg, tb, points, rec, heads, subset=subset_result(recorded, fixed, enable_cfg.basis),
                        timings=dict(timings), temperatures_on="train" if certified else None,
                        predictions=None if oof is None else {"train": oof})
    baseline.fit_predictions = oof
    recorded.source = baseline
    evaluator = None
    if settings.cost == "latency":
        from ..evaluator import evaluator_from_config

        evaluator = evaluator_from_config(cfg.evaluator)
        recorded = recorded.with_latency(latency_costs(baseline, evaluator, stat=settings.latency_stat))
    rpath = recorded.save(run_dir / "recorded.npz")
    part = _partition_settings(space, baseline, run_dir, evaluator, progress)
    t0 = time.perf_counter()
    common = dict(storage=storage or cfg.outer.get("storage"), study_name=study_name or cfg.outer.get("study_name")
                  or cfg.name, max_trials=n_trials or settings.n_trials, space=space, settings=settings,
                  run_dir=run_dir, progress=progress)
    if part is None:
        res = optimize(recorded, **common)
    else:  # split points, exits per part and placement are searched too; the cost is the partitioned latency
        from ..partition import optimize_partitioned

        res = optimize_partitioned(recorded, part, **common)
    timings["outer_s"] = time.perf_counter() - t0
    _write_json(run_dir / "search.json", res.to_dict())
    result = artifact = None
    if emit:
        t0 = time.perf_counter()
        result = res.apply(baseline)
        result.extra["search"]["experiment"] = {"name": cfg.name, "source": cfg.source, "timings": timings}
        e = cfg.emit
        out = run_dir / str(e.get("out", "artifact"))
        if part is not None:
            from ..partition import emit_partitioned, plan_from_search

            artifact = emit_partitioned(result, plan_from_search(res, part), out, profile=part["profile"],
                                        overwrite=True, measure=bool(e.get("latency", False)), progress=progress)
        else:
            if evaluator is not None:  # the chosen configuration timed end to end where its costs were profiled
                verify_end_to_end(result, recorded, evaluator)
            artifact = result.emit(out, overwrite=True, latency=bool(e.get("latency", False)),
                                   onnx=bool(e.get("onnx", False)))
        timings["emit_s"] = time.perf_counter() - t0
    return SearchRun(cfg, baseline, res, result, artifact, rpath, timings)


def _partition_settings(space, baseline, run_dir: Path, evaluator, progress: bool) -> dict | None:
    """The space's partition block with its profile (measured on ``evaluator`` and saved in the run directory
    as ``profile.json`` for distributed workers, unless the block names one), or None when not partitioned."""
    if not space.partition:
        return None
    from ..partition import profile_result

    part = dict(space.partition)
    if part.get("profile") is None:
        prof = profile_result(baseline, evaluator=evaluator, progress=progress)
        prof.to_json(run_dir / "profile.json")
        part["profile"] = prof
    return part


def _paper003(enable_cfg):
    """The config with paper 003's threshold rule named, where exit policies are configurable."""
    from dataclasses import replace

    if "policy" in {f.name for f in fields(enable_cfg)}:  # (cross_fit is a guaranteed policy's option)
        return replace(enable_cfg, policy="paper003", cross_fit=0)
    return enable_cfg


def run_outer(recorded, *, config: str | Path | Mapping | ExperimentConfig | None = None, storage: Any = None,
              study_name: str | None = None, n_trials: int | None = None, seed: int | None = None,
              run_dir: str | Path | None = None, progress: bool = True):
    """Only the outer search, on recorded predictions (a :class:`~autoexit.search.outer.Recorded` or its .npz).

    What distributed workers run: every worker gets the same ``recorded.npz`` and the
    same storage URL / study name; ``n_trials`` caps the study's total.
    """
    from .outer import OuterSettings, Recorded, load_space, optimize

    if not isinstance(recorded, Recorded):
        recorded = Recorded.load(recorded)
    cfg = load_experiment(config) if config is not None else None
    settings = cfg.outer_settings(seed=seed) if cfg else OuterSettings.from_dict({"seed": seed} if seed is not None
                                                                                 else {})
    space = load_space(cfg.outer.get("space") if cfg else None)
    rd = Path(run_dir or (cfg.run_dir if cfg else "runs/outer"))
    name = study_name or (cfg.outer.get("study_name") if cfg else None) or (cfg.name if cfg else "autoexit-outer")
    common = dict(storage=storage or (cfg.outer.get("storage") if cfg else None), study_name=name,
                  max_trials=n_trials or settings.n_trials, space=space, settings=settings, run_dir=rd,
                  progress=progress)
    if not space.partition:
        return optimize(recorded, **common)
    from ..partition import optimize_partitioned

    part = dict(space.partition)
    if part.get("profile") is None:  # the profile the first `autoexit search --config` run saved
        if not (rd / "profile.json").is_file():
            raise AutoExitError(f"a partitioned search needs the backbone's profile: name it in the space's partition "
                                f"block (profile: path.json) or put the profile.json of `autoexit search --config` "
                                f"into {rd}")
        part["profile"] = str(rd / "profile.json")
    return optimize_partitioned(recorded, part, **common)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trained-head cache




def head_cache_key(recording, name: str, spec, train) -> str:
    """Key of one trained head: the recording (backbone + data + points), the point, the spec, the training."""
    h = hashlib.sha256()
    h.update(f"v1|{Path(recording.path).name}|{recording.backbone_hash}|{recording.data_identity}|{recording.seed}|"
             f"{name}|{spec.to_json()}|{json.dumps(train.to_dict(), sort_keys=True)}".encode())
    return h.hexdigest()[:24]


def out_of_fold_cached(recording, heads: Mapping, config, cache_dir: str | Path | None = None,
                       progress: bool = True, backbone=None):
    """:func:`autoexit.pipeline.out_of_fold_predictions` (``config.cross_fit`` folds) with one cached file.

    The key is every head's :func:`head_cache_key` and the number of folds; the file holds the logits only,
    written atomically, and a damaged one is recomputed.
    """
    import torch

    from ..calibrate import ExitPredictions
    from ..pipeline import out_of_fold_predictions

    names = [p.name for p in recording.points if p.name in heads]
    h = hashlib.sha256(f"oof-v1|{config.cross_fit}".encode())
    for n in names:
        h.update(f"|{head_cache_key(recording, n, heads[n].spec, config.train)}".encode())
    f = Path(cache_dir) / f"oof-{h.hexdigest()[:24]}.pt" if cache_dir is not None else None
    if f is not None and f.is_file():
        try:
            z = torch.load(f, map_location="cpu", weights_only=True)
            ref = recording.logits("train")
            if tuple(z.shape) == (len(names), *tuple(ref.shape)):  # (ExitPredictions refuses non-finite logits)
                return ExitPredictions(names, z, ref, recording.labels("train"))
        except Exception:  # noqa: BLE001 - a damaged, mis-shaped or non-finite cache entry is recomputed
            pass
    preds = out_of_fold_predictions(recording, heads, config, progress, backbone=backbone)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=f.parent)
        os.close(fd)
        try:
            torch.save(preds.logits, tmp)
            os.replace(tmp, f)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return preds


def train_heads_cached(recording, specs: Mapping | None = None, train=None, cache_dir: str | Path | None = None,
                       points: Sequence[str] | None = None, progress: bool = True, backbone=None) -> dict:
    """``autoexit.distill.train_heads`` with one cached file per trained head.

    A head is trained only when ``cache_dir`` holds no head for the same recording,
    point, spec and training settings (see :func:`head_cache_key`); each trained
    head is saved as soon as it is done, so an interrupted run resumes where it
    stopped. Files are ``torch.save`` dicts of the state_dict and the head's
    metadata, loaded back with ``weights_only=True``. With an on-the-fly
    ``train.teacher`` the missing heads are trained together (one backbone pass per
    batch; ``backbone``: the recording's ``TracedBackbone``) and saved when all are done.
    """
    import torch

    from ..distill import TrainConfig, TrainedHead, train_heads
    from ..heads import HeadSpec, build_head, default_head_spec

    train = train or TrainConfig()
    specs = dict(specs or {})
    cache = Path(cache_dir) if cache_dir is not None else None
    names = list(points) if points is not None else [p.name for p in recording.points]
    out: dict[str, TrainedHead] = {}
    todo: list[str] = []
    for name in names:
        p = recording.point(name)
        spec = specs.get(name) or default_head_spec(p.shape, recording.num_classes)
        specs[name] = spec
        f = cache / f"head-{head_cache_key(recording, name, spec, train)}.pt" if cache is not None else None
        if f is not None and f.is_file():
            try:
                d = torch.load(f, map_location="cpu", weights_only=True)
                module = build_head(HeadSpec.from_dict(d["spec"]), p.shape, recording.num_classes)
                module.load_state_dict(d["state_dict"])
                module.eval()
                out[name] = TrainedHead(point=p, spec=spec, module=module, flops=int(d["flops"]),
                                        params=int(d["params"]), param_bytes=int(d["param_bytes"]),
                                        val_agreement=float(d["val_agreement"]), val_kl=float(d["val_kl"]),
                                        epochs=int(d["epochs"]), seconds=float(d["seconds"]),
                                        history=list(d.get("history", [])))
                continue
            except Exception:  # noqa: BLE001 - a damaged cache entry is retrained
                pass
        todo.append(name)
    together = {}  # on the fly: one joint run (a head's weights do not depend on the others trained with it)
    if train.on_the_fly and todo:
        together = train_heads(recording, {n: specs[n] for n in todo}, train, points=todo, progress=progress,
                               backbone=backbone)
    it = todo
    if progress and todo and not together:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc="training heads", unit="head")
    for name in it:
        h = together.get(name) or train_heads(recording, {name: specs[name]}, train, points=[name], progress=False)[name]
        out[name] = h
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            f = cache / f"head-{head_cache_key(recording, name, specs[name], train)}.pt"
            payload = {"spec": h.spec.to_dict(), "state_dict": h.module.state_dict(), "flops": h.flops,
                       "params": h.params, "param_bytes": h.param_bytes, "val_agreement": h.val_agreement,
                       "val_kl": h.val_kl, "epochs": h.epochs, "seconds": h.seconds, "history": h.history}
            fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=cache)
            os.close(fd)
            try:
                torch.save(payload, tmp)
                os.replace(tmp, f)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return {name: out[name] for name in names}
