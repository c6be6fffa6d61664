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
from typing import Any

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
from .heads import HEAD_PRESETS, HeadSpec, preset_head_spec
from .model import MultiExitModel, to_torchscript
from .points import ExitPoint, TracedBackbone
from .policies import (
    DEFAULT_POLICY,
    POLICIES,
    RISKS,
    ExitCosts,
    ExitTable,
    FittedPolicy,
    PolicyContext,
    make_policy,
    needs_activation_stats,
)
from .policies.cascade import stats_from_activations
from .subset import SubsetResult, best_subset, oracle_flops, simulate_exits

__all__ = ["EnableConfig", "EnableResult", "enable", "predictions_for", "predictions_for_splits"]


@dataclass(frozen=True)
class EnableConfig:
    """Everything ``enable`` needs besides the backbone and the data.

    tolerance: accepted accuracy drop in percent; scheme: how it is split over exits
    (``halving`` = T/2^n, ``equal``); basis: ``total`` or ``reaching`` (see
    autoexit.calibrate); signal: exit score (``max_softmax``, ``margin``, ``entropy``);
    granularity / min_remaining / points / leaf_modules: exit-point discovery (see
    autoexit.points); head: one HeadSpec for every point, or a preset name (``autoexit.heads.HEAD_PRESETS``:
    ``default``, a separable-conv head per point, or ``cheap``, SDN's 2x2 average pool + one linear layer);
    default: ``default``; head_specs: per-point specs (over ``head``); train: head training; seed: split and
    training seed.

    policy: exit policy by registry name (see autoexit.policies: ``gate``, ``patience``,
    ``max_softmax``, ``margin``, ``entropy`` with a guaranteed budget; ``paper003`` = T/2^n +
    ``signal`` + K(S), no guarantee); delta: the guarantee holds with probability >= 1 - delta;
    risk: what the guarantee bounds (``disagreement`` with the backbone, label-free; ``harm`` or
    ``drop`` need labels on the val split); fit_split: the split policies fit gates, exit sets and
    threshold families on, and the exits' temperatures (never val, the calibration split the guarantee
    rests on; ``paper003`` fits its temperatures on val, as the paper does);
    policy_options: keyword options of the policy (e.g. ``{"hidden": 16, "history": 2}`` for gate);
    cascade_heads: when > 0, after the policy picks its exits on the fit split, their heads are retrained
    in order so that each also reads the previous ``cascade_heads`` exits' logits, and the policy is
    refitted on that chain.
    cross_fit: when >= 2, the policy is fitted on out-of-fold predictions of the train split (cut into
    ``cross_fit`` folds, each predicted by heads trained on the others: about ``cross_fit - 1`` more head trainings),
    so it sees the heads as new data will; the deployed heads are still trained on the whole train split
    and certified on val. 0 (default): fitted on the heads' own training data. The outer search's certified
    pick (``outer.pick.rule: certified``) reads it too: its trials are then scored on those predictions.

    cost: what the guaranteed policies minimise when they choose exits and thresholds: ``flops``
    (counted, the default) or ``latency`` (each backbone stage and head timed on a device evaluator,
    :func:`autoexit.cost.exit_latency_costs`, so a head that costs more wall time than it saves is
    dropped); cost_evaluator: with ``latency``, the evaluator config (``url``, ``token_file``,
    ``settings``, ... as in a search config's ``evaluator`` section; empty: this CPU; ``settings`` override
    the light timing it defaults to, warmup 2, repeat 7, min_repeat_ms 20, field by field);
    cost_batch_size: the batch size the latency is measured at (the deployment's); cost_stat: which
    statistic of each timing stands for it, ``min_ms`` (default: each timing's fastest group, steadier on a
    busy or throttling device, ``docs/evaluator.md`` section 7), ``median_ms`` or ``mean_ms``.
    """

    tolerance: float = 1.0
    scheme: str | tuple[float, ...] = "halving"
    basis: str = "total"
    signal: str = "max_softmax"
    granularity: int | str = "auto"
    min_remaining: float = 0.05
    points: tuple[str, ...] | None = None
    leaf_modules: tuple[str, ...] = ()
    head: HeadSpec | str | None = None
    head_specs: Mapping[str, HeadSpec] = field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    seed: int = 0
    batch_size: int = 128
    cache_dir: str | None = None
    exhaustive_limit: int = 16
    store_inputs: bool = True
    max_exits: int | None = None
    policy: str = DEFAULT_POLICY
    delta: float = 0.1
    risk: str = "disagreement"
    fit_split: str = "train"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    cascade_heads: int = 0
    cross_fit: int = 0
    cost: str = "flops"
    cost_evaluator: Mapping[str, Any] = field(default_factory=dict)
    cost_batch_size: int = 1
    cost_stat: str = "min_ms"

    def __post_init__(self):
        check_tolerance(self.tolerance)
        if isinstance(self.head, str) and self.head not in HEAD_PRESETS:
            raise AutoExitError(f"head {self.head!r} is not a preset; use one of: {', '.join(HEAD_PRESETS)}, "
                                "or a HeadSpec")
        if self.head is not None and not isinstance(self.head, (str, HeadSpec)):
            raise AutoExitError(f"head must be a HeadSpec or a preset name ({', '.join(HEAD_PRESETS)}), "
                                f"got {type(self.head).__name__}")
        if self.policy not in POLICIES:
            raise AutoExitError(f"unknown exit policy {self.policy!r}; use one of: {', '.join(POLICIES)}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise AutoExitError(f"delta must be in (0, 1): the allowed probability that the budget breaks "
                                f"(e.g. 0.1), got {self.delta!r}")
        if self.risk not in RISKS:
            raise AutoExitError(f"unknown risk {self.risk!r}; use one of: {', '.join(RISKS)}")
        if self.fit_split not in ("train", "test"):
            raise AutoExitError(f"fit_split must be 'train' (or 'test' for experiments), got {self.fit_split!r}; "
                                "val is the calibration split the guarantee rests on")
        if not isinstance(self.cascade_heads, int) or self.cascade_heads < 0:
            raise AutoExitError(f"cascade_heads must be an integer >= 0 (earlier exits each head reads), "
                                f"got {self.cascade_heads!r}")
        if isinstance(self.cross_fit, bool) or not isinstance(self.cross_fit, int) or self.cross_fit < 0 \
                or self.cross_fit == 1:
            raise AutoExitError(f"cross_fit must be 0 (off) or a number of folds >= 2, got {self.cross_fit!r}")
        if self.cross_fit and (self.policy == "paper003" or self.fit_split != "train"):
            raise AutoExitError("cross_fit applies to the guaranteed policies fitted on the train split; "
                                f"policy {self.policy!r} with fit_split {self.fit_split!r} does not use it")
        if self.cost not in ("flops", "latency"):
            raise AutoExitError(f"cost must be 'flops' or 'latency' (timed on a device evaluator), got {self.cost!r}")
        if self.cost == "latency" and self.policy == "paper003":
            raise AutoExitError("cost='latency' applies to the guaranteed policies; paper003 ranks exits by FLOPs "
                                "(for latency with paper003 use the outer search's outer.cost: latency)")
        if not isinstance(self.cost_evaluator, Mapping):
            raise AutoExitError(f"cost_evaluator must be an evaluator config mapping (url, token_file, settings, "
                                f"...), got {type(self.cost_evaluator).__name__}")
        if isinstance(self.cost_batch_size, bool) or not isinstance(self.cost_batch_size, int) \
                or self.cost_batch_size < 1:
            raise AutoExitError(f"cost_batch_size must be an integer >= 1, got {self.cost_batch_size!r}")
        from .cost import check_latency_stat

        check_latency_stat(self.cost_stat, "cost_stat")
        if not isinstance(self.policy_options, Mapping):
            raise AutoExitError(f"policy_options must be a mapping of option names to values, got "
                                f"{type(self.policy_options).__name__}")
        # bad options fail now, not after the heads train
        make_policy(self.policy, **dict(self.policy_options)).check_risk(self.risk)
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
        if d.get("head") is not None and not isinstance(d["head"], (HeadSpec, str)):
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
        out["head"] = self.head.to_dict() if isinstance(self.head, HeadSpec) else self.head
        out["head_specs"] = {k: v.to_dict() for k, v in self.head_specs.items()}
        out["policy_options"] = dict(self.policy_options)
        out["cost_evaluator"] = {k: v for k, v in dict(self.cost_evaluator).items() if k != "token"}  # no secret
        return out


