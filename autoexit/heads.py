"""Exit heads: ``HeadSpec`` and the registry that builds a head from it.

A head reads the activation at an exit point and predicts the backbone's class
distribution. ``HeadSpec`` is a frozen dataclass with a JSON round-trip, so the
same spec can come from a default, a YAML search space, an NNI trial or an
emitted manifest. The conv zoo follows MEEdge (paper 000, 3.2.1) and paper 003
(3.2.1): ``none``, ``standard``, ``depthwise``, ``separable`` (depthwise +
pointwise), ``spatial`` (k x 1 then 1 x k) and ``dilated`` convolutions with
kernels 3/5/7, 0-2 conv layers, then pooling and 1-3 linear layers.

Activations of rank 3 (``[C, H, W]``) go through the conv stack and spatial
pooling; rank 2 (``[tokens, dim]``, e.g. ViT) are pooled over tokens; rank 1
go straight to the linear layers.

New conv kinds register with ``@register_conv_kind("name")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .errors import AutoExitError

__all__ = [
    "HeadSpec",
    "build_head",
    "default_head_spec",
    "cheap_head_spec",
    "HEAD_PRESETS",
    "preset_head_spec",
    "register_conv_kind",
    "CONV_KINDS",
    "POOLS",
]

ConvBuilder = Callable[[int, int, int, int], list[nn.Module]]
CONV_KINDS: dict[str, ConvBuilder] = {}
POOLS = ("avg", "max", "avg2", "flatten", "mean", "cls")


def register_conv_kind(name: str) -> Callable[[ConvBuilder], ConvBuilder]:
    """Register ``fn(in_ch, width, kernel, stride) -> [modules]``; BN and ReLU are appended by the head."""

    def deco(fn: ConvBuilder) -> ConvBuilder:
        CONV_KINDS[name] = fn
        return fn

    return deco


@register_conv_kind("standard")
def _standard(cin: int, width: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, width, k, stride, padding=k // 2, bias=False)]


@register_conv_kind("depthwise")
def _depthwise(cin: int, width: int, k: int, stride: int) -> list[nn.Module]:
    # a depthwise conv keeps the channel count; ``width`` is ignored
    return [nn.Conv2d(cin, cin, k, stride, padding=k // 2, groups=cin, bias=False)]


@register_conv_kind("separable")
def _separable(cin: int, width: int, k: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cin, k, stride, padding=k // 2, groups=cin, bias=False),
        nn.Conv2d(cin, width, 1, bias=False),
    ]


@register_conv_kind("spatial")
def _spatial(cin: int, width: int, k: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, width, (k, 1), (stride, 1), padding=(k // 2, 0), bias=False),
        nn.Conv2d(width, width, (1, k), (1, stride), padding=(0, k // 2), bias=False),
    ]


@register_conv_kind("dilated")
def _dilated(cin: int, width: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, width, k, stride, padding=(k // 2) * 2, dilation=2, bias=False)]


def _out_channels(kind: str, cin: int, width: int) -> int:
    return cin if kind == "depthwise" else width


@dataclass(frozen=True)
class HeadSpec:
    """Architecture of one exit head.

    conv: conv kind (``none`` or a key of ``CONV_KINDS``); kernel: 3, 5 or 7;
    conv_layers: 0-2; conv_width: output channels of each conv layer (0 = same as
    the input); stride: of the first conv layer; pool: ``avg``/``max`` (global),
    ``avg2`` (2x2 adaptive average), ``flatten`` (keep the map) for images,
    ``mean``/``cls`` for token sequences; fc_layers: 1-3 linear layers in all;
    fc_width: width of each hidden linear layer (``fc_layers - 1`` of them);
    batchnorm: BN after each conv; dropout: before each hidden linear layer.
    """

    conv: str = "separable"
    kernel: int = 3
    conv_layers: int = 1
    conv_width: int = 0
    stride: int = 1
    pool: str = "avg"
    fc_layers: int = 2
    fc_width: int = 128
    batchnorm: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if self.conv != "none" and self.conv not in CONV_KINDS:
            raise AutoExitError(
                f"HeadSpec.conv '{self.conv}' is unknown; use one of: none, {', '.join(sorted(CONV_KINDS))}"
            )
        if self.kernel not in (1, 3, 5, 7):
            raise AutoExitError(f"HeadSpec.kernel must be 1, 3, 5 or 7, got {self.kernel}")
        if not 0 <= self.conv_layers <= 2:
            raise AutoExitError(f"HeadSpec.conv_layers must be 0, 1 or 2, got {self.conv_layers}")
        if self.conv == "none" and self.conv_layers:
            object.__setattr__(self, "conv_layers", 0)
        if self.conv_width < 0:
            raise AutoExitError(f"HeadSpec.conv_width must be >= 0 (0 = input channels), got {self.conv_width}")
        if self.stride not in (1, 2):
            raise AutoExitError(f"HeadSpec.stride must be 1 or 2, got {self.stride}")
        if self.pool not in POOLS:
            raise AutoExitError(f"HeadSpec.pool '{self.pool}' is unknown; use one of: {', '.join(POOLS)}")
        if not 1 <= self.fc_layers <= 3:
            raise AutoExitError(f"HeadSpec.fc_layers must be 1, 2 or 3, got {self.fc_layers}")
        if self.fc_width < 1:
            raise AutoExitError(f"HeadSpec.fc_width must be >= 1, got {self.fc_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise AutoExitError(f"HeadSpec.dropout must be in [0, 1), got {self.dropout}")

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadSpec:
        if not isinstance(d, dict):
            raise AutoExitError(f"a HeadSpec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AutoExitError(
                f"unknown HeadSpec field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> HeadSpec:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise AutoExitError(f"HeadSpec JSON is malformed: {exc}") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        parts = []
        if self.conv_layers:
            w = f"x{self.conv_width}" if self.conv_width else ""
            s = "/2" if self.stride == 2 else ""
            parts.append(f"{self.conv_layers}x{self.conv}{self.kernel}{w}{s}")
        parts.append(self.pool)
        parts.append("fc" + "-".join([str(self.fc_width)] * (self.fc_layers - 1) + ["C"]))
        return " > ".join(parts)


class TokenPool(nn.Module):
    """Pool a ``[batch, tokens, dim]`` activation to ``[batch, dim]``."""

    def __init__(self, mode: str):
        super().__init__()
        self.cls = mode == "cls"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls:
            return x[:, 0]
        return x.mean(dim=1)


def build_head(spec: HeadSpec, in_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """Build the head ``spec`` describes for activations of shape ``in_shape`` (no batch dim)."""
    in_shape = tuple(int(s) for s in in_shape)
    if num_classes < 2:
        raise AutoExitError(f"a classifier head needs at least 2 classes, got {num_classes}")
    layers: list[nn.Module] = []
    if len(in_shape) == 3:
        c, h, w = in_shape
        for i in range(spec.conv_layers):
            width = spec.conv_width or c
            stride = spec.stride if i == 0 else 1
            layers += CONV_KINDS[spec.conv](c, width, spec.kernel, stride)
            c = _out_channels(spec.conv, c, width)
            if spec.batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=False))
            h, w = (h + 1) // stride if stride > 1 else h, (w + 1) // stride if stride > 1 else w
        pool = spec.pool if spec.pool in ("avg", "max", "avg2", "flatten") else "avg"
        if pool == "avg":
            layers.append(nn.AdaptiveAvgPool2d(1))
            feat = c
        elif pool == "max":
            layers.append(nn.AdaptiveMaxPool2d(1))
            feat = c
        elif pool == "avg2":
            layers.append(nn.AdaptiveAvgPool2d(2))
            feat = c * 4
        else:
            feat = c * h * w
        layers.append(nn.Flatten(1))
    elif len(in_shape) == 2:
        layers.append(TokenPool("cls" if spec.pool == "cls" else "mean"))
        feat = in_shape[1]
    elif len(in_shape) == 1:
        feat = in_shape[0]
    else:
        layers.append(nn.Flatten(1))
        feat = 1
        for s in in_shape:
            feat *= s
    for _ in range(spec.fc_layers - 1):
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        layers += [nn.Linear(feat, spec.fc_width), nn.ReLU(inplace=False)]
        feat = spec.fc_width
    layers.append(nn.Linear(feat, num_classes))
    return nn.Sequential(*layers)


def default_head_spec(in_shape: Sequence[int], num_classes: int) -> HeadSpec:
    """A sensible head for an exit point with activations of ``in_shape``.

    Images: one depthwise-separable 3x3 conv (stride 2 on maps larger than 16x16)
    widening to at least 64 channels, BN, ReLU, global average pool, FC(128), FC.
    Tokens: mean over tokens, FC(128), FC. Vectors: FC(128), FC.
    """
    in_shape = tuple(int(s) for s in in_shape)
    width = max(128, num_classes)
    if len(in_shape) == 3:
        c, h, _ = in_shape
        return HeadSpec(
            conv="separable",
            kernel=3,
            conv_layers=1,
            conv_width=min(max(c, 64), 256),
            stride=2 if h > 16 else 1,
            pool="avg",
            fc_layers=2,
            fc_width=width,
        )
    if len(in_shape) == 2:
        return HeadSpec(conv="none", conv_layers=0, pool="mean", fc_layers=2, fc_width=width)
    return HeadSpec(conv="none", conv_layers=0, pool="flatten", fc_layers=2, fc_width=width)


def cheap_head_spec(in_shape: Sequence[int], num_classes: int) -> HeadSpec:
    """SDN's head (Kaya et al., "Shallow-Deep Networks", 2019): no conv, a 2x2 average pool and one linear
    layer for images; mean over tokens and one linear layer for tokens; one linear layer for vectors.

    About 0.3 % of :func:`default_head_spec`'s FLOPs on the CIFAR ResNets, so an exit that rarely fires costs
    almost nothing; its predictions agree with the backbone less often (docs/policies.md, "Nine levers").
    """
    in_shape = tuple(int(s) for s in in_shape)
    pool = {3: "avg2", 2: "mean"}.get(len(in_shape), "flatten")
    return HeadSpec(conv="none", conv_layers=0, pool=pool, fc_layers=1)


HEAD_PRESETS: dict[str, Callable[[Sequence[int], int], HeadSpec]] = {
    "default": default_head_spec,
    "cheap": cheap_head_spec,
}


def preset_head_spec(name: str, in_shape: Sequence[int], num_classes: int) -> HeadSpec:
    """The spec preset ``name`` (a key of ``HEAD_PRESETS``) gives an exit point with activations of ``in_shape``."""
    if name not in HEAD_PRESETS:
        raise AutoExitError(f"unknown head preset {name!r}; use one of: {', '.join(HEAD_PRESETS)}, or a HeadSpec")
    return HEAD_PRESETS[name](in_shape, num_classes)


def head_zoo() -> list[str]:
    """Names of the registered conv kinds (plus ``none``)."""
    return ["none", *sorted(CONV_KINDS)]

