"""Exit points and stages: equivalence with the backbone, skip connections, untraceable models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import SkipNet

from autoexit.errors import TraceError
from autoexit.heads import build_head, default_head_spec
from autoexit.model import MultiExitModel, to_torchscript
from autoexit.points import TracedBackbone, find_exit_points


def _multi_exit(model, example, granularity="auto"):
    tb = TracedBackbone(model, example)
    pts = tb.candidates(granularity)
    assert pts, "expected exit points"
    heads = [build_head(default_head_spec(p.shape, tb.num_classes), p.shape, tb.num_classes).eval() for p in pts]
    return tb, pts, MultiExitModel(tb.split([p.node for p in pts]), heads, num_classes=tb.num_classes).eval()


@pytest.mark.parametrize(
    "builder,shape",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)),
        (SkipNet, (3, 16, 16)),
    ],
    ids=["resnet18", "mobilenet_v2", "skipnet"],
)
def test_no_exit_taken_reproduces_backbone_exactly(builder, shape):
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(5, *shape)
    tb, pts, mm = _multi_exit(model, x[:1])
    with torch.no_grad():
        ref = model(x)
        out, exit_index = mm(x)
        scripted = to_torchscript(mm, x[:1])
        sout, sidx = scripted(x)
    assert torch.equal(out, ref)
    assert torch.equal(sout, ref)
    assert (exit_index == len(pts)).all() and (sidx == len(pts)).all()
    # forward_all's last output is the backbone's
    assert torch.equal(mm.forward_all(x)[-1], ref)


def test_skip_connection_blocks_are_not_exit_points():
    model = SkipNet().eval()
    tb = TracedBackbone(model, torch.randn(1, 3, 16, 16))
    names = [p.name for p in tb.candidates(1)]
    # block1 and block2 outputs are crossed by the stem->add skip; stem and block3 are not
    assert "block1" not in names and "block2" not in names
    assert "stem" in names and "block3" in names
    with pytest.raises(TraceError, match="skip connection"):
        tb.candidates(include=["block1"])
    # the shape of each point is recorded without the batch dimension
    assert tb.candidates(include=["block3"])[0].shape == (16, 16, 16)


def test_points_are_ordered_and_drop_the_tail():
    model = torchvision.models.resnet18(num_classes=10).eval()
    pts = find_exit_points(model, torch.randn(1, 3, 64, 64), granularity=2, min_remaining=0.1)
    fractions = [p.depth_fraction for p in pts]
    assert fractions == sorted(fractions)
    assert all(p.flops_after >= 0.1 * (p.flops_before + p.flops_after) for p in pts)
    assert all(p.flops_before > 0 for p in pts)
    nodes = {p.node for p in find_exit_points(model, torch.randn(1, 3, 64, 64), granularity="node", min_remaining=0.1)}
    assert {p.node for p in pts} <= nodes


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow inside a submodule
            return x.relu()
        return x


class WithUntraceableBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
        self.gate = Gate()
        self.b = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
        self.c = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
        self.out = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.c(self.b(self.gate(self.a(x)))))


def test_untraceable_top_level_gives_one_line_error():
    with pytest.raises(TraceError) as exc:
        TracedBackbone(DataDependent(), torch.randn(1, 4))
    msg = str(exc.value)
    assert "\n" not in msg
    assert "DataDependent.forward" in msg and "h.sum() > 0" in msg and "leaf_modules" in msg


def test_untraceable_submodule_becomes_an_opaque_leaf():
    model = WithUntraceableBlock().eval()
    x = torch.randn(6, 8)
    tb = TracedBackbone(model, x[:1])
    assert tb.auto_leaves == ["gate"]
    pts = tb.candidates(1)
    assert [p.name for p in pts][:2] == ["gate", "b"]  # "a" and the FLOP-free gate collapse into one point
    h = x
    with torch.no_grad():
        for st in tb.split([p.node for p in pts]):
            h = st(h)
        assert torch.equal(h, model(x))


def test_unknown_point_and_bad_granularity_are_rejected():
    tb = TracedBackbone(SkipNet().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(TraceError, match="valid points include"):
        tb.candidates(include=["nope"])
    with pytest.raises(TraceError, match="granularity"):
        tb.candidates("coarse")
    with pytest.raises(TraceError, match="leaf_modules names"):
        TracedBackbone(SkipNet(), torch.randn(1, 3, 16, 16), leaf_modules=["missing"])


def test_non_classifier_output_is_rejected():
    class Features(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(TraceError, match="logits"):
        TracedBackbone(Features(), torch.randn(1, 3, 8, 8))


def test_exported_program_is_accepted():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    tb, pts, mm = _multi_exit(gm, x[:1])
    assert [p.name for p in pts][:2] == ["maxpool", "layer1"]
    with torch.no_grad():
        assert torch.equal(mm(x)[0], model(x))


class ShapeBranch(torch.nn.Module):
    """fx cannot trace the top-level shape-dependent branch; torch.export can."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[-1] > 8:  # input-size dependent, not data dependent
            x = torch.nn.functional.avg_pool2d(x, 2)
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


def test_top_level_shape_branch_falls_back_to_torch_export():
    model = ShapeBranch().eval()
    x = torch.randn(4, 3, 16, 16)
    tb, pts, mm = _multi_exit(model, x[:1], granularity=1)
    assert [p.name for p in pts] == ["stem", "block1"]
    with torch.no_grad():
        assert torch.equal(mm(x)[0], model(x))
