"""Training of exit gates (:class:`~autoexit.policies.rules.GateRule`), label-free by default.

A gate at exit k learns to predict "head k predicts the backbone's class"
(``target="agree"``, the default) from the head's scaled logits, the previous
exits' scaled logits and cheap statistics of the activation. That target is
computed from the backbone's logits only: labels are never read, so the gate can
be trained on unlabelled inference data.

``target="harmless"`` is the labelled variant, for the labelled risks (``harm``,
``drop``): the gate predicts "letting the sample out here costs no accuracy",
i.e. *not* (head k wrong and the backbone right). Where the backbone is wrong an
exit costs nothing, so this target also counts those samples as safe to let out.
It reads the labels of the split it is trained on.

Train a gate on data the risk guarantee does not rest on (the pipeline uses the
train split; calibration uses val).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import AutoExitError
from .rules import GateRule, gate_features, num_gate_features

__all__ = ["GATE_TARGETS", "GateConfig", "train_gate", "gate_target", "fit_gate_features"]

GATE_TARGETS = ("agree", "harmless")


def _check_target(target: str) -> None:
    if target not in GATE_TARGETS:
        raise AutoExitError(f"unknown gate target {target!r}; use one of: {', '.join(GATE_TARGETS)}")


@dataclass(frozen=True)
class GateConfig:
    """hidden: MLP width (0 = logistic regression); history: previous exits the gate reads;
    onehot: add the predicted class; act_stats: add the activation's mean and std;
    target: what the gate predicts, ``"agree"`` (the head gives the backbone's class; label-free) or
    ``"harmless"`` (not: the head wrong and the backbone right; reads the labels)."""

    hidden: int = 16
    history: int = 2
    onehot: bool = True
    act_stats: bool = True
    steps: int = 100
    lr: float = 1.0
    weight_decay: float = 1e-2
    seed: int = 0
    target: str = "agree"

    def __post_init__(self):
        if self.hidden < 0 or self.history < 0 or self.steps < 1 or not self.lr > 0:
            raise AutoExitError(f"invalid gate config {self}: hidden, history >= 0; steps >= 1; lr > 0")
        _check_target(self.target)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_gate_features(z: torch.Tensor, prev: Sequence[torch.Tensor], stats: torch.Tensor | None,
                      config: GateConfig) -> torch.Tensor:
    """Raw features for a gate of ``config`` (same function as the scripted rule)."""
    if stats is None:
        stats = torch.zeros(z.shape[0], 2)
    return gate_features(z.float(), [p.float() for p in prev], stats.float(), config.history, config.onehot,
                         config.act_stats)


def gate_target(z: torch.Tensor, backbone_logits: torch.Tensor, target: str = "agree",
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """[n] float 0/1: what a gate of ``target`` learns to predict for each sample (see the module doc).
    ``labels`` are read only by ``"harmless"``, which needs them."""
    _check_target(target)
    pred, bpred = z.argmax(1), backbone_logits.argmax(1)
    if target == "agree":
        return (pred == bpred).float()
    if labels is None:
        raise AutoExitError("gate target 'harmless' needs the labels of the split the gate is trained on; give "
                            "labelled data or use target='agree' (label-free)")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != z.shape[0]:
        raise AutoExitError(f"gate target 'harmless' needs one label per sample ({z.shape[0]}), got "
                            f"{labels.shape[0]}")
    return (~((pred != labels) & (bpred == labels))).float()


def train_gate(z: torch.Tensor, prev: Sequence[torch.Tensor], stats: torch.Tensor | None,
               backbone_logits: torch.Tensor, config: GateConfig = GateConfig(),
               labels: torch.Tensor | None = None) -> GateRule:
    """Gate for one exit from its scaled logits ``z`` [n, C], earlier exits' scaled logits (oldest first),
    activation statistics [n, 2] (or None) and the backbone's logits [n, C]; ``labels`` [n] are read only with
    ``config.target == "harmless"`` (the default target reads the backbone's logits alone)."""
    if z.dim() != 2 or backbone_logits.shape != z.shape:
        raise AutoExitError(f"gate training needs head and backbone logits of the same shape [n, C], got "
                            f"{tuple(z.shape)} and {tuple(backbone_logits.shape)}")
    if z.shape[0] < 10:
        raise AutoExitError(f"gate training needs at least 10 samples, got {z.shape[0]}; give more inference data")
    target = gate_target(z, backbone_logits, config.target, labels)
    feats = fit_gate_features(z, prev, stats, config)
    nf = feats.shape[1]
    assert nf == num_gate_features(z.shape[1], config.history, config.onehot, config.act_stats)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        gate = GateRule(nf, config.hidden, config.history, config.onehot, config.act_stats)
    finally:
        torch.random.set_rng_state(gen_state)
    mean = feats.mean(0)
    std = feats.std(0).clamp(min=1e-4)
    gate.mean.copy_(mean)
    gate.std.copy_(std)
    x = (feats - mean) / std
    # a gate for an exit that always (or never) agrees: constant score, nothing to learn
    pos = float(target.mean())
    gate.train()
    if 0.0 < pos < 1.0:
        params = list(gate.net.parameters())
        weights = [p for p in params if p.dim() > 1]
        opt = torch.optim.LBFGS(params, lr=config.lr, max_iter=config.steps, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(gate.net(x).squeeze(1), target)
            loss = loss + config.weight_decay * sum((w * w).sum() for w in weights)
            loss.backward()
            return loss

        opt.step(closure)
    gate.eval()
    for p in gate.parameters():
        p.requires_grad_(False)
    return gate
