"""The emitted artifact: round trip with torch.jit.load alone, tampering detected, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import autoexit
from autoexit.artifact import write_artifact
from autoexit.errors import ArtifactError, AutoExitError


@pytest.fixture(scope="module")
def artifact(digits_result, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "artifact"
    return digits_result.emit(out, latency=False)


def test_round_trip_with_torch_jit_load_alone(digits_result, artifact):
    x = digits_result.recording.inputs("test")[:200]
    loaded = torch.jit.load(str(artifact / "model.pt"))
    with torch.no_grad():
        out, idx = loaded(x)
        ref, ref_idx = digits_result.model(x)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(out, ref, atol=1e-6)
    art = autoexit.load(artifact)
    assert art.exit_names == digits_result.kept
    m = art.manifest
    assert m["backbone"]["hash"] == digits_result.backbone.hash
    assert [e["threshold"] for e in m["exits"]] == pytest.approx(digits_result.subset.thresholds.thresholds.tolist())
    assert {"model.pt", "report.html", "report.json"} <= set(m["files"])
    html = (artifact / "report.html").read_text()
    assert html.count("<img") >= 3 and "test" in html
    rep = json.loads((artifact / "report.json").read_text())
    assert rep["metrics"]["test"]["n"] == digits_result.metrics["test"]["n"]


def test_load_optimized_takes_the_same_exits(digits_result, artifact):
    plain = autoexit.load(artifact)
    fast = autoexit.load(artifact, optimize=True)
    assert fast.optimized == "onednn" and plain.optimized is None
    assert autoexit.load(artifact, optimize="freeze").optimized == "freeze"
    with pytest.raises(AutoExitError, match="optimize must be true, false or one of onednn, freeze, got 'fast'"):
        autoexit.load(artifact, optimize="fast")
    x = digits_result.recording.inputs("test")
    with torch.no_grad():
        ref, ref_idx = plain(x)
        out, idx = fast(x)
    assert torch.equal(idx, ref_idx) and torch.allclose(out, ref, atol=1e-4)
    assert fast.model.thresholds() == plain.model.thresholds()


def test_inspect_prints_the_latency_emit_measured(digits_result, tmp_path, capsys):
    from autoexit.cli import main

    lat = digits_result.measure_latency(batch_sizes=(1,), rounds=1)
    out = digits_result.emit(tmp_path / "timed", latency=True, report=False)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"CPU latency vs the backbone (TorchScript): batch 1: {lat['ratio']['1']:.2f}x" in text
    assert (f"optimised (autoexit.load(path, optimize='onednn')) vs the plain backbone: batch 1: "
            f"{lat['ratio_deployed']['1']:.2f}x") in text


def _copy(artifact, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_tampered_model_is_rejected(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    data = bytearray((dst / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt .*checksum") as exc:
        autoexit.load(dst)
    assert "\n" not in str(exc.value)


def test_tampered_manifest_and_missing_files_are_rejected(artifact, tmp_path):
    dst = _copy(artifact, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["exits"][0]["threshold"] = 0.0
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="modified"):
        autoexit.load(dst)
    dst2 = _copy(artifact, tmp_path / "b")
    (dst2 / "report.html").unlink()
    with pytest.raises(ArtifactError, match="missing report.html"):
        autoexit.load(dst2)
    (dst2 / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        autoexit.load(dst2)
    with pytest.raises(ArtifactError, match="not an autoexit artifact"):
        autoexit.load(tmp_path / "nowhere")


def test_existing_directory_is_not_overwritten_by_default(digits_result, artifact):
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(ArtifactError, match="already exists"):
        digits_result.emit(artifact, latency=False)
    assert (artifact / "manifest.json").read_text() == before


def test_failed_write_leaves_nothing_behind(tmp_path):
    def boom(path):
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "out", {"backbone": {}, "exits": []}, {"model.pt": boom})
    assert list(tmp_path.iterdir()) == []


def test_onnx_segments_match_the_model(digits_result, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = digits_result.emit(tmp_path / "with-onnx", latency=False, report=False, onnx=True)
    art = autoexit.load(out)
    files = sorted(f for f in art.manifest["files"] if f.endswith(".onnx"))
    k = digits_result.model.num_exits
    assert len(files) == 2 * k + 1
    x = digits_result.recording.inputs("test")[:7]
    with torch.no_grad():
        ref = digits_result.model.forward_all(x)
    h = x.numpy()
    for i in range(k + 1):
        h = ort.InferenceSession(str(out / f"onnx/stage{i}.onnx")).run(None, {"x": h})[0]
        if i < k:
            z = ort.InferenceSession(str(out / f"onnx/head{i}.onnx")).run(None, {"x": h})[0]
            t = art.manifest["exits"][i]["temperature"]
            assert torch.allclose(torch.from_numpy(z) / t, ref[i], atol=1e-4)
    assert torch.allclose(torch.from_numpy(h), ref[-1], atol=1e-4)
