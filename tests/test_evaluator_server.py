"""The real evaluator server, started in a subprocess on 127.0.0.1 (free ports only)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import pickle
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from autoexit.evaluator import (  # noqa: E402
    DeviceRegistry,
    EvaluatorRequestError,
    EvaluatorUnavailable,
    MeasureSettings,
    RemoteEvaluator,
)
from autoexit.evaluator.server import is_loopback, token_required  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TOKEN = "test-token-4f9a0c"
# one thread: timings stay sane when other jobs share the CPU (no OpenMP barrier stalls)
FAST = MeasureSettings(warmup=1, repeat=5, min_repeat_ms=5.0, timeout_s=60, threads=1)
FAST_D = FAST.to_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m autoexit.evaluator`` in a subprocess; stopped with SIGTERM by pid."""

    def __init__(self, tmp: Path, *args: str, token: str | None = None, name: str = "srv"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        cmd = [sys.executable, "-m", "autoexit.evaluator", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *args]
        if token:
            tf = tmp / f"{name}.token"
            tf.write_text(token + "\n")
            tf.chmod(0o600)
            cmd += ["--token-file", str(tf)]
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                h = httpx.get(self.url + "/health", timeout=1.0).json()
                if h["worker"] == "ready":
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def get(self, path: str, **kw):
        kw.setdefault("headers", self.headers)
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, json=None, **kw):
        kw.setdefault("headers", self.headers)
        return httpx.post(self.url + path, json=json, timeout=60, **kw)

    def client(self, **kw) -> RemoteEvaluator:
        return RemoteEvaluator(self.url, self.token, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluator")
    srv = Server(tmp, "--device-key", "testdev", "--max-upload-mb", "1", "--max-timeout-s", "120",
                 "--cache-file", str(tmp / "cache.jsonl"), token=TOKEN)
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- models


def small_cnn(channels: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)
    ).eval()


def torchscript_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(module, example), buf)
    return buf.getvalue()


def onnx_bytes(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    pytest.importorskip("onnx")
    buf = io.BytesIO()
    torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}} if dynamic_batch else None)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class TwoExit(nn.Module):
    """Per-sample early exit: x[:, 0] > 0 leaves at exit 0 (cheap), the rest run the body."""

    def __init__(self):
        super().__init__()
        self.head0 = nn.Linear(16, 4)
        self.inp = nn.Linear(16, 128)
        self.body = nn.Sequential(*[nn.Linear(128, 128) for _ in range(6)])
        self.head1 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        easy = x[:, 0] > 0
        logits = self.head0(x)
        idx = torch.zeros(x.shape[0], dtype=torch.long)
        if bool(easy.all()):
            return logits, idx
        hard = ~easy
        logits[hard] = self.head1(self.body(self.inp(x[hard])))
        idx[hard] = 1
        return logits, idx


