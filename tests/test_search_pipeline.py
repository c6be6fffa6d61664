"""The whole searched pipeline (record -> heads -> Optuna -> emit) on a tiny digits preset, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="the outer search needs the 'search' extra (optuna)")

import autoexit  # noqa: E402
from autoexit.cli import main  # noqa: E402
from autoexit.errors import AutoExitError  # noqa: E402
from autoexit.search import pipeline as P  # noqa: E402


def _tiny(tmp_path, **outer) -> dict:
    return {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "backbone": {"zoo": "digits_cnn", "epochs": 3, "width": 8},
        "data": {"source": "digits", "shifts": False},
        "enable": {"granularity": "auto", "cache_dir": str(tmp_path / "cache"),
                   "train": {"epochs": 2, "batch_size": 128}},
        "heads": {"search": False},
        "outer": {"space": "outer_ci", "n_trials": 12, "pick": {"rule": "min_cost", "max_drop": 5.0}, **outer},
        "emit": {"out": "artifact", "latency": False},
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = _tiny(tmp)
    return tmp, cfg, P.run_search(cfg, progress=False)


def test_whole_pipeline_emits_the_chosen_front_point(first_run):
    tmp, cfg, run = first_run
    art = autoexit.load(run.artifact)  # checksums verified
    m = art.manifest
    plan = run.outer.chosen
    assert [e["name"] for e in m["exits"]] == list(plan.kept)
    assert [e["threshold"] for e in m["exits"]] == pytest.approx(list(plan.thresholds))
    assert m["policy"]["tolerance_percent"] == pytest.approx(plan.tolerance)
    # the emitted model does on test what the search reported for test (same thresholds, same heads)
    assert m["expected"]["test"]["saving"] == pytest.approx(run.outer.test["saving"], abs=1e-9)
    assert m["expected"]["val"]["saving"] == pytest.approx(run.outer.val["saving"], abs=1e-9)
    rep = json.loads((run.artifact / "report.json").read_text())
    s = rep["search"]["outer"]
    assert s["chosen_trial"] == run.outer.chosen_trial.number and s["front"] and s["study_name"] == "tiny"
    assert s["val"] and s["test"] and s["baseline"]
    html = (run.artifact / "report.html").read_text()
    assert "Outer search: Pareto front" in html and "parameter importances" in html
    assert (tmp / "run" / "optuna.db").is_file() and run.recorded_path.is_file()
    assert json.loads((tmp / "run" / "search.json").read_text())["chosen"] == plan.to_dict()


def test_rerun_resumes_study_and_reuses_heads(first_run, monkeypatch):
    tmp, cfg, run = first_run
    import autoexit.distill as D

    def no_training(*a, **k):
        raise AssertionError("heads were retrained although they are cached")

    monkeypatch.setattr(D, "train_heads", no_training)
    before = {t.number: (t.params, t.values) for t in run.outer.study.trials}
    again = P.run_search(cfg, n_trials=16, emit=False, progress=False)
    trials = again.outer.study.trials
    assert len(trials) == 16 and again.outer.timings["trials_this_call"] == 4
    assert {t.number: (t.params, t.values) for t in trials[:12]} == before


def test_recorded_workers_need_no_model(first_run, tmp_path):
    _, cfg, run = first_run
    res = P.run_outer(run.recorded_path, storage=f"sqlite:///{tmp_path / 'w.db'}", study_name="w", n_trials=6,
                      progress=False)
    assert len(res.study.trials) == 6 and res.chosen.kept


def test_experiment_files_validate():
    for name in ("digits_ci", "quickstart_search", "digits_nni", "ci_heads", "cifar10_resnet20", "digits_partitioned_ci"):
        cfg = P.load_experiment(f"experiments/{name}.yaml")
        assert cfg.name and cfg.outer_settings().n_trials >= 1
    with pytest.raises(AutoExitError, match="backbone.zoo"):
        P.load_experiment({"name": "x", "backbone": {"zoo": "resnet_from_python"}, "data": {"source": "digits"}})
    with pytest.raises(AutoExitError, match="unknown experiment setting"):
        P.load_experiment({"name": "x", "backbone": {"zoo": "digits_cnn"}, "data": {"source": "digits"},
                           "outr": {}})
    with pytest.raises(AutoExitError, match="unknown experiment.outer setting"):
        P.load_experiment({"name": "x", "backbone": {"zoo": "digits_cnn"}, "data": {"source": "digits"},
                           "outer": {"n_trails": 3}})


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["search"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["search", "outer"]) == 2
    assert "--recorded" in capsys.readouterr().err
    assert main(["search", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_search_heads_without_nni_says_how_to_install(monkeypatch, capsys, tmp_path):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "autoexit.search.nni_heads":
            raise ModuleNotFoundError("No module named 'nni'", name="nni")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert main(["search", "heads", "--config", "experiments/digits_nni.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'autoexit[nas]'" in err and len(err.splitlines()) == 1


def test_registering_the_cli_imports_no_search_library():
    code = ("import sys, autoexit.cli as c; c.build_parser(); import autoexit.search; "
            "print(sorted(m for m in ('optuna', 'nni', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ci_preset_runs_end_to_end_from_the_cli(tmp_path, capsys):
    """``autoexit search --config experiments/digits_ci.yaml``: the reduced preset CI runs (run dir moved to tmp)."""
    import yaml

    d = yaml.safe_load(open("experiments/digits_ci.yaml"))
    d["run_dir"] = str(tmp_path / "run")
    d["enable"]["cache_dir"] = str(tmp_path / "cache")
    cfg = tmp_path / "ci.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["search", "--config", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of study digits-ci" in out and "optuna-dashboard 'sqlite:///" in out
    art = autoexit.load(tmp_path / "run" / "artifact")
    assert art.manifest["exits"] and (tmp_path / "run" / "optuna.db").is_file()
    assert len(optuna.load_study(study_name="digits-ci", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
               .trials) == d["outer"]["n_trials"]


def test_latency_search_verifies_the_chosen_configuration_end_to_end(tmp_path):
    """cost: latency profiles segments on the evaluator (local here), and the emitted configuration is then timed
    end to end on it: the manifest holds prediction and measurement, and the real model's exits are the
    simulated ones."""
    cfg = _tiny(tmp_path, cost="latency", n_trials=6)
    cfg["evaluator"] = {"local": True, "settings": {"warmup": 2, "repeat": 3, "min_repeat_ms": 5}}
    run = P.run_search(cfg, progress=False)
    dl = autoexit.load(run.artifact).manifest["device_latency"]
    assert dl["device"] and dl["samples"] > 0 and dl["measured_ms"] > 0 and dl["backbone_ms"] > 0
    assert dl["predicted_ms"] > 0 and dl["relative_error"] == pytest.approx(
        (dl["predicted_ms"] - dl["measured_ms"]) / dl["measured_ms"])
    assert len(dl["exit_counts"]) == len(run.outer.chosen.kept) + 1
    assert dl["exit_counts"] == dl["predicted_exit_counts"] and sum(dl["exit_counts"]) == dl["samples"]
    # the device's drift since the profile (the no-exit anchor re-timed) and the error with it taken out
    assert dl["device_drift"] > 0 and dl["relative_error_drift_corrected"] == pytest.approx(
        (dl["predicted_ms"] * dl["device_drift"] - dl["measured_ms"]) / dl["measured_ms"])


def test_latency_calibration_is_the_segment_profile_corrected_by_its_measured_anchors(digits_result):
    """latency_costs(calibrate=True): the profile and the anchors are timed in interleaved rounds (medians);
    every segment loses the measured per-call cost; the no-exit model fixes one scale for stages and heads, the
    models with every exit and with single exits alone at +inf the per-decision cost and the fixed cost of
    going on past an exit (the median of the one-exit anchors), and the one whose first exit takes everything
    the cost of an early answer, so the calibrated profile predicts exactly the no-exit, every-exit and
    first-exit anchors.
    Re-timing any of them with the same settings and seed hits the evaluator's cache."""
    from dataclasses import replace

    from autoexit.evaluator import LocalEvaluator, MeasureSettings
    from autoexit.model import MultiExitModel, to_torchscript
    from autoexit.search.outer import latency_costs

    res, ev = digits_result, LocalEvaluator()
    s = MeasureSettings(warmup=1, repeat=3, min_repeat_ms=5)
    cal = latency_costs(res, ev, settings=s, samples=24, stat="median_ms")
    c = cal.calibration
    assert c["samples"] == 24 and c["call_ms"] > 0 and c["rounds"] == 3 and c["consistent"]
    assert "per segment call" in cal.source and "interleaved rounds" in cal.source
    names = list(res.val.names)
    # the profile is the per-segment median of the rounds (seeds 0, 1, 2, or 3, 4, 5 had the first rounds' anchors
    # contradicted each other on this busy machine; the rounds are cache hits now)
    seeds = range(3, 6) if c["retimed"] else range(3)
    raws = [latency_costs(res, ev, settings=replace(s, seed=r), calibrate=False, stat="median_ms") for r in seeds]
    assert all(r.calibration is None for r in raws)
    stage_rounds = np.array([np.diff(np.concatenate([[0.0], r.before, [r.base]])) for r in raws])
    prof = c["profile_ms"]
    assert [prof[f"stage{i}"] for i in range(len(names) + 1)] == pytest.approx(np.median(stage_rounds, axis=0))
    assert [prof[f"head:{n}"] for n in names] == pytest.approx(np.median([r.c1 for r in raws], axis=0))
    assert c["profile_base_rounds_ms"] == pytest.approx(stage_rounds.sum(axis=1))
    assert [[p[f"stage{i}"] for i in range(len(names) + 1)] for p in c["profile_rounds_ms"]] == pytest.approx(
        stage_rounds)  # every round's segments, as timed
    # the formula
    call = c["call_ms"]
    st = np.maximum(np.array([prof[f"stage{i}"] for i in range(len(names) + 1)]) - call, 0.0)
    hd = np.maximum(np.array([prof[f"head:{n}"] for n in names]) - call, 0.0)
    assert c["scale"] == pytest.approx((c["no_exit_ms"] - call) / st.sum())
    assert cal.base == pytest.approx(c["no_exit_ms"]) and cal.base == pytest.approx(call + c["scale"] * st.sum())
    from autoexit.cost import one_exit_anchors

    ones = one_exit_anchors(len(names))
    assert len(ones) >= 2 and c["one_exit"] == [names[j] for j in ones]
    assert len(c["one_exit_ms"]) == len(ones) and all(len(r) == 3 for r in c["one_exit_rounds_ms"])
    n = len(names)
    surplus = c["every_exit_ms"] - c["no_exit_ms"] - c["scale"] * hd.sum()
    f_plus_d = float(np.median([t - c["no_exit_ms"] - c["scale"] * hd[j] for j, t in zip(ones, c["one_exit_ms"])]))
    d_two = (surplus - f_plus_d) / (n - 1)
    if f_plus_d - d_two > 0:  # the fixed cost of going on past an exit, from the one- and every-exit anchors
        assert c["exits_fixed_ms"] == pytest.approx(f_plus_d - d_two) and c["decision_ms"] == pytest.approx(d_two)
    else:  # noise: no fixed cost, the decisions from the every-exit model alone
        assert c["exits_fixed_ms"] == 0.0 and c["decision_ms"] == pytest.approx(surplus / n)
    assert c["one_exit_fixed_ms"] == pytest.approx([t - c["no_exit_ms"] - c["scale"] * hd[j] - c["decision_ms"]
                                                    for j, t in zip(ones, c["one_exit_ms"])])
    assert cal.fixed == c["exits_fixed_ms"] >= 0.0 and "per sample going on past an exit" in cal.source
    assert cal.c1 == pytest.approx(np.maximum(c["scale"] * hd + c["decision_ms"], 0.0))
    reach = call + c["scale"] * np.cumsum(st)[:-1]  # the backbone up to each exit, then the early answer's cost
    assert c["exit_taken_ms"] == pytest.approx(c["first_exit_ms"] - reach[0] - cal.c1[0])
    assert cal.before == pytest.approx(np.maximum(reach + c["exit_taken_ms"], 0.0))
    if cal.before[0] > 0:  # the first-exit anchor, reproduced: every input answered by the first exit, no fixed cost
        assert cal.before[0] + cal.c1[0] == pytest.approx(c["first_exit_ms"])
    if (c["scale"] * hd + c["decision_ms"] >= 0).all() and c["exits_fixed_ms"] > 0:
        # the one-exit anchors, reproduced to within their spread: the median one exactly
        pred = [cal.base + cal.fixed + cal.c1[j] for j in ones]
        assert float(np.median(np.array(c["one_exit_ms"]) - np.array(pred))) == pytest.approx(0.0, abs=1e-9)
    # the anchors are real end-to-end timings of those models on the val inputs
    stages_m = res.backbone.split([res.heads[n].point.node for n in names])
    x, nc = res.recording.inputs("val")[:24], int(res.backbone.num_classes)
    none = MultiExitModel(res.backbone.split([]), [], num_classes=nc)
    every = MultiExitModel(stages_m, [res.heads[k].module for k in names],
                           [float(res.temperatures[k]) for k in names], [float("inf")] * len(names), names, nc)
    first = MultiExitModel(stages_m, [res.heads[k].module for k in names],
                           [float(res.temperatures[k]) for k in names],
                           [-float("inf")] + [float("inf")] * (len(names) - 1), names, nc)
    one = [MultiExitModel(res.backbone.split([res.heads[names[j]].point.node]), [res.heads[names[j]].module],
                          [float(res.temperatures[names[j]])], [float("inf")], [names[j]], nc) for j in ones]

    def timed(m):  # the median over the rounds (measurement seeds 0, 1, 2), each a cache hit now
        out = []
        for seed in seeds:
            r = ev.measure_end_to_end(to_torchscript(m.eval(), res.backbone.example_input), x, batch_sizes=(1,),
                                      settings=replace(s, seed=seed))
            assert r.cached
            out.append(r.at(1).median_ms)
        return float(np.median(out))

    assert len(c["no_exit_rounds_ms"]) == len(c["every_exit_rounds_ms"]) == 3
    assert timed(none) == pytest.approx(c["no_exit_ms"])
    assert timed(every) == pytest.approx(c["every_exit_ms"])
    assert timed(first) == pytest.approx(c["first_exit_ms"])
    assert [timed(m) for m in one] == pytest.approx(c["one_exit_ms"])
    assert len(c["first_exit_rounds_ms"]) == 3
    with pytest.raises(AutoExitError, match="rounds must be an integer"):
        latency_costs(res, ev, settings=s, rounds=0)
    if (c["scale"] * hd + c["decision_ms"] >= 0).all():
        assert cal.base + cal.fixed + cal.c1.sum() == pytest.approx(c["every_exit_ms"])
    assert c["round_stat"] == "median" and "median of 3 interleaved rounds" in cal.source
    # stat="min_ms" (the default): the very same timings (cache hits), each standing for its fastest group, and
    # the rounds combined by their minimum (round_stat="min", the default with min_ms): the fastest group of all
    mn = latency_costs(res, ev, settings=s, samples=24)
    cm = mn.calibration
    assert cm["stat"] == "min_ms" and "min per timing" in mn.source
    assert cm["round_stat"] == "min" and "min of 3 interleaved rounds" in mn.source
    with pytest.raises(AutoExitError, match="round_stat must be 'min' or 'median'"):
        latency_costs(res, ev, settings=s, samples=24, round_stat="mean")
    if cm["retimed"] != c["retimed"]:  # the minima's anchors judged otherwise: other rounds, nothing to compare
        return
    assert all(cm["profile_ms"][k] <= v + 1e-12 for k, v in prof.items())  # a minimum never exceeds the median
    for key in ("no_exit_ms", "every_exit_ms", "first_exit_ms", "one_exit_ms"):
        assert np.all(np.array(cm[key]) <= np.array(c[key]) + 1e-12)

    def timed_min(m, combine):
        return float(combine([ev.measure_end_to_end(to_torchscript(m.eval(), res.backbone.example_input), x,
                                                    batch_sizes=(1,), settings=replace(s, seed=seed)).at(1).min_ms
                              for seed in seeds]))

    assert timed_min(none, np.min) == pytest.approx(cm["no_exit_ms"]) and mn.base == pytest.approx(cm["no_exit_ms"])
    assert timed_min(every, np.min) == pytest.approx(cm["every_exit_ms"])
    raws_min = [latency_costs(res, ev, settings=replace(s, seed=r), calibrate=False) for r in seeds]  # cache hits
    stages_min = np.array([np.diff(np.concatenate([[0.0], r.before, [r.base]])) for r in raws_min])
    assert [cm["profile_ms"][f"stage{i}"] for i in range(len(names) + 1)] == pytest.approx(stages_min.min(axis=0))
    assert [cm["profile_ms"][f"head:{n}"] for n in names] == pytest.approx(np.min([r.c1 for r in raws_min], axis=0))
    md = latency_costs(res, ev, settings=s, samples=24, round_stat="median")  # the rounds' median instead
    if md.calibration["retimed"] == cm["retimed"]:
        assert md.calibration["no_exit_ms"] == pytest.approx(timed_min(none, np.median))
        assert md.calibration["no_exit_ms"] >= cm["no_exit_ms"] - 1e-12
    with pytest.raises(AutoExitError, match="stat must be one of median_ms, min_ms, mean_ms"):
        latency_costs(res, ev, settings=s, stat="p99_ms")


