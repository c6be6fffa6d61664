"""Latency measured on a real device (Raspberry Pi, Jetson) or locally.

* :mod:`.client` - ``LocalEvaluator`` (in-process default), ``RemoteEvaluator``
  (a device running the server), ``DeviceRegistry``, ``evaluator_from_config``;
  the API is documented in the client module's docstring.
* :mod:`.protocol` - request/result schemas shared by client and server.
* :mod:`.server` - the FastAPI service run on the device (``device`` extra).

Importing this package needs neither torch nor fastapi.
"""

from __future__ import annotations

from .client import (
    DeviceRegistry,
    DeviceStatus,
    Evaluator,
    EvaluatorError,
    EvaluatorRequestError,
    EvaluatorUnavailable,
    LocalEvaluator,
    PreparedModel,
    RemoteEvaluator,
    evaluator_from_config,
    prepare_model,
    registry_from_config,
)
from .protocol import (
    DEFAULT_PORT,
    DeviceInfo,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    TensorSpec,
    block_head_latencies_s,
    segment_profile,
)

__all__ = [
    "DEFAULT_PORT",
    "DeviceInfo",
    "DeviceRegistry",
    "DeviceStatus",
    "Evaluator",
    "EvaluatorError",
    "EvaluatorRequestError",
    "EvaluatorUnavailable",
    "LatencyResult",
    "LatencyStats",
    "LocalEvaluator",
    "MeasureSettings",
    "PreparedModel",
    "RemoteEvaluator",
    "TensorSpec",
    "block_head_latencies_s",
    "evaluator_from_config",
    "prepare_model",
    "registry_from_config",
    "segment_profile",
]
