"""Evaluator pieces that need no server: protocol, cache, timing engine, LocalEvaluator, config."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from autoexit.errors import AutoExitError
from autoexit.evaluator import (
    DeviceRegistry,
    LatencyResult,
    LatencyStats,
    LocalEvaluator,
    MeasureSettings,
    RemoteEvaluator,
    block_head_latencies_s,
    evaluator_from_config,
    prepare_model,
    segment_profile,
)
from autoexit.evaluator import protocol as P
from autoexit.evaluator.cache import ResultCache
from autoexit.evaluator.measure import MeasureTimeout, time_callable

# one thread: timings stay sane when other jobs share the CPU (no OpenMP barrier stalls)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAST = MeasureSettings(warmup=1, repeat=5, min_repeat_ms=5.0, timeout_s=60, threads=1)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


class TwoExit(nn.Module):
    """Per-sample exit: samples with x[:, 0] > 0 leave at exit 0 (cheap); the rest run a costly body."""

    def __init__(self, width: int = 256, depth: int = 6):
        super().__init__()
        self.head0 = nn.Linear(16, 4)
        self.inp = nn.Linear(16, width)
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.head1 = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        easy = x[:, 0] > 0
        logits = self.head0(x)
        idx = torch.zeros(x.shape[0], dtype=torch.long)
        if bool(easy.all()):
            return logits, idx
        hard = ~easy
        deep = self.head1(self.body(self.inp(x[hard])))
        logits[hard] = deep
        idx[hard] = 1
        return logits, idx


# --------------------------------------------------------------------------- protocol


def test_client_protocol_and_cli_import_without_fastapi():
    """The core package must work without the ``device`` extra: block fastapi & co like uninstalled."""
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'pydantic', 'starlette', 'httpx', 'onnxruntime'):\n"
        "    sys.modules[m] = None  # import -> ImportError, as if not installed\n"
        "import argparse, autoexit.evaluator as ev, autoexit.evaluator.cli as c\n"
        "from autoexit.errors import MissingExtraError\n"
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers())\n"
        "ev.LocalEvaluator(); ev.RemoteEvaluator('http://127.0.0.1:1')\n"
        "try:\n"
        "    import autoexit.evaluator.server\n"
        "except MissingExtraError as e:\n"
        "    assert \"autoexit[device]\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('server imported without fastapi')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_validation_is_one_line_and_names_the_field():
    with pytest.raises(AutoExitError, match=r"settings.repeat must be in \[1,"):
        MeasureSettings(repeat=0)
    with pytest.raises(AutoExitError, match="unknown settings"):
        MeasureSettings.from_dict({"repeats": 3})
    with pytest.raises(AutoExitError, match="accelerator"):
        MeasureSettings(accelerator="tpu")
    with pytest.raises(AutoExitError, match="finite"):
        MeasureSettings(min_repeat_ms=float("nan"))
    s = MeasureSettings.quick(repeat=7)
    assert s.repeat == 7 and MeasureSettings.from_dict(s.to_dict()) == s
    assert "timeout_s" not in s.key_dict()  # the timeout does not change a measurement
    for bad in ("yes", 1, None):
        with pytest.raises(AutoExitError, match="settings.optimize must be true, false or one of onednn, freeze"):
            MeasureSettings(optimize=bad)
    assert MeasureSettings.from_dict({"optimize": "freeze"}).to_dict()["optimize"] == "freeze"
    # optimize is left out of the wire form when false (evaluators older than it refuse unknown settings)
    assert "optimize" not in MeasureSettings().to_dict()
    opt = MeasureSettings(optimize=True)
    assert opt.to_dict()["optimize"] is True and MeasureSettings.from_dict(opt.to_dict()) == opt
    assert opt.key_dict() != MeasureSettings().key_dict()  # an optimised timing is cached apart


def test_batch_sizes_and_inputs_are_checked():
    assert P.check_batch_sizes([1, 8]) == (1, 8)
    assert P.check_batch_sizes(4) == (4,)
    for bad in ([], [0], [1, 1], [True], ["2"]):
        with pytest.raises(AutoExitError):
            P.check_batch_sizes(bad)
    with pytest.raises(AutoExitError, match="over this evaluator's limit"):
        P.check_inputs([P.TensorSpec((3, 1024, 1024))], [64], max_elements=1 << 20)


def test_stats_match_numpy_percentiles():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    st = LatencyStats.from_samples(2, xs, number=10)
    assert st.median_ms == pytest.approx(float(np.median(xs)))
    assert st.p90_ms == pytest.approx(float(np.percentile(xs, 90)))
    assert st.p99_ms == pytest.approx(float(np.percentile(xs, 99)))
    assert st.std_ms == pytest.approx(float(np.std(xs)))
    assert st.runs == 70 and st.repeat == 7 and st.min_ms == 1.0 and st.max_ms == 9.0
    assert st.cv == pytest.approx(st.std_ms / st.mean_ms)


def test_result_round_trip():
    st = LatencyStats.from_samples(1, [1.0, 2.0], 3, exit_counts={0: 5, 2: 1})
    res = LatencyResult(
        kind="model", format="onnx", model_sha256="a" * 64, cache_key="b" * 64,
        device=P.collect_device_info("x"), settings=MeasureSettings(), stats=(st,), threads=2,
    )
    back = LatencyResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    assert back.exit_counts == {0: 5, 2: 1}
    assert back.at(1).exit_rates == {0: 5 / 6, 2: 1 / 6}
    with pytest.raises(AutoExitError, match="no timings for batch size 4"):
        back.at(4)
    with pytest.raises(AutoExitError, match="malformed"):
        LatencyResult.from_dict({"kind": "model"})


def test_device_info_and_fingerprint():
    a = P.collect_device_info("rpi4")
    assert a.key == "rpi4" and a.cores >= 1 and a.machine and a.torch
    b = P.collect_device_info("rpi4")
    assert a.fingerprint() == b.fingerprint()
    assert P.collect_device_info("jetson").fingerprint() != a.fingerprint()


def test_model_digest_is_stable_across_traces_but_tells_models_apart():
    m = small_cnn()
    a = prepare_model(m, input_shapes=(3, 16, 16))
    b = prepare_model(m, torch.randn(2, 3, 16, 16))  # another trace, other batch, other values
    assert a.digest == b.digest and a.data != b.data
    assert a.inputs == (P.TensorSpec((3, 16, 16)),)
    other = prepare_model(small_cnn().apply(lambda mod: None), input_shapes=(3, 16, 16))
    assert other.digest == a.digest  # same seed, same weights
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert prepare_model(m, input_shapes=(3, 16, 16)).digest != a.digest
    key = lambda s: P.cache_key("model", a.digest, P.request_meta("torchscript", a.inputs, [1], s), "dev")  # noqa: E731
    assert key(FAST) == key(FAST.with_(timeout_s=5)) != key(FAST.with_(repeat=6))


def test_torch_save_pickles_are_refused_without_unpickling(tmp_path):
    sd = tmp_path / "weights.pt"
    torch.save(small_cnn().state_dict(), sd)
    with pytest.raises(AutoExitError, match="torch.save checkpoint"):
        prepare_model(sd, input_shapes=(3, 16, 16))
    with pytest.raises(AutoExitError, match="pickle"):
        P.check_torchscript_archive(b"\x80\x04K\x01.")


# --------------------------------------------------------------------------- cache


def test_cache_persists_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    c = ResultCache(path)
    c.put("a" * 64, {"x": 1, "cached": False})
    with open(path, "a") as fh:
        fh.write('{"v": 1, "key": "bbbb')  # a crash mid-write
    c2 = ResultCache(path)
    assert c2.get("a" * 64) == {"x": 1} and c2.skipped_lines == 1
    c2.put("c" * 64, {"y": 2})
    c3 = ResultCache(path)
    assert c3.get("c" * 64) == {"y": 2} and len(c3) == 2


# --------------------------------------------------------------------------- timing engine


def test_time_callable_grows_number_until_groups_fill_min_repeat_ms():
    calls = []
    s = MeasureSettings(warmup=2, repeat=4, number=1, min_repeat_ms=20.0)
    samples, number = time_callable(lambda: calls.append(1), s)
    assert len(samples) == 4 and number > 100  # a no-op needs many calls per group
    for ms in samples:
        assert ms * number >= 20.0 * 0.999  # each kept group lasted >= min_repeat_ms
    assert len(calls) >= 2 + 4 * number


def test_torchscript_gets_the_warm_up_its_profiling_executor_needs():
    """A TorchScript model optimises its graph on its 2nd call: that call is never timed, even with
    settings.warmup=0 (the first call of a job is untimed already: warmed_up=1)."""
    from autoexit.evaluator.measure import OnnxRunner, TorchScriptRunner

    def untimed_calls(min_warmup: int, warmup: int) -> int:
        calls: list[float] = []
        s = MeasureSettings(warmup=warmup, repeat=1, number=1, min_repeat_ms=0.0)
        time_callable(lambda: calls.append(1), s, warmed_up=1, min_warmup=min_warmup)
        return len(calls) - 1  # the one timed call

    assert TorchScriptRunner.min_warmup == 2 and OnnxRunner.min_warmup == 0
    assert untimed_calls(TorchScriptRunner.min_warmup, warmup=0) == 1  # + the job's first call = 2
    assert untimed_calls(OnnxRunner.min_warmup, warmup=0) == 0
    assert untimed_calls(TorchScriptRunner.min_warmup, warmup=5) == 4  # settings above the floor win


def test_time_callable_honours_deadline():
    import time

    s = MeasureSettings(warmup=0, repeat=1000, min_repeat_ms=10.0, timeout_s=0.2)
    with pytest.raises(MeasureTimeout) as ei:
        time_callable(lambda: time.sleep(0.001), s, deadline=time.monotonic() + 0.2)
    assert ei.value.status == 408 and "timeout_s" in str(ei.value)


# --------------------------------------------------------------------------- local evaluator


def test_local_measure_module_and_cache(tmp_path):
    cache = tmp_path / "local.jsonl"
    ev = LocalEvaluator(cache_file=cache)
    res = ev.measure(small_cnn(), input_shapes=(3, 16, 16), batch_sizes=(1, 4), settings=FAST)
    assert res.batch_sizes == (1, 4) and res.kind == "model" and res.format == "torchscript"
    for st in res.stats:
        assert 0 < st.min_ms <= st.median_ms <= st.p90_ms <= st.p99_ms <= st.max_ms
        assert st.repeat == 5 and st.runs == 5 * st.number and len(st.samples_ms) == 5
    assert res.device.key == "local" and res.threads >= 1 and not res.cached
    again = LocalEvaluator(cache_file=cache).measure(small_cnn(), torch.randn(1, 3, 16, 16), batch_sizes=(1, 4),
                                                     settings=FAST)
    assert again.cached and again.stats == res.stats


def test_local_onnx_and_segments():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ev = LocalEvaluator()
    m = small_cnn()
    res = ev.measure(m, input_shapes=(3, 16, 16), batch_sizes=(1, 3), settings=FAST, format="onnx")
    assert res.format == "onnx" and res.at(3).median_ms > 0
    segs = ev.measure_segments(
        {"stage0": (m[:2], (3, 16, 16)), "head0": (m[2:], torch.randn(1, 8, 16, 16))},
        batch_sizes=(1, 2),
        settings=FAST,
    )
    assert list(segs) == ["stage0", "head0"]
    assert all(r.kind == "segment" for r in segs.values())
    prof = segment_profile(segs, batch_size=2)
    assert set(prof) == {"stage0", "head0"} and all(v > 0 for v in prof.values())
    ck, cb = block_head_latencies_s(segs, ["stage0", "head0"], ["head0", None], batch_size=2)
    assert ck == (segs["stage0"].at(2).p99_ms / 1e3, segs["head0"].at(2).p99_ms / 1e3)
    assert cb == (segs["head0"].at(2).p99_ms / 1e3, 0.0)
    with pytest.raises(AutoExitError, match=r"no measurement for segment\(s\) \['stage1'\]"):
        block_head_latencies_s(segs, ["stage1"], [None])
    with pytest.raises(AutoExitError, match="stat must be"):
        segment_profile(segs, stat="runs")


def test_local_end_to_end_counts_exits_and_early_exits_are_faster():
    torch.manual_seed(0)
    model = torch.jit.script(TwoExit().eval())
    ev = LocalEvaluator()
    x = torch.randn(24, 16)
    x[:, 0] = torch.tensor([1.0] * 15 + [-1.0] * 9)
    res = ev.measure_end_to_end(model, x, batch_sizes=(1, 4), settings=FAST)
    assert res.at(1).exit_counts == {0: 15, 1: 9}
    assert res.at(4).batches_per_run == 6 and sum(res.at(4).exit_counts.values()) == 24
    easy = x.clone()
    easy[:, 0] = 1.0
    hard = x.clone()
    hard[:, 0] = -1.0
    t_easy = ev.measure_end_to_end(model, easy, settings=FAST)
    t_hard = ev.measure_end_to_end(model, hard, settings=FAST)
    assert t_easy.exit_counts == {0: 24} and t_hard.exit_counts == {1: 24}
    assert t_hard.median_ms > 1.5 * t_easy.median_ms


def test_local_optimized_end_to_end_takes_the_same_exits():
    """settings.optimize times the model as autoexit.load(optimize=True) runs it: same exits, recorded."""
    torch.manual_seed(0)
    model = torch.jit.script(TwoExit().eval())
    x = torch.randn(24, 16)
    x[:, 0] = torch.tensor([1.0] * 15 + [-1.0] * 9)
    res = LocalEvaluator().measure_end_to_end(model, x, batch_sizes=(1, 4), settings=FAST.with_(optimize=True))
    assert res.at(1).exit_counts == {0: 15, 1: 9} and sum(res.at(4).exit_counts.values()) == 24
    assert res.settings.optimize is True and res.at(1).median_ms > 0


def test_local_errors_are_one_line(tmp_path):
    ev = LocalEvaluator()
    with pytest.raises(AutoExitError, match=r"failed on input\(s\) \[1, 5, 16, 16\]") as ei:
        ev.measure(small_cnn(), input_shapes=(5, 16, 16), settings=FAST)
    assert "\n" not in str(ei.value)
    with pytest.raises(AutoExitError, match="example_inputs .* or input_shapes"):
        ev.measure(small_cnn())
    with pytest.raises(AutoExitError, match="returns \\(logits, exit_index\\)"):
        ev.measure_end_to_end(torch.jit.script(nn.Linear(16, 4)), torch.randn(4, 16), settings=FAST)
    with pytest.raises(AutoExitError, match="larger than the 4 input samples"):
        ev.measure_end_to_end(torch.jit.script(TwoExit()), torch.randn(4, 16), batch_sizes=(8,))
    with pytest.raises(AutoExitError, match="does not exist"):
        ev.measure(tmp_path / "nope.onnx", input_shapes=(3,))


# --------------------------------------------------------------------------- config


def test_evaluator_from_config(tmp_path):
    assert isinstance(evaluator_from_config(None), LocalEvaluator)
    local = evaluator_from_config({"settings": {"repeat": 3}, "device_key": "me"})
    assert isinstance(local, LocalEvaluator) and local.settings.repeat == 3 and local.device_key == "me"
    tok = tmp_path / "tok"
    tok.write_text("abc\n")
    remote = evaluator_from_config({"url": "http://127.0.0.1:8765/", "token_file": str(tok), "retries": 1})
    assert isinstance(remote, RemoteEvaluator) and remote.url == "http://127.0.0.1:8765" and remote._token == "abc"
    reg_ev = evaluator_from_config({"devices": {"a": "http://h1:8765", "b": {"url": "http://h2:8765"}}}, device="b")
    assert isinstance(reg_ev, RemoteEvaluator) and reg_ev.url == "http://h2:8765" and reg_ev.expected_key == "b"
    with pytest.raises(AutoExitError, match="choose one"):
        evaluator_from_config({"devices": {"a": "http://h1:8765", "b": "http://h2:8765"}})
    with pytest.raises(AutoExitError, match="unknown evaluator option"):
        evaluator_from_config({"url": "http://h:1", "tokn": "x"})
    with pytest.raises(AutoExitError, match="http:// or https://"):
        RemoteEvaluator("h:8765")
    with pytest.raises(AutoExitError, match="unknown device 'c'"):
        DeviceRegistry({"a": "http://h1:8765"})["c"]
    assert math.isfinite(LocalEvaluator().info().cores)


def test_real_multi_exit_model_end_to_end_and_segments():
    """The seam with the core: time autoexit's own MultiExitModel end to end and per segment."""
    zoo = pytest.importorskip("autoexit.zoo")
    heads_mod = pytest.importorskip("autoexit.heads")
    model_mod = pytest.importorskip("autoexit.model")
    points = pytest.importorskip("autoexit.points")
    torch.manual_seed(0)
    tb = points.TracedBackbone(zoo.DigitsCNN(width=8).eval(), torch.randn(1, 1, 8, 8))
    pts = tb.candidates("auto")[:2]
    heads = [heads_mod.build_head(heads_mod.default_head_spec(p.shape, tb.num_classes), p.shape,
                                  tb.num_classes).eval() for p in pts]
    stages = tb.split([p.node for p in pts])
    x = torch.randn(32, 1, 8, 8)
    ev = LocalEvaluator()
    for thr, expect_exit in ((0.0, 0), (float("inf"), len(heads))):  # everyone leaves at exit 0 / no one exits
        mem = model_mod.MultiExitModel(stages, heads, thresholds=[thr] * len(heads),
                                       num_classes=tb.num_classes).eval()
        res = ev.measure_end_to_end(model_mod.to_torchscript(mem, x[:2]), x, batch_sizes=(1, 4), settings=FAST)
        assert res.at(1).exit_counts == {expect_exit: 32} and res.at(4).exit_counts == {expect_exit: 32}
    segs, h = {}, x[:1]
    for i, st in enumerate(stages):
        segs[f"stage{i}"] = (st, h)
        with torch.no_grad():
            h = st(h)
        if i < len(heads):
            segs[f"head{i}"] = (heads[i], h)
    res = ev.measure_segments(segs, settings=FAST)
    ck, cb = block_head_latencies_s(res, [f"stage{i}" for i in range(len(stages))],
                                    [f"head{i}" for i in range(len(heads))] + [None])
    assert len(ck) == len(stages) and all(v > 0 for v in ck) and cb[-1] == 0.0 and all(v > 0 for v in cb[:-1])