class _SlowSpell:
    """A device (LocalEvaluator underneath) caught in a slow spell whenever it times one anchor (``anchor``: its
    place in a round, 0 the no-exit model, 1 the every-exit one) with a measurement seed below ``until``: that
    timing comes out ``factor`` times slower, the rest as measured."""

    def __init__(self, ev, anchors_per_round: int, until: int, factor: float = 20.0, anchor: int = 0):
        self.ev, self.per_round, self.until, self.factor, self.calls = ev, anchors_per_round, until, factor, 0
        self.anchor = anchor

    def __getattr__(self, name):
        return getattr(self.ev, name)

    def measure_end_to_end(self, model, inputs, batch_sizes, settings=None):
        from dataclasses import replace

        res = self.ev.measure_end_to_end(model, inputs, batch_sizes=batch_sizes, settings=settings)
        hit, self.calls = self.calls % self.per_round == self.anchor, self.calls + 1
        if not (hit and settings.seed < self.until):
            return res
        f = self.factor
        return replace(res, stats=tuple(replace(t, median_ms=t.median_ms * f, min_ms=t.min_ms * f,
                                                mean_ms=t.mean_ms * f) for t in res.stats))


def test_latency_calibration_retimes_anchors_that_contradict_each_other(digits_result):
    """The every-exit model does more work than the no-exit one, and each one-exit model's extra work once per
    exit, so timings where it comes out faster than the first or slower than the second allows (a device that
    changed speed) are discarded and everything is timed afresh with new seeds; if that contradicts too, no
    decision or fixed cost is fitted (they would say every exit saves time) and the user is warned."""
    from dataclasses import replace

    from autoexit.cost import anchors_consistent, one_exit_anchors
    from autoexit.evaluator import LocalEvaluator, MeasureSettings
    from autoexit.search.outer import latency_costs

    res, ev = digits_result, LocalEvaluator()
    s = MeasureSettings(warmup=1, repeat=3, min_repeat_ms=5)
    per_round = 3 + len(one_exit_anchors(len(res.val.names)))  # no-exit, every-exit, first-exit, one-exit anchors
    # this machine's own timings must agree first: a busy CI machine can make three real rounds contradict each
    # other too, so the rounds the fit is compared with are the first of a few seed blocks that agree
    for b in range(0, 30, 6):
        plain = latency_costs(res, ev, settings=replace(s, seed=b + 3), samples=24)
        if not plain.calibration["retimed"]:
            break
    else:
        pytest.fail("this machine's real timings contradicted each other in five blocks of rounds")
    s = replace(s, seed=b)
    # a spell over the first rounds only: they are discarded; the fit is exactly the one of rounds b+3..b+5, the
    # rounds `plain` timed (cache hits)
    spell = latency_costs(res, _SlowSpell(ev, per_round, until=b + 3), settings=s, samples=24)
    c = spell.calibration
    assert c["retimed"] and c["consistent"] and c["rounds"] == 3 and "timed again" in spell.source
    assert not plain.calibration["retimed"]
    for key in ("no_exit_ms", "every_exit_ms", "decision_ms", "exits_fixed_ms", "scale"):
        assert c[key] == pytest.approx(plain.calibration[key])
    assert spell.c1 == pytest.approx(plain.c1) and spell.base == pytest.approx(plain.base)
    # the every-exit model caught instead: the decision cost would come out huge (a negative fixed cost); the
    # same re-timing gives the same fit
    slow_every = latency_costs(res, _SlowSpell(ev, per_round, until=b + 3, anchor=1), settings=s,
                               samples=24)
    assert slow_every.calibration["retimed"] and slow_every.calibration["consistent"]
    assert slow_every.calibration["decision_ms"] == pytest.approx(plain.calibration["decision_ms"])
    assert slow_every.c1 == pytest.approx(plain.c1)
    # a spell that never ends: no decision or fixed cost, a warning, and the calibration says so
    with pytest.warns(UserWarning, match="the device changed speed while timing"):
        stuck = latency_costs(res, _SlowSpell(ev, per_round, until=10 ** 6), settings=s, samples=24)
    k = stuck.calibration
    assert not k["consistent"] and k["retimed"] and k["decision_ms"] == 0.0 and k["exits_fixed_ms"] == 0.0
    assert stuck.fixed == 0.0 and "contradicted each other twice" in stuck.source
    hd = np.maximum(np.array([k["profile_ms"][f"head:{n}"] for n in res.val.names]) - k["call_ms"], 0.0)
    assert not anchors_consistent(k["no_exit_ms"], k["every_exit_ms"], k["scale"], hd)
    assert stuck.c1 == pytest.approx(k["scale"] * hd)  # the scaled heads alone
    assert stuck.base == pytest.approx(k["no_exit_ms"])


