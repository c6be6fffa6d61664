"""Exit policies: every policy scripts into the emitted model and decides exactly as simulated;
gates never read labels (but the labelled 'harmless' target, which learns what it says); the cost-aware
exit set drops useless heads; configuration errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoexit.errors import AutoExitError
from autoexit.model import optimize_for_runtime, to_torchscript
from autoexit.pipeline import EnableConfig, assemble
from autoexit.policies import (
    POLICIES,
    ExitCosts,
    ExitTable,
    GatePolicy,
    PolicyContext,
    make_policy,
)
from autoexit.policies.gate import GateConfig, gate_target, train_gate

FAST = {"gate": {"steps": 40}, "auto": {"options": {"gate": {"steps": 40}}}}
_CACHE: dict = {}


def _assemble(digits_result, policy: str):
    """One assembled result per policy for the whole module (tests restore what they change)."""
    if policy not in _CACHE:
        r = digits_result
        cfg = EnableConfig(tolerance=2.0, policy=policy, policy_options=FAST.get(policy, {}))
        _CACHE[policy] = assemble(cfg, r.backbone, r.points, r.recording, r.heads,
                                  predictions={"val": r.val, "test": r.test})
    return _CACHE[policy]


@pytest.mark.parametrize("policy", ["paper003", "max_softmax", "margin", "entropy", "patience", "gate", "auto"])
def test_policy_scripts_and_scripted_decisions_equal_the_simulation(digits_result, policy):
    res = _assemble(digits_result, policy)
    assert res.kept, f"{policy} kept no exit on digits"
    x = res.recording.inputs("test")
    scripted = to_torchscript(res.model, x[:1])
    with torch.no_grad():
        out, idx = scripted(x)
        eager_out, eager_idx = res.model(x)
    simulated = np.asarray(res.metrics["test"]["exit_index"])
    assert np.array_equal(idx.numpy(), simulated)
    assert torch.equal(idx, eager_idx) and torch.allclose(out, eager_out, atol=1e-6)
    with torch.no_grad():  # and so does the optimised runtime (load(optimize=True)): rules, history, stats
        assert np.array_equal(optimize_for_runtime(scripted)(x)[1].numpy(), simulated)
    # the metrics' agreement is the scripted model's agreement with the backbone
    bpred = res.test.backbone_pred.numpy()
    assert res.metrics["test"]["agreement"] == pytest.approx(float((out.argmax(1).numpy() == bpred).mean()))
    assert res.metrics["test"]["saving"] > 0
    pol = res.extra["policy"]
    if policy != "paper003":
        assert "calibration samples" in pol["statement"] and str(res.val.n) in pol["statement"]
        assert res.manifest()["policy"]["guarantee"]["n"] == res.val.n
    if policy == "auto":  # the manifest says which candidate was deployed and why
        auto = res.manifest()["policy"]["auto"]
        assert auto["chosen"] == res.manifest()["policy"]["name"] == pol["policy"]
        assert set(auto["candidates"]) == {"max_softmax", "margin", "entropy", "patience", "gate"}
        html = dict(res.extra["report_sections"])["Exit policy and guarantee"]
        assert "auto compared 5 policies" in html and f"{pol['policy']} (deployed)" in html
        assert dict(res.summary_rows())["exit policy"].startswith(f"{pol['policy']}, chosen by auto (risk:")
    if policy == "paper003":
        assert pol["statement"].startswith("no guarantee")


def test_history_rules_keep_batch_shrinking_per_sample_exact(digits_result):
    res = _assemble(digits_result, "gate")
    model = res.model
    assert model.keep_prev >= 1 and model.num_exits >= 2
    x = res.recording.inputs("test")[:96]
    with torch.no_grad():
        out, idx = model(x)
        alone = [model(x[i : i + 1]) for i in range(len(x))]
    assert torch.equal(idx, torch.cat([a[1] for a in alone]))
    assert torch.allclose(out, torch.cat([a[0] for a in alone]), atol=1e-5)
    assert len(set(idx.tolist())) >= 2  # several exits answer: shrinking actually happened
    # scores the model computes equal the offline scores used for calibration
    with torch.no_grad():
        online = torch.stack(model.exit_scores(x)).double().numpy()
    from autoexit.policies.cascade import chain_scores

    names = res.kept
    table = ExitTable.from_predictions(res.test.subset(names), [res.temperatures[n] for n in names],
                                       _stats(res, names))
    offline = chain_scores(model.rules(), list(range(len(names))), table)[:, :96]
    assert np.allclose(online, offline, atol=1e-5)


def _stats(res, names):
    from autoexit.pipeline import split_stats

    return split_stats(res.recording, names, "test")


@pytest.mark.parametrize("policy", ["gate", "patience"])
def test_all_thresholds_inf_is_bit_identical_to_backbone(digits_result, policy):
    res = _assemble(digits_result, policy)
    model = res.model
    saved = model.thresholds()
    model.set_thresholds([float("inf")] * model.num_exits)
    try:
        x = res.recording.inputs("test")[:64]
        with torch.no_grad():
            out, idx = model(x)
            ref = res.backbone.model(x)
            sout, sidx = to_torchscript(model, x[:1])(x)
        assert torch.equal(out, ref) and torch.equal(sout, ref)
        assert (idx == model.num_exits).all() and (sidx == model.num_exits).all()
    finally:
        model.set_thresholds(saved)


def test_gate_training_never_reads_labels(digits_result):
    r = digits_result
    temps = [r.temperatures[n] for n in r.val.names]
    fit = ExitTable.from_predictions(r.val, temps)
    garbage = fit.subset_rows(np.arange(fit.n))
    garbage.labels = torch.randint(0, 10, (fit.n,), generator=torch.Generator().manual_seed(1))
    none = fit.subset_rows(np.arange(fit.n))
    none.labels = None
    g1 = train_gate(fit.z[1], [fit.z[0]], None, fit.backbone_logits, GateConfig(steps=30, act_stats=False))
    g2 = train_gate(none.z[1], [none.z[0]], None, none.backbone_logits, GateConfig(steps=30, act_stats=False))
    for (k, a), (_, b) in zip(g1.state_dict().items(), g2.state_dict().items()):
        assert torch.equal(a, b), k
    # the whole gate policy: same exits, gates and thresholds with garbage labels or none
    cal = ExitTable.from_predictions(r.test, temps)
    costs = ExitCosts([r.heads[n].flops for n in r.val.names],
                      [r.heads[n].point.flops_before for n in r.val.names], r.backbone.total_flops)
    fits = []
    for f in (garbage, none):
        fits.append(GatePolicy(steps=30, act_stats=False).fit(PolicyContext(f, cal, costs, 2.0, max_exits=2)))
    a, b = fits
    assert a.chain == b.chain and np.array_equal(a.thresholds, b.thresholds)
    for ga, gb in zip(a.rules, b.rules):
        for (k, x), (_, y) in zip(ga.state_dict().items(), gb.state_dict().items()):
            assert torch.equal(x, y), k


def test_gate_target_harmless_counts_only_exits_that_cost_accuracy():
    # four samples: both right; head wrong, backbone right (the one harmful exit); both wrong; head right only
    z = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 5).float()
    backbone = torch.nn.functional.one_hot(torch.tensor([1, 0, 0, 0]), 5).float()
    labels = torch.tensor([1, 0, 2, 4])
    assert gate_target(z, backbone).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert gate_target(z, backbone, "harmless", labels).tolist() == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(AutoExitError, match="needs the labels"):
        gate_target(z, backbone, "harmless")
    with pytest.raises(AutoExitError, match="one label per sample"):
        gate_target(z, backbone, "harmless", labels[:3])
    with pytest.raises(AutoExitError, match="unknown gate target"):
        GateConfig(target="agreement")


def _backbone_wrong_on_class(n=2000, c=10, bad=9, seed=0):
    """Head right on every sample of class ``bad`` and on half of the others; the backbone right on every
    sample but those of class ``bad``, which it calls class 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    bpred = torch.where(y == bad, torch.zeros_like(y), y)
    coin = torch.rand(n, generator=g) < 0.5
    hpred = torch.where((y == bad) | coin, y, (y + 1 + torch.randint(0, c - 2, (n,), generator=g)) % c)
    hpred = torch.where((hpred == bad) & (y != bad), (hpred + 1) % c, hpred)  # only class-bad samples predict bad
    z = torch.nn.functional.one_hot(hpred, c).float() * 2 + 0.3 * torch.randn(n, c, generator=g)
    return z, torch.nn.functional.one_hot(bpred, c).float() * 5, y


