"""Tests of the partition + early-exit performance model (autoexit.perfmodel, paper 004 / 002)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoexit.errors import AutoExitError
from autoexit.perfmodel import (
    DEFAULT_THRESHOLDS,
    CloudPricing,
    Configuration,
    Link,
    Profile,
    Tier,
    Topology,
    constraint_split,
    enumerate_space,
    estimate,
    estimate_batch,
    estimate_plan,
    exit_positions,
    pareto_front,
    simulate_partitioned,
    solve_p_acc,
    solve_p_lat,
)

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ROOT / "experiments" / "topologies"


# --------------------------------------------------------------------------- helpers


def ramp_rates(shares: list[float], n_t: int = 20) -> list[list[float]]:
    """alpha(T_t) = a_t * shares for the early exits (a_t = t / (n_t - 1)); the final exit takes the rest."""
    rows = []
    for t in range(n_t):
        a = t / (n_t - 1)
        r = [a * s for s in shares]
        rows.append(r + [1.0 - sum(r)])
    return rows


def synthetic_profile(ck, acc, shares, out_bits, cb=None, input_bits=1e4, result_bits=32.0) -> Profile:
    n = len(ck)
    return Profile(block_time_s=ck, head_time_s=cb if cb is not None else [0.0] * n, output_bits=out_bits,
                   input_bits=input_bits, result_bits=result_bits, head_accuracy=acc,
                   thresholds={"entropy": DEFAULT_THRESHOLDS}, exit_rates={"entropy": ramp_rates(shares)})


def three_tier(destination: str = "dev", mid_ratio: float = 5.0) -> Topology:
    return Topology.from_dict({
        "name": "three",
        "tiers": [{"name": "dev", "ratio": 100}, {"name": "mid", "ratio": mid_ratio}, {"name": "far", "ratio": 1}],
        "links": [{"bandwidth_bps": 1e7, "latency_s": 0.01}, {"bandwidth_bps": 4e7, "latency_s": 0.01}],
        "destination": destination,
    })


def random_profile(rng: np.random.Generator, n_blocks: int, n_samples: int = 400, n_thr: int = 20) -> Profile:
    conf = rng.random((n_blocks, n_samples)) ** rng.uniform(0.3, 2.0, size=(n_blocks, 1))
    ent = rng.random((n_blocks, n_samples))
    corr = rng.random((n_blocks, n_samples)) < np.linspace(0.4, 0.95, n_blocks)[:, None]
    return Profile.from_predictions(
        correct=corr, confidence=conf, entropy=ent,
        block_time_s=rng.uniform(1e-4, 5e-3, n_blocks), head_time_s=rng.uniform(0, 5e-4, n_blocks),
        output_bits=rng.uniform(1e3, 1e6, n_blocks), input_bits=float(rng.uniform(1e4, 1e5)),
        thresholds=np.linspace(0, 1, n_thr), result_bits=float(rng.uniform(8, 1e3)),
    )


def random_topology(rng: np.random.Generator, n_tiers: int, n_blocks: int) -> Topology:
    tiers = []
    for j in range(n_tiers):
        pricing = CloudPricing(1e-6, 2e-5, 0.5, float(rng.choice([0.0, 0.001]))) if rng.random() < 0.5 else None
        if rng.random() < 0.3:
            tiers.append(Tier(f"t{j}", block_latency_s=tuple(rng.uniform(1e-4, 1e-2, n_blocks)),
                              head_latency_s=tuple(rng.uniform(0, 1e-3, n_blocks)), pricing=pricing))
        else:
            tiers.append(Tier(f"t{j}", ratio=float(rng.uniform(0.5, 200)), pricing=pricing))
    links = tuple(Link(float(rng.uniform(1e5, 1e9)), float(rng.uniform(0, 0.06))) for _ in range(n_tiers - 1))
    return Topology(tiers=tuple(tiers), links=links, destination=int(rng.integers(1, n_tiers + 1)),
                    source=int(rng.integers(1, n_tiers + 1)), name="random")


def random_configs(rng: np.random.Generator, profile: Profile, topo: Topology, count: int):
    n, m = profile.n_blocks, topo.n_tiers
    out = []
    for _ in range(count):
        L = int(rng.integers(1, min(n, m) + 1))
        P = tuple(sorted(rng.choice(np.arange(1, n + 1), size=L, replace=False).tolist()))
        A = tuple(rng.choice(np.arange(1, m + 1), size=L, replace=False).tolist())
        crit = str(rng.choice(profile.criteria))
        T = float(rng.choice(profile.thresholds[crit]))
        out.append(Configuration(crit, T, P, A))
    return out


def brute_pareto(lat: np.ndarray, acc: np.ndarray) -> set[int]:
    le = lat[:, None] <= lat[None, :]
    ge = acc[:, None] >= acc[None, :]
    strict = (lat[:, None] < lat[None, :]) | (acc[:, None] > acc[None, :])
    dominated = (le & ge & strict).any(axis=0)  # [q, p]: q dominates p
    return set(np.flatnonzero(~dominated).tolist())


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- the shipped topologies


def test_shipped_topologies_have_the_papers_numbers():
    mob = Topology.from_yaml(TOPOLOGIES / "mobile.yaml")
    assert mob.names == ("watch", "phone", "edge", "cloud")
    assert [t.ratio for t in mob.tiers] == [500, 10, 2.5, 1]
    assert [(ln.bandwidth_bps, ln.latency_s) for ln in mob.links] == [(5e5, 0.006), (1e7, 0.04), (5e8, 0.05)]
    iot = Topology.from_yaml(TOPOLOGIES / "iiot.yaml")
    assert [t.ratio for t in iot.tiers] == [100, 5, 2.5, 1]
    assert [(ln.bandwidth_bps, ln.latency_s) for ln in iot.links] == [(1e7, 0.01), (4e7, 0.01), (5e8, 0.05)]
    assert mob.source == mob.destination == 1 and iot.source == iot.destination == 1
    # to_dict round-trips
    assert Topology.from_dict(mob.to_dict()) == mob
    assert iot.with_destination("global_cloud").destination == 4


# --------------------------------------------------------------------------- hand-computed latency


def test_hand_computed_two_tier_example():
    prof = Profile(
        block_time_s=[0.001, 0.002], head_time_s=[0.0005, 0.0], output_bits=[8000, 4000], input_bits=16000,
        result_bits=32, head_accuracy=[0.7, 0.9],
        thresholds={"entropy": [0.5]}, exit_rates={"entropy": [[0.6, 0.4]]},
    )
    topo = Topology(tiers=(Tier("device", ratio=10), Tier("cloud", ratio=1)),
                    links=(Link(bandwidth_bps=1e6, latency_s=0.01),), destination=1)
    cfg = Configuration("entropy", 0.5, (1, 2), (1, 2))
    e = estimate(prof, topo, cfg)
    # k=1 on the device: all samples compute block 1 + head 1: 10 * (0.001 + 0.0005) = 0.015
    #   the 0.4 that stay send O_1 = 8000 bits over the link: 0.4 * (0.01 + 8000 / 1e6) = 0.0072
    #   the 0.6 that exit are already at the destination: 0
    # k=2 in the cloud: 0.4 * 1 * 0.002 = 0.0008; results back: 0.4 * (0.01 + 32 / 1e6) = 0.0040128
    assert e.exit_rates == pytest.approx((0.6, 0.4))
    assert e.stay_rates == pytest.approx((0.4, 0.0))
    assert e.computation_s == pytest.approx(0.015 + 0.0008)
    assert e.propagation_s == pytest.approx(0.4 * 0.01 + 0.4 * 0.01)
    assert e.transmission_s == pytest.approx(0.4 * 0.008 + 0.4 * 32e-6)
    assert e.latency_s == pytest.approx(0.0270128, rel=1e-12)
    assert e.accuracy == pytest.approx(0.7 * 0.6 + 0.9 * 0.4)

    # input produced on the device but first partition in the cloud: the input crosses the link
    e2 = estimate(prof, topo, Configuration("entropy", 0.5, (2,), (2,)))
    # input 0.01 + 16000/1e6 = 0.026; compute 0.001 + 0.002 + 0; result back 0.01 + 32e-6
    assert e2.latency_s == pytest.approx(0.026 + 0.003 + 0.010032, rel=1e-12)
    assert e2.accuracy == pytest.approx(0.9)
    # result consumed in the cloud: no way back
    e3 = estimate(prof, topo.with_destination("cloud"), Configuration("entropy", 0.5, (2,), (2,)))
    assert e3.latency_s == pytest.approx(0.026 + 0.003, rel=1e-12)
    # trimmed: the single partition stops at block 1, every sample exits there (E = alpha_1 + alpha_2 = 1)
    e4 = estimate(prof, topo, Configuration("entropy", 0.5, (1,), (1,)))
    assert e4.exit_rates == pytest.approx((1.0,))
    assert e4.latency_s == pytest.approx(0.015) and e4.accuracy == pytest.approx(0.7)
    # vectorised gives the same numbers
    b = estimate_batch(prof, topo, "entropy", 0, np.array([[1, 2], [2, 0], [1, 0]]), np.array([[1, 2], [2, 0], [1, 0]]))
    assert b.latency_s == pytest.approx([0.0270128, 0.039032, 0.015], rel=1e-12)


def test_non_consecutive_placement_hand_computed():
    # three tiers in a chain, the later partition goes back to an earlier (middle) tier
    prof = Profile(block_time_s=[0.001, 0.001], head_time_s=[0.0, 0.0], output_bits=[1000, 1000], input_bits=2000,
                   result_bits=10, head_accuracy=[0.8, 0.9], thresholds={"confidence": [0.9]},
                   exit_rates={"confidence": [[0.75, 0.25]]})
    topo = Topology(tiers=(Tier("a", ratio=100), Tier("b", ratio=5), Tier("c", ratio=1)),
                    links=(Link(1e5, 0.01), Link(1e6, 0.02)), destination=1)
    e = estimate(prof, topo, Configuration("confidence", 0.9, (1, 2), (3, 2)))
    inp = (0.01 + 2000 / 1e5) + (0.02 + 2000 / 1e6)
    k1 = 0.001 + 0.75 * ((0.01 + 10 / 1e5) + (0.02 + 10 / 1e6)) + 0.25 * (0.02 + 1000 / 1e6)
    k2 = 0.25 * 5 * 0.001 + 0.25 * (0.01 + 10 / 1e5)
    assert e.latency_s == pytest.approx(inp + k1 + k2, rel=1e-12)


# --------------------------------------------------------------------------- vectorised == scalar


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_scalar_on_random_configurations(seed):
    rng = np.random.default_rng(seed)
    n_blocks, n_tiers = int(rng.integers(3, 12)), int(rng.integers(2, 6))
    prof = random_profile(rng, n_blocks)
    topo = random_topology(rng, n_tiers, n_blocks)
    configs = random_configs(rng, prof, topo, 300)
    lmax = max(c.n_partitions for c in configs)
    parts = np.zeros((len(configs), lmax), dtype=np.int64)
    tiers = np.zeros_like(parts)
    for r, c in enumerate(configs):
        parts[r, : c.n_partitions] = c.partitions
        tiers[r, : c.n_partitions] = c.placement
    crit = [c.criterion for c in configs]
    thr = [prof.threshold_index(c.criterion, c.threshold) for c in configs]
    got = estimate_batch(prof, topo, crit, thr, parts, tiers)
    ref = [estimate(prof, topo, c) for c in configs]
    np.testing.assert_allclose(got.latency_s, [e.latency_s for e in ref], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got.accuracy, [e.accuracy for e in ref], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got.cost, [e.cost for e in ref], rtol=1e-10, atol=1e-18)
    assert any(e.cost > 0 for e in ref) or all(t.pricing is None for t in topo.tiers)


def test_enumerated_space_matches_scalar_and_is_complete():
    rng = np.random.default_rng(7)
    prof = random_profile(rng, 6, n_thr=5)
    topo = random_topology(rng, 3, 6)
    space = enumerate_space(prof, topo)
    # L=1: 6*3, L=2: 15*6, L=3: 20*6 structures, x 5 thresholds x 2 criteria
    assert len(space) == (6 * 3 + 15 * 6 + 20 * 6) * 5 * 2
    seen = {(c.criterion, c.threshold, c.partitions, c.placement)
            for c in (space.configuration(i) for i in range(len(space)))}
    assert len(seen) == len(space)
    for i in rng.choice(len(space), size=200, replace=False):
        c = space.configuration(int(i))
        e = estimate(prof, topo, c)
        assert space.latency_s[i] == pytest.approx(e.latency_s, rel=1e-10)
        assert space.accuracy[i] == pytest.approx(e.accuracy, rel=1e-10, abs=1e-15)
    untrimmed = enumerate_space(prof, topo, allow_trim=False)
    assert not untrimmed.is_trimmed().any() and space.is_trimmed().any()
    consecutive = enumerate_space(prof, topo, allow_nonconsecutive=False)
    assert consecutive.is_consecutive().all() and not space.is_consecutive().all()
    assert len(enumerate_space(prof, topo, max_partitions=1)) == 6 * 3 * 5 * 2


def test_estimate_plan_with_one_exit_per_partition_equals_estimate():
    rng = np.random.default_rng(3)
    prof = random_profile(rng, 8)
    topo = random_topology(rng, 4, 8)
    for c in random_configs(rng, prof, topo, 50):
        ref = estimate(prof, topo, c)
        got = estimate_plan(prof, topo, criterion=c.criterion, threshold=c.threshold, partitions=c.partitions,
                            exits=[(p,) for p in c.partitions], placement=c.placement)
        assert got.latency_s == pytest.approx(ref.latency_s, rel=1e-10)
        assert got.accuracy == pytest.approx(ref.accuracy, rel=1e-10, abs=1e-15)
        assert got.cost == pytest.approx(ref.cost, rel=1e-10, abs=1e-18)
        assert got.exit_rates == pytest.approx(ref.exit_rates, abs=1e-12)


# --------------------------------------------------------------------------- Pareto front, P_lat, P_acc


def test_pareto_front_is_non_dominated_and_complete_vs_brute_force():
    rng = np.random.default_rng(11)
    prof = random_profile(rng, 5, n_thr=6)
    topo = random_topology(rng, 3, 5)
    space = enumerate_space(prof, topo)
    front = space.pareto_front()
    assert set(front.tolist()) == brute_pareto(space.latency_s, space.accuracy)
    assert np.all(np.diff(space.latency_s[front]) >= 0)
    # with many exact ties (integer grids)
    lat = rng.integers(0, 30, 3000).astype(float)
    acc = rng.integers(0, 30, 3000).astype(float)
    assert set(pareto_front(lat, acc).tolist()) == brute_pareto(lat, acc)
    lat[:10], acc[:10] = -1.0, 99.0  # ten identical best points: all on the front, nothing else
    assert set(pareto_front(lat, acc).tolist()) == set(range(10))


def test_p_lat_and_p_acc_agree_with_brute_force():
    rng = np.random.default_rng(5)
    prof = random_profile(rng, 6, n_thr=8)
    topo = random_topology(rng, 4, 6)
    space = enumerate_space(prof, topo)
    for eps in np.quantile(space.accuracy, [0.0, 0.3, 0.7, 0.95, 1.0]):
        sol = solve_p_lat(space, float(eps))
        feasible = space.accuracy >= eps
        assert sol.accuracy >= eps
        assert sol.latency_s == space.latency_s[feasible].min()
        assert estimate(prof, topo, sol.configuration).latency_s == pytest.approx(sol.latency_s, rel=1e-10)
    for eps in np.quantile(space.latency_s, [0.0, 0.2, 0.5, 1.0]):
        sol = space.solve_p_acc(float(eps))
        feasible = space.latency_s <= eps
        assert sol.latency_s <= eps
        assert sol.accuracy == space.accuracy[feasible].max()
        # the optimum lies on the Pareto front
        assert sol.index in set(space.pareto_front().tolist())
    with pytest.raises(AutoExitError) as exc:
        solve_p_lat(space, 1.5)
    assert "fraction" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        solve_p_lat(space, float(space.accuracy.max()) + 1e-6)
    assert "lower min_accuracy" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        solve_p_acc(space, float(space.latency_s.min()) / 2)
    assert "raise max_latency_s" in one_line(exc)


# --------------------------------------------------------------------------- paper 004's qualitative findings


def _beats(space, other, i) -> bool:
    """Configuration i of ``space`` is strictly more accurate than anything in ``other`` within its latency."""
    ok = other.latency_s <= space.latency_s[i]
    return not ok.any() or space.accuracy[i] > other.accuracy[ok].max()


def test_trimming_is_optimal_for_some_accuracy_budget():
    # Case I: accuracy saturates at block 2, blocks 3-4 are expensive: stopping at block 2 is optimal.
    prof = synthetic_profile(ck=[0.002, 0.002, 0.02, 0.02], acc=[0.5, 0.9, 0.91, 0.92],
                             shares=[0.3, 0.3, 0.2], out_bits=[1e4] * 4)
    topo = three_tier()
    space = enumerate_space(prof, topo)
    sol = space.solve_p_lat(0.9)
    assert sol.configuration.partitions[-1] < prof.n_blocks  # trimmed
    untrimmed = enumerate_space(prof, topo, allow_trim=False)
    assert untrimmed.solve_p_lat(0.9).latency_s > sol.latency_s


def test_several_partitions_and_non_consecutive_placement_are_optimal_for_some_latency_budget():
    # Cases II and III: heavy early blocks on the fast far tier, a confident exit after block 2, and the
    # few remaining samples finish on the middle tier on their way back to the destination.
    prof = synthetic_profile(ck=[0.01, 0.01, 0.004, 0.002], acc=[0.5, 0.85, 0.86, 0.95],
                             shares=[0.0, 0.9, 0.0], out_bits=[1e3] * 4)
    topo = three_tier()
    space = enumerate_space(prof, topo)
    consecutive = enumerate_space(prof, topo, allow_nonconsecutive=False)
    single = enumerate_space(prof, topo, max_partitions=1)
    front = space.pareto_front()
    nonconsec = [i for i in front if not space.is_consecutive()[i] and _beats(space, consecutive, i)]
    assert nonconsec, "no budget where a non-consecutive placement is strictly best"
    i = nonconsec[0]
    sol = space.solve_p_acc(float(space.latency_s[i]))
    assert not sol.configuration.is_consecutive()
    assert sol.accuracy > consecutive.solve_p_acc(float(space.latency_s[i])).accuracy
    multi = [i for i in front if space.n_partitions()[i] >= 2 and _beats(space, single, i)]
    assert multi, "no budget where several partitions beat one"


def test_destination_changes_the_optimal_placement():
    # Case IV: the same partitioning, placed differently depending on where the result is consumed.
    prof = synthetic_profile(ck=[0.002] * 4, acc=[0.5, 0.85, 0.86, 0.95], shares=[0.0, 0.9, 0.0],
                             out_bits=[1e3] * 4)
    near, far = three_tier("dev"), three_tier("far")
    s_near, s_far = enumerate_space(prof, near), enumerate_space(prof, far)
    differs = []
    for eps in (0.6, 0.85):
        a, b = s_near.solve_p_lat(eps), s_far.solve_p_lat(eps)
        if a.configuration.placement != b.configuration.placement:
            differs.append(eps)
            # ignoring the destination (using the other destination's optimum) is strictly worse
            assert estimate(prof, far, a.configuration).latency_s > b.latency_s
            assert estimate(prof, near, b.configuration).latency_s > a.latency_s
            assert a.configuration.partitions == b.configuration.partitions
    assert differs


# --------------------------------------------------------------------------- profiling


def test_from_predictions_exit_rates_and_accuracy_follow_the_paper():
    # 3 exits x 4 samples
    conf = np.array([[0.95, 0.2, 0.5, 0.1],
                     [0.99, 0.9, 0.6, 0.2],
                     [0.99, 0.9, 0.7, 0.3]])
    ent = 1.0 - conf
    corr = np.array([[1, 0, 0, 0],
                     [1, 1, 0, 0],
                     [1, 1, 1, 0]], dtype=bool)
    timings = np.tile(np.arange(1, 101, dtype=float) * 1e-3, (3, 1))  # 1..100 ms per block
    prof = Profile.from_predictions(correct=corr, confidence=conf, entropy=ent, thresholds=[0.0, 0.55, 0.9, 1.0],
                                    block_time_s=timings, head_time_s=[1e-4, 1e-4, 0.0], output_bits=[10, 20, 30],
                                    input_bits=40, block_names=["layer1", "layer2", "fc"])
    # confidence >= T, first exit: T=0 all at exit 1; T=0.55 -> exits 1, 2, 3(forced), 3... :
    #   s0 (0.95) exit 1, s1 (0.2, 0.9) exit 2, s2 (0.5, 0.6) exit 2, s3 forced at 3
    c = prof.rates("confidence")
    np.testing.assert_allclose(c[0], [1, 0, 0])
    np.testing.assert_allclose(c[1], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(c[2], [0.25, 0.25, 0.5])  # T=0.9: s0 at 1, s1 at 2 (0.9 >= 0.9), others forced
    np.testing.assert_allclose(c[3], [0, 0, 1])
    # entropy < T (unconditional rates, rows sum to 1): T=0 none exits early
    e = prof.rates("entropy")
    np.testing.assert_allclose(e[0], [0, 0, 1])
    # T=0.55: 1-conf < 0.55 <=> conf > 0.45: s0 and s2 (0.5) at exit 1, s1 at 2, s3 forced at 3
    np.testing.assert_allclose(e[1], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(e.sum(axis=1), 1.0)
    assert prof.head_accuracy == (0.25, 0.5, 0.75) and prof.final_accuracy == 0.75
    assert prof.block_time_s[0] == pytest.approx(np.percentile(np.arange(1, 101) * 1e-3, 99))
    assert prof.block_names == ("layer1", "layer2", "fc")
    # raw entropies with n_classes are normalised
    p2 = Profile.from_predictions(correct=corr, entropy=ent * math.log(10), n_classes=10, thresholds=[0.55],
                                  block_time_s=[1, 1, 1], head_time_s=[0, 0, 0], output_bits=[1, 1, 1], input_bits=1)
    np.testing.assert_allclose(p2.rates("entropy")[0], [0.5, 0.25, 0.25])
    assert p2.criteria == ("entropy",)


def test_full_configuration_estimate_equals_the_real_model_and_simulation_is_exact():
    rng = np.random.default_rng(2)
    n, s = 3, 500
    conf = rng.random((n, s))
    corr = rng.random((n, s)) < 0.7
    prof = Profile.from_predictions(correct=corr, confidence=conf, block_time_s=[1e-3] * n,
                                    head_time_s=[0.0] * n, output_bits=[1e3] * n, input_bits=1e3)
    topo = random_topology(rng, 3, n)
    for T in prof.thresholds["confidence"][::4]:
        rates, acc = simulate_partitioned(correct=corr, confidence=conf, criterion="confidence", threshold=T,
                                          partitions=[1, 2, 3])
        e = estimate(prof, topo, Configuration("confidence", T, (1, 2, 3), (1, 2, 3)))
        # every exit present: the estimated exit rates are exact
        assert e.exit_rates == pytest.approx(rates, abs=1e-12)
    # a hand-checked partial model: exits at 1 and 3 only, confidence >= 0.5
    c = np.array([[0.9, 0.1, 0.4], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]])
    k = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    rates, acc = simulate_partitioned(correct=k, confidence=c, criterion="confidence", threshold=0.5,
                                      partitions=[1, 3])
    assert rates == pytest.approx((1 / 3, 2 / 3)) and acc == pytest.approx(2 / 3)


def test_profile_json_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    prof = random_profile(rng, 5)
    prof = Profile.from_dict({**prof.to_dict(), "block_memory_bytes": [1, 2, 3, 4, 5], "meta": {"backbone": "abc"}})
    path = tmp_path / "sub" / "profile.json"
    prof.to_json(path)
    back = Profile.from_json(path)
    assert back == prof
    assert json.loads(path.read_text())["schema"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # nothing half-written left


# --------------------------------------------------------------------------- constraint-driven split (paper 002)


def _split_fixture(pricing=None):
    n = 12
    rows = ramp_rates([0.05] * (n - 1))
    prof = Profile(block_time_s=[1e-3] * n, head_time_s=[1e-4] * (n - 1) + [0.0], output_bits=[1e4] * n,
                   input_bits=1e4, head_accuracy=list(np.linspace(0.5, 0.95, n)),
                   thresholds={"confidence": DEFAULT_THRESHOLDS}, exit_rates={"confidence": rows},
                   block_memory_bytes=[1] * 8 + [4] * 4)
    topo = Topology(tiers=(Tier("edge", ratio=2.0), Tier("cloud", ratio=1.0, pricing=pricing)),
                    links=(Link(1e7, 0.02),), destination=1)
    return prof, topo


def test_constraint_split_latency_and_memory():
    prof, topo = _split_fixture()
    # the whole network takes 12 ms in the cloud; each block takes 2 ms on the edge -> 6 blocks on the edge
    plan = constraint_split(prof, topo, constraint="latency", exits_per_part=3, distribution="linear")
    assert plan.split == 6
    assert plan.edge_exits == (2, 4, 6)
    assert plan.cloud_exits[-1] == 12 and all(6 < x < 12 for x in plan.cloud_exits[:-1])
    assert len(plan.cloud_exits) == 4
    # memory: 24 units in all, 70% = 16.8 -> blocks 1..10 hold 8 + 2*4 = 16
    mplan = constraint_split(prof, topo, constraint="memory", memory_share=0.7)
    assert mplan.split == 10
    assert all(x <= 10 for x in mplan.edge_exits) and all(x > 10 for x in mplan.cloud_exits)
    # pareto crowds exits towards the start of each part
    pplan = constraint_split(prof, topo, constraint="latency", distribution="pareto")
    assert pplan.edge_exits[-1] == 6 and sum(pplan.edge_exits) < sum(plan.edge_exits)
    assert len(plan.estimates) == 20
    # estimates are those of the generalised model with these exits
    e = plan.estimates[5]
    ref = estimate_plan(prof, topo, criterion="confidence", threshold=e.threshold, partitions=(6, 12),
                        exits=(plan.edge_exits, plan.cloud_exits), placement=("edge", "cloud"))
    assert e == ref
    # more exits -> the samples leave earlier: offload falls as the threshold admits more exits
    assert plan.estimates[-1].offload_rate < plan.estimates[0].offload_rate


def test_exit_positions():
    assert exit_positions(1, 10, 3, "linear") == (3, 7, 10)
    assert exit_positions(11, 20, 3, "linear", include_last=False) == (13, 15, 18)
    assert exit_positions(1, 10, 3, "pareto") == (1, 4, 10)
    assert exit_positions(1, 2, 3, "linear") == (1, 2)  # merged, never more than the part holds
    assert exit_positions(5, 5, 3, "linear", include_last=False) == ()


def test_serverless_cost_reported_next_to_latency():
    pricing = CloudPricing(per_invocation=4e-7, per_gb_second=2.5e-6, memory_gb=2.0)
    prof, topo = _split_fixture(pricing)
    plan = constraint_split(prof, topo, constraint="latency", exits_per_part=1)
    assert plan.edge_exits == (6,) and plan.cloud_exits == (9, 12)
    for e in plan.estimates:
        # cloud work per offloaded sample: blocks 7-9 + head 9 for all, blocks 10-12 for those not exiting at 9
        stay9 = e.offload_rate - e.exit_rates[1]
        work = e.offload_rate * (3e-3 + 1e-4) + stay9 * 3e-3
        expect = e.offload_rate * 4e-7 + 2.5e-6 * 2.0 * work
        assert e.cost == pytest.approx(expect, rel=1e-9)
    assert plan.estimates[0].cost > plan.estimates[-1].cost > 0
    # billing increments round every invocation up
    rounded = CloudPricing(4e-7, 2.5e-6, 2.0, billing_increment_s=0.1)
    assert rounded.invocation_cost(0.003) == pytest.approx(4e-7 + 2.5e-6 * 2.0 * 0.1)


def test_constraint_split_errors():
    prof, topo = _split_fixture()
    with pytest.raises(AutoExitError) as exc:
        constraint_split(prof, topo, constraint="memory")
    assert "memory_share" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        constraint_split(prof, topo, constraint="latency", exits_per_part=4)
    assert "3" in one_line(exc)
    slow = Topology(tiers=(Tier("edge", ratio=100.0), Tier("cloud", ratio=1.0)), links=(Link(1e7, 0.02),),
                    destination=1)
    with pytest.raises(AutoExitError) as exc:
        constraint_split(prof, slow, constraint="latency")
    assert "block 1 alone" in one_line(exc)


# --------------------------------------------------------------------------- bad input


GOOD = {"name": "t", "tiers": [{"name": "a", "ratio": 10}, {"name": "b", "ratio": 1}],
        "links": [{"bandwidth_bps": 1e6, "latency_s": 0.01}], "destination": "a"}


def _with(**kw):
    d = json.loads(json.dumps(GOOD))
    d.update(kw)
    return d


@pytest.mark.parametrize("bad, needle", [
    (_with(links=[]), "2 tiers but 0 links"),
    (_with(links=[{"bandwidth_bps": -5, "latency_s": 0.01}]), "bandwidth_bps must be > 0"),
    (_with(links=[{"bandwidth_bps": 1e6, "latency_s": "soon"}]), "latency_s must be a number"),
    (_with(links=[{"bandwidth_bps": 1e6}]), "missing ['latency_s']"),
    (_with(links=[{"from": "b", "to": "a", "bandwidth_bps": 1e6, "latency_s": 0.01}]), "consecutive tiers"),
    (_with(tiers=[{"name": "a"}, {"name": "b", "ratio": 1}]), "needs either 'ratio'"),
    (_with(tiers=[{"name": "a", "ratio": 0}, {"name": "b", "ratio": 1}]), "ratio must be > 0"),
    (_with(tiers=[{"name": "a", "ratio": 1, "block_latency_s": [1]}, {"name": "b", "ratio": 1}]), "keep only one"),
    (_with(tiers=[{"name": "a", "ratio": 1}, {"name": "a", "ratio": 1}]), "duplicate tier names"),
    (_with(tiers=[{"name": "a", "ratoi": 1}, {"name": "b", "ratio": 1}]), "unknown key(s) ['ratoi']"),
    (_with(destination="moon"), "'moon' is not a tier"),
    (_with(destination=3), "index in 1..2"),
    (_with(tiers=[]), "non-empty list"),
])
def test_bad_topology_rejected_with_one_line(bad, needle):
    with pytest.raises(AutoExitError) as exc:
        Topology.from_dict(bad)
    assert needle in one_line(exc)


def test_bad_topology_files(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("tiers: [\n")
    with pytest.raises(AutoExitError) as exc:
        Topology.from_yaml(p)
    assert "not valid YAML" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        Topology.from_yaml(tmp_path / "missing.yaml")
    assert "cannot read topology file" in one_line(exc)
    # YAML 1.1 reads 5e5 as a string: still accepted as a number
    p.write_text("tiers: [{name: a, ratio: 1}, {name: b, ratio: 1}]\nlinks: [{bandwidth_bps: 5e5, latency_s: 0}]\n")
    assert Topology.from_yaml(p).links[0].bandwidth_bps == 5e5
    # measured latencies must match the profile's blocks
    p.write_text("tiers: [{name: a, block_latency_s: [1, 2], head_latency_s: [0, 0]}, {name: b, ratio: 1}]\n"
                 "links: [{bandwidth_bps: 1, latency_s: 0}]\n")
    topo = Topology.from_yaml(p)
    prof = synthetic_profile([1e-3] * 3, [0.5, 0.6, 0.7], [0.1, 0.1], [1, 1, 1])
    with pytest.raises(AutoExitError) as exc:
        estimate(prof, topo, Configuration("entropy", 0.0, (3,), (1,)))
    assert "measured latencies for 2 blocks but the profile has 3" in one_line(exc)


def _profile_dict():
    return synthetic_profile([1e-3] * 3, [0.5, 0.6, 0.7], [0.1, 0.1], [1, 1, 1]).to_dict()


@pytest.mark.parametrize("patch, needle", [
    ({"head_accuracy": [0.5, 0.6, 70]}, "must be <= 1"),
    ({"head_time_s": [0, 0]}, "has 2 entries but there are 3 blocks"),
    ({"output_bits": [1, 0, 1]}, "output_bits[1] must be > 0"),
    ({"exit_rates": {"entropy": [[0.5, 0.5, 0.5]] * 20}}, "sums to 1.5, not 1"),
    ({"exit_rates": {"entropy": [[0, 0, 1]] * 19}}, "one row per threshold (20)"),
    ({"thresholds": {"margin": [0.5]}, "exit_rates": {"margin": [[0, 0, 1]]}}, "unknown criteria ['margin']"),
    ({"block_time_s": [1, float("nan"), 1]}, "must be finite"),
    ({"schema": 9}, "schema 9 is not supported"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
])
def test_bad_profile_rejected_with_one_line(patch, needle):
    d = {**_profile_dict(), **patch}
    with pytest.raises(AutoExitError) as exc:
        Profile.from_dict(d)
    assert needle in one_line(exc)


def test_bad_predictions_and_configurations_rejected():
    corr = np.ones((3, 5), dtype=bool)
    kw = dict(block_time_s=[1, 1, 1], head_time_s=[0, 0, 0], output_bits=[1, 1, 1], input_bits=1)
    with pytest.raises(AutoExitError) as exc:
        Profile.from_predictions(correct=corr, confidence=np.ones((3, 4)), **kw)
    assert "confidence has shape (3, 4) but correct has (3, 5)" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        Profile.from_predictions(correct=corr, entropy=np.full((3, 5), 2.0), **kw)
    assert "n_classes" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        Profile.from_predictions(correct=corr, **kw)
    assert "confidence and/or entropy" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        Profile.from_predictions(correct=corr, confidence=np.ones((3, 5)), **{**kw, "block_time_s": [1, 1]})
    assert "block_time_s must have shape [3]" in one_line(exc)

    prof = synthetic_profile([1e-3] * 3, [0.5, 0.6, 0.7], [0.1, 0.1], [1, 1, 1])
    topo = three_tier()
    for cfg, needle in [
        (Configuration("entropy", 0.0, (2, 1), (1, 2)), "strictly increasing"),
        (Configuration("entropy", 0.0, (1, 2), (2, 2)), "distinct tier"),
        (Configuration("entropy", 0.0, (1, 2), (2,)), "one tier per partition"),
        (Configuration("entropy", 0.123, (3,), (1,)), "was not profiled"),
        (Configuration("confidence", 0.0, (3,), (1,)), "not in the profile"),
        (Configuration("entropy", 0.0, (4,), (1,)), "in 1..3"),
    ]:
        with pytest.raises(AutoExitError) as exc:
            estimate(prof, topo, cfg)
        assert needle in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        estimate_batch(prof, topo, "entropy", 0, np.array([[1, 2]]), np.array([[1, 1]]))
    assert "at most one partition" in one_line(exc)
    with pytest.raises(AutoExitError) as exc:
        enumerate_space(prof, topo, max_configs=10)
    assert "lower max_partitions" in one_line(exc)


def test_perfmodel_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, autoexit.perfmodel; print('torch' in sys.modules, 'optuna' in sys.modules, 'nni' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