def _is_cascade(module: nn.Module) -> bool:
    from .policies.heads import CascadeHead

    return isinstance(module, CascadeHead)


def predictions_for(recording: Recording, heads: Mapping[str, TrainedHead], split: str,
                    temperature_split: str = "train") -> ExitPredictions:
    """Every head's logits on a split of the recording (no backbone pass). ``temperature_split``: for cascade
    heads, the split the earlier exits' temperatures are fitted on (the one their chain was trained with)."""
    return predictions_for_splits(recording, heads, (split,), temperature_split)[split]


def predictions_for_splits(recording: Recording, heads: Mapping[str, TrainedHead], splits: Sequence[str],
                           temperature_split: str = "train") -> dict[str, ExitPredictions]:
    """:func:`predictions_for` of several splits at once: a chain of cascade heads is run once on
    ``temperature_split`` for all of them, not once per split."""
    names = [p.name for p in recording.points if p.name in heads]
    splits = list(dict.fromkeys(splits))
    if not any(_is_cascade(heads[n].module) for n in names):
        return {s: ExitPredictions(names, torch.stack([predict_head(heads[n].module, recording.activations(n, s))
                                                       for n in names]), recording.logits(s), recording.labels(s))
                for s in splits}
    # cascade: each head reads the earlier heads' logits scaled by the temperatures calibrate_temperatures fits on
    # temperature_split (CascadeInputs, in chain order, as the chain was trained)
    from .distill import CascadeInputs

    earlier = CascadeInputs(recording, temperature_split, splits)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
    for n in names:
        m = heads[n].module
        cascade = _is_cascade(m)
        k = int(getattr(m, "num_prev", 0)) if cascade else 0
        logits = {s: predict_head(m, recording.activations(n, s), prev=earlier.last(s, k) if cascade else None)
                  for s in dict.fromkeys([temperature_split, *splits])}
        earlier.push(logits)
        for s in splits:
            out[s].append(logits[s])
    return {s: ExitPredictions(names, torch.stack(out[s]), recording.logits(s), recording.labels(s)) for s in splits}


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
    # the train split's predictions the policy was fitted on when they are not the heads' own (cross_fit: out of
    # fold); the outer search's certified pick scores its trials on them (Recorded.from_result(..., fit=True))
    fit_predictions: ExitPredictions | None = None

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

    def measure_latency(self, batch_sizes: Sequence[int] = (1, 32), rounds: int = 5,
                        optimized: bool | str = True) -> dict:
        """CPU latency per sample of the backbone and the early-exit model, side by side, on test inputs.

        Both run in TorchScript, the backbone as the emitted model's own single-segment form
        (:func:`~autoexit.model.scripted_backbone`), so ``ratio`` compares the models and not the runtimes;
        the eager backbone is timed too (``per_sample_ms["backbone (eager)"]``) for reference. With
        ``optimized`` (default True, i.e. ``"onednn"``; or ``"freeze"``) both are also timed as
        ``autoexit.load(path, optimize=optimized)`` runs them (:func:`~autoexit.model.optimize_for_runtime`,
        recorded as ``optimized_mode``): ``ratio_optimized`` compares the two optimised models
        (what the exits save in that runtime), ``ratio_deployed`` the optimised early-exit model with the
        plain TorchScript backbone (what a user who deployed the backbone as TorchScript gains in all), and
        ``optimized_decisions_match`` is the share of test inputs whose exit the optimised model takes as the
        plain one does. A model the optimiser rejects is recorded in ``optimized_error`` and not timed.
        """
        from .model import optimize_for_runtime, optimize_mode, scripted_backbone

        mode = optimize_mode(optimized)

        inputs = self.recording.inputs("test")
        scripted = to_torchscript(self.model, self.backbone.example_input)
        models = {"backbone": scripted_backbone(self.backbone), "early_exit": scripted,
                  "backbone (eager)": self.backbone.model.eval()}
        error = None
        if mode:
            try:
                opt = {"backbone (optimized)": optimize_for_runtime(models["backbone"], mode),  # a frozen copy
                       "early_exit (optimized)": optimize_for_runtime(scripted, mode)}
            except AutoExitError as exc:
                error = str(exc)
            else:
                models.update(opt)
        res = compare_latency(models, inputs, batch_sizes, rounds=rounds)
        ms = {name: {str(b): s.median_ms for b, s in d.items()} for name, d in res.items()}
        self.latency = {
            "device": {"kind": "local-cpu", "machine": platform.machine(), "processor": platform.processor(),
                       "threads": 2, "torch": torch.__version__},
            "per_sample_ms": ms,
            "ratio": {b: ms["early_exit"][b] / ms["backbone"][b] for b in ms["backbone"]},
            "baseline": "the backbone in TorchScript (same runtime as the early-exit model)",
        }
        if "early_exit (optimized)" in ms:
            eo, bo = ms["early_exit (optimized)"], ms["backbone (optimized)"]
            self.latency["ratio_optimized"] = {b: eo[b] / bo[b] for b in bo}
            self.latency["ratio_deployed"] = {b: eo[b] / ms["backbone"][b] for b in bo}
            with torch.no_grad():
                plain = scripted(inputs)[1]
                fast = models["early_exit (optimized)"](inputs)[1]
            self.latency["optimized_decisions_match"] = float((plain == fast).float().mean())
            self.latency["optimized_mode"] = mode
        if error:
            self.latency["optimized_error"] = error
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
            "head_training": {"teacher": self.config.train.teacher, "epochs": self.config.train.epochs,
                              "label_free": not self.config.train.supervised,
                              "epoch_kept": "best val KL" if self.config.train.keeps_best else "last",
                              "head": _head_design(self.config)},
            "dropped_points": [p.name for p in self.points if p.name not in kept],
            "policy": self._policy_manifest(),
            "expected": {
                "val": _headline(self.metrics["val"]),
                "test": _headline(self.metrics["test"]),
            },
            "latency": self.latency,
            "device_latency": self.extra.get("device_latency"),
            "outputs": {"forward": "(logits [N, C], exit_index [N]); exit_index == num_exits means the backbone",
                        "forward_all": "list of every head's scaled logits, then the backbone's"},
        }

    def _policy_manifest(self) -> dict:
        pol = self.extra.get("policy") or {}
        out = {"tolerance_percent": self.config.tolerance, "scheme": self.config.scheme,
               "basis": self.config.basis, "signal": self.config.signal,
               "name": pol.get("policy", self.config.policy), "delta": self.config.delta,
               "risk": pol.get("risk", self.config.risk)}
        if pol.get("rules") and any(r != "ConfidenceRule" for r in pol["rules"]):
            out["rule"] = ("exit i answers when rule_i(head_i(x) / temperature_i, earlier exits' scaled logits, "
                           "activation) >= threshold_i; rules are TorchScript modules inside model.pt")
            out["rules"] = pol["rules"]
        else:
            out["rule"] = "exit i answers when exit_score(head_i(x) / temperature_i) >= threshold_i"
        for key in ("statement", "guarantee", "cal_n", "fit_n", "target_fit_risk", "path_length", "fitted_on", "auto",
                    "gate_target"):
            if key in pol:
                out[key] = pol[key]
        if pol.get("cost_unit"):  # what the policy minimised, when not counted FLOPs
            out["cost"] = {"unit": pol["cost_unit"], "source": pol.get("cost_source", ""),
                           "batch_size": self.config.cost_batch_size, "stat": self.config.cost_stat,
                           **({"calibration": pol["cost_calibration"]} if "cost_calibration" in pol else {})}
        return out

    def summary_rows(self) -> list[tuple[str, str]]:
        m = self.metrics["test"]
        pol = self.extra.get("policy") or {}
        rows = [
            ("exit points (candidates)", ", ".join(p.name for p in self.points)),
            ("kept exits", ", ".join(self.kept) or "none (no exit pays off)"),
            ("heads trained", f"{self.config.train.epochs} epochs, teacher {self.config.train.teacher}, "
                              + ("with labels" if self.config.train.supervised else "label-free")
                              + (", best val-KL epoch kept" if self.config.train.keeps_best else ", last epoch kept")
                              + _head_words(self.config)),
            ("exit policy", f"{pol.get('policy', self.config.policy)}{', chosen by auto' if 'auto' in pol else ''} "
                            f"(risk: {pol.get('risk', self.config.risk)}, "
                            f"delta {self.config.delta})"),
        ]
        if pol.get("statement"):
            rows.append(("guarantee", pol["statement"]))
        rows.append(("test samples", str(m["n"])))
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
            if "ratio_optimized" in self.latency:
                ro, rd = self.latency["ratio_optimized"], self.latency["ratio_deployed"]
                rows.append((f"optimised runtime (load(optimize={self.latency.get('optimized_mode', 'onednn')!r}))",
                             ", ".join(f"batch {b}: {ro[b]:.2f}x its backbone, {rd[b]:.2f}x the plain one"
                                       for b in ro)))
        return rows


