"""The outer search's certified pick: trials scored on train only, the front certified on val (Learn-then-Test)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="the outer search needs the 'search' extra (optuna)")

from test_outer_support import make_recorded, synthetic_split  # noqa: E402

from autoexit.errors import AutoExitError  # noqa: E402
from autoexit.policies.risk import fixed_sequence  # noqa: E402
from autoexit.search import outer as O  # noqa: E402

CERT = {"pick": {"rule": "certified", "max_drop": 2.0, "delta": 0.1}, "accuracy": "agreement"}


@pytest.fixture(scope="module")
def rec():
    return make_recorded(seed=4, exits=5, n=2000, fit=True)


def _run(rec, settings=CERT, n_trials=80, seed=0):
    return O.optimize(rec, storage=optuna.storages.InMemoryStorage(), n_trials=n_trials, progress=False,
                      sampler=optuna.samplers.RandomSampler(seed=seed), settings=settings)


def test_trials_read_only_the_train_split(rec):
    """Two recordings that differ only in val give the same study, trial by trial; only the certificate moves."""
    other = replace(rec, val=synthetic_split(99, rec.val.n))
    a, b = _run(rec), _run(other)
    ta, tb = a.study.trials, b.study.trials
    assert [(t.params, t.values, t.user_attrs["plan"]) for t in ta] == [(t.params, t.values, t.user_attrs["plan"])
                                                                         for t in tb]
    # each trial's metrics are the train split's, under the 'fit' attr; no trial has val numbers
    view = rec.search_view()
    for t in ta[:10]:
        assert "val" not in t.user_attrs
        plan = O.ExitPlan.from_dict(t.user_attrs["plan"])
        assert t.user_attrs["fit"]["drop_pp"] == pytest.approx(O.evaluate_plan(view, plan, "val", "agreement")["drop_pp"])
        # the thresholds were derived on train: re-deriving them there reproduces them
        assert O.subset_result(rec, plan, split="fit").thresholds.thresholds == pytest.approx(list(plan.thresholds))
    assert a.study.user_attrs["autoexit:search_split"] == "train"
    assert [t.number for t in a.front] == [t.number for t in b.front]


def test_certificate_is_fixed_sequence_over_the_front_in_train_drop_order(rec):
    res = _run(rec)
    front = res.front
    order = sorted(front, key=lambda t: (1 - t.user_attrs["fit"]["agreement"], -t.user_attrs["fit"]["flops"], t.number))
    # with accuracy 'agreement' the drop is the disagreement: the front is Optuna's own (cost, drop) front
    assert {t.number for t in front} <= {t.number for t in res.study.best_trials}
    # brute force: each front point's disagreement on val, tested in that order
    losses = []
    for t in order:
        plan = O.ExitPlan.from_dict(t.user_attrs["plan"])
        idx = [rec.names.index(n) for n in plan.kept]
        from autoexit.subset import simulate_exits

        out = simulate_exits(rec.val.scores[plan.signal][idx], rec.val.pred[idx], rec.val.backbone_pred,
                             np.asarray(plan.thresholds), rec.flops.c1[idx], rec.flops.before[idx], rec.flops.base)
        losses.append((out.pred != rec.val.backbone_pred).astype(float))
    rc = fixed_sequence(np.stack(losses), 0.02, 0.1, "binomial")
    assert rc.index >= 1, "the synthetic front should certify a few points"
    certified = order[: rc.index + 1]
    assert res.certificate["certified_points"] == len(certified)
    assert {c["trial"] for c in res.certificate["tested"] if c["certified"]} == {t.number for t in certified}
    best = min(certified, key=lambda t: (O.evaluate_plan(rec, O.ExitPlan.from_dict(t.user_attrs["plan"]), "val",
                                                         "agreement")["flops"], t.number))
    assert res.chosen_trial.number == best.number
    assert res.val == O.evaluate_plan(rec, res.chosen, "val", "agreement")
    assert res.test == O.evaluate_plan(rec, res.chosen, "test", "agreement")
    assert "probability >= 90%" in res.certificate["statement"] and "2 %" in res.certificate["statement"]
    rows = {r["trial"]: r for r in res.front_rows}
    assert all(rows[t.number]["certified"] for t in certified)
    assert sum(r["certified"] for r in res.front_rows) == len(certified)
    d = res.to_dict()
    assert d["search_split"] == "train" and d["certificate"]["n"] == rec.val.n
    html = "".join(b for _, b in res.report_sections())
    assert "Guarantee:" in html and "train cost" in html
    assert res.pareto_figure() is not None and res.importances()


def test_labelled_certificate_tests_the_accuracy_drop(rec):
    res = _run(rec, {"pick": {"rule": "certified", "max_drop": 1.0}, "accuracy": "gt"}, n_trials=60)
    c = res.certificate
    # the tested points are the train front in (cost, disagreement), most costly first
    fit = [(t.user_attrs["fit"]["flops"], 1 - t.user_attrs["fit"]["agreement"]) for t in res.front]
    assert O.pareto_mask(np.array([f[0] for f in fit]), np.array([f[1] for f in fit])).all()
    order = [x["trial"] for x in sorted(c["tested"], key=lambda x: x["order"])]
    cost = {t.number: t.user_attrs["fit"]["flops"] for t in res.front}
    assert [cost[k] for k in order] == sorted(cost.values(), reverse=True)
    assert c["risk"] == "drop" and c["method"] == "wsr" and "accuracy drop" in c["statement"]
    assert c["certified_points"] >= 1 and res.chosen.kept
    # the per-sample loss is 1[backbone right] - 1[plan right]: its mean is the labelled drop
    loss = O.plan_losses(rec, res.chosen, "val", "gt")
    assert set(np.unique(loss)) <= {-1.0, 0.0, 1.0}
    assert 100 * loss.mean() == pytest.approx(res.val["gt_drop_pp"] if "gt_drop_pp" in res.val else res.val["drop_pp"])


def test_nothing_certified_emits_no_exit(rec):
    # a budget no point can be certified at on 2,000 samples
    res = _run(rec, {"pick": {"rule": "certified", "max_drop": 0.01}, "accuracy": "agreement"}, n_trials=30)
    assert res.chosen_trial is None and res.chosen.kept == ()
    assert res.val["saving"] == 0.0 and res.val["drop_pp"] == 0.0
    assert "backbone alone" in res.certificate["statement"]
    assert res.to_dict()["chosen_trial"] is None
    assert "no trial chosen" in "".join(b for _, b in res.report_sections())


def test_the_certified_pick_keeps_its_budget_over_calibration_draws(rec):
    """The front is fixed (chosen on train); over many independent val draws from a population, the emitted
    point's population disagreement exceeds the budget in at most about delta of the draws."""
    res = _run(rec, n_trials=120)
    pop = synthetic_split(7, 200_000)
    big = replace(rec, val=pop)
    risk = {t.number: O.plan_losses(big, O.ExitPlan.from_dict(t.user_attrs["plan"]), "val", "agreement").mean()
            for t in res.front}
    assert min(risk.values()) < 0.02 < max(risk.values()), "the front should straddle the budget"
    rng = np.random.default_rng(0)
    draws, bad, chosen = 150, 0, set()
    pick = O.PickRule("certified", 2.0, delta=0.1)
    settings = O.OuterSettings(accuracy="agreement", pick=pick)
    for _ in range(draws):
        i = rng.integers(0, pop.n, 2000)
        cal = O.SplitData(pop.pred[:, i], {k: v[:, i] for k, v in pop.scores.items()}, pop.backbone_pred[i],
                          pop.labels[i])
        t, _cert = O.certify_front(res.front, replace(rec, val=cal), pick, settings)
        if t is not None:
            chosen.add(t.number)
            bad += risk[t.number] > 0.02
    rate = bad / draws
    assert rate <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / draws), rate
    assert len(chosen) >= 2  # the emitted point moves with the draw: the case the prefix-wide guarantee is for


