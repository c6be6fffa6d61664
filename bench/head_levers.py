"""Nine levers for issue 8's FLOPs targets, measured: augmented distillation, cross-fitted policies, joint
fine-tuning, feature distillation, mixup function matching, skip heads, two-stage exits, ensembled heads, cheap
heads.

``bench/policies.py`` shows the guaranteed policies saving 6-10 % at T = 1 % on ResNet-20 where the
oracle saves 67 %, and its hindsight columns show the heads and signals themselves allowing only
~12-15 % even with thresholds picked on the test labels. Four causes were suspected and are tested
here on the same recording and split (50/20/30, seed 0, exits after every block, default heads):

1. **Too little distillation data.** Heads are distilled on the recorded activations of 5,000 train
   images (the fixture is CIFAR-10's test set). ``augmented``: the same heads and schedule
   (40 epochs, AdamW 3e-3, one-cycle, best val-KL epoch per head), trained on the fly on augmented
   images (random horizontal flip + random shift of up to 4 pixels, zero padding) with the backbone's
   logits *on the augmented image* as the target: unlimited label-free data, each epoch new.
2. **Policies fitted on heads' own training data.** The guaranteed policies choose exits, gates and
   the threshold family on the train split, where the heads were fitted: late heads agree 6-8 points
   more there than on val. ``cross-fitted``: the policy is fitted on out-of-fold head predictions of
   the train split (``--folds`` folds: each fold's predictions come from heads trained on the other
   folds), and the deployed heads (trained on all of train) are certified on val as before.

3. **A frozen backbone.** The heads read features the backbone learnt for its last layer only.
   ``joint``: the backbone is fine-tuned together with the heads (starting from the default heads),
   label-free: every head and the backbone's own output are distilled (KL) to the *original* backbone's
   logits on the same augmented image (``--joint-epochs``, backbone learning rate ``--joint-lr``, the
   backbone output's loss weighted ``--joint-final-weight`` against each head's 1; batch-norm statistics
   frozen). The policies are then fitted and certified against the fine-tuned model's own final answer
   (the only reference the policies know); how far that final answer moved from the original backbone's
   is reported beside them (``joint`` in the results), because it adds to every guarantee.

And a learning curve to tell whether data is what limits the heads: ``train-size`` trains the default heads
with the default schedule on random subsets of the train split (``--train-sizes``, e.g. 1,250 and 2,500 of
the 5,000 images) and fits, certifies and tests the policies exactly as the baseline does.

4. **Heads that learn more from each image.** The learning curve says the heads need more from each image, and
   matching logits gives 10 numbers per image. ``feature``: feature distillation (FitNets-style), still label-free.
   Each head has the default body with a ``D``-wide output, followed by the backbone's own final linear layer,
   frozen; it is trained on the backbone's ``D``-dimensional penultimate features of each image (MSE, scaled by
   their variance and weighted ``--feature-weight``) as well as on its logits (KL, through the frozen layer), with the
   default schedule. Same FLOPs as the default head plus one ``D x classes`` product.

5. **Too short and too easy a schedule for distillation on little data.** Distillation from a fixed teacher on a
   small set keeps improving with mixup and long schedules (function matching: Beyer et al., "Knowledge distillation:
   A good teacher is patient and consistent", CVPR 2022). ``mixup``: the ``augmented`` lever's heads and training,
   with each augmented batch mixed with a shuffled copy of itself (one uniform weight per image) and the backbone's
   logits on the *mixed* image as the target, for ``--mixup-epochs`` (default 120, three times ``augmented``'s).
   A run with another schedule is kept beside the default one (``mixup@N`` in the results; ``--merge``), so runs of
   several lengths make a schedule-length curve.

6. **Heads that start from nothing.** Every head above is trained from random weights on 5,000 images. ``skip``:
   a head made of the backbone's own modules, starting from its weights: the shape-changing first block of every
   later stage (stride 2) and the final linear layer, i.e. the rest of the network with its shape-keeping blocks
   skipped, fine-tuned label-free (KL to the backbone's logits, default schedule, peak learning rate ``--skip-lr``,
   default 1e-3). Exits in the last stage keep the default head (no block left to copy). Such heads fit their own
   train images far better than new ones, so the policies are fitted on out-of-fold predictions (``--folds``, the
   ``cross-fitted`` lever's default heads at the last stage's exits). Costs a block or two per head. The results
   also say, per exit, what share of val each head could answer alone within 1 % disagreement
   (:func:`confident_share`).

7. **Every input paying for a costly head.** A skip head costs a block, and every input that reaches its exit pays
   for it, though few leave there. ``two-stage``: at an exit with a skip head, the exit's default head (under 1 % of
   the FLOPs) runs first and only the inputs it is most confident about - a try share ``q`` of them, the ``1 - q``
   quantile of its top probability on the fit split - run the skip head, which then decides the exit as usual; the
   others go on without paying for it (:class:`TwoStage`). ``q`` is chosen per policy and tolerance among
   ``TRY_SHARES`` by the fit split's expected FLOPs at the target risk (1: no try gate, the ``skip`` lever), and the
   exit set and threshold family are fitted with per-input costs, all on the out-of-fold fit split, so calibration
   on val is untouched. Only rules that read no earlier exit can be used (an input that did not run an earlier
   exit's skip head has no logits there): ``max_softmax`` and gates without history, with both risks.

8. **One head's word.** Independently trained models disagree where they are unsure, and an ensemble's averaged
   answer is better calibrated than either. ``ensemble``: at every exit the default head and a second one of the same
   design trained the same way from another seed (``TrainConfig(seed=...)``, ``--ensemble-seeds``), their
   log-probabilities averaged (:func:`ensemble_head`); each input pays for every member. Temperatures, policies and
   certification as for the baseline.

9. **Heads that cost too much.** A sample pays for every head it passes, and the default head (separable conv > BN >
   ReLU > GAP > FC128 > FC) costs about 1 % of ResNet-20's FLOPs. ``cheap``: SDN's head instead (``CHEAP_HEAD``:
   2x2 average pool + one linear layer, 100-300 times cheaper), trained label-free with the default schedule, at every
   point; ``bench/head_ablation.py`` found it better on ResNet-20 with the older pipeline. Temperatures, policies
   and certification as for the baseline.

``mixup-cross-fitted``: the ``mixup`` lever's heads with the policies fitted on out-of-fold predictions of the train
split, the fold heads trained by function matching too (``out_of_fold_logits`` with ``TrainConfig(teacher="mixup")``):
what ``EnableConfig(cross_fit=folds, train=TrainConfig(teacher="mixup", epochs=...))`` runs.

For each, the val agreement per exit and, at T = 1 and 2 %, the test FLOPs saving and drop of the
label-free policies (``max_softmax``, ``patience``, ``gate``) and the labelled ones (``+drop``),
beside the baseline (default heads, fitted in-sample) from the same process run.

Run: ``python bench/head_levers.py [--depths 20] [--folds 2] [--epochs 40] [--levers augmented cross-fitted joint train-size feature mixup skip two-stage mixup-cross-fitted ensemble cheap] [--feature-weight 1] [--mixup-epochs 120]
[--skip-lr 1e-3] [--ensemble-seeds 1] [--merge]`` (ResNet-20: about 15 min on 2 cores; ResNet-56 about 1 h; ``--merge`` keeps other depths' results and, for a depth run again, the levers not run again; ``joint``: 4 min on ResNet-20 and about 15 min on ResNet-56 for 12 epochs; ``train-size``: 7 min on ResNet-20; ``feature``: 5 min on ResNet-20 and 15 min on ResNet-56; ``mixup``: about 10 s per epoch on ResNet-20 and 23 s on ResNet-56; ``skip``: about 20 min on ResNet-20 with
its out-of-fold copies; ``two-stage``: with the skip heads cached, about 2 min on ResNet-20 and 25 on ResNet-56;
``mixup-cross-fitted``: about one more mixup training, 20 min on ResNet-20; ``ensemble``: one more default training per
seed, 6 min on ResNet-20 and about 20 on ResNet-56; ``cheap``: under a minute of training per network, the run
dominated by the baseline's rows: 12 min for ResNet-20).
Heads are cached in ``~/.cache/autoexit/bench-levers``.
Results: ``bench/results/head_levers.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, require_fixtures, val_selected_training, write_results  # noqa: E402

TOLERANCES = (1.0, 2.0)
MIXUP_EPOCHS = 120  # the mixup lever's default schedule (--mixup-epochs), also what guarantee_check's `mixup` reads
FEATURE_WEIGHT = 1.0  # the feature lever's default loss weight (--feature-weight), also guarantee_check's `feature`
SKIP_LR = 1e-3  # the skip lever's peak learning rate (--skip-lr): a third of the default, the heads start pretrained
LEVERS = ("augmented", "cross-fitted", "joint", "train-size", "feature", "mixup", "skip", "two-stage",
          "mixup-cross-fitted", "ensemble", "cheap")


def mixup_key(epochs: int) -> str:
    """The result key of a mixup run: ``mixup`` for the default schedule, ``mixup@N`` for an ``N``-epoch one, so runs
    of several schedules are kept side by side (``--merge``) as a schedule-length curve."""
    return "mixup" if epochs == MIXUP_EPOCHS else f"mixup@{epochs}"


def mixup_epochs(name: str) -> int:
    """The schedule that a mixup result key (``mixup``, ``mixup@N``), variant or agreement label names: the only
    number in it, else the default - the inverse of :func:`mixup_key`."""
    m = re.search(r"\d+", name)
    return int(m.group()) if m else MIXUP_EPOCHS


POLICIES = (("max_softmax", "max_softmax", "disagreement"), ("patience", "patience", "disagreement"),
            ("gate", "gate", "disagreement"), ("max_softmax+drop", "max_softmax", "drop"),
            ("gate+drop", "gate", "drop"))


def _cache(depth: int, what: str, key: str) -> Path:
    from autoexit.data import default_cache_dir

    h = hashlib.sha256(f"{depth}|{what}|{key}|v1".encode()).hexdigest()[:16]
    return default_cache_dir() / "bench-levers" / f"r{depth}-{what}-{h}.pt"


def _specs(heads: dict) -> str:
    import json

    return json.dumps({n: h.spec.to_dict() for n, h in sorted(heads.items())}, sort_keys=True)


def _save(path: Path, obj) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def augmented_heads(depth: int, tb, rec, heads: dict, epochs: int, log, mixup: bool = False) -> dict:
    """Default heads trained jointly on the fly on augmented train images (see the module doc); with ``mixup``
    each augmented batch is also mixed (function matching, the ``mixup`` lever). The training is the core's
    (``autoexit.distill.train_heads_matching``, ``TrainConfig(teacher="augmented" | "mixup", patience=0)``, what
    ``EnableConfig(train=TrainConfig(teacher="mixup"))`` trains); the heads are cached here per lever and schedule."""
    import dataclasses

    import torch

    from autoexit.distill import TrainedHead, _predict, agreement, kd_loss, train_heads_matching
    from autoexit.heads import build_head

    what = "mixup function matching" if mixup else "augmented distillation"
    names = [p.name for p in rec.points]
    path = _cache(depth, "mixup" if mixup else "augmented", f"{rec.path}|{epochs}|{_specs(heads)}")
    if not path.exists():
        cfg = val_selected_training(epochs=epochs, teacher="mixup" if mixup else "augmented", patience=0)
        trained = train_heads_matching(rec, tb, {n: heads[n].spec for n in names}, cfg, names, progress=True)
        best_epoch = {n: 1 + min(range(len(trained[n].history)), key=lambda e: trained[n].history[e]["val_kl"])
                      for n in names}
        seconds = sum(trained[n].seconds for n in names)
        _save(path, {"state": {n: trained[n].module.state_dict() for n in names}, "epoch": best_epoch,
                     "seconds": seconds})
        log(f"{what}: {len(names)} heads, {epochs} epochs in {seconds:.0f} s")
        return {n: dataclasses.replace(trained[n], epochs=best_epoch[n], seconds=seconds) for n in names}
    blob = torch.load(path, map_location="cpu", weights_only=True)
    t_val = rec.logits("val")
    out = {}
    for n in names:
        torch.manual_seed(0)  # as the heads were built before training: the global generator's state is as before
        m = build_head(heads[n].spec, rec.point(n).shape, rec.num_classes)
        m.load_state_dict(blob["state"][n])
        m.eval()
        pv = _predict(m, rec.activations(n, "val"))
        h = heads[n]
        out[n] = TrainedHead(point=h.point, spec=h.spec, module=m, flops=h.flops, params=h.params,
                             param_bytes=h.param_bytes, val_agreement=agreement(pv, t_val),
                             val_kl=float(kd_loss(pv, t_val)), epochs=int(blob["epoch"][n]),
                             seconds=blob["seconds"])
    return out


def joint_finetune(depth: int, tb, rec, heads: dict, epochs: int, lr: float, final_weight: float, log) -> dict:
    """Backbone and heads fine-tuned together, label-free (see the module doc), cached. Returns per split
    ``heads`` [exits, n, classes] and ``final`` [n, classes] logits, ``stats`` [exits, n, 2] activation
    statistics of the fine-tuned backbone, and the training time."""
    import torch

    from autoexit.distill import TrainConfig, kd_loss, matching_batches
    from autoexit.policies.rules import activation_stats

    names = [p.name for p in rec.points]
    path = _cache(depth, "joint", f"{rec.path}|{epochs}|{lr}|{final_weight}|{_specs(heads)}")
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    teacher = [s.eval() for s in tb.split([p.node for p in rec.points])]
    for s in teacher:
        s.requires_grad_(False)
    student = [copy.deepcopy(s).requires_grad_(True) for s in teacher]
    mods = {n: copy.deepcopy(heads[n].module) for n in names}

    def forward(x):
        outs, stats = [], []
        for j, s in enumerate(student[:-1]):
            x = s(x)
            outs.append(mods[names[j]](x))
            stats.append(activation_stats(x))
        return outs, student[-1](x), stats

    x_train = rec.inputs("train")
    bs = 128
    opt = torch.optim.AdamW([{"params": [q for s in student for q in s.parameters()], "weight_decay": 0.0},
                             {"params": [q for m in mods.values() for q in m.parameters()], "weight_decay": 1e-4}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 1e-3], pct_start=0.1,
                                                total_steps=epochs * math.ceil(len(x_train) / bs))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for _ in tqdm(range(epochs), desc="joint fine-tuning", unit="epoch"):
        for s in student:
            s.eval()  # batch-norm statistics stay the original backbone's
        for m in mods.values():
            m.train()
        for a in matching_batches(x_train, g, TrainConfig(teacher="augmented", batch_size=bs)):
            with torch.no_grad():
                target = a
                for s in teacher:
                    target = s(target)
            outs, final, _ = forward(a)
            loss = sum(kd_loss(o, target) for o in outs) + final_weight * kd_loss(final, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    for m in mods.values():
        m.eval()
    out: dict = {"seconds": seconds}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            x = rec.inputs(split)
            parts = [forward(x[i:i + 500]) for i in range(0, len(x), 500)]
            out[split] = {"heads": torch.cat([torch.stack(o) for o, _, _ in parts], 1),
                          "final": torch.cat([f for _, f, _ in parts]),
                          "stats": torch.cat([torch.stack(st) for _, _, st in parts], 1)}
    _save(path, out)
    log(f"joint fine-tuning: backbone + {len(names)} heads, {epochs} epochs in {seconds:.0f} s")
    return out


def penultimate_features(model, x, batch: int = 500):
    """The input of ``model.linear`` (the backbone's penultimate features, [n, D]) for images ``x``."""
    import torch

    out = []
    hook = model.linear.register_forward_pre_hook(lambda _m, a: out.append(a[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        hook.remove()
    return torch.cat(out)


def feature_head(body, fc):
    """``fc(body(h))``: a head whose ``body`` predicts the backbone's penultimate features and whose last layer is
    ``fc``, the backbone's own final linear layer, frozen (its ``body`` and ``fc`` are attributes)."""
    from torch import nn

    class FeatureHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = body, fc.requires_grad_(False)

        def forward(self, h):
            return self.fc(self.body(h))

    return FeatureHead()


def train_feature_head(head, x, feats, t, x_val, t_val, weight: float, cfg=None):
    """Train ``head`` (:func:`feature_head`) on activations ``x``: KL of ``head(x)`` to the backbone's logits ``t``
    plus ``weight`` x the MSE of ``head.body(x)`` to the backbone's penultimate features ``feats``, divided by their
    mean variance. The default schedule (``autoexit.distill.TrainConfig``: AdamW, one-cycle, best val-KL epoch,
    early stop). Label-free: reads activations, features and backbone logits only. Returns the head and its best
    epoch."""
    import torch
    import torch.nn.functional as F

    from autoexit.distill import _predict, kd_loss

    cfg = cfg or val_selected_training()
    params = [q for q in head.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, pct_start=0.15,
                                                total_steps=cfg.epochs * math.ceil(len(x) / cfg.batch_size))
    scale = feats.var(0).mean().clamp_min(1e-12)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    best, bad = (math.inf, copy.deepcopy(head.state_dict()), 0), 0
    for ep in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            f = head.body(x[idx])
            loss = kd_loss(head.fc(f), t[idx]) + weight * F.mse_loss(f, feats[idx]) / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        kl = float(kd_loss(_predict(head, x_val), t_val))
        if kl < best[0] - 1e-6:
            best, bad = (kl, copy.deepcopy(head.state_dict()), ep + 1), 0
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                break
    head.load_state_dict(best[1])
    head.eval()
    return head, best[2]


def feature_heads(depth: int, rec, heads: dict, weight: float, log) -> dict:
    """Heads of the default spec distilled on the backbone's penultimate features as well as its logits, through
    its frozen final layer (:func:`train_feature_head`), cached. TrainedHeads with the FLOPs of the whole head."""
    import torch

    from autoexit.cost import count_flops, count_params, param_bytes
    from autoexit.distill import TrainedHead, _predict, agreement, kd_loss
    from autoexit.heads import build_head
    from bench.common import cifar_resnet

    model = cifar_resnet(depth).eval()
    fc = copy.deepcopy(model.linear)
    names = [p.name for p in rec.points]
    path = _cache(depth, "feature", f"{rec.path}|{weight}|{_specs(heads)}")
    dim = fc.in_features
    mods = {}
    for n in names:
        torch.manual_seed(0)
        mods[n] = feature_head(build_head(heads[n].spec, rec.point(n).shape, dim), copy.deepcopy(fc))
    t_train, t_val = rec.logits("train"), rec.logits("val")
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        for n in names:
            mods[n].load_state_dict(blob["state"][n])
        epochs, seconds = blob["epoch"], blob["seconds"]
    else:
        feats = penultimate_features(model, rec.inputs("train"))
        if not torch.allclose(fc(feats), t_train, atol=1e-4):
            raise SystemExit(f"resnet{depth}: linear(penultimate features) is not the recorded logits; "
                             "the feature lever needs a backbone whose last module is its `linear` layer")
        epochs, t0 = {}, time.perf_counter()
        from tqdm.auto import tqdm

        for n in tqdm(names, desc="feature-distilled heads", unit="head"):
            mods[n], epochs[n] = train_feature_head(mods[n], rec.activations(n, "train"), feats, t_train,
                                                    rec.activations(n, "val"), t_val, weight)
        seconds = time.perf_counter() - t0
        _save(path, {"state": {n: mods[n].state_dict() for n in names}, "epoch": epochs, "seconds": seconds})
        log(f"feature distillation: {len(names)} heads in {seconds:.0f} s")
    out = {}
    for n in names:
        mods[n].eval()
        x_val = rec.activations(n, "val")
        pv = _predict(mods[n], x_val)
        h = heads[n]
        out[n] = TrainedHead(point=h.point, spec=h.spec, module=mods[n], flops=count_flops(mods[n], x_val[:1]),
                             params=count_params(mods[n]), param_bytes=param_bytes(mods[n]),
                             val_agreement=agreement(pv, t_val), val_kl=float(kd_loss(pv, t_val)),
                             epochs=int(epochs[n]), seconds=seconds)
    return out


def ensemble_head(members):
    """Heads reading the same activation, answering the mean of their log-probabilities (a geometric-mean
    ensemble: an input the members disagree on gets a flat answer, hence a low exit score)."""
    import torch
    from torch import nn

    class EnsembleHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members]).mean(0)

    return EnsembleHead()


def ensemble_heads(rec, heads: dict, seeds: tuple, log) -> tuple[dict, list]:
    """Per exit, ``heads``' head with ones of the same design trained the same way (``val_selected_training``)
    from each of ``seeds``, their log-probabilities averaged; FLOPs and parameters add up. The extra members go
    through the per-head cache of ``bench.policies.plain_heads``. Returns the ensembled heads and, per seed, its
    own heads."""
    import dataclasses

    from bench.policies import plain_heads

    others = []
    for seed in seeds:
        log(f"ensemble: default heads with seed {seed}")
        others.append(plain_heads(rec, train=dataclasses.replace(val_selected_training(), seed=seed)))
    out = {}
    for n, h in heads.items():
        members = [h, *(o[n] for o in others)]
        if any(m.spec != h.spec for m in members):
            raise SystemExit(f"ensemble: the heads at {n} differ in design; they must be the default heads")
        out[n] = dataclasses.replace(h, module=ensemble_head([m.module for m in members]).eval(),
                                     flops=sum(m.flops for m in members), params=sum(m.params for m in members),
                                     param_bytes=sum(m.param_bytes for m in members))
    return out, others


def shared_errors(a, b, teacher) -> tuple[list, list]:
    """Per exit, for two heads' logits ``a``, ``b`` [exits, n, classes] and the backbone's ``teacher`` [n, classes]:
    the share of inputs on which the two give the same class, and the share of ``a``'s disagreements with the
    backbone on which ``b`` gives the same wrong class (NaN where ``a`` never disagrees). Errors two heads share
    cannot be flagged by their disagreement."""
    pa, pb, t = a.argmax(2), b.argmax(2), teacher.argmax(1)[None]
    wrong = pa != t
    same = pa == pb
    shared = (same & wrong).float().sum(1) / wrong.float().sum(1)
    return [float(x) for x in same.float().mean(1)], [float(x) for x in shared]


def confident_share(logits, teacher_logits, max_disagreement: float = 0.01) -> float:
    """The largest share of samples a head could answer with at most ``max_disagreement`` of them disagreeing with
    the backbone, taking them in order of the head's top softmax probability (what a max-softmax threshold can let
    out of that exit alone, in hindsight). 0 when even its most confident answer disagrees."""
    import torch

    order = torch.argsort(logits.softmax(1).max(1).values, descending=True, stable=True)
    wrong = (logits.argmax(1) != teacher_logits.argmax(1))[order].double()
    rate = torch.cumsum(wrong, 0) / torch.arange(1, len(order) + 1)
    ok = (rate <= max_disagreement + 1e-12).nonzero()
    return float(ok.max() + 1) / len(order) if len(ok) else 0.0


def skip_head(model, name: str, shape):
    """A head for exit ``name`` (activation ``shape``, without the batch) of a CIFAR ResNet
    (``autoexit.zoo.CifarResNet``) built from the backbone's own modules: deep copies of those first blocks of
    the later stages that change the shape of what they are given (stride 2, more channels), global average
    pooling and the backbone's final linear layer, all trainable and starting from the backbone's weights.
    ``None`` for an exit in the last stage, where no such block is left."""
    import torch
    from torch import nn

    stage = int(name[5]) if name.startswith("layer") else 0
    stages = sorted(int(k[5:]) for k, _ in model.named_children() if k.startswith("layer"))
    blocks, h = [], torch.zeros(1, *shape)
    with torch.no_grad():
        for s in (s for s in stages if s > stage):
            block = getattr(model, f"layer{s}")[0]
            out = block(h)
            if out.shape != h.shape:
                blocks.append(copy.deepcopy(block))
                h = out
    if not blocks:
        return None

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.linear = nn.Sequential(*blocks), copy.deepcopy(model.linear)

        def forward(self, x):
            return self.linear(self.blocks(x).mean((2, 3)))

    return Skip()


def _fold_parts(n: int, folds: int) -> list:
    """The ``folds`` folds of ``n`` train samples as ``autoexit.distill.out_of_fold_logits`` cuts them (seed
    ``TrainConfig().seed + 1``), so a skip head's folds are the default heads' folds."""
    import torch

    from autoexit.distill import TrainConfig

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TrainConfig().seed + 1))
    return [perm[k::folds] for k in range(folds)]


