"""The timing engine: load a model from bytes and time it, TVM ``time_evaluator`` style.

Used in-process by :class:`~autoexit.evaluator.client.LocalEvaluator` and in
the server's measurement worker process. Loading never unpickles: ONNX goes to
onnxruntime (no code runs on load), TorchScript to ``torch.jit.load`` (its own
restricted unpickler, which can only build TorchScript types).

``run_job(job, blobs)`` is the one entry point; ``job`` is a JSON-able dict::

    {"kind": "model" | "end_to_end", "format": "onnx" | "torchscript",
     "inputs": [TensorSpec dicts]           # kind == "model"
     "data": {"shape": [...], "dtype": ...} # kind == "end_to_end"; blobs[1] holds the bytes
     "batch_sizes": [...], "settings": {...}, "deadline_s": seconds left}

and ``blobs[0]`` is the model. It returns ``{"stats": [...], "threads": n,
"extra": {...}}`` or raises :class:`MeasureError` carrying an HTTP status
(422 bad model/input, 408 out of time).
"""

from __future__ import annotations

import gc
import io
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

from .protocol import DTYPE_SIZES, LatencyStats, MeasureSettings, TensorSpec, check_torchscript_archive

MAX_NUMBER = 10_000_000
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class MeasureError(Exception):
    """A model or input that cannot be measured; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(" ".join(str(message).split()))
        self.status = status


class MeasureTimeout(MeasureError):
    def __init__(self, message: str):
        super().__init__(message, status=408)


def summarize_exception(exc: BaseException, limit: int = 400) -> str:
    """One line out of a (possibly multi-line TorchScript) error message."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TorchScript errors end with the real cause after a traceback of the scripted code
    for ln in reversed(lines):
        if ln.startswith(("RuntimeError:", "ValueError:", "TypeError:", "IndexError:")):
            text = ln
            break
    else:
        text = lines[0] if lines else text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _MemoryProbe:
    """Peak resident memory added while measuring, where the platform lets us read it."""

    def __init__(self, accelerator: str):
        self.accelerator = accelerator
        self.baseline_kb = _status_kb("VmRSS")

    def reset(self) -> None:
        self.ok = _reset_peak_rss() and self.baseline_kb is not None
        if self.accelerator == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def read(self) -> tuple[int | None, int | None]:
        """(peak bytes above the pre-load baseline, absolute peak RSS bytes)."""
        if self.accelerator == "cuda":
            import torch

            peak = int(torch.cuda.max_memory_allocated())
            return peak, peak
        hwm = _status_kb("VmHWM") if getattr(self, "ok", False) else None
        if hwm is None or self.baseline_kb is None:
            return None, None
        return max(0, hwm - self.baseline_kb) * 1024, hwm * 1024


# --------------------------------------------------------------------------- timing


