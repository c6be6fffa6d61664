"""Label-free training of exit heads by distillation (paper 003, 3.2.2).

Each head is trained on the recorded activations of its exit point to match
the backbone's output distribution with the KL divergence. The backbone is
frozen by construction (it is never run: training reads the cache) and each
head is trained alone, so no other head changes. When labels are given and
``supervised=True``, a cross-entropy term on the labels is added.

``TrainConfig(teacher=...)`` picks what the heads learn from:

- ``"recorded"`` (default): the recorded activations and the backbone's recorded
  answers, as above. Fast; every later step reads only the cache.
- ``"augmented"``: new inputs every epoch. Each train batch of the recorded
  *inputs* is randomly flipped and shifted (image batches ``[N, C, H, W]`` only),
  run through the frozen backbone, and every head learns the backbone's answer
  on that new input from its activation there.
- ``"mixup"``: function matching (Beyer et al., "Knowledge distillation: a good
  teacher is patient and consistent", CVPR 2022): as ``"augmented"``, with each
  batch also mixed with a shuffled copy of itself (one uniform weight per input),
  so the heads learn the backbone's function between the inputs too. Wants a long
  schedule (``epochs=120``); on the CIFAR-10 fixture it is the strongest
  label-free head training measured (``docs/policies.md``).

Both on-the-fly teachers need the backbone (``backbone=`` the ``TracedBackbone``
the recording was made with) and a recording with its inputs stored; they never
read labels, and they train all requested heads together, one backbone pass
per batch. A head's weights do not depend on which other heads were trained
with it (each head's loss and optimiser state are its own).

``TrainConfig(select=...)`` says which epoch's weights a head keeps:

- ``"last"`` (default): the final epoch's (the one-cycle schedule ends at a learning
  rate near zero). Training never reads the val split, so the heads do not depend
  on the calibration data the exit policies' guarantee rests on
  (``docs/policies.md``). The history still records each epoch's val KL and
  agreement, for the report; they choose nothing.
- ``"val"``: the epoch with the lowest KL to the backbone on val, and training stops
  after ``patience`` epochs without a better one (how heads were trained before;
  the guarantee then also rests on that choice).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cost import count_flops, count_params, param_bytes
from .data import Recording
from .errors import AutoExitError, DataError
from .heads import HeadSpec, build_head, default_head_spec
from .points import ExitPoint

__all__ = ["TEACHERS", "TrainConfig", "TrainedHead", "train_head", "train_heads", "train_heads_matching",
           "kd_loss", "agreement", "train_cascade_heads", "CascadeInputs", "build_cascade_head", "out_of_fold_logits",
           "augment_batch", "mix_batch", "matching_batches"]

TEACHERS = ("recorded", "augmented", "mixup")
SELECTS = ("last", "val")


@dataclass(frozen=True)
class TrainConfig:
    """How heads are trained.

    ``select``: ``"last"`` (default) keeps each head's final epoch and never reads val; ``"val"`` keeps its
    best val-KL epoch, and ``patience`` epochs without a better one stop training early (0: never; only with
    ``select="val"``). See the module doc.

    ``teacher``: ``"recorded"``, ``"augmented"`` or ``"mixup"`` (see the module doc); the last two run the
    backbone on new inputs and need ``backbone=`` where heads are trained. ``shift``: the largest random shift in
    pixels of the on-the-fly teachers' image augmentation (0: flips only).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    kd_temperature: float = 1.0
    patience: int = 0
    seed: int = 0
    supervised: bool = False
    ce_weight: float = 0.5
    threads: int | None = None
    teacher: str = "recorded"
    shift: int = 4
    select: str = "last"

    def __post_init__(self):
        if self.epochs < 1:
            raise AutoExitError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise AutoExitError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise AutoExitError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not self.kd_temperature > 0:
            raise AutoExitError(f"TrainConfig.kd_temperature must be > 0, got {self.kd_temperature}")
        if self.teacher not in TEACHERS:
            raise AutoExitError(f"TrainConfig.teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.teacher != "recorded" and self.supervised:
            raise AutoExitError(f"teacher {self.teacher!r} is label-free (the backbone answers every new input); "
                                "use supervised=False, or teacher='recorded' to add a label loss")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise AutoExitError(f"TrainConfig.shift must be an integer >= 0 (pixels), got {self.shift!r}")
        if self.select not in SELECTS:
            raise AutoExitError(f"TrainConfig.select must be 'last' (keep the final epoch) or 'val' (the best "
                                f"val-KL epoch), got {self.select!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise AutoExitError(f"TrainConfig.patience must be an integer >= 0 (epochs), got {self.patience!r}")
        if self.patience and self.select != "val":
            raise AutoExitError(f"TrainConfig.patience={self.patience} stops training on the val KL; it needs "
                                "select='val' (the heads then depend on the calibration split), or patience=0")

    @property
    def on_the_fly(self) -> bool:
        """Whether the heads learn from the backbone run on new inputs (``teacher`` is not ``"recorded"``)."""
        return self.teacher != "recorded"

    @property
    def keeps_best(self) -> bool:
        """Whether a head keeps its best val-KL epoch (``select="val"``) rather than its last."""
        return self.select == "val"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.teacher == "recorded":  # the on-the-fly fields are left out at their defaults, so the keys of
            del d["teacher"], d["shift"]  # caches made before they existed stay valid
        if self.select == "val":  # likewise: select='val', patience=8 is the key of the heads made before
            del d["select"]  # 'select' existed (when that was how every head was trained)
        return d


@dataclass
class TrainedHead:
    """A trained head with its spec, the point it reads and its cost."""

    point: ExitPoint
    spec: HeadSpec
    module: nn.Module
    flops: int
    params: int
    param_bytes: int
    val_agreement: float
    val_kl: float
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "point": self.point.name,
            "spec": self.spec.to_dict(),
            "flops": self.flops,
            "params": self.params,
            "val_agreement": self.val_agreement,
            "val_kl": self.val_kl,
            "epochs": self.epochs,
            "seconds": self.seconds,
        }


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


@torch.no_grad()
def _predict(head: nn.Module, x: torch.Tensor, batch: int = 1024,
             prev: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    head.eval()
    if not len(x):
        return x.new_zeros(0)
    if prev is None:
        return torch.cat([head(x[i : i + batch]) for i in range(0, len(x), batch)])
    return torch.cat([head(x[i : i + batch], [p[i : i + batch] for p in prev]) for i in range(0, len(x), batch)])


def train_head(
    head: nn.Module,
    x_train: torch.Tensor,
    t_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    t_val: torch.Tensor | None = None,
    config: TrainConfig = TrainConfig(),
    y_train: torch.Tensor | None = None,
    desc: str = "head",
    progress: bool = False,
    prev_train: Sequence[torch.Tensor] | None = None,
    prev_val: Sequence[torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train ``head`` to match teacher logits ``t_train`` from activations ``x_train``.

    Returns the head with the weights of its final epoch (``config.select="last"``; val is then only
    recorded in the history) or of its best val-KL epoch (``"val"``), and the per-epoch history.
    With ``prev_train`` / ``prev_val`` (earlier exits' logits), the head is called as
    ``head(x, prev)`` (a cascade head).
    """
    if len(x_train) == 0:
        raise DataError(f"{desc}: no training samples")
    if config.supervised and y_train is None:
        raise DataError(f"{desc}: supervised training needs labels; give labelled data or supervised=False")
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        g = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x_train) / config.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
        )
        # the best val-KL epoch is tracked only with select="val" and a val split; otherwise the last one is kept
        keep_best = config.keeps_best and x_val is not None and t_val is not None and len(x_val) > 0
        best_state, best_kl, bad = (copy.deepcopy(head.state_dict()) if keep_best else None), math.inf, 0
        history: list[dict] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.epochs, desc=f"training {desc}", unit="epoch", leave=False)
        for epoch in range(config.epochs):
            head.train()
            perm = torch.randperm(len(x_train), generator=g)
            total = 0.0
            for i in range(0, len(perm), config.batch_size):
                idx = perm[i : i + config.batch_size]
                if len(idx) < 2 and len(perm) > 1:
                    continue  # a batch of one breaks batch norm
                out = head(x_train[idx]) if prev_train is None else head(x_train[idx], [p[idx] for p in prev_train])
                loss = kd_loss(out, t_train[idx], config.kd_temperature)
                if config.supervised and y_train is not None:
                    loss = (1 - config.ce_weight) * loss + config.ce_weight * F.cross_entropy(out, y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            rec = {"epoch": epoch + 1, "train_loss": total / len(perm)}
            if x_val is not None and t_val is not None and len(x_val):  # recorded; chooses only with keep_best
                pv = _predict(head, x_val, prev=prev_val)
                kl = float(kd_loss(pv, t_val, 1.0))
                rec.update(val_kl=kl, val_agreement=agreement(pv, t_val))
                if keep_best and kl < best_kl - 1e-6:
                    best_kl, bad = kl, 0
                    best_state = copy.deepcopy(head.state_dict())
                elif keep_best:
                    bad += 1
            history.append(rec)
            if bar is not None:
                bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
                bar.update(1)
            if config.patience and bad >= config.patience:
                break
        if bar is not None:
            bar.close()
        if keep_best:
            head.load_state_dict(best_state)
        head.eval()
        return head, history
    finally:
        torch.set_num_threads(old_threads)


def train_heads(
    recording: Recording,
    specs: Mapping[str, HeadSpec] | None = None,
    config: TrainConfig = TrainConfig(),
    points: Sequence[str] | None = None,
    progress: bool = True,
    backbone=None,
) -> dict[str, TrainedHead]:
    """Train one head per exit point of ``recording`` (default spec where ``specs`` gives none).

    Training reads only the cached activations and backbone logits of the train
    split (and, with ``config.select="val"``, the val split's to choose the epoch). With an on-the-fly ``config.teacher``
    (``"augmented"``, ``"mixup"``) the heads are trained together on new inputs by
    :func:`train_heads_matching`, which needs ``backbone`` (the recording's ``TracedBackbone``).
    """
    if config.on_the_fly:
        return train_heads_matching(recording, backbone, specs, config, points, progress)
    specs = dict(specs or {})
    names = list(points) if points is not None else [p.name for p in recording.points]
    unknown = sorted(set(specs) - {p.name for p in recording.points})
    if unknown:
        raise AutoExitError(
            f"head specs given for unknown exit point(s) {', '.join(unknown)}; "
            f"points are: {', '.join(p.name for p in recording.points)}"
        )
    t_train, t_val = recording.logits("train"), recording.logits("val")
    y_train = recording.labels("train") if config.supervised else None
    out: dict[str, TrainedHead] = {}
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="training heads", unit="head")
    for name in it:
        p = recording.point(name)
        spec = specs.get(name) or default_head_spec(p.shape, recording.num_classes)
        torch.manual_seed(config.seed)
        head = build_head(spec, p.shape, recording.num_classes)
        x_train, x_val = recording.activations(p, "train"), recording.activations(p, "val")
        t0 = time.perf_counter()
        head, hist = train_head(head, x_train, t_train, x_val, t_val, config, y_train, desc=name)
        seconds = time.perf_counter() - t0
        pv = _predict(head, x_val)
        out[name] = TrainedHead(
            point=p,
            spec=spec,
            module=head,
            flops=count_flops(head, x_val[:1]),
            params=count_params(head),
            param_bytes=param_bytes(head),
            val_agreement=agreement(pv, t_val),
            val_kl=float(kd_loss(pv, t_val)),
            epochs=len(hist),
            seconds=seconds,
            history=hist,
        )
        del x_train, x_val
    return out


def augment_batch(x: torch.Tensor, g: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``shift`` pixels (zero padding) of an image batch
    ``[N, C, H, W]``, drawn from ``g``; any other batch comes back unchanged (nothing is drawn)."""
    if x.dim() != 4:
        return x
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift <= 0:
        return x
    h, w = x.shape[2:]
    pad = F.pad(x, (shift, shift, shift, shift))
    dx, dy = torch.randint(0, 2 * shift + 1, (2, len(x)), generator=g)
    rows = dy[:, None] + torch.arange(h)[None]
    cols = dx[:, None] + torch.arange(w)[None]
    n, c = x.shape[:2]
    return pad[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]


def mix_batch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mixup of a batch with a shuffled copy of itself, one weight per input drawn uniformly (Beta(1, 1)) from
    ``g``: new inputs between the given ones, on which the backbone is asked afresh."""
    lam = torch.rand(len(x), generator=g).reshape(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[torch.randperm(len(x), generator=g)]


def matching_batches(x: torch.Tensor, g: torch.Generator, config: TrainConfig):
    """One epoch of new inputs made from ``x`` for an on-the-fly teacher: random order, batches of
    ``config.batch_size`` (a last batch under 2 is skipped, batch norm cannot train on it), augmented, and mixed
    for ``teacher="mixup"``."""
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(perm), config.batch_size):
        idx = perm[i : i + config.batch_size]
        if len(idx) >= 2:
            a = augment_batch(x[idx], g, config.shift)
            yield mix_batch(a, g) if config.teacher == "mixup" else a


def train_heads_matching(
    recording: Recording,
    backbone,
    specs: Mapping[str, HeadSpec] | None = None,
    config: TrainConfig = TrainConfig(teacher="mixup", epochs=120),
    points: Sequence[str] | None = None,
    progress: bool = True,
    train_index: torch.Tensor | None = None,
) -> dict[str, TrainedHead]:
    """Heads trained on new inputs answered by the backbone (``config.teacher`` ``"augmented"`` or ``"mixup"``;
    see the module doc), all together: each batch of the recorded train inputs (``train_index``: a subset of
    them, positions in the train split) is augmented (and mixed), run once through the frozen ``backbone`` (the
    :class:`~autoexit.points.TracedBackbone` the recording was made with), and every head learns the backbone's
    answer from its activation (KL). Label-free. Each head keeps its final epoch's weights, or with
    ``config.select="val"`` those of its best val-KL epoch, stopping after ``config.patience`` epochs without a
    better one (0: every epoch runs), as if trained alone: a head's weights do not depend on which other heads
    were trained with it.
    """
    if not config.on_the_fly:
        raise AutoExitError("train_heads_matching trains with an on-the-fly teacher; use "
                            "TrainConfig(teacher='mixup') or 'augmented' (or train_heads for recorded activations)")
    if backbone is None or not hasattr(backbone, "split"):
        raise AutoExitError(f"teacher {config.teacher!r} runs the backbone on new inputs: pass backbone= the "
                            "TracedBackbone the recording was made with (autoexit.pipeline.prepare returns it)")
    specs = dict(specs or {})
    order = [p.name for p in recording.points]
    names = [n for n in order if n in set(points)] if points is not None else order
    unknown = sorted((set(points or ()) | set(specs)) - set(order))
    if unknown:
        raise AutoExitError(f"unknown exit point(s) {', '.join(unknown)}; points are: {', '.join(order)}")
    if not names:
        return {}
    try:
        x_train = recording.inputs("train")
    except DataError:
        raise DataError(f"teacher {config.teacher!r} makes new inputs from the recorded ones, but this recording "
                        "holds none; record with store_inputs=True") from None
    if train_index is not None:
        x_train = x_train[train_index]
    if len(x_train) < 2:
        raise DataError(f"teacher {config.teacher!r} needs at least 2 train inputs, got {len(x_train)}")
    pts = [recording.point(n) for n in names]
    spec_of = {p.name: specs.get(p.name) or default_head_spec(p.shape, recording.num_classes) for p in pts}
    at = {n: j for j, n in enumerate(names)}  # a head's position in the cut backbone's activations
    try:
        stages = [s.eval() for s in backbone.split([p.node for p in pts])]
    except AutoExitError as e:
        raise AutoExitError(f"the backbone given does not match the recording (its exit points cannot be cut): "
                            f"{e}") from None
    for s in stages:
        s.requires_grad_(False)
    mods: dict[str, nn.Module] = {}
    for p in pts:
        torch.manual_seed(config.seed)
        mods[p.name] = build_head(spec_of[p.name], p.shape, recording.num_classes)
    t_val = recording.logits("val")
    x_val = {n: recording.activations(n, "val") for n in names}
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        opt = torch.optim.AdamW([q for m in mods.values() for q in m.parameters()], lr=config.lr,
                                weight_decay=config.weight_decay)
        steps = config.epochs * math.ceil(len(x_train) / config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(config.seed)
        best = {n: (math.inf, copy.deepcopy(mods[n].state_dict()) if config.keeps_best else None) for n in names}
        history: dict[str, list[dict]] = {n: [] for n in names}
        stale = dict.fromkeys(names, 0)
        active = list(names)  # a head stops (is no longer trained) after `patience` epochs without a better val KL
        epochs = range(config.epochs)
        if progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc=f"training heads ({config.teacher})", unit="epoch")
        t0 = time.perf_counter()
        for ep in epochs:
            for n in active:
                mods[n].train()
            total, seen = dict.fromkeys(active, 0.0), 0
            for a in matching_batches(x_train, g, config):
                with torch.no_grad():
                    acts = []
                    for s in stages[:-1]:
                        a = s(a)
                        acts.append(a)
                    teacher = stages[-1](a)
                losses = [kd_loss(mods[n](acts[at[n]]), teacher, config.kd_temperature) for n in active]
                loss = sum(losses)
                opt.zero_grad(set_to_none=True)  # a stopped head has no gradient, so AdamW leaves it as it is
                loss.backward()
                opt.step()
                sched.step()
                for n, part in zip(active, losses):
                    total[n] += float(part.detach()) * len(teacher)
                seen += len(teacher)
            for n in list(active):
                pv = _predict(mods[n], x_val[n])
                kl = float(kd_loss(pv, t_val))
                history[n].append({"epoch": ep + 1, "train_loss": total[n] / max(seen, 1), "val_kl": kl,
                                   "val_agreement": agreement(pv, t_val)})
                if config.keeps_best and kl < best[n][0]:  # otherwise the final epoch is kept
                    best[n] = (kl, copy.deepcopy(mods[n].state_dict()))
                    stale[n] = 0
                elif config.keeps_best:
                    stale[n] += 1
                if config.patience and stale[n] >= config.patience:
                    active.remove(n)
            if progress:
                epochs.set_postfix(val_agreement=round(sum(h[-1]["val_agreement"] for h in history.values())
                                                       / len(names), 4), training=len(active))
            if not active:
                break
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    out: dict[str, TrainedHead] = {}
    for p in pts:
        m = mods[p.name]
        if config.keeps_best:
            m.load_state_dict(best[p.name][1])
        m.eval()
        pv = _predict(m, x_val[p.name])
        out[p.name] = TrainedHead(
            point=p, spec=spec_of[p.name], module=m,
            flops=count_flops(m, x_val[p.name][:1]), params=count_params(m), param_bytes=param_bytes(m),
            val_agreement=agreement(pv, t_val), val_kl=float(kd_loss(pv, t_val)), epochs=len(history[p.name]),
            seconds=seconds / len(pts), history=history[p.name])
    return out


def out_of_fold_logits(
    recording: Recording,
    heads: Mapping[str, TrainedHead],
    config: TrainConfig = TrainConfig(),
    folds: int = 2,
    progress: bool = False,
    backbone=None,
) -> torch.Tensor:
    """[exits, train samples, classes] logits of the train split in which every sample's logits come from a
    head that never saw it: the train split is cut into ``folds`` folds (at random, ``config.seed``) and each
    fold is predicted by a head of the same spec trained, as :func:`train_heads` trains, on the other folds.

    Policies fitted on these see the heads as new data will, not as the data they were fitted on (where a late
    head agrees several points more often). Exits follow the recording's point order; label-free. With an
    on-the-fly ``config.teacher`` the fold heads are trained so too, together, on the other folds' inputs
    (``backbone`` as for :func:`train_heads`).
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise AutoExitError(f"cross-fitting needs an integer number of folds >= 2, got {folds!r}")
    names = [p.name for p in recording.points if p.name in heads]
    t_train, t_val = recording.logits("train"), recording.logits("val")
    n = len(t_train)
    if n < 2 * folds:
        raise DataError(f"cross-fitting with {folds} folds needs at least {2 * folds} train samples, got {n}; "
                        "give more data or use fewer folds")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))
    parts = [perm[i::folds] for i in range(folds)]
    y_train = recording.labels("train") if config.supervised else None
    out = torch.zeros(len(names), n, recording.num_classes)
    if config.on_the_fly:  # the fold heads are trained together, then each exit's activations are read once
        fold_heads = [train_heads_matching(recording, backbone, {m: heads[m].spec for m in names}, config, names,
                                           progress, train_index=torch.cat([parts[k] for k in range(folds) if k != f]))
                      for f in range(folds)]
        for j, name in enumerate(names):
            x = recording.activations(name, "train")
            for f in range(folds):
                out[j, parts[f]] = _predict(fold_heads[f][name].module, x[parts[f]]).float()
            del x
        return out
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc=f"{folds}-fold heads", unit="exit")
    for j, name in enumerate(it):
        h = heads[name]
        x, x_val = recording.activations(name, "train"), recording.activations(name, "val")
        for f in range(folds):
            tr = torch.cat([parts[k] for k in range(folds) if k != f])
            torch.manual_seed(config.seed)
            mod = build_head(h.spec, h.point.shape, recording.num_classes)
            mod, _ = train_head(mod, x[tr], t_train[tr], x_val, t_val, config,
                                None if y_train is None else y_train[tr], desc=f"{name} fold {f + 1}")
            out[j, parts[f]] = _predict(mod, x[parts[f]]).float()
        del x, x_val
    return out


def predict_head(head: nn.Module, x: torch.Tensor, batch: int = 1024,
                 prev: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of ``head`` on activations ``x`` (eval mode, no grad); ``prev``: earlier exits' scaled
    logits for a cascade head."""
    return _predict(head, x, batch, prev)


class _MixOnly(nn.Module):
    """Training stand-in for a cascade head with a frozen body: ``x`` is the body's logits."""

    def __init__(self, cascade_head: nn.Module):
        super().__init__()
        self.inner = cascade_head

    def forward(self, x: torch.Tensor, prev: list[torch.Tensor]) -> torch.Tensor:
        k = self.inner.num_prev
        if k == 0:
            return x
        feats = [torch.log_softmax(p, dim=1) for p in prev[len(prev) - k :]]
        return x + self.inner.mix(torch.cat(feats, dim=1))


def build_cascade_head(spec: HeadSpec, in_shape, num_classes: int, num_prev: int) -> nn.Module:
    """An untrained cascade head (body from ``spec``) reading ``num_prev`` earlier exits."""
    from .policies.heads import CascadeHead

    return CascadeHead(build_head(spec, in_shape, num_classes), num_classes, num_prev)


def train_cascade_heads(
    recording: Recording,
    base_heads: Mapping[str, TrainedHead],
    chain: Sequence[str],
    config: TrainConfig = TrainConfig(),
    num_prev: int = 1,
    finetune: bool = False,
    progress: bool = False,
    temperature_split: str = "train",
) -> dict[str, TrainedHead]:
    """Heads for the exits of ``chain`` (in backbone order) that also read the previous ``num_prev``
    exits' temperature-scaled logits, trained in order, label-free (KL to the backbone).

    Each starts from the trained head in ``base_heads`` (its body); ``finetune=False`` trains only the
    mixing layer on the frozen body's logits (fast), ``True`` trains the whole head. The earlier
    exits' logits are scaled by temperatures fitted on ``temperature_split`` (default the train split,
    never val: the guarantee's calibration split) exactly as ``autoexit.calibrate.calibrate_temperatures``
    does, so the emitted model sees what training saw.
    """
    from .policies.heads import CascadeHead

    if num_prev < 0:
        raise AutoExitError(f"num_prev must be >= 0, got {num_prev}")
    names = list(chain)
    order = [p.name for p in recording.points]
    if any(n not in base_heads for n in names) or names != sorted(names, key=order.index):
        raise AutoExitError("the cascade chain must list trained exits in backbone order; "
                            f"got {names}, trained: {list(base_heads)}")
    t_train, t_val = recording.logits("train"), recording.logits("val")
    y_train = recording.labels("train") if config.supervised else None
    earlier = CascadeInputs(recording, temperature_split, ("train", "val"))
    out: dict[str, TrainedHead] = {}
    for j, name in enumerate(names):
        base = base_heads[name]
        k = min(j, num_prev)
        head = CascadeHead(copy.deepcopy(base.module), recording.num_classes, k)
        x_train, x_val = recording.activations(name, "train"), recording.activations(name, "val")
        p_tr, p_va = earlier.last("train", k), earlier.last("val", k)
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        if k and not finetune:
            for prm in head.body.parameters():
                prm.requires_grad_(False)
            b_train, b_val = _predict(head.body, x_train), _predict(head.body, x_val)
            _, hist = train_head(_MixOnly(head), b_train, t_train, b_val, t_val, config, y_train,
                                 desc=f"{name} (cascade)", progress=progress, prev_train=p_tr, prev_val=p_va)
            for prm in head.body.parameters():
                prm.requires_grad_(True)
        elif k:
            head, hist = train_head(head, x_train, t_train, x_val, t_val, config, y_train,
                                    desc=f"{name} (cascade)", progress=progress, prev_train=p_tr, prev_val=p_va)
        else:
            hist = list(base.history)
        head.eval()
        seconds = time.perf_counter() - t0
        lt, lv = _predict(head, x_train, prev=p_tr), _predict(head, x_val, prev=p_va)
        logits = {"train": lt, "val": lv}
        if temperature_split not in logits:
            logits[temperature_split] = _predict(head, recording.activations(name, temperature_split),
                                                 prev=earlier.last(temperature_split, k))
        earlier.push(logits)
        out[name] = TrainedHead(
            point=base.point, spec=base.spec, module=head,
            flops=base.flops + 2 * k * recording.num_classes * recording.num_classes,
            params=count_params(head), param_bytes=param_bytes(head),
            val_agreement=agreement(lv, t_val), val_kl=float(kd_loss(lv, t_val)),
            epochs=len(hist), seconds=seconds, history=hist,
        )
        del x_train, x_val
    return out


class CascadeInputs:
    """The earlier exits' temperature-scaled logits a chain of cascade heads reads, per split, built in chain
    order: each exit's temperature is fitted on ``temperature_split`` exactly as
    ``autoexit.calibrate.calibrate_temperatures`` does, and scales that exit's logits on every split. What
    :func:`train_cascade_heads` trains with and ``autoexit.pipeline`` predicts with, so both scale alike."""

    def __init__(self, recording: Recording, temperature_split: str, splits: Sequence[str]):
        self.split = temperature_split
        self._target = recording.logits(temperature_split).argmax(1)
        self._prev: dict[str, list[torch.Tensor]] = {s: [] for s in dict.fromkeys([*splits, temperature_split])}

    def last(self, split: str, k: int) -> list[torch.Tensor]:
        """The last ``k`` earlier exits' scaled logits on ``split`` (what a head with ``num_prev=k`` reads)."""
        prev = self._prev[split]
        return prev[len(prev) - k :] if k else []

    def push(self, logits: Mapping[str, torch.Tensor]) -> float:
        """Add the next exit's raw logits (split -> [n, classes], ``temperature_split`` among them); returns the
        temperature fitted on it."""
        from .calibrate import fit_temperature

        t = torch.tensor(fit_temperature(logits[self.split], self._target), dtype=torch.float32)
        for s, prev in self._prev.items():
            if s in logits:
                prev.append(logits[s].float() / t)
        return float(t)
