"""bench/head_levers.py: merging a run of some levers into an earlier results file (``--merge``).

A merged file must keep every lever the new run did not redo (rows, agreement, training time, and when and at
which commit it ran) and replace exactly the ones it did, so the tables in docs/policies.md never mix two runs
of one lever or silently drop one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.head_levers import (  # noqa: E402
    MIXUP_EPOCHS,
    TwoStage,
    _deploy,
    _lever_of,
    _masked,
    _outcome,
    confident_share,
    ensemble_head,
    feature_head,
    merge_depth,
    mixup_epochs,
    mixup_key,
    penultimate_features,
    shared_errors,
    skip_head,
    train_feature_head,
    try_recall,
)


def _rows(variant: str, value: float) -> list[dict]:
    return [{"variant": variant, "T %": t, "policy": "max_softmax", "saving %": value} for t in (1.0, 2.0)]


OLD = {  # the shape of a results entry written before levers had their own run record
    "depth": 20, "candidates": ["a", "b"],
    "rows": _rows("baseline (default heads, fitted in-sample)", 6.0) + _rows("augmented distillation", 8.0)
    + _rows("cross-fitted (2 folds)", 7.0),
    "val_agreement": {"baseline": [0.4, 0.5], "augmented": [0.3, 0.5], "out-of-fold (train)": [0.35, 0.45],
                      "in-sample (train)": [0.45, 0.55]},
    "seconds": {"augmented": 400.0, "cross-fitted": 300.0},
    "run": {"date": "old", "commit": "c0", "argv": []},
}


def test_lever_of_names_every_row_and_agreement_kind():
    assert _lever_of("baseline (default heads, fitted in-sample)") == "baseline"
    assert _lever_of("augmented distillation") == "augmented"
    assert _lever_of("augmented") == "augmented"
    assert _lever_of("cross-fitted (2 folds)") == "cross-fitted"
    assert _lever_of("out-of-fold (train)") == "cross-fitted"
    assert _lever_of("in-sample (train)") == "cross-fitted"
    assert _lever_of("joint fine-tune (reference: its own final answer)") == "joint"
    assert _lever_of("train size 1250 (default heads on 1250 train images)") == "train-size"
    assert _lever_of("train size 2500") == "train-size"
    assert _lever_of("train-size 2500") == "train-size"  # its training-time key
    assert _lever_of("feature distillation (penultimate features, weight 1)") == "feature"
    assert _lever_of("feature") == "feature"
    assert _lever_of("mixup function matching (augmented + mixup, 120 epochs)") == "mixup"
    assert _lever_of("mixup") == "mixup"
    # another schedule is a lever of its own, so --merge keeps both (a schedule-length curve)
    assert _lever_of("mixup function matching (augmented + mixup, 360 epochs)") == "mixup@360"
    assert _lever_of("mixup function matching (360 epochs)") == _lever_of("mixup@360") == "mixup@360"
    assert _lever_of(f"mixup function matching (augmented + mixup, {MIXUP_EPOCHS} epochs)") == "mixup"
    assert mixup_key(MIXUP_EPOCHS) == "mixup" and mixup_key(360) == "mixup@360"
    assert mixup_epochs("mixup") == MIXUP_EPOCHS and mixup_epochs("mixup@360") == 360
    assert mixup_epochs("mixup function matching (augmented + mixup, 40 epochs)") == 40
    assert _lever_of("skip heads (backbone's stage-entry blocks + its linear layer, fine-tuned; fitted "
                     "out-of-fold, 2 folds)") == "skip"
    assert _lever_of("skip heads out-of-fold (train)") == _lever_of("skip heads") == _lever_of("skip") == "skip"
    assert _lever_of("two-stage exits (skip head run only where the default head is confident; fitted "
                     "out-of-fold, 2 folds)") == _lever_of("two-stage") == "two-stage"
    # mixup heads cross-fitted: a lever of its own, neither the mixup schedule nor the default heads' cross-fitting
    assert _lever_of("mixup heads cross-fitted (120 epochs, 2 folds)") == "mixup-cross-fitted"
    assert _lever_of("mixup out-of-fold (train)") == _lever_of("mixup in-sample (train)") == "mixup-cross-fitted"
    assert _lever_of("mixup-cross-fitted") == "mixup-cross-fitted"
    assert _lever_of("out-of-fold (train)") == _lever_of("cross-fitted (2 folds)") == "cross-fitted"
    assert _lever_of("ensemble (2 default heads per exit, seeds 0 and 1, log-probabilities averaged)") == "ensemble"
    assert _lever_of("ensemble (2 heads per exit)") == _lever_of("ensemble") == "ensemble"


def test_shared_errors_against_a_count_by_hand():
    """Two heads, two exits, five inputs, backbone classes 0 1 2 0 1: the share of inputs with the same answer,
    and of the first head's errors the share the second makes with the same wrong class."""
    import torch

    def onehot(classes):  # [exits, n] -> logits [exits, n, 3]
        return torch.nn.functional.one_hot(torch.tensor(classes), 3).float()

    teacher = onehot([0, 1, 2, 0, 1])
    a = onehot([[0, 1, 2, 1, 2], [1, 1, 0, 0, 0]])  # exit 0: wrong on inputs 3, 4; exit 1: wrong on 0, 2, 4
    b = onehot([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # exit 0: same wrong class on 3 only; exit 1: on 0 and 4
    same, shared = shared_errors(a, b, teacher)
    assert same == pytest.approx([3 / 5, 4 / 5])
    assert shared == pytest.approx([1 / 2, 2 / 3])


def test_ensemble_head_answers_the_mean_log_probability_of_its_members():
    """The ensemble lever's head: the members' log-softmax averaged, so members that disagree give a flatter
    answer (lower top probability) than either; one member alone is that member's log-softmax."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(32, 6)
    out = ensemble_head([a, b]).eval()(x)
    want = (torch.log_softmax(a(x), 1) + torch.log_softmax(b(x), 1)) / 2
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ensemble_head([a]).eval()(x), torch.log_softmax(a(x), 1))
    with torch.no_grad():  # two members that disagree on every input: the ensemble is less sure than each
        b.weight.copy_(-a.weight)
        b.bias.copy_(-a.bias)
    top = torch.softmax(ensemble_head([a, b])(x), 1).amax(1)
    assert (top < torch.softmax(a(x), 1).amax(1)).all()
    scripted = torch.jit.script(ensemble_head([a, b]).eval())  # a head the emitted models could carry
    torch.testing.assert_close(scripted(x), ensemble_head([a, b])(x))


def test_merge_adds_a_new_lever_and_keeps_the_old_ones_with_their_run():
    new_run = {"date": "new", "commit": "c1", "argv": ["--levers", "joint", "--merge"]}
    new = {"depth": 20, "candidates": ["a", "b"],
           "rows": _rows("baseline (default heads, fitted in-sample)", 6.5) + _rows("joint fine-tune (x)", 9.0),
           "val_agreement": {"baseline": [0.41, 0.5], "joint fine-tune": [0.42, 0.52]},
           "seconds": {"joint": 200.0}, "runs": {"baseline": new_run, "joint": new_run}, "joint": {"epochs": 12}}
    m = merge_depth(OLD, new)
    variants = [r["variant"] for r in m["rows"]]
    assert variants == (["baseline (default heads, fitted in-sample)"] * 2 + ["augmented distillation"] * 2
                        + ["cross-fitted (2 folds)"] * 2 + ["joint fine-tune (x)"] * 2)
    assert [r["saving %"] for r in m["rows"]][:2] == [6.5, 6.5]  # the baseline is the new run's
    assert list(m["val_agreement"]) == ["baseline", "augmented", "out-of-fold (train)", "in-sample (train)",
                                        "joint fine-tune"]
    assert m["val_agreement"]["baseline"] == [0.41, 0.5]
    assert m["seconds"] == {"augmented": 400.0, "cross-fitted": 300.0, "joint": 200.0}
    assert m["runs"]["augmented"] == m["runs"]["cross-fitted"] == OLD["run"]
    assert m["runs"]["baseline"] == m["runs"]["joint"] == new_run
    assert "run" not in m and m["joint"] == {"epochs": 12}


def test_merge_replaces_a_lever_run_again_and_no_prior_means_the_new_result():
    run = {"date": "new", "commit": "c1", "argv": []}
    new = {"depth": 20, "candidates": ["a", "b"],
           "rows": _rows("baseline (default heads, fitted in-sample)", 6.0) + _rows("cross-fitted (3 folds)", 5.0),
           "val_agreement": {"baseline": [0.4, 0.5], "out-of-fold (train)": [0.3, 0.4],
                             "in-sample (train)": [0.5, 0.6]},
           "seconds": {"cross-fitted": 900.0}, "runs": {"baseline": run, "cross-fitted": run}}
    m = merge_depth(OLD, new)
    assert [r["variant"] for r in m["rows"]].count("cross-fitted (2 folds)") == 0
    assert [r["variant"] for r in m["rows"]].count("cross-fitted (3 folds)") == 2
    assert [r["variant"] for r in m["rows"]].count("augmented distillation") == 2
    assert m["val_agreement"]["out-of-fold (train)"] == [0.3, 0.4]
    assert m["seconds"] == {"augmented": 400.0, "cross-fitted": 900.0}
    assert m["runs"]["cross-fitted"] == run and m["runs"]["augmented"] == OLD["run"]
    assert merge_depth(None, new) is new


def test_merge_keeps_mixup_schedules_side_by_side_and_replaces_one_run_again():
    def mixup_run(epochs: int, saving: float, date: str) -> dict:
        run = {"date": date, "commit": "c", "argv": ["--mixup-epochs", str(epochs)]}
        key = mixup_key(epochs)
        akey = "mixup function matching" + ("" if key == "mixup" else f" ({epochs} epochs)")
        return {"depth": 20, "candidates": ["a", "b"],
                "rows": _rows("baseline (default heads, fitted in-sample)", 6.0)
                + _rows(f"mixup function matching (augmented + mixup, {epochs} epochs)", saving),
                "val_agreement": {"baseline": [0.4, 0.5], akey: [0.5, 0.6]}, "seconds": {key: 60.0 * epochs},
                "runs": {"baseline": run, key: run}, key: {"epochs": epochs}}

    short = merge_depth(OLD, mixup_run(MIXUP_EPOCHS, 9.0, "d1"))
    both = merge_depth(short, mixup_run(360, 11.0, "d2"))
    saving = {r["variant"]: r["saving %"] for r in both["rows"]}
    assert saving[f"mixup function matching (augmented + mixup, {MIXUP_EPOCHS} epochs)"] == 9.0
    assert saving["mixup function matching (augmented + mixup, 360 epochs)"] == 11.0
    assert both["mixup"] == {"epochs": MIXUP_EPOCHS} and both["mixup@360"] == {"epochs": 360}
    assert both["runs"]["mixup"]["date"] == "d1" and both["runs"]["mixup@360"]["date"] == "d2"
    assert set(both["seconds"]) == {"augmented", "cross-fitted", "mixup", "mixup@360"}
    assert "mixup function matching" in both["val_agreement"]
    assert "mixup function matching (360 epochs)" in both["val_agreement"]
    again = merge_depth(both, mixup_run(360, 12.0, "d3"))  # the same schedule run again replaces only itself
    saving = [r["saving %"] for r in again["rows"] if r["variant"].endswith("360 epochs)")]
    assert saving == [12.0, 12.0] and again["runs"]["mixup"]["date"] == "d1"


def test_docs_block_shows_each_mixup_schedule_in_its_own_column_and_oracle_line(monkeypatch):
    import bench.md_tables as md

    def run(epochs: int, saving: float) -> dict:
        key = mixup_key(epochs)
        return {"depth": 20, "candidates": ["a", "b"], "runs": {"baseline": {}, key: {}},
                "rows": [{**x, "drop %": 0.5} for x in _rows("baseline (default heads, fitted in-sample)", 6.0)
                         + _rows(f"mixup function matching (augmented + mixup, {epochs} epochs)", saving)],
                "val_agreement": {"baseline": [0.4, 0.5]}, "seconds": {key: 60.0 * epochs},
                key: {"epochs": epochs, "oracle saving test (default heads)": 0.67, "oracle saving test (mixup)":
                      0.6 + epochs / 10_000}}

    merged = merge_depth(merge_depth(run(MIXUP_EPOCHS, 9.0), run(360, 11.0)), run(40, 7.0))
    monkeypatch.setattr(md, "_load", lambda name: {"results": [merged]} if name == "head_levers" else {})
    block = md.levers_blocks()["policies-levers"]
    header = next(ln for ln in block.splitlines() if ln.startswith("| T %"))
    assert f"mixup function matching (augmented + mixup, {MIXUP_EPOCHS} epochs): saved" in header
    assert "mixup function matching (augmented + mixup, 360 epochs): saved" in header
    assert "| 6.0 (0.50) | 7.0 (0.50) | 9.0 (0.50) | 11.0 (0.50) |" in block  # each schedule's savings, shortest first
    assert block.index(f"Mixup function matching ({MIXUP_EPOCHS} epochs): the oracle") < block.index(  # shortest first
        "Mixup function matching (360 epochs): the oracle with its heads saves 63.6 %")
    assert "mixup function-matching heads (360 epochs) 360.0 min" in block


def test_feature_head_learns_the_features_through_the_frozen_final_layer_without_labels():
    """The feature lever's head: fc(body(h)) with the backbone's own final layer kept frozen; trained on features
    and logits only (the function takes no labels), it gets closer to both than the untrained head."""
    import torch
    from torch import nn

    from autoexit.distill import TrainConfig, agreement
    from autoexit.heads import HeadSpec, build_head

    torch.manual_seed(0)

    class Backbone(nn.Module):  # penultimate features are a fixed function of the exit's activation
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(4, 8, 3, padding=1)
            self.linear = nn.Linear(8, 5)

        def forward(self, h):
            return self.linear(torch.relu(self.proj(h)).mean((2, 3)))

    bb = Backbone().eval()
    with torch.no_grad():
        bb.linear.weight.mul_(20)  # classes that vary with the input, not one that dominates
    x = torch.randn(600, 4, 6, 6)
    feats = penultimate_features(bb, x, batch=128)
    with torch.no_grad():
        assert torch.allclose(bb.linear(feats), bb(x), atol=1e-5)
        t = bb(x)
    fc0 = {k: v.clone() for k, v in bb.linear.state_dict().items()}
    torch.manual_seed(0)
    head = feature_head(build_head(HeadSpec(conv="standard"), (4, 6, 6), 8), bb.linear)
    assert not any(q.requires_grad for q in head.fc.parameters())
    with torch.no_grad():
        before = (agreement(head(x[400:]), t[400:]), float(((head.body(x[400:]) - feats[400:]) ** 2).mean()))
    head, best = train_feature_head(head, x[:400], feats[:400], t[:400], x[400:], t[400:], weight=1.0,
                                    cfg=TrainConfig(epochs=15, batch_size=64))
    with torch.no_grad():
        after = (agreement(head(x[400:]), t[400:]), float(((head.body(x[400:]) - feats[400:]) ** 2).mean()))
        assert torch.equal(head(x[:3]), bb.linear(head.body(x[:3])))
    assert 1 <= best <= 15
    assert after[0] > before[0] + 0.3 and after[1] < 0.1 * before[1], (before, after)
    assert all(torch.equal(v, fc0[k]) for k, v in head.fc.state_dict().items())  # the final layer never moved


def _resnet_with_identity_blocks(depth: int = 20):
    """A random CIFAR ResNet whose blocks other than the stage-entry ones are identities on their (non-negative)
    input: their last batch norm outputs 0, so the block gives relu(0 + x) = x."""
    import torch

    from autoexit.zoo import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(depth).eval()
    with torch.no_grad():
        for s in (1, 2, 3):
            for i, block in enumerate(getattr(model, f"layer{s}")):
                if s == 1 or i > 0:
                    block.bn2.weight.zero_()
                    block.bn2.bias.zero_()
    return model


def test_skip_head_is_the_backbone_without_its_shape_keeping_blocks():
    """A skip head keeps exactly the later stages' shape-changing first blocks and the final layer: on a backbone
    whose other blocks are identities it gives the backbone's own logits from the exit's activation, at the stem
    and at every exit of the first two stages; an exit in the last stage has no skip head."""
    import torch

    model = _resnet_with_identity_blocks()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        stem = torch.relu(model.bn1(model.conv1(x)))
        acts = {"relu": stem}
        h = stem
        for s in (1, 2, 3):
            for i, block in enumerate(getattr(model, f"layer{s}")):
                h = block(h)
                acts[f"layer{s}.{i}"] = h
        for name, a in acts.items():
            head = skip_head(model, name, tuple(a.shape[1:]))
            if name.startswith("layer3"):
                assert head is None, name
                continue
            # the stem's first stage keeps the shape, so its block is skipped like any other
            assert len(head.blocks) == (1 if name.startswith("layer2") else 2), name
            assert torch.allclose(head.eval()(a), want, atol=1e-5), name
    # copies: training a skip head never moves the backbone
    head = skip_head(model, "layer2.0", tuple(acts["layer2.0"].shape[1:]))
    with torch.no_grad():
        head.linear.weight.add_(1.0)
        head.blocks[0].conv1.weight.add_(1.0)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_confident_share_is_the_largest_top_confidence_prefix_within_the_disagreement_budget():
    """Brute force: for every prefix of the samples sorted by top softmax probability, count its disagreements
    with the backbone; the share is the longest prefix whose rate is within the budget."""
    import torch

    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n = 50 + trial * 7
        teacher = torch.randn(n, 4, generator=g)
        head = teacher + 1.5 * torch.randn(n, 4, generator=g)
        conf = head.softmax(1).max(1).values
        wrong = head.argmax(1) != teacher.argmax(1)
        order = sorted(range(n), key=lambda i: -float(conf[i]))
        for budget in (0.0, 0.05, 0.2):
            best = 0
            for k in range(1, n + 1):
                if sum(bool(wrong[i]) for i in order[:k]) <= budget * k + 1e-9:
                    best = k
            assert confident_share(head, teacher, budget) == best / n, (trial, budget)
    agree = torch.eye(3)[torch.tensor([0, 1, 2, 0])] * 5
    assert confident_share(agree, agree, 0.0) == 1.0
    assert confident_share(-agree, agree, 0.0) == 0.0  # every answer disagrees


def _two_stage(seed: int = 0, n: int = 400):
    """A synthetic 4-exit two-stage setup: exits 0-2 gated (a default head tries, a skip head decides), exit 3
    plain; per split the default heads' confidence and a table of the exit heads' logits."""
    import numpy as np
    import torch

    from autoexit.policies import ExitCosts, ExitTable

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    costs = ExitCosts(np.array([5.0, 5.0, 3.0, 1.0]), np.array([10.0, 30.0, 50.0, 80.0]), 100.0)
    conf, tables = {}, {}
    for split in ("train", "val", "test"):
        y = torch.randint(0, 4, (n,), generator=g)
        bb = torch.nn.functional.one_hot(y, 4).float() * 3 + torch.randn(n, 4, generator=g)
        z = [bb + s * torch.randn(n, 4, generator=g) for s in (3.0, 2.0, 1.5, 1.0)]
        tables[split] = ExitTable([f"e{j}" for j in range(4)], z, bb, y)
        conf[split] = rng.uniform(0.2, 1.0, size=(4, n))
    return TwoStage(conf, [True, True, True, False], [1.0, 1.0, 0.5, 0.0], costs), tables


def test_two_stage_costs_charge_a_skip_head_only_to_the_inputs_that_run_it():
    """Per-input path costs against a brute-force walk: the backbone up to the exit, at every exit passed (and the
    one answering) the default head when gated, plus the exit's head only where it ran; no try gate (q = 1) is
    the plain skip lever's cost."""
    import numpy as np

    from autoexit.policies.cascade import chain_costs

    ts, _ = _two_stage()
    tau = ts.thresholds(0.3)
    assert np.isinf(tau[3]) and np.all(np.isfinite(tau[:3]))
    tried = ts.tried("test", tau)
    assert abs(tried[:3].mean() - 0.3) < 0.1 and tried[3].all()  # about the try share on new data
    chain = [0, 2, 3]
    cost = ts.sample_costs(chain, tried, 0.3)
    c = ts.costs
    for i in range(tried.shape[1]):
        for j in range(len(chain) + 1):
            paid = 0.0
            for e in chain[: j + 1]:
                paid += (ts.c_try[e] if ts.gated[e] else 0.0) + (c.c1[e] if tried[e, i] else 0.0)
            want = (c.before[chain[j]] if j < len(chain) else c.base) + paid
            assert cost[j, i] == pytest.approx(want)
    plain = ts.sample_costs(chain, ts.tried("test", ts.thresholds(1.0)), 1.0)
    assert np.allclose(plain, chain_costs(c, chain)[:, None])
    assert np.all(ts.sample_costs([], tried, 0.3) == c.base)


def test_two_stage_inputs_leave_only_where_the_skip_head_ran_and_the_outcome_is_recomputed_exactly():
    """Masked scores let no input leave at a gated exit whose head it did not run; the deployed policy's saving,
    disagreement and drop are the brute-force ones, and certification on calibration rows gives thresholds that
    only go as low as the family allows."""
    import numpy as np

    from autoexit.policies.cascade import chain_scores, greedy_path, loss_matrix
    from autoexit.policies.rules import ConfidenceRule

    ts, tables = _two_stage(1, 1500)
    q, chain = 0.3, [0, 1, 2, 3]
    tau = ts.thresholds(q)
    rules = [ConfidenceRule(0) for _ in chain]
    tried = {s: ts.tried(s, tau) for s in tables}
    sc = {s: _masked(chain_scores(rules, chain, tables[s]), tried[s], chain) for s in tables}
    assert np.all(np.isneginf(sc["val"][~tried["val"][chain]]))
    family = greedy_path(sc["train"], loss_matrix(tables["train"], chain, "disagreement"),
                         ts.sample_costs(chain, tried["train"], q), max_risk=0.3).thresholds
    keep, thr, ok = _deploy(ts, chain, family, sc["val"], tables["val"], tried["val"], q, "disagreement", 10.0)
    assert ok and keep and len(thr) == len(keep)
    kept = [chain[j] for j in keep]
    m = _outcome(ts, kept, thr, sc["test"][keep], tables["test"], tried["test"], q)
    t = tables["test"]
    flops, agree, right = [], [], []
    y, b = t.labels.numpy(), t.bpred
    for i in range(t.n):
        paid, out = 0.0, None
        for e, th in zip(kept, thr):
            paid += (ts.c_try[e] if ts.gated[e] else 0.0) + (ts.costs.c1[e] if tried["test"][e, i] else 0.0)
            p = t.z[e][i].softmax(0)
            if tried["test"][e, i] and float(p.max()) >= th:
                out = (ts.costs.before[e] + paid, int(p.argmax()))
                break
        if out is None:
            out = (ts.costs.base + paid, int(b[i]))
        flops.append(out[0])
        agree.append(out[1] == b[i])
        right.append(out[1] == y[i])
    assert m["saving"] == pytest.approx(1 - np.mean(flops) / ts.costs.base)
    assert m["disagreement"] == pytest.approx(1 - np.mean(agree))
    assert m["drop"] == pytest.approx(np.mean(b == y) - np.mean(right))
    assert 0 < m["skip heads run"] <= m["skip heads reached"]


def test_try_recall_against_brute_force():
    """The share of a skip head's confident set (most confident first, within the disagreement budget) that falls in
    the default head's top ``share`` of inputs, counted by hand."""
    import torch

    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        n = 300
        teacher = torch.randn(n, 5, generator=g)
        skip = teacher + 0.8 * torch.randn(n, 5, generator=g)
        default = 0.5 * skip + torch.randn(n, 5, generator=g)
        for share in (0.2, 0.5):
            got = try_recall(skip, default, teacher, share, 0.05)
            p = skip.softmax(1).max(1).values
            order = sorted(range(n), key=lambda i: -float(p[i]))
            wrong, m = 0, 0
            for k, i in enumerate(order, 1):
                wrong += int(skip[i].argmax() != teacher[i].argmax())
                if wrong / k <= 0.05:
                    m = k
            c = default.softmax(1).max(1).values
            cut = torch.quantile(c, 1 - share)
            want = sum(bool(c[i] >= cut) for i in order[:m]) / m if m else 1.0
            assert got == pytest.approx(want)
    assert try_recall(skip, default, teacher, 1.0, 0.05) == 1.0  # every input tries


def test_class_exits_are_exactly_one_threshold_per_exit_and_class():
    """bench/class_thresholds.py runs the core's greedy family and certification on a chain of virtual exits
    (exit, class). Every row of a family built on that chain must send each input where the direct rule "first
    exit whose score reaches the threshold of its predicted class" sends it, and charge it that exit's loss and
    cost; negative scores are refused."""
    import numpy as np

    from autoexit.policies.cascade import greedy_path, simulate
    from bench.class_thresholds import class_exit_positions, class_exits, class_threshold_matrix

    rng = np.random.default_rng(0)
    k, n, ncls = 3, 600, 4
    scores = rng.random((k, n))
    pred = rng.integers(0, ncls, (k, n))
    losses = np.vstack([rng.integers(-1, 2, (k, n)), np.zeros((1, n))]).astype(float)
    cost = np.array([1.0, 2.0, 3.0, 10.0])
    vs, vl, vc = class_exits(scores, pred, losses, cost, ncls)
    assert vs.shape == (k * ncls, n) and vl.shape == (k * ncls + 1, n) and vc.shape == (k * ncls + 1,)
    fam = greedy_path(vs, vl, vc, chunk=7, max_risk=0.5).thresholds
    assert len(fam) > 10
    fam = np.vstack([fam, np.full(k * ncls, -5.0)])  # and a row that lets everyone out at the first exit
    idx = np.arange(n)
    for row in fam:
        virt = simulate(vs, row)
        direct = class_exit_positions(scores, pred, class_threshold_matrix(row, k, ncls))
        exit_j = np.where(virt < k * ncls, virt // ncls, k)
        assert (exit_j == direct).all()
        assert np.allclose(vl[virt, idx], losses[direct, idx]) and np.allclose(vc[virt], cost[direct])
    assert (class_exit_positions(scores, pred, class_threshold_matrix(fam[-1], k, ncls)) == 0).all()
    with pytest.raises(ValueError, match="scores >= 0"):
        class_exits(scores - 2, pred, losses, cost, ncls)