def _jit_save(scripted, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path))


def _head_design(config: EnableConfig) -> str | dict:
    """How the heads' design was asked for: a preset name, one HeadSpec's dict, and ``per point`` where
    ``head_specs`` names points (the deployed exits' ``head_spec`` say what each got)."""
    head = config.head.to_dict() if isinstance(config.head, HeadSpec) else (config.head or "default")
    return head if not config.head_specs else {"head": head, "per point": sorted(config.head_specs)}


def _head_words(config: EnableConfig) -> str:
    """The summary's mention of a head design other than the default ("" for the default)."""
    if isinstance(config.head, HeadSpec):
        return f", heads {config.head.describe()}"
    return f", {config.head} heads" if config.head and config.head != "default" else ""


def _headline(m: dict) -> dict:
    keys = ("n", "accuracy", "backbone_accuracy", "accuracy_drop", "agreement", "expected_flops", "base_flops",
            "saving", "oracle_saving", "exit_rates")
    return {k: m.get(k) for k in keys}


def split_metrics(preds: ExitPredictions, subset: SubsetResult, temperatures: Mapping[str, float],
                  heads: Mapping[str, TrainedHead], base_flops: float, signal: str,
                  scores: np.ndarray | None = None) -> dict:
    """Accuracy, agreement, exit rates and expected FLOPs of the kept exits on one split.

    ``scores`` ([kept exits, n]): the exit policy's scores (default: ``signal`` confidence of the
    temperature-scaled logits).
    """
    names = subset.names
    sub = preds.subset(names) if names else None
    n = preds.n
    bpred = preds.backbone_pred.numpy()
    c1 = np.array([heads[x].flops for x in names], dtype=float)
    before = np.array([heads[x].point.flops_before for x in names], dtype=float)
    if sub is not None:
        if scores is None:
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


