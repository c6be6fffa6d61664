"""The NNI head search end to end: NNI's experiment machinery (manager, trial processes, REST API),
export of the winners as HeadSpecs and trained heads, and their use by the core pipeline."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("nni", reason="the NNI head search needs the 'nas' extra (pip install 'autoexit[nas]')")

from autoexit.distill import TrainConfig, agreement, predict_head, train_heads  # noqa: E402
from autoexit.heads import HeadSpec, build_head  # noqa: E402
from autoexit.pipeline import EnableConfig, assemble, prepare  # noqa: E402
from autoexit.search import head_space as H  # noqa: E402
from autoexit.search import nni_heads as N  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(digits_backbone, digits_data, tmp_path_factory):
    cfg = EnableConfig(cache_dir=str(tmp_path_factory.mktemp("rec")))
    return prepare(digits_backbone, digits_data, cfg, progress=False)


class RestProbe(threading.Thread):
    """What NNI's REST API lists while the search runs, read independently of autoexit."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.seen: dict[str, dict] = {}  # trial id -> last job JSON seen while the experiment was RUNNING
        self.statuses: list[str] = []

    def get(self, ep: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/nni/{ep}", timeout=2) as r:
            return json.loads(r.read())

    def run(self):
        while not self.stop.wait(0.5):
            try:
                status = self.get("check-status")["status"]
                jobs = self.get("trial-jobs")
            except Exception:  # noqa: BLE001 - between experiments nothing listens
                continue
            self.statuses.append(status)
            if status == "RUNNING":
                for j in jobs:
                    self.seen[j["trialJobId"]] = j


def test_reduced_nni_search_end_to_end(prepared, tmp_path):
    """CI mode: the ci space, 3 trials at each of 2 exit points, NNI's manager, web UI and trial processes."""
    tb, points, rec = prepared
    port = free_port()
    probe = RestProbe(port)
    probe.start()
    t0 = time.perf_counter()
    try:
        res = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=3, port=port,
                             points=("block2", "block4"), concurrency=2, train={"epochs": 3, "patience": 0},
                             retrain=False, workdir=tmp_path / "heads", progress=False)
    finally:
        probe.stop.set()
        probe.join()
    elapsed = time.perf_counter() - t0
    print(f"reduced NNI search: {elapsed:.0f} s")

    # NNI's REST API listed the trials while the experiments ran, with the exit point and the sampled head
    assert "RUNNING" in probe.statuses
    trial_ids = {r["trial"] for pr in res.points.values() for r in pr.trials}
    assert probe.seen and set(probe.seen) <= trial_ids
    params = json.loads(next(iter(probe.seen.values()))["hyperParameters"][0])["parameters"]
    assert params["sample"]["exit_point"] in ("block2", "block4") and "conv" in params["sample"]
    with socket.socket() as s:  # stopped: the port is free again
        assert s.connect_ex(("127.0.0.1", port)) != 0

    # every trial ran in NNI and reported agreement, FLOPs and the score; the records persist
    chance = H.chance_agreement(rec)
    for name in ("block2", "block4"):
        pr = res.points[name]
        assert pr.status == "ok" and len(pr.trials) == 3 and pr.experiment_id
        nni_trials = pr.nni["trials"]
        assert len(nni_trials) == 3 and {t["status"] for t in nni_trials} == {"SUCCEEDED"}
        for t in nni_trials:
            assert {"default", "agreement", "flops", "cost_fraction"} <= set(t["final"])
        assert pr.best["metrics"]["score"] == max(r["metrics"]["score"] for r in pr.trials)
        assert (Path(pr.nni["experiment_dir"]) / "db" / "nni.sqlite").is_file()
    assert set(res.specs) == {"block2", "block4"} and not res.failed
    saved = json.loads((res.workdir / "search.json").read_text())
    assert set(saved["specs"]) == {"block2", "block4"}
    assert (res.workdir / "nni" / "nni-experiments" / ".experiment").is_file()  # NNI's manifest stays here

    # the exported heads build from their HeadSpec, carry the trained weights, and beat chance
    for name, h in res.heads.items():
        spec = HeadSpec.from_json(res.specs[name].to_json())
        p = rec.point(name)
        module = build_head(spec, p.shape, rec.num_classes)
        module.load_state_dict(h.module.state_dict())
        a = agreement(predict_head(module, rec.activations(name, "val")), rec.logits("val"))
        assert a == pytest.approx(h.val_agreement) and a > chance + 0.05
    # ... train again from scratch, label-free, to above chance
    fresh = train_heads(rec, res.specs, TrainConfig(epochs=3, patience=0), points=list(res.specs), progress=False)
    for h in fresh.values():
        assert h.val_agreement > chance + 0.05
    # ... and feed the core pipeline as they are
    out = assemble(EnableConfig(tolerance=2.0), tb, points, rec, res.heads)
    assert set(out.metrics["val"]) >= {"saving", "agreement"} and set(out.kept) <= {"block2", "block4"}

    # a second identical search reuses the finished experiments (no NNI run)
    again = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=3, port=port,
                           points=("block2", "block4"), concurrency=2, train={"epochs": 3, "patience": 0},
                           retrain=False, workdir=tmp_path / "heads", progress=False)
    assert all(pr.reused for pr in again.points.values())
    assert {k: v.to_dict() for k, v in again.specs.items()} == {k: v.to_dict() for k, v in res.specs.items()}