def test_digest_is_the_same_for_a_module_scripted_again_in_the_same_process():
    """TorchScript writes a class's first script into code/.../model.py with its module's other classes and a
    later (mangled) script of it into its own model/___torch_mangle_N.py; the digest (the cache key) must not
    see that, or a model re-scripted for a second timing misses the cache. Other weights still change it.
    Run in a fresh process, so that the first script really is the first."""
    import subprocess
    import sys

    code = """
import torch
from autoexit.evaluator.client import prepare_model
from autoexit.model import MultiExitModel, scripted_backbone, to_torchscript
from autoexit.points import TracedBackbone
from autoexit.zoo import DigitsCNN
torch.manual_seed(0)
tb = TracedBackbone(DigitsCNN().eval(), torch.randn(2, 1, 8, 8))
first = prepare_model(scripted_backbone(tb), end_to_end=True).digest
again = prepare_model(scripted_backbone(tb), end_to_end=True).digest
rebuilt = prepare_model(to_torchscript(MultiExitModel(tb.split([]), [], num_classes=tb.num_classes),
                                      tb.example_input), end_to_end=True).digest
other = TracedBackbone(DigitsCNN().eval(), torch.randn(2, 1, 8, 8))
print(first == again, first == rebuilt, prepare_model(scripted_backbone(other), end_to_end=True).digest != first)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True"]
