"""Head search spaces as data, the head-search settings, and the NNI-free trial objective (no NNI needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from autoexit.errors import AutoExitError
from autoexit.heads import HeadSpec, build_head
from autoexit.search import head_space as H

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "ci"])
def test_shipped_spaces_load_and_match_the_builtin_fallback(name):
    f = REPO / "search_spaces" / f"heads_{name}.yaml"
    space = H.load_head_space(name)
    assert space.name == name
    assert space.to_dict() == H.HeadSpace.from_dict(yaml.safe_load(f.read_text())).to_dict()
    assert space.to_dict() == H.HeadSpace.from_dict(H.BUILTIN_SPACES[name]).to_dict()
    assert H.load_head_space(f).to_dict() == space.to_dict()  # by path too


def test_default_space_covers_the_papers_zoo():
    s = H.load_head_space("default")
    zoo = dict(s.choices)
    assert set(zoo["conv"]) == {"none", "standard", "depthwise", "separable", "spatial", "dilated"}
    assert set(zoo["kernel"]) == {3, 5, 7}
    assert set(zoo["fc_layers"]) == {1, 2, 3}
    assert max(zoo["conv_layers"]) == 2
    # every sample builds a head that runs on an image activation and on a token activation
    import itertools

    keys = [k for k, _ in s.choices]
    combos = list(itertools.product(*[v for _, v in s.choices]))
    for combo in combos[:: max(1, len(combos) // 60)]:
        sample = dict(zip(keys, combo))
        for shape in ((16, 8, 8), (5, 12)):
            head = build_head(s.spec(sample, shape), shape, 10)
            assert head(torch.zeros(2, *shape)).shape == (2, 10)


def test_ci_space_is_small_and_canonical_duplicates_collapse():
    ci = H.load_head_space("ci")
    assert ci.distinct_specs((16, 4, 4)) == 4
    d = H.load_head_space("default")
    assert d.distinct_specs((16, 8, 8)) < d.size  # conv none ignores kernel/stride/width, ...
    # the same head, sampled two ways, is one spec
    a = H.canonical_spec({"conv": "none", "kernel": 7, "stride": 2, "conv_width": 64, "fc_layers": 1,
                          "fc_width": 256}, (16, 8, 8))
    b = H.canonical_spec({"conv": "none", "kernel": 3, "stride": 1, "conv_width": 0, "fc_layers": 1,
                          "fc_width": 64}, (16, 8, 8))
    assert a == b and a.conv_layers == 0
    assert H.canonical_spec({"conv": "depthwise", "conv_width": 64}, (16, 8, 8)).conv_width == 0
    assert H.canonical_spec({"conv": "standard", "conv_width": 16}, (16, 8, 8)).conv_width == 0
    assert H.canonical_spec({"conv": "standard", "conv_width": 32}, (16, 8, 8)).conv_width == 32
    tok = H.canonical_spec({"conv": "separable", "pool": "max"}, (5, 12))
    assert tok.conv == "none" and tok.pool == "mean"


@pytest.mark.parametrize("bad, match", [
    ({"conv": ["separable", "wavelet"]}, "wavelet"),
    ({"kernel": [3, 4]}, "kernel"),
    ({"fc_layers": []}, "no values"),
    ({"conv_layers": [1, 1]}, "twice"),
    ({"convs": [1]}, "unknown field"),
    ({"fc_width": ["wide"]}, "integers"),
    ({"description": "nothing"}, "names no HeadSpec field"),
])
def test_bad_space_files_fail_with_one_line(tmp_path, bad, match):
    f = tmp_path / "heads_bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(AutoExitError, match=match) as e:
        H.load_head_space(str(f))
    assert "\n" not in str(e.value)


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(AutoExitError, match="known: .*ci.*default"):
        H.load_head_space("nonexistent")


def test_search_settings_are_validated_at_the_boundary():
    c = H.HeadSearchConfig.from_dict({"search": True, "strategy": "regularized_evolution", "points": ["a"],
                                      "train": {"epochs": 2}})
    assert c.strategy == "evolution" and c.points == ("a",) and c.train.epochs == 2 and c.port == 8081
    for bad, match in [({"strategy": "grid"}, "strategy"), ({"engine": "sequential", "concurrency": 2}, "concurrency"),
                       ({"cost": "energy"}, "cost"), ({"train": {"epochz": 2}}, "epochz"),
                       ({"max_trials": 0}, "max_trials"), ({"port": 80}, "port"), ({"colour": 1}, "unknown heads"),
                       ({"max_duration": "ten minutes"}, "max_duration"),
                       ({"train": {"teacher": "mixup"}}, "heads.final_train")]:
        with pytest.raises(AutoExitError, match=match):
            H.HeadSearchConfig.from_dict(bad)
    assert json.loads(json.dumps(c.to_dict()))["train"]["epochs"] == 2
    f = H.HeadSearchConfig.from_dict({"final_train": {"teacher": "mixup", "epochs": 120}})
    assert f.final_train.teacher == "mixup" and not f.train.on_the_fly  # the winners' retraining may use it


def test_core_and_head_space_import_no_nni():
    code = ("import sys, autoexit, autoexit.pipeline, autoexit.search, autoexit.search.head_space, "
            "autoexit.search.pipeline; assert 'nni' not in sys.modules, 'nni imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_search_heads_without_nni_says_how_to_install(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: x\nbackbone: {zoo: digits_cnn}\ndata: {source: digits}\n")
    code = ("import sys; sys.modules['nni'] = None\n"  # makes `import nni` fail as if it were not installed
            "from autoexit.cli import main\n"
            f"sys.exit(main(['search', 'heads', '--config', {str(cfg)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pip install 'autoexit[nas]'" in r.stderr and "Traceback" not in r.stderr
    code = ("import sys; sys.modules['nni'] = None\n"
            "import autoexit.search as S\n"
            "try:\n    S.search_heads(None, None)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "pip install 'autoexit[nas]'" in r.stdout


def test_trial_objective_scores_and_persists(digits_backbone, digits_data, tmp_path):
    """run_trial trains on the recording only, scores agreement - w * cost, and reuses duplicates."""
    from autoexit.pipeline import EnableConfig, prepare

    tb, points, rec = prepare(digits_backbone, digits_data, EnableConfig(cache_dir=str(tmp_path / "rec")),
                              progress=False)
    p = points[-1]
    ctx = {"point": p.name, "recording": H.recording_context(rec), "store": str(tmp_path / "store"),
           "engine": "sequential", "train": {"epochs": 4, "patience": 0}, "threads": 1, "trial_samples": 2000,
           "search_seed": 0, "chance": H.chance_agreement(rec), "chance_margin": 0.01, "cost": "flops",
           "cost_weight": 2.0, "cost_basis": "remaining", "base_flops": float(p.flops_after), "evaluator": None}
    spec = H.canonical_spec({"conv": "none", "fc_layers": 1}, p.shape)
    r = H.run_trial(ctx, spec, "t0", {"conv": "none"})
    m = r["metrics"]
    assert r["status"] == "ok" and m["agreement"] > m["chance"] + 0.01, m
    assert m["score"] == pytest.approx(m["agreement"] - 2.0 * m["flops"] / p.flops_after)
    head = build_head(spec, p.shape, rec.num_classes)
    head.load_state_dict(torch.load(Path(ctx["store"]) / "weights" / r["weights"], weights_only=True))
    dup = H.run_trial(ctx, HeadSpec.from_dict(spec.to_dict()), "t1")
    assert dup["duplicate_of"] == "t0" and dup["metrics"] == m
    assert [x["trial"] for x in H.TrialStore(ctx["store"]).records()] == ["t0", "t1"]
    impossible = {**ctx, "chance_margin": 0.999, "store": str(tmp_path / "store2")}
    assert H.run_trial(impossible, spec, "t2")["status"] == "chance"
    costly = {**ctx, "max_cost_fraction": 1e-6, "store": str(tmp_path / "store3")}
    r = H.run_trial(costly, spec, "t3")
    assert r["status"] == "too_costly" and r["weights"] is None and "agreement" not in r["metrics"]
    assert r["metrics"]["flops"] == m["flops"]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*heads*.yaml")), ids=lambda p: p.name)
def test_head_search_experiment_files_are_valid(path):
    from autoexit.search.pipeline import ExperimentConfig

    d = yaml.safe_load(path.read_text())
    cfg = H.HeadSearchConfig.from_dict(d["heads"])
    H.load_head_space(cfg.space)
    pipeline_keys = ("search", "space", "strategy", "max_trials", "port")
    ExperimentConfig.from_dict({**d, "heads": {k: v for k, v in d["heads"].items() if k in pipeline_keys}})


def test_trials_scored_on_a_train_holdout_never_read_val(digits_backbone, digits_data, tmp_path, monkeypatch):
    """``score_on: holdout``: a trial trains on part of the train split and is scored (and its epoch chosen) on
    the rest; val, the split the guarantee is certified on, is never read."""
    from autoexit.data import Recording
    from autoexit.distill import agreement, predict_head
    from autoexit.pipeline import EnableConfig, prepare

    tb, points, rec = prepare(digits_backbone, digits_data, EnableConfig(cache_dir=str(tmp_path / "rec")),
                              progress=False)
    p = points[-1]
    cfg = H.HeadSearchConfig(score_on="holdout", holdout=0.25, seed=3, train={"epochs": 3, "patience": 0})
    ctx = H.trial_context(rec, p, cfg, tmp_path / "store", total_flops=float(tb.total_flops))
    read = []
    for name in ("activations", "logits"):
        orig = getattr(Recording, name)

        def spy(self, *a, _orig=orig, **k):
            read.append(a[-1] if a else k.get("split"))
            return _orig(self, *a, **k)

        monkeypatch.setattr(Recording, name, spy)
    H._DATA_CACHE.clear()
    spec = H.canonical_spec({"conv": "none", "fc_layers": 1}, p.shape)
    r = H.run_trial(ctx, spec, "t0")
    assert "val" not in read and "train" in read
    fit, held = H.holdout_split(len(rec.logits("train")), 0.25, 3)
    assert len(held) == round(0.25 * len(rec.logits("train"))) and not set(fit.tolist()) & set(held.tolist())
    # the score is the agreement on the held-out train rows, and chance is measured there too
    head = build_head(spec, p.shape, rec.num_classes)
    head.load_state_dict(torch.load(Path(ctx["store"]) / "weights" / r["weights"], weights_only=True))
    x, t = rec.activations(p, "train")[held], rec.logits("train")[held]
    assert r["metrics"]["agreement"] == pytest.approx(agreement(predict_head(head, x), t))
    assert ctx["chance"] == pytest.approx(H.chance_agreement(rec, "train", held))
    # searches scored differently are cached apart; scoring on val keeps its old key
    space = H.load_head_space("ci")
    keys = {H.search_key(rec, p.name, space, c, None) for c in
            (H.HeadSearchConfig(), H.HeadSearchConfig(score_on="holdout"), H.HeadSearchConfig(score_on="holdout",
                                                                                                holdout=0.3))}
    assert len(keys) == 3
    for bad, match in [({"score_on": "test"}, "score_on"), ({"score_on": "holdout", "holdout": 1.0}, "holdout")]:
        with pytest.raises(AutoExitError, match=match):
            H.HeadSearchConfig.from_dict(bad)