def time_callable(
    fn: Callable[[], Any],
    settings: MeasureSettings,
    *,
    sync: Callable[[], None] = lambda: None,
    deadline: float = math.inf,
    calls_per_run: int = 1,
    warmed_up: int = 0,
    what: str = "model",
    min_warmup: int = 0,
) -> tuple[list[float], int]:
    """Time ``fn`` like TVM's time_evaluator; returns (per-call ms of each group, number).

    ``settings.warmup`` untimed runs (at least ``min_warmup``, the runtime's own need; minus ``warmed_up``
    already done), then
    groups of ``number`` runs; a group shorter than ``min_repeat_ms`` is
    discarded, ``number`` grown (x1.618 at least, or enough to fill the
    minimum) and the groups kept so far dropped, until ``repeat`` groups of the
    same ``number`` (the one returned) are kept. ``calls_per_run`` divides the
    group time further (end-to-end: one run is a pass over several batches).
    """
    min_s = settings.min_repeat_ms / 1000.0
    cooldown_s = settings.cooldown_ms / 1000.0

    def check_deadline() -> None:
        if time.monotonic() > deadline:
            raise MeasureTimeout(
                f"measuring the {what} ran past settings.timeout_s={settings.timeout_s:g}; "
                f"raise timeout_s or lower repeat/min_repeat_ms"
            )

    for _ in range(max(0, max(settings.warmup, min_warmup) - warmed_up)):
        fn()
        check_deadline()
    sync()
    number = settings.number
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        while len(samples) < settings.repeat:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            elapsed = time.perf_counter() - t0
            check_deadline()
            if elapsed < min_s and number < MAX_NUMBER:
                per_run = max(elapsed / number, 1e-9)
                number = min(MAX_NUMBER, max(int(min_s / per_run * 1.1) + 1, int(number * 1.618) + 1))
                samples.clear()  # every kept group runs the same ``number`` (the one reported); bounded:
                continue  # number at least x1.618 per restart, up to MAX_NUMBER
            samples.append(elapsed / number / calls_per_run * 1000.0)
            if cooldown_s and len(samples) < settings.repeat:
                time.sleep(cooldown_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, number


# --------------------------------------------------------------------------- runners


def _np_dtype(name: str):
    import numpy as np

    if name == "bfloat16":
        raise MeasureError("bfloat16 inputs are not supported for ONNX models here; use float16 or float32")
    return np.dtype(name)


class _Runner:
    threads: int
    fmt: str
    min_warmup = 0  # untimed runs the runtime needs before its timings are steady, whatever settings.warmup says

    def make_inputs(self, specs: Sequence[TensorSpec], batch: int, seed: int) -> Any: ...

    def from_data(self, data: Any) -> Any: ...

    def call(self, inputs: Any) -> Any: ...

    def sync(self) -> None:
        pass


class TorchScriptRunner(_Runner):
    fmt = "torchscript"
    min_warmup = 2  # the profiling executor records shapes on the 1st call and optimises the graph on the 2nd

    def __init__(self, data: bytes, settings: MeasureSettings):
        import torch

        check_torchscript_archive(data)
        self.torch = torch
        if settings.accelerator == "cuda" and not torch.cuda.is_available():
            raise MeasureError("settings.accelerator='cuda' but torch sees no CUDA device here; use 'cpu'")
        self.device = torch.device(settings.accelerator)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.threads = torch.get_num_threads()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch.jit.load(io.BytesIO(data), map_location=self.device)
        except Exception as exc:  # corrupt archive, unknown ops, version skew
            raise MeasureError(f"cannot load the TorchScript model: {summarize_exception(exc)}") from None
        self.model.eval()
        if settings.optimize:  # as autoexit.load(path, optimize=...) runs it on this device
            from ..errors import AutoExitError
            from ..model import optimize_for_runtime, optimize_mode

            try:
                self.model = optimize_for_runtime(self.model, optimize_mode(settings.optimize))
            except AutoExitError as exc:
                raise MeasureError(f"{exc} (settings.optimize=false)") from None

    def make_inputs(self, specs: Sequence[TensorSpec], batch: int, seed: int) -> list[Any]:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        out = []
        for s in specs:
            shape = (batch, *s.shape)
            dtype = getattr(torch, s.dtype)
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=g).to(dtype)
            elif dtype == torch.bool:
                t = torch.randint(0, 2, shape, generator=g).bool()
            else:
                t = torch.randint(0, 2, shape, generator=g).to(dtype)
            out.append(t.to(self.device))
        return out

    def from_data(self, array: Any) -> list[Any]:
        return [self.torch.from_numpy(array).to(self.device)]

    def call(self, inputs: Sequence[Any]) -> Any:
        return self.model(*inputs)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def context(self):
        return self.torch.inference_mode()