def _skip_trained(depth: int, rec, model, name: str, lr: float, fold: tuple | None = None):
    """The skip head of exit ``name`` trained (default schedule, peak learning rate ``lr``) on the train split,
    or with ``fold`` = (f, folds) on every fold but f (folds as ``autoexit.distill.out_of_fold_logits`` cuts
    them), cached per head and fold. Returns the head (eval mode), its best epoch and the training seconds."""
    import torch

    from autoexit.distill import train_head

    cfg = val_selected_training(lr=lr)
    mod = skip_head(model, name, rec.point(name).shape)
    path = _cache(depth, f"skip-{name}", f"{rec.path}|{lr}|{fold}")
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        mod.load_state_dict(blob["state"])
        return mod.eval(), blob["epoch"], blob["seconds"]
    x, t = rec.activations(name, "train"), rec.logits("train")
    if fold is not None:
        f, folds = fold
        idx = torch.cat([part for k, part in enumerate(_fold_parts(len(t), folds)) if k != f])
        x, t = x[idx], t[idx]
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    mod, hist = train_head(mod.train(), x, t, rec.activations(name, "val"), rec.logits("val"), cfg,
                           desc=f"skip head {name}" + (f" fold {fold[0] + 1}" if fold else ""))
    epoch = min(hist, key=lambda r: r.get("val_kl", math.inf))["epoch"] if hist else 0
    seconds = time.perf_counter() - t0
    _save(path, {"state": mod.state_dict(), "epoch": epoch, "seconds": seconds})
    return mod.eval(), epoch, seconds


