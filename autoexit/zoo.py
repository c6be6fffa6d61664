"""Reference backbones: the quickstart's digits CNN and the classic CIFAR ResNets.

``cifar_resnet(depth)`` rebuilds the architecture of Yerlan Idelbayev's
``pytorch_resnet_cifar10`` (option-A shortcuts) so its published weights
(``../shared/fixtures/cifar10-resnet``) load with ``load_cifar_resnet``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AutoExitError

__all__ = [
    "DigitsCNN",
    "trained_digits_cnn",
    "cifar_resnet",
    "load_cifar_resnet",
    "load_backbone",
    "train_classifier",
    "CIFAR_MEAN",
    "CIFAR_STD",
]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """A small plain CNN for 8x8 digits (about 15 MFLOPs): stem, five conv blocks, pool, linear."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w = width
        self.stem = _conv_bn(in_channels, w)
        self.block1 = _conv_bn(w, w)
        self.block2 = _conv_bn(w, 2 * w)
        self.block3 = _conv_bn(2 * w, 2 * w, pool=True)
        self.block4 = _conv_bn(2 * w, 4 * w)
        self.block5 = _conv_bn(4 * w, 4 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block5(self.block4(self.block3(self.block2(self.block1(self.stem(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


class _LambdaShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _LambdaShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise AutoExitError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._layer(16, 16, n, 1)
        self.layer2 = self._layer(16, 32, n, 2)
        self.layer3 = self._layer(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _layer(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, num_classes)


def load_cifar_resnet(path: str | Path) -> CifarResNet:
    """Load a ``resnet{depth}-*.th`` checkpoint of pytorch_resnet_cifar10 (weights only, no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise AutoExitError(f"no checkpoint at {path}")
    name = path.name.split("-")[0]
    try:
        depth = int(name.replace("resnet", ""))
    except ValueError:
        raise AutoExitError(f"cannot tell the depth from {path.name}; expected resnet<depth>-<hash>.th") from None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = cifar_resnet(depth)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise AutoExitError(f"{path.name} does not fit a CIFAR ResNet-{depth}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return model.eval()


def trained_digits_cnn(width: int = 32, epochs: int = 30, seed: int = 0, augment_shift: int = 1,
                       progress: bool = True) -> DigitsCNN:
    """A DigitsCNN trained on the backbone half of scikit-learn's digits (``load_digits("backbone", seed=seed)``),
    in eval mode. Its initial weights are drawn with ``seed`` too, so a seed gives the same network in every
    process (torch seeds its global generator at random in each new process)."""
    from .data import load_digits

    x, y = load_digits("backbone", seed=seed).dataset.tensors
    torch.manual_seed(seed)
    model = DigitsCNN(width=width)
    train_classifier(model, x, y, epochs=epochs, seed=seed, augment_shift=augment_shift, progress=progress)
    return model.eval()


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    augment_shift: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Plain supervised training (AdamW, one-cycle), used by the quickstart and the benchmark backbones. It seeds
    the batches, not ``model``'s initial weights: build the model after ``torch.manual_seed`` (as
    :func:`trained_digits_cnn` does) for a run that repeats."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="training backbone", unit="epoch", leave=False)
    t0 = time.perf_counter()
    for _ in it:
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx]
            if augment_shift:
                dx, dy = torch.randint(-augment_shift, augment_shift + 1, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    model.train_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return model


def load_backbone(spec: str | Path, weights: str | Path | None = None,
                  example_input: torch.Tensor | None = None) -> nn.Module:
    """Load a user's backbone for the CLI.

    ``spec`` is a TorchScript file (``torch.jit.save``; converted to an fx graph,
    module names are lost), a ``torch.export`` program (``.pt2``; module names
    kept), or ``package.module:factory`` naming a function that returns the
    ``nn.Module``. ``weights``: a state_dict file (or a checkpoint with a
    ``state_dict`` key), loaded with ``weights_only=True``.
    """
    import importlib
    import sys

    s = str(spec)
    path = Path(s)
    if path.suffix == ".pt2" and path.is_file():
        try:
            model = torch.export.load(str(path)).module()
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(f"cannot load the exported program {path}: {str(exc).splitlines()[0]}") from None
    elif path.is_file():
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(
                f"{path} is not a TorchScript file ({str(exc).splitlines()[0]}); give a torch.jit.save file, a "
                ".pt2 torch.export program, or module:factory with --weights"
            ) from None
        if example_input is None:
            raise AutoExitError("converting a TorchScript model needs an example input (give --data)")
        from torch._export.converter import TS2EPConverter

        try:
            model = TS2EPConverter(scripted.eval(), (example_input,)).convert().module()
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(
                f"cannot convert TorchScript model {path} to a graph: {str(exc).splitlines()[0]}; "
                "export it with torch.export (.pt2) or give module:factory instead"
            ) from None
    elif ":" in s:
        mod_name, _, fn_name = s.partition(":")
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            mod = importlib.import_module(mod_name)
            factory = getattr(mod, fn_name)
        except (ImportError, AttributeError) as exc:
            raise AutoExitError(f"cannot import {s}: {exc}; give an importable package.module:function") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise AutoExitError(f"{s} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise AutoExitError(f"no model at {s}; give a TorchScript file, a .pt2 program or package.module:factory")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise AutoExitError(f"cannot load weights {weights}: {str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise AutoExitError(f"{weights} does not hold a state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise AutoExitError(f"{weights} does not fit the model: {str(exc).splitlines()[0]}") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise AutoExitError(f"{weights} lacks {len(missing)} parameter(s) of the model, e.g. {missing[:3]}")
    return model
