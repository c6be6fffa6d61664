"""MultiExitModel: batch shrinking is per-sample exact; TorchScript keeps the behaviour."""

from __future__ import annotations

import numpy as np
import torch

from autoexit.calibrate import exit_score
from autoexit.model import MultiExitModel, to_torchscript


def _thresholds_between_scores(model: MultiExitModel, x: torch.Tensor) -> list[float]:
    """Per exit, a threshold halfway between two neighbouring single-sample scores near the median,
    so that some samples exit at every exit and none sits on a threshold."""
    with torch.no_grad():
        outs = model.forward_all(x)
    thr = []
    for z in outs[:-1]:
        s = np.sort(exit_score(z, model.signal).numpy())
        gaps = np.diff(s)
        lo = len(s) // 3
        j = lo + int(np.argmax(gaps[lo : 2 * len(s) // 3]))
        thr.append(float((s[j] + s[j + 1]) / 2))
    return thr


def test_batch_shrinking_matches_running_each_sample_alone(digits_result):
    model = digits_result.model
    assert model.num_exits >= 2
    x = digits_result.recording.inputs("test")[:64]
    model.set_thresholds(_thresholds_between_scores(model, x))
    scripted = to_torchscript(model, x[:1])
    with torch.no_grad():
        out, idx = model(x)
        sout, sidx = scripted(x)
        alone = [model(x[i : i + 1]) for i in range(len(x))]
    single_out = torch.cat([a[0] for a in alone])
    single_idx = torch.cat([a[1] for a in alone])
    assert torch.equal(idx, single_idx)
    assert torch.allclose(out, single_out, atol=1e-5)
    assert torch.equal(sidx, idx)
    assert torch.allclose(sout, out, atol=1e-6)
    # every exit and the backbone answered some samples, in input order
    counts = torch.bincount(idx, minlength=model.num_exits + 1)
    assert (counts[: model.num_exits] > 0).sum() >= 2
    # exited samples carry their head's scaled logits
    full = model.forward_all(x)
    for i in range(len(x)):
        e = int(idx[i])
        assert torch.allclose(out[i], full[e][i], atol=1e-5)


def test_all_samples_exit_at_first_head_skips_later_stages(digits_result):
    model = digits_result.model
    calls = []
    hook = model.segments[1].stage.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.set_thresholds([-1.0] + [float("inf")] * (model.num_exits - 1))
        x = digits_result.recording.inputs("test")[:16]
        with torch.no_grad():
            _, idx = model(x)
        assert (idx == 0).all() and not calls
    finally:
        hook.remove()
        model.set_thresholds(digits_result.subset.thresholds.thresholds.tolist())


def test_empty_batch_and_bad_configuration():
    import pytest

    from autoexit.errors import AutoExitError

    stages = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)]
    heads = [torch.nn.Linear(4, 3)]
    m = MultiExitModel(stages, heads, num_classes=3)
    out, idx = m(torch.zeros(0, 4))
    assert out.shape == (0, 3) and idx.shape == (0,)
    with pytest.raises(AutoExitError, match="stages"):
        MultiExitModel(stages, heads + heads, num_classes=3)
    with pytest.raises(AutoExitError, match="temperatures"):
        MultiExitModel(stages, heads, temperatures=[0.0], num_classes=3)


def test_scripted_backbone_reproduces_the_backbone_and_latency_compares_like_for_like(digits_result):
    from autoexit.model import scripted_backbone

    r = digits_result
    sb = scripted_backbone(r.backbone)
    assert isinstance(sb, torch.jit.ScriptModule)
    x = r.recording.inputs("test")[:32]
    with torch.no_grad():
        out, idx = sb(x)
        ref = r.backbone.model(x)
    assert torch.equal(out, ref) and bool((idx == 0).all())  # no exits: every answer is the backbone's
    lat = r.measure_latency(batch_sizes=(1,), rounds=1)
    ms = lat["per_sample_ms"]
    assert set(ms) == {"backbone", "early_exit", "backbone (eager)", "backbone (optimized)", "early_exit (optimized)"}
    assert lat["ratio"]["1"] == ms["early_exit"]["1"] / ms["backbone"]["1"]
    assert lat["ratio_optimized"]["1"] == ms["early_exit (optimized)"]["1"] / ms["backbone (optimized)"]["1"]
    assert lat["ratio_deployed"]["1"] == ms["early_exit (optimized)"]["1"] / ms["backbone"]["1"]
    assert lat["optimized_decisions_match"] == 1.0 and lat["optimized_mode"] == "onednn"
    assert "TorchScript" in lat["baseline"]
    assert set(r.measure_latency(batch_sizes=(1,), rounds=1, optimized=False)["per_sample_ms"]) == {
        "backbone", "early_exit", "backbone (eager)"}


def test_optimized_runtime_decides_as_the_plain_model(digits_result):
    """optimize_for_runtime (what load(optimize=True) and the evaluator's optimize run): same exits, same
    answers up to rounding, every exported method kept, batch norms folded, the scripted model untouched."""
    import pytest

    from autoexit.errors import AutoExitError
    from autoexit.model import optimize_for_runtime

    r = digits_result
    scripted = to_torchscript(r.model, r.backbone.example_input)
    n_params = len(list(scripted.parameters()))
    fast = optimize_for_runtime(scripted)
    x = r.recording.inputs("test")
    with torch.no_grad():
        ref, ref_idx = scripted(x)
        out, idx = fast(x)
        assert torch.equal(idx, ref_idx)
        assert torch.allclose(out, ref, atol=1e-4)
        assert 0 < int((ref_idx < r.model.num_exits).sum()) < len(x)  # the batch shrinks, and not to nothing
        assert fast.thresholds() == scripted.thresholds()
        for name in ("forward_all", "exit_scores"):
            for a, b in zip(getattr(fast, name)(x[:16]), getattr(scripted, name)(x[:16]), strict=True):
                assert torch.allclose(a, b, atol=1e-4), name
    assert "aten::batch_norm" in str(scripted.inlined_graph)
    assert "aten::batch_norm" not in str(fast.graph)  # folded into the convolutions
    if torch.backends.mkldnn.is_available():
        assert "mkldnn" in str(fast.graph).lower()
    assert len(list(scripted.parameters())) == n_params > 0  # the caller's module is not frozen in place
    frozen = optimize_for_runtime(scripted, "freeze")  # folded, but no oneDNN layouts (tiny models, batch 1)
    with torch.no_grad():
        assert torch.equal(frozen(x)[1], ref_idx)
    assert "aten::batch_norm" not in str(frozen.graph) and "mkldnn" not in str(frozen.graph).lower()
    with pytest.raises(AutoExitError, match="needs a TorchScript module .* script it first"):
        optimize_for_runtime(r.model)
    with pytest.raises(AutoExitError, match="optimize mode must be one of onednn, freeze, got 'fast'"):
        optimize_for_runtime(scripted, "fast")
