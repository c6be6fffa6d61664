"""Clients of the device evaluator: measure latency locally or on a remote device.

Importing this module needs only the standard library (torch is imported when
a torch object is passed in); the remote client speaks HTTP with ``urllib``,
so searches need no extra to use a device.

API
---
Every evaluator implements the :class:`Evaluator` protocol::

    ev = LocalEvaluator()                                   # in-process, the default
    ev = RemoteEvaluator("http://rpi4.local:8765", token_file="~/.config/autoexit/rpi4.token")
    ev = evaluator_from_config({"url": ..., "token_file": ...})   # or None -> LocalEvaluator

    ev.info() -> DeviceInfo                                 # what the timings come from
    ev.device_key -> str

    ev.measure(model, example_inputs=None, *, input_shapes=None, batch_sizes=(1,),
               settings=None, format=None, dtypes=None) -> LatencyResult
        model: torch.nn.Module (traced to TorchScript, or exported to ONNX with
        format="onnx"), torch.jit.ScriptModule, ONNX or TorchScript bytes, or a
        path (.onnx / .pt). example_inputs: a tensor or tuple of tensors WITH
        the batch dimension; or input_shapes: per-sample shape(s) WITHOUT it,
        e.g. (3, 32, 32) or [(3, 32, 32), (10,)].

    ev.measure_segments({"stage0": (module, example_input), "head0": (head, (64, 8, 8)), ...},
                        *, batch_sizes=(1,), settings=None, format=None) -> dict[str, LatencyResult]
        each value is (model, example tensor(s) with batch dim | per-sample shape(s));
        segments are timed one after another on the same device, results in
        the order given. ``segment_profile(results, batch_size)`` flattens them
        to {name: median ms}.

    ev.measure_end_to_end(scripted_multi_exit_model, inputs_tensor, batch_sizes=(1,),
                          *, settings=None) -> LatencyResult
        the model's forward takes a batch tensor and returns (logits, exit_index)
        (exit_index: int or one int per sample). ``inputs_tensor`` holds N real
        samples [N, ...]; each batch size b times consecutive batches of b, so
        early exits happen as they would in deployment. ``result.at(b).exit_counts``
        gives {exit index: samples} and ``median_ms`` the mean time per batch
        over the data.

:class:`LatencyResult` holds one :class:`LatencyStats` per batch size
(``result.at(b)``; ``result.median_ms`` etc. refer to the first batch size).
Latencies are milliseconds per batch. :class:`MeasureSettings` controls the
timing (warm-up, repeat, number, min_repeat_ms, cooldown, timeout, threads);
``MeasureSettings.quick()`` is a cheap preset for search trials.

Several devices: ``DeviceRegistry({"rpi4": "http://...:8765", "jetson": {"url": ...,
"token_file": ...}})``; ``registry["rpi4"]`` is that device's evaluator,
``registry.probe()`` reports which devices answer, ``registry.require()``
raises naming every device that does not. A device that does not answer is
always reported (:class:`EvaluatorUnavailable`), never silently skipped.

Errors are :class:`~autoexit.errors.AutoExitError` subclasses with one-line
messages: :class:`EvaluatorUnavailable` (no answer after retries),
:class:`EvaluatorRequestError` (the device refused the request: 4xx, with the
server's reason).

Both evaluators cache results by SHA-256(model content + settings + device):
``cache_file=`` persists the cache as JSON lines. The remote evaluator also
asks the server for a cached result before uploading a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from ..errors import AutoExitError, require
from . import protocol as P
from .cache import ResultCache
from .protocol import (
    DeviceInfo,
    LatencyResult,
    LatencyStats,
    MeasureSettings,
    TensorSpec,
    segment_profile,
)

__all__ = [
    "Evaluator",
    "LocalEvaluator",
    "RemoteEvaluator",
    "DeviceRegistry",
    "DeviceStatus",
    "EvaluatorError",
    "EvaluatorUnavailable",
    "EvaluatorRequestError",
    "PreparedModel",
    "prepare_model",
    "evaluator_from_config",
    "registry_from_config",
    "segment_profile",
]


class EvaluatorError(AutoExitError):
    """The evaluator could not produce a measurement."""


class EvaluatorUnavailable(EvaluatorError):
    """A device evaluator did not answer (connection refused, timeouts, 5xx) after retries."""


class EvaluatorRequestError(EvaluatorError):
    """A device evaluator refused the request (4xx) and said why."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@runtime_checkable
class Evaluator(Protocol):
    """What searches use to get measured latency; see the module docstring."""

    @property
    def device_key(self) -> str: ...

    def info(self) -> DeviceInfo: ...

    def measure(
        self,
        model: Any,
        example_inputs: Any = None,
        *,
        input_shapes: Any = None,
        batch_sizes: Sequence[int] = (1,),
        settings: MeasureSettings | None = None,
        format: str | None = None,
        dtypes: Any = None,
    ) -> LatencyResult: ...

    def measure_segments(
        self,
        segments: Mapping[str, Any],
        *,
        batch_sizes: Sequence[int] = (1,),
        settings: MeasureSettings | None = None,
        format: str | None = None,
    ) -> dict[str, LatencyResult]: ...

    def measure_end_to_end(
        self,
        model: Any,
        inputs: Any,
        batch_sizes: Sequence[int] = (1,),
        *,
        settings: MeasureSettings | None = None,
    ) -> LatencyResult: ...


