"""The Optuna outer search on synthetic recorded predictions: schemes, selection, constraints, pick, resume."""

from __future__ import annotations

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="the outer search needs the 'search' extra (optuna)")

from test_outer_support import make_recorded  # noqa: E402

from autoexit.calibrate import assign_thresholds, split_budget  # noqa: E402
from autoexit.errors import AutoExitError  # noqa: E402
from autoexit.search import outer as O  # noqa: E402
from autoexit.subset import best_subset  # noqa: E402


@pytest.fixture(scope="module")
def rec():
    return make_recorded(seed=1, exits=5, n=1500)


def _memory_study(obj, sampler=None):
    st = optuna.create_study(directions=obj.directions, sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    return st


# --------------------------------------------------------------------------- split schemes


@pytest.mark.parametrize("scheme", ["halving", "equal", "weights"])
def test_each_split_scheme_spends_its_share_of_the_tolerance(rec, scheme):
    t = 2.0
    params = {"tolerance": t, "scheme": scheme, "selection": "flags", "signal": "max_softmax",
              **{f"include:{n}": n in ("layer0", "layer2", "layer4") for n in rec.names}}
    weights = (0.2, 1.0, 0.5)
    if scheme == "weights":
        params.update({f"weight_{j}": w for j, w in enumerate(weights)})
    plan = O.plan_from_params(rec, params)
    idx = [0, 2, 4]
    assert plan.kept == ("layer0", "layer2", "layer4")
    split = weights if scheme == "weights" else scheme
    assert plan.scheme == split
    ref = assign_thresholds(rec.val.scores["max_softmax"][idx], rec.val.agree[idx], t, split, basis="total")
    np.testing.assert_allclose(plan.thresholds, ref.thresholds)
    # each exit lets at most its share of T (in samples) disagree with the backbone on val
    shares = split_budget(t / 100, 3, split)
    assert np.all(ref.wrong <= np.floor(shares * rec.val.n + 1e-9))
    m = O.evaluate_plan(rec, plan, "val", accuracy="agreement")
    assert m["drop_pp"] <= t + 1e-9
    assert m["drop_kind"] == "agreement" and 0 < m["flops_fraction"] < 1.05


def test_schemes_differ_and_halving_is_the_default(rec):
    base = {"tolerance": 2.0, "selection": "ranking", "k": 3}
    plans = {s: O.plan_from_params(rec, {**base, "scheme": s}) for s in ("halving", "equal")}
    assert plans["halving"].kept == plans["equal"].kept or plans["halving"].thresholds != plans["equal"].thresholds
    assert O.plan_from_params(rec, base, space=O.OuterSpace(schemes=("halving",))).scheme == "halving"


def test_ranking_takes_the_k_s_best_subset_of_size_k(rec):
    s, a = rec.val.scores["max_softmax"], rec.val.agree
    for k in (1, 2, 3):
        plan = O.plan_from_params(rec, {"tolerance": 1.5, "scheme": "halving", "selection": "ranking", "k": k})
        ref = best_subset(s, a, rec.flops.c1, rec.flops.c2, 1.5, "halving", "total", rec.names, rec.flops.base,
                          size=k)
        assert list(plan.kept) == ref.names and len(plan.kept) == k
        np.testing.assert_allclose(plan.thresholds, ref.thresholds.thresholds)


def test_fixed_rule_is_the_core_choice(rec):
    plan = O.fixed_rule(rec, 1.0)
    ref = best_subset(rec.val.scores["max_softmax"], rec.val.agree, rec.flops.c1, rec.flops.c2, 1.0, "halving",
                      "total", rec.names, rec.flops.base)
    assert list(plan.kept) == ref.names
    m = O.evaluate_plan(rec, plan, "val")
    assert m["saving"] == pytest.approx(ref.saving, abs=1e-9)  # K(S) / (n x base) is the simulated saving


# --------------------------------------------------------------------------- objective and constraints


def test_objective_sets_constraints_and_attrs(rec):
    settings = O.OuterSettings(budgets=O.Budgets(max_drop=1.0, max_flops=60e6, max_head_param_bytes=200_000))
    obj = O.make_objective(rec, "outer_ci", settings)
    st = _memory_study(obj)
    st.optimize(obj, n_trials=40)
    seen_infeasible = seen_feasible = False
    for t in st.trials:
        v = t.user_attrs["val"]
        c = t.constraints
        assert set(c) == {"max_drop", "max_flops", "max_head_param_bytes", "exits"}
        assert c["max_drop"] == pytest.approx(v["drop_pp"] - 1.0)
        assert (c["max_flops"] <= 0) == (v["flops"] <= 60e6)
        assert (c["max_head_param_bytes"] <= 0) == (v["head_param_bytes"] <= 200_000)
        assert (c["exits"] <= 0) == (1 <= v["k"] <= 3)
        assert t.values == [pytest.approx(v["flops"]), pytest.approx(v["drop_pp"])]
        feasible = all(x <= 0 for x in c.values())
        seen_feasible |= feasible
        seen_infeasible |= not feasible
        plan = O.ExitPlan.from_dict(t.user_attrs["plan"])
        assert O.evaluate_plan(rec, plan, "val")["flops"] == pytest.approx(v["flops"])
    assert seen_feasible and seen_infeasible
    # Optuna's own front honours the constraints too
    assert all(all(x <= 0 for x in t.constraints.values()) for t in st.best_trials)


def test_latency_cost_and_its_budget(rec):
    settings = O.OuterSettings(cost="latency", budgets=O.Budgets(max_latency_ms=6.0))
    obj = O.make_objective(rec, "outer_ci", settings)
    assert obj.metric_names == ["latency_ms", "drop_pp"]
    st = _memory_study(obj)
    st.optimize(obj, n_trials=10)
    for t in st.trials:
        assert t.values[0] == pytest.approx(t.user_attrs["val"]["latency_ms"])
        assert t.constraints["max_latency_ms"] == pytest.approx(t.user_attrs["val"]["latency_ms"] - 6.0)


def test_budget_needing_latency_without_it_is_a_clear_error(rec):
    from dataclasses import replace

    no_lat = replace(rec, latency=None)
    with pytest.raises(AutoExitError, match="latency"):
        O.make_objective(no_lat, None, O.OuterSettings(budgets=O.Budgets(max_latency_ms=1.0)))
    with pytest.raises(AutoExitError, match="latency"):
        O.make_objective(no_lat, None, O.OuterSettings(cost="latency"))


def test_label_free_drop_is_disagreement():
    rec = make_recorded(seed=2, exits=3, n=400, labels=False)
    res = O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=15, progress=False,
                     sampler=optuna.samplers.RandomSampler(seed=0), space="outer_ci")
    assert res.val["drop_kind"] == "agreement" and res.val["accuracy"] is None
    assert res.val["drop_pp"] == pytest.approx(res.val["disagreement_pp"])
    with pytest.raises(AutoExitError, match="labelled"):
        O.make_objective(rec, None, O.OuterSettings(accuracy="gt"))


