"""How much a sharper test of the labelled drop could add (issue 8): Waudby-Smith--Ramdas against a z-test reference.

The labelled risk ``risk="drop"`` is certified with Waudby-Smith--Ramdas (WSR) betting p-values
(``autoexit.policies.risk.wsr_pvalue``): valid at every sample size, but a betting test needs about
``log(1/delta)`` nats of evidence where a fixed-sample test needs ``z_delta^2 / 2`` (2.30 against 0.82 at
delta = 0.1), so it certifies only settings whose drop is well below T. This benchmark measures what that costs
on the real policies: the same fitted policies (cheap heads, fitted on train as ``autoexit.enable`` fits them),
the same threshold family and the same choice of the cheapest certified row (``autoexit.policies.finalise``),
certified over ``--resplits`` random re-splits of val + test (2,000 / 3,000) by

- ``wsr``: the core's test;
- ``z``: a one-sided z-test on the mean drop, ``p = Phi((mean - T) / (sd / sqrt(n)))``. It is **not** a valid
  finite-sample test (a normal approximation); it stands for the best any fixed-sample test could do, an upper
  reference for building one.

Per network, policy and T: the mean saving over the re-splits and the share whose test drop exceeded T. First, a
simulation (:func:`simulated_power`): the largest true drop at which each test certifies T = 1 % in half of 400
simulated calibration sets of 2,000 samples (gain 0.8 %).

Run: ``python bench/drop_test_power.py`` (``--depths 20``, ``--resplits 50``); about 10 min with the cheap heads
cached (``bench/policies.py --head cheap`` fills the cache). Results: ``bench/results/drop_test_power.json``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_resplit_benchmark  # noqa: E402

TOLERANCES = (0.5, 1.0, 2.0)
POLICIES = (("max_softmax+drop", "max_softmax", {}), ("gate[harmless]+drop", "gate", {"target": "harmless"}))
DELTA = 0.1


def z_pvalues(per: np.ndarray, alpha: float) -> np.ndarray:
    """One-sided z-test p-values of ``H: mean > alpha`` for each row of ``per`` [rows, n] (normal approximation:
    a reference, not a valid finite-sample test). A row with no spread gets 0 below alpha and 1 otherwise."""
    from scipy.stats import norm

    n = per.shape[1]
    mean = per.mean(1)
    sd = per.std(1, ddof=1) if n > 1 else np.zeros(len(per))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (mean - alpha) / (sd / math.sqrt(max(n, 1)))
    p = norm.cdf(z)
    return np.where(sd > 0, p, (mean > alpha - 1e-15).astype(float))


def simulated_power(n: int = 2000, alpha: float = 0.01, gain: float = 0.008, draws: int = 400,
                    seed: int = 0) -> dict:
    """The largest true drop (harm - gain, gain fixed) at which each test still certifies ``drop <= alpha`` in at
    least half of ``draws`` simulated calibration sets of ``n`` samples (per-sample loss +1 with probability
    harm, -1 with probability gain, else 0), on a 0.05-point grid."""
    from autoexit.policies.risk import wsr_pvalue

    rng = np.random.default_rng(seed)
    out = {"n": n, "alpha %": 100 * alpha, "gain %": 100 * gain, "draws": draws}
    best = {"wsr": None, "z": None}
    for d in np.arange(0.0, alpha, 0.0005):
        u = rng.random((draws, n))
        per = np.where(u < gain + d, 1.0, 0.0) - ((u >= gain + d) & (u < 2 * gain + d))
        for test, p in (("wsr", wsr_pvalue(per, alpha, -1.0, 1.0, DELTA)), ("z", z_pvalues(per, alpha))):
            if (p <= DELTA).mean() >= 0.5:
                best[test] = 100 * float(d)
    out.update({f"{t} half-power drop %": v for t, v in best.items()})
    return out


def certify_with(test: str, s_cal: np.ndarray, l_cal: np.ndarray, family: np.ndarray, alpha: float, seed: int = 0):
    """Learn-then-Test along ``family`` with the core's WSR p-values (``test="wsr"``, exactly
    ``autoexit.policies.cascade.certify``) or the z reference; returns (RiskControlResult, exit_of)."""
    from autoexit.policies.cascade import certify, simulate
    from autoexit.policies.risk import RiskControlResult

    if test == "wsr":
        return certify(s_cal, l_cal, family, alpha, DELTA, "drop", seed)
    exit_of = simulate(s_cal, family)
    per = np.take_along_axis(np.broadcast_to(l_cal, (len(family), *l_cal.shape)), exit_of[:, None, :], axis=1)[:, 0, :]
    p = z_pvalues(per, alpha)
    fail = np.nonzero(p > DELTA)[0]
    stop = int(fail[0]) if fail.size else len(family)
    return RiskControlResult(stop - 1, alpha, DELTA, per.shape[1], "z (reference)", p, per.mean(1)), exit_of


def run_depth(depth: int, resplits: int, log) -> list[dict]:
    from autoexit.policies import PolicyContext, finalise, make_policy
    from autoexit.policies.cascade import loss_matrix
    from bench.class_thresholds import cheap_tables
    from bench.policies import _pool

    t0 = time.perf_counter()
    tabs, costs = cheap_tables(depth)
    pool = _pool(tabs["val"], tabs["test"])
    n_val = tabs["val"].n
    rng = np.random.default_rng(12345)
    splits = [rng.permutation(pool.n) for _ in range(resplits)]
    log(f"resnet{depth}: tables in {time.perf_counter() - t0:.0f} s")
    rows = []
    for tol in TOLERANCES:
        for label, policy, opts in POLICIES:
            t1 = time.perf_counter()
            fp = make_policy(policy, **opts).fit(PolicyContext(tabs["train"], tabs["val"], costs, tol, DELTA, "drop"))
            names, chain, rules = fp.full_chain
            s_pool = fp.full_scores(pool)
            l_pool = loss_matrix(pool, chain, "drop")
            row = {"model": f"resnet{depth}", "T %": tol, "policy": label, "exits fitted": len(chain)}
            for test in ("wsr", "z"):
                savings, viol, drops = [], 0, []
                for perm in splits:
                    cal, te = perm[:n_val], perm[n_val:]
                    res, exit_of = certify_with(test, s_pool[:, cal], l_pool[:, cal], fp.family, tol / 100)
                    fr = finalise(fp.policy, names, chain, rules, fp.family, res, exit_of, costs, "drop", dict(fp.info))
                    m = fr.evaluate(pool.subset_rows(te), costs, scores=fr.kept_scores(s_pool)[:, te])
                    savings.append(m["saving"])
                    drops.append(m["drop"])
                    viol += m["drop"] > tol / 100
                row[f"{test} saved %"] = 100 * float(np.mean(savings))
                row[f"{test} mean drop %"] = 100 * float(np.mean(drops))
                row[f"{test} violations"] = viol / max(resplits, 1)
            row["seconds"] = time.perf_counter() - t1
            rows.append(row)
            log(f"  T={tol} {label:20s} wsr {row['wsr saved %']:5.1f}% (drop {row['wsr mean drop %']:.2f}, viol "
                f"{100 * row['wsr violations']:.0f}%)  z {row['z saved %']:5.1f}% (drop {row['z mean drop %']:.2f}, "
                f"viol {100 * row['z violations']:.0f}%)")
    return rows


COLUMNS = ["model", "T %", "policy", "wsr saved %", "wsr mean drop %", "wsr violations", "z saved %", "z mean drop %",
           "z violations"]


def _simulate(log) -> dict:
    sim = simulated_power()
    log(f"simulated, n = 2000, T = 1 %, gain 0.8 %: half the draws certified up to a true drop of "
        f"{sim['wsr half-power drop %']:.2f} % (WSR) and {sim['z half-power drop %']:.2f} % (z)")
    return sim


def main(argv=None) -> int:
    return run_resplit_benchmark(__doc__.splitlines()[0], argv, run_depth, "drop_test_power",
                                 "the labelled drop certified by WSR (the core) against a z-test reference (not valid)",
                                 COLUMNS, preface=_simulate, delta=DELTA, heads="cheap")


if __name__ == "__main__":
    raise SystemExit(main())
