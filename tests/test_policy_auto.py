"""The ``auto`` policy: it deploys the cheapest of several guaranteed policies and keeps the guarantee.

- ``select="cal"``: every candidate is certified at delta / m and the cheapest on the calibration data is
  deployed; over many calibration draws its *population* risk exceeds the tolerance in at most delta of them.
- ``select="fit"``: the choice is made on the fit data and does not move with the calibration data.
- Recertifying a fitted ``auto`` on new calibration data is the same as fitting it afresh there.
- A candidate label ``NAME[key=value,...]`` lists one policy twice under other options (the labelled gate beside
  the label-free one), and the deployed policy is named by its label.
- Bad candidates and options are refused in one line, by the policy, ``EnableConfig`` and the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_policy import _backbone_wrong_on_class

from autoexit.errors import AutoExitError
from autoexit.pipeline import EnableConfig
from autoexit.policies import (
    AUTO_CANDIDATES,
    AutoPolicy,
    ExitCosts,
    ExitTable,
    GatePolicy,
    PolicyContext,
    make_policy,
    needs_activation_stats,
    parse_candidate,
    split_candidates,
)

CANDS = ["max_softmax", "margin", "patience"]
COSTS = ExitCosts([1.0, 1.0, 1.0], [20.0, 45.0, 70.0], 100.0)


def _tables(n: int, seed: int, split: int = 0) -> ExitTable:
    """Three exits of rising quality; ``seed`` fixes the population, ``split`` the draw from it."""
    g = torch.Generator().manual_seed(1000 * seed + split)
    c = 10
    b = torch.randn(n, c, generator=g) * 3
    z = [b + torch.randn(n, c, generator=g) * s for s in (2.5, 1.4, 0.8)]
    return ExitTable(["e0", "e1", "e2"], z, b, b.argmax(1))


def test_cal_select_deploys_the_cheapest_candidate_each_certified_at_delta_over_m():
    fit, cal = _tables(3000, 0, 0), _tables(2000, 0, 1)
    fp = make_policy("auto", candidates=CANDS).fit(PolicyContext(fit, cal, COSTS, 1.0, delta=0.1))
    auto = fp.info["auto"]
    assert list(auto["candidates"]) == CANDS and auto["select"] == "cal"
    assert auto["tested_delta"] == pytest.approx(0.1 / 3)
    for a in fp.alternatives:
        assert a.guarantee.delta == pytest.approx(0.1 / 3)
    cal_costs = {n: auto["candidates"][n]["cal_cost"] for n in CANDS}
    assert auto["chosen"] == min(CANDS, key=lambda n: cal_costs[n])
    assert fp.policy == auto["chosen"]
    # the deployed policy is exactly that candidate fitted alone at delta / 3, and its cost is what it claims
    alone = make_policy(auto["chosen"]).fit(PolicyContext(fit, cal, COSTS, 1.0, delta=0.1 / 3))
    assert alone.chain == fp.chain and np.array_equal(alone.thresholds, fp.thresholds)
    assert fp.evaluate(cal, COSTS)["flops"] == pytest.approx(cal_costs[auto["chosen"]])
    assert fp.guarantee.certified and fp.evaluate(cal, COSTS)["saving"] > 0
    # the statement gives the whole procedure's confidence, not one candidate's
    st = fp.statement()
    assert ">= 90%" in st and "delta/3" in st and f"{cal.n} calibration samples" in st
    d = fp.to_dict()
    assert d["auto"]["chosen"] == fp.policy and d["policy"] == fp.policy


def test_fit_select_chooses_on_the_fit_data_before_calibration():
    fit = _tables(3000, 1, 0)
    cals = [_tables(2000, 1, s) for s in (1, 2, 3)]
    fps = [make_policy("auto", candidates=CANDS, select="fit").fit(PolicyContext(fit, c, COSTS, 1.0))
           for c in cals]
    chosen = {fp.info["auto"]["chosen"] for fp in fps}
    assert len(chosen) == 1  # the calibration draw never moves the choice
    fp = fps[0]
    fit_costs = {n: v["fit_cost"] for n, v in fp.info["auto"]["candidates"].items()}
    assert fp.policy == min(CANDS, key=lambda n: fit_costs[n])
    assert fp.guarantee.delta == pytest.approx(0.1)  # no candidate pays for the choice
    assert "on the fit split, before calibration" in fp.statement()


@pytest.mark.parametrize("select", ["cal", "fit"])
def test_recertify_is_a_fresh_fit_on_the_new_calibration_data(select):
    fit, cal1, cal2 = _tables(3000, 2, 0), _tables(2000, 2, 1), _tables(2000, 2, 2)
    pol = dict(candidates=CANDS, select=select)
    again = make_policy("auto", **pol).fit(PolicyContext(fit, cal1, COSTS, 1.0)).recertify(cal2)
    fresh = make_policy("auto", **pol).fit(PolicyContext(fit, cal2, COSTS, 1.0))
    assert again.policy == fresh.policy and again.chain == fresh.chain
    assert np.array_equal(again.thresholds, fresh.thresholds)
    assert again.info["auto"]["candidates"] == fresh.info["auto"]["candidates"]


def test_cal_select_guarantee_holds_over_calibration_draws():
    """The deployed cascade's risk on a 200,000-sample population exceeds the tolerance in at most delta of the
    calibration draws (plus three standard errors), although the choice among candidates reads the draw."""
    alpha, delta, draws, n_cal = 1.0, 0.1, 120, 600
    fit, pop = _tables(3000, 3, 0), _tables(200_000, 3, 1)
    fp = make_policy("auto", candidates=CANDS).fit(PolicyContext(fit, _tables(n_cal, 3, 2), COSTS, alpha, delta))
    full = fp.full_scores(pop)  # one score array per candidate: each draw may deploy another one
    assert set(full) == set(CANDS)
    rng = np.random.default_rng(0)
    violations, savings, picks = 0, [], set()
    for _ in range(draws):
        cal = pop.subset_rows(rng.integers(0, pop.n, n_cal))
        r = fp.recertify(cal)
        name = r.info["auto"]["chosen"]
        picks.add(name)
        m = r.evaluate(pop, COSTS, scores=r.kept_scores(full))
        violations += m["disagreement"] > alpha / 100
        savings.append(m["saving"])
    assert r.evaluate(pop, COSTS)["saving"] == pytest.approx(m["saving"])  # the cached scores are its own
    se = (delta * (1 - delta) / draws) ** 0.5
    assert violations / draws <= delta + 3 * se
    assert np.mean(savings) > 0.05  # and exits are taken
    assert len(picks) >= 2  # the choice does read the draw: this is the case the union bound is for


def test_activation_stats_are_needed_exactly_when_a_gate_reads_them():
    assert needs_activation_stats("gate") and not needs_activation_stats("gate", {"act_stats": False})
    assert needs_activation_stats("auto")  # gate is a default candidate
    assert not needs_activation_stats("auto", {"candidates": ["max_softmax", "patience"]})
    assert not needs_activation_stats("auto", {"options": {"gate": {"act_stats": False}}})
    assert not needs_activation_stats("max_softmax")
    assert "gate" in AUTO_CANDIDATES


def test_bad_candidates_and_options_are_refused_in_one_line(tmp_path, capsys):
    cases = [
        ({"candidates": ["paper003"]}, "must be guaranteed policies"),
        ({"candidates": ["auto"]}, "must be guaranteed policies"),
        ({"candidates": ["nope"]}, "must be guaranteed policies"),
        ({"candidates": []}, "at least one candidate"),
        ({"candidates": ["gate", "gate"]}, "listed twice"),
        ({"select": "val"}, "auto select must be"),
        ({"candidates": ["max_softmax"], "options": {"gate": {}}}, "not candidates"),
        ({"bogus": 1}, "bad options for policy 'auto'"),
        ({"options": {"gate": {"hiden": 3}}}, "bad options for policy 'gate'"),
        ({"options": {"gate": 3}}, "must be a mapping"),
        ({"candidates": ["gate[target=harmless"]}, "is malformed"),
        ({"candidates": ["gate]"]}, "without '\\['"),
        ({"candidates": ["gate[hidden]"]}, "'hidden' is not key=value"),
        ({"candidates": ["gate[hidden=3,hidden=4]"]}, "sets 'hidden' twice"),
        ({"candidates": ["gate[hiden=3]"]}, "auto candidate 'gate\\[hiden=3\\]': bad options for policy 'gate'"),
        ({"candidates": ["paper003[signal=margin]"]}, "must be guaranteed policies"),
        ({"candidates": ["gate", "gate[hidden=16]"], "options": {"gate": {"hidden": 16}}}, "same policy with the same"),
        ({"candidates": ["gate[hidden=8]"], "options": {"gate[hidden=8]": {"hidden": 4}}}, "both in its label and"),
    ]
    for opts, msg in cases:
        with pytest.raises(AutoExitError, match=msg) as e:
            make_policy("auto", **opts)
        assert "\n" not in str(e.value)
        with pytest.raises(AutoExitError, match=msg):  # before any head is trained
            EnableConfig(policy="auto", policy_options=opts)
    assert isinstance(make_policy("auto"), AutoPolicy)
    assert make_policy("auto", candidates="max_softmax, gate").candidates == ["max_softmax", "gate"]
    # a labelled candidate with the label-free risk is refused as its policy refuses it, naming the candidate
    with pytest.raises(AutoExitError, match=r"auto candidate 'gate\[target=harmless\]': gate target 'harmless'"):
        EnableConfig(policy="auto", policy_options={"candidates": ["max_softmax", "gate[target=harmless]"]})

    from autoexit.cli import main

    rc = main(["enable", "--model", "nope.pt", "--data", str(tmp_path / "none"), "--tolerance", "1",
               "--out", str(tmp_path / "out"), "--auto-select", "fit"])
    err = capsys.readouterr().err
    assert rc == 2 and "apply to --policy auto" in err  # refused before the data or the model is read
    assert not (tmp_path / "out").exists()


def test_candidate_labels_give_a_policy_its_own_options():
    assert parse_candidate("gate") == ("gate", {})
    assert parse_candidate(" gate[target=harmless, hidden=32, onehot=false, lr=0.5] ") == (
        "gate", {"target": "harmless", "hidden": 32, "onehot": False, "lr": 0.5})
    assert split_candidates("max_softmax, gate[target=harmless,hidden=32],patience") == [
        "max_softmax", "gate[target=harmless,hidden=32]", "patience"]
    pol = make_policy("auto", candidates="gate, gate[target=harmless,hidden=8]",
                      options={"gate[target=harmless,hidden=8]": {"steps": 7}})
    cfg = {k: p.config for k, p in pol.policies.items()}
    assert (cfg["gate"].target, cfg["gate"].hidden) == ("agree", 16)
    h = cfg["gate[target=harmless,hidden=8]"]
    assert (h.target, h.hidden, h.steps) == ("harmless", 8, 7)


def test_auto_deploys_the_harmless_gate_where_it_beats_the_label_free_one():
    """The backbone is always wrong on one class, where the head is right: under the labelled risk the gate
    trained on labels lets those samples out and the agree gate does not, so auto picks it by its label, and
    it is exactly that gate fitted alone at delta / 2."""
    fit, cal = (ExitTable(["e0"], [z], b, y) for z, b, y in (_backbone_wrong_on_class(seed=0),
                                                              _backbone_wrong_on_class(seed=1)))
    costs = ExitCosts([1.0], [10.0], 100.0)
    opts = {"steps": 60, "act_stats": False, "history": 0}
    cands = ["gate", "gate[target=harmless]"]
    fp = make_policy("auto", candidates=cands, options={c: opts for c in cands}).fit(
        PolicyContext(fit, cal, costs, 2.0, risk="drop"))
    auto = fp.info["auto"]
    assert list(auto["candidates"]) == cands and auto["chosen"] == "gate[target=harmless]"
    assert fp.policy == "gate[target=harmless]" and fp.info["gate_target"] == "harmless"
    assert fp.to_dict()["policy"] == "gate[target=harmless]"
    assert "gate[target=harmless] chosen by auto among 2 policies" in fp.statement()
    costs_cal = {c: auto["candidates"][c]["cal_cost"] for c in cands}
    assert costs_cal["gate[target=harmless]"] < costs_cal["gate"] - 5.0, costs_cal
    alone = GatePolicy(**opts, target="harmless").fit(PolicyContext(fit, cal, costs, 2.0, risk="drop", delta=0.05))
    assert alone.chain == fp.chain and np.array_equal(alone.thresholds, fp.thresholds)
    # recertified on other data, the candidates keep their labels
    z2, b2, y2 = _backbone_wrong_on_class(seed=2)
    again = fp.recertify(ExitTable(["e0"], [z2], b2, y2))
    assert list(again.info["auto"]["candidates"]) == cands and again.policy == again.info["auto"]["chosen"]


def test_labelled_candidates_script_and_name_the_deployed_one(digits_result):
    from autoexit.model import to_torchscript
    from autoexit.pipeline import assemble

    r = digits_result
    cands = ["max_softmax", "gate[target=harmless,steps=40]"]
    cfg = EnableConfig(tolerance=2.0, policy="auto", risk="drop", policy_options={"candidates": cands})
    res = assemble(cfg, r.backbone, r.points, r.recording, r.heads, predictions={"val": r.val, "test": r.test})
    pol = res.manifest()["policy"]
    assert list(pol["auto"]["candidates"]) == cands and pol["name"] == pol["auto"]["chosen"] in cands
    assert res.kept
    x = res.recording.inputs("test")
    with torch.no_grad():
        _, idx = to_torchscript(res.model, x[:1])(x)
    assert np.array_equal(idx.numpy(), np.asarray(res.metrics["test"]["exit_index"]))