def test_harmless_gate_learns_that_exits_where_the_backbone_is_wrong_cost_nothing():
    z, b, y = _backbone_wrong_on_class()
    cfg = GateConfig(steps=60, act_stats=False, history=0)
    agree = train_gate(z, [], None, b, cfg)
    harmless = train_gate(z, [], None, b, GateConfig(**{**cfg.to_dict(), "target": "harmless"}), labels=y)
    with torch.no_grad():
        sa, sh = agree(z, [], torch.zeros(1)), harmless(z, [], torch.zeros(1))
    bad = z.argmax(1) == 9
    # the head disagrees with the backbone on every class-9 answer, but each of them is right: harmless to let out
    assert sa[bad].mean() < 0.1 and sh[bad].mean() > 0.9
    # elsewhere both targets are "the head is right", and both gates rank alike
    assert abs(float(sa[~bad].mean() - sh[~bad].mean())) < 0.1
    # and the labels are read: other labels, another gate
    other = train_gate(z, [], None, b, GateConfig(**{**cfg.to_dict(), "target": "harmless"}), labels=(y + 1) % 10)
    assert not torch.equal(other.net[0].weight, harmless.net[0].weight)


def test_harmless_gate_policy_lets_out_more_at_the_same_labelled_budget():
    fit, cal = (ExitTable(["e0"], [z], b, y) for z, b, y in (_backbone_wrong_on_class(seed=0),
                                                              _backbone_wrong_on_class(seed=1)))
    costs = ExitCosts([1.0], [10.0], 100.0)
    opts = {"steps": 60, "act_stats": False, "history": 0}
    res = {t: GatePolicy(**opts, target=t).fit(PolicyContext(fit, cal, costs, 2.0, risk="drop"))
           for t in ("agree", "harmless")}
    for t, fp in res.items():
        assert fp.guarantee.certified and fp.info["gate_target"] == t
    saved = {t: fp.evaluate(cal, costs)["saving"] for t, fp in res.items()}
    assert saved["harmless"] > saved["agree"] + 0.05, saved
    # label-free risk: refused in one line, before anything is trained
    with pytest.raises(AutoExitError, match="target 'harmless'.*risk='drop'"):
        GatePolicy(target="harmless").fit(PolicyContext(fit, cal, costs, 2.0))
    with pytest.raises(AutoExitError, match="target 'harmless'"):
        EnableConfig(policy="gate", policy_options={"target": "harmless"})
    with pytest.raises(AutoExitError, match="target 'harmless'"):
        EnableConfig(policy="auto", risk="disagreement", policy_options={"options": {"gate": {"target": "harmless"}}})
    EnableConfig(policy="gate", risk="drop", policy_options={"target": "harmless"})  # accepted
    nolab = ExitTable(["e0"], fit.z, fit.backbone_logits, None)
    with pytest.raises(AutoExitError, match="needs labels on the fit split"):
        GatePolicy(target="harmless").fit(PolicyContext(nolab, cal, costs, 2.0, risk="drop"))


