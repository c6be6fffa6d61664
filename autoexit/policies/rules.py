"""Scriptable exit rules: what a segment of ``MultiExitModel`` computes to decide that a sample leaves.

A rule is an ``nn.Module`` with ``forward(z, prev, h) -> score`` where ``z`` is
the exit head's temperature-scaled logits ``[n, C]``, ``prev`` the scaled logits
of the earlier exits of the deployed cascade for the same samples (oldest
first; only the last ``history`` are kept by the model) and ``h`` the backbone
activation at the exit point. A sample exits when ``score >= threshold``.
Rules work row by row, so a sample's score never depends on the rest of the
batch: the same module scores recorded predictions (in
:mod:`autoexit.policies.cascade`) and runs inside the TorchScript model, and
the two agree sample by sample.

- :class:`ConfidenceRule`: max softmax, margin or normalised-entropy confidence
  (``autoexit.calibrate.exit_score``).
- :class:`PatienceRule`: how many of the previous exits, counted back from the
  most recent, predict the same class, plus the confidence (in [0, 1]) as a
  tie-break: ``run + confidence``. A threshold of 2.9 means "the two previous
  exits agree and confidence >= 0.9".
- :class:`GateRule`: a tiny learned model (standardised features -> MLP ->
  sigmoid: the estimated probability that "this exit agrees with the backbone")
  on cheap features of the head's logits, the previous exits' logits and the
  activation.

Every built-in score is >= 0 (a threshold below 0 lets every sample exit).

This file does not use ``from __future__ import annotations``: TorchScript needs
real annotations.
"""

import math
from typing import Final, List

import torch
from torch import nn

from ..calibrate import exit_score

__all__ = ["ExitRule", "ConfidenceRule", "PatienceRule", "GateRule", "gate_features", "activation_stats",
           "num_gate_features"]

TOPK = 3  # top probabilities a gate reads (literal 3 inside scripted code)


class ExitRule(nn.Module):
    """Base class (documentation only): ``forward(z, prev, h) -> score [n]``; higher = exit sooner."""

    history: Final[int]

    def __init__(self, history: int = 0):
        super().__init__()
        self.history = int(history)

    def forward(self, z: torch.Tensor, prev: List[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ConfidenceRule(ExitRule):
    """Score = ``exit_score(z, signal)`` (0 max softmax, 1 margin, 2 entropy)."""

    signal: Final[int]

    def __init__(self, signal: int = 0):
        super().__init__(0)
        self.signal = int(signal)

    def forward(self, z: torch.Tensor, prev: List[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return exit_score(z, self.signal)


class PatienceRule(ExitRule):
    """Score = (consecutive most recent previous exits predicting this exit's class, at most ``history``)
    + confidence of this exit (``signal``, in [0, 1])."""

    signal: Final[int]

    def __init__(self, history: int = 2, signal: int = 0):
        super().__init__(history)
        self.signal = int(signal)

    def forward(self, z: torch.Tensor, prev: List[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        pred = z.argmax(dim=1)
        run = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
        alive = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        n = len(prev)
        for j in range(self.history):
            if j < n:
                same = prev[n - 1 - j].argmax(dim=1) == pred
                alive = alive & same
                run = run + alive.to(torch.float32)
        conf = torch.clamp(exit_score(z, self.signal), 0.0, 1.0).to(torch.float32)
        return run + conf


def activation_stats(h: torch.Tensor) -> torch.Tensor:
    """[n, 2]: mean and standard deviation of each sample's activation (all non-batch dims)."""
    f = h.reshape(h.shape[0], -1).to(torch.float32)
    mean = f.mean(dim=1)
    std = (f - mean.unsqueeze(1)).pow(2).mean(dim=1).sqrt()
    return torch.stack([mean, std], dim=1)


def num_gate_features(num_classes: int, history: int, onehot: bool, act_stats: bool) -> int:
    k = min(TOPK, num_classes)
    return k + 3 + 3 * history + (num_classes if onehot else 0) + (2 if act_stats else 0)


def gate_features(z: torch.Tensor, prev: List[torch.Tensor], stats: torch.Tensor, history: int, onehot: bool,
                  act_stats: bool) -> torch.Tensor:
    """Raw gate features of each row (see :class:`GateRule`); ``stats`` is :func:`activation_stats` of h."""
    z = z.to(torch.float32)
    c = z.shape[1]
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    k = min(3, c)
    top = torch.topk(p, k, dim=1).values
    pred = z.argmax(dim=1)
    ent = -(p * logp).sum(dim=1) / math.log(float(c))
    cols: List[torch.Tensor] = [top, (top[:, 0] - top[:, 1]).unsqueeze(1), ent.unsqueeze(1),
                                logp.max(dim=1).values.clamp(min=-30.0).unsqueeze(1)]
    n = len(prev)
    for j in range(history):
        if j < n:
            q = torch.softmax(prev[n - 1 - j].to(torch.float32), dim=1)
            same = (q.argmax(dim=1) == pred).to(torch.float32)
            q_at = q.gather(1, pred.unsqueeze(1)).squeeze(1)
            cols.append(torch.stack([same, q_at, q.max(dim=1).values], dim=1))
        else:
            cols.append(torch.zeros(z.shape[0], 3, dtype=torch.float32, device=z.device))
    if onehot:
        cols.append(torch.nn.functional.one_hot(pred, c).to(torch.float32))
    if act_stats:
        cols.append(stats.to(torch.float32))
    return torch.cat(cols, dim=1)


class GateRule(ExitRule):
    """Learned exit gate: ``sigmoid(MLP((features - mean) / std))``, an estimate of P(this exit agrees with
    the backbone).

    Features of each sample: the exit's top-3 softmax probabilities, margin,
    normalised entropy and log max-probability; for each of the last ``history``
    previous exits, whether it predicts the same class, the probability it gives
    that class and its own max probability (zeros where the cascade has no such
    exit); optionally the predicted class one-hot and the activation's mean and
    standard deviation. Build it with :func:`autoexit.policies.gate.train_gate`.
    """

    onehot: Final[bool]
    act_stats: Final[bool]

    def __init__(self, num_features: int, hidden: int = 16, history: int = 2, onehot: bool = True,
                 act_stats: bool = True):
        super().__init__(history)
        self.onehot = bool(onehot)
        self.act_stats = bool(act_stats)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(num_features, 1))

    def score_features(self, f: torch.Tensor) -> torch.Tensor:
        """Estimated probability (float32, in [0, 1]) that the exit agrees with the backbone."""
        return torch.sigmoid(self.net((f - self.mean) / self.std).squeeze(1).to(torch.float32))

    def forward(self, z: torch.Tensor, prev: List[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        if self.act_stats:
            stats = activation_stats(h)
        else:
            stats = torch.zeros(z.shape[0], 2, dtype=torch.float32, device=z.device)
        f = gate_features(z, prev, stats, self.history, self.onehot, self.act_stats)
        return self.score_features(f)
