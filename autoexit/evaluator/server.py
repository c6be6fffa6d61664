"""The evaluator server: runs on the device (Raspberry Pi, Jetson, ...) and times models.

Start it with ``autoexit evaluator serve --host H --port P --token-file F
--device-key rpi4`` or ``python -m autoexit.evaluator ...`` (same options).
Needs the ``device`` extra (fastapi, uvicorn, onnxruntime); nothing else of
the search stack.

Endpoints (JSON; schemas in :mod:`autoexit.evaluator.protocol`, the OpenAPI
spec at ``/openapi.json``)::

    GET  /health                 liveness, no token needed
    GET  /info                   device description, limits, formats, cache size
    POST /measure                one model, several batch sizes -> LatencyResult
    POST /measure/segments       named segments (stages, heads) -> {name: LatencyResult}
    POST /measure/end_to_end     whole multi-exit model on real inputs -> LatencyResult + exit counts
    GET  /results/{key}          a cached result by key (404 if unknown)

Rules:

* A bearer token is required unless the server listens on loopback only
  (starting on a non-loopback address without ``--token-file`` is refused).
* Bodies over ``--max-upload-mb`` get 413 before they are read in full.
* Models are never unpickled: ONNX goes to onnxruntime, TorchScript to
  ``torch.jit.load``; ``torch.save`` pickles are refused with 422.
* Measurements run one at a time (an asyncio lock; ``--max-queue`` waiting
  requests, then 429) in a separate worker process that is killed and
  restarted if it overruns the request's ``timeout_s`` (408) or crashes (422).
* Results are cached by SHA-256(model + settings + device) in a JSON-lines
  file that survives restarts.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from .. import __version__
from ..errors import AutoExitError, require
from . import protocol as P
from .cache import ResultCache
from .protocol import LIMITS, LatencyResult, LatencyStats, MeasureSettings, ProtocolError, TensorSpec

require("fastapi", "device", "the evaluator server")
require("uvicorn", "device", "the evaluator server")

from fastapi import Depends, FastAPI, HTTPException, Request  # noqa: E402
from fastapi import Path as FPath  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, StrictBool  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

log = logging.getLogger("autoexit.evaluator")

DEVICE_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


# --------------------------------------------------------------------------- configuration


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname resolving to who-knows-what: treat as exposed


def token_required(host: str, token: str | None) -> bool:
    """The token rule: a token is enforced whenever one is configured, and must be
    configured whenever the server is reachable from other machines."""
    if token:
        return True
    if not is_loopback(host):
        raise AutoExitError(
            f"refusing to listen on {host} without a token: anyone on the network could run code on "
            "this device; pass --token-file FILE (e.g. created with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE) or bind --host 127.0.0.1"
        )
    return False


def default_cache_file(device_key: str) -> Path:
    """``$AUTOEXIT_CACHE/evaluator/<key>.jsonl`` (default ``~/.cache/autoexit/...``)."""
    base = os.environ.get("AUTOEXIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoexit")
    return Path(base).expanduser() / "evaluator" / f"{device_key}.jsonl"


@dataclass(frozen=True)
class ServerConfig:
    host: str = P.DEFAULT_HOST
    port: int = P.DEFAULT_PORT
    token: str | None = None
    device_key: str = "local"
    max_upload_bytes: int = 256 * 1024 * 1024
    max_timeout_s: float = 900.0
    max_input_elements: int = P.DEFAULT_MAX_INPUT_ELEMENTS
    max_queue: int = 32
    cache_file: Path | None = None
    isolate: bool = True  # measure in a worker process (killed on overrun)
    threads: int | None = None  # default intra-op threads of the worker
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not DEVICE_KEY_RE.match(self.device_key):
            raise AutoExitError(
                f"device key {self.device_key!r} is invalid; use 1-64 letters, digits, '_', '.', '-' (e.g. rpi4)"
            )
        if not 0 < self.port < 65536:
            raise AutoExitError(f"port must be in 1..65535, got {self.port}")
        if self.port in (8080, 8081):
            raise AutoExitError(
                f"port {self.port} is reserved for the optuna dashboard / NNI web UI; use e.g. {P.DEFAULT_PORT}"
            )
        if self.max_upload_bytes < 1024:
            raise AutoExitError("--max-upload-mb is too small; models need at least a few KB")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise AutoExitError("the token must be a non-empty string without whitespace")
        token_required(self.host, self.token)


def read_token_file(path: str | os.PathLike[str]) -> str:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AutoExitError(f"cannot read token file {p}: {exc.strerror or exc}; create it or fix the path") from None
    if not text or any(c.isspace() for c in text):
        raise AutoExitError(f"token file {p} must hold one token (no spaces), e.g. from secrets.token_urlsafe(32)")
    try:
        if p.stat().st_mode & 0o077:
            log.warning("token file %s is readable by other users; chmod 600 %s", p, p)
    except OSError:
        pass
    return text


# --------------------------------------------------------------------------- schemas (OpenAPI)

_Dim = Annotated[int, Field(ge=1, le=LIMITS["max_dim"])]
_Batch = Annotated[int, Field(ge=1, le=LIMITS["max_batch_size"])]
_Name = Annotated[str, Field(pattern=P.SEGMENT_NAME_RE.pattern, min_length=1, max_length=LIMITS["max_name_len"])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpecModel(_Strict):
    shape: list[_Dim] = Field(max_length=LIMITS["max_ndim"], description="per-sample shape, no batch dim")
    dtype: Literal[P.DTYPES] = "float32"  # type: ignore[valid-type]
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class SettingsModel(_Strict):
    warmup: int = Field(3, ge=0, le=LIMITS["max_warmup"])
    repeat: int = Field(20, ge=1, le=LIMITS["max_repeat"])
    number: int = Field(1, ge=1, le=LIMITS["max_number"])
    min_repeat_ms: float = Field(50.0, ge=0, le=LIMITS["max_min_repeat_ms"], allow_inf_nan=False)
    cooldown_ms: float = Field(0.0, ge=0, le=LIMITS["max_cooldown_ms"], allow_inf_nan=False)
    timeout_s: float = Field(300.0, ge=1e-3, le=LIMITS["max_timeout_s"], allow_inf_nan=False)
    threads: int | None = Field(None, ge=1, le=LIMITS["max_threads"])
    seed: int = Field(0, ge=0, le=2**32 - 1)
    accelerator: Literal[P.ACCELERATORS] = "cpu"  # type: ignore[valid-type]
    optimize: StrictBool | Literal[P.OPTIMIZE_MODES] = False  # type: ignore[valid-type]


_B64 = Field(min_length=1, description="model bytes, base64 (ONNX protobuf or torch.jit.save archive)")
_BatchSizes = Field(default_factory=lambda: [1], min_length=1, max_length=LIMITS["max_batch_sizes"])


class MeasureRequestModel(_Strict):
    model: str = _B64
    format: Literal[P.FORMATS]  # type: ignore[valid-type]
    inputs: list[TensorSpecModel] = Field(min_length=1, max_length=LIMITS["max_inputs"])
    batch_sizes: list[_Batch] = _BatchSizes
    settings: SettingsModel = Field(default_factory=SettingsModel)


class SegmentModel(_Strict):
    name: _Name
    model: str = _B64
    format: Literal[P.FORMATS]  # type: ignore[valid-type]
    inputs: list[TensorSpecModel] = Field(min_length=1, max_length=LIMITS["max_inputs"])


class SegmentsRequestModel(_Strict):
    segments: list[SegmentModel] = Field(min_length=1, max_length=LIMITS["max_segments"])
    batch_sizes: list[_Batch] = _BatchSizes
    settings: SettingsModel = Field(default_factory=SettingsModel)


class TensorDataModel(_Strict):
    shape: list[_Dim] = Field(min_length=1, max_length=LIMITS["max_ndim"], description="[N, ...] with N samples")
    dtype: Literal[P.DTYPES] = "float32"  # type: ignore[valid-type]
    data: str = Field(min_length=1, description="raw little-endian array bytes, base64")


class EndToEndRequestModel(_Strict):
    model: str = _B64
    format: Literal[P.FORMATS] = "torchscript"  # type: ignore[valid-type]
    data: TensorDataModel
    batch_sizes: list[_Batch] = _BatchSizes
    settings: SettingsModel = Field(default_factory=SettingsModel)


class DeviceInfoModel(BaseModel):
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
    protocol: int = P.PROTOCOL_VERSION


class LatencyStatsModel(BaseModel):
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
    samples_ms: list[float] = []
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    exit_counts: dict[str, int] | None = None
    batches_per_run: int = 1


class LatencyResultModel(BaseModel):
    kind: str
    format: str
    model_sha256: str
    cache_key: str
    device: DeviceInfoModel
    settings: SettingsModel
    stats: list[LatencyStatsModel]
    threads: int
    cached: bool = False
    measured_at: str = ""
    extra: dict[str, Any] = {}


class SegmentsResultModel(BaseModel):
    results: dict[str, LatencyResultModel]


class HealthModel(BaseModel):
    status: str
    device_key: str
    worker: str
    busy: bool
    queued: int


class InfoModel(BaseModel):
    protocol: int
    device: DeviceInfoModel
    fingerprint: str
    formats: list[str]
    auth_required: bool
    limits: dict[str, int | float]
    cache_entries: int
    cache_file: str | None = None
    worker: str
    worker_restarts: int


class ErrorModel(BaseModel):
    detail: str
    errors: list[Any] | None = None


_ERRORS = {
    code: {"model": ErrorModel, "description": desc}
    for code, desc in {
        401: "missing or wrong bearer token",
        408: "the measurement ran past settings.timeout_s",
        413: "the upload is larger than --max-upload-mb",
        422: "invalid request, corrupt or unsupported model, or the model failed on the inputs",
        429: "too many measurements queued; retry later",
    }.items()
}


# --------------------------------------------------------------------------- body limit


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return (
            f"upload larger than this evaluator's limit of {self.max_bytes / 2**20:.1f} MiB; "
            "restart the server with a larger --max-upload-mb or send a smaller model"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
        if length is not None and (length < 0 or length > self.max_bytes):
            status = 413 if length > self.max_bytes else 400
            detail = self._too_large() if status == 413 else "invalid Content-Length header"
            resp = JSONResponse({"detail": detail}, status_code=status)
            return await resp(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading as they are
                    raise HTTPException(status_code=413, detail=self._too_large())
            return message

        return await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------- the app


class _InlineWorker:
    """Measure in the server process (``--no-isolate``): no kill on overrun."""

    state = "ready"
    restarts = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, job, blobs, timeout_s):
        from .measure import MeasureError, run_job, summarize_exception

        try:
            return {"ok": True, "result": run_job(job, blobs)}
        except MeasureError as exc:
            return {"ok": False, "status": exc.status, "detail": str(exc)}
        except Exception as exc:
            return {"ok": False, "status": 422, "detail": f"measurement failed: {summarize_exception(exc)}"}


class _State:
    def __init__(self, config: ServerConfig):
        import importlib.util

        self.config = config
        self.device = P.collect_device_info(config.device_key)
        self.fingerprint = self.device.fingerprint()
        cache_file = config.cache_file
        self.cache = ResultCache(cache_file)
        self.formats = ["torchscript"]
        if importlib.util.find_spec("onnxruntime") is not None:
            self.formats.insert(0, "onnx")
        if config.isolate:
            from .worker import Worker

            self.worker: Any = Worker(threads=config.threads)
        else:
            self.worker = _InlineWorker()
        self.lock = asyncio.Lock()
        self.queued = 0
        self.busy = False


def _summarize_validation(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
    msg = f"{loc}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return msg + "; see GET /openapi.json for the request schema"


def create_app(config: ServerConfig):
    """The FastAPI application (wrapped in the upload-size limit)."""
    state = _State(config)
    needs_token = token_required(config.host, config.token)
    expected = config.token.encode() if config.token else b""

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_prestart, args=(state,), daemon=True, name="worker-prestart").start()
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.stop)

    app = FastAPI(
        title="autoexit device evaluator",
        version=__version__,
        description="Times ONNX / TorchScript models on this device for autoexit searches.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.evaluator = state
    bearer = HTTPBearer(auto_error=False, description="the token from the server's --token-file")

    async def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not needs_token:
            return
        given = creds.credentials.encode("utf-8", "replace") if creds else b""
        if not creds or not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token; send 'Authorization: Bearer <token>' with the "
                "token from the server's --token-file",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # the spec declares bearer auth only when it is enforced
    auth = [Depends(authorize)] if needs_token else []

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("latin-1")})
        for e in errors:  # do not echo back (possibly huge) inputs
            e.pop("input", None)
            e.pop("url", None)
        return JSONResponse({"detail": _summarize_validation(errors), "errors": errors}, status_code=422)

    @app.exception_handler(AutoExitError)
    async def _user_error(request: Request, exc: AutoExitError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    # ------------------------------------------------------------------ helpers

    def settings_of(model: SettingsModel) -> MeasureSettings:
        s = MeasureSettings.from_dict(model.model_dump())
        if s.threads is None and config.threads:
            s = s.with_(threads=config.threads)  # the server's --threads default, recorded and keyed
        if s.timeout_s > config.max_timeout_s:
            raise ProtocolError(
                f"settings.timeout_s={s.timeout_s:g} exceeds this evaluator's limit of {config.max_timeout_s:g} s"
            )
        return s

    def specs_of(models: list[TensorSpecModel], batch_sizes) -> list[TensorSpec]:
        specs = [TensorSpec(shape=tuple(m.shape), dtype=m.dtype, name=m.name) for m in models]
        P.check_inputs(specs, batch_sizes, config.max_input_elements)
        return specs

    def model_bytes(text: str, fmt: str, what: str = "model") -> bytes:
        data = P.b64decode(text, what)
        if fmt == "torchscript":
            P.check_torchscript_archive(data)
        elif fmt == "onnx":
            if "onnx" not in state.formats:
                raise ProtocolError(
                    "this evaluator has no onnxruntime; install it on the device "
                    "(pip install 'autoexit[device]') or send TorchScript"
                )
            if data[:4] == b"PK\x03\x04":
                raise ProtocolError("format is 'onnx' but the model is a zip archive (TorchScript?); fix 'format'")
        return data

    def finish(kind, fmt, digest, key, settings, answer) -> dict[str, Any]:
        result = LatencyResult(
            kind=kind,
            format=fmt,
            model_sha256=digest,
            cache_key=key,
            device=state.device,
            settings=settings,
            stats=tuple(LatencyStats.from_dict(s) for s in answer["stats"]),
            threads=int(answer["threads"]),
            cached=False,
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=answer.get("extra", {}),
        ).to_dict()
        state.cache.put(key, result)
        return result

    def cached(key: str) -> dict[str, Any] | None:
        hit = state.cache.get(key)
        if hit is not None:
            hit["cached"] = True
        return hit

    async def measure_jobs(jobs: list[tuple[str, dict[str, Any], list[bytes], dict[str, Any]]], settings):
        """Run jobs (name, job, blobs, meta) under the measurement lock; {name: result dict}."""
        if state.queued >= config.max_queue:
            raise HTTPException(
                status_code=429,
                detail=f"{state.queued} measurements are queued on this device; retry later",
                headers={"Retry-After": "5"},
            )
        state.queued += 1
        out: dict[str, dict[str, Any]] = {}
        try:
            async with state.lock:
                state.busy = True
                t0 = time.monotonic()
                for name, job, blobs, meta in jobs:
                    hit = cached(meta["key"])  # an identical request may have just finished
                    if hit is not None:
                        out[name] = hit
                        continue
                    left = settings.timeout_s - (time.monotonic() - t0)
                    if left <= 0:
                        raise HTTPException(
                            status_code=408,
                            detail=f"the request ran past settings.timeout_s={settings.timeout_s:g} "
                            f"before segment {name!r}; raise timeout_s",
                        )
                    job = dict(job, deadline_s=left)
                    answer = await run_in_threadpool(state.worker.run, job, blobs, left)
                    if not answer.get("ok"):
                        prefix = f"segment {name!r}: " if meta.get("segment") else ""
                        raise HTTPException(status_code=int(answer["status"]), detail=prefix + answer["detail"])
                    out[name] = finish(meta["kind"], job["format"], meta["digest"], meta["key"], settings,
                                       answer["result"])
                    if settings.cooldown_ms and len(jobs) > 1:
                        await asyncio.sleep(settings.cooldown_ms / 1000.0)
        finally:
            state.busy = False
            state.queued -= 1
        return out

    def model_job(fmt, data, specs, batch_sizes, settings, kind="model"):
        digest = P.model_digest(data)
        meta = P.request_meta(fmt, specs, batch_sizes, settings)
        key = P.cache_key(kind, digest, meta, state.fingerprint)
        job = {
            "kind": "model",
            "format": fmt,
            "inputs": [s.to_dict() for s in specs],
            "batch_sizes": list(batch_sizes),
            "settings": settings.to_dict(),
        }
        return job, {"digest": digest, "key": key, "kind": kind}

    # ------------------------------------------------------------------ routes

    @app.get("/health", response_model=HealthModel, tags=["service"])
    async def health():
        """Liveness (no token needed)."""
        return {
            "status": "ok",
            "device_key": config.device_key,
            "worker": state.worker.state,
            "busy": state.busy,
            "queued": state.queued,
        }

    @app.get("/info", response_model=InfoModel, responses=_ERRORS, tags=["service"],
             dependencies=auth)
    async def info():
        """What this device is, what it accepts, and its limits."""
        return {
            "protocol": P.PROTOCOL_VERSION,
            "device": state.device.to_dict(),
            "fingerprint": state.fingerprint,
            "formats": state.formats,
            "auth_required": needs_token,
            "limits": {
                **LIMITS,
                "max_upload_bytes": config.max_upload_bytes,
                "max_timeout_s": config.max_timeout_s,
                "max_input_elements": config.max_input_elements,
                "max_queue": config.max_queue,
            },
            "cache_entries": len(state.cache),
            "cache_file": str(config.cache_file) if config.cache_file else None,
            "worker": state.worker.state,
            "worker_restarts": state.worker.restarts,
        }

    @app.get("/results/{key}", response_model=LatencyResultModel, responses=_ERRORS, tags=["measure"],
             dependencies=auth)
    async def result_by_key(
        key: Annotated[str, FPath(pattern=P.CACHE_KEY_RE.pattern, description="SHA-256 cache key, 64 hex digits")],
    ):
        """A cached result by its cache key (lets a client skip uploading a model measured before)."""
        if not P.CACHE_KEY_RE.match(key):
            raise HTTPException(status_code=422, detail="a cache key is 64 lowercase hex digits (SHA-256)")
        hit = cached(key)
        if hit is None:
            raise HTTPException(status_code=404, detail="no cached result for this key")
        return hit

    # Decoding base64 and hashing models is CPU work: done in the thread pool so the
    # event loop keeps answering /health while a large upload is prepared.

    def prepare_measure(req: MeasureRequestModel):
        settings = settings_of(req.settings)
        batch_sizes = P.check_batch_sizes(req.batch_sizes)
        specs = specs_of(req.inputs, batch_sizes)
        data = model_bytes(req.model, req.format)
        job, meta = model_job(req.format, data, specs, batch_sizes, settings)
        return settings, [("model", job, [data], meta)]

    def prepare_segments(req: SegmentsRequestModel):
        settings = settings_of(req.settings)
        batch_sizes = P.check_batch_sizes(req.batch_sizes)
        names = [s.name for s in req.segments]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ProtocolError(f"segment names must be unique; repeated: {dup}")
        jobs = []
        for seg in req.segments:
            specs = specs_of(seg.inputs, batch_sizes)
            data = model_bytes(seg.model, seg.format, f"segment {seg.name!r} model")
            job, meta = model_job(seg.format, data, specs, batch_sizes, settings, kind="segment")
            meta["segment"] = True
            jobs.append((seg.name, job, [data], meta))
        return settings, jobs

    def prepare_end_to_end(req: EndToEndRequestModel):
        import hashlib

        settings = settings_of(req.settings)
        batch_sizes = P.check_batch_sizes(req.batch_sizes)
        shape = tuple(req.data.shape)
        if req.data.dtype == "bfloat16":
            raise ProtocolError("end-to-end data cannot be bfloat16; send float32 and cast inside the model")
        n = shape[0]
        if max(batch_sizes) > n:
            raise ProtocolError(f"batch size {max(batch_sizes)} is larger than the {n} supplied input samples")
        P.check_inputs([TensorSpec(shape=shape[1:], dtype=req.data.dtype)], batch_sizes,
                       config.max_input_elements)
        data = model_bytes(req.model, req.format)
        raw = P.b64decode(req.data.data, "data.data")
        need = P.DTYPE_SIZES[req.data.dtype]
        for d in shape:
            need *= d
        if len(raw) != need:
            raise ProtocolError(
                f"data has {len(raw)} bytes but shape {list(shape)} of {req.data.dtype} needs {need}; "
                "send the raw little-endian array bytes"
            )
        digest = P.model_digest(data)
        meta = P.request_meta(req.format, None, batch_sizes, settings, hashlib.sha256(raw).hexdigest(), shape,
                              req.data.dtype)
        key = P.cache_key("end_to_end", digest, meta, state.fingerprint)
        job = {
            "kind": "end_to_end",
            "format": req.format,
            "data": {"shape": list(shape), "dtype": req.data.dtype},
            "batch_sizes": list(batch_sizes),
            "settings": settings.to_dict(),
        }
        return settings, [("e2e", job, [data, raw], {"digest": digest, "key": key, "kind": "end_to_end"})]

    async def run_prepared(prepared) -> dict[str, dict[str, Any]]:
        settings, jobs = prepared
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for name, job, blobs, meta in jobs:
            hit = cached(meta["key"])
            if hit is not None:
                results[name] = hit
            else:
                todo.append((name, job, blobs, meta))
        if todo:
            results.update(await measure_jobs(todo, settings))
        return {name: results[name] for name, *_ in jobs}

    @app.post("/measure", response_model=LatencyResultModel, responses=_ERRORS, tags=["measure"],
              dependencies=auth)
    async def measure(req: MeasureRequestModel):
        """Time one model at each batch size on random inputs of the given per-sample shapes."""
        out = await run_prepared(await run_in_threadpool(prepare_measure, req))
        return out["model"]

    @app.post("/measure/segments", response_model=SegmentsResultModel, responses=_ERRORS, tags=["measure"],
              dependencies=auth)
    async def measure_segments(req: SegmentsRequestModel):
        """Time named segments (each stage and each head) one after another; one result per name."""
        return {"results": await run_prepared(await run_in_threadpool(prepare_segments, req))}

    @app.post("/measure/end_to_end", response_model=LatencyResultModel, responses=_ERRORS, tags=["measure"],
              dependencies=auth)
    async def measure_end_to_end(req: EndToEndRequestModel):
        """Time a whole multi-exit model (forward returns (logits, exit_index)) over real inputs,
        in batches of each batch size; reports per-batch latency and the exits taken."""
        out = await run_prepared(await run_in_threadpool(prepare_end_to_end, req))
        return out["e2e"]

    return BodyLimitMiddleware(app, config.max_upload_bytes)


def _prestart(state: _State) -> None:
    try:
        state.worker.start()
    except Exception as exc:  # reported through /health; the next request retries
        log.error("could not start the measurement worker: %s", exc)


def serve(config: ServerConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(config)
    auth = "token required" if config.token else "no token (loopback only)"
    url_host = f"[{config.host}]" if ":" in config.host else config.host
    print(
        f"autoexit evaluator '{config.device_key}' on http://{url_host}:{config.port} ({auth}); "
        f"cache: {config.cache_file or 'memory only'}",
        flush=True,
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_keep_alive=30,
        # one measurement at a time anyway; bound the number of open connections
        limit_concurrency=max(16, config.max_queue + 8),
    )
