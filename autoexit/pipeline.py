"""The label-free early-exit pipeline without search: ``enable(backbone, data, tolerance)``.

exit points -> record -> train heads (KL to the backbone) -> temperatures ->
thresholds + K(S) subset -> MultiExitModel -> metrics on val (chosen on) and
test (reported) -> ``emit`` the artifact. The searches in ``autoexit.search``
reuse these steps and replace the default heads (NNI) or the fixed outer
parameters (Optuna).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .artifact import write_artifact
from .calibrate import ExitPredictions, calibrate_temperatures, check_tolerance
from .cost import compare_latency
from .data import InferenceData, Recording, as_inference_data, record
from .distill import TrainConfig, TrainedHead, predict_head, train_heads
from .errors import AutoExitError
from .heads import HeadSpec
from .model import MultiExitModel, to_torchscript
from .points import ExitPoint, TracedBackbone
from .subset import SubsetResult, best_subset, oracle_flops, simulate_exits

__all__ = ["EnableConfig", "EnableResult", "enable", "predictions_for"]


@dataclass(frozen=True)
class EnableConfig:
    """Everything ``enable`` needs besides the backbone and the data.

    tolerance: accepted accuracy drop in percent; scheme: how it is split over exits
    (``halving`` = T/2^n, ``equal``); basis: ``total`` or ``reaching`` (see
    autoexit.calibrate); signal: exit score (``max_softmax``, ``margin``, ``entropy``);
    granularity / min_remaining / points / leaf_modules: exit-point discovery (see
    autoexit.points); head: one HeadSpec for every point (default: a spec per point);
    head_specs: per-point specs; train: head training; seed: split and training seed.
    """

    tolerance: float = 1.0
    scheme: str | tuple[float, ...] = "halving"
    basis: str = "total"
    signal: str = "max_softmax"
    granularity: int | str = "auto"
    min_remaining: float = 0.05
    points: tuple[str, ...] | None = None
    leaf_modules: tuple[str, ...] = ()
    head: HeadSpec | None = None
    head_specs: Mapping[str, HeadSpec] = field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    seed: int = 0
    batch_size: int = 128
    cache_dir: str | None = None
    exhaustive_limit: int = 16
    store_inputs: bool = True
    max_exits: int | None = None

    def __post_init__(self):
        check_tolerance(self.tolerance)
        if not isinstance(self.scheme, str):  # per-exit weights (as the outer search picks them)
            w = tuple(float(x) for x in self.scheme)
            if not w or any(not x >= 0 for x in w) or sum(w) <= 0:
                raise AutoExitError(f"scheme weights must be non-negative with a positive sum, got {list(w)}")
            object.__setattr__(self, "scheme", w)
        elif self.scheme not in ("halving", "equal"):
            raise AutoExitError(f"scheme must be 'halving' (T/2^n), 'equal' or per-exit weights, got {self.scheme!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> EnableConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AutoExitError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        if d.get("head") is not None and not isinstance(d["head"], HeadSpec):
            d["head"] = HeadSpec.from_dict(d["head"])
        if d.get("head_specs"):
            d["head_specs"] = {k: v if isinstance(v, HeadSpec) else HeadSpec.from_dict(v)
                               for k, v in d["head_specs"].items()}
        if d.get("train") is not None and not isinstance(d["train"], TrainConfig):
            tf = {f.name for f in fields(TrainConfig)}
            bad = sorted(set(d["train"]) - tf)
            if bad:
                raise AutoExitError(f"unknown train setting(s) {', '.join(bad)}; valid: {', '.join(sorted(tf))}")
            d["train"] = TrainConfig(**d["train"])
        if isinstance(d.get("scheme"), list):
            d["scheme"] = tuple(d["scheme"])
        for key in ("points", "leaf_modules"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["head"] = self.head.to_dict() if self.head else None
        out["head_specs"] = {k: v.to_dict() for k, v in self.head_specs.items()}
        return out


def predictions_for(recording: Recording, heads: Mapping[str, TrainedHead], split: str) -> ExitPredictions:
    """Every head's logits on a split of the recording (no backbone pass)."""
    names = [p.name for p in recording.points if p.name in heads]
    logits = torch.stack([predict_head(heads[n].module, recording.activations(n, split)) for n in names])
    return ExitPredictions(names, logits, recording.logits(split), recording.labels(split))