def test_harmless_gate_policy_scripts_and_decides_as_simulated(digits_result):
    r = digits_result
    cfg = EnableConfig(tolerance=2.0, policy="gate", risk="drop",
                       policy_options={"steps": 40, "target": "harmless"})
    res = assemble(cfg, r.backbone, r.points, r.recording, r.heads, predictions={"val": r.val, "test": r.test})
    assert res.kept and res.extra["policy"]["gate_target"] == "harmless"
    assert res.manifest()["policy"]["gate_target"] == "harmless"  # the artifact says its gates read labels
    x = res.recording.inputs("test")
    scripted = to_torchscript(res.model, x[:1])
    with torch.no_grad():
        _, idx = scripted(x)
        _, fast_idx = optimize_for_runtime(scripted)(x)  # the labelled gate, optimised too
    assert np.array_equal(idx.numpy(), np.asarray(res.metrics["test"]["exit_index"]))
    assert torch.equal(fast_idx, idx)


def test_cascade_heads_script_and_match_simulation(digits_result):
    from autoexit.distill import TrainConfig, train_cascade_heads
    from autoexit.policies.heads import CascadeHead

    r = digits_result
    chain = [n for n in r.val.names][-3:]
    chained = train_cascade_heads(r.recording, r.heads, chain, TrainConfig(epochs=3), num_prev=1)
    assert isinstance(chained[chain[1]].module, CascadeHead) and chained[chain[1]].module.num_prev == 1
    cfg = EnableConfig(tolerance=2.0, policy="gate", policy_options={"steps": 30})
    res = assemble(cfg, r.backbone, r.points, r.recording, chained)
    assert res.kept == chain  # a cascade keeps its chain
    x = res.recording.inputs("test")
    scripted = to_torchscript(res.model, x[:1])
    with torch.no_grad():
        _, idx = scripted(x)
        _, fast_idx = optimize_for_runtime(scripted)(x)  # cascade heads read earlier logits, optimised too
    assert np.array_equal(idx.numpy(), np.asarray(res.metrics["test"]["exit_index"]))
    assert torch.equal(fast_idx, idx)
    res.model.set_thresholds([float("inf")] * res.model.num_exits)
    with torch.no_grad():
        assert torch.equal(res.model(x[:32])[0], r.backbone.model(x[:32]))


def _synthetic_tables(n=3000, seed=0):
    """Three exits: exit 1 is useless (random logits), exits 0 and 2 are informative."""
    g = torch.Generator().manual_seed(seed)
    c = 10
    b = torch.randn(n, c, generator=g) * 3
    y = b.argmax(1)

    def noisy(scale):
        return b + torch.randn(n, c, generator=g) * scale

    z = [noisy(2.0), torch.randn(n, c, generator=g), noisy(0.7)]
    return ExitTable(["e0", "e1", "e2"], z, b, y)


def test_cost_aware_exit_set_drops_a_head_that_rarely_fires():
    fit, cal = _synthetic_tables(seed=0), _synthetic_tables(seed=1)
    costs = ExitCosts([1.0, 1.0, 1.0], [10.0, 50.0, 80.0], 100.0)
    for name in ("max_softmax", "gate", "patience"):
        opts = {"steps": 30, "act_stats": False} if name == "gate" else {}
        fp = make_policy(name, **opts).fit(PolicyContext(fit, cal, costs, 2.0))
        assert 1 not in fp.chain, name
        assert fp.guarantee.certified