def _specs_for(points: Sequence[ExitPoint], config: EnableConfig, num_classes: int) -> dict[str, HeadSpec]:
    specs = {}
    for p in points:
        if p.name in config.head_specs:
            specs[p.name] = config.head_specs[p.name]
        elif isinstance(config.head, str):
            specs[p.name] = preset_head_spec(config.head, p.shape, num_classes)
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
    *,
    predictions: Mapping[str, ExitPredictions] | None = None,
    stats: Mapping[str, Sequence[torch.Tensor]] | None = None,
    evaluator=None,
    temperatures_on: str | None = None,
) -> EnableResult:
    """Calibrate, choose the exits and thresholds with ``config.policy`` (unless ``subset`` is given: then
    its thresholds and the ``signal`` confidence are used as they are), build the model, measure it on val
    and test.

    ``predictions`` (split -> ExitPredictions) and ``stats`` (split -> per-exit activation statistics)
    may be passed to skip reading the recorded activations again. ``evaluator``: the device evaluator
    that times the exits when ``config.cost == "latency"`` (default: ``config.cost_evaluator``).
    ``temperatures_on``: the split the temperatures are fitted on, overriding :func:`temperature_split` (the
    outer search's certified pick gives ``"train"`` with its ``subset``, whose thresholds were derived there).
    """
    t0 = time.perf_counter()
    preds = dict(predictions or {})
    cascade = any(_is_cascade(h.module) for h in heads.values())
    guaranteed = subset is None and config.policy != "paper003"
    tsplit = temperatures_on or temperature_split(config, guaranteed, cascade)
    # the splits not given (e.g. train's out-of-fold predictions with cross_fit), in one pass
    missing = [s for s in ("val", "test", tsplit) if s not in preds]
    if missing:
        preds.update(predictions_for_splits(rec, heads, missing, tsplit))
    val, test = preds["val"], preds["test"]
    temps = dict(zip(val.names, calibrate_temperatures(preds[tsplit]).tolist()))
    base = float(tb.total_flops)
    fitted: FittedPolicy | None = None
    scores: dict[str, np.ndarray | None] = {"val": None, "test": None}
    if guaranteed:
        costs = exit_costs(config, tb, rec, heads, temps, evaluator) if config.cost != "flops" else None
        fitted, tables = fit_policy(config, rec, heads, temps, base, preds, stats, fixed_chain=cascade, costs=costs)
        subset = _subset_from_policy(fitted, tables["val"], heads, base)
        scores = {"val": fitted.scores(tables["val"]), "test": fitted.scores(tables["test"])}
    elif subset is None:
        scores_val = val.scores([temps[n] for n in val.names], config.signal).numpy()
        c1 = np.array([heads[n].flops for n in val.names], dtype=float)
        c2 = np.array([heads[n].point.flops_after for n in val.names], dtype=float)
        subset = best_subset(scores_val, val.agree().numpy(), c1, c2, config.tolerance, config.scheme,
                             config.basis, val.names, base, config.exhaustive_limit,
                             size=len(val.names) if cascade else None)  # a cascade keeps its chain
        if config.max_exits is not None and len(subset.names) > config.max_exits:
            subset = best_subset(scores_val, val.agree().numpy(), c1, c2, config.tolerance, config.scheme,
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
        rules=fitted.rules if fitted is not None else None,
        cascade=[_is_cascade(heads[n].module) for n in subset.names],
    ).eval()
    metrics = {
        "val": split_metrics(val, subset, temps, heads, base, config.signal, scores=scores["val"]),
        "test": split_metrics(test, subset, temps, heads, base, config.signal, scores=scores["test"]),
    }
    timings = dict(timings or {})
    timings["calibrate_and_select_s"] = time.perf_counter() - t0
    result = EnableResult(config, tb, points, rec, heads, temps, val, test, subset, model, metrics, timings)
    if fitted is not None:
        result.extra["policy"] = fitted.to_dict()
        result.extra.setdefault("report_sections", []).append(("Exit policy and guarantee", _policy_html(fitted)))
    else:
        result.extra["policy"] = {"policy": "paper003" if config.policy == "paper003" else "given subset",
                                  "risk": "disagreement", "statement": "no guarantee: thresholds estimated on the "
                                  f"{val.n} val samples by the T/2^n rule; the budget may be exceeded on new data"}
    return result


