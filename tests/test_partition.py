"""Partitioned early-exit models on the digits pipeline: profiling, plans, modules, artifact, runtime, validation.

The runtime tests start real processes (one per partition) on loopback and check
that every sample's result equals the unpartitioned multi-exit model's.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoexit import perfmodel as pm
from autoexit.errors import ArtifactError, AutoExitError

ROOT = Path(__file__).resolve().parents[1]
IIOT = ROOT / "experiments" / "topologies" / "iiot.yaml"
N_RUN = 96  # samples sent through the processes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice


class _Never:
    """An evaluator that fails if asked to measure anything (proves a profile came from the cache)."""

    device_key = "local"

    def measure_segments(self, *a, **k):
        raise AssertionError("the cached profile should have been used")


@pytest.fixture(scope="module")
def topo():
    return pm.Topology.from_yaml(IIOT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("partition-cache")


@pytest.fixture(scope="module")
def profile(digits_result, cache):
    from autoexit.partition import profile_result

    return profile_result(digits_result, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def mid_threshold(profile):
    """A confidence threshold at which every partition of the artifacts below answers some samples."""
    return profile.thresholds["confidence"][17]


@pytest.fixture(scope="module")
def art2(digits_result, profile, topo, mid_threshold, tmp_path_factory):
    from autoexit.partition import make_plan

    plan = make_plan(profile, partitions=[2, profile.n_blocks], placement=["pi", "global_cloud"],
                     threshold=mid_threshold, topology=topo)
    from autoexit.partition import emit_partitioned

    return emit_partitioned(digits_result, plan, tmp_path_factory.mktemp("a2") / "art", profile=profile,
                            measure=False, progress=False)


@pytest.fixture(scope="module")
def art3(digits_result, profile, topo, mid_threshold, tmp_path_factory):
    """Three partitions, a non-consecutive placement, two exits inside the middle partition."""
    from autoexit.partition import emit_partitioned, make_plan

    plan = make_plan(profile, partitions=[1, 4, profile.n_blocks], placement=["pi", "local_cloud", "micro_dc"],
                     exits=[[1], [2, 4], [profile.n_blocks]], threshold=mid_threshold, topology=topo)
    return emit_partitioned(digits_result, plan, tmp_path_factory.mktemp("a3") / "art", profile=profile,
                            measure=True, progress=False)


def _reference(art_path, x, batch):
    from autoexit.artifact import load

    art = load(art_path)
    with torch.no_grad():
        outs = [art.model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# --------------------------------------------------------------------------- profiling


def test_profile_from_result(digits_result, profile, cache):
    from autoexit.partition import Components, exit_arrays, profile_result

    names = Components.from_result(digits_result).names
    assert list(profile.block_names) == [*names, "output"]
    shapes = [digits_result.heads[n].point.shape for n in names]
    assert list(profile.output_bits) == [32.0 * math.prod(s) for s in shapes] + [32.0 * 10]
    assert profile.input_bits == 32.0 * 64
    assert all(t > 0 for t in profile.block_time_s) and profile.head_time_s[-1] == 0.0
    assert all(t > 0 for t in profile.head_time_s[:-1])
    for c in ("confidence", "entropy"):
        rates = profile.rates(c)
        assert rates.shape == (20, profile.n_blocks)
        np.testing.assert_allclose(rates.sum(1), 1.0)
    # entropy T = 0: nobody exits early; confidence T = 0: everybody leaves at the first exit
    assert profile.rates("entropy")[0, -1] == pytest.approx(1.0)
    assert profile.rates("confidence")[0, 0] == pytest.approx(1.0)
    arr = exit_arrays(digits_result, "val")
    np.testing.assert_allclose(profile.head_accuracy, arr["correct"].mean(1))
    assert profile.meta["split"] == "val" and profile.meta["accuracy"] == "gt"
    # profiling once per backbone + data: the second call reads the JSON cache and measures nothing
    again = profile_result(digits_result, cache_dir=cache, evaluator=_Never(), progress=False)
    assert again.block_time_s == profile.block_time_s and again.exit_rates == profile.exit_rates
    assert len(list((Path(cache) / "profiles").glob("profile-*.json"))) == 1


# --------------------------------------------------------------------------- modules vs the unpartitioned model


@pytest.mark.parametrize("case", ["end-exits", "inner-exits-entropy", "trimmed"])
def test_partitions_equal_unpartitioned_model(digits_result, profile, topo, case):
    from autoexit.partition import build_partitions, build_reference, make_plan, run_chain

    n = profile.n_blocks
    if case == "end-exits":
        plan = make_plan(profile, partitions=[2, 4, n], threshold=profile.thresholds["confidence"][16])
    elif case == "inner-exits-entropy":
        plan = make_plan(profile, partitions=[3, n], exits=[[1, 3], [4, n]], criterion="entropy",
                         threshold=profile.thresholds["entropy"][6])
    else:
        plan = make_plan(profile, partitions=[1, 3], exits=[[1], [2, 3]], threshold=0.95)
        assert plan.trimmed
    parts = build_partitions(digits_result, plan)
    ref = build_reference(digits_result, plan)
    x = digits_result.recording.inputs("test")[:400]
    run = run_chain(parts, x, batch_size=50)
    with torch.no_grad():
        outs = [ref(x[i:i + 50]) for i in range(0, len(x), 50)]
    ref_logits, ref_exit = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert torch.equal(run["exit_index"], ref_exit)
    assert torch.equal(run["logits"], ref_logits)
    counts = np.bincount(run["exit_index"].numpy(), minlength=plan.n_exits)
    assert counts.sum() == len(x) and (counts[:-1] > 0).any()
    owner = np.asarray(plan.exit_owner())
    assert np.array_equal(owner[run["exit_index"].numpy()], run["partition"].numpy())
    # every exit rule matches the profile's semantics sample by sample (scores computed the same way)
    from autoexit.partition import Components, _plan_metrics, exit_arrays

    sim = _plan_metrics(plan, exit_arrays(digits_result, "test"), Components.from_result(digits_result))
    full = run_chain(parts, digits_result.recording.inputs("test"), batch_size=256)
    real = np.bincount(full["exit_index"].numpy(), minlength=plan.n_exits) / len(full["exit_index"])
    np.testing.assert_allclose(real, sim["exit_rates"], atol=2.5e-3)


def test_partition_module_contract(digits_result, profile):
    from autoexit.partition import FORWARD, build_partitions, make_plan

    n = profile.n_blocks
    plan = make_plan(profile, partitions=[2, n], threshold=2.0)  # confidence never reaches 2: all forwarded
    first, last = build_partitions(digits_result, plan)
    x = digits_result.recording.inputs("test")[:7]
    logits, exit_index, feats = first(x)
    assert exit_index.tolist() == [FORWARD] * 7 and torch.count_nonzero(logits) == 0
    shape = digits_result.heads[profile.block_names[1]].point.shape
    assert tuple(feats.shape) == (7, *shape)
    z, e, rest = last(feats)
    assert e.tolist() == [plan.n_exits - 1] * 7 and rest.numel() == 0
    with torch.no_grad():
        assert torch.allclose(z, digits_result.backbone.model(x), atol=1e-5)
    assert first.exit_ids() == [0] and last.exit_ids() == [1]
    plan0 = make_plan(profile, partitions=[2, n], threshold=0.0)  # everyone exits at block 2
    first0 = build_partitions(digits_result, plan0)[0]
    _, e0, f0 = first0(x)
    assert e0.tolist() == [0] * 7 and tuple(f0.shape) == (0, *shape)


# --------------------------------------------------------------------------- the artifact and its placement plan


def test_placement_plan_is_consistent(art3, profile, topo):
    from autoexit.partition import load_partitioned, score_threshold

    art, info = load_partitioned(art3)
    parts = info["partitions"]
    assert [p["tier"] for p in parts] == ["pi", "local_cloud", "micro_dc"]  # non-consecutive
    assert [p["tier_index"] for p in parts] == [topo.tier_index(p["tier"]) for p in parts]
    assert parts[0]["blocks"][0] == 1 and parts[-1]["blocks"][1] == profile.n_blocks
    for a, b in zip(parts, parts[1:]):
        assert b["blocks"][0] == a["blocks"][1] + 1
        assert a["output"]["shape"] == b["input"]["shape"]
        assert a["next"] == {"partition": b["index"], "tier": b["tier"]}
    assert parts[-1]["output"] is None and parts[-1]["next"] is None
    for p in parts:
        for io in (p["input"], p["output"]):
            if io:
                assert io["bytes_per_sample"] == 4 * math.prod(io["shape"]) and io["bits_per_sample"] == 8 * io[
                    "bytes_per_sample"]
        assert p["results_to"] == "pi"
        mod = art.partition(p["index"])
        assert mod.exit_ids() == [e["exit_index"] for e in p["exits"]]
        for e in p["exits"]:
            assert p["blocks"][0] <= e["block"] <= p["blocks"][1]
            if not e["always"]:
                assert e["threshold_float32"] == score_threshold(info["criterion"], e["threshold"])
    # the bytes a partition sends on are what the performance model charges for
    for p in parts[:-1]:
        assert p["output"]["bits_per_sample"] == profile.output_bits[p["blocks"][1] - 1]
    assert [x["exit_index"] for p in parts for x in p["exits"]] == list(range(info["num_exits"]))
    est = info["estimated"]
    plan = info["plan"]
    ref = pm.estimate_plan(profile, topo, criterion=plan["criterion"], threshold=plan["thresholds"][0],
                           partitions=plan["partitions"], exits=plan["exits"], placement=plan["placement"])
    assert est["latency_s"] == pytest.approx(ref.latency_s) and est["accuracy"] == pytest.approx(ref.accuracy)
    meas = info["measured"]
    assert meas["test"]["agrees_with_model_pt"] == 1.0
    assert sum(meas["test"]["partition_rates"]) == pytest.approx(1.0)
    assert len(meas["compute"]["p99_s"]) == 3
    m = art.manifest
    assert {"partitions/0.pt", "partitions/1.pt", "partitions/2.pt", "model.pt", "profile.json"} <= set(m["files"])
    assert pm.Profile.from_json(art3 / "profile.json").block_names == profile.block_names
    assert m["backbone"]["hash"] and m["policy"]["name"] == "partition"
    assert [e["name"] for e in m["exits"]] == [profile.block_names[b - 1] for b in plan["exits"][0] + plan["exits"][1]]


# --------------------------------------------------------------------------- real processes on loopback


def test_two_partitions_across_processes_via_cli(art2, digits_result, tmp_path):
    """`autoexit partition run --optimize`: two server processes running their partitions optimised, every
    result equal to (the plain) model.pt's."""
    from autoexit.cli import main

    x = digits_result.recording.inputs("test")[:N_RUN]
    y = digits_result.recording.labels("test")[:N_RUN]
    data = tmp_path / "data.pt"
    torch.save({"x": x, "y": y}, data)
    report = tmp_path / "run.json"
    rc = main(["partition", "run", "--artifact", str(art2), "--data", str(data), "--batch-size", "8",
               "--json", str(report), "--optimize"])
    assert rc == 0
    r = json.loads(report.read_text())
    assert r["samples"] == N_RUN and r["mismatches"] == 0 and r["same_as_model_pt"] == 1.0
    assert r["spawned"] and len(r["addresses"]) == 2 and all(a.startswith("127.0.0.1:") for a in r["addresses"])
    assert sum(r["partition_rates"]) == pytest.approx(1.0) and min(r["partition_rates"]) > 0
    # in process: an optimised partition keeps its exported exit_ids and answers as the plain one does
    from autoexit.partition import load_partitioned

    art, _ = load_partitioned(art2)
    plain, fast = art.partition(0), art.partition(0, optimize=True)
    assert fast.exit_ids() == plain.exit_ids()
    with torch.no_grad():
        (z0, e0, h0), (z1, e1, h1) = plain(x), fast(x)
    assert torch.equal(e0, e1) and torch.allclose(z0, z1, atol=1e-4) and torch.allclose(h0, h1, atol=1e-4)


