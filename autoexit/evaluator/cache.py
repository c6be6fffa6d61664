"""Results cache: ``cache key -> LatencyResult dict``, persisted as JSON lines.

One JSON object per line (``{"v", "key", "result"}``), appended and fsynced as
results arrive, so a restart keeps them and a crash loses at most the line
being written. Unreadable lines (a torn last write, a foreign format) are
skipped on load; the last line for a key wins. Used by the server and by the
clients (``cache_file=``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from .protocol import CACHE_KEY_RE, PROTOCOL_VERSION

log = logging.getLogger("autoexit.evaluator")


class ResultCache:
    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path).expanduser() if path else None
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._torn_tail = False
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                self._torn_tail = fh.read(1) != b"\n"
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                    if rec.get("v") != PROTOCOL_VERSION or not CACHE_KEY_RE.match(key):
                        raise ValueError("foreign record")
                    if not isinstance(rec["result"], dict):
                        raise ValueError("result is not an object")
                    self._data[key] = rec["result"]
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
        if self.skipped_lines:
            log.warning("results cache %s: skipped %d unreadable line(s)", self.path, self.skipped_lines)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            hit = self._data.get(key)
            return dict(hit) if hit is not None else None

    def put(self, key: str, result: dict[str, Any]) -> None:
        result = dict(result)
        result.pop("cached", None)
        line = json.dumps({"v": PROTOCOL_VERSION, "key": key, "result": result}, separators=(",", ":"))
        with self._lock:
            self._data[key] = result
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                if self._torn_tail:  # never glue a new record onto a torn last line
                    fh.write("\n")
                    self._torn_tail = False
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data