def temperature_split(config: EnableConfig, guaranteed: bool, cascade: bool = False) -> str:
    """The split the exits' temperatures are fitted on: for a guaranteed policy, the split it is fitted on
    (``config.fit_split``; with ``cross_fit``, its out-of-fold predictions), never val, so that nothing the
    policy deploys depends on the calibration split but the certified thresholds; for ``paper003`` and a
    given subset (no guarantee) val, as paper 003 does; for cascade heads always the split their chain was
    trained with (:func:`autoexit.distill.train_cascade_heads`, ``config.fit_split``)."""
    return config.fit_split if guaranteed or cascade else "val"


def split_stats(rec: Recording, names: Sequence[str], split: str) -> list[torch.Tensor]:
    """Per exit point, the [n, 2] activation mean / std of a split (what gate rules read)."""
    return [stats_from_activations(rec.activations(n, split)) for n in names]


def _needs_stats(config: EnableConfig) -> bool:
    return needs_activation_stats(config.policy, dict(config.policy_options))


def fit_policy(config: EnableConfig, rec: Recording, heads: Mapping[str, TrainedHead], temperatures: Mapping[str, float],
               base_flops: float, predictions: Mapping[str, ExitPredictions] | None = None,
               stats: Mapping[str, Sequence[torch.Tensor]] | None = None, fixed_chain: bool = False,
               costs: ExitCosts | None = None) -> tuple[FittedPolicy, dict[str, ExitTable]]:
    """Fit ``config.policy`` on the ``fit_split`` (exit set, gates, threshold family) and certify it on val.

    ``costs``: what the policy minimises, one entry per candidate exit in backbone order (default: the heads'
    and the backbone's FLOPs; :func:`exit_costs` gives latency costs when ``config.cost == "latency"``).
    Returns the fitted policy and the ExitTables of train/val/test it used.
    """
    preds = dict(predictions or {})
    names = [p.name for p in rec.points if p.name in heads]
    stats = dict(stats or {})
    tables: dict[str, ExitTable] = {}
    needs_stats = _needs_stats(config)
    for split in dict.fromkeys([config.fit_split, "val", "test"]):
        p = preds.get(split) or predictions_for(rec, heads, split)
        if list(p.names) != names:
            p = p.subset(names)
        st = stats.get(split)
        if st is None and needs_stats:
            st = split_stats(rec, names, split)
        tables[split] = ExitTable.from_predictions(p, [temperatures[n] for n in names], st)
    if costs is None:
        costs = flops_costs(heads, names, base_flops)
    elif len(costs.c1) != len(names) or len(costs.before) != len(names):
        raise AutoExitError(f"costs give {len(costs.c1)} exits but there are {len(names)} candidate exits")
    ctx = PolicyContext(tables[config.fit_split], tables["val"], costs, config.tolerance, config.delta,
                        config.risk, config.max_exits, config.seed, config.scheme
                        if isinstance(config.scheme, str) else "halving", config.basis, config.signal,
                        config.exhaustive_limit, fixed_chain=fixed_chain)
    return make_policy(config.policy, **dict(config.policy_options)).fit(ctx), tables


