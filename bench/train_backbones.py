"""Train the Fashion-MNIST benchmark backbones (rerunnable; weights cached outside the repository).

Two small classifiers for 28x28 grey images, trained with labels on the 60,000
Fashion-MNIST training images (Debian ``dataset-fashion-mnist``:
``apt-get install -y dataset-fashion-mnist``), a few epochs on the CPU:

- ``fmnist_resnet``: a CIFAR-style ResNet-14 (3x3 stem, three stages of two
  basic blocks, 8/16/32 channels, strides 1/2/2, global average pool, linear;
  about 10 MFLOPs per image).
- ``fmnist_mobilenetv2``: torchvision's MobileNetV2 (inverted residual blocks) at
  width 0.5 with a 1-channel stride-1 stem, an inverted-residual setting for
  28x28 inputs (28 -> 14 -> 7) and a 256-channel last conv (about 10 MFLOPs).

The benchmark's inference data is the Fashion-MNIST *test* set (10,000 images),
which the backbones never see in training. Weights go to
``~/.cache/autoexit/backbones/<name>.pt`` (``$AUTOEXIT_CACHE/backbones``) with a
``<name>.json`` of how they were trained; an existing file is reused unless
``--force``.

Usage: ``python bench/train_backbones.py [--models fmnist_resnet fmnist_mobilenetv2] [--epochs 4] [--force]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BACKBONES = ("fmnist_resnet", "fmnist_mobilenetv2")
DEFAULT_EPOCHS = 3


# ---------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """ResNet-14 for 1x28x28 inputs: stem, layer1..3 (two basic blocks each), pool, linear."""

    def __init__(self, widths=(8, 16, 32), blocks=(2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1)
                                          for j in range(n)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def fashion_mobilenetv2(num_classes: int = 10) -> nn.Module:
    """torchvision MobileNetV2 adapted to 1x28x28: 1-channel stride-1 stem, two stride-2 stages (28 -> 7)."""
    from torchvision.models import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    setting = [  # t, c, n, s (channels before the 0.5 width multiplier)
        [1, 16, 1, 1],
        [6, 24, 2, 2],   # 14x14
        [6, 32, 3, 2],   # 7x7
        [6, 64, 2, 1],
        [6, 96, 1, 1],
    ]
    model = MobileNetV2(num_classes=num_classes, width_mult=0.5, inverted_residual_setting=setting)
    stem = model.features[0].out_channels
    model.features[0] = Conv2dNormActivation(1, stem, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
    last = 256  # torchvision's 1280-channel last conv would be most of the FLOPs at 7x7
    model.features[-1] = Conv2dNormActivation(model.features[-1][0].in_channels, last, kernel_size=1,
                                              norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
    model.classifier[-1] = nn.Linear(last, num_classes)
    return model


def build(name: str) -> nn.Module:
    if name == "fmnist_resnet":
        return FashionResNet()
    if name == "fmnist_mobilenetv2":
        return fashion_mobilenetv2()
    raise SystemExit(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")


# ---------------------------------------------------------------------------------------------- data
def fmnist_available() -> bool:
    return (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() and (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def require_fmnist() -> None:
    if not fmnist_available():
        print(f"skipping: Fashion-MNIST is not at {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")
        sys.exit(0)


def fmnist(part: str = "test"):
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) as autoexit InferenceData in [0, 1], with labels."""
    from autoexit.data import load_idx

    prefix = "train" if part == "train" else "t10k"
    return load_idx(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")


# ---------------------------------------------------------------------------------------------- cache
def backbone_dir() -> Path:
    from autoexit.data import default_cache_dir

    return default_cache_dir() / "backbones"


def load_backbone(name: str, train_if_missing: bool = True, epochs: int = DEFAULT_EPOCHS) -> nn.Module:
    """The trained backbone ``name`` (eval mode), training it first when no cached weights exist."""
    path = backbone_dir() / f"{name}.pt"
    if not path.is_file():
        if not train_if_missing:
            raise SystemExit(f"no trained {name} at {path}; run python bench/train_backbones.py")
        train(name, epochs=epochs)
    model = build(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(name: str, epochs: int = DEFAULT_EPOCHS, seed: int = 0, lr: float = 3e-3, batch_size: int = 128) -> dict:
    """Train ``name`` on the Fashion-MNIST training set and cache it; returns the training record."""
    from autoexit.cost import count_flops
    from autoexit.zoo import train_classifier

    require_fmnist()
    torch.manual_seed(seed)
    tr, te = fmnist("train"), fmnist("test")
    x, y = tr.dataset.tensors
    xt, yt = te.dataset.tensors
    model = build(name)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment_shift=2,
                     progress=True)
    seconds = time.perf_counter() - t0
    info = {
        "name": name, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "optimizer": "AdamW + one-cycle (autoexit.zoo.train_classifier), random 2-pixel shifts",
        "train_images": len(x), "train_seconds": seconds, "threads": torch.get_num_threads(),
        "test_accuracy": accuracy(model, xt, yt),
        "params": sum(p.numel() for p in model.parameters()),
        "flops": count_flops(model, xt[:1]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    d = backbone_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(d / f"{name}.pt")
    (d / f"{name}.json").write_text(json.dumps(info, indent=1))
    print(f"{name}: test accuracy {100 * info['test_accuracy']:.2f} %, {info['flops'] / 1e6:.1f} MFLOPs, "
          f"trained {seconds / 60:.1f} min -> {d / (name + '.pt')}", flush=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--force", action="store_true", help="retrain even when cached weights exist")
    args = ap.parse_args(argv)
    require_fmnist()
    torch.set_num_threads(2)
    for name in args.models:
        path = backbone_dir() / f"{name}.pt"
        if path.is_file() and not args.force:
            meta = backbone_dir() / f"{name}.json"
            info = json.loads(meta.read_text()) if meta.is_file() else {}
            print(f"{name}: cached at {path} (test accuracy {100 * info.get('test_accuracy', float('nan')):.2f} %); "
                  "--force retrains")
            continue
        train(name, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