def test_partition_block_searches_split_points_and_emits_a_partitioned_artifact(tmp_path):
    """A space with a partition block: `autoexit search --config` samples split points and placement in the same
    study, emits the chosen plan as partitions/k.pt, and a worker on recorded.npz continues the study."""
    from autoexit.partition import load_partitioned

    cfg = _tiny(tmp_path, space="outer_partition_ci", n_trials=10, pick={"rule": "min_cost", "max_drop": 10.0})
    run = P.run_search(cfg, progress=False)
    trials = run.outer.study.trials
    assert len(trials) == 10 and all("partition" in t.user_attrs for t in trials)
    assert run.outer.settings.cost == "latency"
    chosen = run.outer.chosen_trial.user_attrs["partition"]
    _, part = load_partitioned(run.artifact)  # checksums verified
    assert [p["tier"] for p in part["partitions"]] == chosen["placement"]
    assert sorted(p.name for p in (run.artifact / "partitions").iterdir()) == [
        f"{k}.pt" for k in range(len(chosen["partitions"]))]
    assert (tmp_path / "run" / "profile.json").is_file()
    more = P.run_outer(run.recorded_path, config=cfg, n_trials=13, progress=False)
    assert len(more.study.trials) == 13 and all("partition" in t.user_attrs for t in more.study.trials)
    with pytest.raises(AutoExitError, match="partition block"):
        from autoexit.search.outer import optimize

        optimize(run.outer.recorded, space="outer_partition_ci", n_trials=1, progress=False)


