"""``MultiExitModel``: backbone stages with exit heads and batch-shrinking inference.

The model is a list of segments; segment i runs backbone stage i and, for
every segment but the last, exit head i. ``forward`` follows paper 003's
Algorithm 1: after each head, the samples whose exit score reaches the
head's threshold leave the batch with the head's (temperature-scaled)
logits, and only the rest go on through the backbone. The output keeps the
input order: ``(logits [N, C], exit_index [N])``, where ``exit_index`` is the
0-based exit that answered and ``num_exits`` means the backbone's own output.

Each segment's exit decision is an *exit rule* (``autoexit.policies.rules``):
a module ``rule(z, prev, h) -> score`` that sees the head's scaled logits
``z``, the scaled logits of the earlier exits for the same samples (``prev``,
oldest first, the last ``keep_prev`` of them) and the activation ``h``; a
sample exits when ``score >= threshold``. The default rule is the confidence
``exit_score(z, signal)``. A segment's head may also read the earlier exits'
logits (a cascade head, ``cascade=True``: ``head(h, prev)``).

With every threshold at +inf no sample exits and the output is bit-identical
to the backbone's. ``forward_all`` returns every head's output for
evaluation. The model is scriptable with TorchScript (``to_torchscript``).
"""


import warnings
from collections.abc import Sequence
from typing import Final, List

import torch
from torch import nn

from .calibrate import SIGNALS
from .errors import AutoExitError

# optimize_for_runtime's modes, shared with the evaluator's wire form: onednn (what optimize=True means) freezes
# the model and runs its convolutions on oneDNN where this machine's PyTorch has it; freeze only freezes
from .evaluator.protocol import OPTIMIZE_MODES
from .policies.rules import ConfidenceRule

__all__ = ["ExitSegment", "CascadeExitSegment", "MultiExitModel", "to_torchscript", "optimize_for_runtime"]


class ExitSegment(nn.Module):
    """One backbone stage, then (unless it is the last segment) one exit head and its exit rule."""

    has_head: Final[bool]
    exit_id: Final[int]

    def __init__(
        self,
        stage: nn.Module,
        head: nn.Module | None = None,
        temperature: float = 1.0,
        threshold: float = float("inf"),
        exit_id: int = -1,
        rule: nn.Module | None = None,
    ):
        super().__init__()
        self.stage = stage
        self.has_head = head is not None
        self.head = head if head is not None else nn.Identity()
        self.rule = rule if rule is not None else ConfidenceRule(0)
        self.exit_id = exit_id
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def logits(self, h: torch.Tensor, prev: List[torch.Tensor]) -> torch.Tensor:
        """The head's temperature-scaled logits."""
        return self.head(h) / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - segments are driven by the model
        return self.stage(x)


class CascadeExitSegment(ExitSegment):
    """A segment whose head also reads the earlier exits' scaled logits: ``head(h, prev)``."""

    def logits(self, h: torch.Tensor, prev: List[torch.Tensor]) -> torch.Tensor:
        return self.head(h, prev) / self.temperature