# --------------------------------------------------------------------------- model preparation


@dataclass(frozen=True)
class PreparedModel:
    """A model as bytes ready to send: format, per-sample input specs, content digest."""

    data: bytes
    format: str
    inputs: tuple[TensorSpec, ...]
    digest: str

    @property
    def size(self) -> int:
        return len(self.data)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "shape") and hasattr(x, "dtype")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(_is_int(d) for d in x) and (
        len(x) > 0 or isinstance(x, tuple)
    )


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in P.DTYPES:
        raise AutoExitError(f"input dtype {dtype} is not supported; use one of {list(P.DTYPES)}")
    return name


def _example_tuple(example: Any) -> tuple[Any, ...] | None:
    if example is None:
        return None
    if _is_tensor(example):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(_is_tensor(t) for t in example):
        return tuple(example)
    return None


def _specs_from_example(tensors: Sequence[Any]) -> tuple[TensorSpec, ...]:
    specs = []
    for t in tensors:
        if t.dim() == 0:
            raise AutoExitError("example inputs need a batch dimension first (got a 0-d tensor)")
        specs.append(TensorSpec(shape=tuple(int(d) for d in t.shape[1:]), dtype=_dtype_name(t.dtype)))
    return tuple(specs)


def _specs_from_shapes(input_shapes: Any, dtypes: Any = None) -> tuple[TensorSpec, ...]:
    if isinstance(input_shapes, TensorSpec):
        return (input_shapes,)
    if _is_shape(input_shapes):
        shapes: list[Any] = [tuple(input_shapes)]
    elif isinstance(input_shapes, (tuple, list)) and input_shapes and all(
        _is_shape(s) or isinstance(s, TensorSpec) for s in input_shapes
    ):
        shapes = list(input_shapes)
    else:
        raise AutoExitError(
            f"input_shapes must be a per-sample shape like (3, 32, 32) or a list of them, got {input_shapes!r}"
        )
    if dtypes is None or isinstance(dtypes, str):
        dts = [dtypes or "float32"] * len(shapes)
    else:
        dts = [d if isinstance(d, str) else _dtype_name(d) for d in dtypes]
        if len(dts) != len(shapes):
            raise AutoExitError(f"got {len(shapes)} input shapes but {len(dts)} dtypes")
    try:
        return tuple(
            s if isinstance(s, TensorSpec) else TensorSpec(shape=tuple(s), dtype=d) for s, d in zip(shapes, dts)
        )
    except P.ProtocolError as exc:
        raise AutoExitError(f"bad input_shapes: {exc}") from None


