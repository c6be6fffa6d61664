"""The population check of ``bench/guarantee_check.py``: it must pass a valid certificate and catch a broken
one (synthetic cascades whose population is known), and its binomial helpers must be right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoexit.policies import ExitCosts, ExitTable, PolicyContext, make_policy  # noqa: E402
from bench.policies import (  # noqa: E402
    above_delta_pvalue,
    independent_test_violation,
    population_violations,
    rate_interval,
)


def _table(n: int, seed: int) -> ExitTable:
    """Two informative exits; labels agree with the backbone on 80 % of samples (so drop != disagreement)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 10, generator=g) * 3
    y = b.argmax(1).clone()
    wrong = torch.rand(n, generator=g) < 0.2
    y[wrong] = torch.randint(0, 10, (int(wrong.sum()),), generator=g)
    z = [b + torch.randn(n, 10, generator=g) * s for s in (2.5, 1.2)]
    return ExitTable(["e0", "e1"], z, b, y)


@pytest.mark.parametrize("risk", ["disagreement", "drop"])
def test_population_check_passes_a_valid_certificate_and_catches_a_broken_one(risk):
    fit, cal, pool = _table(3000, 0), _table(1000, 1), _table(6000, 2)
    costs = ExitCosts([1.0, 1.0], [30.0, 60.0], 100.0)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, pool.n, 1000) for _ in range(200)]
    valid = make_policy("max_softmax").fit(PolicyContext(fit, cal, costs, 2.0, 0.1, risk))
    ok = population_violations(valid, pool, draws, costs, 2.0)
    assert ok["draws"] == 200 and ok["risk"] == risk
    assert ok["pop saving %"] > 5  # it does let samples exit, so the check is not vacuous
    # at most delta up to binomial noise (3 standard errors of 200 draws)
    assert ok["viol(pop)"] <= 0.1 + 3 * (0.1 * 0.9 / 200) ** 0.5
    assert ok["pop risk % (mean)"] <= 2.0
    # a certificate that accepts at p < 0.9 (delta 0.9) is not a 90 % guarantee: the check must see it fail
    broken = make_policy("max_softmax").fit(PolicyContext(fit, cal, costs, 2.0, 0.9, risk))
    bad = population_violations(broken, pool, draws, costs, 2.0)
    assert bad["viol(pop)"] > 0.3 > ok["viol(pop)"]
    # an independent test set adds noise: settings just under T show more than T on some test sets
    ok_t = population_violations(valid, pool, draws, costs, 2.0, n_test=500)
    assert ok_t["viol(pop)"] == ok["viol(pop)"] and ok["viol(pop + test noise)"] is None
    assert ok["viol(pop)"] < ok_t["viol(pop + test noise)"] < 1
    # the drop is never above the disagreement, so a disagreement guarantee also bounds the drop
    if risk == "disagreement":
        assert ok["viol(pop, drop)"] <= ok["viol(pop)"]


def test_rate_interval_and_pvalue_match_closed_forms():
    lo, hi = rate_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)
    lo, hi = rate_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 100), rel=1e-9)
    lo, hi = rate_interval(10, 100)
    assert lo < 0.1 < hi and 0.04 < lo < 0.06 and 0.17 < hi < 0.19
    from math import comb

    k, n, d = 14, 100, 0.1
    direct = sum(comb(n, j) * d ** j * (1 - d) ** (n - j) for j in range(k, n + 1))
    assert above_delta_pvalue(k, n, d) == pytest.approx(direct, rel=1e-9)
    assert above_delta_pvalue(0, n, d) == pytest.approx(1.0)


def test_merge_keeps_exactly_the_rows_a_run_does_not_redo():
    from bench.guarantee_check import rows_not_redone

    rows = [{"model": f"resnet{d}", "variant": v, "T %": t, "policy": p}
            for d in (20, 56) for v in ("baseline", "1250") for t in (1.0, 2.0) for p in ("max_softmax", "gate+drop")]
    left = rows_not_redone(rows, [56], ["1250"], [1.0, 2.0], ["gate+drop"])
    assert len(left) == len(rows) - 2
    assert not any(r["model"] == "resnet56" and r["variant"] == "1250" and r["policy"] == "gate+drop" for r in left)
    assert rows_not_redone(rows, [20, 56], ["baseline", "1250"], [1.0, 2.0], None) == []
    assert rows_not_redone(rows, [20], ["baseline"], [0.5], None) == rows  # another tolerance: nothing redone


