"""The ``auto`` policy: it deploys the cheapest of several guaranteed policies and keeps the guarantee.

- ``select="cal"``: every candidate is certified at delta / m and the cheapest on the calibration data is
  deployed; over many calibration draws its *population* risk exceeds the tolerance in at most delta of them.
- ``select="fit"``: the choice is made on the fit data and does not move with the calibration data.
- Recertifying a fitted ``auto`` on new calibration data is the same as fitting it afresh there.
- Bad candidates and options are refused in one line, by the policy, ``EnableConfig`` and the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoexit.errors import AutoExitError
from autoexit.pipeline import EnableConfig
from autoexit.policies import (
    AUTO_CANDIDATES,
    AutoPolicy,
    ExitCosts,
    ExitTable,
    PolicyContext,
    make_policy,
    needs_activation_stats,
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
    ]
    for opts, msg in cases:
        with pytest.raises(AutoExitError, match=msg) as e:
            make_policy("auto", **opts)
        assert "\n" not in str(e.value)
        with pytest.raises(AutoExitError, match=msg):  # before any head is trained
            EnableConfig(policy="auto", policy_options=opts)
    assert isinstance(make_policy("auto"), AutoPolicy)
    assert make_policy("auto", candidates="max_softmax, gate").candidates == ["max_softmax", "gate"]

    from autoexit.cli import main

    rc = main(["enable", "--model", "nope.pt", "--data", str(tmp_path / "none"), "--tolerance", "1",
               "--out", str(tmp_path / "out"), "--auto-select", "fit"])
    err = capsys.readouterr().err
    assert rc == 2 and "apply to --policy auto" in err  # refused before the data or the model is read
    assert not (tmp_path / "out").exists()