class Spin(nn.Module):
    """One call that runs for minutes: the server must kill it, not hang."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1_000_000_000):
            x = torch.relu(x)
        return x


def measure_body(model: bytes, fmt: str, shape, batch_sizes=(1,), **settings) -> dict:
    return {
        "model": b64(model),
        "format": fmt,
        "inputs": [{"shape": list(shape), "dtype": "float32"}],
        "batch_sizes": list(batch_sizes),
        "settings": {**FAST_D, **settings},
    }


def assert_stats(st: dict, batch_size: int, repeat: int = 5, min_repeat_ms: float = 5.0) -> None:
    assert st["batch_size"] == batch_size
    assert 0 < st["min_ms"] <= st["median_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"]
    assert st["repeat"] == repeat == len(st["samples_ms"]) and st["runs"] == repeat * st["number"]
    for ms in st["samples_ms"]:  # every kept group lasted at least min_repeat_ms
        assert ms * st["number"] >= min_repeat_ms * 0.999


# --------------------------------------------------------------------------- token rule


def test_token_rule_direct():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.20")
    assert not is_loopback("pi.local")
    assert token_required("127.0.0.1", None) is False
    assert token_required("127.0.0.1", "t") is True  # a configured token is always enforced
    assert token_required("0.0.0.0", "t") is True
    for host in ("0.0.0.0", "::", "10.0.0.5", "pi.local"):
        with pytest.raises(Exception, match="--token-file"):
            token_required(host, None)


def test_refuses_to_listen_on_network_without_token(capsys, tmp_path):
    from autoexit.evaluator.cli import main

    port = free_port()
    rc = main(["--host", "0.0.0.0", "--port", str(port), "--cache-file", str(tmp_path / "c.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to listen on 0.0.0.0 without a token" in err
    assert len(err.strip().splitlines()) == 1
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert main(["--host", "0.0.0.0", "--port", str(port), "--token-file", str(empty)]) == 2
    assert "must hold one token" in capsys.readouterr().err
    assert main(["--port", "8080"]) == 2 and "reserved" in capsys.readouterr().err


def test_token_is_enforced(server):
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no token
    r = httpx.get(server.url + "/info")
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert server.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server.get("/info", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    r = server.post("/measure", measure_body(b"x", "onnx", (3,)), headers={})
    assert r.status_code == 401
    info = server.get("/info").json()
    assert info["auth_required"] is True and info["device"]["key"] == "testdev"
    assert info["limits"]["max_upload_bytes"] == 1024 * 1024 and "onnx" in info["formats"]
    with pytest.raises(EvaluatorRequestError, match="rejected the token") as ei:
        RemoteEvaluator(server.url, "wrong", retries=0).info()
    assert ei.value.status == 401 and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- timing


def test_time_torchscript_model(server):
    m = small_cnn()
    r = server.post("/measure", measure_body(torchscript_bytes(m, torch.randn(1, 3, 16, 16)), "torchscript",
                                             (3, 16, 16), (1, 4)))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["format"] == "torchscript" and res["device"]["key"] == "testdev" and not res["cached"]
    assert [s["batch_size"] for s in res["stats"]] == [1, 4]
    for st, b in zip(res["stats"], (1, 4)):
        assert_stats(st, b)
    assert res["threads"] >= 1 and len(res["cache_key"]) == 64
    # the same request again is answered from the cache
    r2 = server.post("/measure", measure_body(torchscript_bytes(m, torch.randn(1, 3, 16, 16)), "torchscript",
                                              (3, 16, 16), (1, 4)))
    assert r2.json()["cached"] is True and r2.json()["stats"] == res["stats"]


def test_time_torchscript_model_optimized(server):
    """settings.optimize: the device freezes and optimises the model before timing it; cached apart; a
    non-boolean is refused in one line."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 10)).eval()
    data = torchscript_bytes(m, torch.randn(1, 3, 16, 16))
    body = measure_body(data, "torchscript", (3, 16, 16), (1, 4))
    plain = server.post("/measure", body)
    body["settings"] = {**body.get("settings", {}), "optimize": True}
    fast = server.post("/measure", body)
    assert plain.status_code == 200 and fast.status_code == 200, fast.text
    assert fast.json()["settings"]["optimize"] is True and plain.json()["settings"].get("optimize", False) is False
    assert fast.json()["cache_key"] != plain.json()["cache_key"] and not fast.json()["cached"]
    body["settings"]["optimize"] = "yes"
    bad = server.post("/measure", body)
    assert bad.status_code == 422 and "optimize" in bad.json()["detail"] and "\n" not in bad.json()["detail"]


def test_time_onnx_model(server):
    pytest.importorskip("onnxruntime")
    data = onnx_bytes(small_cnn(), torch.randn(1, 3, 16, 16))
    r = server.post("/measure", measure_body(data, "onnx", (3, 16, 16), (1, 2, 8)))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["format"] == "onnx" and [s["batch_size"] for s in res["stats"]] == [1, 2, 8]
    for st, b in zip(res["stats"], (1, 2, 8)):
        assert_stats(st, b)


def test_remote_client_measure_and_upload_skip(server):
    ev = server.client()
    assert ev.device_key == "testdev"
    m = small_cnn(channels=6)
    res = ev.measure(m, input_shapes=(3, 16, 16), batch_sizes=(1, 4), settings=FAST)
    assert not res.cached and res.device.key == "testdev" and res.at(4).median_ms > 0
    assert ev.measure(m, input_shapes=(3, 16, 16), batch_sizes=(1, 4), settings=FAST).cached  # client cache
    # a fresh client (empty local cache) finds the result on the server without uploading
    fresh = server.client()
    posts_before = server.get("/health").json()
    again = fresh.measure(m, torch.randn(2, 3, 16, 16), batch_sizes=(1, 4), settings=FAST)
    assert again.cached and again.stats == res.stats and posts_before["status"] == "ok"