def out_of_fold_predictions(rec: Recording, heads: Mapping[str, TrainedHead], config: EnableConfig,
                            progress: bool = False, backbone: TracedBackbone | None = None) -> ExitPredictions:
    """The train split's ExitPredictions for ``config.cross_fit`` folds (:func:`autoexit.distill.out_of_fold_logits`),
    what :func:`fit_policy` fits on when given as ``predictions["train"]``. ``backbone``: needed when
    ``config.train.teacher`` trains on the fly."""
    from .distill import out_of_fold_logits

    names = [p.name for p in rec.points if p.name in heads]
    z = out_of_fold_logits(rec, heads, config.train, config.cross_fit, progress=progress, backbone=backbone)
    return ExitPredictions(names, z, rec.logits("train"), rec.labels("train"))


def flops_costs(heads: Mapping[str, TrainedHead], names: Sequence[str], base_flops: float) -> ExitCosts:
    """The FLOPs :class:`ExitCosts` of the exits ``names`` (each head's FLOPs and the backbone's up to its point)."""
    return ExitCosts([heads[n].flops for n in names], [heads[n].point.flops_before for n in names], base_flops)


def exit_costs(config: EnableConfig, tb: TracedBackbone, rec: Recording, heads: Mapping[str, TrainedHead],
               temperatures: Mapping[str, float], evaluator=None) -> ExitCosts:
    """What the guaranteed policies minimise for ``config.cost``: the heads' and the backbone's FLOPs, or (cost
    ``latency``) their latency in ms per sample at ``config.cost_batch_size``, timed on ``evaluator`` (default:
    built from ``config.cost_evaluator``; empty: this CPU) by :func:`autoexit.cost.exit_latency_costs`, with
    the end-to-end calibration on the train inputs."""
    names = [p.name for p in rec.points if p.name in heads]
    if config.cost == "flops":
        return flops_costs(heads, names, float(tb.total_flops))
    from .cost import ANCHOR_SAMPLES, exit_latency_costs
    from .evaluator import evaluator_from_config

    ev = evaluator if evaluator is not None else evaluator_from_config(dict(config.cost_evaluator))
    settings = None
    if evaluator is None:  # lighter than a search's verification (every stage and head is timed 3 times, rounds);
        from .evaluator import MeasureSettings  # the config's own settings override it field by field

        settings = MeasureSettings.from_dict({"warmup": 2, "repeat": 7, "min_repeat_ms": 20.0,
                                              **dict(config.cost_evaluator.get("settings") or {})})
    try:
        # timing inputs, not the calibration split's either: as many as exit_latency_costs anchors on
        x = rec.inputs("train", first=max(ANCHOR_SAMPLES, int(config.cost_batch_size)))
    except AutoExitError:
        x = None
    d = exit_latency_costs(tb, [heads[n] for n in names], [float(temperatures[n]) for n in names], x, ev,
                           batch_size=config.cost_batch_size, settings=settings, stat=config.cost_stat)
    return ExitCosts.from_dict(d)