@pytest.mark.parametrize("strategy", ["tpe", "evolution", "random"])
def test_strategies_in_process(prepared, tmp_path, strategy):
    """Each strategy samples the space through NNI (sequential engine) and the best trial is exported."""
    tb, points, rec = prepared
    res = N.search_heads(prepared=prepared, space="ci", strategy=strategy, max_trials=4, engine="sequential",
                         points=("block3",), train={"epochs": 2, "patience": 0}, trial_samples=1500, retrain=False,
                         workdir=tmp_path, progress=False, seed=1)
    pr = res.points["block3"]
    assert len(pr.trials) == 4 and pr.status == "ok"
    assert len(pr.nni["trials"]) == 4
    assert pr.best["metrics"]["score"] == max(r["metrics"]["score"] for r in pr.trials)
    assert res.heads["block3"].spec == res.specs["block3"]
    # samples of one experiment are distinct (NNI dedup); canonical duplicates were trained once
    trained = [r for r in pr.trials if not r.get("duplicate_of")]
    assert len({r["spec_json"] for r in trained}) == len(trained)


def test_point_without_a_head_above_chance_is_discarded(prepared, tmp_path):
    res = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=2, engine="sequential",
                         points=("block1", "block4"), train={"epochs": 1, "patience": 0}, trial_samples=300,
                         chance_margin=0.995, retrain=False, workdir=tmp_path, progress=False)
    assert sorted(res.failed) == ["block1", "block4"] and not res.heads and not res.specs
    for pr in res.points.values():
        assert pr.status == "chance" and all(r["status"] == "chance" for r in pr.trials)
        assert {t["status"] for t in pr.nni["trials"]} == {"failed"}  # NNI marked every trial failed


def test_winners_are_retrained_with_the_final_settings(prepared, tmp_path):
    res = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=2, engine="sequential",
                         points=("block4",), train={"epochs": 1, "patience": 0}, final_train={"epochs": 3},
                         workdir=tmp_path, progress=False)
    h = res.heads["block4"]
    assert h.epochs == 3 and len(h.history) == 3
    assert (res.points["block4"].dir / next(p.name for p in res.points["block4"].dir.glob("best-*.pt"))).is_file()
    # the winners' retraining may learn from the backbone run on new inputs (the search passes it along)
    fm = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=2, engine="sequential",
                        points=("block4",), train={"epochs": 1, "patience": 0},
                        final_train={"epochs": 3, "teacher": "mixup", "shift": 1}, workdir=tmp_path, progress=False)
    g = fm.heads["block4"]
    assert g.spec == h.spec and g.epochs == 3 and len(g.history) == 3
    assert any(not torch.equal(a, b) for a, b in zip(g.module.state_dict().values(), h.module.state_dict().values()))


def test_model_space_generated_from_the_space_file():
    space = H.load_head_space("default")
    m = N.HeadModelSpace(space.to_dict(), [16, 8, 8], 10, "layer1.0")
    labels = set(m.simplify())
    assert labels == {"exit_point", *space.searched}
    import random

    rng = random.Random(0)
    for _ in range(20):
        sample = {k: rng.choice(list(v.values)) for k, v in m.simplify().items()}
        frozen = m.freeze(sample)
        assert frozen.head_spec == space.spec(sample, (16, 8, 8))
        assert frozen(torch.zeros(2, 16, 8, 8)).shape == (2, 10)


def test_cli_search_heads(tmp_path, monkeypatch, capsys):
    """``autoexit search heads --config``: an experiment file's heads section, in-process engine."""
    from autoexit.cli import main

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: cli-heads
run_dir: {tmp_path / 'run'}
backbone: {{zoo: digits_cnn, epochs: 3, width: 8}}
data: {{source: digits, shifts: false}}
enable: {{granularity: auto, cache_dir: {tmp_path / 'rec'}}}
heads: {{search: true, space: ci, strategy: random, max_trials: 4, engine: sequential, points: [block4],
        train: {{epochs: 2, patience: 0}}, retrain: false}}
""")
    assert main(["search", "heads", "--config", str(cfg), "--max-trials", "2", "--strategy", "tpe"]) == 0
    out = capsys.readouterr().out
    assert "block4" in out and "best head per exit point" in out
    saved = json.loads((tmp_path / "run" / "nni-heads" / "search.json").read_text())
    assert saved["config"]["max_trials"] == 2 and saved["config"]["strategy"] == "tpe"
    assert len(saved["points"]["block4"]["trials"]) == 2


def test_latency_from_the_evaluator_is_reported_and_can_be_the_cost(prepared, tmp_path):
    """With an evaluator (here the local one) every trial reports the head's measured latency; cost: latency
    scores by latency / the measured latency of the backbone after the point."""
    res = N.search_heads(prepared=prepared, space="ci", strategy="random", max_trials=2, engine="sequential",
                         points=("block3",), train={"epochs": 4, "patience": 0}, trial_samples=500,
                         cost="latency", evaluator={"local": True}, max_cost_fraction=None, cost_weight=0.1,
                         retrain=False, workdir=tmp_path,
                         progress=False)
    pr = res.points["block3"]
    ctx = json.loads((pr.dir / "context.json").read_text())
    assert ctx["base_latency_ms"] > 0
    for r in pr.trials:
        m = r["metrics"]
        assert m["latency_ms"] > 0 and m["flops"] > 0
        assert m["cost_fraction"] == pytest.approx(m["latency_ms"] / ctx["base_latency_ms"])
    assert res.rows()[0]["latency_ms"] is not None
