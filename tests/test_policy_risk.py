"""Risk control (Learn-then-Test, fixed sequence) on synthetic data where the true risk is known."""

from __future__ import annotations

import numpy as np
import pytest

from autoexit.errors import AutoExitError
from autoexit.policies.cascade import certify, greedy_path, simulate
from autoexit.policies.risk import (
    binomial_pvalue,
    fixed_sequence,
    max_admissible_count,
    pvalues,
    wsr_pvalue,
)


def _se(p: float, draws: int) -> float:
    return float(np.sqrt(p * (1 - p) / draws))


def test_binomial_pvalue_matches_direct_sum():
    from math import comb

    n, a = 40, 0.1
    for k in (0, 1, 3, 7, 40):
        direct = sum(comb(n, i) * a**i * (1 - a) ** (n - i) for i in range(k + 1))
        assert binomial_pvalue(np.array([k]), n, a)[0] == pytest.approx(direct, rel=1e-9)
    assert binomial_pvalue(np.array([-1]), n, a)[0] == 0.0


def test_fixed_sequence_violation_rate_close_to_and_not_above_delta():
    """Nested 0/1 losses (like a cascade getting more aggressive): config j loses on sample i when
    U_i < r_j, so its true risk is r_j exactly. Over many calibration draws, the chosen config's
    true risk exceeds alpha in at most ~delta of the draws, and not much less (the test is tight)."""
    rng = np.random.default_rng(0)
    alpha, delta, n, draws = 0.1, 0.1, 400, 1500
    r = np.linspace(0.0, 2 * alpha, 161)
    violations = 0
    for _ in range(draws):
        u = rng.random(n)
        losses = (u[None, :] < r[:, None]).astype(float)
        res = fixed_sequence(losses, alpha, delta)
        violations += res.index >= 0 and r[res.index] > alpha
    rate = violations / draws
    assert rate <= delta + 3 * _se(delta, draws)
    assert rate >= 0.5 * delta  # close to delta: the binomial test wastes little


def test_wsr_controls_a_ternary_drop():
    """Labelled drop losses in {-1, 0, 1}; true mean known; violation rate <= delta."""
    rng = np.random.default_rng(1)
    alpha, delta, n, draws = 0.02, 0.1, 1500, 300
    harm = np.linspace(0.0, 0.06, 25)
    help_ = harm / 3
    true = harm - help_
    violations = 0
    for _ in range(draws):
        u = rng.random(n)
        losses = (u[None, :] < harm[:, None]).astype(float) - (u[None, :] >= 1 - help_[:, None]).astype(float)
        res = fixed_sequence(losses, alpha, delta, method="wsr", bounds=(-1.0, 1.0))
        violations += res.index >= 0 and true[res.index] > alpha
    assert violations / draws <= delta + 3 * _se(delta, draws)


def test_wsr_pvalue_small_when_risk_far_below_and_large_when_above():
    rng = np.random.default_rng(2)
    low = (rng.random((1, 2000)) < 0.002).astype(float)
    high = (rng.random((1, 2000)) < 0.05).astype(float)
    assert wsr_pvalue(low, 0.02, 0.0, 1.0)[0] < 1e-3
    assert wsr_pvalue(high, 0.02, 0.0, 1.0)[0] > 0.5


def test_pvalue_input_errors_are_one_line():
    with pytest.raises(AutoExitError, match="0/1 losses"):
        pvalues(np.array([[0.5, 1.0]]), 0.1, "binomial")
    with pytest.raises(AutoExitError, match="delta"):
        fixed_sequence(np.zeros((2, 10)), 0.1, delta=1.5)
    with pytest.raises(AutoExitError, match="unknown p-value"):
        pvalues(np.zeros((1, 3)), 0.1, "nope")


def test_max_admissible_count():
    k = max_admissible_count(2000, 0.01, 0.1)
    assert binomial_pvalue(np.array([k]), 2000, 0.01)[0] <= 0.1 < binomial_pvalue(np.array([k + 1]), 2000, 0.01)[0]
    assert max_admissible_count(10, 0.01, 0.1) == -1  # ten samples cannot certify 1 %


def _population(rng, n: int, k: int = 4):
    """Synthetic cascade: exit j agrees with the backbone with probability sigmoid(score-ish)."""
    quality = np.linspace(-0.5, 1.5, k)[:, None]
    latent = rng.normal(size=(1, n))
    scores = latent + quality + 0.8 * rng.normal(size=(k, n))
    p_agree = 1 / (1 + np.exp(-(2.5 * scores + 1.0)))
    agree = rng.random((k, n)) < p_agree
    loss = np.vstack([~agree, np.zeros((1, n), dtype=bool)]).astype(float)
    return scores, loss


def test_cascade_guarantee_holds_over_calibration_draws():
    """End to end on a synthetic 4-exit cascade: the family is built on fit data, calibrated on a fresh
    draw; the deployed thresholds' *population* risk exceeds alpha in <= delta of the draws."""
    rng = np.random.default_rng(3)
    alpha, delta = 0.03, 0.1
    pop_s, pop_l = _population(rng, 200_000)
    fit_s, fit_l = _population(rng, 3000)
    cost = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    path = greedy_path(fit_s, fit_l, cost, max_risk=0.12)
    assert np.all(np.diff(path.fit_flops) <= 1e-9)  # the family only gets cheaper
    pop_exit = simulate(pop_s, path.thresholds)
    true_risk = np.array([pop_l[e, np.arange(pop_l.shape[1])].mean() for e in pop_exit])
    draws, n_cal, violations, chosen = 200, 800, 0, []
    for _ in range(draws):
        idx = rng.integers(0, pop_s.shape[1], n_cal)
        res, _ = certify(pop_s[:, idx], pop_l[:, idx], path.thresholds, alpha, delta)
        j = max(res.index, 0)
        chosen.append(j)
        violations += true_risk[j] > alpha
    assert violations / draws <= delta + 3 * _se(delta, draws)
    assert np.mean(chosen) > 0  # and it does let samples exit


def test_greedy_path_per_sample_costs():
    """A [k + 1, n] cost (what each sample pays depends on the sample) builds the same family as the [k + 1]
    cost it broadcasts from, and each row's fit cost is the brute-force mean of the per-sample costs of the
    exits the row's thresholds give; a cost of the wrong shape is refused."""
    rng = np.random.default_rng(5)
    s, loss = _population(rng, 1500)
    cost = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    flat = greedy_path(s, loss, cost, max_risk=0.1)
    wide = greedy_path(s, loss, np.repeat(cost[:, None], s.shape[1], 1), max_risk=0.1)
    assert np.array_equal(flat.thresholds, wide.thresholds) and np.allclose(flat.fit_flops, wide.fit_flops)
    per = cost[:, None] + rng.uniform(0, 3, size=(5, s.shape[1]))  # sample-dependent
    path = greedy_path(s, loss, per, max_risk=0.1)
    assert len(path.fit_flops) > 3 and not np.array_equal(path.thresholds, flat.thresholds)
    for row, f, r in zip(path.thresholds, path.fit_flops, path.fit_risk):
        pos = simulate(s, row)
        cols = np.arange(s.shape[1])
        assert f == pytest.approx(per[pos, cols].mean()) and r == pytest.approx(loss[pos, cols].mean())
    with pytest.raises(AutoExitError, match=r"exit costs must be \[5\] or \[5, 1500\]"):
        greedy_path(s, loss, per[:, :10])
