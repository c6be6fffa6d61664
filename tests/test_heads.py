"""HeadSpec round trips and the head zoo builds, runs and scripts for every kind and shape."""

from __future__ import annotations

import pytest
import torch

from autoexit.cost import count_flops
from autoexit.errors import AutoExitError
from autoexit.heads import CONV_KINDS, HEAD_PRESETS, HeadSpec, build_head, default_head_spec, preset_head_spec


@pytest.mark.parametrize("conv", ["none", *sorted(CONV_KINDS)])
@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_every_conv_kind_builds_runs_and_scripts(conv, kernel):
    spec = HeadSpec(conv=conv, kernel=kernel, conv_layers=0 if conv == "none" else 2, conv_width=24,
                    stride=2, pool="avg2", fc_layers=3, fc_width=32)
    assert HeadSpec.from_json(spec.to_json()) == spec
    head = build_head(spec, (16, 15, 15), 7).eval()
    x = torch.randn(3, 16, 15, 15)
    out = head(x)
    assert out.shape == (3, 7)
    assert torch.allclose(torch.jit.script(head)(x), out, atol=1e-6)
    assert count_flops(head, x) > 0


@pytest.mark.parametrize("shape,pool", [((12, 20), "mean"), ((12, 20), "cls"), ((40,), "avg"), ((4, 3, 2, 2), "avg")])
def test_tokens_vectors_and_other_ranks(shape, pool):
    spec = HeadSpec(conv="none", conv_layers=0, pool=pool, fc_layers=2, fc_width=16)
    head = build_head(spec, shape, 5)
    assert head(torch.randn(2, *shape)).shape == (2, 5)


def test_default_specs_are_small_next_to_the_backbone():
    for shape in [(64, 56, 56), (16, 32, 32), (197, 768), (512,)]:
        spec = default_head_spec(shape, 10)
        head = build_head(spec, shape, 10)
        assert head(torch.randn(2, *shape)).shape == (2, 10)
    assert default_head_spec((64, 56, 56), 10).stride == 2


@pytest.mark.parametrize("shape", [(16, 32, 32), (64, 8, 8), (197, 64), (512,)])
def test_every_preset_builds_runs_and_scripts_for_every_rank(shape):
    x = torch.randn(3, *shape)
    for name in HEAD_PRESETS:
        head = build_head(preset_head_spec(name, shape, 10), shape, 10).eval()
        assert head(x).shape == (3, 10)
        assert torch.allclose(torch.jit.script(head)(x), head(x), atol=1e-6)


def test_cheap_preset_is_sdns_head_and_a_fraction_of_the_default():
    shape = (16, 32, 32)  # ResNet-20's first stage
    spec = preset_head_spec("cheap", shape, 10)
    head = build_head(spec, shape, 10)
    # no conv: a 2x2 average pool, then one linear layer from the pooled map to the classes
    assert [type(m).__name__ for m in head] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert head[2].in_features == 16 * 4
    x = torch.randn(1, *shape)
    cheap = count_flops(head, x)
    default = count_flops(build_head(default_head_spec(shape, 10), shape, 10), x)
    assert 0 < cheap < 0.01 * default
    with pytest.raises(AutoExitError, match="unknown head preset 'tiny'; use one of: default, cheap"):
        preset_head_spec("tiny", shape, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"conv": "fancy"}, "conv 'fancy'"), ({"kernel": 4}, "kernel"), ({"conv_layers": 3}, "conv_layers"),
     ({"fc_layers": 0}, "fc_layers"), ({"pool": "sum"}, "pool"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_specs_are_rejected(kwargs, match):
    with pytest.raises(AutoExitError, match=match):
        HeadSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_fields_and_bad_json():
    with pytest.raises(AutoExitError, match="unknown HeadSpec field"):
        HeadSpec.from_dict({"conv": "standard", "kernal": 3})
    with pytest.raises(AutoExitError, match="malformed"):
        HeadSpec.from_json("{conv:")
    with pytest.raises(AutoExitError, match="2 classes"):
        build_head(HeadSpec(), (4, 4, 4), 1)