def test_segments(server):
    pytest.importorskip("onnxruntime")
    m = small_cnn()
    ev = server.client()
    segs = ev.measure_segments(
        {
            "stage0": (m[:2], (3, 16, 16)),
            "head0": (m[2:], torch.randn(1, 8, 16, 16)),
            "head0_onnx": (onnx_bytes(m[2:], torch.randn(1, 8, 16, 16)), (8, 16, 16)),
        },
        batch_sizes=(1, 2),
        settings=FAST,
    )
    assert list(segs) == ["stage0", "head0", "head0_onnx"]
    assert segs["head0_onnx"].format == "onnx" and segs["stage0"].format == "torchscript"
    for res in segs.values():
        assert res.kind == "segment" and res.batch_sizes == (1, 2) and res.at(2).median_ms > 0
    # a bad segment is named in the error
    body = {
        "segments": [
            {"name": "ok", "model": b64(torchscript_bytes(m, torch.randn(1, 3, 8, 8))), "format": "torchscript",
             "inputs": [{"shape": [3, 8, 8]}]},
            {"name": "broken", "model": b64(b"garbage!"), "format": "onnx", "inputs": [{"shape": [3]}]},
        ],
        "settings": FAST_D,
    }
    r = server.post("/measure/segments", body)
    assert r.status_code == 422 and "segment 'broken'" in r.json()["detail"]
    body["segments"][1]["name"] = "ok"
    r = server.post("/measure/segments", body)
    assert r.status_code == 422 and "unique" in r.json()["detail"]


def test_end_to_end_counts_exits(server):
    torch.manual_seed(0)
    model = torch.jit.script(TwoExit().eval())
    x = torch.randn(20, 16)
    x[:, 0] = torch.tensor([1.0] * 12 + [-1.0] * 8)[torch.randperm(20)]
    res = server.client().measure_end_to_end(model, x, batch_sizes=(1, 4), settings=FAST)
    assert res.kind == "end_to_end" and res.at(1).exit_counts == {0: 12, 1: 8}
    assert res.at(4).batches_per_run == 5 and sum(res.at(4).exit_counts.values()) == 20
    assert res.at(1).median_ms > 0
    # raw request with a data size that does not match the shape
    buf = io.BytesIO()
    torch.jit.save(model, buf)
    body = {"model": b64(buf.getvalue()), "data": {"shape": [20, 16], "dtype": "float32", "data": b64(b"\0" * 12)},
            "settings": FAST_D}
    r = server.post("/measure/end_to_end", body)
    assert r.status_code == 422 and "needs 1280" in r.json()["detail"]


