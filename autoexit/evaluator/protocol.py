"""Wire protocol of the device evaluator, shared by the server and the clients.

Pure standard library: importing this module needs neither fastapi, pydantic
nor torch, so the core package and the clients work without the ``device``
extra. The server mirrors these shapes in pydantic models for its OpenAPI
spec and validates with the functions here, so there is one definition of
what a valid request is.

Conventions
-----------
* Latencies are milliseconds **per batch** (one call of the model on a batch
  of ``batch_size`` samples).
* Input shapes on the wire are **per sample** (no batch dimension); the
  evaluator prepends each requested batch size.
* Models travel as base64 strings inside JSON (ONNX protobuf bytes or a
  TorchScript archive written by ``torch.jit.save``); end-to-end input data
  travels as base64 of the raw little-endian array bytes. Nothing is pickled.

Requests (JSON bodies)::

    POST /measure            {"model", "format", "inputs": [TensorSpec], "batch_sizes", "settings"}
    POST /measure/segments   {"segments": [{"name", "model", "format", "inputs"}], "batch_sizes", "settings"}
    POST /measure/end_to_end {"model", "format", "data": {"shape", "dtype", "data"}, "batch_sizes", "settings"}
    GET  /results/{key}      a cached LatencyResult by cache key (lets a client skip the upload)
    GET  /info, GET /health

Results are :class:`LatencyResult` dicts (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import platform
import re
import socket
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from ..errors import AutoExitError

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"
TOKEN_ENV = "AUTOEXIT_EVALUATOR_TOKEN"

FORMATS = ("onnx", "torchscript")
DTYPES = ("float32", "float16", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
# numpy-compatible itemsizes (bfloat16 travels as 2-byte words)
DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
KINDS = ("model", "end_to_end")
ACCELERATORS = ("cpu", "cuda")

# Hard bounds a request must respect (the server may be configured tighter).
LIMITS = {
    "max_inputs": 16,
    "max_ndim": 8,
    "max_dim": 1 << 24,
    "max_batch_sizes": 32,
    "max_batch_size": 1 << 16,
    "max_segments": 256,
    "max_name_len": 128,
    "max_warmup": 100_000,
    "max_repeat": 100_000,
    "max_number": 10_000_000,
    "max_min_repeat_ms": 600_000.0,
    "max_cooldown_ms": 600_000.0,
    "max_timeout_s": 86_400.0,
    "max_threads": 1024,
}
DEFAULT_MAX_INPUT_ELEMENTS = 1 << 26  # per input tensor, batch included (256 MiB of float32)
SEGMENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]{1,128}$")
CACHE_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


OPTIMIZE_MODES = ("onednn", "freeze")  # settings.optimize besides true / false (autoexit.model.optimize_for_runtime)


class ProtocolError(AutoExitError):
    """A request or result does not follow the evaluator protocol."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MeasureSettings:
    """How to time a model (after TVM's ``time_evaluator``).

    ``warmup`` untimed calls (TorchScript models get at least 2 whatever it says: the
    profiling executor optimises the graph on the second call, which would otherwise
    be timed), then ``repeat`` groups of ``number`` calls; each
    group yields one sample (its mean per call). ``number`` is raised until a
    group lasts at least ``min_repeat_ms`` (groups shorter than that are
    discarded), so fast models are timed over many calls and slow models once
    per group. ``cooldown_ms`` sleeps between groups (thermal headroom on
    passively cooled boards). ``timeout_s`` bounds the whole request.
    ``threads`` pins the intra-op thread count (None: the runtime's default;
    the count actually used is recorded in the result). ``seed`` seeds the
    random inputs. ``accelerator`` is "cpu" or "cuda" (Jetson GPU). ``optimize``
    times a TorchScript model as ``autoexit.load(path, optimize=...)`` runs it:
    ``true`` / ``"onednn"``: frozen, batch norms folded, oneDNN convolutions
    where the device's PyTorch has them; ``"freeze"``: frozen and folded only
    (``autoexit.model.optimize_for_runtime``); ONNX models are optimised by
    onnxruntime itself, so it changes nothing for them. It is left
    out of the wire form when false, so evaluators older than it still accept
    default settings.
    """

    warmup: int = 3
    repeat: int = 20
    number: int = 1
    min_repeat_ms: float = 50.0
    cooldown_ms: float = 0.0
    timeout_s: float = 300.0
    threads: int | None = None
    seed: int = 0
    accelerator: str = "cpu"
    optimize: bool | str = False

    def __post_init__(self) -> None:
        _check_int("warmup", self.warmup, 0, LIMITS["max_warmup"])
        _check_int("repeat", self.repeat, 1, LIMITS["max_repeat"])
        _check_int("number", self.number, 1, LIMITS["max_number"])
        _check_float("min_repeat_ms", self.min_repeat_ms, 0.0, LIMITS["max_min_repeat_ms"])
        _check_float("cooldown_ms", self.cooldown_ms, 0.0, LIMITS["max_cooldown_ms"])
        _check_float("timeout_s", self.timeout_s, 1e-3, LIMITS["max_timeout_s"])
        if self.threads is not None:
            _check_int("threads", self.threads, 1, LIMITS["max_threads"])
        _check_int("seed", self.seed, 0, 2**32 - 1)
        if self.accelerator not in ACCELERATORS:
            raise ProtocolError(
                f"settings.accelerator must be one of {list(ACCELERATORS)}, got {self.accelerator!r}"
            )
        if not (isinstance(self.optimize, bool) or self.optimize in OPTIMIZE_MODES):
            raise ProtocolError(f"settings.optimize must be true, false or one of {', '.join(OPTIMIZE_MODES)}, "
                                f"got {self.optimize!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> MeasureSettings:
        """Cheap settings for search trials: few warm-up runs, 5 groups of >= 10 ms."""
        base = {"warmup": 2, "repeat": 5, "min_repeat_ms": 10.0}
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes: Any) -> MeasureSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["optimize"]:  # older evaluators refuse unknown settings; false is their behaviour
            del d["optimize"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MeasureSettings:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ProtocolError(f"settings must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"unknown settings {unknown}; known settings are {sorted(known)}")
        return cls(**dict(data))

    def key_dict(self) -> dict[str, Any]:
        """The settings that change a measurement (the timeout does not)."""
        d = self.to_dict()
        d.pop("timeout_s")
        return d


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"settings.{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"settings.{name} must be in [{lo}, {hi}], got {value}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"settings.{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"settings.{name} must be in [{lo}, {hi}], got {value}")


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorSpec:
    """One model input: per-sample shape (no batch dimension), dtype, optional name."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        check_shape("input shape", self.shape, allow_empty=True)
        if self.dtype not in DTYPES:
            raise ProtocolError(f"input dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ProtocolError(f"input name must be a non-empty string or null, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        if not isinstance(data, Mapping) or "shape" not in data:
            raise ProtocolError("each input must be an object with a 'shape' (per sample, no batch dim)")
        return cls(shape=tuple(data["shape"]), dtype=data.get("dtype", "float32"), name=data.get("name"))


def check_shape(what: str, shape: Sequence[Any], *, allow_empty: bool = False) -> None:
    if not isinstance(shape, (tuple, list)):
        raise ProtocolError(f"{what} must be a list of positive integers, got {shape!r}")
    if not allow_empty and not shape:
        raise ProtocolError(f"{what} must have at least one dimension")
    if len(shape) > LIMITS["max_ndim"]:
        raise ProtocolError(f"{what} has {len(shape)} dimensions; at most {LIMITS['max_ndim']} are allowed")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= LIMITS["max_dim"]:
            raise ProtocolError(
                f"{what} must contain integers in [1, {LIMITS['max_dim']}], got {list(shape)!r}"
            )


def check_batch_sizes(batch_sizes: Sequence[Any]) -> tuple[int, ...]:
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
        batch_sizes = (batch_sizes,)
    if not isinstance(batch_sizes, (tuple, list)) or not batch_sizes:
        raise ProtocolError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
    if len(batch_sizes) > LIMITS["max_batch_sizes"]:
        raise ProtocolError(f"at most {LIMITS['max_batch_sizes']} batch sizes per request, got {len(batch_sizes)}")
    out = []
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= LIMITS["max_batch_size"]:
            raise ProtocolError(
                f"batch sizes must be integers in [1, {LIMITS['max_batch_size']}], got {list(batch_sizes)!r}"
            )
        out.append(b)
    if len(set(out)) != len(out):
        raise ProtocolError(f"batch_sizes must not repeat, got {out}")
    return tuple(out)


def check_inputs(
    inputs: Sequence[TensorSpec], batch_sizes: Sequence[int], max_elements: int = DEFAULT_MAX_INPUT_ELEMENTS
) -> None:
    if not inputs:
        raise ProtocolError("a model needs at least one input spec (per-sample shape and dtype)")
    if len(inputs) > LIMITS["max_inputs"]:
        raise ProtocolError(f"at most {LIMITS['max_inputs']} inputs per model, got {len(inputs)}")
    bmax = max(batch_sizes)
    for spec in inputs:
        n = bmax * math.prod(spec.shape)
        if n > max_elements:
            raise ProtocolError(
                f"input of shape [{bmax}, {', '.join(map(str, spec.shape))}] has {n} elements, over this "
                f"evaluator's limit of {max_elements}; use smaller batch sizes or inputs"
            )


def b64encode(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"{what} is not valid base64 ({exc}); encode the raw bytes with base64") from None
    if not data:
        raise ProtocolError(f"{what} is empty")
    return data


# --------------------------------------------------------------------------- model identity


def sniff_format(data: bytes) -> str:
    """'torchscript' for a zip archive, 'onnx' otherwise (ONNX is a bare protobuf)."""
    return "torchscript" if data[:4] == b"PK\x03\x04" else "onnx"


def check_torchscript_archive(data: bytes) -> None:
    """Reject what is not a TorchScript archive before any loader sees it.

    ``torch.save`` checkpoints are zips too but hold pickled Python objects
    and no ``code/`` directory; legacy checkpoints are bare pickles.
    """
    if data[:1] == b"\x80":
        raise ProtocolError(
            "the model is a pickle (torch.save), which is never unpickled here; export TorchScript "
            "with torch.jit.script/trace + torch.jit.save, or ONNX"
        )
    if data[:4] != b"PK\x03\x04":
        raise ProtocolError(
            "the model is not a TorchScript archive (expected a zip written by torch.jit.save)"
        )
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ProtocolError(f"the TorchScript archive is corrupt ({exc}); save it again with torch.jit.save") from None
    if not any(n.endswith("/constants.pkl") for n in names) or not any("/code/" in n for n in names):
        raise ProtocolError(
            "the zip is a torch.save checkpoint, not TorchScript (no code/ or constants.pkl); "
            "export the model with torch.jit.script/trace + torch.jit.save"
        )


_MANGLE_RE = re.compile(rb"[./]___torch_mangle_\d+")
_TOP_LEVEL_RE = re.compile(rb"^(?=class |def )", re.M)


def model_digest(data: bytes) -> str:
    """SHA-256 identifying a model's content.

    For TorchScript archives it hashes the entries and skips what changes
    from one save of the same module to the next: the random
    ``.data/serialization_id``, the per-process class-name mangling
    (``___torch_mangle_N``) that repeated tracing introduces, the example
    inputs a trace may store (``traced_inputs``) and the ``*.debug_pkl``
    source ranges (debug info only). Code is compared class by class: the
    first script of a class in a process writes all of a Python module's
    classes into one ``code/.../model.py``, a later (mangled) script writes
    each into its own ``model/___torch_mangle_N.py``. So scripting, tracing
    and saving the same module twice gives the same digest (and the same
    cache key). Any other bytes (ONNX) are hashed as they are.
    """
    if data[:4] == b"PK\x03\x04":
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            entries: dict[bytes, set[bytes]] = {}
            for name in zf.namelist():
                if name.endswith((".data/serialization_id", ".debug_pkl")) or "/traced_inputs" in name:
                    continue
                norm = _MANGLE_RE.sub(b"", name.encode())
                content = _MANGLE_RE.sub(b"", zf.read(name))
                blocks = _TOP_LEVEL_RE.split(content) if "/code/" in name and name.endswith(".py") else [content]
                entries.setdefault(norm, set()).update(hashlib.sha256(b).digest() for b in blocks if b.strip())
            h = hashlib.sha256(b"torchscript-zip:2:")
            for norm in sorted(entries):
                h.update(norm + b"\0" + b"".join(sorted(entries[norm])))
            return h.hexdigest()
        except Exception:  # a corrupt zip: fall back to the raw bytes
            pass
    return hashlib.sha256(data).hexdigest()


def cache_key(kind: str, model_sha256: str, meta: Mapping[str, Any], device_fingerprint: str) -> str:
    """SHA-256 over model digest + request settings + device: the results-cache key."""
    payload = json.dumps(
        {"v": PROTOCOL_VERSION, "kind": kind, "model": model_sha256, "meta": meta, "device": device_fingerprint},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def request_meta(
    fmt: str,
    inputs: Sequence[TensorSpec] | None,
    batch_sizes: Sequence[int],
    settings: MeasureSettings,
    data_sha256: str | None = None,
    data_shape: Sequence[int] | None = None,
    data_dtype: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": fmt,
        "batch_sizes": list(batch_sizes),
        "settings": settings.key_dict(),
    }
    if inputs is not None:
        meta["inputs"] = [s.to_dict() for s in inputs]
    if data_sha256 is not None:
        meta["data"] = {"sha256": data_sha256, "shape": list(data_shape or ()), "dtype": data_dtype}
    return meta


# --------------------------------------------------------------------------- device


@dataclass(frozen=True)
class DeviceInfo:
    """What the timings were measured on."""

    key: str
    hostname: str = ""
    system: str = ""
    machine: str = ""
    board: str = ""
    cpu_model: str = ""
    cores: int = 0
    governor: str | None = None
    max_freq_mhz: float | None = None
    memory_bytes: int | None = None
    python: str = ""
    torch: str | None = None
    onnxruntime: str | None = None
    autoexit: str = ""
    protocol: int = PROTOCOL_VERSION

    def fingerprint(self) -> str:
        """Hash of what changes timings (not the hostname): part of every cache key."""
        parts = {
            "key": self.key,
            "machine": self.machine,
            "board": self.board,
            "cpu_model": self.cpu_model,
            "cores": self.cores,
            "governor": self.governor,
            "torch": self.torch,
            "onnxruntime": self.onnxruntime,
            "protocol": self.protocol,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in known})

    def describe(self) -> str:
        bits = [self.key, self.board or self.cpu_model or self.machine, f"{self.cores} cores"]
        if self.governor:
            bits.append(f"governor={self.governor}")
        bits.append(f"torch {self.torch}" if self.torch else "no torch")
        if self.onnxruntime:
            bits.append(f"onnxruntime {self.onnxruntime}")
        return ", ".join(b for b in bits if b)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(4096).decode("utf-8", "replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for wanted in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == wanted and v.strip():
                return v.strip()
    return platform.processor() or platform.machine()


def collect_device_info(key: str) -> DeviceInfo:
    """Describe this machine with the standard library only (works on x86 and aarch64)."""
    from .. import __version__

    board = _read("/sys/firmware/devicetree/base/model") or _read("/proc/device-tree/model") or ""
    tegra = _read("/etc/nv_tegra_release")
    if tegra and "tegra" not in board.lower() and "jetson" not in board.lower():
        board = (board + " " if board else "") + "(" + tegra.splitlines()[0][:80] + ")"
    freq = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    mem = None
    meminfo = _read("/proc/meminfo")
    if meminfo:
        m = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
        mem = int(m.group(1)) * 1024 if m else None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return DeviceInfo(
        key=key,
        hostname=socket.gethostname(),
        system=platform.system(),
        machine=platform.machine(),
        board=board,
        cpu_model=_cpu_model(),
        cores=cores,
        governor=_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        max_freq_mhz=(int(freq) / 1000.0) if freq and freq.isdigit() else None,
        memory_bytes=mem,
        python=platform.python_version(),
        torch=_version("torch"),
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        autoexit=__version__,
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LatencyStats:
    """Timings of one batch size, in milliseconds per batch.

    ``samples_ms`` holds one value per group (mean over its ``number``
    calls); the statistics are over those samples. ``runs`` = repeat x number
    timed calls. ``exit_counts`` (end-to-end mode) maps exit index -> number of
    samples that left there during one pass over the supplied inputs.
    """

    batch_size: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    runs: int
    repeat: int
    number: int
    samples_ms: tuple[float, ...] = ()
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    exit_counts: dict[int, int] | None = None
    batches_per_run: int = 1

    @property
    def cv(self) -> float:
        """Coefficient of variation of the group samples (std / mean)."""
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    @property
    def per_sample_ms(self) -> float:
        return self.median_ms / self.batch_size

    @property
    def exit_rates(self) -> dict[int, float] | None:
        if not self.exit_counts:
            return None
        total = sum(self.exit_counts.values())
        return {k: v / total for k, v in sorted(self.exit_counts.items())}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        if self.exit_counts is not None:
            d["exit_counts"] = {str(k): int(v) for k, v in sorted(self.exit_counts.items())}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyStats:
        d = dict(data)
        d["samples_ms"] = tuple(float(x) for x in d.get("samples_ms", ()))
        if d.get("exit_counts") is not None:
            d["exit_counts"] = {int(k): int(v) for k, v in d["exit_counts"].items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_samples(cls, batch_size: int, samples_ms: Sequence[float], number: int, **extra: Any) -> LatencyStats:
        xs = sorted(float(x) for x in samples_ms)
        if not xs:
            raise ProtocolError("no timing samples")
        n = len(xs)
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
        return cls(
            batch_size=batch_size,
            median_ms=_percentile(xs, 50),
            p90_ms=_percentile(xs, 90),
            p99_ms=_percentile(xs, 99),
            mean_ms=mean,
            std_ms=std,
            min_ms=xs[0],
            max_ms=xs[-1],
            runs=n * number,
            repeat=n,
            number=number,
            samples_ms=tuple(samples_ms),
            **extra,
        )


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyResult:
    """Timings of one model (or segment) at each requested batch size."""

    kind: str
    format: str
    model_sha256: str
    cache_key: str
    device: DeviceInfo
    settings: MeasureSettings
    stats: tuple[LatencyStats, ...]
    threads: int
    cached: bool = False
    measured_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- convenience: the first batch size is the "headline" one
    @property
    def median_ms(self) -> float:
        return self.stats[0].median_ms

    @property
    def p90_ms(self) -> float:
        return self.stats[0].p90_ms

    @property
    def p99_ms(self) -> float:
        return self.stats[0].p99_ms

    @property
    def mean_ms(self) -> float:
        return self.stats[0].mean_ms

    @property
    def std_ms(self) -> float:
        return self.stats[0].std_ms

    @property
    def exit_counts(self) -> dict[int, int] | None:
        return self.stats[0].exit_counts

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(s.batch_size for s in self.stats)

    @property
    def per_batch(self) -> dict[int, LatencyStats]:
        return {s.batch_size: s for s in self.stats}

    def at(self, batch_size: int) -> LatencyStats:
        for s in self.stats:
            if s.batch_size == batch_size:
                return s
        raise AutoExitError(
            f"no timings for batch size {batch_size}; this result has batch sizes {list(self.batch_sizes)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format": self.format,
            "model_sha256": self.model_sha256,
            "cache_key": self.cache_key,
            "device": self.device.to_dict(),
            "settings": self.settings.to_dict(),
            "stats": [s.to_dict() for s in self.stats],
            "threads": self.threads,
            "cached": self.cached,
            "measured_at": self.measured_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyResult:
        try:
            return cls(
                kind=data["kind"],
                format=data["format"],
                model_sha256=data["model_sha256"],
                cache_key=data["cache_key"],
                device=DeviceInfo.from_dict(data["device"]),
                settings=MeasureSettings.from_dict(data["settings"]),
                stats=tuple(LatencyStats.from_dict(s) for s in data["stats"]),
                threads=int(data["threads"]),
                cached=bool(data.get("cached", False)),
                measured_at=str(data.get("measured_at", "")),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed latency result ({exc!r}); client and server versions may differ") from None

    def replace(self, **changes: Any) -> LatencyResult:
        return replace(self, **changes)

    def summary(self) -> str:
        parts = [
            f"b={s.batch_size}: median {s.median_ms:.3f} ms, p90 {s.p90_ms:.3f} ms (cv {s.cv:.1%}, {s.runs} runs)"
            for s in self.stats
        ]
        return f"{self.format} on {self.device.key}: " + "; ".join(parts)


def segment_profile(
    results: Mapping[str, LatencyResult], batch_size: int | None = None, stat: str = "median_ms"
) -> dict[str, float]:
    """Flatten per-segment results to ``{name: milliseconds}`` for one batch size.

    ``stat`` is a LatencyStats field (median_ms, mean_ms, p90_ms, ...).
    """
    if stat not in {f.name for f in fields(LatencyStats) if f.name.endswith("_ms") and f.type == "float"}:
        raise AutoExitError(f"stat must be a LatencyStats *_ms field such as median_ms or p99_ms, got {stat!r}")
    out = {}
    for name, res in results.items():
        s = res.stats[0] if batch_size is None else res.at(batch_size)
        out[name] = float(getattr(s, stat))
    return out


def block_head_latencies_s(
    results: Mapping[str, LatencyResult],
    stages: Sequence[str],
    heads: Sequence[str | None],
    batch_size: int | None = None,
    stat: str = "p99_ms",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-block and per-head latencies in **seconds**, in block order, for the performance model.

    ``stages[i]`` / ``heads[i]`` name the segments of block ``i`` and of its
    exit head in ``results`` (from ``measure_segments``); a head of ``None``
    costs 0 (the last block already ends in the classifier). ``stat``
    defaults to the 99th percentile, as paper 004 profiles ``CK_i``/``CB_i``.
    The pair feeds ``perfmodel.Tier(block_latency_s=..., head_latency_s=...)``.
    """
    if len(stages) != len(heads):
        raise AutoExitError(f"got {len(stages)} stages but {len(heads)} heads; give one head (or None) per stage")
    ms = segment_profile(results, batch_size, stat)
    missing = [n for n in [*stages, *[h for h in heads if h]] if n not in ms]
    if missing:
        raise AutoExitError(f"no measurement for segment(s) {missing}; measured: {sorted(ms)}")
    return (
        tuple(ms[s] / 1000.0 for s in stages),
        tuple(ms[h] / 1000.0 if h else 0.0 for h in heads),
    )