class OnnxRunner(_Runner):
    fmt = "onnx"

    def __init__(self, data: bytes, settings: MeasureSettings):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MeasureError(
                "this evaluator has no onnxruntime; install it there (pip install 'autoexit[device]') "
                "or send TorchScript"
            ) from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = settings.threads or 0
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if settings.accelerator == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MeasureError(
                    "settings.accelerator='cuda' but onnxruntime has no CUDAExecutionProvider here; "
                    "install onnxruntime-gpu or use 'cpu'"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as exc:
            raise MeasureError(f"cannot load the ONNX model: {summarize_exception(exc)}") from None
        self.threads = settings.threads or _available_cores()
        self.model_inputs = self.session.get_inputs()

    def _check(self, specs: Sequence[TensorSpec], batch: int) -> list[str]:
        mins = self.model_inputs
        if len(specs) != len(mins):
            raise MeasureError(
                f"the ONNX model takes {len(mins)} input(s) "
                f"({', '.join(i.name for i in mins)}) but {len(specs)} input spec(s) were sent"
            )
        names = []
        by_name = {i.name: i for i in mins}
        for pos, spec in enumerate(specs):
            mi = by_name.get(spec.name) if spec.name else mins[pos]
            if mi is None:
                raise MeasureError(
                    f"the ONNX model has no input named {spec.name!r}; its inputs are {list(by_name)}"
                )
            want = (batch, *spec.shape)
            if len(mi.shape) != len(want):
                raise MeasureError(
                    f"ONNX input '{mi.name}' has rank {len(mi.shape)} (shape {_fmt_shape(mi.shape)}) but "
                    f"the request gives rank {len(want)} {list(want)} (batch dim + per-sample shape)"
                )
            for axis, (m, w) in enumerate(zip(mi.shape, want)):
                if isinstance(m, int) and m > 0 and m != w:
                    hint = (
                        f"; export it with a dynamic batch axis (dynamic_axes={{'{mi.name}': {{0: 'batch'}}}}) "
                        "or measure only that batch size"
                        if axis == 0
                        else ""
                    )
                    raise MeasureError(
                        f"ONNX input '{mi.name}' has shape {_fmt_shape(mi.shape)} but the request gives "
                        f"{list(want)}{hint}"
                    )
            want_dtype = _ORT_TYPES.get(mi.type)
            if want_dtype and want_dtype != spec.dtype:
                raise MeasureError(f"ONNX input '{mi.name}' expects dtype {want_dtype}, request gives {spec.dtype}")
            names.append(mi.name)
        return names

    def make_inputs(self, specs: Sequence[TensorSpec], batch: int, seed: int) -> dict[str, Any]:
        import numpy as np

        names = self._check(specs, batch)
        rng = np.random.default_rng(seed)
        feed = {}
        for name, s in zip(names, specs):
            shape = (batch, *s.shape)
            dt = _np_dtype(s.dtype)
            if dt.kind == "f":
                feed[name] = rng.standard_normal(shape, dtype=np.float32).astype(dt)
            else:
                feed[name] = rng.integers(0, 2, shape).astype(dt)
        return feed

    def from_data(self, array: Any) -> dict[str, Any]:
        if len(self.model_inputs) != 1:
            raise MeasureError("end-to-end mode needs a model with exactly one input (the batch tensor)")
        return {self.model_inputs[0].name: array}

    def call(self, inputs: dict[str, Any]) -> Any:
        return self.session.run(None, inputs)

    def context(self):
        import contextlib

        return contextlib.nullcontext()


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else repr(d) for d in shape) + "]"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_runner(data: bytes, fmt: str, settings: MeasureSettings) -> _Runner:
    if fmt == "torchscript":
        return TorchScriptRunner(data, settings)
    if fmt == "onnx":
        if data[:4] == b"PK\x03\x04":
            raise MeasureError("format is 'onnx' but the bytes are a zip archive (TorchScript?); set format")
        return OnnxRunner(data, settings)
    raise MeasureError(f"unsupported model format {fmt!r}; use 'onnx' or 'torchscript'")


# --------------------------------------------------------------------------- jobs


def _exit_counts(output: Any, batch: int, counts: dict[int, int]) -> None:
    """Add the exits of one batch to ``counts``; output must be (logits, exit_index)."""
    import numpy as np

    if not isinstance(output, (tuple, list)) or len(output) < 2:
        raise MeasureError(
            "end-to-end mode needs a model whose forward returns (logits, exit_index); "
            f"this one returned {type(output).__name__}"
        )
    idx = output[1]
    if hasattr(idx, "detach"):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.dtype.kind not in "iub":
        raise MeasureError(f"exit_index must be an integer (tensor), got dtype {arr.dtype}")
    if arr.ndim == 0:
        k = int(arr)
        counts[k] = counts.get(k, 0) + batch
        return
    arr = arr.reshape(-1)
    if arr.size != batch:
        raise MeasureError(
            f"exit_index has {arr.size} entries for a batch of {batch}; return one per sample or a single int"
        )
    for k, v in zip(*np.unique(arr, return_counts=True)):
        counts[int(k)] = counts.get(int(k), 0) + int(v)