def test_docs_block_orders_rows_and_states_each_rate(monkeypatch):
    """The docs block lists rows by network, heads, tolerance and policy whatever order runs wrote them in,
    and prints each rate with its draws, interval and p-value (the numbers the docs' claims rest on)."""
    import bench.md_tables as md

    def row(model, variant, tol, policy, k):
        return {"model": model, "variant": variant, "T %": tol, "policy": policy,
                "risk": "drop" if "+drop" in policy else "disagreement", "saving %": 10.0,
                "resplits": 1000, "draws": 1000, "re-split viol": k / 1000,
                "re-split 95% CI": list(rate_interval(k, 1000)), "re-split p(<=delta)": above_delta_pvalue(k, 1000, 0.1),
                "pop viol": k / 2000, "pop 95% CI": list(rate_interval(k // 2, 1000)),
                "pop p(<=delta)": above_delta_pvalue(k // 2, 1000, 0.1), "pop risk % (mean)": 0.5,
                "pop risk % (p90)": 0.8, "pop saving %": 9.0,
                "run": {"date": "2026-12-02 16:00:00", "commit": "abc1234", "argv": "python bench/guarantee_check.py"}}

    rows = [row("resnet56", "baseline", 1.0, "max_softmax", 50), row("resnet20", "2500", 1.0, "max_softmax", 60),
            row("resnet20", "baseline", 2.0, "gate+drop", 70), row("resnet20", "baseline", 1.0, "gate+drop", 80),
            row("resnet20", "cross-fitted", 1.0, "max_softmax", 90), row("resnet20", "1250", 1.0, "max_softmax", 120),
            row("resnet20", "mixup@360", 1.0, "max_softmax", 45), row("resnet20", "mixup", 1.0, "max_softmax", 40),
            row("resnet20", "baseline", 1.0, "patience", 100), row("resnet20", "feature", 1.0, "max_softmax", 30)]
    rows[-1]["independent-test viol"] = 0.0734  # rows written before this column show "-"
    # the core's rows stay together: plain first, then cross-fitted by fold count, each by tolerance
    rows += [row("resnet56", "core-cross-fitted@3", 2.0, "max_softmax", 10), row("resnet56", "core", 2.0, "gate", 10),
             row("resnet56", "core-cross-fitted", 1.0, "max_softmax", 10), row("resnet56", "core", 1.0, "gate", 10)]
    monkeypatch.setattr(md, "_load", lambda name: {"delta": 0.1, "rows": rows} if name == "guarantee_check" else {})
    block = md.guarantee_blocks()["guarantee-check"]
    body = [ln for ln in block.splitlines() if ln.startswith("| resnet")]
    order = [tuple(c.strip() for c in ln.split("|")[1:5]) for ln in body]
    assert order == [("resnet20", "baseline", "1.0", "patience"), ("resnet20", "baseline", "1.0", "gate+drop"),
                     ("resnet20", "baseline", "2.0", "gate+drop"), ("resnet20", "cross-fitted", "1.0", "max_softmax"),
                     ("resnet20", "feature", "1.0", "max_softmax"), ("resnet20", "mixup", "1.0", "max_softmax"),
                     ("resnet20", "mixup@360", "1.0", "max_softmax"),
                     ("resnet20", "1250", "1.0", "max_softmax"), ("resnet20", "2500", "1.0", "max_softmax"),
                     ("resnet56", "baseline", "1.0", "max_softmax"), ("resnet56", "core", "1.0", "gate"),
                     ("resnet56", "core", "2.0", "gate"), ("resnet56", "core-cross-fitted", "1.0", "max_softmax"),
                     ("resnet56", "core-cross-fitted@3", "2.0", "max_softmax")]
    lo, hi = rate_interval(120, 1000)
    assert f"12.0 % of 1000 [{100 * lo:.1f}, {100 * hi:.1f}]" in body[7]  # 12 % is above delta: p small
    assert f"p={above_delta_pvalue(120, 1000, 0.1):.2g}" in body[7] and above_delta_pvalue(120, 1000, 0.1) < 0.05
    assert "| 7.3 % |" in body[4] and "| - |" in body[7]  # the independent-test column
    assert "at commit abc1234" in block


@pytest.mark.parametrize("risk,value,harm", [("disagreement", 0.018, 0.0), ("disagreement", 0.008, 0.0),
                                             ("drop", 0.017, 0.03), ("drop", 0.009, 0.012), ("drop", 0.0, 0.0)])
def test_independent_test_violation_matches_simulated_test_sets(risk, value, harm):
    """The expected violation rate on an independent test set agrees with simulating 40,000 such test sets."""
    n, tol, sims = 3000, 2.0 if value > 0.01 else 1.0, 40_000
    rng = np.random.default_rng(7)
    if risk == "disagreement":
        seen = rng.binomial(n, value, sims) / n
    else:  # per-sample +1 harm, -1 help, 0 otherwise
        k = rng.multinomial(n, [harm, harm - value, 1 - 2 * harm + value], sims)
        seen = (k[:, 0] - k[:, 1]) / n
    simulated = float((seen > tol / 100 + 1e-12).mean())
    got = independent_test_violation(risk, value, harm, n, tol)
    assert abs(got - simulated) < 0.015, (got, simulated)
    assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("args,match", [
    (["--cross-fit", "1"], "number of folds >= 2"),
    (["--cross-fit", "2", "--teacher", "mixup"], "drop --teacher"),
    (["--teacher", "mixup", "--latency-only"], "fits the guaranteed policies' temperatures on train"),
    (["--temperatures", "val", "--latency-only"], "fits the guaranteed policies' temperatures on train"),
    (["--head", "cheap", "--teacher", "mixup"], "measured with the default heads: drop --head"),
])
def test_policies_bench_refuses_runs_that_would_mix_two_rules(args, match):
    """bench/policies.py stops before any work (fixtures or not) when its options would measure one table with two
    temperature rules, or cross-fit with a single fold."""
    from bench.policies import main

    with pytest.raises(SystemExit, match=match):
        main(args)


def test_policies_only_rows_replace_their_own_rows_and_keep_the_rest():
    """bench/policies.py --only: the named rows replace the recorded ones of the same policy (each stamped with
    its run), every other row and its run stay, and the table keeps the VARIANTS order per tolerance."""
    from bench.policies import VARIANTS, put_rows

    def row(tol, policy, saving):
        return {"T %": tol, "policy": policy, "saving %": saving}

    old_run = {"date": "d0", "commit": "c0", "argv": "python bench/policies.py"}
    recorded = {"rows": [row(t, p, 1.0) for t in (1.0, 2.0) for p in ("max_softmax", "gate+drop", "auto")],
                "kept": {"1.0/gate+drop": ["a"], "1.0/auto": ["b"]}, "guarantees": {"1.0/auto": "g"}}
    recorded["rows"][0]["run"] = old_run
    new = {"rows": [row(2.0, "gate[harmless]+drop", 3.0), row(1.0, "gate+drop", 2.0),
                    row(1.0, "gate[harmless]+drop", 3.0), row(2.0, "gate+drop", 2.0)],
           "kept": {"1.0/gate+drop": ["c"], "1.0/gate[harmless]+drop": ["d"]}, "guarantees": {}}
    run = {"date": "d1", "commit": "c1", "argv": "python bench/policies.py --only gate+drop gate[harmless]+drop"}
    put_rows(recorded, new, ("gate+drop", "gate[harmless]+drop"), run)
    got = [(r["T %"], r["policy"], r["saving %"], r.get("run", {}).get("commit")) for r in recorded["rows"]]
    labels = [v[0] for v in VARIANTS]
    assert got == sorted(got, key=lambda x: (x[0], labels.index(x[1])))
    assert [g for g in got if g[0] == 1.0] == [(1.0, "max_softmax", 1.0, "c0"), (1.0, "gate+drop", 2.0, "c1"),
                                              (1.0, "gate[harmless]+drop", 3.0, "c1"), (1.0, "auto", 1.0, None)]
    assert len(got) == 8
    assert recorded["kept"] == {"1.0/gate+drop": ["c"], "1.0/auto": ["b"], "1.0/gate[harmless]+drop": ["d"]}
    assert recorded["guarantees"] == {"1.0/auto": "g"}


def test_cheap_heads_block_puts_each_files_resplit_saving_side_by_side(monkeypatch):
    """bench/md_tables.py's cheap-heads comparison: one row per (network, T, policy) every compared file has, each
    file's re-split saving and violation rate in its own column; paper003 (no guarantee) and rows a file lacks are
    left out; no block without the cheap heads' file."""
    import bench.md_tables as md

    def res(depth_rows: dict, oracle: float) -> dict:
        return {"results": [{"depth": d, "oracle_saving": {"test": oracle},
                             "rows": [{"T %": t, "policy": p, "resplit saving %": v, "viol(drop)": 0.05}
                                      for t, p, v in rows]} for d, rows in depth_rows.items()]}

    files = {"policies_crossfit": res({20: [(1.0, "max_softmax", 6.9), (1.0, "paper003", 9.0),
                                            (1.0, "gate+drop", 9.3)]}, 0.669),
             "policies_crossfit3": res({20: [(1.0, "max_softmax", 9.1), (1.0, "paper003", 9.0),
                                             (1.0, "gate+drop", 9.0)]}, 0.669),
             "policies_cheap_crossfit": res({20: [(1.0, "gate+drop", 10.6), (1.0, "paper003", 9.9),
                                                  (1.0, "max_softmax", 7.2), (1.0, "margin", 8.9)]}, 0.612)}
    monkeypatch.setattr(md, "_load", lambda name: files.get(name, {}))
    blocks = md.head_comparison_blocks()
    assert set(blocks) == {"cheap-heads"}  # no in-sample files recorded
    lines = blocks["cheap-heads"].splitlines()
    body = [ln for ln in lines if ln.startswith("| ResNet-")]
    assert body == ["| ResNet-20 | 1.0 | gate+drop | 9.3 (5 %) | 9.0 (5 %) | 10.6 (5 %) |",
                    "| ResNet-20 | 1.0 | max_softmax | 6.9 (5 %) | 9.1 (5 %) | 7.2 (5 %) |"]
    assert "default heads, 2 folds ResNet-20 66.9 %; cheap heads, 3 folds ResNet-20 61.2 %" in lines[0]
    files.pop("policies_cheap_crossfit")
    assert md.head_comparison_blocks() == {}


def test_class_thresholds_block_pairs_each_row_with_its_class_wise_twin(monkeypatch):
    """bench/md_tables.py's class-thresholds block: one row per (network, risk, T) that has both kinds, each cell
    "per exit / per class"; a row without its twin is left out; no block without the results file."""
    import bench.md_tables as md

    def row(kind, risk, tol, base):
        return {"model": "resnet20", "risk": risk, "T %": tol, "thresholds": kind, "resplit %": base,
                "violations": 0.03, "family, test-picked %": base + 1, "hindsight %": base + 2,
                "val->test %": base + 3, "val->test risk %": 1.5}

    res = {"environment": {"date": "d", "commit": "c"}, "seconds": 600.0, "args": {"resplits": 100},
           "rows": [row("per-exit", "drop", 1.0, 11.5), row("per-class", "drop", 1.0, 8.0),
                    row("per-exit", "drop", 2.0, 16.3)]}
    monkeypatch.setattr(md, "_load", lambda name: res if name == "class_thresholds" else {})
    body = [ln for ln in md.class_thresholds_blocks()["class-thresholds"].splitlines() if ln.startswith("| ResNet")]
    assert body == ["| ResNet-20 | drop | 1.0 | 11.5 / 8.0 | 3 / 3 | 12.5 / 9.0 | 13.5 / 10.0 | "
                    "14.5 (1.50) / 11.0 (1.50) |"]
    monkeypatch.setattr(md, "_load", lambda name: {})
    assert md.class_thresholds_blocks() == {}


def test_drop_test_power_reference_and_core_test_along_one_family():
    """bench/drop_test_power.py: its WSR column is exactly the core's certify; the z reference gives the normal
    tail of the studentised mean drop, stops at the first row it cannot reject, and handles rows without spread."""
    import numpy as np
    from scipy.stats import norm

    from autoexit.policies.cascade import certify
    from bench.drop_test_power import certify_with, z_pvalues

    rng = np.random.default_rng(1)
    per = rng.choice([-1.0, 0.0, 1.0], p=[0.01, 0.97, 0.02], size=(3, 2000))
    m, sd = per.mean(1), per.std(1, ddof=1)
    assert np.allclose(z_pvalues(per, 0.01), norm.cdf((m - 0.01) / (sd / np.sqrt(2000))))
    assert list(z_pvalues(np.array([[0.0] * 5, [1.0] * 5]), 0.01)) == [0.0, 1.0]
    k, n = 2, 2000
    scores = rng.random((k, n))
    losses = np.vstack([rng.choice([-1.0, 0.0, 1.0], p=[0.05, 0.9, 0.05], size=(k, n)), np.zeros((1, n))])
    family = np.array([[np.inf, np.inf], [0.99, np.inf], [0.95, 0.99], [0.8, 0.9], [0.0, 0.0]])
    res, ex = certify_with("wsr", scores, losses, family, 0.02)
    ref, ref_ex = certify(scores, losses, family, 0.02, 0.1, "drop", 0)
    assert res.index == ref.index and np.array_equal(ex, ref_ex) and np.allclose(res.pvalues, ref.pvalues)
    assert res.index == 4  # everything certified at 2 %
    res, _ = certify_with("wsr", scores, losses, family, 0.015)
    z, _ = certify_with("z", scores, losses, family, 0.015)
    fail = np.nonzero(z.pvalues > 0.1)[0]
    assert z.index == (int(fail[0]) if fail.size else len(family)) - 1
    assert (res.index, z.index) == (3, 4)  # at 1.5 % the z reference certifies one row more than WSR
