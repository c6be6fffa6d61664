"""autoexit: label-free early-exit enabling of pre-trained PyTorch classifiers.

Quick use::

    import autoexit
    result = autoexit.enable(backbone, inputs, tolerance=1.0)   # inputs: unlabelled tensor / Dataset / path
    result.emit("my-artifact")                                   # TorchScript model + manifest + report
    art = autoexit.load("my-artifact")                           # checksums verified
    logits, exit_index = art.model(x)

The steps are public too (see docs/guide.md): ``find_exit_points``/``TracedBackbone``
(points), ``record`` (data), ``HeadSpec``/``build_head`` (heads), ``train_heads``
(distill), ``assign_thresholds``/``calibrate_temperatures`` (calibrate),
``best_subset``/``k_score`` (subset), ``count_flops`` (cost), ``MultiExitModel``
(model). Searches live in ``autoexit.search`` (optional extras ``nas`` and
``search``); the device evaluator in ``autoexit.evaluator``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .artifact import Artifact, load
from .calibrate import (
    ExitPredictions,
    assign_thresholds,
    calibrate_temperatures,
    exit_score,
    fit_temperature,
    split_budget,
)
from .cost import compare_latency, count_flops, count_params, measure_latency
from .data import (
    InferenceData,
    Recording,
    as_inference_data,
    load_digits,
    load_idx,
    load_image_folder,
    load_tensors,
    record,
    split_indices,
)
from .distill import TrainConfig, TrainedHead, train_head, train_heads
from .errors import ArtifactError, AutoExitError, DataError, TraceError
from .heads import HeadSpec, build_head, default_head_spec, register_conv_kind
from .model import MultiExitModel, to_torchscript
from .pipeline import EnableConfig, EnableResult, enable, predictions_for
from .points import ExitPoint, TracedBackbone, find_exit_points, trace_backbone
from .subset import best_subset, evaluate_subset, k_score, oracle_flops, simulate_exits

__all__ = [
    "__version__",
    "Artifact",
    "ArtifactError",
    "AutoExitError",
    "DataError",
    "EnableConfig",
    "EnableResult",
    "ExitPoint",
    "ExitPredictions",
    "HeadSpec",
    "InferenceData",
    "MultiExitModel",
    "Recording",
    "TraceError",
    "TracedBackbone",
    "TrainConfig",
    "TrainedHead",
    "as_inference_data",
    "assign_thresholds",
    "best_subset",
    "build_head",
    "calibrate_temperatures",
    "compare_latency",
    "count_flops",
    "count_params",
    "default_head_spec",
    "enable",
    "evaluate_subset",
    "exit_score",
    "find_exit_points",
    "fit_temperature",
    "k_score",
    "load",
    "load_digits",
    "load_idx",
    "load_image_folder",
    "load_tensors",
    "measure_latency",
    "oracle_flops",
    "predictions_for",
    "record",
    "register_conv_kind",
    "simulate_exits",
    "split_budget",
    "split_indices",
    "to_torchscript",
    "trace_backbone",
    "train_head",
    "train_heads",
]
