"""Label-free training of exit heads by distillation (paper 003, 3.2.2).

Each head is trained on the recorded activations of its exit point to match
the backbone's output distribution with the KL divergence. The backbone is
frozen by construction (it is never run: training reads the cache) and each
head is trained alone, so no other head changes. When labels are given and
``supervised=True``, a cross-entropy term on the labels is added.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cost import count_flops, count_params, param_bytes
from .data import Recording
from .errors import AutoExitError, DataError
from .heads import HeadSpec, build_head, default_head_spec
from .points import ExitPoint

__all__ = ["TrainConfig", "TrainedHead", "train_head", "train_heads", "kd_loss", "agreement"]


@dataclass(frozen=True)
class TrainConfig:
    """How heads are trained. ``patience`` epochs without a better val KL stop training early."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    kd_temperature: float = 1.0
    patience: int = 8
    seed: int = 0
    supervised: bool = False
    ce_weight: float = 0.5
    threads: int | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise AutoExitError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise AutoExitError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise AutoExitError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not self.kd_temperature > 0:
            raise AutoExitError(f"TrainConfig.kd_temperature must be > 0, got {self.kd_temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainedHead:
    """A trained head with its spec, the point it reads and its cost."""

    point: ExitPoint
    spec: HeadSpec
    module: nn.Module
    flops: int
    params: int
    param_bytes: int
    val_agreement: float
    val_kl: float
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "point": self.point.name,
            "spec": self.spec.to_dict(),
            "flops": self.flops,
            "params": self.params,
            "val_agreement": self.val_agreement,
            "val_kl": self.val_kl,
            "epochs": self.epochs,
            "seconds": self.seconds,
        }


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


@torch.no_grad()
def _predict(head: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    head.eval()
    return torch.cat([head(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.new_zeros(0)


def train_head(
    head: nn.Module,
    x_train: torch.Tensor,
    t_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    t_val: torch.Tensor | None = None,
    config: TrainConfig = TrainConfig(),
    y_train: torch.Tensor | None = None,
    desc: str = "head",
    progress: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Train ``head`` to match teacher logits ``t_train`` from activations ``x_train``.

    Returns the head with the weights of its best val-KL epoch, and the per-epoch history.
    """
    if len(x_train) == 0:
        raise DataError(f"{desc}: no training samples")
    if config.supervised and y_train is None:
        raise DataError(f"{desc}: supervised training needs labels; give labelled data or supervised=False")
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        g = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x_train) / config.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
        )
        best_state, best_kl, bad = copy.deepcopy(head.state_dict()), math.inf, 0
        history: list[dict] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.epochs, desc=f"training {desc}", unit="epoch", leave=False)
        for epoch in range(config.epochs):
            head.train()
            perm = torch.randperm(len(x_train), generator=g)
            total = 0.0
            for i in range(0, len(perm), config.batch_size):
                idx = perm[i : i + config.batch_size]
                if len(idx) < 2 and len(perm) > 1:
                    continue  # a batch of one breaks batch norm
                out = head(x_train[idx])
                loss = kd_loss(out, t_train[idx], config.kd_temperature)
                if config.supervised and y_train is not None:
                    loss = (1 - config.ce_weight) * loss + config.ce_weight * F.cross_entropy(out, y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            rec = {"epoch": epoch + 1, "train_loss": total / len(perm)}
            if x_val is not None and t_val is not None and len(x_val):
                pv = _predict(head, x_val)
                kl = float(kd_loss(pv, t_val, 1.0))
                rec.update(val_kl=kl, val_agreement=agreement(pv, t_val))
                if kl < best_kl - 1e-6:
                    best_kl, bad = kl, 0
                    best_state = copy.deepcopy(head.state_dict())
                else:
                    bad += 1
            else:
                best_state = copy.deepcopy(head.state_dict())
            history.append(rec)
            if bar is not None:
                bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
                bar.update(1)
            if config.patience and bad >= config.patience:
                break
        if bar is not None:
            bar.close()
        head.load_state_dict(best_state)
        head.eval()
        return head, history
    finally:
        torch.set_num_threads(old_threads)


def train_heads(
    recording: Recording,
    specs: Mapping[str, HeadSpec] | None = None,
    config: TrainConfig = TrainConfig(),
    points: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, TrainedHead]:
    """Train one head per exit point of ``recording`` (default spec where ``specs`` gives none).

    Training reads only the cached activations and backbone logits of the train
    split; the val split selects the best epoch.
    """
    specs = dict(specs or {})
    names = list(points) if points is not None else [p.name for p in recording.points]
    unknown = sorted(set(specs) - {p.name for p in recording.points})
    if unknown:
        raise AutoExitError(
            f"head specs given for unknown exit point(s) {', '.join(unknown)}; "
            f"points are: {', '.join(p.name for p in recording.points)}"
        )
    t_train, t_val = recording.logits("train"), recording.logits("val")
    y_train = recording.labels("train") if config.supervised else None
    out: dict[str, TrainedHead] = {}
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="training heads", unit="head")
    for name in it:
        p = recording.point(name)
        spec = specs.get(name) or default_head_spec(p.shape, recording.num_classes)
        torch.manual_seed(config.seed)
        head = build_head(spec, p.shape, recording.num_classes)
        x_train, x_val = recording.activations(p, "train"), recording.activations(p, "val")
        t0 = time.perf_counter()
        head, hist = train_head(head, x_train, t_train, x_val, t_val, config, y_train, desc=name)
        seconds = time.perf_counter() - t0
        pv = _predict(head, x_val)
        out[name] = TrainedHead(
            point=p,
            spec=spec,
            module=head,
            flops=count_flops(head, x_val[:1]),
            params=count_params(head),
            param_bytes=param_bytes(head),
            val_agreement=agreement(pv, t_val),
            val_kl=float(kd_loss(pv, t_val)),
            epochs=len(hist),
            seconds=seconds,
            history=hist,
        )
        del x_train, x_val
    return out


def predict_head(head: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits of ``head`` on activations ``x`` (eval mode, no grad)."""
    return _predict(head, x, batch)
