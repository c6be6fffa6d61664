"""``MultiExitModel``: backbone stages with exit heads and batch-shrinking inference.

The model is a list of segments; segment i runs backbone stage i and, for
every segment but the last, exit head i. ``forward`` follows paper 003's
Algorithm 1: after each head, the samples whose exit score reaches the
head's threshold leave the batch with the head's (temperature-scaled)
logits, and only the rest go on through the backbone. The output keeps the
input order: ``(logits [N, C], exit_index [N])``, where ``exit_index`` is the
0-based exit that answered and ``num_exits`` means the backbone's own output.

With every threshold at +inf no sample exits and the output is bit-identical
to the backbone's. ``forward_all`` returns every head's output for
evaluation. The model is scriptable with TorchScript (``to_torchscript``).
"""


import warnings
from collections.abc import Sequence
from typing import Final

import torch
from torch import nn

from .calibrate import SIGNALS, exit_score
from .errors import AutoExitError

__all__ = ["ExitSegment", "MultiExitModel", "to_torchscript"]


class ExitSegment(nn.Module):
    """One backbone stage, then (unless it is the last segment) one exit head."""

    has_head: Final[bool]
    exit_id: Final[int]

    def __init__(
        self,
        stage: nn.Module,
        head: nn.Module | None = None,
        temperature: float = 1.0,
        threshold: float = float("inf"),
        exit_id: int = -1,
    ):
        super().__init__()
        self.stage = stage
        self.has_head = head is not None
        self.head = head if head is not None else nn.Identity()
        self.exit_id = exit_id
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - segments are driven by the model
        return self.stage(x)


class MultiExitModel(nn.Module):
    """Backbone stages + exit heads + temperatures + thresholds.

    ``stages`` has one more element than ``heads``: stage i is followed by head i,
    and the last stage produces the backbone's logits.
    """

    num_exits: Final[int]
    num_classes: Final[int]
    signal: Final[int]
    exit_names: list[str]

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        temperatures: Sequence[float] | None = None,
        thresholds: Sequence[float] | None = None,
        exit_names: Sequence[str] | None = None,
        num_classes: int = 0,
        signal: str = "max_softmax",
    ):
        super().__init__()
        if len(stages) != len(heads) + 1:
            raise AutoExitError(f"a model with {len(heads)} exit heads needs {len(heads) + 1} stages, got {len(stages)}")
        k = len(heads)
        temperatures = list(temperatures) if temperatures is not None else [1.0] * k
        thresholds = list(thresholds) if thresholds is not None else [float("inf")] * k
        if len(temperatures) != k or len(thresholds) != k:
            raise AutoExitError(f"give one temperature and one threshold per exit ({k})")
        if any(not t > 0 for t in temperatures):
            raise AutoExitError(f"temperatures must be > 0, got {temperatures}")
        if signal not in SIGNALS:
            raise AutoExitError(f"unknown exit signal {signal!r}; use one of: {', '.join(SIGNALS)}")
        segs = [ExitSegment(stages[i], heads[i], temperatures[i], thresholds[i], i) for i in range(k)]
        segs.append(ExitSegment(stages[-1], None, 1.0, float("inf"), k))
        self.segments = nn.ModuleList(segs)
        self.num_exits = k
        self.num_classes = int(num_classes)
        self.signal = SIGNALS[signal]
        self.signal_name = signal
        self.exit_names = list(exit_names) if exit_names is not None else [f"exit{i}" for i in range(k)]

    # ------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        out = torch.zeros(n, self.num_classes, dtype=torch.float32, device=x.device)
        exit_index = torch.full([n], self.num_exits, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        h = x
        for seg in self.segments:
            if remaining.shape[0] > 0:
                h = seg.stage(h)
                if seg.has_head:
                    z = seg.head(h) / seg.temperature
                    take = exit_score(z, self.signal) >= seg.threshold
                    if bool(take.any()):
                        sel = remaining[take]
                        out[sel] = z[take].to(torch.float32)
                        exit_index[sel] = seg.exit_id
                        keep = ~take
                        h = h[keep]
                        remaining = remaining[keep]
        if remaining.shape[0] > 0:
            out[remaining] = h.to(torch.float32)
        return out, exit_index

    @torch.jit.export
    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit head's scaled logits and then the backbone's, for the whole batch (no exits taken)."""
        outs: list[torch.Tensor] = []
        h = x
        for seg in self.segments:
            h = seg.stage(h)
            if seg.has_head:
                outs.append(seg.head(h) / seg.temperature)
        outs.append(h)
        return outs

    @torch.jit.export
    def thresholds(self) -> list[float]:
        res: list[float] = []
        for seg in self.segments:
            if seg.has_head:
                res.append(float(seg.threshold.item()))
        return res

    # ------------------------------------------------------------------ configuration
    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != self.num_exits:
            raise AutoExitError(f"give {self.num_exits} thresholds, got {len(thresholds)}")
        for seg, t in zip(self.segments, thresholds):
            seg.threshold.fill_(float(t))

    def temperatures(self) -> list[float]:
        return [float(seg.temperature) for seg in list(self.segments)[: self.num_exits]]

    def stages(self) -> list[nn.Module]:
        return [seg.stage for seg in self.segments]

    def heads(self) -> list[nn.Module]:
        return [seg.head for seg in list(self.segments)[: self.num_exits]]


def to_torchscript(model: MultiExitModel, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Script ``model``; stages that TorchScript cannot compile are traced (fx stages are straight-line code).

    Raises a one-line error when neither works.
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.x deprecation notices about TorchScript itself
        return _to_torchscript(model, example)


def _to_torchscript(model: MultiExitModel, example: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception as first:  # noqa: BLE001 - fall back to tracing the stages
        err = str(first).strip().splitlines()
        reason = err[0] if err else type(first).__name__
    import copy

    model = copy.deepcopy(model)  # stages are replaced below: never touch the caller's model
    h = example
    with torch.no_grad():
        for seg in model.segments:
            stage = seg.stage
            if not isinstance(stage, torch.jit.ScriptModule):
                try:
                    seg.stage = torch.jit.script(stage)
                except Exception:  # noqa: BLE001
                    try:
                        seg.stage = torch.jit.trace(stage, (h,), check_trace=True)
                    except Exception as exc:  # noqa: BLE001
                        raise AutoExitError(
                            f"cannot export stage {type(stage).__name__} to TorchScript (script: {reason}; "
                            f"trace: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            "make the backbone scriptable or traceable"
                        ) from None
            h = seg.stage(h)
    try:
        return torch.jit.script(model)
    except Exception as exc:  # noqa: BLE001
        raise AutoExitError(
            f"cannot export the multi-exit model to TorchScript: {str(exc).strip().splitlines()[0]}"
        ) from None
