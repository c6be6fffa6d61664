"""Label-free training: heads learn the backbone, labels are never read, other heads untouched."""

from __future__ import annotations

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
