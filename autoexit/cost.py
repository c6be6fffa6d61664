"""Costs of segments: FLOPs, parameters, activation sizes, local latency.

FLOPs are *true* floating-point operations counted by
``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, and
only matmul-like ops (convolutions, linear/matmul, bmm, attention) are
counted; element-wise ops (ReLU, additions, batch norm in eval, pooling) are
not. thop and the DeepSpeed profiler report MACs (multiply-accumulates);
``tests/test_cost.py`` cross-checks both against these counts
(FLOPs == 2 x MACs on conv/linear networks).

All counts are per sample (batch 1) unless stated otherwise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "SegmentCost",
    "count_flops",
    "count_params",
    "param_bytes",
    "tensor_bytes",
    "measure_latency",
    "LatencyStats",
    "compare_latency",
]


@torch.no_grad()
def count_flops(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """True FLOPs of one forward pass of ``module`` on ``example``, per sample.

    ``example`` may hold any batch size; the count is divided by it.
    """
    args = tuple(example) if isinstance(example, (list, tuple)) else (example,)
    batch = int(args[0].shape[0]) if args and args[0].dim() > 0 else 1
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(*args)
    finally:
        module.train(was_training)
    return int(round(counter.get_total_flops() / max(batch, 1)))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers (what loading the module costs in memory)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    return int(total)


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SegmentCost:
    """Cost of one segment (a backbone stage or an exit head), per sample."""

    name: str
    flops: int
    params: int
    param_bytes: int
    out_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    threads: int
    batch: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def measure_latency(
    fn,
    example: torch.Tensor,
    *,
    repeat: int = 30,
    warmup: int = 5,
    min_time_s: float = 0.0,
    threads: int | None = None,
) -> LatencyStats:
    """Time ``fn(example)`` on this CPU: ``warmup`` runs, then at least ``repeat`` timed runs.

    ``threads`` pins ``torch.set_num_threads`` for the measurement and restores it afterwards.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            fn(example)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < repeat or (time.perf_counter() - start_all) < min_time_s:
            t0 = time.perf_counter()
            fn(example)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        return LatencyStats(
            median_ms=statistics.median(times),
            p90_ms=p90,
            mean_ms=statistics.fmean(times),
            std_ms=statistics.pstdev(times) if len(times) > 1 else 0.0,
            runs=len(times),
            threads=torch.get_num_threads(),
            batch=int(example.shape[0]),
        )
    finally:
        torch.set_num_threads(old_threads)


@torch.no_grad()
def compare_latency(
    models: dict,
    inputs: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 32),
    rounds: int = 5,
    max_samples: int = 256,
    threads: int | None = 2,
    warmup: int = 2,
) -> dict[str, dict[int, LatencyStats]]:
    """Per-sample CPU latency of several models on the same real inputs, measured side by side.

    Each round runs every model over the same batches of ``inputs`` (so early
    exits happen as they would in service), alternating the models to spread
    drift and noise evenly; the median over rounds of the per-batch time,
    divided by the batch size, is reported.
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out: dict[str, dict[int, LatencyStats]] = {name: {} for name in models}
        for b in batch_sizes:
            n = min(len(inputs), max(max_samples, b) if b > 1 else min(max_samples, 64))
            n -= n % b
            if n == 0:
                continue
            batches = [inputs[i : i + b] for i in range(0, n, b)]
            for fn in models.values():
                for xb in batches[:warmup]:
                    fn(xb)
            per: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, fn in models.items():
                    t0 = time.perf_counter()
                    for xb in batches:
                        fn(xb)
                    per[name].append((time.perf_counter() - t0) * 1e3 / n)  # ms per sample
            for name, times in per.items():
                times.sort()
                out[name][b] = LatencyStats(
                    median_ms=statistics.median(times),
                    p90_ms=times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
                    mean_ms=statistics.fmean(times),
                    std_ms=statistics.pstdev(times) if len(times) > 1 else 0.0,
                    runs=rounds * len(batches),
                    threads=torch.get_num_threads(),
                    batch=b,
                )
        return out
    finally:
        torch.set_num_threads(old)