def _random_batch(specs: Sequence[TensorSpec], batch: int) -> tuple[Any, ...]:
    import torch

    out = []
    for s in specs:
        dt = getattr(torch, s.dtype)
        shape = (batch, *s.shape)
        out.append(torch.randn(shape).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
    return tuple(out)


def _quiet():
    import warnings

    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("ignore")
    return cm


def _script_bytes(module: Any) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    cm = _quiet()
    try:
        torch.jit.save(module, buf)
    finally:
        cm.__exit__(None, None, None)
    return buf.getvalue()


def _to_torchscript(module: Any, example: tuple[Any, ...] | None, *, script_only: bool) -> bytes:
    import torch

    was_training = module.training
    module.eval()
    cm = _quiet()
    errors = []
    try:
        if not script_only and example is not None:
            try:
                with torch.no_grad():
                    traced = torch.jit.trace(module, example, check_trace=False, _store_inputs=False)
                return _script_bytes(traced)
            except TypeError:  # torch without _store_inputs
                with torch.no_grad():
                    return _script_bytes(torch.jit.trace(module, example, check_trace=False))
            except Exception as exc:
                errors.append(f"trace: {' '.join(str(exc).split())[:200]}")
        try:
            return _script_bytes(torch.jit.script(module))
        except Exception as exc:
            errors.append(f"script: {' '.join(str(exc).split())[:200]}")
    finally:
        cm.__exit__(None, None, None)
        module.train(was_training)
    what = "script" if script_only else "trace or script"
    raise AutoExitError(
        f"could not {what} {type(module).__name__} to TorchScript ({'; '.join(errors)}); "
        "pass a torch.jit.ScriptModule, or ONNX bytes"
    )


def _to_onnx(module: Any, example: tuple[Any, ...]) -> bytes:
    import inspect
    import io

    import torch

    require("onnx", "onnx", "exporting a module to ONNX for timing")
    names = [f"input{i}" for i in range(len(example))]
    kwargs: dict[str, Any] = dict(
        input_names=names,
        output_names=None,
        dynamic_axes={n: {0: "batch"} for n in names},
        opset_version=17,
    )
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    was_training = getattr(module, "training", False)
    if hasattr(module, "eval"):
        module.eval()
    cm = _quiet()
    try:
        with torch.no_grad():
            torch.onnx.export(module, example, buf, **kwargs)
    except Exception as exc:
        raise AutoExitError(
            f"could not export {type(module).__name__} to ONNX ({' '.join(str(exc).split())[:300]}); "
            "time it as TorchScript (format='torchscript') or pass ONNX bytes"
        ) from None
    finally:
        cm.__exit__(None, None, None)
        if hasattr(module, "train"):
            module.train(was_training)
    return buf.getvalue()


def _read_model_file(path: Path, format: str | None) -> tuple[bytes, str]:
    if not path.is_file():
        raise AutoExitError(f"model file {path} does not exist")
    data = path.read_bytes()
    if not data:
        raise AutoExitError(f"model file {path} is empty")
    fmt = format
    if fmt is None:
        suffix = path.suffix.lower()
        fmt = "onnx" if suffix == ".onnx" else P.sniff_format(data)
    return data, fmt


def prepare_model(
    model: Any,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    dtypes: Any = None,
    format: str | None = None,
    batch_size: int = 1,
    end_to_end: bool = False,
) -> PreparedModel:
    """Turn what the user has into bytes + input specs (see ``Evaluator.measure``).

    End-to-end models are scripted (``torch.jit.script``), never traced, so
    their early-exit control flow survives; their inputs come with the data.
    """
    if format is not None and format not in P.FORMATS:
        raise AutoExitError(f"format must be one of {list(P.FORMATS)}, got {format!r}")
    example = _example_tuple(example_inputs)
    if example_inputs is not None and example is None:
        if input_shapes is None and (_is_shape(example_inputs) or isinstance(example_inputs, (list, tuple))):
            input_shapes, example_inputs = example_inputs, None  # a shape passed positionally
        else:
            raise AutoExitError(
                f"example_inputs must be a tensor or a tuple of tensors (with batch dim), "
                f"got {type(example_inputs).__name__}; or pass input_shapes=(C, H, W)"
            )
    specs: tuple[TensorSpec, ...] = ()
    if example is not None:
        specs = _specs_from_example(example)
    elif input_shapes is not None:
        specs = _specs_from_shapes(input_shapes, dtypes)
    elif not end_to_end:
        raise AutoExitError("pass example_inputs (tensors with batch dim) or input_shapes (per-sample shapes)")

    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        if not data:
            raise AutoExitError("the model bytes are empty")
        fmt = format or P.sniff_format(data)
    elif isinstance(model, (str, os.PathLike)):
        data, fmt = _read_model_file(Path(model).expanduser(), format)
    elif hasattr(model, "forward") and hasattr(model, "eval"):
        import torch

        fmt = format or "torchscript"
        if fmt == "onnx":
            if example is None:
                if not specs:
                    raise AutoExitError("exporting to ONNX needs example inputs or input_shapes")
                example = _random_batch(specs, max(batch_size, 2))
            data = _to_onnx(model, example)
        elif isinstance(model, torch.jit.ScriptModule):
            data = _script_bytes(model)
        else:
            if example is None and specs:
                example = _random_batch(specs, batch_size)
            data = _to_torchscript(model, example, script_only=end_to_end)
    else:
        raise AutoExitError(
            f"cannot time a {type(model).__name__}; pass a torch.nn.Module, torch.jit.ScriptModule, "
            "ONNX/TorchScript bytes or a path to a .onnx/.pt file"
        )
    if fmt == "torchscript":
        try:
            P.check_torchscript_archive(data)
        except P.ProtocolError as exc:
            raise AutoExitError(str(exc)) from None
    return PreparedModel(data=data, format=fmt, inputs=specs, digest=P.model_digest(data))


def _prepare_data(inputs: Any) -> tuple[bytes, tuple[int, ...], str]:
    """Real end-to-end inputs -> (raw little-endian bytes, shape, dtype)."""
    import numpy as np

    if _is_tensor(inputs):
        t = inputs.detach().cpu().contiguous()
        dtype = _dtype_name(t.dtype)
        if dtype == "bfloat16":
            raise AutoExitError("end-to-end inputs cannot be bfloat16; pass float32")
        arr = t.numpy()
    elif isinstance(inputs, np.ndarray):
        arr = np.ascontiguousarray(inputs)
        dtype = str(arr.dtype)
        if dtype not in P.DTYPE_SIZES:
            raise AutoExitError(f"end-to-end inputs of dtype {dtype} are not supported; use float32")
    else:
        raise AutoExitError(
            f"end-to-end inputs must be a tensor [N, ...] of real samples, got {type(inputs).__name__}"
        )
    if arr.ndim < 1 or arr.shape[0] < 1:
        raise AutoExitError("end-to-end inputs must have shape [N, ...] with N >= 1 samples")
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return data, tuple(int(d) for d in arr.shape), dtype


def _normalize_segments(segments: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(segments, Mapping):
        items = list(segments.items())
    elif isinstance(segments, Iterable):
        items = []
        for entry in segments:
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise AutoExitError("segments must be {name: (model, example)} or a list of (name, model, example)")
            items.append((entry[0], (entry[1], entry[2])))
    else:
        raise AutoExitError("segments must be {name: (model, example)} or a list of (name, model, example)")
    if not items:
        raise AutoExitError("no segments to measure")
    out = []
    for name, value in items:
        if not isinstance(name, str) or not P.SEGMENT_NAME_RE.match(name):
            raise AutoExitError(
                f"segment name {name!r} is invalid; use 1-128 letters, digits or _ . : / - [ ]"
            )
        if isinstance(value, PreparedModel):
            out.append((name, value, None))
            continue
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise AutoExitError(
                f"segment {name!r} must be (model, example_input or per-sample shape), got {type(value).__name__}"
            )
        out.append((name, value[0], value[1]))
    return out


# --------------------------------------------------------------------------- base evaluator


class _BaseEvaluator:
    settings: MeasureSettings
    max_input_elements: int = P.DEFAULT_MAX_INPUT_ELEMENTS

    def __init__(self, settings: MeasureSettings | None, cache_file: str | os.PathLike[str] | None):
        self.settings = settings or MeasureSettings()
        self.cache = ResultCache(cache_file)

    # subclasses provide these
    @property
    def device_key(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self) -> DeviceInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fingerprint(self) -> str:
        return self.info().fingerprint()

    def _cached(self, key: str) -> LatencyResult | None:
        hit = self.cache.get(key)
        if hit is None:
            return None
        try:
            return LatencyResult.from_dict(hit).replace(cached=True)
        except P.ProtocolError:
            return None

    def _remember(self, key: str, result: LatencyResult) -> LatencyResult:
        d = result.to_dict()
        self.cache.put(key, d)
        if result.cache_key and result.cache_key != key:
            self.cache.put(result.cache_key, d)
        return result

    def _checked(self, batch_sizes: Any, settings: MeasureSettings | None) -> tuple[tuple[int, ...], MeasureSettings]:
        try:
            bs = P.check_batch_sizes(batch_sizes)
        except P.ProtocolError as exc:
            raise AutoExitError(str(exc)) from None
        s = settings or self.settings
        if not isinstance(s, MeasureSettings):
            s = MeasureSettings.from_dict(s)
        return bs, s

    def _check_inputs(self, specs: Sequence[TensorSpec], bs: Sequence[int]) -> None:
        try:
            P.check_inputs(specs, bs, self.max_input_elements)
        except P.ProtocolError as exc:
            raise AutoExitError(str(exc)) from None

    # ------------------------------------------------------------------ public API
    def measure(
        self,
        model: Any,
        example_inputs: Any = None,
        *,
        input_shapes: Any = None,
        batch_sizes: Sequence[int] = (1,),
        settings: MeasureSettings | None = None,
        format: str | None = None,
        dtypes: Any = None,
    ) -> LatencyResult:
        """Time one model at each batch size (ms per batch); see the module docstring."""
        bs, s = self._checked(batch_sizes, settings)
        pm = (
            model
            if isinstance(model, PreparedModel)
            else prepare_model(
                model, example_inputs, input_shapes=input_shapes, dtypes=dtypes, format=format, batch_size=bs[0]
            )
        )
        self._check_inputs(pm.inputs, bs)
        return self._measure_models([("model", pm)], bs, s, kind="model")["model"]

    def measure_segments(
        self,
        segments: Mapping[str, Any],
        *,
        batch_sizes: Sequence[int] = (1,),
        settings: MeasureSettings | None = None,
        format: str | None = None,
    ) -> dict[str, LatencyResult]:
        """Time named segments (stages, heads) one after another; {name: LatencyResult} in order."""
        bs, s = self._checked(batch_sizes, settings)
        prepared = []
        for name, model, example in _normalize_segments(segments):
            if isinstance(model, PreparedModel):
                pm = model
            else:
                ex = _example_tuple(example)
                try:
                    pm = prepare_model(
                        model,
                        ex,
                        input_shapes=None if ex is not None else example,
                        format=format,
                        batch_size=bs[0],
                    )
                except AutoExitError as exc:
                    raise AutoExitError(f"segment {name!r}: {exc}") from None
            self._check_inputs(pm.inputs, bs)
            prepared.append((name, pm))
        names = [n for n, _ in prepared]
        if len(set(names)) != len(names):
            raise AutoExitError(f"segment names must be unique, got {names}")
        return self._measure_models(prepared, bs, s, kind="segment")

    def measure_end_to_end(
        self,
        model: Any,
        inputs: Any,
        batch_sizes: Sequence[int] = (1,),
        *,
        settings: MeasureSettings | None = None,
    ) -> LatencyResult:
        """Time a whole multi-exit model over real inputs; stats carry the exit counts."""
        bs, s = self._checked(batch_sizes, settings)
        pm = model if isinstance(model, PreparedModel) else prepare_model(model, end_to_end=True)
        data, shape, dtype = _prepare_data(inputs)
        if max(bs) > shape[0]:
            raise AutoExitError(f"batch size {max(bs)} is larger than the {shape[0]} input samples; pass more data")
        self._check_inputs([TensorSpec(shape=shape[1:], dtype=dtype)], bs)
        meta = P.request_meta(pm.format, None, bs, s, hashlib.sha256(data).hexdigest(), shape, dtype)
        key = P.cache_key("end_to_end", pm.digest, meta, self._fingerprint())
        hit = self._cached(key)
        if hit is not None:
            return hit
        return self._remember(key, self._run_end_to_end(pm, data, shape, dtype, bs, s, key))

    # ------------------------------------------------------------------ shared plumbing
    def _key(self, kind: str, pm: PreparedModel, bs: Sequence[int], s: MeasureSettings) -> str:
        meta = P.request_meta(pm.format, pm.inputs, bs, s)
        return P.cache_key(kind, pm.digest, meta, self._fingerprint())

    def _measure_models(
        self, prepared: list[tuple[str, PreparedModel]], bs: tuple[int, ...], s: MeasureSettings, kind: str
    ) -> dict[str, LatencyResult]:
        out: dict[str, LatencyResult] = {}
        todo: list[tuple[str, PreparedModel, str]] = []
        for name, pm in prepared:
            key = self._key(kind, pm, bs, s)
            hit = self._cached(key)
            if hit is not None:
                out[name] = hit
            else:
                todo.append((name, pm, key))
        if todo:
            fresh = self._run_models(todo, bs, s, kind)
            for name, _pm, key in todo:
                out[name] = self._remember(key, fresh[name])
        return {name: out[name] for name, _ in prepared}

    def _run_models(self, todo, bs, s, kind) -> dict[str, LatencyResult]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_end_to_end(self, pm, data, shape, dtype, bs, s, key) -> LatencyResult:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------- local


class LocalEvaluator(_BaseEvaluator):
    """Times models in this process (the embedded default; no server, no extra).

    The same engine as the server, minus process isolation: a model that hangs
    inside one call cannot be interrupted (``timeout_s`` is checked between
    groups). Measurements are serialized by a lock.
    """

    def __init__(
        self,
        device_key: str = "local",
        *,
        settings: MeasureSettings | None = None,
        cache_file: str | os.PathLike[str] | None = None,
        max_input_elements: int = P.DEFAULT_MAX_INPUT_ELEMENTS,
    ):
        super().__init__(settings, cache_file)
        self._key_name = device_key
        self.max_input_elements = max_input_elements
        self._info: DeviceInfo | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalEvaluator(device_key={self._key_name!r})"

    @property
    def device_key(self) -> str:
        return self._key_name

    def info(self) -> DeviceInfo:
        if self._info is None:
            self._info = P.collect_device_info(self._key_name)
        return self._info

    def _run(self, job: dict[str, Any], blobs: list[bytes], what: str) -> dict[str, Any]:
        from .measure import MeasureError, run_job

        job = dict(job, deadline_s=MeasureSettings.from_dict(job["settings"]).timeout_s)
        with self._lock:
            try:
                return run_job(job, blobs)
            except MeasureError as exc:
                cls = EvaluatorRequestError
                raise cls(f"local evaluator could not measure {what}: {exc}", status=exc.status) from None

    def _result(self, kind, pm, key, s, answer) -> LatencyResult:
        return LatencyResult(
            kind=kind,
            format=pm.format,
            model_sha256=pm.digest,
            cache_key=key,
            device=self.info(),
            settings=s,
            stats=tuple(LatencyStats.from_dict(x) for x in answer["stats"]),
            threads=int(answer["threads"]),
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=answer.get("extra", {}),
        )

    def _run_models(self, todo, bs, s, kind):
        out = {}
        for i, (name, pm, key) in enumerate(todo):
            if i and s.cooldown_ms:
                time.sleep(s.cooldown_ms / 1000.0)
            job = {
                "kind": "model",
                "format": pm.format,
                "inputs": [x.to_dict() for x in pm.inputs],
                "batch_sizes": list(bs),
                "settings": s.to_dict(),
            }
            what = f"segment {name!r}" if kind == "segment" else "the model"
            out[name] = self._result(kind, pm, key, s, self._run(job, [pm.data], what))
        return out

    def _run_end_to_end(self, pm, data, shape, dtype, bs, s, key):
        job = {
            "kind": "end_to_end",
            "format": pm.format,
            "data": {"shape": list(shape), "dtype": dtype},
            "batch_sizes": list(bs),
            "settings": s.to_dict(),
        }
        return self._result("end_to_end", pm, key, s, self._run(job, [pm.data, data], "the end-to-end model"))


# --------------------------------------------------------------------------- remote


def _resolve_token(token: str | None, token_file: str | os.PathLike[str] | None) -> str | None:
    if token:
        return token.strip()
    if token_file:
        p = Path(token_file).expanduser()
        try:
            text = p.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AutoExitError(f"cannot read evaluator token file {p}: {exc.strerror or exc}") from None
        if not text:
            raise AutoExitError(f"evaluator token file {p} is empty")
        return text
    env = os.environ.get(P.TOKEN_ENV, "").strip()
    return env or None


_RETRY_STATUS = {429, 502, 503, 504}


class RemoteEvaluator(_BaseEvaluator):
    """Times models on a device running ``autoexit evaluator serve``.

    Connection errors, timeouts and 429/502/503/504 are retried ``retries``
    times with exponential backoff (``backoff_s`` x 2^attempt, jittered);
    then :class:`EvaluatorUnavailable`. A 4xx raises
    :class:`EvaluatorRequestError` with the server's one-line reason.
    ``timeout_s`` is the HTTP wait on top of the measurement's own
    ``settings.timeout_s`` (queueing behind other measurements).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
        settings: MeasureSettings | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        cache_file: str | os.PathLike[str] | None = None,
        device_key: str | None = None,
    ):
        super().__init__(settings, cache_file)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AutoExitError(f"evaluator url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self._token = _resolve_token(token, token_file)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.expected_key = device_key
        self._info: DeviceInfo | None = None
        self._server_info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RemoteEvaluator({self.url!r})"

    # ------------------------------------------------------------------ HTTP
    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None,
        retry: bool = True, not_found_ok: bool = False,
    ) -> dict[str, Any] | None:
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        attempts = (self.retries + 1) if retry else 1
        last = "no attempt"
        for attempt in range(attempts):
            if attempt:
                delay = min(30.0, self.backoff_s * (2 ** (attempt - 1))) * (0.75 + 0.5 * random.random())
                time.sleep(delay)
            req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.connect_timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                status = exc.code
                detail = _detail(exc)
                if status == 404 and not_found_ok:
                    return None
                if status in _RETRY_STATUS:
                    last = f"HTTP {status}: {detail}"
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    if retry_after and retry_after.isdigit() and attempt + 1 < attempts:
                        time.sleep(min(30.0, float(retry_after)))
                    continue
                if status == 401:
                    raise EvaluatorRequestError(
                        f"evaluator {self.url} rejected the token (HTTP 401); pass the token the server was "
                        f"started with (token=, token_file= or ${P.TOKEN_ENV})",
                        status=401,
                    ) from None
                if 400 <= status < 500:
                    raise EvaluatorRequestError(
                        f"evaluator {self.url} refused the request (HTTP {status}): {detail}", status=status
                    ) from None
                raise EvaluatorError(
                    f"evaluator {self.url} failed with HTTP {status}: {detail} (a server bug; see its log)"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
                continue
            except json.JSONDecodeError:
                raise EvaluatorError(f"{self.url} answered with something that is not JSON; is it an evaluator?") from None
        raise EvaluatorUnavailable(
            f"evaluator {self.url} did not answer after {attempts} attempt(s) ({last}); is "
            f"`autoexit evaluator serve` running there and reachable?"
        )

    # ------------------------------------------------------------------ info
    def server_info(self, refresh: bool = False) -> dict[str, Any]:
        """The raw ``GET /info`` answer (device, limits, formats, cache size)."""
        if self._server_info is None or refresh:
            info = self._request("GET", "/info")
            assert info is not None
            proto = info.get("protocol")
            if proto != P.PROTOCOL_VERSION:
                raise EvaluatorError(
                    f"evaluator {self.url} speaks protocol {proto}, this client {P.PROTOCOL_VERSION}; "
                    "install the same autoexit version on both sides"
                )
            device = DeviceInfo.from_dict(info["device"])
            if self.expected_key and device.key != self.expected_key:
                raise EvaluatorError(
                    f"evaluator {self.url} is device '{device.key}', but the config expects "
                    f"'{self.expected_key}'; fix the device registry"
                )
            self._server_info, self._info = info, device
            limit = info.get("limits", {}).get("max_input_elements")
            if isinstance(limit, (int, float)) and limit > 0:
                self.max_input_elements = int(limit)
        return self._server_info

    def info(self) -> DeviceInfo:
        if self._info is None:
            self.server_info()
        assert self._info is not None
        return self._info

    def _fingerprint(self) -> str:
        return str(self.server_info()["fingerprint"])

    def health(self) -> dict[str, Any]:
        out = self._request("GET", "/health", retry=False)
        assert out is not None
        return out

    @property
    def device_key(self) -> str:
        return self.info().key

    # ------------------------------------------------------------------ measuring
    def _http_timeout(self, s: MeasureSettings) -> float:
        return s.timeout_s + self.timeout_s

    def _server_cached(self, key: str) -> LatencyResult | None:
        got = self._request("GET", f"/results/{key}", not_found_ok=True)
        return LatencyResult.from_dict(got) if got else None

    def _check_upload(self, nbytes: int) -> None:
        limit = self.server_info().get("limits", {}).get("max_upload_bytes")
        if isinstance(limit, (int, float)) and nbytes > limit:
            raise EvaluatorRequestError(
                f"the upload ({nbytes / 2**20:.1f} MiB) is over evaluator {self.url}'s limit of "
                f"{limit / 2**20:.1f} MiB; restart it with a larger --max-upload-mb",
                status=413,
            )

    def _run_models(self, todo, bs, s, kind):
        out: dict[str, LatencyResult] = {}
        missing = []
        for name, pm, key in todo:
            hit = self._server_cached(key)
            if hit is not None:
                out[name] = hit
            else:
                missing.append((name, pm))
        if not missing:
            return out
        specs = lambda pm: [x.to_dict() for x in pm.inputs]  # noqa: E731
        if kind == "segment":
            payload = {
                "segments": [
                    {"name": n, "model": P.b64encode(pm.data), "format": pm.format, "inputs": specs(pm)}
                    for n, pm in missing
                ],
                "batch_sizes": list(bs),
                "settings": s.to_dict(),
            }
            self._check_upload(sum(pm.size for _, pm in missing) * 4 // 3)
            got = self._request("POST", "/measure/segments", payload, timeout=self._http_timeout(s))
            assert got is not None
            for n, _ in missing:
                out[n] = LatencyResult.from_dict(got["results"][n])
        else:
            (n, pm), = missing
            payload = {
                "model": P.b64encode(pm.data),
                "format": pm.format,
                "inputs": specs(pm),
                "batch_sizes": list(bs),
                "settings": s.to_dict(),
            }
            self._check_upload(pm.size * 4 // 3)
            got = self._request("POST", "/measure", payload, timeout=self._http_timeout(s))
            assert got is not None
            out[n] = LatencyResult.from_dict(got)
        return out

    def _run_end_to_end(self, pm, data, shape, dtype, bs, s, key):
        hit = self._server_cached(key)
        if hit is not None:
            return hit
        self._check_upload((pm.size + len(data)) * 4 // 3)
        payload = {
            "model": P.b64encode(pm.data),
            "format": pm.format,
            "data": {"shape": list(shape), "dtype": dtype, "data": P.b64encode(data)},
            "batch_sizes": list(bs),
            "settings": s.to_dict(),
        }
        got = self._request("POST", "/measure/end_to_end", payload, timeout=self._http_timeout(s))
        assert got is not None
        return LatencyResult.from_dict(got)


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else "no detail"
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else (json.dumps(detail) if detail is not None else raw)
    return " ".join(text.split())[:500] or "no detail"


# --------------------------------------------------------------------------- several devices


@dataclass(frozen=True)
class DeviceStatus:
    key: str
    url: str | None
    ok: bool
    info: DeviceInfo | None = None
    error: str | None = None
    rtt_ms: float | None = None

    def describe(self) -> str:
        where = f" at {self.url}" if self.url else ""
        if self.ok and self.info is not None:
            return f"{self.key}{where}: ok ({self.info.describe()}, {self.rtt_ms:.0f} ms round trip)"
        return f"{self.key}{where}: NOT AVAILABLE ({self.error})"


class DeviceRegistry:
    """Device key -> evaluator. Entries are a URL, ``{"url", "token"|"token_file", ...}``
    (RemoteEvaluator keyword arguments) or an Evaluator; ``"local"`` means a LocalEvaluator.
    The server behind each URL must report the same device key."""

    def __init__(
        self,
        devices: Mapping[str, Any],
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        **remote_kwargs: Any,
    ):
        if not isinstance(devices, Mapping) or not devices:
            raise AutoExitError("the device registry needs at least one entry: {key: url}")
        self._evaluators: dict[str, Any] = {}
        self._urls: dict[str, str | None] = {}
        for key, entry in devices.items():
            if isinstance(entry, str) and entry == "local":
                ev: Any = LocalEvaluator(device_key=key)
            elif isinstance(entry, str):
                ev = RemoteEvaluator(entry, token, token_file=token_file, device_key=key, **remote_kwargs)
            elif isinstance(entry, Mapping):
                kw = dict(remote_kwargs)
                kw.update({k: v for k, v in entry.items() if k != "url"})
                if "url" not in entry:
                    raise AutoExitError(f"device {key!r} in the registry has no 'url'")
                if "token" not in kw and "token_file" not in kw:
                    kw["token"], kw["token_file"] = token, token_file
                kw.setdefault("device_key", key)
                try:
                    ev = RemoteEvaluator(entry["url"], **kw)
                except TypeError as exc:
                    raise AutoExitError(f"device {key!r}: bad option in the registry ({exc})") from None
            elif isinstance(entry, Evaluator):
                ev = entry
            else:
                raise AutoExitError(f"device {key!r}: expected a url, a mapping with 'url', or an evaluator")
            self._evaluators[key] = ev
            self._urls[key] = getattr(ev, "url", None)

    @property
    def keys(self) -> list[str]:
        return list(self._evaluators)

    def __contains__(self, key: object) -> bool:
        return key in self._evaluators

    def __getitem__(self, key: str) -> Evaluator:
        try:
            return self._evaluators[key]
        except KeyError:
            raise AutoExitError(f"unknown device {key!r}; the registry has {self.keys}") from None

    def get(self, key: str) -> Evaluator:
        return self[key]

    def probe(self, keys: Sequence[str] | None = None) -> dict[str, DeviceStatus]:
        """Ask every device (one attempt each) who it is; nothing is skipped silently."""
        out = {}
        for key in keys or self.keys:
            ev = self[key]
            t0 = time.perf_counter()
            try:
                if isinstance(ev, RemoteEvaluator):
                    saved, ev.retries = ev.retries, 0
                    try:
                        info = DeviceInfo.from_dict(ev.server_info(refresh=True)["device"])
                    finally:
                        ev.retries = saved
                else:
                    info = ev.info()
                out[key] = DeviceStatus(key, self._urls[key], True, info, None, (time.perf_counter() - t0) * 1e3)
            except AutoExitError as exc:
                out[key] = DeviceStatus(key, self._urls[key], False, None, str(exc), None)
        return out

    def require(self, keys: Sequence[str] | None = None) -> dict[str, DeviceInfo]:
        """Raise EvaluatorUnavailable naming every device that does not answer."""
        status = self.probe(keys)
        bad = [s for s in status.values() if not s.ok]
        if bad:
            raise EvaluatorUnavailable(
                f"{len(bad)} of {len(status)} device(s) not available: "
                + "; ".join(f"{s.key} ({s.error})" for s in bad)
            )
        return {k: s.info for k, s in status.items() if s.info is not None}

    def measure_all(self, *args: Any, keys: Sequence[str] | None = None, **kwargs: Any) -> dict[str, LatencyResult]:
        """``measure`` on every device; a failing device raises, named."""
        out = {}
        for key in keys or self.keys:
            try:
                out[key] = self[key].measure(*args, **kwargs)
            except EvaluatorError as exc:
                raise type(exc)(f"device {key!r}: {exc}") from None
        return out


# --------------------------------------------------------------------------- config


def _as_mapping(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    import dataclasses

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    if isinstance(cfg, str):
        return {"url": cfg}
    raise AutoExitError(f"the evaluator config must be a mapping, got {type(cfg).__name__}")


_REMOTE_KEYS = {"url", "token", "token_file", "timeout_s", "connect_timeout_s", "retries", "backoff_s",
                "cache_file", "device_key", "settings"}
_LOCAL_KEYS = {"local", "device_key", "cache_file", "settings"}


def _settings_of(cfg: Mapping[str, Any]) -> MeasureSettings | None:
    s = cfg.get("settings")
    if s is None or isinstance(s, MeasureSettings):
        return s
    try:
        return MeasureSettings.from_dict(s)
    except (P.ProtocolError, TypeError) as exc:
        raise AutoExitError(f"evaluator.settings: {exc}") from None


def registry_from_config(cfg: Any) -> DeviceRegistry:
    """``{"devices": {key: url | {url, token_file, ...}}, "token_file": ...}`` -> DeviceRegistry."""
    c = _as_mapping(cfg)
    if "devices" not in c:
        raise AutoExitError("evaluator config has no 'devices' mapping (key -> url)")
    shared = {k: v for k, v in c.items() if k in {"token", "token_file", "timeout_s", "retries", "backoff_s"}}
    settings = _settings_of(c)
    if settings is not None:
        shared["settings"] = settings
    return DeviceRegistry(c["devices"], **shared)


def evaluator_from_config(cfg: Any = None, device: str | None = None) -> Evaluator:
    """Build the evaluator a search should use.

    * ``None`` / ``{}`` / ``{"local": true}`` -> :class:`LocalEvaluator`
    * ``{"url": ..., "token_file": ...}`` (or just a URL string) -> :class:`RemoteEvaluator`
    * ``{"devices": {key: url, ...}, "default": key}`` -> that device's evaluator
      (``device=`` overrides ``default``; with one device it is the default)
    Optional ``settings: {...}`` (MeasureSettings fields) and ``cache_file``.
    """
    c = _as_mapping(cfg)
    if "devices" in c:
        reg = registry_from_config(c)
        key = device or c.get("default") or (reg.keys[0] if len(reg.keys) == 1 else None)
        if key is None:
            raise AutoExitError(f"several devices configured {reg.keys}; choose one with 'default' or device=")
        return reg[key]
    if "url" in c:
        unknown = sorted(set(c) - _REMOTE_KEYS)
        if unknown:
            raise AutoExitError(f"unknown evaluator option(s) {unknown}; known: {sorted(_REMOTE_KEYS)}")
        kw = {k: v for k, v in c.items() if k not in ("url", "settings")}
        return RemoteEvaluator(c["url"], settings=_settings_of(c), **kw)
    unknown = sorted(set(c) - _LOCAL_KEYS - {"devices", "default"})
    if unknown:
        raise AutoExitError(
            f"unknown evaluator option(s) {unknown}; use 'url' (+ 'token_file') for a device, "
            "'devices' for a registry, or nothing for the local evaluator"
        )
    return LocalEvaluator(
        device_key=c.get("device_key", "local"), settings=_settings_of(c), cache_file=c.get("cache_file")
    )