def _subset_from_policy(fitted: FittedPolicy, val: ExitTable, heads: Mapping[str, TrainedHead],
                        base: float) -> SubsetResult:
    """A SubsetResult (what the rest of autoexit reads) describing the fitted policy on val."""
    from .calibrate import ThresholdResult

    k, n = len(fitted.chain), val.n
    pos = fitted.exit_positions(val) if k else np.full(n, 0)
    pred = val.pred(fitted.chain)
    bpred = val.bpred
    reached = np.array([int((pos >= j).sum()) for j in range(k)], dtype=int)
    hits = np.array([int((pos == j).sum()) for j in range(k)], dtype=int)
    wrong = np.array([int(((pos == j) & (pred[j] != bpred)).sum()) for j in range(k)], dtype=int)
    thr = ThresholdResult(list(fitted.names), np.asarray(fitted.thresholds, dtype=float), wrong / max(n, 1),
                          reached, hits, wrong, n, "total")
    cost = np.r_[[heads[x].point.flops_before for x in fitted.names], base]
    spent = np.cumsum([heads[x].flops for x in fitted.names]) if k else np.zeros(0)
    cost = cost + np.r_[spent, spent[-1] if k else 0.0]
    saved = float((base - cost[pos]).sum()) if k else 0.0
    return SubsetResult(list(fitted.names), list(fitted.chain), thr, saved, n, base)