# --------------------------------------------------------------------------- optimize, the front and the pick


def test_optimize_reports_front_pick_and_test(rec, tmp_path):
    res = O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=60, progress=False,
                     settings={"pick": {"max_drop": 1.0}, "budgets": {"max_drop": 3.0}})
    study, plan = res  # the Optuna-style pair
    assert study.metric_names == ["flops", "drop_pp"]
    assert study.user_attrs["autoexit:recorded"] == rec.fingerprint
    # the baseline (the core's fixed rule) ran first
    first = study.trials[0]
    assert "baseline" in first.user_attrs
    assert O.ExitPlan.from_dict(first.user_attrs["plan"]).kept == O.fixed_rule(rec, 1.0).kept
    # our front is Optuna's front (feasible, non-dominated), one row per distinct point
    optuna_front = {(t.values[0], t.values[1]) for t in study.best_trials}
    ours = {(t.user_attrs["val"]["flops"], t.user_attrs["val"]["drop_pp"]) for t in res.front}
    assert ours == optuna_front
    # the pick: the cheapest front point with val drop <= 1
    ok = [t for t in res.front if t.user_attrs["val"]["drop_pp"] <= 1.0]
    assert res.chosen_trial.number == min(ok, key=lambda t: t.user_attrs["val"]["flops"]).number
    assert plan == O.ExitPlan.from_dict(res.chosen_trial.user_attrs["plan"])
    assert res.val["drop_pp"] <= 1.0
    # test numbers are reported apart, computed from the test split
    assert res.test == O.evaluate_plan(rec, plan, "test")
    assert all("test_drop_pp" in r for r in res.front_rows)
    # the search is at least as good as the fixed rule on val (the fixed rule is one of its trials)
    assert res.val["flops"] <= res.baseline["val"]["flops"] + 1e-6 or res.baseline["val"]["drop_pp"] > 1.0
    d = res.to_dict()
    assert d["chosen_trial"] == res.chosen_trial.number and d["front"] and "cost" in d["importances"]
    assert res.pareto_figure() is not None