def test_certified_pick_emits_a_model_with_its_guarantee(tmp_path, capsys):
    """``outer.pick.rule: certified`` end to end: trials on train, val certifies, the artifact says so and its
    scripted model makes, sample by sample, the decisions the certificate was computed from."""
    import torch
    import yaml

    from autoexit.search.outer import ExitPlan, Recorded, plan_losses
    from autoexit.subset import simulate_exits

    cfg = _tiny(tmp_path, pick={"rule": "certified", "max_drop": 5.0, "delta": 0.2}, n_trials=24)
    run = P.run_search(cfg, progress=False)
    run_dir = tmp_path / "run"
    rec = Recorded.load(run_dir / "recorded.npz")  # what distributed workers read: with the train split
    assert rec.fit is not None and rec.info["temperature_split"] == "train"
    search = json.loads((run_dir / "search.json").read_text())
    assert search["search_split"] == "train" and search["certificate"]["certified_points"] >= 1
    plan = ExitPlan.from_dict(search["chosen"])
    assert plan == run.outer.chosen and plan.kept
    m = autoexit.load(run.artifact).manifest
    assert m["policy"]["name"] == "outer search, certified" and "probability >= 80%" in m["policy"]["statement"]
    assert m["policy"]["delta"] == 0.2 and m["policy"]["tolerance_percent"] == 5.0
    assert [e["name"] for e in m["exits"]] == list(plan.kept)
    assert [e["threshold"] for e in m["exits"]] == pytest.approx(list(plan.thresholds))
    # the model's temperatures are the train split's, the ones the thresholds were derived with
    assert [e["temperature"] for e in m["exits"]] == pytest.approx(
        [float(rec.temperatures[rec.names.index(n)]) for n in plan.kept])
    assert m["expected"]["val"]["saving"] == pytest.approx(search["val"]["saving"], abs=1e-9)
    assert m["expected"]["test"]["saving"] == pytest.approx(search["test"]["saving"], abs=1e-9)
    # the scripted model answers the val inputs exactly as the simulation the certificate tested
    art = autoexit.load(run.artifact)
    x = run.result.recording.inputs("val")
    with torch.no_grad():
        logits, exit_index = art(x)
    idx = [rec.names.index(n) for n in plan.kept]
    sim = simulate_exits(rec.val.scores[plan.signal][idx], rec.val.pred[idx], rec.val.backbone_pred,
                         np.asarray(plan.thresholds), rec.flops.c1[idx], rec.flops.before[idx], rec.flops.base)
    assert np.array_equal(logits.argmax(1).numpy(), sim.pred)
    assert np.array_equal(exit_index.numpy(), sim.exit_index)
    loss = plan_losses(rec, plan, "val", "agreement")
    assert np.array_equal(loss, (logits.argmax(1).numpy() != rec.val.backbone_pred).astype(float))
    html = (run.artifact / "report.html").read_text()
    assert "Guarantee:" in html and "train cost" in html
    # the CLI prints the certificate (the study is complete: this run adds no trial)
    path = tmp_path / "cert.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(path), "--quiet", "--no-emit"]) == 0
    out = capsys.readouterr().out
    assert "trials on train, certified on val" in out and "guarantee" in out