@dataclass
class EnableResult:
    """What ``enable`` produced: the model, how it was chosen, and how it does."""

    config: EnableConfig
    backbone: TracedBackbone
    points: list[ExitPoint]
    recording: Recording
    heads: dict[str, TrainedHead]
    temperatures: dict[str, float]
    val: ExitPredictions
    test: ExitPredictions
    subset: SubsetResult
    model: MultiExitModel
    metrics: dict
    timings: dict
    latency: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[str]:
        return list(self.subset.names)

    def emit(self, out: str | Path, overwrite: bool = False, onnx: bool = False, latency: bool = True,
             report: bool = True) -> Path:
        """Write the artifact directory (atomically); see autoexit.artifact."""
        from .report import build_report, render_html

        if latency and self.latency is None:
            self.measure_latency()
        example = self.backbone.example_input
        scripted = to_torchscript(self.model, example)
        manifest = self.manifest()
        rep = build_report(self) if report else None
        writers = {"model.pt": lambda p: _jit_save(scripted, p)}
        if rep is not None:
            import json

            writers["report.json"] = lambda p: p.write_text(json.dumps(rep, indent=1, default=float))
            writers["report.html"] = lambda p: p.write_text(render_html(rep, self))
        if onnx:
            from .export import onnx_writers

            writers.update(onnx_writers(self.model, example))
        return write_artifact(out, manifest, writers, overwrite=overwrite)

    def measure_latency(self, batch_sizes: Sequence[int] = (1, 32), rounds: int = 5) -> dict:
        """CPU latency per sample of the backbone and the early-exit model, side by side, on test inputs."""
        inputs = self.recording.inputs("test")
        scripted = to_torchscript(self.model, self.backbone.example_input)
        backbone = self.backbone.model.eval()
        res = compare_latency({"backbone": backbone, "early_exit": scripted}, inputs, batch_sizes, rounds=rounds)
        self.latency = {
            "device": {"kind": "local-cpu", "machine": platform.machine(), "processor": platform.processor(),
                       "threads": 2, "torch": torch.__version__},
            "per_sample_ms": {name: {str(b): s.median_ms for b, s in d.items()} for name, d in res.items()},
            "ratio": {str(b): res["early_exit"][b].median_ms / res["backbone"][b].median_ms
                      for b in res["backbone"]},
        }
        return self.latency

    def manifest(self) -> dict:
        temps = self.temperatures
        kept = set(self.kept)
        thr = dict(zip(self.subset.names, self.subset.thresholds.thresholds.tolist()))
        exits = []
        for i, name in enumerate(self.subset.names):
            h = self.heads[name]
            exits.append({
                "index": i,
                "name": name,
                "node": h.point.node,
                "shape": list(h.point.shape),
                "head_spec": h.spec.to_dict(),
                "temperature": float(temps[name]),
                "threshold": float(thr[name]),
                "head_flops": h.flops,
                "head_params": h.params,
                "flops_before": h.point.flops_before,
                "flops_after": h.point.flops_after,
                "val_agreement": h.val_agreement,
                "hit_rate_val": self.metrics["val"]["exit_rates"][i],
                "hit_rate_test": self.metrics["test"]["exit_rates"][i],
            })
        return {
            "autoexit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backbone": {
                "class": type(self.backbone.model).__name__,
                "hash": self.backbone.hash,
                "num_classes": self.backbone.num_classes,
                "input_shape": list(self.backbone.example_input.shape[1:]),
                "flops": self.backbone.total_flops,
                "flops_counter": "torch.utils.flop_counter.FlopCounterMode (true FLOPs, 2 per multiply-add)",
            },
            "data": {"identity": self.recording.data_identity, "n": self.recording.n,
                     "split": list(self.recording.split_fractions), "seed": self.recording.seed},
            "candidate_points": [p.to_dict() for p in self.points],
            "exits": exits,
            "dropped_points": [p.name for p in self.points if p.name not in kept],
            "policy": {"tolerance_percent": self.config.tolerance, "scheme": self.config.scheme,
                       "basis": self.config.basis, "signal": self.config.signal,
                       "rule": "exit i answers when exit_score(head_i(x) / temperature_i) >= threshold_i"},
            "expected": {
                "val": _headline(self.metrics["val"]),
                "test": _headline(self.metrics["test"]),
            },
            "latency": self.latency,
            "outputs": {"forward": "(logits [N, C], exit_index [N]); exit_index == num_exits means the backbone",
                        "forward_all": "list of every head's scaled logits, then the backbone's"},
        }

    def summary_rows(self) -> list[tuple[str, str]]:
        m = self.metrics["test"]
        rows = [
            ("exit points (candidates)", ", ".join(p.name for p in self.points)),
            ("kept exits", ", ".join(self.kept) or "none (no exit pays off)"),
            ("test samples", str(m["n"])),
        ]
        if m.get("backbone_accuracy") is not None:
            rows += [
                ("backbone accuracy", f"{100 * m['backbone_accuracy']:.2f} %"),
                ("early-exit accuracy", f"{100 * m['accuracy']:.2f} %"),
                ("accuracy drop", f"{100 * m['accuracy_drop']:.2f} points (tolerance {self.config.tolerance} %)"),
            ]
        rows += [
            ("agreement with backbone", f"{100 * m['agreement']:.2f} %"),
            ("FLOPs per sample", f"{m['expected_flops']:,.0f} of {m['base_flops']:,.0f}"),
            ("FLOPs saved", f"{100 * m['saving']:.1f} % (oracle with these heads: {100 * m['oracle_saving']:.1f} %)"),
            ("exit rates", ", ".join(f"{n}: {100 * r:.1f} %" for n, r in
                                     zip([*self.kept, "backbone"], m["exit_rates"]))),
        ]
        if self.latency:
            r = self.latency["ratio"]
            rows.append(("CPU latency vs backbone", ", ".join(f"batch {b}: {v:.2f}x" for b, v in r.items())))
        return rows


