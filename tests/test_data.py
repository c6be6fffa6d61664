"""Loaders, the recording cache, the split, and bad data rejected in one line with nothing left behind."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from autoexit.data import (
    as_inference_data,
    load_idx,
    load_image_folder,
    load_tensors,
    record,
    split_indices,
)
from autoexit.errors import DataError
from autoexit.pipeline import EnableConfig, enable
from autoexit.points import TracedBackbone
from autoexit.zoo import DigitsCNN


def _backbone():
    torch.manual_seed(0)
    return DigitsCNN(width=8).eval()


def _points(tb):
    return tb.candidates(1)


def test_split_is_seeded_disjoint_and_50_20_30():
    s = split_indices(1000, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [500, 200, 300]
    allidx = torch.cat(list(s.values()))
    assert len(set(allidx.tolist())) == 1000
    assert torch.equal(split_indices(1000, seed=3)["val"], s["val"])
    assert not torch.equal(split_indices(1000, seed=4)["val"], s["val"])


def test_recording_is_cached_and_reused(tmp_path):
    x = torch.rand(120, 1, 8, 8)
    tb = TracedBackbone(_backbone(), x[:1])
    pts = _points(tb)
    r1 = record(tb, pts, x, cache_dir=tmp_path, progress=False)
    r2 = record(tb, pts, x, cache_dir=tmp_path, progress=False)
    assert not r1.reused and r2.reused and r1.path == r2.path
    with torch.no_grad():
        assert torch.allclose(r2.logits(), tb.model(x), atol=1e-5)
        act = tb.split([pts[0].node])[0](x)
    assert torch.allclose(r2.activations(pts[0]), act, atol=1e-6)
    assert r2.labels() is None
    assert torch.equal(r2.inputs("val"), x[r2.splits["val"]])
    # the first few of a split, read without the rest (what latency costs time on)
    assert torch.equal(r2.inputs("train", first=5), x[r2.splits["train"][:5]])
    assert torch.equal(r2.inputs("test", first=10_000), x[r2.splits["test"]])
    assert torch.equal(r2.inputs(first=3), x[:3])
    # other data -> another cache entry
    r3 = record(tb, pts, x + 0.1, cache_dir=tmp_path, progress=False)
    assert r3.path != r1.path


def _no_leftovers(path):
    return not any(p.name.startswith(".") for p in path.iterdir()) if path.exists() else True


@pytest.mark.parametrize(
    "data,match",
    [
        (torch.rand(30, 1, 8, 8), "at least 50"),
        (torch.rand(0, 1, 8, 8), "no samples|at least 50"),
    ],
)
def test_too_little_data(tmp_path, data, match):
    with pytest.raises(DataError, match=match) as exc:
        enable(_backbone(), data, tolerance=1.0, cache_dir=str(tmp_path), progress=False)
    assert "\n" not in str(exc.value)
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("shape", [(60, 3, 8, 8), (60, 1, 1, 1), (60, 64)])
def test_wrong_shape_or_channels(tmp_path, shape):
    with pytest.raises(DataError) as exc:
        enable(_backbone(), torch.rand(*shape), tolerance=1.0, cache_dir=str(tmp_path), progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "shape" in msg
    assert _no_leftovers(tmp_path)


class NaNAfterStem(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = DigitsCNN(width=8)

    def forward(self, x):
        return self.net(x)


def test_nan_activations_are_rejected_and_nothing_is_left(tmp_path):
    model = _backbone()
    x = torch.rand(80, 1, 8, 8)
    x[70] = float("nan")
    with pytest.raises(DataError, match="NaN") as exc:
        enable(model, x, tolerance=1.0, cache_dir=str(tmp_path), progress=False)
    assert "exit point" in str(exc.value) or "output" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "art"
    assert not out.exists()


def _write_idx(path, arr: np.ndarray, code=0x08):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes())


def test_idx_loader(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (70, 28, 28)).astype(np.uint8)
    labels = np.arange(70) % 10
    _write_idx(tmp_path / "images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "labels-idx1-ubyte.gz", labels.astype(np.uint8))
    d = load_idx(tmp_path / "images-idx3-ubyte.gz", tmp_path / "labels-idx1-ubyte.gz")
    x, y = d.dataset.tensors
    assert x.shape == (70, 1, 28, 28) and float(x.max()) <= 1.0
    assert torch.equal(y, torch.tensor(labels))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02garbage"))
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(tmp_path / "bad.gz")


def test_image_folder_loader(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3)).astype(np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_image_folder(tmp_path, size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert len(d) == 60 and d.class_names == ["cat", "dog"]
    x, y = d.dataset[45]
    assert x.shape == (3, 8, 8) and y == 1 and float(x.min()) >= -1.0
    assert d.labels.tolist() == [0] * 30 + [1] * 30
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_tensor_files_load_without_unpickling_code(tmp_path):
    torch.save({"x": torch.rand(60, 1, 8, 8), "y": torch.arange(60) % 10}, tmp_path / "d.pt")
    d = load_tensors(tmp_path / "d.pt")
    assert len(d) == 60 and d.labels.tolist()[:3] == [0, 1, 2]

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="cannot load"):
        load_tensors(tmp_path / "evil.pt")
    with pytest.raises(DataError, match="unsupported data"):
        as_inference_data(42)
    with pytest.raises(DataError, match="labels"):
        as_inference_data(torch.rand(60, 3), torch.arange(59))


def test_bad_config_values_are_rejected():
    from autoexit.errors import AutoExitError

    with pytest.raises(AutoExitError, match="tolerance"):
        EnableConfig(tolerance=0)
    with pytest.raises(AutoExitError, match="unknown setting"):
        EnableConfig.from_dict({"tolerence": 1})
    with pytest.raises(AutoExitError, match="head 'tiny' is not a preset; use one of: default, cheap"):
        EnableConfig(head="tiny")
    with pytest.raises(AutoExitError, match="head must be a HeadSpec or a preset name"):
        EnableConfig(head=3)
    with pytest.raises(AutoExitError, match="unknown HeadSpec field"):
        EnableConfig.from_dict({"head": {"pol": "avg"}})


def test_head_presets_round_trip_through_the_config():
    from autoexit.heads import HeadSpec

    for head in ("cheap", "default", HeadSpec(pool="max"), None):
        cfg = EnableConfig(head=head)
        assert EnableConfig.from_dict(cfg.to_dict()).head == head


def test_head_preset_gives_every_point_its_spec_and_head_specs_still_win(digits_backbone):
    """``head="cheap"`` becomes each point's cheap spec for its own shape; a point named in ``head_specs`` keeps
    that one; ``default`` leaves the per-point default to the trainer (no spec) or gives it explicitly."""
    from autoexit.heads import HeadSpec, cheap_head_spec, default_head_spec
    from autoexit.pipeline import _specs_for
    from autoexit.points import find_exit_points

    pts = find_exit_points(digits_backbone, torch.rand(1, 1, 8, 8), granularity=1)
    assert len(pts) >= 2
    mine = HeadSpec(conv="standard", pool="max", fc_layers=1)
    specs = _specs_for(pts, EnableConfig(head="cheap", head_specs={pts[0].name: mine}), 10)
    assert specs[pts[0].name] == mine
    assert all(specs[p.name] == cheap_head_spec(p.shape, 10) for p in pts[1:])
    assert all(specs[p.name].pool == "avg2" and specs[p.name].fc_layers == 1 for p in pts[1:])
    assert all(_specs_for(pts, EnableConfig(head="default"), 10)[p.name] == default_head_spec(p.shape, 10)
               for p in pts)
