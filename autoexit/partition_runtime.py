"""Reference runtime: a partitioned artifact served by one process per partition, on loopback.

Every partition ``k`` of an artifact written by
:func:`autoexit.partition.emit_partitioned` runs in its own process
(:class:`PartitionServer`, ``autoexit partition serve --artifact A --part k``)
listening on a TCP port. A batch enters at partition 0; each partition runs
its ``partitions/k.pt`` module, sends the results of the samples that exited
to the **destination** and the feature tensor of the others to partition
``k+1``. The client (:func:`run_partitioned`, ``autoexit partition run``) is
the source and the destination: it sends the inputs and collects results.

Wire format (:func:`send_frame` / :func:`recv_frame`; no pickle anywhere)::

    b"AXP1" | uint32 header length (network order) | header: UTF-8 JSON object
          | payload: the raw bytes of each tensor, in the order the header lists them

    header = {"type": "infer" | "result" | "error" | "ping" | "pong" | "stop",
              "tensors": [{"name": str, "dtype": "float32" | "int64" | ..., "shape": [...], "nbytes": int}, ...],
              ...message fields}

Sizes are explicit and checked (header at most 1 MiB, ``nbytes ==
prod(shape) * itemsize``, payload at most ``max_bytes``); tensors are rebuilt
with ``numpy.frombuffer`` (C order, little-endian as sent by this machine).
``infer`` carries ``ids`` (int64 [n], sample ids) and ``x`` (the partition's
input) plus the ``route`` (``{"parts": ["host:port", ...], "dest": "host:port"}``),
the batch id and the link-shaping factor; ``result`` carries ``ids``, ``logits``
and ``exit_index`` and the partition that answered; ``error`` a one-line message.
Servers are stateless: the route travels with every message.

**Link shaping** (optional, in the sender): a message from tier ``a`` to tier
``b`` of the artifact's topology waits ``scale * (sum PL_j + bits / BW_j)`` over
the links between them (propagation + transmission, as the performance model
counts them); each outgoing link is a FIFO whose transmissions do not overlap.
``scale = 0`` (the default) sends at loopback speed; ``1`` emulates the
topology's links in real time. Computation is not slowed down: every partition
computes on this machine.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AutoExitError

__all__ = [
    "MAGIC",
    "ProtocolError",
    "send_frame",
    "recv_frame",
    "PartitionServer",
    "ServerGroup",
    "spawn_servers",
    "run_partitioned",
    "PartitionRun",
    "link_delay_s",
]

MAGIC = b"AXP1"
_PREFIX = struct.Struct("!4sI")
MAX_HEADER = 1 << 20
DEFAULT_MAX_BYTES = 1 << 30
_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64,
           "int32": np.int32, "uint8": np.uint8, "bool": np.bool_}


class ProtocolError(AutoExitError):
    """A malformed frame (wrong magic, oversized or inconsistent header)."""


class ConnectionClosed(Exception):
    """The peer closed the connection between frames."""


# --------------------------------------------------------------------------- framing


def _tensor_bytes(t) -> tuple[dict, memoryview]:
    import torch

    if isinstance(t, torch.Tensor):
        arr = t.detach().cpu().contiguous().numpy()
    else:
        arr = np.ascontiguousarray(t)
    name = str(arr.dtype)
    if name not in _DTYPES:
        raise ProtocolError(f"cannot send dtype {name}; supported: {', '.join(_DTYPES)}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    view = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
    return {"dtype": name, "shape": list(arr.shape), "nbytes": int(arr.nbytes)}, view


def send_frame(sock: socket.socket, header: Mapping, tensors: Sequence[tuple[str, Any]] = ()) -> int:
    """Send one frame; returns the bytes sent."""
    specs, views = [], []
    for name, t in tensors:
        spec, view = _tensor_bytes(t)
        specs.append({"name": name, **spec})
        views.append(view)
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER}")
    sock.sendall(_PREFIX.pack(MAGIC, len(head)) + head)
    total = _PREFIX.size + len(head)
    for v in views:
        if len(v):
            sock.sendall(v)
        total += len(v)
    return total


def _recv_exact(sock: socket.socket, n: int, allow_eof: bool = False) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if allow_eof and got == 0:
                raise ConnectionClosed
            raise ProtocolError(f"connection closed in the middle of a frame ({got} of {n} bytes)")
        got += k
    return buf


def recv_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict, dict]:
    """Receive one frame: ``(header, {name: torch.Tensor})``. Raises :class:`ConnectionClosed` at a clean EOF."""
    import torch

    magic, hlen = _PREFIX.unpack(bytes(_recv_exact(sock, _PREFIX.size, allow_eof=True)))
    if magic != MAGIC:
        raise ProtocolError(f"not an autoexit partition frame (magic {magic!r}, expected {MAGIC!r})")
    if hlen > MAX_HEADER:
        raise ProtocolError(f"frame header of {hlen} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(bytes(_recv_exact(sock, hlen)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors", []), list):
        raise ProtocolError("frame header must be a JSON object with a 'tensors' list")
    specs = header.get("tensors", [])
    total = 0
    checked = []
    for s in specs:
        if not isinstance(s, dict) or set(s) != {"name", "dtype", "shape", "nbytes"}:
            raise ProtocolError("each tensor entry needs exactly name, dtype, shape, nbytes")
        dt = _DTYPES.get(s["dtype"])
        shape = s["shape"]
        if dt is None:
            raise ProtocolError(f"unsupported dtype {s['dtype']!r}; supported: {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ProtocolError(f"tensor {s['name']!r}: shape must be a list of non-negative integers")
        nbytes = int(math.prod(shape)) * np.dtype(dt).itemsize
        if s["nbytes"] != nbytes:
            raise ProtocolError(f"tensor {s['name']!r}: nbytes {s['nbytes']} does not match shape {shape} x "
                                f"{s['dtype']} ({nbytes})")
        total += nbytes
        checked.append((str(s["name"]), dt, shape, nbytes))
    if total > max_bytes:
        raise ProtocolError(f"frame payload of {total} bytes exceeds the limit of {max_bytes}")
    tensors = {}
    for name, dt, shape, nbytes in checked:
        buf = _recv_exact(sock, nbytes) if nbytes else bytearray()
        arr = np.frombuffer(buf, dtype=dt).reshape(shape)
        tensors[name] = torch.from_numpy(arr)
    return header, tensors


def _parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AutoExitError(f"address {addr!r} must be host:port (e.g. 127.0.0.1:9001)")
    return host, int(port)


# --------------------------------------------------------------------------- link shaping


def link_delay_s(topology, a: int, b: int, nbytes: int, scale: float) -> tuple[float, float]:
    """(propagation, transmission) seconds of ``nbytes`` from tier ``a`` to tier ``b`` (1-based), times ``scale``."""
    if scale <= 0 or a == b:
        return 0.0, 0.0
    lo, hi = min(a, b), max(a, b)
    links = topology.links[lo - 1:hi - 1]
    return (scale * sum(ln.latency_s for ln in links),
            scale * sum(8.0 * nbytes / ln.bandwidth_bps for ln in links))


class _Link:
    """One outgoing connection with an optional emulated link: a FIFO whose transmissions do not overlap,
    each message delivered ``propagation`` after its transmission ends."""

    def __init__(self, addr: str, on_error=None):
        self.addr = addr
        self.host, self.port = _parse_addr(addr)
        self.q: queue.Queue = queue.Queue()
        self.sock: socket.socket | None = None
        self.free_at = 0.0
        self._lock = threading.Lock()
        self.on_error = on_error
        self.closed = False
        self.t = threading.Thread(target=self._run, name=f"link->{addr}", daemon=True)
        self.t.start()

    def send(self, header: dict, tensors: Sequence[tuple[str, Any]], delay: tuple[float, float] = (0.0, 0.0)):
        prop, trans = delay
        with self._lock:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + trans
            self.q.put((self.free_at + prop, header, tensors))

    def _connect(self) -> socket.socket:
        last: Exception | None = None
        for attempt in range(20):
            try:
                s = socket.create_connection((self.host, self.port), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
                return s
            except OSError as exc:
                last = exc
                time.sleep(0.05 * (attempt + 1))
        raise AutoExitError(f"cannot connect to {self.addr}: {last}")

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                break
            due, header, tensors = item
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                if self.sock is None:
                    self.sock = self._connect()
                send_frame(self.sock, header, tensors)
            except (OSError, AutoExitError) as exc:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if self.on_error is not None:
                    self.on_error(header, f"cannot send to {self.addr}: {exc}")

    def close(self):
        if not self.closed:
            self.closed = True
            self.q.put(None)
            self.t.join(timeout=10)
            if self.sock is not None:
                self.sock.close()


# --------------------------------------------------------------------------- server


def _bind(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise AutoExitError(f"port {port} on {host} is in use; choose another --port (0 picks a free one)") from None
        raise AutoExitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    s.listen(64)
    return s


class PartitionServer:
    """Serves partition ``part`` of a partitioned artifact on ``host:port`` (see the module docstring)."""

    def __init__(self, artifact: str | Path, part: int, host: str = "127.0.0.1", port: int = 0,
                 threads: int | None = 1, max_bytes: int = DEFAULT_MAX_BYTES, log=sys.stderr,
                 optimize: bool | str = False):
        import torch

        from .partition import load_partitioned
        from .perfmodel import Topology

        art, info = load_partitioned(artifact)
        n = len(info["partitions"])
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < n:
            raise AutoExitError(f"partition {part!r} is out of range: {artifact} has partitions 0..{n - 1}")
        if threads:
            torch.set_num_threads(int(threads))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.module = art.partition(part, optimize=optimize)  # optimize: frozen, oneDNN (load's optimize)
        self.module.eval()
        self.info = info
        self.spec = info["partitions"][part]
        self.part = part
        self.n_parts = n
        self.topology = Topology.from_dict(info["topology"])
        self.tier = int(self.spec["tier_index"])
        self.next_tier = int(info["partitions"][part + 1]["tier_index"]) if part + 1 < n else None
        self.dest_tier = self.topology.tier_index(info["destination"])
        self.in_shape = list(self.spec["input"]["shape"])
        self.checksum = art.manifest["checksum"]
        self.max_bytes = max_bytes
        self.log = log
        self.sock = _bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self._links: dict[str, _Link] = {}
        self._links_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.handled = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _say(self, msg: str) -> None:
        if self.log is not None:
            print(f"autoexit partition {self.part}: {msg}", file=self.log, flush=True)

    def link(self, addr: str) -> _Link:
        with self._links_lock:
            ln = self._links.get(addr)
            if ln is None:
                ln = self._links[addr] = _Link(addr, on_error=self._link_error)
            return ln

    def _link_error(self, header: dict, message: str) -> None:
        self._say(message)
        route = header.get("route") or {}
        dest = route.get("dest") if isinstance(route, dict) else None
        if dest and header.get("type") != "error":
            self.link(dest).send({"type": "error", "batch": header.get("batch"), "part": self.part,
                                  "message": f"partition {self.part}: {message}"}, [])

    def serve_forever(self) -> None:
        self.sock.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._links_lock:
            links = list(self._links.values())
            self._links.clear()
        for ln in links:
            ln.close()

    def _handle(self, conn: socket.socket, peer) -> None:
        conn.settimeout(None)
        try:
            while not self._stop.is_set():
                try:
                    header, tensors = recv_frame(conn, self.max_bytes)
                except ConnectionClosed:
                    return
                except ProtocolError as exc:
                    self._say(f"dropping connection from {peer[0]}:{peer[1]}: {exc}")
                    try:
                        send_frame(conn, {"type": "error", "part": self.part, "message": str(exc)})
                    except OSError:
                        pass
                    return
                kind = header.get("type")
                if kind == "ping":
                    send_frame(conn, {"type": "pong", "part": self.part, "partitions": self.n_parts,
                                      "tier": self.spec["tier"], "checksum": self.checksum, "pid": os.getpid()})
                elif kind == "stop":
                    if peer[0] in ("127.0.0.1", "::1", "localhost"):
                        self._stop.set()
                        send_frame(conn, {"type": "stopping", "part": self.part})
                        return
                elif kind == "infer":
                    self._infer(header, tensors)
                else:
                    self._say(f"ignoring a {kind!r} frame")
        except OSError:
            return
        finally:
            conn.close()

    def _infer(self, header: dict, tensors: dict) -> None:
        import torch

        route = header.get("route")
        batch = header.get("batch")
        dest = route.get("dest") if isinstance(route, dict) else None
        if not dest:
            self._say(f"batch {batch}: no route.dest in the frame; dropped")
            return
        try:
            parts = route.get("parts")
            if not isinstance(parts, list) or len(parts) != self.n_parts:
                raise AutoExitError(f"route.parts must list the {self.n_parts} partition addresses")
            scale = float(header.get("shape", 0.0) or 0.0)
            ids, x = tensors.get("ids"), tensors.get("x")
            if ids is None or x is None:
                raise AutoExitError("an infer frame needs tensors 'ids' and 'x'")
            if ids.dtype != torch.int64 or ids.dim() != 1 or x.shape[0] != ids.shape[0]:
                raise AutoExitError(f"ids must be int64 [n] matching x's batch; got {ids.dtype} {list(ids.shape)} "
                                    f"for x {list(x.shape)}")
            if list(x.shape[1:]) != self.in_shape or x.dtype != torch.float32:
                raise AutoExitError(f"partition {self.part} takes float32 [n, {', '.join(map(str, self.in_shape))}], "
                                    f"got {str(x.dtype).replace('torch.', '')} {list(x.shape)}")
            with self._lock, torch.no_grad():
                logits, exit_index, feats = self.module(x)
            self.handled += int(x.shape[0])
            done = exit_index >= 0
            if bool(done.any()):
                out = [("ids", ids[done]), ("logits", logits[done]), ("exit_index", exit_index[done])]
                nbytes = sum(int(t.numel() * t.element_size()) for _, t in out)
                self.link(dest).send({"type": "result", "batch": batch, "part": self.part}, out,
                                     link_delay_s(self.topology, self.tier, self.dest_tier, nbytes, scale))
            fwd = ~done
            if bool(fwd.any()):
                if self.next_tier is None:
                    raise AutoExitError("the last partition forwarded samples; the artifact is inconsistent")
                nxt = [("ids", ids[fwd]), ("x", feats)]
                nbytes = int(feats.numel() * feats.element_size())
                self.link(parts[self.part + 1]).send(
                    {"type": "infer", "batch": batch, "route": route, "shape": scale}, nxt,
                    link_delay_s(self.topology, self.tier, self.next_tier, nbytes, scale))
        except Exception as exc:  # noqa: BLE001 - reported to the destination, the server keeps serving
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._say(f"batch {batch}: {msg}")
            self.link(dest).send({"type": "error", "batch": batch, "part": self.part,
                                  "message": f"partition {self.part}: {msg}"}, [])


# --------------------------------------------------------------------------- spawning servers


def _request(addr: str, header: dict, timeout: float = 10.0) -> dict:
    host, port = _parse_addr(addr)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        send_frame(s, header)
        reply, _ = recv_frame(s)
    return reply


def ping(addr: str, timeout: float = 10.0) -> dict:
    """The ``pong`` of the server at ``addr`` (its partition, tier, artifact checksum, pid)."""
    try:
        return _request(addr, {"type": "ping"}, timeout)
    except (OSError, ConnectionClosed) as exc:
        raise AutoExitError(f"no partition server answers at {addr} ({exc}); start it with "
                            "`autoexit partition serve --artifact A --part K --port P`") from None


@dataclass
class ServerGroup:
    """Partition servers started by :func:`spawn_servers` (this process owns them)."""

    addresses: list[str]
    procs: list[subprocess.Popen]
    logs: list[list[str]] = field(default_factory=list)

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def describe_dead(self) -> str:
        out = []
        for k, p in enumerate(self.procs):
            if p.poll() is not None:
                tail = self.logs[k][-1] if k < len(self.logs) and self.logs[k] else "no output"
                out.append(f"partition {k} exited with status {p.returncode} ({tail})")
        return "; ".join(out)

    def stop(self, timeout: float = 10.0) -> None:
        for addr, p in zip(self.addresses, self.procs):
            if p.poll() is None and addr:
                try:
                    _request(addr, {"type": "stop"}, timeout=2.0)
                except (OSError, AutoExitError, ConnectionClosed):
                    pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _drain(stream, sink: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line.rstrip())
        del sink[:-50]


def spawn_servers(artifact: str | Path, n_parts: int | None = None, *, threads: int = 1, host: str = "127.0.0.1",
                  timeout_s: float = 180.0, optimize: bool | str = False) -> ServerGroup:
    """Start one ``autoexit partition serve`` process per partition on free loopback ports; wait until all listen.

    ``optimize``: each server runs its partition frozen and optimised (``serve --optimize``; True or
    ``"onednn"``, or ``"freeze"``)."""
    from .model import optimize_mode
    from .partition import load_partitioned

    mode = optimize_mode(optimize)  # a bad value fails before any process starts
    if n_parts is None:
        _, info = load_partitioned(artifact)
        n_parts = len(info["partitions"])
    procs, logs, addrs = [], [], []
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        for k in range(n_parts):
            cmd = [sys.executable, "-m", "autoexit", "partition", "serve", "--artifact", str(artifact),
                   "--part", str(k), "--host", host, "--port", "0", "--threads", str(threads),
                   *(["--optimize", mode] if mode else [])]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            log: list[str] = []
            logs.append(log)
            threading.Thread(target=_drain, args=(p.stderr, log), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        for k, p in enumerate(procs):
            line = ""
            ready: queue.Queue = queue.Queue()
            threading.Thread(target=lambda p=p, ready=ready: ready.put(p.stdout.readline()), daemon=True).start()
            try:
                line = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pass
            if "listening on " not in line:
                time.sleep(0.2)
                tail = logs[k][-1] if logs[k] else (line.strip() or "no output")
                raise AutoExitError(f"partition {k} server did not start within {timeout_s:.0f} s: {tail}")
            addrs.append(line.strip().rsplit("listening on ", 1)[1].split()[0])
            threading.Thread(target=_drain, args=(p.stdout, logs[k]), daemon=True).start()
    except BaseException:
        ServerGroup(addrs + [""] * (len(procs) - len(addrs)), procs, logs).stop(timeout=2)
        raise
    return ServerGroup(addrs, procs, logs)


# --------------------------------------------------------------------------- client: source and destination


class _Sink:
    """The destination: accepts connections from partitions and queues every frame received."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = _bind(host, 0)
        self.address = "{}:{}".format(*self.sock.getsockname()[:2])
        self.q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.t.start()

    def _accept(self):
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        with conn:
            while not self._stop.is_set():
                try:
                    header, tensors = recv_frame(conn)
                except (ConnectionClosed, OSError):
                    return
                except ProtocolError as exc:
                    self.q.put(({"type": "error", "message": f"bad frame at the destination: {exc}"}, {},
                                time.perf_counter()))
                    return
                self.q.put((header, tensors, time.perf_counter()))

    def close(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class PartitionRun:
    """What :func:`run_partitioned` measured: per-sample results and latencies."""

    logits: Any  # torch.Tensor [n, C]
    exit_index: Any  # torch.Tensor [n]
    partition: Any  # torch.Tensor [n]: which partition answered
    latency_s: np.ndarray  # per sample: from handing the batch to the input link to its result arriving
    wall_s: float
    batch_size: int
    shaping: float
    addresses: list[str]
    spawned: bool

    @property
    def n(self) -> int:
        return int(self.exit_index.shape[0])

    def exit_rates(self, n_exits: int) -> list[float]:
        return (np.bincount(self.exit_index.numpy(), minlength=n_exits) / max(self.n, 1)).tolist()

    def partition_rates(self, n_parts: int) -> list[float]:
        return (np.bincount(self.partition.numpy(), minlength=n_parts) / max(self.n, 1)).tolist()


def run_partitioned(artifact: str | Path, inputs, *, addresses: Sequence[str] | None = None, batch_size: int = 1,
                    shaping: float = 0.0, threads: int = 1, timeout_s: float = 60.0, progress: bool = False,
                    start_timeout_s: float = 180.0, optimize: bool | str = False) -> PartitionRun:
    """Run ``inputs`` ([n, ...] tensor) through a partitioned artifact served by one process per partition.

    ``addresses``: ``host:port`` of already running servers (partition order);
    default: start them (:func:`spawn_servers`) and stop them afterwards.
    ``batch_size``: samples per batch entering partition 0 (one batch in flight).
    ``shaping``: link-shaping factor (0 off, 1 the topology's links in real time).
    ``optimize``: the servers this starts run their partitions frozen and optimised for this machine
    (:func:`autoexit.model.optimize_for_runtime`).
    """
    import torch

    from .partition import load_partitioned
    from .perfmodel import Topology

    art, info = load_partitioned(artifact)
    n_parts = len(info["partitions"])
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise AutoExitError("inputs must be a tensor [n, ...] of samples")
    want = list(info["partitions"][0]["input"]["shape"])
    if list(inputs.shape[1:]) != want:
        raise AutoExitError(f"the artifact takes inputs [n, {', '.join(map(str, want))}], got {list(inputs.shape)}")
    if batch_size < 1:
        raise AutoExitError(f"batch_size must be >= 1, got {batch_size}")
    if not math.isfinite(shaping) or shaping < 0:
        raise AutoExitError(f"shaping must be a factor >= 0 (0 off, 1 real time), got {shaping}")
    x = inputs.detach().to(torch.float32).contiguous()
    topo = Topology.from_dict(info["topology"])
    src_tier = topo.tier_index(info["source"])
    first_tier = int(info["partitions"][0]["tier_index"])
    group = None
    if addresses is None:
        group = spawn_servers(artifact, n_parts, threads=threads, timeout_s=start_timeout_s, optimize=optimize)
        addrs = list(group.addresses)
    else:
        addrs = [str(a) for a in addresses]
        if len(addrs) != n_parts:
            raise AutoExitError(f"give {n_parts} addresses (one per partition, in order), got {len(addrs)}")
    sink = link = None
    try:
        for k, a in enumerate(addrs):
            pong = ping(a)
            if pong.get("part") != k or pong.get("checksum") != art.manifest["checksum"]:
                raise AutoExitError(f"the server at {a} serves partition {pong.get('part')} of another artifact "
                                    f"(checksum {str(pong.get('checksum'))[:12]}); expected partition {k} of {artifact}")
        sink = _Sink()
        link = _Link(addrs[0])
        route = {"parts": addrs, "dest": sink.address}
        n = x.shape[0]
        logits = torch.zeros(n, int(info["num_classes"]))
        exit_index = torch.full([n], -1, dtype=torch.long)
        part = torch.full([n], -1, dtype=torch.long)
        lat = np.zeros(n)
        t_start = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="partitioned inference", unit="sample", leave=False)
        for b, lo in enumerate(range(0, n, batch_size)):
            hi = min(n, lo + batch_size)
            ids = torch.arange(lo, hi, dtype=torch.long)
            xb = x[lo:hi]
            t0 = time.perf_counter()
            link.send({"type": "infer", "batch": b, "route": route, "shape": shaping}, [("ids", ids), ("x", xb)],
                      link_delay_s(topo, src_tier, first_tier, int(xb.numel() * 4), shaping))
            left = hi - lo
            while left > 0:
                try:
                    header, tensors, t_arr = sink.q.get(timeout=timeout_s)
                except queue.Empty:
                    why = group.describe_dead() if group is not None else ""
                    raise AutoExitError(f"batch {b}: no result within {timeout_s:g} s"
                                        + (f"; {why}" if why else "; are the partition servers running?")) from None
                if header.get("type") == "error":
                    raise AutoExitError(f"batch {header.get('batch', b)}: {header.get('message', 'unknown error')}")
                if header.get("type") != "result" or header.get("batch") != b:
                    continue
                rid = tensors["ids"]
                if rid.numel() and (int(rid.min()) < lo or int(rid.max()) >= hi):
                    raise AutoExitError(f"batch {b}: a result carries sample ids outside the batch")
                logits[rid] = tensors["logits"].to(torch.float32)
                exit_index[rid] = tensors["exit_index"]
                part[rid] = int(header.get("part", -1))
                lat[rid.numpy()] = t_arr - t0
                left -= int(rid.numel())
            if bar is not None:
                bar.update(hi - lo)
        wall = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
        return PartitionRun(logits, exit_index, part, lat, wall, batch_size, shaping, addrs, group is not None)
    finally:
        if link is not None:
            link.close()
        if sink is not None:
            sink.close()
        if group is not None:
            group.stop()