def test_configuration_errors_are_one_line(digits_result):
    with pytest.raises(AutoExitError, match="unknown exit policy"):
        EnableConfig(policy="nope")
    with pytest.raises(AutoExitError, match="delta"):
        EnableConfig(delta=1.5)
    with pytest.raises(AutoExitError, match="risk"):
        EnableConfig(risk="accuracy")
    with pytest.raises(AutoExitError, match="bad options"):
        make_policy("gate", bogus=1)
    r = digits_result
    temps = [r.temperatures[n] for n in r.val.names]
    nolab = ExitTable.from_predictions(r.val, temps, labels=False)
    costs = ExitCosts([1.0] * len(temps), [1.0] * len(temps), 10.0)
    with pytest.raises(AutoExitError, match="needs labels"):
        make_policy("max_softmax").fit(PolicyContext(nolab, nolab, costs, 2.0, risk="harm"))
    assert set(POLICIES) >= {"paper003", "max_softmax", "margin", "entropy", "patience", "gate"}


def _brute_force_flops(names_all, z_tables, thr_full, costs, table):
    """Expected FLOPs of the full chain at ``thr_full`` when every head up to the exit is paid, counting
    only heads that can change a decision (re-executed by hand, independently of finalise)."""
    from autoexit.policies.cascade import chain_scores
    from autoexit.policies.rules import ConfidenceRule

    k = len(thr_full)
    s = chain_scores([ConfidenceRule(0) for _ in range(k)], list(range(k)), table)
    used = [j for j in range(k) if np.isfinite(thr_full[j])]
    total = 0.0
    for i in range(table.n):
        spent, cost = 0.0, None
        for j in used:
            spent += costs.c1[j]
            if s[j, i] >= thr_full[j]:
                cost = costs.before[j] + spent
                break
        total += costs.base + spent if cost is None else cost
    return total / table.n


def test_finalise_drops_unused_heads_exactly_and_never_costs_more_than_the_backbone():
    from autoexit.policies import evaluate_thresholds, finalise
    from autoexit.policies.cascade import certify, chain_scores, loss_matrix
    from autoexit.policies.rules import ConfidenceRule

    cal = _synthetic_tables(seed=1)
    costs = ExitCosts([1.0, 1.0, 1.0], [10.0, 50.0, 80.0], 100.0)
    rules = [ConfidenceRule(0) for _ in range(3)]
    chain = [0, 1, 2]
    s = chain_scores(rules, chain, cal)
    # a hand-made family: row 1 uses exit 2 only (exits 0, 1 at +inf), row 2 adds exit 0
    q = np.quantile(s, 0.5, axis=1)
    family = np.array([[np.inf, np.inf, np.inf], [np.inf, np.inf, q[2]], [q[0], np.inf, q[2]]])
    res, exit_of = certify(s, loss_matrix(cal, chain, "disagreement"), family, 0.2, 0.1)
    assert res.index == 2
    fp = finalise("max_softmax", ["e0", "e1", "e2"], chain, rules, family, res, exit_of, costs, "disagreement", {})
    # the never-firing exit 1 is gone; decisions are those of the full chain at the chosen row
    assert 1 not in fp.chain and fp.info["dropped_exits"][0] == "e1"
    full = evaluate_thresholds(chain, s, family[fp.guarantee.index], cal, costs)
    mine = fp.evaluate(cal, costs)
    assert mine["disagreement"] == pytest.approx(full["disagreement"])
    # its FLOPs are the brute-force re-execution's, and the chosen row is the cheapest certified one
    brute = [_brute_force_flops(chain, cal.z, family[r], costs, cal) for r in range(res.index + 1)]
    assert mine["flops"] == pytest.approx(brute[fp.guarantee.index])
    assert mine["flops"] == pytest.approx(min(min(brute), costs.base))
    # heads whose exits cost more than they save: the backbone alone (no head is run)
    dear = ExitCosts([60.0, 60.0, 60.0], [10.0, 50.0, 80.0], 100.0)
    fp2 = finalise("max_softmax", ["e0", "e1", "e2"], chain, rules, family, res, exit_of, dear, "disagreement", {})
    assert fp2.chain == [] and fp2.evaluate(cal, dear)["saving"] == 0.0