def test_cross_fitted_certified_pick_scores_its_trials_out_of_fold(tmp_path, monkeypatch, capsys):
    """``enable.cross_fit: 2`` with the certified pick: the trials and the temperatures read out-of-fold train
    predictions (each from a head that never saw the sample), cached in the run directory and reused on resume;
    the emitted model still answers val exactly as the certificate's simulation; bad combinations are refused."""
    import torch
    import yaml

    import autoexit.pipeline as core
    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.pipeline import predictions_for_splits
    from autoexit.search.outer import Recorded, evaluate_plan
    from autoexit.subset import simulate_exits

    cfg = _tiny(tmp_path, pick={"rule": "certified", "max_drop": 5.0, "delta": 0.2}, n_trials=16)
    cfg["enable"]["cross_fit"] = 2
    run = P.run_search(cfg, progress=False)
    run_dir = tmp_path / "run"
    rec = Recorded.load(run_dir / "recorded.npz")
    assert rec.info["fit_predictions"] == "out-of-fold (2 folds)"
    (cache,) = (run_dir / "heads").glob("oof-*.pt")
    base = run.baseline
    names = list(rec.names)
    oof = ExitPredictions(names, torch.load(cache, weights_only=True), base.recording.logits("train"),
                          base.recording.labels("train"))
    # the recorded train split and the temperatures are the out-of-fold ones, not the heads' own
    assert np.array_equal(rec.fit.pred, oof.logits.argmax(-1).numpy())
    assert rec.temperatures == pytest.approx(np.asarray(calibrate_temperatures(oof)), rel=1e-6)
    own = predictions_for_splits(base.recording, base.heads, ["train"])["train"]
    assert (rec.fit.pred != own.logits.argmax(-1).numpy()).any()
    assert run.outer.study.user_attrs["autoexit:fit_predictions"] == "out-of-fold (2 folds)"
    # each trial's numbers are the out-of-fold split's
    for t in run.outer.study.trials[:5]:
        from autoexit.search.outer import ExitPlan

        plan = ExitPlan.from_dict(t.user_attrs["plan"])
        assert t.user_attrs["fit"]["flops"] == pytest.approx(
            evaluate_plan(rec.search_view(), plan, "val", "agreement")["flops"])
    # the artifact: out-of-fold temperatures, the certificate's decisions on val
    m = autoexit.load(run.artifact).manifest
    plan = run.outer.chosen
    assert "out-of-fold" in m["policy"]["fitted_on"]
    assert json.loads((run_dir / "search.json").read_text())["train_predictions"] == "out-of-fold (2 folds)"
    assert "(out-of-fold (2 folds) predictions)" in (run.artifact / "report.html").read_text()
    assert [e["temperature"] for e in m["exits"]] == pytest.approx([float(rec.temperatures[names.index(n)])
                                                                     for n in plan.kept])
    if plan.kept:
        with torch.no_grad():
            logits, exit_index = autoexit.load(run.artifact)(run.result.recording.inputs("val"))
        idx = [names.index(n) for n in plan.kept]
        sim = simulate_exits(rec.val.scores[plan.signal][idx], rec.val.pred[idx], rec.val.backbone_pred,
                             np.asarray(plan.thresholds), rec.flops.c1[idx], rec.flops.before[idx], rec.flops.base)
        assert np.array_equal(logits.argmax(1).numpy(), sim.pred)
        assert np.array_equal(exit_index.numpy(), sim.exit_index)
    # a resumed run reads the cached predictions instead of training the fold heads again

    def no_refit(*a, **k):
        raise AssertionError("out-of-fold predictions recomputed")

    monkeypatch.setattr(core, "out_of_fold_predictions", no_refit)
    again = P.run_search(cfg, progress=False, emit=False)
    assert again.outer.chosen == plan
    path = tmp_path / "oof.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(path), "--quiet", "--no-emit"]) == 0
    assert "trials on train (out-of-fold (2 folds))" in capsys.readouterr().out
    # a damaged, mis-shaped or non-finite cache entry is recomputed, not read
    for damage in (lambda: cache.write_bytes(b"not a tensor"),
                   lambda: torch.save(torch.zeros(len(names), 3, 10), cache),
                   lambda: torch.save(oof.logits.clone().fill_(float("nan")), cache)):
        damage()
        with pytest.raises(AssertionError, match="recomputed"):
            P.run_search(cfg, progress=False, emit=False)
    # the same study on in-sample train predictions is refused, and so is cross_fit without the certified pick
    monkeypatch.undo()
    with pytest.raises(AutoExitError, match="out-of-fold .2 folds. train predictions, these are in-sample"):
        P.run_search({**cfg, "enable": {**cfg["enable"], "cross_fit": 0}}, progress=False, emit=False)
    with pytest.raises(AutoExitError, match="set outer.pick.rule: certified, or drop cross_fit"):
        P.run_search(_tiny(tmp_path, pick={"rule": "min_cost", "max_drop": 5.0}) | {"enable": cfg["enable"]},
                     progress=False)


