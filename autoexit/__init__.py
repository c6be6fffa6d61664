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

# Imported on first use (PEP 562), so that torch-free modules such as autoexit.perfmodel and the
# evaluator's protocol can be imported without pulling in torch.
_EXPORTS = {
    "Artifact": "artifact",
    "load": "artifact",
    "ExitPredictions": "calibrate",
    "assign_thresholds": "calibrate",
    "calibrate_temperatures": "calibrate",
    "exit_score": "calibrate",
    "fit_temperature": "calibrate",
    "split_budget": "calibrate",
    "compare_latency": "cost",
    "count_flops": "cost",
    "count_params": "cost",
    "measure_latency": "cost",
    "InferenceData": "data",
    "Recording": "data",
    "as_inference_data": "data",
    "load_digits": "data",
    "load_idx": "data",
    "load_image_folder": "data",
    "load_tensors": "data",
    "record": "data",
    "split_indices": "data",
    "TrainConfig": "distill",
    "TrainedHead": "distill",
    "train_head": "distill",
    "train_heads": "distill",
    "ArtifactError": "errors",
    "AutoExitError": "errors",
    "DataError": "errors",
    "TraceError": "errors",
    "HeadSpec": "heads",
    "build_head": "heads",
    "default_head_spec": "heads",
    "cheap_head_spec": "heads",
    "HEAD_PRESETS": "heads",
    "register_conv_kind": "heads",
    "MultiExitModel": "model",
    "to_torchscript": "model",
    "optimize_for_runtime": "model",
    "EnableConfig": "pipeline",
    "EnableResult": "pipeline",
    "enable": "pipeline",
    "predictions_for": "pipeline",
    "ExitPoint": "points",
    "TracedBackbone": "points",
    "find_exit_points": "points",
    "trace_backbone": "points",
    "best_subset": "subset",
    "evaluate_subset": "subset",
    "k_score": "subset",
    "oracle_flops": "subset",
    "simulate_exits": "subset",
}


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
    "HEAD_PRESETS",
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
    "cheap_head_spec",
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
    "optimize_for_runtime",
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


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'autoexit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