def _jit_save(scripted, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path))


def _headline(m: dict) -> dict:
    keys = ("n", "accuracy", "backbone_accuracy", "accuracy_drop", "agreement", "expected_flops", "base_flops",
            "saving", "oracle_saving", "exit_rates")
    return {k: m.get(k) for k in keys}


def split_metrics(preds: ExitPredictions, subset: SubsetResult, temperatures: Mapping[str, float],
                  heads: Mapping[str, TrainedHead], base_flops: float, signal: str) -> dict:
    """Accuracy, agreement, exit rates and expected FLOPs of the kept exits on one split."""
    names = subset.names
    sub = preds.subset(names) if names else None
    n = preds.n
    bpred = preds.backbone_pred.numpy()
    c1 = np.array([heads[x].flops for x in names], dtype=float)
    before = np.array([heads[x].point.flops_before for x in names], dtype=float)
    if sub is not None:
        scores = sub.scores([temperatures[x] for x in names], signal).numpy()
        out = simulate_exits(scores, sub.pred().numpy(), bpred, subset.thresholds.thresholds, c1, before, base_flops)
    else:
        out = simulate_exits(np.zeros((0, n)), np.zeros((0, n), dtype=int), bpred, [], c1, before, base_flops)
    all_names = list(preds.names)
    c1_all = np.array([heads[x].flops for x in all_names], dtype=float)
    before_all = np.array([heads[x].point.flops_before for x in all_names], dtype=float)
    oracle_all = oracle_flops(preds.agree().numpy(), c1_all, before_all, base_flops)
    m = {
        "n": n,
        "agreement": float((out.pred == bpred).mean()),
        "expected_flops": float(out.flops.mean()),
        "base_flops": float(base_flops),
        "saving": float(1 - out.flops.mean() / base_flops) if base_flops else 0.0,
        "oracle_flops": float(oracle_all.mean()),
        "oracle_saving": float(1 - oracle_all.mean() / base_flops) if base_flops else 0.0,
        "exit_rates": out.exit_rates().tolist(),
        "exit_index": out.exit_index.tolist(),
    }
    per_exit = []
    labels = preds.labels.numpy() if preds.labels is not None else None
    for i, name in enumerate(names):
        hit = out.exit_index == i
        d = {"name": name, "hits": int(hit.sum()),
             "agreement_on_hits": float((out.pred[hit] == bpred[hit]).mean()) if hit.any() else None}
        if labels is not None:
            d["accuracy_on_hits"] = float((out.pred[hit] == labels[hit]).mean()) if hit.any() else None
        per_exit.append(d)
    m["per_exit"] = per_exit
    if labels is not None:
        acc = float((out.pred == labels).mean())
        base_acc = float((bpred == labels).mean())
        m.update(accuracy=acc, backbone_accuracy=base_acc, accuracy_drop=base_acc - acc)
    else:
        m.update(accuracy=None, backbone_accuracy=None, accuracy_drop=None)
    return m


def _specs_for(points: Sequence[ExitPoint], config: EnableConfig) -> dict[str, HeadSpec]:
    specs = {}
    for p in points:
        if p.name in config.head_specs:
            specs[p.name] = config.head_specs[p.name]
        elif config.head is not None:
            specs[p.name] = config.head
    unknown = sorted(set(config.head_specs) - {p.name for p in points})
    if unknown:
        raise AutoExitError(f"head_specs names unknown exit point(s) {', '.join(unknown)}; "
                            f"points are: {', '.join(p.name for p in points)}")
    return specs


