"""The Optuna outer search over partitioned configurations: split points, placement and exits per part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("optuna")

from autoexit import perfmodel as pm  # noqa: E402
from autoexit.errors import AutoExitError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IIOT = ROOT / "experiments" / "topologies" / "iiot.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def profile(digits_result, tmp_path_factory):
    from autoexit.partition import profile_result

    return profile_result(digits_result, cache_dir=tmp_path_factory.mktemp("pcache"), progress=False)


@pytest.fixture(scope="module")
def search(digits_result, profile, tmp_path_factory):
    from autoexit.partition import optimize_partitioned

    part = {"topology": str(IIOT), "profile": profile, "max_partitions": 3, "exits_per_part": 2}
    res = optimize_partitioned(digits_result, part, space="outer_ci", settings={"n_trials": 40, "seed": 0},
                               run_dir=tmp_path_factory.mktemp("study"), progress=False)
    return res, part


def test_trials_search_split_points_and_placement(search, profile):
    from autoexit.perfmodel import estimate_plan_rates

    res, part = search
    topo = pm.Topology.from_yaml(IIOT)
    trials = [t for t in res.study.trials if "partition" in t.user_attrs]
    assert len(trials) == 40
    seen_L, seen_place = set(), set()
    names = list(res.recorded.names)
    for t in trials:
        p = t.user_attrs["partition"]
        P, A = p["partitions"], p["placement"]
        assert P[-1] == profile.n_blocks and all(b > a for a, b in zip(P, P[1:]))
        assert len(A) == len(P) and len(set(A)) == len(A) and set(A) <= set(topo.names)
        assert t.params.get("n_parts", 1) >= len(P)  # duplicated cuts merge
        seen_L.add(len(P))
        seen_place.add(tuple(A))
        # the trial's cost is the performance model's latency of its exits, with the rates it simulated
        v = t.user_attrs["val"]
        kept = [names.index(n) + 1 for n in t.user_attrs["plan"]["kept"]]
        X = [[x for x in kept if (P[k - 1] if k else 0) < x <= P[k]] for k in range(len(P))]
        X[-1].append(profile.n_blocks)
        e = estimate_plan_rates(profile, topo, partitions=P, exits=X, placement=A, exit_rates=v["exit_rates"])
        assert t.values[0] == pytest.approx(1000 * e.latency_s)
        assert v["partition"]["exits_per_part"] == [len(x) for x in X[:-1]] + [len(X[-1]) - 1]
        assert t.constraints["exits_per_part"] == pytest.approx(max(v["partition"]["exits_per_part"]) - 2)
    assert len(seen_L) >= 2 and len(seen_place) >= 4
    assert res.settings.cost == "latency"


def test_chosen_configuration_becomes_a_partitioned_model(search, digits_result, profile):
    from autoexit.partition import build_partitions, plan_from_search, run_chain

    res, part = search
    plan = plan_from_search(res, part)
    chosen = res.chosen_trial.user_attrs
    assert list(plan.partitions) == chosen["partition"]["partitions"]
    assert list(plan.placement) == chosen["partition"]["placement"] and plan.topology is not None
    assert [profile.block_names[b - 1] for b in plan.exit_blocks[:-1]] == chosen["plan"]["kept"]
    # the real modules leave exactly where the trial's simulation on val said
    mods = build_partitions(digits_result, plan)
    run = run_chain(mods, digits_result.recording.inputs("val"))
    real = np.bincount(run["exit_index"].numpy(), minlength=plan.n_exits) / len(run["exit_index"])
    np.testing.assert_allclose(real, chosen["val"]["exit_rates"], atol=2e-3)
    assert torch.all(run["exit_index"] >= 0)


def test_partition_space_checks(digits_result, profile):
    from autoexit.partition import PartitionSpace
    from autoexit.search.outer import Recorded

    with pytest.raises(AutoExitError, match="unknown partition setting"):
        PartitionSpace.from_dict({"topology": str(IIOT), "profile": profile, "splits": 3})
    with pytest.raises(AutoExitError, match="max_partitions must be in 1..4"):
        PartitionSpace.from_dict({"topology": str(IIOT), "profile": profile, "max_partitions": 5})
    with pytest.raises(AutoExitError, match="partition.profile is missing"):
        PartitionSpace.from_dict({"topology": str(IIOT), "profile": None})
    with pytest.raises(AutoExitError, match="placement must be 'any' or 'consecutive'"):
        PartitionSpace.from_dict({"topology": str(IIOT), "profile": profile, "placement": "random"})
    sp = PartitionSpace.from_dict({"topology": str(IIOT), "profile": profile, "placement": "consecutive",
                                   "destination": "global_cloud"})
    rec = Recorded.from_result(digits_result)
    hook = sp.hook(rec.names)
    assert all(
        [hook.topology.names.index(t) for t in c.split(">")] == sorted(hook.topology.names.index(t) for t in c.split(">"))
        for c in hook.placements[3])
    assert len(hook.placements[2]) == 6 and hook.topology.destination == 4
    with pytest.raises(AutoExitError, match="are not the recorded exits"):
        sp.hook(rec.names[:-1])