def test_three_partitions_across_processes(art3, digits_result):
    from autoexit.partition import load_partitioned
    from autoexit.partition_runtime import run_partitioned, spawn_servers

    _, info = load_partitioned(art3)
    x = digits_result.recording.inputs("test")[:N_RUN]
    ref_logits, ref_exit = _reference(art3, x, 4)
    with spawn_servers(art3) as group:
        assert all(group.alive()) and len(group.addresses) == 3
        run = run_partitioned(art3, x, addresses=group.addresses, batch_size=4, shaping=0.05)
        again = run_partitioned(art3, x[:8], addresses=group.addresses, batch_size=1)  # servers keep serving
    assert not any(group.alive())  # stopped by the context manager
    assert torch.equal(run.exit_index, ref_exit)
    assert torch.equal(run.logits.argmax(1), ref_logits.argmax(1))
    assert torch.allclose(run.logits, ref_logits, atol=1e-5)
    owner = [e["exit_index"] for p in info["partitions"] for e in p["exits"]]
    part_of_exit = {e: p["index"] for p in info["partitions"] for e in [x["exit_index"] for x in p["exits"]]}
    assert sorted(owner) == list(range(info["num_exits"]))
    assert [part_of_exit[int(e)] for e in run.exit_index] == run.partition.tolist()
    assert set(run.partition.tolist()) == {0, 1, 2}
    assert torch.equal(again.exit_index, _reference(art3, x[:8], 1)[1])
    # link shaping: with 5 % of the topology's delays every sample pays at least its input leg (Pi -> Pi: none)
    # and those leaving past the Pi pay the links to local_cloud and back
    far = run.partition.numpy() > 0
    assert run.latency_s[far].min() >= 0.05 * 2 * (0.010 + 0.010)