class MultiExitModel(nn.Module):
    """Backbone stages + exit heads + temperatures + thresholds.

    ``stages`` has one more element than ``heads``: stage i is followed by head i,
    and the last stage produces the backbone's logits.
    """

    num_exits: Final[int]
    num_classes: Final[int]
    signal: Final[int]
    keep_prev: Final[int]
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
        rules: Sequence[nn.Module] | None = None,
        cascade: bool | Sequence[bool] = False,
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
        rules = list(rules) if rules is not None else [ConfidenceRule(SIGNALS[signal]) for _ in range(k)]
        if len(rules) != k or not all(isinstance(r, nn.Module) for r in rules):
            raise AutoExitError(f"give one exit rule (an nn.Module: rule(z, prev, h) -> score) per exit ({k})")
        cascade = [bool(c) for c in cascade] if isinstance(cascade, (list, tuple)) else [bool(cascade)] * k
        if len(cascade) != k:
            raise AutoExitError(f"cascade must be one flag or one flag per exit ({k})")
        seg_cls = [CascadeExitSegment if c else ExitSegment for c in cascade]
        segs = [seg_cls[i](stages[i], heads[i], temperatures[i], thresholds[i], i, rules[i]) for i in range(k)]
        segs.append(ExitSegment(stages[-1], None, 1.0, float("inf"), k))
        self.segments = nn.ModuleList(segs)
        self.num_exits = k
        self.num_classes = int(num_classes)
        self.signal = SIGNALS[signal]
        self.signal_name = signal
        self.exit_names = list(exit_names) if exit_names is not None else [f"exit{i}" for i in range(k)]
        need = [int(getattr(r, "history", 0)) for r in rules]
        need += [int(getattr(h, "num_prev", 0)) for h, c in zip(heads, cascade) if c]
        self.keep_prev = max(need, default=0)

    # ------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        out = torch.zeros(n, self.num_classes, dtype=torch.float32, device=x.device)
        exit_index = torch.full([n], self.num_exits, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        prev: List[torch.Tensor] = []
        h = x
        for seg in self.segments:
            if remaining.shape[0] > 0:
                h = seg.stage(h)
                if seg.has_head:
                    z = seg.logits(h, prev)
                    take = seg.rule(z, prev, h) >= seg.threshold
                    if self.keep_prev > 0:
                        prev.append(z)
                        if len(prev) > self.keep_prev:
                            prev = prev[len(prev) - self.keep_prev :]
                    if bool(take.any()):
                        sel = remaining[take]
                        out[sel] = z[take].to(torch.float32)
                        exit_index[sel] = seg.exit_id
                        keep = ~take
                        h = h[keep]
                        remaining = remaining[keep]
                        prev = [p[keep] for p in prev]
        if remaining.shape[0] > 0:
            out[remaining] = h.to(torch.float32)
        return out, exit_index

    @torch.jit.export
    def forward_all(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every exit head's scaled logits and then the backbone's, for the whole batch (no exits taken)."""
        outs: List[torch.Tensor] = []
        h = x
        for seg in self.segments:
            h = seg.stage(h)
            if seg.has_head:
                outs.append(seg.logits(h, outs))
        outs.append(h)
        return outs

    @torch.jit.export
    def exit_scores(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every exit rule's score for the whole batch (no exits taken), for checking decisions."""
        scores: List[torch.Tensor] = []
        prev: List[torch.Tensor] = []
        h = x
        for seg in self.segments:
            h = seg.stage(h)
            if seg.has_head:
                z = seg.logits(h, prev)
                scores.append(seg.rule(z, prev, h))
                if self.keep_prev > 0:
                    prev.append(z)
                    if len(prev) > self.keep_prev:
                        prev = prev[len(prev) - self.keep_prev :]
        return scores

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

    def rules(self) -> list[nn.Module]:
        return [seg.rule for seg in list(self.segments)[: self.num_exits]]


def scripted_backbone(traced, example: torch.Tensor | None = None) -> torch.jit.ScriptModule:
    """The backbone in the runtime the emitted model uses: its traced graph as the one segment of a
    :class:`MultiExitModel` without exits, in TorchScript.

    Latency comparisons time this against the early-exit model so that the ratio compares models, not
    runtimes (on a 2-core CPU, TorchScript alone runs a CIFAR ResNet at about 0.7x eager PyTorch's time
    at batch 1 and 1.15x at batch 32). ``traced``: an :class:`~autoexit.points.TracedBackbone`.
    """
    ex = traced.example_input if example is None else example
    return to_torchscript(MultiExitModel(traced.split([]), [], num_classes=traced.num_classes), ex)


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


def optimize_mode(optimize) -> str | None:
    """``optimize`` as given to ``load`` / the evaluator (False, True, "onednn" or "freeze") as a mode or None."""
    if optimize is False or optimize is None:
        return None
    if optimize is True:
        return "onednn"
    if isinstance(optimize, str) and optimize in OPTIMIZE_MODES:
        return optimize
    raise AutoExitError(f"optimize must be true, false or one of {', '.join(OPTIMIZE_MODES)}, got {optimize!r}")


def optimize_for_runtime(module: torch.jit.ScriptModule, mode: str = "onednn") -> torch.jit.ScriptModule:
    """A frozen copy of ``module`` optimised for inference on the machine that runs it.

    Freezing (both modes) inlines the weights as constants and folds each batch norm into the convolution
    before it. With ``mode="onednn"`` (the default, what ``optimize=True`` means), on a CPU whose PyTorch has
    oneDNN (MKLDNN: x86 and aarch64 wheels) ``torch.jit.optimize_for_inference`` then runs the convolutions
    on pre-packed oneDNN weights: 0.80-0.90x the plain TorchScript time of the CIFAR ResNets at batch 32
    (``bench/runtime.py``), but the layout conversions around each convolution can cost more than they save
    on tiny inputs (the quickstart's 8x8 digits CNN: about 1.3x at batch 1), where ``mode="freeze"`` is the
    faster one. ``emit`` times the default mode against the plain model, so the report says which pays.

    The exit rules, thresholds and batch shrinking are kept, and so are the exported methods
    (``forward_all``, ``exit_scores``, ``thresholds``; a partition's ``exit_ids``). The result computes the
    same function up to float rounding (a sample whose exit score lies within rounding of a threshold may exit
    elsewhere: ``bench/runtime.py`` counts them).

    Optimise after loading, where the model runs: the result holds pre-packed weights that
    ``torch.jit.save`` writes but ``torch.jit.load`` cannot read back. ``autoexit.load(path, optimize=...)``
    and the evaluator's ``MeasureSettings(optimize=...)`` call this.
    """
    if not isinstance(module, torch.jit.ScriptModule):
        raise AutoExitError(f"optimize_for_runtime needs a TorchScript module (torch.jit.load / to_torchscript), "
                            f"got {type(module).__name__}; script it first")
    if mode not in OPTIMIZE_MODES:
        raise AutoExitError(f"optimize mode must be one of {', '.join(OPTIMIZE_MODES)}, got {mode!r}")
    keep = [m for m in module._c._method_names() if m != "forward"]  # exported methods (exit_ids, ...)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optimize_for_inference's deprecation notice (TorchScript itself)
            on_cpu = all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
            if mode == "onednn" and on_cpu and torch.backends.mkldnn.is_available():
                return torch.jit.optimize_for_inference(module.eval(), other_methods=keep)
            return torch.jit.freeze(module.eval(), preserved_attrs=keep)
    except Exception as exc:  # noqa: BLE001 - one line, with the way out
        msg = str(exc).strip().splitlines()
        raise AutoExitError(f"cannot optimise this TorchScript model for the runtime "
                            f"({msg[0] if msg else type(exc).__name__}); run it without optimize") from None
