"""The outer search's certified pick: trials scored on train only, the front certified on val (Learn-then-Test)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="the outer search needs the 'search' extra (optuna)")

from test_outer_support import make_recorded, synthetic_split  # noqa: E402

from autoexit.calibrate import assign_thresholds  # noqa: E402
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


def test_certificate_is_fixed_sequence_over_the_front_and_its_ladders(rec):
    """Brute force: the front in train-disagreement order, each point after its safer ladder steps, walked by
    fixed-sequence testing on val; the cheapest certified setting on val is deployed."""
    from autoexit.subset import simulate_exits

    res = _run(rec)
    order = sorted(res.front, key=lambda t: (1 - t.user_attrs["fit"]["agreement"], -t.user_attrs["fit"]["flops"],
                                             t.number))
    # with accuracy 'agreement' the drop is the disagreement: the front is Optuna's own (cost, drop) front
    assert {t.number for t in res.front} <= {t.number for t in res.study.best_trials}
    seq = []
    for t in order:
        plan = O.ExitPlan.from_dict(t.user_attrs["plan"])
        idx = [rec.names.index(n) for n in plan.kept]
        base = assign_thresholds(rec.fit.scores[plan.signal][idx], rec.fit.agree[idx], plan.tolerance, plan.scheme,
                                 list(plan.kept), "total").thresholds if idx else np.zeros(0)
        assert np.allclose(base, plan.thresholds)  # the plan's thresholds were derived on train
        for f in (*O.LADDER, 1.0):
            if not idx and f != 1.0:
                continue
            # each step: the plan's exits, each letting out the top f of the train inputs its threshold passes
            thr = [] if f < 1.0 else list(base)  # the point itself keeps its own thresholds
            for i, th in zip(idx if f < 1.0 else [], base):
                passing = sorted(rec.fit.scores[plan.signal][i][rec.fit.scores[plan.signal][i] >= th])
                keep = int(np.floor(f * len(passing)))
                thr.append(max(th, passing[-keep] if keep else np.inf) if passing else th)
            seq.append((t.number, f, plan.signal, idx, np.asarray(thr, dtype=float)))
    losses, costs = [], []
    for _n, _f, sig, idx, thr in seq:
        out = simulate_exits(rec.val.scores[sig][idx], rec.val.pred[idx], rec.val.backbone_pred, thr,
                             rec.flops.c1[idx], rec.flops.before[idx], rec.flops.base)
        losses.append((out.pred != rec.val.backbone_pred).astype(float))
        costs.append(out.flops.mean())
    rc = fixed_sequence(np.stack(losses), 0.02, 0.1, "binomial")
    n_cert = rc.index + 1
    assert n_cert >= 2, "the synthetic front should certify a few settings"
    c = res.certificate
    assert c["certified_points"] == n_cert and c["sequence_length"] == len(seq)
    assert c["tested_points"] == min(len(seq), n_cert + 1)  # the walk stops at the first failure
    assert [(x["trial"], x["step"]) for x in c["tested"]] == [(n, f) for n, f, *_ in seq[: c["tested_points"]]]
    best = min(range(n_cert), key=lambda j: (costs[j], losses[j].mean(), j))
    assert res.chosen_trial.number == seq[best][0]
    assert res.chosen.step == seq[best][1] and res.chosen.kept == tuple(
        O.ExitPlan.from_dict(res.chosen_trial.user_attrs["plan"]).kept)
    assert np.allclose(res.chosen.thresholds, seq[best][4])
    assert res.val == O.evaluate_plan(rec, res.chosen, "val", "agreement")
    assert res.test == O.evaluate_plan(rec, res.chosen, "test", "agreement")
    assert "probability >= 90%" in c["statement"] and "2 %" in c["statement"]
    # the ladder's steps only make a point safer: each step lets at most as many samples exit on train
    plan = O.ExitPlan.from_dict(order[-1].user_attrs["plan"])
    exits = [O.evaluate_plan(rec.search_view(), p, "val", "agreement")["saving"] for p in O.ladder(rec, plan)]
    assert exits == sorted(exits) and exits[0] < exits[-1]
    # a step round-trips through the plan's dict and is rebuilt from the train split when applied
    step = O.ladder(rec, plan)[2]
    assert O.ExitPlan.from_dict(step.to_dict()) == step and "step" in step.describe()
    assert np.allclose(O.subset_result(rec, step, split="fit").thresholds.thresholds, step.thresholds)
    rows = {r["trial"]: r for r in res.front_rows}
    certified_points = {x["trial"] for x in c["tested"] if x["certified"] and x["step"] == 1.0}
    assert {n for n, r in rows.items() if r["certified"]} == certified_points
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
    points = [x["trial"] for x in sorted(c["tested"], key=lambda x: x["order"]) if x["step"] == 1.0]
    cost = [next(t.user_attrs["fit"]["flops"] for t in res.front if t.number == k) for k in points]
    assert len(points) >= 2 and cost == sorted(cost, reverse=True)
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
    point_risk = [O.plan_losses(big, O.ExitPlan.from_dict(t.user_attrs["plan"]), "val", "agreement").mean()
                  for t in res.front]
    assert min(point_risk) < 0.02 < max(point_risk), "the front should straddle the budget"
    risk: dict = {}
    rng = np.random.default_rng(0)
    draws, bad, chosen = 150, 0, set()
    pick = O.PickRule("certified", 2.0, delta=0.1)
    settings = O.OuterSettings(accuracy="agreement", pick=pick)
    for _ in range(draws):
        i = rng.integers(0, pop.n, 2000)
        cal = pop.take(i)
        t, plan, _cert = O.certify_front(res.front, replace(rec, val=cal), pick, settings)
        if t is not None:
            chosen.add((t.number, plan.tolerance))
            if plan.tolerance not in risk.setdefault(t.number, {}):
                risk[t.number][plan.tolerance] = O.plan_losses(big, plan, "val", "agreement").mean()
            bad += risk[t.number][plan.tolerance] > 0.02
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
    # nor can a study scored on in-sample train predictions be continued on out-of-fold ones (or the reverse)
    oof = replace(rec, fit=synthetic_split(7, rec.fit.n), info={**rec.info, "fit_predictions": "out-of-fold (2 folds)"})
    with pytest.raises(AutoExitError, match="in-sample train predictions, these are out-of-fold"):
        O.optimize(oof, storage=storage, study_name="c", n_trials=3, progress=False, settings=CERT)
    O.optimize(oof, storage=storage, study_name="o", n_trials=3, progress=False, settings=CERT)
    with pytest.raises(AutoExitError, match="out-of-fold .2 folds. train predictions, these are in-sample"):
        O.optimize(rec, storage=storage, study_name="o", n_trials=3, progress=False, settings=CERT)


def test_re_picking_a_finished_study_uses_its_own_settings(rec):
    """``from_study`` without an objective reads the settings the study stored (here: label-free accuracy)."""
    res = _run(rec, n_trials=40)
    again = O.OuterSearchResult.from_study(res.study, rec)
    assert again.certificate["risk"] == "disagreement" and again.chosen == res.chosen
    assert again.val == res.val


def test_a_cross_fitted_enable_result_gives_out_of_fold_trials(digits_backbone, digits_data, tmp_path):
    """``Recorded.from_result(result, fit=True)`` on ``enable(cross_fit=2)``: the train split the trials read is the
    result's out-of-fold predictions, temperatures fitted there; the chosen plan applies to that result (and is
    refused on one without them); bad ``fit_predictions`` are refused in one line."""
    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.distill import TrainConfig
    from autoexit.pipeline import EnableConfig, enable

    res = enable(digits_backbone, digits_data, config=EnableConfig(
        tolerance=2.0, cache_dir=str(tmp_path / "c"), cross_fit=2, train=TrainConfig(epochs=2, batch_size=128)),
        progress=False)
    assert res.fit_predictions is not None
    rec = O.Recorded.from_result(res, fit=True)
    assert rec.info["fit_predictions"] == "out-of-fold (2 folds)"
    assert np.array_equal(rec.fit.pred, res.fit_predictions.logits.argmax(-1).numpy())
    assert rec.temperatures == pytest.approx(np.asarray(calibrate_temperatures(res.fit_predictions)), rel=1e-6)
    out = _run(rec, n_trials=12).apply(res)
    assert "out-of-fold" in out.extra["policy"]["fitted_on"] and out.fit_predictions is res.fit_predictions
    assert [out.temperatures[n] for n in rec.names] == pytest.approx(list(rec.temperatures), rel=1e-6)
    with pytest.raises(AutoExitError, match="lacks"):
        _run(rec, n_trials=2).apply(replace(res, fit_predictions=None))
    bad = ExitPredictions(rec.names[:-1], res.fit_predictions.logits[:-1], res.fit_predictions.backbone_logits)
    with pytest.raises(AutoExitError, match="fit_predictions must hold the train split's logits of exits"):
        O.Recorded.from_heads(res.backbone, res.recording, res.heads, fit=True, fit_predictions=bad, folds=2)
    with pytest.raises(AutoExitError, match="folds >= 2"):
        O.Recorded.from_heads(res.backbone, res.recording, res.heads, fit=True, fit_predictions=res.fit_predictions)
    with pytest.raises(AutoExitError, match="pass fit=True too"):
        O.Recorded.from_heads(res.backbone, res.recording, res.heads, fit_predictions=res.fit_predictions)
