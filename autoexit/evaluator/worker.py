"""The server's measurement worker: one child process that loads and times models.

Why a process: a model that hangs inside one call, exhausts memory or crashes
the runtime must not take the HTTP server with it. The server sends one job
at a time (it holds its measurement lock); if the answer does not come in
time the child is killed and a fresh one started, and the request gets 408.
If the child dies, the request gets 422 naming the exit code.

The pipe carries only JSON headers and raw byte blobs (``send_bytes``), never
pickles. The child is started with the ``spawn`` method (no forked threads).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import threading
import time
from typing import Any, Sequence

log = logging.getLogger("autoexit.evaluator")

START_TIMEOUT_S = 600.0  # importing torch on a cold Raspberry Pi SD card can take a while
KILL_GRACE_S = 3.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Exit if the server goes away, even while the main thread is stuck in a model call.

    A watchdog thread polls the parent pid (torch and onnxruntime release the
    GIL inside model calls, so it gets to run). prctl(PR_SET_PDEATHSIG) would
    fire when the *thread* that started us exits, which is too early here.
    """
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def worker_main(conn, threads: int | None = None) -> None:  # pragma: no cover - runs in the child
    """Child process loop: receive (header, blobs), run, answer."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    _die_with_parent()
    # interop threads can only be set before any parallel work; intra-op is per job
    try:
        import torch

        torch.set_num_interop_threads(1)
        if threads:
            torch.set_num_threads(threads)
    except Exception:
        pass
    from .measure import MeasureError, run_job, summarize_exception

    conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            header = json.loads(conn.recv_bytes().decode())
        except (EOFError, OSError):
            return
        if header.get("stop"):
            return
        blobs = [conn.recv_bytes() for _ in range(int(header.get("nblobs", 0)))]
        try:
            result = run_job(header["job"], blobs)
            answer: dict[str, Any] = {"ok": True, "result": result}
        except MeasureError as exc:
            answer = {"ok": False, "status": exc.status, "detail": str(exc)}
        except MemoryError:
            answer = {"ok": False, "status": 422, "detail": "the model ran out of memory on this device"}
        except Exception as exc:  # anything else is the model's doing: report, keep serving
            answer = {"ok": False, "status": 422, "detail": f"measurement failed: {summarize_exception(exc)}"}
        del blobs
        conn.send_bytes(json.dumps(answer).encode())


class Worker:
    """Owns the child process; ``run`` is thread-safe and blocking."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.state = "stopped"
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle
    def _start_locked(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_main, args=(child, self.threads), daemon=True, name="autoexit-measure")
        self.state = "starting"
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            proc.kill()
            proc.join(KILL_GRACE_S)
            self.state = "failed"
            raise RuntimeError("the measurement worker did not start (importing torch timed out)")
        try:
            json.loads(parent.recv_bytes().decode())
        except (EOFError, OSError) as exc:
            proc.join(KILL_GRACE_S)
            self.state = "failed"
            raise RuntimeError(f"the measurement worker died on start (exit code {proc.exitcode})") from exc
        self._proc, self._conn = proc, parent
        self.state = "ready"

    def start(self) -> None:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start_locked()

    def _kill_locked(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(KILL_GRACE_S)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self.state = "stopped"

    def stop(self) -> None:
        with self._lock:
            if self._conn is not None and self._proc is not None and self._proc.is_alive():
                try:
                    self._conn.send_bytes(json.dumps({"stop": True}).encode())
                    self._proc.join(KILL_GRACE_S)
                except (OSError, ValueError):
                    pass
            self._kill_locked()

    # ------------------------------------------------------------------ jobs
    def run(self, job: dict[str, Any], blobs: Sequence[bytes], timeout_s: float) -> dict[str, Any]:
        """Run one job; returns the child's answer dict (``ok`` / ``status`` / ``detail``)."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                if self._proc is not None:
                    self.restarts += 1
                self._kill_locked()
                self._start_locked()
            assert self._conn is not None and self._proc is not None
            t0 = time.monotonic()
            try:
                self._conn.send_bytes(json.dumps({"job": job, "nblobs": len(blobs)}).encode())
                for blob in blobs:
                    self._conn.send_bytes(blob)
                if not self._conn.poll(timeout_s + KILL_GRACE_S):
                    log.warning("measurement worker exceeded %.1f s; killing it", timeout_s)
                    self._kill_locked()
                    self.restarts += 1
                    return {
                        "ok": False,
                        "status": 408,
                        "detail": f"the measurement did not finish within settings.timeout_s={timeout_s:g} "
                        "(a single model call may hang or be too slow); raise timeout_s or time a smaller model",
                    }
                return json.loads(self._conn.recv_bytes().decode())
            except (EOFError, OSError, BrokenPipeError):
                self._proc.join(KILL_GRACE_S)
                code = self._proc.exitcode
                self._kill_locked()
                self.restarts += 1
                log.warning("measurement worker died (exit code %s) after %.1f s", code, time.monotonic() - t0)
                return {
                    "ok": False,
                    "status": 422,
                    "detail": f"the model crashed the runtime on this device (worker exit code {code}); "
                    "it may be too large for the memory here or use unsupported operators",
                }
