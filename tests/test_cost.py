"""FLOPs: analytic values, and the cross-check against MAC counters (thop, DeepSpeed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoexit.cost import count_flops, count_params, measure_latency


def _convnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(1), nn.Linear(32 * 8 * 8, 10, bias=False),
    ).eval()


def _analytic_macs():
    return 3 * 16 * 9 * 16 * 16 + 16 * 32 * 9 * 8 * 8 + 32 * 8 * 8 * 10


def test_flops_are_two_per_multiply_add_and_per_sample():
    m = _convnet()
    assert count_flops(m, torch.randn(1, 3, 16, 16)) == 2 * _analytic_macs()
    assert count_flops(m, torch.randn(7, 3, 16, 16)) == 2 * _analytic_macs()
    assert count_params(m) == 3 * 16 * 9 + 16 * 32 * 9 + 2048 * 10


def test_cross_check_with_thop_macs():
    thop = pytest.importorskip("thop")
    m = _convnet()
    x = torch.randn(1, 3, 16, 16)
    macs, _ = thop.profile(m, inputs=(x,), verbose=False)
    assert count_flops(m, x) == pytest.approx(2 * macs, rel=0.01)


def test_cross_check_with_deepspeed_profiler():
    pytest.importorskip("deepspeed")
    from deepspeed.profiling.flops_profiler import get_model_profile

    m = _convnet()
    flops, macs, _ = get_model_profile(m, input_shape=(1, 3, 16, 16), print_profile=False, as_string=False)
    assert macs == _analytic_macs()
    assert count_flops(m, torch.randn(1, 3, 16, 16)) == 2 * macs
    # DeepSpeed also counts element-wise ops (ReLU), FlopCounterMode does not
    assert flops >= 2 * macs


def test_latency_stats_are_sane():
    m = _convnet()
    s = measure_latency(m, torch.randn(4, 3, 16, 16), repeat=5, warmup=1, threads=1)
    assert s.runs >= 5 and s.median_ms > 0 and s.p90_ms >= s.median_ms * 0.5 and s.batch == 4
