"""Cascade heads: an exit head that also reads the earlier exits' scaled logits.

``CascadeHead(body, num_classes, num_prev)(h, prev) = body(h) + mix(log_softmax of the last
num_prev entries of prev, concatenated)``. ``mix`` starts at zero, so an untrained cascade
head is its body. Train with :func:`autoexit.distill.train_cascade_heads` (label-free, in
chain order). Used by ``MultiExitModel(..., cascade=True)``.

No ``from __future__ import annotations`` here: TorchScript needs real annotations.
"""

from typing import Final, List

import torch
from torch import nn

__all__ = ["CascadeHead"]


class CascadeHead(nn.Module):
    num_prev: Final[int]

    def __init__(self, body: nn.Module, num_classes: int, num_prev: int):
        super().__init__()
        self.body = body
        self.num_prev = int(num_prev)
        self.mix = nn.Linear(max(self.num_prev, 1) * int(num_classes), int(num_classes))
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, h: torch.Tensor, prev: List[torch.Tensor]) -> torch.Tensor:
        out = self.body(h)
        if self.num_prev > 0:
            n = len(prev)
            feats: List[torch.Tensor] = []
            for i in range(self.num_prev):
                feats.append(torch.log_softmax(prev[n - self.num_prev + i].to(out.dtype), dim=1))
            out = out + self.mix(torch.cat(feats, dim=1))
        return out