def test_pick_rules(rec):
    res = O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=40, progress=False,
                     sampler=optuna.samplers.RandomSampler(seed=3))
    study = res.study
    r2 = O.OuterSearchResult.from_study(study, rec, pick=O.PickRule("min_drop", None, 0.6))
    assert r2.val["flops_fraction"] <= 0.6 + 1e-9
    cand = [t for t in r2.front if t.user_attrs["val"]["flops_fraction"] <= 0.6]
    assert r2.val["drop_pp"] == pytest.approx(min(t.user_attrs["val"]["drop_pp"] for t in cand))
    # a z > 0 safety margin picks a point at least as accurate
    r3 = O.OuterSearchResult.from_study(study, rec, pick=O.PickRule("min_cost", 1.0, z=2.0))
    assert r3.val["drop_pp"] + 2 * r3.val["drop_se_pp"] <= 1.0 + 1e-9
    assert r3.val["flops"] >= res.val["flops"] - 1e-6
    with pytest.raises(AutoExitError, match="max_drop"):
        O.OuterSearchResult.from_study(study, rec, pick=O.PickRule("min_cost", -50.0))


def test_scalar_objective(rec):
    res = O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=20, progress=False,
                     settings={"objective": "scalar", "drop_weight": 0.2})
    assert res.study.metric_names == ["scalarised"] and len(res.study.directions) == 1
    t = res.study.trials[-1]
    v = t.user_attrs["val"]
    assert t.value == pytest.approx(v["flops_fraction"] + 0.2 * v["drop_pp"])


def test_bring_your_own_study_and_sampler(rec):
    obj = O.make_objective(rec)
    study = optuna.create_study(directions=obj.directions, sampler=optuna.samplers.RandomSampler(seed=5))
    seen = []
    res = O.optimize(rec, study, n_trials=12, progress=False, callbacks=[lambda s, t: seen.append(t.number)])
    assert res.study is study and len(study.trials) == 12 and seen == list(range(12))
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)  # the user's sampler is kept
    wrong = optuna.create_study(direction="maximize")
    with pytest.raises(AutoExitError, match="directions"):
        O.optimize(rec, wrong, n_trials=1, progress=False)