def skip_heads(depth: int, rec, heads: dict, lr: float, log, folds: int = 2) -> tuple[dict, dict]:
    """Skip heads (:func:`skip_head`) at every exit before the last stage, distilled label-free on the recorded
    activations with the default schedule at peak learning rate ``lr``, and the default heads at the last stage's
    exits. Returns the TrainedHeads (each with its own FLOPs) and, per skip exit, the out-of-fold logits of the
    train split (``folds`` folds): heads that start from the backbone's weights fit the train split far better
    than new data (14-21 points more agreement on ResNet-20), so policies are fitted on out-of-fold predictions."""
    import torch

    from autoexit.cost import count_flops, count_params, param_bytes
    from autoexit.distill import TrainedHead, _predict, agreement, kd_loss
    from bench.common import cifar_resnet

    model = cifar_resnet(depth).eval()
    names = [n for n in (p.name for p in rec.points) if skip_head(model, n, rec.point(n).shape) is not None]
    t_val = rec.logits("val")
    out, oof, seconds = dict(heads), {}, 0.0
    from tqdm.auto import tqdm

    for n in tqdm(names, desc=f"skip heads (+{folds} folds each)", unit="exit"):
        m, epoch, sec = _skip_trained(depth, rec, model, n, lr)
        seconds += sec
        x_val = rec.activations(n, "val")
        pv = _predict(m, x_val)
        h = heads[n]
        out[n] = TrainedHead(point=h.point, spec=h.spec, module=m, flops=count_flops(m, x_val[:1]),
                             params=count_params(m), param_bytes=param_bytes(m), val_agreement=agreement(pv, t_val),
                             val_kl=float(kd_loss(pv, t_val)), epochs=int(epoch), seconds=sec)
        x = rec.activations(n, "train")
        oof[n] = torch.zeros(len(x), rec.num_classes)
        for f, part in enumerate(_fold_parts(len(x), folds)):
            mf, _, sec = _skip_trained(depth, rec, model, n, lr, (f, folds))
            seconds += sec
            oof[n][part] = _predict(mf, x[part]).float()
    log(f"skip heads: {len(names)} exits x (1 + {folds} folds), {seconds:.0f} s of training")
    return out, oof