def test_fitted_policies_never_cost_more_than_the_backbone_and_recertify_from_the_full_chain():
    fit, cal = _synthetic_tables(seed=0), _synthetic_tables(seed=1)
    test = _synthetic_tables(seed=2)
    dear = ExitCosts([30.0, 30.0, 30.0], [10.0, 50.0, 80.0], 100.0)
    for name in ("max_softmax", "patience"):
        fp = make_policy(name).fit(PolicyContext(fit, cal, dear, 0.5))
        assert fp.evaluate(cal, dear)["flops"] <= dear.base + 1e-9, name
        again = fp.recertify(test)
        assert again.full[1] == fp.full[1]  # same full chain: recalibration starts before the pruning
        assert again.evaluate(test, dear)["flops"] <= dear.base + 1e-9, name
        # scores computed once for the full chain give the recertified policy's own decisions
        via_full = again.evaluate(test, dear, scores=again.kept_scores(fp.full_scores(test)))
        assert via_full["flops"] == pytest.approx(again.evaluate(test, dear)["flops"]), name


def test_latency_costed_policy_minimises_measured_milliseconds(digits_result):
    """cost="latency": every stage and head is timed on the evaluator (the calibrated segment profile of
    autoexit.cost.exit_latency_costs), the policy picks exits and thresholds by those milliseconds, and the
    deployed configuration is the cheapest certified one in ms; heads that cost more time than they save go.
    cost_stat="median_ms" (not the default fastest group): the profile is built from each timing's median, as
    the manifest says."""
    from autoexit.evaluator import LocalEvaluator, MeasureSettings
    from autoexit.pipeline import fit_policy
    from autoexit.policies import evaluate_thresholds
    from autoexit.policies.cascade import certify, chain_scores, loss_matrix

    r = digits_result
    ev = LocalEvaluator(settings=MeasureSettings(warmup=3, repeat=5, min_repeat_ms=10))
    cfg = EnableConfig(tolerance=2.0, cost="latency", cost_stat="median_ms")
    res = assemble(cfg, r.backbone, r.points, r.recording, r.heads, predictions={"val": r.val, "test": r.test},
                   evaluator=ev)
    pol = res.extra["policy"]
    assert pol["cost_unit"] == "ms" and "per segment call" in pol["cost_source"] and "cal_flops" not in pol
    assert "median per timing" in pol["cost_source"]
    cal = pol["cost_calibration"]  # every figure of the timing travels with the policy, for a later diagnosis
    assert cal["stat"] == "median_ms" and cal["rounds"] == 3 and isinstance(cal["consistent"], bool)
    assert cal["no_exit_ms"] == pytest.approx(pol["costs"]["base"])
    assert res.manifest()["policy"]["cost"] == {"unit": "ms", "source": pol["cost_source"], "batch_size": 1,
                                                "stat": "median_ms", "calibration": cal}
    import json

    json.dumps(res.manifest())  # the manifest stays plain JSON
    c = pol["costs"]
    ms = ExitCosts(c["c1"], c["before"], c["base"], "ms", fixed=c["fixed"])
    names = list(r.val.names)
    assert len(ms.c1) == len(names) and (np.diff(ms.before) >= 0).all() and ms.base > 0  # an early answer may
    # cost more than finishing the backbone from a late exit (before[-1] > base): that exit then never pays
    # refitting on those milliseconds reproduces the deployed policy
    fp, tables = fit_policy(cfg, r.recording, r.heads, r.temperatures, float(r.backbone.total_flops),
                            {"val": r.val, "test": r.test}, costs=ms)
    assert fp.names == res.kept and fp.costs.unit == "ms" and fp.info["cal_ms"] == pytest.approx(pol["cal_ms"])
    # the chosen row is the cheapest certified one in ms (re-simulated), never dearer than the backbone
    _, chain, rules = fp.full_chain
    s = chain_scores(rules, chain, tables["val"])
    cert, _ = certify(s, loss_matrix(tables["val"], chain, "disagreement"), fp.family, fp.alpha, fp.delta,
                      "disagreement")
    assert cert.certified
    best = min(evaluate_thresholds(chain, s, fp.family[i], tables["val"], ms)["flops"]
               for i in range(cert.index + 1)) if chain else ms.base
    assert pol["cal_ms"] == pytest.approx(min(best, ms.base), rel=1e-9)
    if fp.chain:
        assert fp.evaluate(tables["val"], ms)["flops"] <= ms.base + 1e-12
    # heads dearer in time than the whole backbone: the policy keeps none (the FLOPs-costed one keeps some)
    dear = ExitCosts(np.full(len(names), 2 * ms.base), ms.before, ms.base, "ms")
    fp_dear, _ = fit_policy(cfg, r.recording, r.heads, r.temperatures, float(r.backbone.total_flops),
                            {"val": r.val, "test": r.test}, costs=dear)
    assert fp_dear.chain == []
    fp_flops, _ = fit_policy(EnableConfig(tolerance=2.0), r.recording, r.heads, r.temperatures,
                             float(r.backbone.total_flops), {"val": r.val, "test": r.test})
    assert fp_flops.chain and "cost_unit" not in fp_flops.info
    with pytest.raises(AutoExitError, match="costs give 1 exits"):
        fit_policy(cfg, r.recording, r.heads, r.temperatures, 1.0, {"val": r.val, "test": r.test},
                   costs=ExitCosts([1.0], [1.0], 10.0, "ms"))


