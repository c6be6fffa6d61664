"""The emitted artifact: write it atomically, read it back, validate it.

Layout (see DESIGN.md):

    manifest.json   schema version, backbone identity, exit points, head specs,
                    temperatures, thresholds, expected accuracy / FLOPs / hit rates,
                    measured latencies, checksums of every other file and of itself
    model.pt        TorchScript of the whole multi-exit model (torch.jit.load alone)
    report.json     the numbers behind report.html
    report.html     plots and tables
    onnx/*.onnx     per stage and head, when requested and exportable
    partitions/*.pt one TorchScript file per partition, for partitioned models

The directory is built under a temporary name beside the target and renamed
into place, so a failure never leaves a half-written artifact. ``load``
recomputes the SHA-256 of every file and refuses anything that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ArtifactError

__all__ = ["SCHEMA_VERSION", "write_artifact", "load", "Artifact", "sha256_file", "manifest_checksum"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "backbone", "exits", "files", "checksum")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_artifact(
    out_dir: str | Path,
    manifest: dict,
    writers: dict[str, Callable[[Path], None]],
    overwrite: bool = False,
) -> Path:
    """Create ``out_dir`` atomically: each ``writers[relpath](path)`` writes one file.

    Checksums of all written files and of the manifest are added to ``manifest``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {}
        for rel, write in writers.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
            if not target.exists():
                raise ArtifactError(f"writer for {rel} produced no file")
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = dict(manifest)
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["files"] = files
        manifest["checksum"] = manifest_checksum(manifest)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Artifact:
    """A loaded, validated artifact."""

    path: Path
    manifest: dict
    model: torch.jit.ScriptModule
    optimized: str | None = None  # the optimize mode the model was loaded with ("onednn", "freeze") or None

    @property
    def exit_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["exits"]]

    def __call__(self, x: torch.Tensor):
        return self.model(x)

    def partition(self, k: int, optimize: bool | str = False) -> torch.jit.ScriptModule:
        mode = _mode(optimize)
        rel = f"partitions/{k}.pt"
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{self.path} has no partition {k}")
        module = torch.jit.load(str(self.path / rel), map_location="cpu").eval()
        return _optimized(module, mode) if mode else module


def _mode(optimize) -> str | None:
    from .model import optimize_mode

    return optimize_mode(optimize)


def _optimized(module: torch.jit.ScriptModule, mode: str) -> torch.jit.ScriptModule:
    from .model import optimize_for_runtime

    return optimize_for_runtime(module, mode)


def load(path: str | Path, verify: bool = True, optimize: bool | str = False) -> Artifact:
    """Load an emitted artifact; with ``verify`` (default) every checksum and the schema are checked.

    ``optimize``: freeze the model and optimise it for this machine's runtime
    (:func:`autoexit.model.optimize_for_runtime`): ``True`` or ``"onednn"`` folds the batch norms and runs the
    convolutions on oneDNN where this CPU's PyTorch has it; ``"freeze"`` only freezes and folds (faster for
    tiny models at batch 1). The same decisions up to float rounding (``docs/guide.md`` section 9). Optimise on
    the machine that runs the model: the optimised module cannot be saved and loaded again.
    """
    mode = _mode(optimize)  # a bad value fails before anything is read
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not an autoexit artifact (no manifest.json); give the directory `emit` wrote")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc}); re-emit the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is corrupt (not a JSON object); re-emit the artifact")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath} lacks {', '.join(missing)}; it was not written by autoexit or is damaged")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {manifest['schema_version']}; this autoexit reads version {SCHEMA_VERSION} "
            "(upgrade autoexit or re-emit the artifact)"
        )
    if verify:
        if manifest_checksum(manifest) != manifest["checksum"]:
            raise ArtifactError(f"{mpath} was modified after it was written (checksum mismatch); re-emit the artifact")
        for rel, info in manifest["files"].items():
            p = path / rel
            if not p.is_file():
                raise ArtifactError(f"{path} is missing {rel}; re-emit the artifact")
            if sha256_file(p) != info["sha256"]:
                raise ArtifactError(f"{rel} in {path} does not match its checksum (tampered or corrupt); re-emit it")
    if "model.pt" not in manifest["files"]:
        raise ArtifactError(f"{path} has no model.pt")
    try:
        model = torch.jit.load(str(path / "model.pt"), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"model.pt in {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
    model.eval()
    if mode:
        model = _optimized(model, mode)
    return Artifact(path, manifest, model, optimized=mode)