def skip_tables(depth: int, tb, rec, heads: dict, data: dict, lr: float, folds: int, log):
    """The skip lever's heads (:func:`skip_heads`), their ExitTables per split (temperatures fitted on val) with
    ``train`` the table the policies are fitted on - out-of-fold predictions of the train split: the skip exits'
    own, the default heads' (:func:`out_of_fold`, the cross-fitted lever's) at the last stage - and their costs.
    Returns (heads, their out-of-fold logits, predictions per split, tables, costs)."""
    import torch

    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.pipeline import flops_costs
    from autoexit.policies import ExitTable

    names = [p.name for p in rec.points]
    sk, sk_oof = skip_heads(depth, rec, heads, lr, log, folds)
    preds, tables = trained_tables(rec, sk, data)
    costs = flops_costs(sk, names, float(tb.total_flops))
    base_oof = out_of_fold(depth, rec, heads, folds, log)
    fit_logits = torch.stack([sk_oof[n] if n in sk_oof else base_oof[j] for j, n in enumerate(names)])
    tr = data["train"][0]
    tables["train"] = ExitTable.from_predictions(ExitPredictions(names, fit_logits, tr.backbone_logits, tr.labels),
                                                 calibrate_temperatures(preds["val"]), data["train"][1])
    return sk, sk_oof, preds, tables, costs


TRY_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 1.0)  # two-stage lever: shares of inputs that may run a skip head (1: every input)
TWO_STAGE_POLICIES = tuple(p for p in POLICIES if p[1] != "patience")  # rules that read no earlier exit (gates
# with history 0): a skip head that was not run has no logits


def try_recall(skip_logits, default_logits, teacher_logits, share: float, max_disagreement: float = 0.01) -> float:
    """Of the inputs a skip head could let out alone at ``max_disagreement`` (its :func:`confident_share`, most
    confident first), the share that are among the ``share`` of inputs its exit's default head is most confident
    about: what a try gate letting that share run the skip head keeps (in hindsight). 1 when there are none."""
    import torch

    m = round(confident_share(skip_logits, teacher_logits, max_disagreement) * len(teacher_logits))
    if m == 0:
        return 1.0
    top = torch.argsort(skip_logits.softmax(1).max(1).values, descending=True, stable=True)[:m]
    conf = default_logits.softmax(1).max(1).values
    tried = conf >= torch.quantile(conf, 1 - share)
    return float(tried[top].float().mean())


class TwoStage:
    """Two-stage exits on recorded predictions: at an exit with a skip head, the exit's cheap default head runs
    first, and only an input whose default head's top softmax probability reaches the exit's *try threshold* runs
    the skip head (which then decides the exit as usual); the others go on without paying for it. Exits without a
    skip head (the last stage) are plain exits.

    ``conf[split]`` [exits, n]: the default heads' top probability (the fit split's from out-of-fold heads, like
    its skip logits); ``gated`` per exit: whether it has a skip head; ``c_try`` per exit: the default head's FLOPs,
    paid at a gated exit by every input that reaches it; ``costs``: the skip lever's ``ExitCosts`` (``c1``: each
    exit's own head, paid only where it runs; ``before``; ``base``). Try thresholds come from a try share ``q`` as
    the ``1 - q`` quantile of each exit's fit-split confidence, so everything is fixed before calibration."""

    def __init__(self, conf: dict, gated, c_try, costs):
        import numpy as np

        self.conf, self.gated = conf, np.asarray(gated, dtype=bool)
        self.c_try = np.asarray(c_try, dtype=np.float64)
        self.costs = costs

    def thresholds(self, q: float):
        import numpy as np

        if q >= 1:  # no try gate: every input runs the skip head, and nobody pays for a default head
            return np.full(len(self.gated), -np.inf)
        return np.where(self.gated, np.quantile(self.conf["train"], 1 - q, axis=1), -np.inf)

    def tried(self, split: str, tau):
        """[exits, n] whether each input runs each exit's head."""
        return self.conf[split] >= tau[:, None]

    def sample_costs(self, chain, tried, q: float):
        """[k + 1, n] FLOPs of each input answered at each chain position (last: the backbone): the backbone up to
        the exit, and at every exit passed the default head (if gated and ``q`` < 1) plus the exit's head if run."""
        import numpy as np

        from autoexit.subset import path_costs

        c, chain = self.costs, list(chain)
        pre = np.where(self.gated[chain] & (q < 1), self.c_try[chain], 0.0)
        return path_costs(pre[:, None] + c.c1[chain][:, None] * tried[chain], c.before[chain], c.base)


def _masked(scores, tried, chain):
    """Scores with -inf where the exit's head was not run (such an input cannot leave there)."""
    import numpy as np

    return np.where(tried[list(chain)], scores, -np.inf)