def test_latency_policy_settings_are_checked_and_reach_the_cli():
    import argparse

    from autoexit.commands import _policy_flags, _policy_settings

    with pytest.raises(AutoExitError, match="cost must be 'flops' or 'latency'"):
        EnableConfig(cost="energy")
    with pytest.raises(AutoExitError, match="paper003 ranks exits by FLOPs"):
        EnableConfig(cost="latency", policy="paper003")
    with pytest.raises(AutoExitError, match="cost_batch_size must be an integer >= 1"):
        EnableConfig(cost="latency", cost_batch_size=0)
    with pytest.raises(AutoExitError, match="cost_evaluator must be an evaluator config mapping"):
        EnableConfig(cost="latency", cost_evaluator="http://pi:8765")
    with pytest.raises(AutoExitError, match="cost_stat must be one of median_ms, min_ms, mean_ms"):
        EnableConfig(cost="latency", cost_stat="p99_ms")
    from autoexit.search.outer import OuterSettings

    with pytest.raises(AutoExitError, match="latency_stat must be one of median_ms, min_ms, mean_ms"):
        OuterSettings(cost="latency", latency_stat="fastest")
    assert OuterSettings.from_dict({"cost": "latency", "latency_stat": "min_ms"}).latency_stat == "min_ms"
    p = argparse.ArgumentParser()
    _policy_flags(p)
    args = p.parse_args(["--cost", "latency", "--cost-batch-size", "32", "--evaluator-url", "http://pi.local:8765",
                         "--evaluator-token-file", "tok", "--cost-stat", "median"])
    cfg = EnableConfig(**_policy_settings(args))
    assert (cfg.cost, cfg.cost_batch_size, cfg.cost_stat) == ("latency", 32, "median_ms")
    assert EnableConfig(**_policy_settings(p.parse_args([]))).cost_stat == "min_ms" == EnableConfig().cost_stat
    assert cfg.cost_evaluator == {"url": "http://pi.local:8765", "token_file": "tok"}
    secret = EnableConfig(cost="latency", cost_evaluator={"url": "http://pi:1", "token": "s3cret"})
    assert "token" not in secret.to_dict()["cost_evaluator"]  # the manifest never carries the token
    assert EnableConfig.from_dict(cfg.to_dict()) == cfg

    opt = EnableConfig(**_policy_settings(p.parse_args(["--cost", "latency", "--cost-optimized"])))
    assert opt.cost_evaluator == {"settings": {"optimize": "onednn"}}
    frozen = _policy_settings(p.parse_args(["--cost", "latency", "--cost-optimized", "freeze"]))
    assert frozen["cost_evaluator"] == {"settings": {"optimize": "freeze"}}


def test_latency_costs_timed_in_the_optimized_runtime(digits_result):
    """cost_evaluator settings {optimize: true} (CLI --cost-optimized): the stages and heads are timed frozen
    and optimised, as load(optimize=True) runs the emitted model, with the light default timing otherwise; the
    cost source says so."""
    from autoexit.pipeline import exit_costs

    r = digits_result
    cfg = EnableConfig(tolerance=2.0, cost="latency", cost_evaluator={"settings": {"optimize": True}})
    c = exit_costs(cfg, r.backbone, r.recording, r.heads, r.temperatures)
    assert "optimised runtime" in c.source and c.unit == "ms" and c.base > 0 and len(c.c1) == len(r.val.names)
    assert all(v >= 0 for v in c.c1)


def test_exit_costs_validated_and_round_trip():
    """The one cost type of policies, outer search and partitioner: bad costs are one-line errors, and
    to_dict/from_dict keep every field (the outer search persists its costs in study attributes)."""
    from autoexit.search.outer import ExitCosts as OuterExitCosts

    assert OuterExitCosts is ExitCosts
    c = ExitCosts([1.0, 2.0], [10.0, 50.0], 100.0, "ms", "timed", {"scale": 1.1}, fixed=3.0)
    back = ExitCosts.from_dict(c.to_dict())
    assert back.unit == "ms" and back.source == "timed" and back.calibration == {"scale": 1.1}
    assert back.fixed == 3.0 and ExitCosts.from_dict({k: v for k, v in c.to_dict().items() if k != "fixed"}).fixed == 0
    assert np.array_equal(back.c1, c.c1) and np.array_equal(back.before, c.before) and back.base == 100.0
    assert np.array_equal(c.c2, [90.0, 50.0])
    for bad, msg in (((np.array([1.0]), [1.0, 2.0], 10.0), "one value per exit"),
                     (([1.0, -1.0], [1.0, 2.0], 10.0), "non-negative"),
                     (([1.0, float("nan")], [1.0, 2.0], 10.0), "non-negative"),
                     (([1.0], [1.0], 0.0), "must be > 0"),
                     (([1.0], [1.0], 10.0, "ms", "", None, -0.5), "fixed cost of going on past an exit"),
                     (([1.0], [1.0], 10.0, "ms", "", None, float("inf")), "fixed cost of going on past an exit")):
        with pytest.raises(AutoExitError, match=msg):
            ExitCosts(*bad)