def _policy_html(fitted: FittedPolicy) -> str:
    import html

    d = fitted.to_dict()
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in d.items() if k not in ("thresholds", "auto"))
    out = f"<p>{html.escape(fitted.statement())}</p><table>{rows}</table>"
    auto = d.get("auto")
    if auto:  # the candidates auto compared, and on which split it chose
        unit = fitted.costs.unit if fitted.costs is not None else "flops"
        body = "".join(
            f"<tr><td>{html.escape(n)}{' (deployed)' if n == auto['chosen'] else ''}</td><td>{c['fit_cost']:.4g}</td>"
            f"<td>{c['cal_cost']:.4g}</td><td>{'yes' if c['certified'] else 'no'}</td><td>{c['exits']}</td></tr>"
            for n, c in auto["candidates"].items())
        out += (f"<p>auto compared {len(auto['candidates'])} policies and deployed the cheapest on the "
                f"{'calibration' if auto['select'] == 'cal' else 'fit'} split (each certified at delta "
                f"{auto['tested_delta']:.3g}). Expected {html.escape(unit)} per input:</p><table><tr><th>policy</th>"
                f"<th>fit split</th><th>calibration split</th><th>certified</th><th>exits</th></tr>{body}</table>")
    return out


def enable(
    backbone: nn.Module,
    data,
    tolerance: float | None = None,
    config: EnableConfig | None = None,
    *,
    progress: bool = True,
    example_input: torch.Tensor | None = None,
    evaluator=None,
    **overrides,
) -> EnableResult:
    """Early-exit enable ``backbone`` on unlabelled inference ``data`` with an accuracy-drop ``tolerance`` (%).

    ``data``: a tensor, ``(inputs, labels)``, a Dataset, an :class:`InferenceData`
    or a path (image folder, ``.pt``, IDX). Labels, if present, are used only for
    reporting accuracy. Keyword ``overrides`` set fields of :class:`EnableConfig`. ``evaluator``: the
    device evaluator that times the exits with ``cost="latency"`` (default: ``config.cost_evaluator``).
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
    heads = train_heads(rec, _specs_for(points, config, rec.num_classes), config.train, progress=progress, backbone=tb)
    timings["train_heads_s"] = time.perf_counter() - t0
    predictions = None
    if config.cross_fit:
        t0 = time.perf_counter()
        predictions = {"train": out_of_fold_predictions(rec, heads, config, progress, backbone=tb)}
        timings["cross_fit_s"] = time.perf_counter() - t0
    result = assemble(config, tb, points, rec, heads, timings=timings, evaluator=evaluator, predictions=predictions)
    if config.cross_fit:
        result.extra["policy"]["fitted_on"] = (f"out-of-fold predictions of the train split ({config.cross_fit} "
                                               "folds)")
        result.fit_predictions = predictions["train"]
    # the chain a guaranteed policy chose on the fit split (before val certified its thresholds and unused exits
    # were dropped), so the cascade heads, like every head, do not depend on the calibration split
    chain = list(result.extra["policy"].get("fit_chain", result.kept)) if config.cascade_heads else []
    if chain:
        from .distill import train_cascade_heads

        t0 = time.perf_counter()
        chained = train_cascade_heads(rec, heads, chain, config.train, num_prev=config.cascade_heads,
                                      progress=progress, temperature_split=config.fit_split)
        timings["train_cascade_heads_s"] = time.perf_counter() - t0
        result = assemble(config, tb, points, rec, chained, timings=timings, evaluator=evaluator)
    return result