def run_job(job: dict[str, Any], blobs: Sequence[bytes]) -> dict[str, Any]:
    """Measure one model as described by ``job`` (see the module docstring)."""
    started = time.monotonic()
    started_unix = time.time()
    settings = MeasureSettings.from_dict(job.get("settings"))
    deadline = started + float(job.get("deadline_s", settings.timeout_s))
    kind = job.get("kind", "model")
    batch_sizes = [int(b) for b in job["batch_sizes"]]
    mem = _MemoryProbe(settings.accelerator)
    runner = load_runner(blobs[0], job["format"], settings)
    if time.monotonic() > deadline:
        raise MeasureTimeout(f"loading the model took longer than settings.timeout_s={settings.timeout_s:g}")
    stats: list[dict[str, Any]] = []
    cooldown_s = settings.cooldown_ms / 1000.0
    with runner.context():
        if kind == "model":
            specs = [TensorSpec.from_dict(s) for s in job["inputs"]]
            for i, b in enumerate(batch_sizes):
                if i and cooldown_s:
                    time.sleep(cooldown_s)
                inputs = runner.make_inputs(specs, b, settings.seed)
                mem.reset()
                try:
                    runner.call(inputs)  # first call: shape errors surface here, not mid-timing
                    samples, number = time_callable(
                        lambda inputs=inputs: runner.call(inputs),
                        settings,
                        sync=runner.sync,
                        deadline=deadline,
                        warmed_up=1,
                        min_warmup=runner.min_warmup,
                    )
                except MeasureError:
                    raise
                except Exception as exc:
                    shapes = ", ".join(str([b, *s.shape]) for s in specs)
                    raise MeasureError(
                        f"the model failed on input(s) {shapes}: {summarize_exception(exc)}"
                    ) from None
                peak, rss = mem.read()
                stats.append(
                    LatencyStats.from_samples(
                        b, samples, number, peak_memory_bytes=peak, peak_rss_bytes=rss
                    ).to_dict()
                )
        elif kind == "end_to_end":
            array = decode_array(blobs[1], job["data"]["shape"], job["data"]["dtype"])
            n = array.shape[0]
            for i, b in enumerate(batch_sizes):
                if b > n:
                    raise MeasureError(f"batch size {b} is larger than the {n} supplied input samples")
                if i and cooldown_s:
                    time.sleep(cooldown_s)
                nb = n // b
                batches = [runner.from_data(array[j * b : (j + 1) * b]) for j in range(nb)]
                counts: dict[int, int] = {}
                mem.reset()
                try:
                    for batch in batches:  # one untimed pass: exit counts + first warm-up
                        _exit_counts(runner.call(batch), b, counts)
                    if time.monotonic() > deadline:
                        raise MeasureTimeout(
                            f"one pass over the inputs took longer than settings.timeout_s={settings.timeout_s:g}"
                        )

                    def one_pass(batches=batches):
                        for batch in batches:
                            runner.call(batch)

                    samples, number = time_callable(
                        one_pass,
                        settings,
                        sync=runner.sync,
                        deadline=deadline,
                        calls_per_run=nb,
                        warmed_up=1,
                        min_warmup=runner.min_warmup,
                        what="end-to-end model",
                    )
                except MeasureError:
                    raise
                except Exception as exc:
                    raise MeasureError(
                        f"the model failed on a batch of shape {[b, *array.shape[1:]]}: {summarize_exception(exc)}"
                    ) from None
                peak, rss = mem.read()
                stats.append(
                    LatencyStats.from_samples(
                        b,
                        samples,
                        number,
                        peak_memory_bytes=peak,
                        peak_rss_bytes=rss,
                        exit_counts=counts,
                        batches_per_run=nb,
                    ).to_dict()
                )
        else:
            raise MeasureError(f"unknown job kind {kind!r}")
    return {
        "stats": stats,
        "threads": runner.threads,
        "extra": {
            "wall_s": round(time.monotonic() - started, 4),
            "started_unix": round(started_unix, 4),
            "finished_unix": round(time.time(), 4),
        },
    }


def decode_array(data: bytes, shape: Sequence[int], dtype: str):
    """Raw little-endian bytes -> numpy array (no pickle), checking the size."""
    import numpy as np

    if dtype not in DTYPE_SIZES or dtype == "bfloat16":
        raise MeasureError(f"end-to-end data dtype {dtype!r} is not supported; use float32, float16, int64, ...")
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if len(data) != need:
        raise MeasureError(
            f"end-to-end data has {len(data)} bytes but shape {list(shape)} of {dtype} needs {need}"
        )
    arr = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return arr.astype(np.dtype(dtype))  # a native-endian, writable copy