def test_fixed_cost_is_paid_once_by_every_sample_that_goes_on_past_its_first_exit():
    """ExitCosts.fixed (measured latency's cost of resuming the backbone after an exit) is added to every path
    of a non-empty chain except an answer at its first exit, in the policies' chain costs and the outer
    search's simulation alike, and never to the backbone alone, so a policy that keeps no exit still costs
    exactly the backbone."""
    from autoexit.policies.cascade import chain_costs
    from autoexit.subset import simulate_exits

    plain = ExitCosts([1.0, 2.0, 3.0], [10.0, 50.0, 80.0], 100.0, "ms")
    fx = ExitCosts([1.0, 2.0, 3.0], [10.0, 50.0, 80.0], 100.0, "ms", fixed=4.0)
    for chain in ([0], [1, 2], [0, 1, 2]):
        assert chain_costs(fx, chain) == pytest.approx(chain_costs(plain, chain) + np.r_[0.0, [4.0] * len(chain)])
    assert chain_costs(fx, [2])[0] == pytest.approx(80.0 + 3.0)  # answered at the first exit: no fixed cost
    assert chain_costs(fx, []) == pytest.approx([100.0]) and chain_costs(plain, []) == pytest.approx([100.0])
    rng = np.random.default_rng(0)
    s, ep = rng.random((2, 50)), rng.integers(0, 10, (2, 50))
    a = simulate_exits(s, ep, np.zeros(50, dtype=int), [0.7, 0.5], fx.c1[[0, 2]], fx.before[[0, 2]], fx.base)
    b = simulate_exits(s, ep, np.zeros(50, dtype=int), [0.7, 0.5], fx.c1[[0, 2]], fx.before[[0, 2]], fx.base,
                       fx.fixed)
    assert np.array_equal(a.exit_index, b.exit_index) and 0 < (b.exit_index == 0).sum() < 50
    assert b.flops == pytest.approx(a.flops + np.where(b.exit_index > 0, 4.0, 0.0))
    # the brute-force path cost of each sample, re-executed
    for i in range(50):
        e = b.exit_index[i]
        want = (fx.before[[0, 2]][e] + fx.c1[[0, 2]][: e + 1].sum()) if e < 2 else fx.base + fx.c1[[0, 2]].sum()
        assert b.flops[i] == pytest.approx(want + (4.0 if e > 0 else 0.0))
        assert b.flops[i] == pytest.approx(chain_costs(fx, [0, 2])[e])  # the two simulations agree
    empty = simulate_exits(np.zeros((0, 5)), np.zeros((0, 5), dtype=int), np.zeros(5, dtype=int), [], [], [], 100.0,
                           4.0)
    assert empty.flops == pytest.approx(np.full(5, 100.0))


def test_out_of_fold_logits_come_from_heads_that_never_saw_the_sample(digits_result, monkeypatch):
    """Cross-fitting: every train sample is predicted by a head trained on the other folds only, and the
    policy fitted on those predictions is certified on val as before."""
    import autoexit.distill as D
    from autoexit.pipeline import out_of_fold_predictions

    r = digits_result
    seen: list[list] = []  # [training activations, activations predicted with the trained head]
    real_train, real_predict = D.train_head, D._predict
    training = [False]

    def spy_train(head, x_train, *a, **k):
        seen.append([x_train, None])
        training[0] = True
        try:
            return real_train(head, x_train, *a, **k)
        finally:
            training[0] = False

    def spy_predict(head, x, *a, **k):
        if not training[0]:  # not train_head's own val evaluation
            seen[-1][1] = x
        return real_predict(head, x, *a, **k)

    monkeypatch.setattr(D, "train_head", spy_train)
    monkeypatch.setattr(D, "_predict", spy_predict)
    cfg = EnableConfig(tolerance=2.0, cross_fit=2, train=D.TrainConfig(epochs=2, batch_size=128))
    oof = out_of_fold_predictions(r.recording, r.heads, cfg)
    names = [p.name for p in r.recording.points if p.name in r.heads]
    n = r.recording.logits("train").shape[0]
    assert oof.names == names and tuple(oof.logits.shape) == (len(names), n, r.recording.num_classes)
    assert len(seen) == 2 * len(names)
    for x_fit, x_pred in seen:  # no predicted sample was in that head's training data
        fit_rows = {tuple(v.flatten().tolist()) for v in x_fit}
        assert x_pred is not None and len(x_fit) + len(x_pred) == n
        assert not any(tuple(v.flatten().tolist()) in fit_rows for v in x_pred)
    assert torch.equal(oof.backbone_logits, r.recording.logits("train"))
    monkeypatch.undo()
    # the fit reads them: fitted on out-of-fold predictions, certified on val, recorded in the manifest
    res = assemble(EnableConfig(tolerance=2.0, cross_fit=2), r.backbone, r.points, r.recording, r.heads,
                   predictions={"train": oof, "val": r.val, "test": r.test})
    g = res.extra["policy"]["guarantee"]
    assert g["n"] == r.val.n
    with pytest.raises(AutoExitError, match="folds >= 2"):
        D.out_of_fold_logits(r.recording, r.heads, folds=1)


