"""Label-free training: heads learn the backbone, labels are never read, other heads untouched."""

from __future__ import annotations

import pytest
import torch

from autoexit.distill import TrainConfig, agreement, train_head
from autoexit.heads import HeadSpec, build_head


def _teacher_data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 4, 4, generator=g)
    w = torch.randn(8, 5, generator=g) * 3
    t = x.mean(dim=(2, 3)) @ w  # a function an avg-pool + linear head can represent
    return x, t


def test_head_learns_to_agree_with_the_teacher_far_above_chance():
    x, t = _teacher_data()
    head = build_head(HeadSpec(conv="none", conv_layers=0, pool="avg", fc_layers=1), (8, 4, 4), 5)
    before = agreement(head(x[400:]).detach(), t[400:])
    head, hist = train_head(head, x[:400], t[:400], x[400:], t[400:],
                            TrainConfig(epochs=30, patience=0, lr=3e-2, batch_size=32))
    after = agreement(head(x[400:]).detach(), t[400:])
    assert after > 0.8 > before + 0.3
    assert [h["epoch"] for h in hist] == list(range(1, 31))


def test_label_free_training_never_reads_labels():
    x, t = _teacher_data()
    spec = HeadSpec(conv="standard", conv_layers=1, conv_width=8, fc_layers=2, fc_width=16)
    cfg = TrainConfig(epochs=3, seed=1)
    results = []
    for labels in (torch.randint(0, 5, (400,)), torch.full((400,), 4)):
        torch.manual_seed(0)
        head = build_head(spec, (8, 4, 4), 5)
        head, _ = train_head(head, x[:400], t[:400], x[400:], t[400:], cfg, y_train=labels)
        results.append(head.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_supervised_mode_uses_labels():
    x, t = _teacher_data()
    spec = HeadSpec(conv="none", conv_layers=0, pool="flatten", fc_layers=1)
    outs = []
    for labels in (t[:400].argmax(1), torch.zeros(400, dtype=torch.long)):
        torch.manual_seed(0)
        head, _ = train_head(build_head(spec, (8, 4, 4), 5), x[:400], t[:400], None, None,
                             TrainConfig(epochs=5, supervised=True, ce_weight=0.9), y_train=labels)
        outs.append(head(x[400:]).argmax(1))
    assert not torch.equal(outs[0], outs[1])


def test_training_the_heads_leaves_other_heads_and_backbone_untouched(digits_result):
    from autoexit.distill import train_heads

    before = {n: {k: v.clone() for k, v in h.module.state_dict().items()} for n, h in digits_result.heads.items()}
    bb = {k: v.clone() for k, v in digits_result.backbone.model.state_dict().items()}
    first = digits_result.points[0].name
    train_heads(digits_result.recording, points=[first], config=TrainConfig(epochs=1), progress=False)
    for n, h in digits_result.heads.items():
        for k, v in h.module.state_dict().items():
            assert torch.equal(v, before[n][k])
    for k, v in digits_result.backbone.model.state_dict().items():
        assert torch.equal(v, bb[k])


# --------------------------------------------------------------------------- on-the-fly teachers (function matching)


def test_augment_batch_is_a_flip_and_a_zero_padded_shift_of_each_image():
    """Every augmented image is its own image, flipped or not, moved by the drawn offset with zeros shifted in;
    a batch that is not [N, C, H, W] comes back unchanged; shift 0 only flips."""
    from autoexit.distill import augment_batch

    x = torch.randn(40, 2, 6, 5)
    out = augment_batch(x, torch.Generator().manual_seed(7), shift=2)
    g = torch.Generator().manual_seed(7)
    flip = torch.rand(40, generator=g) < 0.5
    dx, dy = torch.randint(0, 5, (2, 40), generator=g)
    for i in range(40):
        img = x[i].flip(2) if flip[i] else x[i]
        pad = torch.zeros(2, 6 + 4, 5 + 4)
        pad[:, 2:8, 2:7] = img
        assert torch.equal(out[i], pad[:, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]), i
    assert 0 < int(flip.sum()) < 40 and len(set(dx.tolist())) > 1
    flat = torch.randn(9, 16)
    assert augment_batch(flat, torch.Generator().manual_seed(0)) is flat
    only = augment_batch(x, torch.Generator().manual_seed(1), shift=0)
    assert all(torch.equal(only[i], x[i]) or torch.equal(only[i], x[i].flip(2)) for i in range(40))


def test_mix_batch_blends_each_input_with_another_of_the_batch():
    """Every mixed input lies on the segment between its own input and one other of the batch (a permutation),
    with weights that vary per input, for image and flat batches alike; the same generator state, the same batch."""
    from autoexit.distill import mix_batch

    for x in (torch.randn(64, 3, 4, 4), torch.randn(64, 7)):
        out = mix_batch(x, torch.Generator().manual_seed(3))
        assert out.shape == x.shape and torch.equal(out, mix_batch(x, torch.Generator().manual_seed(3)))
        g = torch.Generator().manual_seed(3)
        lam = torch.rand(64, generator=g).reshape(-1, *([1] * (x.dim() - 1)))
        perm = torch.randperm(64, generator=g)
        assert sorted(perm.tolist()) == list(range(64)) and lam.std() > 0.1
        assert torch.allclose(out, lam * x + (1 - lam) * x[perm], atol=1e-6)
        assert not torch.allclose(out, x)


def test_train_config_teacher_is_validated_and_left_out_of_old_cache_keys():
    from autoexit.errors import AutoExitError

    assert "teacher" not in TrainConfig().to_dict() and "shift" not in TrainConfig().to_dict()
    d = TrainConfig(teacher="mixup", shift=1, epochs=120).to_dict()
    assert d["teacher"] == "mixup" and TrainConfig(**d) == TrainConfig(teacher="mixup", shift=1, epochs=120)
    with pytest.raises(AutoExitError, match="teacher must be one of recorded, augmented, mixup"):
        TrainConfig(teacher="cutmix")
    with pytest.raises(AutoExitError, match="label-free"):
        TrainConfig(teacher="mixup", supervised=True)
    with pytest.raises(AutoExitError, match="shift must be an integer >= 0"):
        TrainConfig(teacher="augmented", shift=-1)


def test_epoch_selection_is_validated_and_the_old_default_keeps_its_cache_key():
    from autoexit.errors import AutoExitError

    assert TrainConfig().select == "last" and TrainConfig().patience == 0 and not TrainConfig().keeps_best
    assert TrainConfig().to_dict()["select"] == "last"
    old = TrainConfig(select="val", patience=8).to_dict()  # how every head was trained before `select` existed
    assert "select" not in old and old == {k: v for k, v in TrainConfig().to_dict().items() if k != "select"} | {
        "patience": 8}
    with pytest.raises(AutoExitError, match="select must be 'last'"):
        TrainConfig(select="best")
    with pytest.raises(AutoExitError, match="patience=3 stops training on the val KL; it needs select='val'"):
        TrainConfig(patience=3)
    with pytest.raises(AutoExitError, match="patience must be an integer >= 0"):
        TrainConfig(select="val", patience=-1)


def _val_free_run(cfg, x, t, x_val, t_val):
    torch.manual_seed(0)
    head = build_head(HeadSpec(conv="standard", conv_layers=1, conv_width=8, fc_layers=2, fc_width=16), (8, 4, 4), 5)
    head, hist = train_head(head, x, t, x_val, t_val, cfg)
    return head.state_dict(), hist


def test_default_heads_keep_their_last_epoch_and_never_depend_on_val():
    """What the guarantee needs of the heads: with the default select='last' the weights are the same whatever
    the val split holds (val is only recorded in the history); select='val' chooses by it."""
    x, t = _teacher_data()
    honest = (x[400:], t[400:])
    hostile = (x[400:], -t[400:])  # a val split whose KL gets worse as the head learns the teacher
    for cfg in (TrainConfig(epochs=6, lr=3e-2), TrainConfig(epochs=6, lr=3e-2, teacher="recorded", seed=3)):
        a, ha = _val_free_run(cfg, x[:400], t[:400], *honest)
        b, hb = _val_free_run(cfg, x[:400], t[:400], *hostile)
        c, _ = _val_free_run(cfg, x[:400], t[:400], None, None)
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
        assert len(ha) == len(hb) == 6 and ha[-1]["val_kl"] != hb[-1]["val_kl"]  # recorded, not used
    sel = TrainConfig(epochs=6, lr=3e-2, select="val")
    a, ha = _val_free_run(sel, x[:400], t[:400], *honest)
    b, hb = _val_free_run(sel, x[:400], t[:400], *hostile)
    assert min(ha, key=lambda r: r["val_kl"])["epoch"] != min(hb, key=lambda r: r["val_kl"])["epoch"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the old selection did depend on val


def test_recording_heads_do_not_depend_on_the_val_split(digits_result, monkeypatch):
    """train_heads (recorded and on-the-fly teachers) and out-of-fold heads with the default config: the same
    weights when the recording's val activations and answers are replaced by noise."""
    from autoexit.data import Recording
    from autoexit.distill import out_of_fold_logits, train_heads

    rec, tb = digits_result.recording, digits_result.backbone
    names = [p.name for p in rec.points][:2]
    acts, logits, g = Recording.activations, Recording.logits, torch.Generator().manual_seed(5)

    def noisy_acts(self, p, split):
        return torch.randn(acts(self, p, split).shape, generator=g) if split == "val" else acts(self, p, split)

    def noisy_logits(self, split):
        return torch.randn(logits(self, split).shape, generator=g) if split == "val" else logits(self, split)

    runs = []
    for noisy in (False, True):
        with monkeypatch.context() as m:
            if noisy:
                m.setattr(Recording, "activations", noisy_acts)
                m.setattr(Recording, "logits", noisy_logits)
            heads = train_heads(rec, config=TrainConfig(epochs=3), points=names, progress=False)
            mixed = train_heads(rec, config=TrainConfig(epochs=2, teacher="mixup", shift=1), points=names,
                                progress=False, backbone=tb)
            oof = out_of_fold_logits(rec, heads, TrainConfig(epochs=2), folds=2)
            runs.append((heads, mixed, oof))
    for one, other in zip(runs[0][:2], runs[1][:2]):
        for n in names:
            for k, v in one[n].module.state_dict().items():
                assert torch.equal(v, other[n].module.state_dict()[k]), (n, k)
            assert one[n].history[-1]["val_kl"] != other[n].history[-1]["val_kl"]  # val was read, for the record
    assert torch.equal(runs[0][2], runs[1][2])


def test_on_the_fly_teacher_needs_the_backbone_and_stored_inputs(digits_result, digits_backbone, digits_data,
                                                                tmp_path):
    from autoexit.data import record
    from autoexit.distill import train_heads
    from autoexit.errors import AutoExitError, DataError

    cfg = TrainConfig(epochs=1, teacher="mixup", shift=1)
    with pytest.raises(AutoExitError, match="pass backbone="):
        train_heads(digits_result.recording, config=cfg, progress=False)
    tb = digits_result.backbone
    bare = record(tb, digits_result.points, digits_data, cache_dir=str(tmp_path), store_inputs=False,
                  progress=False)
    with pytest.raises(DataError, match="store_inputs=True"):
        train_heads(bare, config=cfg, progress=False, backbone=tb)
    with pytest.raises(AutoExitError, match="unknown exit point"):
        train_heads(digits_result.recording, config=cfg, points=["nope"], progress=False, backbone=tb)


@pytest.mark.parametrize("select", ["last", "val"])
def test_mixup_heads_learn_the_backbones_answer_on_the_mixed_input_without_labels(digits_result, monkeypatch, select):
    """Function matching, step by step: each step's target is the backbone's answer on the augmented, mixed batch
    (not a recorded answer), the head reads its activation there, and the last (or best val-KL) epoch is kept - checked
    against a hand-written replay of the same steps. Training never reads a label."""
    import copy

    from autoexit.data import Recording
    from autoexit.distill import _predict, kd_loss, matching_batches, train_heads
    from autoexit.heads import build_head, default_head_spec

    rec, tb = digits_result.recording, digits_result.backbone
    name = rec.points[1].name
    x = rec.inputs("train")
    cfg = TrainConfig(epochs=3, select=select, teacher="mixup", shift=1, batch_size=len(x))  # one step per epoch

    def no_labels(*a, **k):
        raise AssertionError("label-free training read the labels")

    monkeypatch.setattr(Recording, "labels", no_labels)
    got = train_heads(rec, config=cfg, points=[name], progress=False, backbone=tb)[name]

    p = rec.point(name)
    torch.manual_seed(cfg.seed)
    head = build_head(default_head_spec(p.shape, rec.num_classes), p.shape, rec.num_classes)
    first, rest = tb.split([p.node])
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=3, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    x_val, t_val = rec.activations(name, "val"), rec.logits("val")
    kls, states, recorded_targets = [], [], []
    for _ in range(3):
        (batch,) = list(matching_batches(x, g, cfg))
        head.train()
        with torch.no_grad():
            act = first(batch)
            target = rest(act)
        recorded_targets.append(target)
        loss = kd_loss(head(act), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        kls.append(float(kd_loss(_predict(head, x_val), t_val)))
        states.append(copy.deepcopy(head.state_dict()))
    assert [h["val_kl"] for h in got.history] == kls
    best = states[min(range(3), key=kls.__getitem__)] if select == "val" else states[-1]
    for k, v in best.items():
        assert torch.equal(got.module.state_dict()[k], v), k
    # the targets were answers on new inputs: none of them is the recorded answer of any train input
    recorded = rec.logits("train")
    assert not any(torch.allclose(t, recorded[i]) for t in recorded_targets[0][:20] for i in range(len(recorded)))


def test_a_matching_head_does_not_depend_on_the_heads_trained_with_it(digits_result):
    """What per-head caching rests on: a head trained together with others is bit-identical to the same head
    trained alone (its loss, gradient and optimiser state are its own; the batches do not depend on the heads)."""
    from autoexit.distill import train_heads_matching

    rec, tb = digits_result.recording, digits_result.backbone
    names = [p.name for p in rec.points]
    def check(cfg, together, which):
        for name in which:
            alone = train_heads_matching(rec, tb, config=cfg, points=[name], progress=False)
            for k, v in alone[name].module.state_dict().items():
                assert torch.equal(v, together[name].module.state_dict()[k]), (cfg.patience, name, k)
            assert alone[name].history == together[name].history
            assert alone[name].epochs == together[name].epochs == len(alone[name].history)

    cfg = TrainConfig(epochs=3, patience=0, teacher="augmented", shift=1)
    check(cfg, train_heads_matching(rec, tb, config=cfg, points=[names[0], names[2]], progress=False), [names[2]])
    # with patience each head stops on its own; a high learning rate makes some stall early
    for lr in (1.0, 0.3, 3e-2):
        cfg = TrainConfig(epochs=5, patience=1, select="val", teacher="augmented", shift=1, lr=lr)
        together = train_heads_matching(rec, tb, config=cfg, points=names, progress=False)
        stops = {n: h.epochs for n, h in together.items()}
        if len(set(stops.values())) > 1:
            break
    else:
        raise AssertionError(f"no head stopped before the others at any learning rate: {stops}")
    check(cfg, together, [min(stops, key=stops.get), max(stops, key=stops.get)])


def test_cached_matching_heads_train_together_once_and_load_back(digits_result, tmp_path, monkeypatch):
    from autoexit import distill
    from autoexit.search.pipeline import train_heads_cached

    rec, tb = digits_result.recording, digits_result.backbone
    names = [p.name for p in rec.points][:2]
    cfg = TrainConfig(epochs=2, patience=0, teacher="mixup", shift=1)
    calls = []
    real = distill.train_heads_matching

    def counting(*a, **k):
        calls.append(k.get("points", a[4] if len(a) > 4 else None))
        return real(*a, **k)

    monkeypatch.setattr(distill, "train_heads_matching", counting)
    first = train_heads_cached(rec, {}, cfg, cache_dir=tmp_path, points=names, progress=False, backbone=tb)
    assert calls == [names]  # one joint run for both heads
    again = train_heads_cached(rec, {}, cfg, cache_dir=tmp_path, points=names, progress=False, backbone=None)
    assert len(calls) == 1  # both from the cache: no backbone needed
    for n in names:
        for k, v in first[n].module.state_dict().items():
            assert torch.equal(v, again[n].module.state_dict()[k])
    plain = train_heads_cached(rec, {}, TrainConfig(epochs=1), cache_dir=tmp_path, points=names[:1], progress=False)
    assert plain[names[0]].epochs == 1 and len(calls) == 1 and len(list(tmp_path.glob("head-*.pt"))) == 3  # another teacher, another key


def test_enable_with_mixup_teacher_and_cross_fitting(digits_backbone, digits_data, tmp_path):
    """The whole pipeline with function-matching heads, cross-fitted: it runs, the manifest says how the heads
    were trained, and the emitted TorchScript model answers as the backbone where no head exits."""
    from autoexit.pipeline import EnableConfig, enable

    cfg = EnableConfig(tolerance=2.0, cache_dir=str(tmp_path / "c"), cross_fit=2,
                       train=TrainConfig(epochs=3, teacher="mixup", shift=1))
    res = enable(digits_backbone, digits_data, config=cfg, progress=False)
    m = res.manifest()
    assert m["head_training"] == {"teacher": "mixup", "epochs": 3, "label_free": True, "epoch_kept": "last",
                                 "head": "default"}
    assert ("heads trained", "3 epochs, teacher mixup, label-free, last epoch kept") in res.summary_rows()
    assert "out-of-fold" in res.extra["policy"]["fitted_on"]
    assert all(h.epochs == 3 for h in res.heads.values()), {n: h.epochs for n, h in res.heads.items()}
    assert all(h.val_agreement > 0.2 for h in res.heads.values()), {n: h.val_agreement for n, h in res.heads.items()}
    x = digits_data.dataset.tensors[0][:64]
    logits, idx = res.model(x)
    full = digits_backbone(x)
    back = idx == len(res.kept)
    assert torch.allclose(logits[back], full[back], atol=1e-4)