def fit_two_stage(ts: TwoStage, tables: dict, policy: str, risk: str, tol: float, q: float, delta: float = 0.1):
    """One two-stage policy at try share ``q``: exit set (``select_chain``) and threshold family (``greedy_path``
    with per-input costs) on the fit split (out-of-fold), as ``RiskControlledPolicy.fit`` does with plain exits.
    Returns (chain, rules, family, fit FLOPs at the target risk)."""
    import numpy as np

    from autoexit.policies import make_policy
    from autoexit.policies.cascade import chain_scores, greedy_path, loss_matrix, select_chain, target_risk

    fit = tables["train"]
    pol = make_policy(policy, **({"history": 0} if policy == "gate" else {}))
    alpha, n = tol / 100, fit.n
    r_star = target_risk(alpha, tables["val"].n, delta, risk)
    tau = ts.thresholds(q)
    tried = ts.tried("train", tau)
    solo: dict = {}

    def scores(chain, rules):
        for r, e in zip(rules, chain):
            if e not in solo:
                solo[e] = chain_scores([r], [e], fit)[0]
        return _masked(np.stack([solo[e] for e in chain]), tried, chain)

    def evaluate(chain):
        if not chain:
            return ts.costs.base
        path = greedy_path(scores(chain, pol.rules_for(chain, fit, final=False)), loss_matrix(fit, chain, risk),
                           ts.sample_costs(chain, tried, q), chunk=max(1, n // 100), max_risk=2 * r_star + 1e-9)
        return path.flops_at(r_star)

    chain, fit_flops, _ = select_chain(list(range(len(fit.names))), evaluate)
    rules = pol.rules_for(chain, fit, final=True)
    solo.clear()
    path = greedy_path(_masked(chain_scores(rules, chain, fit), tried, chain), loss_matrix(fit, chain, risk),
                       ts.sample_costs(chain, tried, q), chunk=max(1, n // 400), max_risk=max(4 * alpha, alpha + 0.02))
    return chain, rules, path.thresholds, fit_flops


def _deploy(ts: TwoStage, chain, family, scores_cal, cal, tried_cal, q: float, risk: str, tol: float,
            delta: float = 0.1):
    """Learn-then-Test over ``family`` on calibration rows, then the certified row cheapest on them once the heads
    it never uses are left out (``finalise``'s rule, per-input costs). Returns (kept positions, thresholds,
    certified)."""
    import numpy as np

    from autoexit.policies import _kept_positions
    from autoexit.policies.cascade import certify, loss_matrix

    res, exit_of = certify(scores_cal, loss_matrix(cal, chain, risk), family, tol / 100, delta, risk)
    best, cols, costs = None, np.arange(cal.n), {}
    for r in range(res.index + 1) if res.index >= 0 else range(1):
        keep = _kept_positions(family[r], False)
        where = np.full(len(chain) + 1, len(keep), dtype=np.int64)
        where[keep] = np.arange(len(keep))
        if tuple(keep) not in costs:  # the kept heads change only a few times along the family
            costs[tuple(keep)] = ts.sample_costs([chain[j] for j in keep], tried_cal, q)
        f = float(costs[tuple(keep)][where[exit_of[r]], cols].mean())
        if best is None or f < best[0] - 1e-9 * ts.costs.base:
            best = (f, keep, family[r][keep])
    if best[0] >= ts.costs.base:
        return [], np.zeros(0), res.index >= 0
    return best[1], np.asarray(best[2], dtype=float), res.index >= 0


def _outcome(ts: TwoStage, chain, thr, scores, table, tried, q: float) -> dict:
    """Saving, disagreement and drop of deployed two-stage exits on ``table`` (``scores`` masked, kept chain)."""
    import numpy as np

    from autoexit.policies import evaluate_thresholds
    from autoexit.policies.cascade import simulate

    ch = list(chain)
    m = evaluate_thresholds(ch, scores, thr, table, ts.costs, ts.sample_costs(ch, tried, q))
    pos = simulate(scores, thr) if ch else np.zeros(table.n, dtype=np.int64)
    reached = (pos[None, :] >= np.arange(len(ch))[:, None]) & ts.gated[ch][:, None]  # skip exits each input reaches
    return {**m, "skip heads run": float((reached & tried[ch]).sum(0).mean()) if ch else 0.0,
            "skip heads reached": float(reached.sum(0).mean()) if ch else 0.0}


def _certified_outcome(ts: TwoStage, chain, family, scores, pool, tried, q: float, risk: str, tol: float, cal, test):
    """Certify ``family`` on the rows ``cal`` of ``pool`` (``scores`` masked and ``tried`` for all its rows), then
    the deployed exits' outcome on its rows ``test``. Returns (kept exits, certified, outcome)."""
    keep, thr, ok = _deploy(ts, chain, family, scores[:, cal], pool.subset_rows(cal), tried[:, cal], q, risk, tol)
    return len(keep), ok, _outcome(ts, [chain[j] for j in keep], thr, scores[keep][:, test], pool.subset_rows(test),
                                   tried[:, test], q)


def two_stage_rows(label: str, ts: TwoStage, tables: dict, depth: int, resplits: int, log) -> tuple[list, dict]:
    """Every two-stage policy at every tolerance, its try share chosen on the fit split among ``TRY_SHARES``
    (lowest fit FLOPs at the target risk), certified on val, tested on test and over ``resplits`` re-splits of
    val + test (same seed and draws as ``policy_rows``)."""
    import numpy as np

    from autoexit.policies.cascade import chain_scores
    from bench.policies import _pool

    pool = _pool(tables["val"], tables["test"])  # val rows first, then test
    rng = np.random.default_rng(12345)
    splits = [rng.permutation(pool.n) for _ in range(resplits)]
    n_val = tables["val"].n
    val, test = np.arange(n_val), np.arange(n_val, pool.n)
    rows, chosen = [], {}
    for tol in TOLERANCES:
        for name, policy, risk in TWO_STAGE_POLICIES:
            fits = {q: fit_two_stage(ts, tables, policy, risk, tol, q) for q in TRY_SHARES}
            q = min(fits, key=lambda k: (fits[k][3], -k))
            chain, rules, family, _ = fits[q]
            tau = ts.thresholds(q)
            tried = np.concatenate([ts.tried("val", tau), ts.tried("test", tau)], 1)
            s_pool = _masked(chain_scores(rules, chain, pool), tried, chain)
            args = (ts, chain, family, s_pool, pool, tried, q, risk, tol)
            n_kept, ok, m = _certified_outcome(*args, val, test)
            sav, drops, viol_drop, viol_dis = [], [], 0, 0
            for perm in splits:
                _, _, r = _certified_outcome(*args, perm[:n_val], perm[n_val:])
                sav.append(r["saving"])
                drops.append(r["drop"])
                viol_drop += r["drop"] > tol / 100
                viol_dis += r["disagreement"] > tol / 100
            rows.append({"model": f"resnet{depth}", "variant": label, "T %": tol, "policy": name,
                         "exits": n_kept, "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                         "certified": ok, "viol(drop)": viol_drop / len(splits),
                         "viol(disagree)": viol_dis / len(splits),
                         "resplit saving %": 100 * float(np.mean(sav)),
                         "resplit drop % (p90)": 100 * float(np.quantile(drops, 0.9)),
                         "try share": q, "skip heads run per input (test)": m["skip heads run"],
                         "skip heads reached per input (test)": m["skip heads reached"]})
            chosen[f"{tol:g}|{name}"] = q
            log(f"two-stage resnet{depth} T={tol:g} {name}: try share {q:g}, saved {100 * m['saving']:.1f} % "
                f"(re-splits {100 * np.mean(sav):.1f} %), drop {100 * m['drop']:.2f}")
    return rows, chosen


def subset_logits(depth: int, rec, heads: dict, size: int, log) -> dict:
    """Default heads (same spec, schedule and seed as the baseline) trained on ``size`` random train images,
    cached: their logits on those images (``train``, with ``index`` into the train split), on val and on test."""
    import torch

    from autoexit.distill import _predict, train_head
    from autoexit.heads import build_head

    names = [p.name for p in rec.points]
    path = _cache(depth, f"subset{size}", f"{rec.path}|{_specs(heads)}")
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    n = len(rec.logits("train"))
    if size >= n:
        raise SystemExit(f"--train-sizes: {size} is not fewer than the {n} train images; give smaller sizes")
    cfg = val_selected_training()
    idx = torch.randperm(len(rec.logits("train")), generator=torch.Generator().manual_seed(size))[:size]
    t_train, t_val = rec.logits("train")[idx], rec.logits("val")
    out = {"index": idx, "train": [], "val": [], "test": []}
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for name in tqdm(names, desc=f"heads on {size} images", unit="head"):
        h = heads[name]
        torch.manual_seed(cfg.seed)
        mod = build_head(h.spec, h.point.shape, rec.num_classes)
        mod, _ = train_head(mod, rec.activations(name, "train")[idx], t_train, rec.activations(name, "val"), t_val,
                            cfg, desc=f"{name} on {size}")
        out["train"].append(_predict(mod, rec.activations(name, "train")[idx]).float())
        for split in ("val", "test"):
            out[split].append(_predict(mod, rec.activations(name, split)).float())
    out = {k: (v if k == "index" else torch.stack(v)) for k, v in out.items()}
    out["seconds"] = time.perf_counter() - t0
    _save(path, out)
    log(f"heads on {size} train images: {len(names)} heads in {out['seconds']:.0f} s")
    return out


def _cheap_head():
    from autoexit.heads import cheap_head_spec

    return cheap_head_spec((1, 2, 2), 10)  # the core's cheap preset for images (the same spec at every CIFAR point)


CHEAP_HEAD = _cheap_head()  # SDN's head (bench/head_ablation.py): 2x2 average pool + one linear layer


def cheap_heads(rec, log) -> dict:
    """Heads of ``CHEAP_HEAD``'s design at every point, trained label-free with the default heads' schedule
    (``val_selected_training()``, as this benchmark's default heads), cached per head."""
    from autoexit.data import default_cache_dir
    from autoexit.search.pipeline import train_heads_cached

    t0 = time.perf_counter()
    out = train_heads_cached(rec, {p.name: CHEAP_HEAD for p in rec.points}, val_selected_training(),
                             cache_dir=default_cache_dir() / "heads", progress=False)
    log(f"cheap heads: {len(out)} in {time.perf_counter() - t0:.0f} s")
    return out


def trained_tables(rec, trained: dict, data: dict) -> tuple[dict, dict]:
    """Per split, the ExitPredictions and ExitTables (temperatures fitted on val) of ``trained`` heads (a lever's
    ``TrainedHead`` dict) on the recording; activation statistics from ``data`` (``bench.policies.split_data``)."""
    from autoexit.calibrate import calibrate_temperatures
    from autoexit.pipeline import predictions_for
    from autoexit.policies import ExitTable

    preds = {s: predictions_for(rec, trained, s) for s in ("train", "val", "test")}
    temps = calibrate_temperatures(preds["val"])
    return preds, {s: ExitTable.from_predictions(p, temps, data[s][1]) for s, p in preds.items()}


def subset_tables(rec, data: dict, sub: dict) -> tuple[dict, dict]:
    """Per split, the ExitPredictions and ExitTables (temperatures fitted on val) of heads trained on a train
    subset (``subset_logits``): train rows are the subset's, val and test whole; activation statistics from
    ``data`` (``bench.policies.split_data``)."""
    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.policies import ExitTable

    names = [p.name for p in rec.points]
    ix = sub["index"]
    preds = {"train": ExitPredictions(names, sub["train"], rec.logits("train")[ix], rec.labels("train")[ix]),
             **{s: ExitPredictions(names, sub[s], rec.logits(s), rec.labels(s)) for s in ("val", "test")}}
    temps = calibrate_temperatures(preds["val"])
    tables = {s: ExitTable.from_predictions(p, temps, [st[ix] for st in data[s][1]] if s == "train" else data[s][1])
              for s, p in preds.items()}
    return preds, tables


def cross_fitted_table(depth: int, rec, heads: dict, data: dict, temps, folds: int, log, train=None, backbone=None):
    """The out-of-fold logits of the train split (:func:`out_of_fold`) and their ExitTable (temperatures
    ``temps``, activation statistics from ``data``): what a cross-fitted policy is fitted on."""
    from autoexit.calibrate import ExitPredictions
    from autoexit.policies import ExitTable

    oof = out_of_fold(depth, rec, heads, folds, log, train, backbone)
    tr = data["train"][0]
    return oof, ExitTable.from_predictions(ExitPredictions(tr.names, oof, tr.backbone_logits, tr.labels), temps,
                                           data["train"][1])


def mixup_cross_fitted_tables(depth: int, tb, rec, heads: dict, data: dict, epochs: int, folds: int, log):
    """The ``mixup-cross-fitted`` lever's inputs: the ``epochs``-epoch mixup heads' ExitPredictions and ExitTables
    per split (:func:`trained_tables`), and the out-of-fold logits of the train split from fold heads trained by
    mixup too, with their ExitTable (what ``EnableConfig(cross_fit=folds, train=TrainConfig(teacher="mixup"))``
    fits on). Returns (preds, tables, oof logits, oof table)."""
    from autoexit.calibrate import calibrate_temperatures

    mx = augmented_heads(depth, tb, rec, heads, epochs, log, mixup=True)
    preds, tables = trained_tables(rec, mx, data)
    fold_cfg = val_selected_training(teacher="mixup", epochs=epochs, patience=0)
    oof, oof_table = cross_fitted_table(depth, rec, mx, data, calibrate_temperatures(preds["val"]), folds, log,
                                        fold_cfg, tb)
    return preds, tables, oof, oof_table


def out_of_fold(depth: int, rec, heads: dict, folds: int, log, train=None, backbone=None):
    """[exits, n_train, classes] logits of the train split, each from heads trained on the other folds
    (``autoexit.distill.out_of_fold_logits``, what ``EnableConfig(cross_fit=folds)`` fits on), cached.
    ``train``: the fold heads' TrainConfig (default: ``bench.common.val_selected_training()``, what the tables were measured with); an on-the-fly teacher needs ``backbone``."""
    import json

    import torch

    from autoexit.distill import out_of_fold_logits

    train = train or val_selected_training()
    default = train == val_selected_training()  # keeps the cache key it had before ``train`` existed
    path = _cache(depth, f"oof{folds}" if default else f"oof{folds}-{train.teacher}{train.epochs}",
                  f"{rec.path}|{_specs(heads)}" + ("" if default else json.dumps(train.to_dict(), sort_keys=True)))
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    t0 = time.perf_counter()
    oof = out_of_fold_logits(rec, heads, train, folds, progress=True, backbone=backbone)
    log(f"out-of-fold heads: {oof.shape[0]} exits x {folds} folds in {time.perf_counter() - t0:.0f} s")
    _save(path, oof)
    return oof


def policy_rows(label: str, fit_table, tables: dict, costs, depth: int, resplits: int) -> list[dict]:
    """Every policy at every tolerance: test saving and drop, and the budget-violation rate over
    ``resplits`` random re-splits of val + test (``bench.policies.resplit_violations``, same seed and draws
    as ``bench/policies.py``)."""
    import numpy as np

    from autoexit.policies import PolicyContext, make_policy
    from bench.policies import _pool, resplit_violations

    pool = _pool(tables["val"], tables["test"])
    rng = np.random.default_rng(12345)
    splits = [rng.permutation(pool.n) for _ in range(resplits)]
    rows = []
    for tol in TOLERANCES:
        for name, policy, risk in POLICIES:
            fp = make_policy(policy).fit(PolicyContext(fit_table, tables["val"], costs, tol, 0.1, risk))
            m = fp.evaluate(tables["test"], costs)
            rows.append({"model": f"resnet{depth}", "variant": label, "T %": tol, "policy": name,
                         "exits": len(fp.chain), "saving %": 100 * m["saving"], "drop %": 100 * m["drop"],
                         "certified": bool(fp.guarantee is not None and fp.guarantee.certified),
                         **resplit_violations(fp, policy, pool, splits, tables["val"].n, costs, tol)})
    return rows


def run_depth(depth: int, folds: int, epochs: int, log, levers=("augmented", "cross-fitted"),
              resplits: int = 100, joint: tuple = (12, 2e-4, 4.0), sizes: tuple = (1250, 2500),
              feature_weight: float = FEATURE_WEIGHT, mixup_epochs: int = MIXUP_EPOCHS, skip_lr: float = SKIP_LR,
              ensemble_seeds: tuple = (1,)) -> dict:
    from autoexit.calibrate import ExitPredictions, calibrate_temperatures
    from autoexit.pipeline import flops_costs, predictions_for
    from autoexit.policies import ExitTable
    from bench.policies import oracle_saving, setup, split_data

    t0 = time.perf_counter()
    cfg, tb, points, rec, heads = setup(depth, train=val_selected_training())
    data = split_data(rec, heads)
    names = [p.name for p in rec.points]
    costs = flops_costs(heads, names, float(tb.total_flops))
    temps = calibrate_temperatures(data["val"][0])
    tables = {s: ExitTable.from_predictions(p, temps, st) for s, (p, st) in data.items()}
    rows = policy_rows("baseline (default heads, fitted in-sample)", tables["train"], tables, costs, depth, resplits)
    agree = {"baseline": [round(float(heads[n].val_agreement), 4) for n in names]}
    secs = {}
    extra: dict = {}
    base_oracle = oracle_saving(data["test"][0].agree().numpy(), costs)  # the default heads' test oracle, every lever's reference

    if "augmented" in levers:
        t1 = time.perf_counter()
        aug = augmented_heads(depth, tb, rec, heads, epochs, log)
        secs["augmented"] = time.perf_counter() - t1
        agree["augmented"] = [round(float(aug[n].val_agreement), 4) for n in names]
        atables = trained_tables(rec, aug, data)[1]
        rows += policy_rows("augmented distillation", atables["train"], atables, costs, depth, resplits)

    if "mixup" in levers:
        t1 = time.perf_counter()
        mx = augmented_heads(depth, tb, rec, heads, mixup_epochs, log, mixup=True)
        mkey = mixup_key(mixup_epochs)
        secs[mkey] = time.perf_counter() - t1
        akey = "mixup function matching" + ("" if mkey == "mixup" else f" ({mixup_epochs} epochs)")
        agree[akey] = [round(float(mx[n].val_agreement), 4) for n in names]
        preds, mtables = trained_tables(rec, mx, data)
        rows += policy_rows(f"mixup function matching (augmented + mixup, {mixup_epochs} epochs)", mtables["train"],
                            mtables, costs, depth, resplits)
        extra[mkey] = {"epochs": mixup_epochs,
                          "oracle saving test (default heads)": base_oracle,
                          "oracle saving test (mixup)": oracle_saving(preds["test"].agree().numpy(), costs)}

    if "mixup-cross-fitted" in levers:  # what EnableConfig(cross_fit=folds, train=TrainConfig(teacher="mixup")) runs
        t1 = time.perf_counter()
        mpreds, mtables, moof, moof_table = mixup_cross_fitted_tables(depth, tb, rec, heads, data, mixup_epochs, folds,
                                                                      log)
        secs["mixup-cross-fitted"] = time.perf_counter() - t1
        agree["mixup out-of-fold (train)"] = [
            round(float(v), 4) for v in (moof.argmax(2) == mpreds["train"].backbone_logits.argmax(1)[None]).float().mean(1)]
        agree["mixup in-sample (train)"] = [round(float(v), 4) for v in mpreds["train"].agree().float().mean(1)]
        rows += policy_rows(f"mixup heads cross-fitted ({mixup_epochs} epochs, {folds} folds)", moof_table, mtables,
                            costs, depth, resplits)

    if "feature" in levers:
        t1 = time.perf_counter()
        fh = feature_heads(depth, rec, heads, feature_weight, log)
        secs["feature"] = time.perf_counter() - t1
        agree["feature distillation"] = [round(float(fh[n].val_agreement), 4) for n in names]
        preds, ftables = trained_tables(rec, fh, data)
        fcosts = flops_costs(fh, names, float(tb.total_flops))
        rows += policy_rows(f"feature distillation (penultimate features, weight {feature_weight:g})",
                            ftables["train"], ftables, fcosts, depth, resplits)
        extra["feature"] = {"weight": feature_weight,
                            "oracle saving test (default heads)": base_oracle,
                            "oracle saving test (feature)": oracle_saving(preds["test"].agree().numpy(), fcosts)}

    if "ensemble" in levers:
        t1 = time.perf_counter()
        eh, members = ensemble_heads(rec, heads, tuple(ensemble_seeds), log)
        secs["ensemble"] = time.perf_counter() - t1
        same, shared = shared_errors(data["val"][0].logits, predictions_for(rec, members[0], "val").logits,
                                     rec.logits("val"))
        preds, etables = trained_tables(rec, eh, data)
        k = 1 + len(ensemble_seeds)
        agree[f"ensemble ({k} heads per exit)"] = [round(float(v), 4) for v in preds["val"].agree().float().mean(1)]
        ecosts = flops_costs(eh, names, float(tb.total_flops))
        seeds = [str(x) for x in (0, *ensemble_seeds)]
        rows += policy_rows(f"ensemble ({k} default heads per exit, seeds {', '.join(seeds[:-1])} and {seeds[-1]}, "
                            "log-probabilities averaged)", etables["train"], etables, ecosts, depth, resplits)
        extra["ensemble"] = {"members": k, "seeds": [0, *ensemble_seeds],
                             "same answer val (seeds 0, 1)": same, "shared errors val (seeds 0, 1)": shared,
                             "oracle saving test (default heads)": base_oracle,
                             "oracle saving test (ensemble)": oracle_saving(preds["test"].agree().numpy(), ecosts)}

    if "cheap" in levers:
        t1 = time.perf_counter()
        ch = cheap_heads(rec, log)
        secs["cheap"] = time.perf_counter() - t1
        agree["cheap heads"] = [round(float(ch[n].val_agreement), 4) for n in names]
        preds, ctables = trained_tables(rec, ch, data)
        ccosts = flops_costs(ch, names, float(tb.total_flops))
        rows += policy_rows("cheap heads (2x2 average pool + FC, label-free, default schedule)", ctables["train"],
                            ctables, ccosts, depth, resplits)
        extra["cheap"] = {"spec": CHEAP_HEAD.to_dict(), "head flops": {n: int(ch[n].flops) for n in names},
                          "default head flops": {n: int(heads[n].flops) for n in names},
                          "backbone flops": float(tb.total_flops),
                          "oracle saving test (default heads)": base_oracle,
                          "oracle saving test (cheap)": oracle_saving(preds["test"].agree().numpy(), ccosts)}

    if "skip" in levers or "two-stage" in levers:
        t1 = time.perf_counter()
        sk, sk_oof, preds, stables, scosts = skip_tables(depth, tb, rec, heads, data, skip_lr, folds, log)
        skip_s = time.perf_counter() - t1
    if "skip" in levers:
        secs["skip"] = skip_s
        agree["skip heads"] = [round(float(sk[n].val_agreement), 4) for n in names]
        fit = stables["train"]
        agree["skip heads out-of-fold (train)"] = [round(float((z.argmax(1) == fit.backbone_logits.argmax(1))
                                                               .float().mean()), 4) for z in fit.z]
        rows += policy_rows(f"skip heads (backbone's stage-entry blocks + its linear layer, fine-tuned; "
                            f"fitted out-of-fold, {folds} folds)", stables["train"], stables, scosts, depth, resplits)
        val_logits = {"default": data["val"][0].logits, "skip": preds["val"].logits}
        extra["skip"] = {"lr": skip_lr, "exits": list(sk_oof), "head flops": {n: int(sk[n].flops) for n in names},
                         "backbone flops": float(tb.total_flops),
                         **{f"confident share val ({k})": [round(confident_share(lg[j], rec.logits("val")), 4)
                                                           for j in range(len(names))]
                            for k, lg in val_logits.items()},
                         "oracle saving test (default heads)": base_oracle,
                         "oracle saving test (skip)": oracle_saving(preds["test"].agree().numpy(), scosts)}

    if "two-stage" in levers:
        t1 = time.perf_counter()
        base_oof = out_of_fold(depth, rec, heads, folds, log)
        conf = {"train": base_oof.softmax(2).amax(2).numpy(),
                **{s: data[s][0].logits.float().softmax(2).amax(2).numpy() for s in ("val", "test")}}
        ts = TwoStage(conf, [n in sk_oof for n in names], [heads[n].flops for n in names], scosts)
        trows, shares = two_stage_rows(f"two-stage exits (skip head run only where the default head is confident; "
                                       f"fitted out-of-fold, {folds} folds)", ts, stables, depth, resplits, log)
        rows += trows
        secs["two-stage"] = skip_s + time.perf_counter() - t1
        extra["two-stage"] = {"try shares": list(TRY_SHARES), "chosen try share": shares, "exits": list(sk_oof),
                              "try recall val": {f"{q:g}": [round(try_recall(preds["val"].logits[j],
                                                                            data["val"][0].logits[j],
                                                                            rec.logits("val"), q), 4)
                                                            for j, n in enumerate(names) if n in sk_oof]
                                                 for q in TRY_SHARES if q < 1},
                              "oracle saving test (default heads)": base_oracle}

    if "cross-fitted" in levers:
        t1 = time.perf_counter()
        oof, oof_table = cross_fitted_table(depth, rec, heads, data, temps, folds, log)
        secs["cross-fitted"] = time.perf_counter() - t1
        tr = data["train"][0]
        agree["out-of-fold (train)"] = [round(float(v), 4) for v in
                                        (oof.argmax(2) == tr.backbone_logits.argmax(1)[None]).float().mean(1)]
        agree["in-sample (train)"] = [round(float(v), 4) for v in tr.agree().float().mean(1)]
        rows += policy_rows(f"cross-fitted ({folds} folds)", oof_table, tables, costs, depth, resplits)

    def oracle(logits, split: str) -> float:
        """Test/val oracle saving of heads' ``logits`` [exits, n, classes] against the original backbone."""
        return oracle_saving((logits.argmax(2) == rec.logits(split).argmax(1)[None]).numpy(), costs)

    if "joint" in levers:
        t1 = time.perf_counter()
        jt = joint_finetune(depth, tb, rec, heads, joint[0], joint[1], joint[2], log)
        secs["joint"] = time.perf_counter() - t1
        orig = {s: rec.logits(s).argmax(1) for s in ("val", "test")}
        agree["joint fine-tune"] = [round(float(v), 4) for v in
                                    (jt["val"]["heads"].argmax(2) == orig["val"][None]).float().mean(1)]

        def acc(lg, s):
            return float((lg.argmax(1) == rec.labels(s)).float().mean())

        extra["joint"] = {
            "epochs": joint[0], "lr": joint[1], "final_weight": joint[2],
            **{f"final agreement {s}": float((jt[s]["final"].argmax(1) == orig[s]).float().mean())
               for s in ("val", "test")},
            **{f"final accuracy {s}": acc(jt[s]["final"], s) for s in ("val", "test")},
            **{f"backbone accuracy {s}": acc(rec.logits(s), s) for s in ("val", "test")},
            "oracle saving test (original heads)": base_oracle,
            "oracle saving test (joint)": oracle(jt["test"]["heads"], "test")}
        preds = {s: ExitPredictions(names, jt[s]["heads"], jt[s]["final"], rec.labels(s))
                 for s in ("train", "val", "test")}
        jtemps = calibrate_temperatures(preds["val"])
        jtables = {s: ExitTable.from_predictions(p, jtemps, list(jt[s]["stats"])) for s, p in preds.items()}
        rows += policy_rows("joint fine-tune (reference: its own final answer)", jtables["train"], jtables, costs,
                            depth, resplits)
        log("joint: " + ", ".join(f"{k} {v:.4f}" for k, v in extra["joint"].items() if isinstance(v, float)))
    if "train-size" in levers:
        curve = [{"train images": data["train"][0].logits.shape[1],
                  "mean val agreement": float(data["val"][0].agree().float().mean()),
                  "oracle saving test": base_oracle}]
        for size in sizes:
            t1 = time.perf_counter()
            sub = subset_logits(depth, rec, heads, size, log)
            secs[f"train-size {size}"] = time.perf_counter() - t1
            preds, stables = subset_tables(rec, data, sub)
            agree[f"train size {size}"] = [round(float(v), 4) for v in preds["val"].agree().float().mean(1)]
            curve.append({"train images": size, "mean val agreement": float(preds["val"].agree().float().mean()),
                          "oracle saving test": oracle(sub["test"], "test")})
            rows += policy_rows(f"train size {size} (default heads on {size} train images)", stables["train"],
                                stables, costs, depth, resplits)
        extra["train_size"] = sorted(curve, key=lambda c: c["train images"])
    log(f"resnet{depth}: done in {time.perf_counter() - t0:.0f} s")
    return {"depth": depth, "candidates": names, "val_agreement": agree, "rows": rows, "seconds": secs,
            "total_s": time.perf_counter() - t0, **extra}


def _lever_of(variant: str) -> str:
    """The lever a policy-row variant or an agreement row belongs to ("baseline" for the default heads)."""
    if variant.startswith(("mixup-cross-fitted", "mixup heads cross-fitted", "mixup out-of-fold",
                           "mixup in-sample")):
        return "mixup-cross-fitted"
    if variant.startswith(("out-of-fold", "in-sample")):
        return "cross-fitted"
    if variant.startswith("mixup"):  # each schedule is its own lever
        return mixup_key(mixup_epochs(variant))
    return next((lv for lv in LEVERS if variant.startswith(lv.split("-")[0])), "baseline")


def merge_depth(old: dict | None, new: dict) -> dict:
    """``new`` with what ``old`` (an earlier run of the same depth) has for levers ``new`` did not run:
    their policy rows, agreement, training time, extras and run record (older files have one ``run`` for
    every lever they hold)."""
    if old is None:
        return new
    redone = set(new["runs"])
    old_runs = old.get("runs") or {lv: old.get("run") for lv in
                                   {"baseline", *(_lever_of(x["variant"]) for x in old["rows"])}}
    keep = [x for x in old["rows"] if _lever_of(x["variant"]) not in redone]
    base = [x for x in new["rows"] if _lever_of(x["variant"]) == "baseline"]
    agree_keep = {k: v for k, v in old["val_agreement"].items() if _lever_of(k) not in redone}
    out = {**{k: v for k, v in old.items() if k not in ("run",)}, **new}
    out["rows"] = base + keep + [x for x in new["rows"] if _lever_of(x["variant"]) != "baseline"]
    out["val_agreement"] = {"baseline": new["val_agreement"]["baseline"],
                            **agree_keep,
                            **{k: v for k, v in new["val_agreement"].items() if k != "baseline"}}
    out["seconds"] = {**{k: v for k, v in old.get("seconds", {}).items() if _lever_of(k) not in redone},
                      **new.get("seconds", {})}
    out["runs"] = {**{k: v for k, v in old_runs.items() if k not in redone and v}, **new["runs"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20])
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--levers", nargs="+", choices=LEVERS, default=["augmented", "cross-fitted"])
    ap.add_argument("--joint-epochs", type=int, default=12)
    ap.add_argument("--joint-lr", type=float, default=2e-4, help="peak learning rate of the backbone")
    ap.add_argument("--joint-final-weight", type=float, default=4.0,
                    help="weight of the backbone output's distillation loss (each head's is 1)")
    ap.add_argument("--train-sizes", type=int, nargs="+", default=[1250, 2500],
                    help="train images for the train-size lever (fewer than the train split's)")
    ap.add_argument("--feature-weight", type=float, default=FEATURE_WEIGHT,
                    help="weight of the penultimate-feature loss of the feature lever (the logits' KL has 1)")
    ap.add_argument("--mixup-epochs", type=int, default=MIXUP_EPOCHS,
                    help="epochs of the mixup lever (function matching wants long schedules; augmented uses --epochs)")
    ap.add_argument("--skip-lr", type=float, default=SKIP_LR,
                    help="peak learning rate of the skip lever's heads (they start from the backbone's weights)")
    ap.add_argument("--ensemble-seeds", type=int, nargs="+", default=[1],
                    help="seeds of the ensemble lever's extra heads per exit (the default heads are seed 0)")
    ap.add_argument("--resplits", type=int, default=100, help="random val/test re-splits for the violation rate")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results already in the output file that this run does not redo: other depths, "
                         "and for a depth run again the levers not run again")
    args = ap.parse_args(argv)
    if args.folds < 2:
        raise SystemExit(f"--folds must be >= 2, got {args.folds}")
    if args.joint_epochs < 1 or not args.joint_lr > 0 or not args.joint_final_weight >= 0:
        raise SystemExit("--joint-epochs must be >= 1, --joint-lr > 0 and --joint-final-weight >= 0; got "
                         f"{args.joint_epochs}, {args.joint_lr}, {args.joint_final_weight}")
    require_fixtures()
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from bench.common import RESULTS

    prior = RESULTS / "head_levers.json"
    prior_results = {}
    if args.merge and prior.exists():
        import json

        prior_results = {r["depth"]: r for r in json.loads(prior.read_text()).get("results", [])}
    joint = (args.joint_epochs, args.joint_lr, args.joint_final_weight)
    if any(n < 100 for n in args.train_sizes):
        raise SystemExit(f"--train-sizes must be >= 100 images each, got {args.train_sizes}")
    if args.mixup_epochs < 1:
        raise SystemExit(f"--mixup-epochs must be >= 1, got {args.mixup_epochs}")
    if not args.skip_lr > 0:
        raise SystemExit(f"--skip-lr must be > 0, got {args.skip_lr}")
    if 0 in args.ensemble_seeds or len(set(args.ensemble_seeds)) != len(args.ensemble_seeds):
        raise SystemExit(f"--ensemble-seeds must be distinct and not 0 (the default heads' seed), got {args.ensemble_seeds}")
    if not args.feature_weight >= 0:
        raise SystemExit(f"--feature-weight must be >= 0, got {args.feature_weight}")
    results = [run_depth(d, args.folds, args.epochs, log, tuple(args.levers), args.resplits, joint,
                         tuple(args.train_sizes), args.feature_weight, args.mixup_epochs, args.skip_lr,
                         tuple(args.ensemble_seeds))
               for d in args.depths]
    env = environment()
    run = {"date": env.get("date"), "commit": env.get("commit"), "argv": list(sys.argv[1:])}
    for r in results:  # each lever says when and at which commit it ran (--merge keeps older runs)
        r["runs"] = {lever: run for lever in ("baseline", *(mixup_key(args.mixup_epochs) if lv == "mixup" else lv
                                                           for lv in args.levers))}
    results = [merge_depth(prior_results.pop(r["depth"], None), r) for r in results]
    for r in results:
        print_table([{"variant": k, **{n: v for n, v in zip(r["candidates"], a)}}
                     for k, a in r["val_agreement"].items()], title=f"resnet{r['depth']}: agreement per exit")
        print_table(r["rows"], title=f"resnet{r['depth']}: guaranteed policies, test split")
    results = sorted(list(prior_results.values()) + results, key=lambda r: r["depth"])
    write_results("head_levers", {"args": vars(args), "results": results, "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
