"""Generality: exit points exist and the no-exit multi-exit model reproduces the backbone bit for bit.

The default run checks a fast subset of torchvision builders on small inputs
(64x64; ViT-B/16 is built for 64x64 through its ``image_size`` argument, random
weights); ``-m slow`` sweeps every classification builder at 224x224 as
``bench/generality.py`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generality import FAST_SUBSET, build, builders, check_builder, check_model  # noqa: E402


@pytest.mark.parametrize("name", FAST_SUBSET)
def test_fast_subset_has_points_and_reproduces_the_backbone(name):
    model = build(name, size=64, num_classes=10)
    res = check_model(model, size=64)
    assert res["reason"] is None, res["reason"]
    assert res["n_points"] >= 2, res["points"]
    assert res["equal"] and res["all_backbone"]
    assert res["max_abs_diff"] == 0.0


def test_check_model_reports_a_model_that_cannot_be_traced():
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow: neither fx nor torch.export can capture it
                return x.flatten(1)[:, :3]
            return x.flatten(1)[:, 3:6]

    res = check_model(Untraceable(), size=8)
    assert not res["ok"]
    assert res["reason"].startswith("trace: TraceError")


def test_check_model_reports_no_points():
    res = check_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)), size=8)
    assert not res["ok"] and res["reason"] == "no exit points"


def test_every_builder_is_listed():
    names = builders()
    assert set(FAST_SUBSET) <= set(names)
    assert len(names) >= 70


@pytest.mark.slow
@pytest.mark.parametrize("name", builders())
def test_every_torchvision_builder(name):
    res = check_builder(name)
    assert res["ok"], f"{name}: {res['reason']}"