def test_partitioned_search_with_the_certified_pick(tmp_path):
    """A partition block and ``pick.rule: certified``: trials (split points and placement included) read only the
    train split; val certifies the front, and of the certified settings the one with the lowest *partitioned*
    latency on val (the trial's split and placement, the setting's exit rates) is emitted as a partitioned
    artifact that states the guarantee. When nothing certifies, the backbone alone runs on the source tier."""
    from autoexit.partition import PartitionedObjective, PartitionSpace, load_partitioned, plan_from_search
    from autoexit.search.outer import ExitPlan, OuterSearchResult, PickRule, Recorded, ladder, load_space

    cfg = _tiny(tmp_path, space="outer_partition_ci", n_trials=16,
                pick={"rule": "certified", "max_drop": 5.0, "delta": 0.2})
    run = P.run_search(cfg, progress=False)
    res = run.outer
    trials = res.study.trials
    assert all("fit" in t.user_attrs and "val" not in t.user_attrs and "partition" in t.user_attrs for t in trials)
    c = res.certificate
    assert c is not None and c["certified_points"] >= 1
    # brute force: every certified setting's partitioned latency on val, through a fresh objective
    rec = Recorded.load(tmp_path / "run" / "recorded.npz")
    part = {**load_space("outer_partition_ci").partition, "profile": str(tmp_path / "run" / "profile.json")}
    obj = PartitionedObjective(rec, PartitionSpace.from_dict(part), run.outer.space, res.settings)
    by_number = {t.number: t for t in trials}
    best = None
    for row in c["tested"]:
        if not row["certified"]:
            continue
        t = by_number[row["trial"]]
        steps = {p.step: p for p in ladder(obj.recorded, ExitPlan.from_dict(t.user_attrs["plan"]))}
        v = obj.val_cost(t, steps[row["step"]])
        if best is None or v < best[0] - 1e-12:
            best = (v, t.number, row["step"])
    assert (res.chosen_trial.number, res.chosen.step) == best[1:]
    # the artifact: the chosen trial's split points and placement, the plan's thresholds, the guarantee
    art, pm_ = load_partitioned(run.artifact)
    chosen = res.chosen_trial.user_attrs["partition"]
    assert [p["tier"] for p in pm_["partitions"]] == chosen["placement"]
    m = art.manifest
    assert m["policy"]["name"] == "partition" and m["policy"]["source_policy"]["name"] == "outer search, certified"
    assert "probability >= 80%" in m["policy"]["statement"] and m["policy"]["delta"] == 0.2
    assert sorted(e["threshold"] for e in m["exits"] if not e["always_exits"]) == pytest.approx(
        sorted(res.chosen.thresholds))
    # the partitioned model answers val as the simulation the certificate tested (train temperatures)
    import torch

    from autoexit.subset import simulate_exits

    plan = res.chosen
    idx = [rec.names.index(n) for n in plan.kept]
    assert [e["temperature"] for e in m["exits"] if not e["always_exits"]] == pytest.approx(
        [float(rec.temperatures[i]) for i in idx])
    with torch.no_grad():
        logits, exit_index = art(run.result.recording.inputs("val"))
    sim = simulate_exits(rec.val.scores[plan.signal][idx], rec.val.pred[idx], rec.val.backbone_pred,
                         np.asarray(plan.thresholds), rec.flops.c1[idx], rec.flops.before[idx], rec.flops.base)
    assert np.array_equal(logits.argmax(1).numpy(), sim.pred)
    assert np.array_equal(exit_index.numpy(), sim.exit_index)
    # nothing certified (a budget no setting meets): no exit, the whole backbone on the source tier
    none = OuterSearchResult.from_study(res.study, obj.recorded, pick=PickRule("certified", 1e-6, delta=0.2),
                                        cost_of=obj.val_cost)
    assert none.chosen_trial is None and not none.chosen.kept and none.certificate["certified_points"] == 0
    plan = plan_from_search(none, PartitionSpace.from_dict(part))
    topo = PartitionSpace.from_dict(part).topology
    assert plan.partitions == (len(rec.names) + 1,) and plan.placement == (topo.names[topo.source - 1],)