# --------------------------------------------------------------------------- validation (paper 004, 3.2)


def test_estimates_against_the_real_partitioned_model(digits_result, profile):
    from autoexit.partition import validate_estimates

    out = validate_estimates(digits_result, profile, count=10, seed=3, progress=False)
    s = out["summary"]
    assert s["n_partitionings"] == 10 and s["real_runs"] == 10
    assert len(out["rows"]) == 10 * 2 * 20
    # the real TorchScript partitions do what the heads' recorded predictions say (same exits, same scores)
    assert s["real_vs_sim_max_rate_diff"] <= 5e-3
    # the model's own error stays small on digits (it is exact for a single partition)
    assert s["mean_exit_rate_error"] < 0.08 and s["mean_accuracy_error"] < 0.08
    single = [r for r in out["rows"] if len(r["partitions"]) == 1 and r["partitions"][0] == profile.n_blocks]
    for r in single:
        assert r["est_exit_rates"] == pytest.approx([1.0]) and r["actual_exit_rates"] == pytest.approx([1.0])


# --------------------------------------------------------------------------- user-supplied exit networks


def tiny_head(in_shape, num_classes):
    """A factory for ``custom_heads`` ('test_partition:tiny_head')."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_shape[0], num_classes))


def test_custom_heads_spec_and_factory(digits_result, profile, cache):
    from autoexit.distill import TrainConfig
    from autoexit.heads import HeadSpec
    from autoexit.partition import (
        FactoryHead,
        build_partitions,
        build_reference,
        custom_heads,
        make_plan,
        profile_result,
        run_chain,
    )

    b1, b2 = profile.block_names[1], profile.block_names[2]
    heads = custom_heads(digits_result, {b1: HeadSpec(conv="none", fc_layers=1),
                                         b2: "test_partition:tiny_head"}, train=TrainConfig(epochs=2), progress=False)
    assert isinstance(heads[b2].spec, FactoryHead) and heads[b2].spec.path == "test_partition:tiny_head"
    assert heads[b1].spec.conv == "none" and heads[b2].params == 10 * digits_result.heads[b2].point.shape[0] + 10
    prof = profile_result(digits_result, heads=heads, cache_dir=cache, progress=False)
    assert prof.block_names == profile.block_names and prof.head_accuracy != profile.head_accuracy
    plan = make_plan(prof, partitions=[3, prof.n_blocks], exits=[[2, 3], [prof.n_blocks]], threshold=0.9)
    parts = build_partitions(digits_result, plan, heads=heads)
    ref = build_reference(digits_result, plan, heads=heads)
    x = digits_result.recording.inputs("test")[:64]
    run = run_chain(parts, x)
    with torch.no_grad():
        assert torch.equal(run["exit_index"], ref(x)[1])
    with pytest.raises(AutoExitError, match="no function"):
        custom_heads(digits_result, {b1: "test_partition:nope"}, progress=False)
    with pytest.raises(AutoExitError, match="must return logits"):
        custom_heads(digits_result, {b1: lambda s, c: nn.Flatten()}, progress=False)


# --------------------------------------------------------------------------- bad input: one-line errors


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg
    return msg


def test_bad_plans(profile, topo):
    from autoexit.partition import PartitionPlan, make_plan

    n = profile.n_blocks
    with pytest.raises(AutoExitError, match="'moon' is not a tier") as e:
        make_plan(profile, partitions=[2, n], placement=["pi", "moon"], topology=topo)
    _one_line(e.value)
    with pytest.raises(AutoExitError, match="one tier per partition"):
        make_plan(profile, partitions=[2, n], placement=["pi"], topology=topo)
    with pytest.raises(AutoExitError, match="at most one partition"):
        make_plan(profile, partitions=[2, n], placement=["pi", "pi"], topology=topo)
    with pytest.raises(AutoExitError, match="never crosses a split"):
        make_plan(profile, partitions=[2, n], exits=[[3], [n]])
    with pytest.raises(AutoExitError, match="strictly increasing"):
        make_plan(profile, partitions=[3, 2])
    with pytest.raises(AutoExitError, match="is not a block"):
        make_plan(profile, partitions=["layer9", n])
    with pytest.raises(AutoExitError, match="one threshold per conditional exit"):
        PartitionPlan(profile.block_names, (2, n), ((1, 2), (n,)), "confidence", (0.5, 0.6, 0.7))
    with pytest.raises(AutoExitError, match="unknown exit criterion"):
        make_plan(profile, partitions=[n], criterion="vibes")


def test_bad_runtime_input(art2, tmp_path, capsys):
    from autoexit.cli import main
    from autoexit.partition import load_partitioned
    from autoexit.partition_runtime import PartitionServer, run_partitioned

    with pytest.raises(AutoExitError, match=r"partition 5 is out of range: .* has partitions 0\.\.1") as e:
        PartitionServer(art2, 5)
    _one_line(e.value)
    assert main(["partition", "serve", "--artifact", str(art2), "--part", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoexit: partition -1 is out of range")
    # port in use
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(AutoExitError, match=f"port {port} on 127.0.0.1 is in use") as e:
            PartitionServer(art2, 0, port=port)
        _one_line(e.value)
    finally:
        busy.close()
    # a corrupt partition file is refused before anything is served
    bad = tmp_path / "bad"
    shutil.copytree(art2, bad)
    blob = bytearray((bad / "partitions" / "1.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "partitions" / "1.pt").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"partitions/1\.pt .* does not match its checksum") as e:
        PartitionServer(bad, 1)
    _one_line(e.value)
    with pytest.raises(ArtifactError, match="not a partitioned artifact"):
        plain = tmp_path / "plain"
        shutil.copytree(art2, plain)
        m = json.loads((plain / "manifest.json").read_text())
        m.pop("partitioning")
        from autoexit.artifact import manifest_checksum

        m["checksum"] = manifest_checksum(m)
        (plain / "manifest.json").write_text(json.dumps(m))
        load_partitioned(plain)
    with pytest.raises(AutoExitError, match="takes inputs"):
        run_partitioned(art2, torch.zeros(3, 1, 9, 9), addresses=["127.0.0.1:1", "127.0.0.1:2"])
    with pytest.raises(AutoExitError, match="give 2 addresses"):
        run_partitioned(art2, torch.zeros(3, 1, 8, 8), addresses=["127.0.0.1:1"])
    with pytest.raises(AutoExitError, match="no partition server answers at 127.0.0.1:1"):
        run_partitioned(art2, torch.zeros(3, 1, 8, 8), addresses=["127.0.0.1:1", "127.0.0.1:2"])


def test_wire_format_round_trip_and_refusals():
    from autoexit.partition_runtime import MAGIC, ProtocolError, recv_frame, send_frame

    a, b = socket.socketpair()
    with a, b:
        x = torch.randn(3, 4, 2)
        ids = torch.arange(3)
        send_frame(a, {"type": "infer", "batch": 7}, [("ids", ids), ("x", x), ("empty", torch.zeros(0, 5))])
        h, t = recv_frame(b)
        assert h["type"] == "infer" and h["batch"] == 7
        assert torch.equal(t["x"], x) and torch.equal(t["ids"], ids) and t["empty"].shape == (0, 5)
        import struct

        head = json.dumps({"type": "x", "tensors": [{"name": "x", "dtype": "float32", "shape": [2, 2],
                                                      "nbytes": 12}]}).encode()
        a.sendall(struct.pack("!4sI", MAGIC, len(head)) + head)
        with pytest.raises(ProtocolError, match="does not match shape"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ProtocolError, match="not an autoexit partition frame"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        head = json.dumps({"tensors": [{"name": "x", "dtype": "object", "shape": [1], "nbytes": 8}]}).encode()
        a.sendall(struct.pack("!4sI", MAGIC, len(head)) + head)
        with pytest.raises(ProtocolError, match="unsupported dtype 'object'"):
            recv_frame(b)


def test_plan_cli(art3, capsys, tmp_path):
    from autoexit.cli import main

    out = tmp_path / "plan.json"
    assert main(["partition", "plan", "--artifact", str(art3), "--min-accuracy", "0.8", "--partitions", "2",
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["configuration"]["partitions"]) == 2 and d["accuracy"] >= 0.8
    assert main(["partition", "plan", "--artifact", str(art3), "--max-latency-ms", "0.001"]) == 2
    assert "no configuration has latency" in capsys.readouterr().err
    assert main(["partition", "plan", "--artifact", str(art3), "--min-accuracy", "0.8",
                 "--destination", "mars"]) == 2
    assert "'mars' is not a tier" in capsys.readouterr().err