def prepare(backbone: nn.Module, data, config: EnableConfig, progress: bool = True,
            example_input: torch.Tensor | None = None) -> tuple[TracedBackbone, list[ExitPoint], Recording]:
    """Trace, find exit points and record: the part every search shares."""
    data = as_inference_data(data)
    example = example_input if example_input is not None else data.example()
    tb = TracedBackbone(backbone, example, config.leaf_modules)
    points = tb.candidates(config.granularity, config.min_remaining, include=config.points)
    if not points:
        raise AutoExitError(
            f"{type(backbone).__name__} offers no exit point at granularity {config.granularity!r} "
            "(every candidate is too close to the output or crossed by a skip connection); "
            "try granularity=2 or 'node', or name points=[...]"
        )
    rec = record(tb, points, data, cache_dir=config.cache_dir, batch_size=config.batch_size, seed=config.seed,
                 store_inputs=config.store_inputs, progress=progress)
    return tb, points, rec


def assemble(
    config: EnableConfig,
    tb: TracedBackbone,
    points: list[ExitPoint],
    rec: Recording,
    heads: dict[str, TrainedHead],
    subset: SubsetResult | None = None,
    timings: dict | None = None,
) -> EnableResult:
    """Calibrate, choose the subset (unless given), build the model and measure it on val and test."""
    t0 = time.perf_counter()
    val = predictions_for(rec, heads, "val")
    test = predictions_for(rec, heads, "test")
    temps = dict(zip(val.names, calibrate_temperatures(val).tolist()))
    base = float(tb.total_flops)
    if subset is None:
        scores = val.scores([temps[n] for n in val.names], config.signal).numpy()
        c1 = np.array([heads[n].flops for n in val.names], dtype=float)
        c2 = np.array([heads[n].point.flops_after for n in val.names], dtype=float)
        subset = best_subset(scores, val.agree().numpy(), c1, c2, config.tolerance, config.scheme, config.basis,
                             val.names, base, config.exhaustive_limit, size=None)
        if config.max_exits is not None and len(subset.names) > config.max_exits:
            subset = best_subset(scores, val.agree().numpy(), c1, c2, config.tolerance, config.scheme,
                                 config.basis, val.names, base, config.exhaustive_limit, size=config.max_exits)
    kept_points = [heads[n].point for n in subset.names]
    stages = tb.split([p.node for p in kept_points])
    model = MultiExitModel(
        stages,
        [heads[n].module for n in subset.names],
        [temps[n] for n in subset.names],
        subset.thresholds.thresholds.tolist(),
        subset.names,
        tb.num_classes,
        config.signal,
    ).eval()
    metrics = {
        "val": split_metrics(val, subset, temps, heads, base, config.signal),
        "test": split_metrics(test, subset, temps, heads, base, config.signal),
    }
    timings = dict(timings or {})
    timings["calibrate_and_select_s"] = time.perf_counter() - t0
    return EnableResult(config, tb, points, rec, heads, temps, val, test, subset, model, metrics, timings)


def enable(
    backbone: nn.Module,
    data,
    tolerance: float | None = None,
    config: EnableConfig | None = None,
    *,
    progress: bool = True,
    example_input: torch.Tensor | None = None,
    **overrides,
) -> EnableResult:
    """Early-exit enable ``backbone`` on unlabelled inference ``data`` with an accuracy-drop ``tolerance`` (%).

    ``data``: a tensor, ``(inputs, labels)``, a Dataset, an :class:`InferenceData`
    or a path (image folder, ``.pt``, IDX). Labels, if present, are used only for
    reporting accuracy. Keyword ``overrides`` set fields of :class:`EnableConfig`.
    """
    config = config or EnableConfig()
    if tolerance is not None:
        overrides["tolerance"] = tolerance
    if overrides:
        config = EnableConfig.from_dict({**{f.name: getattr(config, f.name) for f in fields(config)}, **overrides})
    data = data if isinstance(data, InferenceData) else as_inference_data(data)
    timings = {}
    t0 = time.perf_counter()
    tb, points, rec = prepare(backbone, data, config, progress, example_input)
    timings["record_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    heads = train_heads(rec, _specs_for(points, config), config.train, progress=progress)
    timings["train_heads_s"] = time.perf_counter() - t0
    return assemble(config, tb, points, rec, heads, timings=timings)