def test_resume_continues_the_same_study_and_keeps_finished_trials(rec, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r1 = O.optimize(rec, storage=url, study_name="s", max_trials=12, progress=False)
    snap = {t.number: (t.params, t.values, t.user_attrs["plan"]) for t in r1.study.trials}
    assert len(snap) == 12
    r2 = O.optimize(rec, storage=url, study_name="s", max_trials=20, progress=False)
    assert len(r2.study.trials) == 20
    assert r2.timings["trials_this_call"] == 8
    for t in r2.study.trials[:12]:
        assert (t.params, t.values, t.user_attrs["plan"]) == snap[t.number]
    r3 = O.optimize(rec, storage=url, study_name="s", max_trials=20, progress=False)  # cap reached: no new trial
    assert len(r3.study.trials) == 20 and r3.timings["trials_this_call"] == 0
    other = make_recorded(seed=9, exits=5, n=1500)
    with pytest.raises(AutoExitError, match="fingerprint"):
        O.optimize(other, storage=url, study_name="s", max_trials=25, progress=False)


def test_default_storage_is_sqlite_in_the_run_dir(rec, tmp_path):
    res = O.optimize(rec, run_dir=tmp_path / "run", study_name="x", max_trials=3, progress=False)
    assert (tmp_path / "run" / "optuna.db").is_file()
    assert O._storage_url(res.study._storage).startswith("sqlite:///")
    journal = O.optimize(rec, storage=str(tmp_path / "j.log"), study_name="j", max_trials=3, progress=False)
    assert len(journal.study.trials) == 3 and (tmp_path / "j.log").is_file()


def test_attach_and_apply_need_the_source(rec):
    res = O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=8, progress=False)
    with pytest.raises(AutoExitError, match="EnableResult"):
        res.apply()


# --------------------------------------------------------------------------- spaces and settings as data


def test_spaces_load_from_search_spaces_and_reject_bad_input(tmp_path):
    default = O.load_space("outer")
    assert default.schemes == ("halving", "equal", "weights") and default.selection == ("ranking", "flags")
    assert O.load_space(None) == default
    assert O.load_space("outer_ci").exits == (1, 3)
    with pytest.raises(AutoExitError, match="no outer search space"):
        O.load_space("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split_scheme: [halving, thirds]\n")
    with pytest.raises(AutoExitError, match="thirds"):
        O.load_space(bad)
    bad.write_text("tolerance: {low: 0.1, high: 2}\npartition: {split_points: [3]}\n")
    with pytest.raises(AutoExitError, match="partition"):
        O.load_space(bad)
    with pytest.raises(AutoExitError, match="unknown outer search setting"):
        O.OuterSettings.from_dict({"n_trails": 3})
    with pytest.raises(AutoExitError, match="budget max_drop"):
        O.Budgets.from_dict({"max_drop": -1})
    with pytest.raises(AutoExitError, match="min_drop"):
        O.PickRule.from_dict({"rule": "min_drop"})


def test_redact_hides_passwords():
    assert O._redact("postgresql://bob:secret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert O._redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_trial_cap_is_exact_in_one_process(rec):
    study = optuna.create_study(directions=["minimize", "minimize"])
    obj = O.make_objective(rec)
    cap = O.TrialCap(7, O._lock_for(study._storage, "t"))
    res = O.optimize(rec, study, max_trials=7, n_trials=100, progress=False)
    assert len(res.study.trials) == 7 and cap.n_trials == 7 and obj is not None


def test_optuna_dashboard_reads_the_storage(rec, tmp_path):
    """``optuna-dashboard <storage URL>`` serves the study the search wrote (REST API of the dashboard)."""
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    exe = shutil.which("optuna-dashboard")
    if exe is None:
        pytest.skip("optuna-dashboard is not installed (pip install 'autoexit[search]')")
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    O.optimize(rec, storage=url, study_name="dash", max_trials=4, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([exe, url, "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.25)
        assert body is not None, "the dashboard never answered"
        studies = {s["study_name"]: s for s in __import__("json").loads(body)["study_summaries"]}
        assert "dash" in studies and studies["dash"]["directions"] == ["minimize", "minimize"]
    finally:
        p.terminate()
        p.wait(timeout=10)