def test_bad_input_is_refused_clearly(rec):
    with pytest.raises(AutoExitError, match="max_drop"):
        O.PickRule("certified", None)
    with pytest.raises(AutoExitError, match="z"):
        O.PickRule("certified", 1.0, z=1.0)
    with pytest.raises(AutoExitError, match="delta"):
        O.PickRule("certified", 1.0, delta=1.5)
    with pytest.raises(AutoExitError, match="max_cost_fraction"):
        O.PickRule("certified", 1.0, max_cost_fraction=0.5)
    with pytest.raises(AutoExitError, match="pick rule must be one of"):
        O.PickRule("best")
    no_fit = make_recorded(seed=4, exits=5, n=500)
    with pytest.raises(AutoExitError, match="fit=True"):
        _run(no_fit, n_trials=2)
    # a study scored on val cannot be continued by the certified pick (or the reverse)
    storage = optuna.storages.InMemoryStorage()
    O.optimize(rec, storage=storage, study_name="s", n_trials=3, progress=False)
    with pytest.raises(AutoExitError, match="scored its trials on the val split"):
        O.optimize(rec, storage=storage, study_name="s", n_trials=3, progress=False, settings=CERT)
    O.optimize(rec, storage=storage, study_name="c", n_trials=3, progress=False, settings=CERT)
    with pytest.raises(AutoExitError, match="scored its trials on the train split"):
        O.optimize(rec, storage=storage, study_name="c", n_trials=3, progress=False)
