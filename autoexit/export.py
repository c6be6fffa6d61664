"""ONNX export of the stages and heads of a multi-exit model (where exportable).

The TorchScript ``model.pt`` is the artifact's deployable whole; ONNX files
are per segment (one per backbone stage and one per exit head, batch axis
dynamic) for runtimes such as onnxruntime, where the caller drives the exit
rule (``manifest.json`` holds temperatures and thresholds). A segment that the
exporter rejects is skipped and listed in ``onnx/README.txt`` with the reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import require

__all__ = ["export_onnx", "onnx_writers"]


def export_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes of ``module`` for inputs like ``example`` (batch axis dynamic)."""
    require("onnx", "onnx", "ONNX export")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), buf, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False, opset_version=17,
        )
    return buf.getvalue()


def onnx_writers(model, example: torch.Tensor) -> dict[str, Callable[[Path], None]]:
    """Writers for ``onnx/stage{k}.onnx`` and ``onnx/head{k}.onnx`` of a MultiExitModel."""
    blobs: dict[str, bytes] = {}
    skipped: list[str] = []
    h = example
    with torch.no_grad():
        for k, seg in enumerate(model.segments):
            try:
                blobs[f"onnx/stage{k}.onnx"] = export_onnx(seg.stage, h)
            except Exception as exc:  # noqa: BLE001 - report and go on
                skipped.append(f"stage{k}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            h = seg.stage(h)
            if seg.has_head:
                try:
                    blobs[f"onnx/head{k}.onnx"] = export_onnx(seg.head, h)
                except Exception as exc:  # noqa: BLE001
                    skipped.append(f"head{k}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    writers: dict[str, Callable[[Path], None]] = {
        rel: (lambda p, b=blob: p.write_bytes(b)) for rel, blob in blobs.items()
    }
    notes = ["One ONNX file per backbone stage and exit head (input 'x', output 'y', batch axis dynamic).",
             "Exit rule: head k's output / temperature_k -> exit score >= threshold_k (see manifest.json)."]
    notes += [f"skipped {s}" for s in skipped]
    writers["onnx/README.txt"] = lambda p: p.write_text("\n".join(notes) + "\n")
    return writers
