"""Temperatures and thresholds: budgets respected, bad tolerance rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoexit.calibrate import assign_thresholds, check_tolerance, fit_temperature, split_budget
from autoexit.errors import AutoExitError


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    exits=st.integers(1, 5),
    n=st.integers(50, 400),
    tol=st.floats(0.1, 20.0),
    scheme=st.sampled_from(["halving", "equal"]),
    basis=st.sampled_from(["total", "reaching"]),
)
def test_estimated_drop_within_each_exits_budget(seed, exits, n, tol, scheme, basis):
    rng = np.random.default_rng(seed)
    scores = rng.random((exits, n))
    scores[:, : n // 5] = np.round(scores[:, : n // 5], 1)  # ties
    agree = rng.random((exits, n)) < (0.2 + 0.75 * scores)
    r = assign_thresholds(scores, agree, tol, scheme, basis=basis)
    budgets = split_budget(tol / 100, exits, scheme)
    # recompute sequentially, independently of the implementation
    reaching = np.ones(n, bool)
    for i in range(exits):
        hit = reaching & (scores[i] >= r.thresholds[i])
        wrong = int((hit & ~agree[i]).sum())
        denom = n if basis == "total" else reaching.sum()
        assert wrong <= budgets[i] * denom + 1e-9
        assert wrong == r.wrong[i] and hit.sum() == r.hits[i]
        # the threshold is the lowest possible: admitting the next reaching sample breaks the budget
        rest = reaching & ~hit
        if rest.any() and np.isfinite(r.thresholds[i]):
            top = scores[i][rest].max()
            more = reaching & (scores[i] >= top)
            assert int((more & ~agree[i]).sum()) > budgets[i] * denom + 1e-9
        reaching &= ~hit
    assert (r.est_drop <= r.budgets + 1e-12).all()


def test_thresholds_on_a_real_pipeline_respect_budgets(digits_result):
    r = digits_result.subset.thresholds
    assert (r.est_drop <= r.budgets + 1e-12).all()
    assert r.budgets.sum() <= digits_result.config.tolerance / 100


def test_temperature_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / 2.0, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.05)


def test_split_schemes():
    np.testing.assert_allclose(split_budget(0.01, 3), [0.005, 0.0025, 0.00125])
    np.testing.assert_allclose(split_budget(0.03, 3, "equal"), [0.01, 0.01, 0.01])
    np.testing.assert_allclose(split_budget(0.04, 2, [1, 3]), [0.01, 0.03])
    with pytest.raises(AutoExitError, match="split weights"):
        split_budget(0.04, 2, [1, -1])
    with pytest.raises(AutoExitError, match="unknown split scheme"):
        split_budget(0.04, 2, "random")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "x", 100])
def test_bad_tolerance_is_rejected_in_one_line(bad):
    with pytest.raises(AutoExitError) as exc:
        check_tolerance(bad)
    assert "\n" not in str(exc.value) and "tolerance" in str(exc.value)