def test_cross_fit_settings_are_checked_and_reach_the_cli():
    import argparse

    from autoexit.commands import _policy_flags, _policy_settings

    for bad in (1, -2, True, 2.5):
        with pytest.raises(AutoExitError, match="cross_fit must be 0"):
            EnableConfig(cross_fit=bad)
    with pytest.raises(AutoExitError, match="cross_fit applies to the guaranteed policies"):
        EnableConfig(cross_fit=2, policy="paper003")
    p = argparse.ArgumentParser()
    _policy_flags(p)
    cfg = EnableConfig(**_policy_settings(p.parse_args(["--cross-fit", "3"])))
    assert cfg.cross_fit == 3 and EnableConfig.from_dict(cfg.to_dict()) == cfg


def test_nothing_a_guaranteed_policy_deploys_depends_on_val_but_its_certified_thresholds(digits_result):
    """Learn-then-Test needs everything but the final thresholds fixed before val is looked at: the temperatures
    are fitted on the fit split (its out-of-fold predictions when given), and the exit chain and threshold family
    are the same whatever val holds; only the certified setting moves. paper003 keeps the paper's val fit."""
    from dataclasses import replace

    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.pipeline import fit_policy, predictions_for

    r = digits_result
    rec, heads = r.recording, r.heads
    train = predictions_for(rec, heads, "train")
    names = list(train.names)
    res = _assemble(r, "max_softmax")
    assert res.temperatures == dict(zip(names, calibrate_temperatures(train).tolist()))
    assert res.temperatures != dict(zip(names, calibrate_temperatures(r.val).tolist()))
    paper = _assemble(r, "paper003")
    assert paper.temperatures == dict(zip(names, calibrate_temperatures(r.val).tolist()))
    # given out-of-fold train predictions (cross_fit), the temperatures come from them
    g = torch.Generator().manual_seed(0)
    oof = ExitPredictions(names, train.logits + torch.randn(train.logits.shape, generator=g), train.backbone_logits,
                          train.labels)
    cfg = EnableConfig(tolerance=2.0)
    got = assemble(cfg, r.backbone, r.points, rec, heads, predictions={"train": oof, "val": r.val, "test": r.test})
    assert got.temperatures == dict(zip(names, calibrate_temperatures(oof).tolist()))
    # two calibration splits of the same size (the chain's target fit risk depends on that size, not on what
    # val holds): the same chain and family, each certified on its own data
    n = r.val.n
    other = ExitPredictions(names, r.test.logits[:, :n], r.test.backbone_logits[:n], r.test.labels[:n])
    temps = res.temperatures
    fits = []
    for val in (r.val, other):
        f, _ = fit_policy(replace(cfg, tolerance=4.0), rec, heads, temps, float(r.backbone.total_flops),
                          {"train": train, "val": val, "test": r.test})
        fits.append(f)
    a, b = fits
    assert a.full_chain[0] == b.full_chain[0] and np.array_equal(a.family, b.family)
    assert not np.array_equal(a.guarantee.empirical_risk, b.guarantee.empirical_risk)


def test_enable_cascade_chain_is_chosen_on_the_fit_split(digits_backbone, digits_data, tmp_path):
    """cascade_heads retrains the chain the policy chose on the train split (not the exits val's certification
    kept), with temperatures fitted on train: the emitted model scales earlier logits as training did."""
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.distill import TrainConfig
    from autoexit.pipeline import enable, predictions_for
    from autoexit.policies.heads import CascadeHead

    cfg = EnableConfig(tolerance=2.0, cache_dir=str(tmp_path), cascade_heads=1, train=TrainConfig(epochs=3))
    res = enable(digits_backbone, digits_data, config=cfg, progress=False)
    chained = [n for n, h in res.heads.items() if isinstance(h.module, CascadeHead)]
    assert chained and chained == res.extra["policy"]["fit_chain"]  # the fixed chain is the one trained
    train = predictions_for(res.recording, res.heads, "train")
    assert res.temperatures == dict(zip(train.names, calibrate_temperatures(train).tolist()))
    x = res.recording.inputs("test")
    scripted = to_torchscript(res.model, x[:1])
    with torch.no_grad():
        _, idx = scripted(x)
        _, fast_idx = optimize_for_runtime(scripted)(x)  # cascade heads read earlier logits, optimised too
    assert np.array_equal(idx.numpy(), np.asarray(res.metrics["test"]["exit_index"]))
    assert torch.equal(fast_idx, idx)