def test_measurements_do_not_overlap(server):
    """Concurrent requests are timed one at a time (the measurement lock)."""
    bodies = [
        measure_body(torchscript_bytes(small_cnn(channels=c), torch.randn(1, 3, 16, 16)), "torchscript",
                     (3, 16, 16), repeat=5, min_repeat_ms=40.0)
        for c in (3, 4, 5)
    ]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda b: server.post("/measure", b), bodies))
    spans = []
    for r in results:
        assert r.status_code == 200, r.text
        extra = r.json()["extra"]
        spans.append((extra["started_unix"], extra["finished_unix"]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-3


# --------------------------------------------------------------------------- refusals


def test_oversize_upload_is_413(server):
    big = {"model": "A" * (1024 * 1024 + 10), "format": "onnx", "inputs": [{"shape": [1]}]}
    r = server.post("/measure", big)
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(server.url + "/measure", content=chunks(), headers={**server.headers,
                                                                      "Content-Type": "application/json"})
    assert r.status_code == 413
    # the client refuses before uploading, with the same advice
    with pytest.raises(EvaluatorRequestError, match="--max-upload-mb") as ei:
        server.client().measure(nn.Linear(1024, 512), input_shapes=(1024,), settings=FAST)
    assert ei.value.status == 413
    assert server.get("/health").json()["status"] == "ok"


def test_corrupt_and_unsafe_models_are_4xx(server, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ts = torchscript_bytes(small_cnn(), torch.randn(1, 3, 8, 8))
    src = zipfile.ZipFile(io.BytesIO(ts))
    evil_zip = io.BytesIO()
    with zipfile.ZipFile(evil_zip, "w") as z:  # a TorchScript archive whose data.pkl runs a command
        for n in src.namelist():
            z.writestr(n, pickle.dumps(Evil(), protocol=2) if n.endswith("/data.pkl") else src.read(n))
    state = io.BytesIO()
    torch.save(small_cnn().state_dict(), state)
    cases = [
        ("not base64 at all!", "onnx", "not valid base64"),
        (b64(b"\x08garbage protobuf"), "onnx", "cannot load the ONNX model"),
        (b64(b"garbage"), "torchscript", "not a TorchScript archive"),
        (b64(pickle.dumps(Evil())), "torchscript", "pickle"),
        (b64(state.getvalue()), "torchscript", "torch.save checkpoint"),
        (b64(ts[: len(ts) // 2]), "torchscript", "corrupt"),
        (b64(evil_zip.getvalue()), "torchscript", "cannot load the TorchScript model"),
        (b64(ts), "onnx", "zip archive"),
    ]
    for model, fmt, reason in cases:
        r = server.post("/measure", {"model": model, "format": fmt, "inputs": [{"shape": [3, 8, 8]}],
                                     "settings": FAST_D})
        assert r.status_code == 422, (reason, r.status_code, r.text)
        detail = r.json()["detail"]
        assert reason in detail and "\n" not in detail, (reason, detail)
    assert not marker.exists()
    assert server.get("/health").json()["worker"] == "ready"


def test_wrong_shapes_are_422(server):
    m = small_cnn()
    ts = torchscript_bytes(m, torch.randn(1, 3, 16, 16))
    r = server.post("/measure", measure_body(ts, "torchscript", (5, 16, 16)))
    assert r.status_code == 422 and "failed on input(s) [1, 5, 16, 16]" in r.json()["detail"]
    pytest.importorskip("onnxruntime")
    fixed = onnx_bytes(m, torch.randn(1, 3, 16, 16), dynamic_batch=False)
    r = server.post("/measure", measure_body(fixed, "onnx", (3, 16, 16), (4,)))
    assert r.status_code == 422 and "dynamic batch axis" in r.json()["detail"]
    r = server.post("/measure", measure_body(fixed, "onnx", (3, 16)))
    assert r.status_code == 422 and "rank" in r.json()["detail"]
    two = measure_body(fixed, "onnx", (3, 16, 16))
    two["inputs"].append({"shape": [3]})
    r = server.post("/measure", two)
    assert r.status_code == 422 and "takes 1 input" in r.json()["detail"]


def test_invalid_requests_are_422_with_one_line_reason(server):
    ts = b64(torchscript_bytes(small_cnn(), torch.randn(1, 3, 8, 8)))
    base = {"model": ts, "format": "torchscript", "inputs": [{"shape": [3, 8, 8]}], "settings": FAST_D}
    bad = [
        ({"settings": {**FAST_D, "repeat": 0}}, "settings.repeat"),
        ({"settings": {**FAST_D, "repeats": 3}}, "settings.repeats"),
        ({"batch_sizes": [2, 2]}, "must not repeat"),
        ({"batch_sizes": []}, "batch_sizes"),
        ({"inputs": [{"shape": [3, 4096, 4096]}], "batch_sizes": [64]}, "limit"),
        ({"settings": {**FAST_D, "timeout_s": 1000}}, "exceeds this evaluator's limit"),
        ({"format": "tflite"}, "format"),
        ({"inputs": []}, "inputs"),
    ]
    for change, reason in bad:
        r = server.post("/measure", {**base, **change})
        assert r.status_code == 422, (change, r.text)
        assert reason in r.json()["detail"] and "\n" not in r.json()["detail"], (reason, r.json())
    assert server.get("/results/" + "0" * 64).status_code == 404
    assert server.get("/results/not-a-key").status_code == 422
    r = server.post("/measure", content=b"{not json", headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 422


def test_hung_model_gets_408_and_the_worker_recovers(server):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Spin()), buf)
    t0 = time.monotonic()
    r = server.post("/measure", measure_body(buf.getvalue(), "torchscript", (4,), timeout_s=1.0))
    assert r.status_code == 408 and "timeout_s" in r.json()["detail"]
    assert time.monotonic() - t0 < 30
    info = server.get("/info").json()
    assert info["worker_restarts"] >= 1
    ok = server.post("/measure", measure_body(torchscript_bytes(small_cnn(channels=7), torch.randn(1, 3, 8, 8)),
                                              "torchscript", (3, 8, 8)))
    assert ok.status_code == 200, ok.text


# --------------------------------------------------------------------------- restart, registry


def test_cache_survives_restart_and_loopback_needs_no_token(tmp_path):
    cache = tmp_path / "results.jsonl"
    m = small_cnn(channels=5)
    # --no-isolate: no worker process to start (faster), and it covers the in-process path
    srv = Server(tmp_path, "--device-key", "pi", "--cache-file", str(cache), "--no-isolate", name="a")
    try:
        info = srv.get("/info").json()  # loopback, no token configured: open
        assert info["auth_required"] is False
        first = srv.client().measure(m, input_shapes=(3, 8, 8), settings=FAST)
        assert not first.cached
    finally:
        srv.stop()
    assert cache.read_text().count("\n") == 1
    srv = Server(tmp_path, "--device-key", "pi", "--cache-file", str(cache), "--no-isolate", name="b")
    try:
        assert srv.get("/info").json()["cache_entries"] == 1
        r = srv.get(f"/results/{first.cache_key}")
        assert r.status_code == 200 and r.json()["cached"] is True
        body = measure_body(torchscript_bytes(m, torch.randn(1, 3, 8, 8)), "torchscript", (3, 8, 8))
        again = srv.post("/measure", body).json()
        assert again["cached"] is True and again["cache_key"] == first.cache_key
        assert again["stats"][0]["median_ms"] == first.median_ms
    finally:
        srv.stop()


def test_registry_reports_devices_that_do_not_answer(server):
    dead = f"http://127.0.0.1:{free_port()}"
    reg = DeviceRegistry(
        {"testdev": server.url, "gone": dead, "mislabeled": server.url},
        token=TOKEN, retries=1, backoff_s=0.01, connect_timeout_s=2,
    )
    status = reg.probe()
    assert status["testdev"].ok and status["testdev"].info.key == "testdev"
    assert not status["gone"].ok and dead in status["gone"].error
    assert not status["mislabeled"].ok and "is device 'testdev'" in status["mislabeled"].error
    with pytest.raises(EvaluatorUnavailable, match="2 of 3 device") as ei:
        reg.require()
    assert "gone" in str(ei.value) and "mislabeled" in str(ei.value)
    assert reg.require(["testdev"])["testdev"].key == "testdev"
    t0 = time.monotonic()
    with pytest.raises(EvaluatorUnavailable, match="did not answer after 3 attempt"):
        RemoteEvaluator(dead, retries=2, backoff_s=0.05, connect_timeout_s=1).info()
    # it backed off between attempts: 0.05 s then 0.1 s, each jittered by x0.75-1.25, so at least 0.1125 s
    assert time.monotonic() - t0 >= 0.75 * (0.05 + 0.1)


# --------------------------------------------------------------------------- fuzzing


def test_openapi_fuzz_has_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/measure", "/measure/segments", "/measure/end_to_end", "/info", "/results/{key}"} <= paths
    failures = []
    seen: dict[int, int] = {}
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE

    def fuzz(op, mode, headers, n):
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            resp = case.call(headers=headers, timeout=30)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            if resp.status_code >= 500:
                failures.append((op.method, op.path, mode.name, resp.status_code, resp.text[:300]))

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /health has no inputs)
            assert mode is negative, (op.path, mode)

    for op in ops:
        fuzz(op, positive, server.headers, 25)
        fuzz(op, negative, server.headers, 15)
        fuzz(op, positive, {}, 5)  # without the token
    print('fuzz statuses', seen)
    assert not failures, failures
    assert sum(seen.values()) >= 100 and seen.get(401, 0) > 0 and seen.get(422, 0) > 0, seen
    assert server.get("/health").json()["status"] == "ok"
