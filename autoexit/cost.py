"""Costs of segments: FLOPs, parameters, activation sizes, local latency.

FLOPs are *true* floating-point operations counted by
``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, and
only matmul-like ops (convolutions, linear/matmul, bmm, attention) are
counted; element-wise ops (ReLU, additions, batch norm in eval, pooling) are
not. thop and the DeepSpeed profiler report MACs (multiply-accumulates);
``tests/test_cost.py`` cross-checks both against these counts
(FLOPs == 2 x MACs on conv/linear networks).

All counts are per sample (batch 1) unless stated otherwise.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "SegmentCost",
    "count_flops",
    "count_params",
    "param_bytes",
    "tensor_bytes",
    "measure_latency",
    "LatencyStats",
    "compare_latency",
]


@torch.no_grad()
def count_flops(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """True FLOPs of one forward pass of ``module`` on ``example``, per sample.

    ``example`` may hold any batch size; the count is divided by it.
    """
    args = tuple(example) if isinstance(example, (list, tuple)) else (example,)
    batch = int(args[0].shape[0]) if args and args[0].dim() > 0 else 1
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(*args)
    finally:
        module.train(was_training)
    return int(round(counter.get_total_flops() / max(batch, 1)))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers (what loading the module costs in memory)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    return int(total)


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SegmentCost:
    """Cost of one segment (a backbone stage or an exit head), per sample."""

    name: str
    flops: int
    params: int
    param_bytes: int
    out_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    threads: int
    batch: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def measure_latency(
    fn,
    example: torch.Tensor,
    *,
    repeat: int = 30,
    warmup: int = 5,
    min_time_s: float = 0.0,
    threads: int | None = None,
) -> LatencyStats:
    """Time ``fn(example)`` on this CPU: ``warmup`` runs, then at least ``repeat`` timed runs.

    ``threads`` pins ``torch.set_num_threads`` for the measurement and restores it afterwards.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            fn(example)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < repeat or (time.perf_counter() - start_all) < min_time_s:
            t0 = time.perf_counter()
            fn(example)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        return LatencyStats(
            median_ms=statistics.median(times),
            p90_ms=p90,
            mean_ms=statistics.fmean(times),
            std_ms=statistics.pstdev(times) if len(times) > 1 else 0.0,
            runs=len(times),
            threads=torch.get_num_threads(),
            batch=int(example.shape[0]),
        )
    finally:
        torch.set_num_threads(old_threads)


@torch.no_grad()
def compare_latency(
    models: dict,
    inputs: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 32),
    rounds: int = 5,
    max_samples: int = 256,
    threads: int | None = 2,
    warmup: int = 2,
) -> dict[str, dict[int, LatencyStats]]:
    """Per-sample CPU latency of several models on the same real inputs, measured side by side.

    Each round runs every model over the same batches of ``inputs`` (so early
    exits happen as they would in service), alternating the models to spread
    drift and noise evenly; the median over rounds of the per-batch time,
    divided by the batch size, is reported.
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out: dict[str, dict[int, LatencyStats]] = {name: {} for name in models}
        for b in batch_sizes:
            n = min(len(inputs), max(max_samples, b) if b > 1 else min(max_samples, 64))
            n -= n % b
            if n == 0:
                continue
            batches = [inputs[i : i + b] for i in range(0, n, b)]
            for fn in models.values():
                for xb in batches[:warmup]:
                    fn(xb)
            per: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, fn in models.items():
                    t0 = time.perf_counter()
                    for xb in batches:
                        fn(xb)
                    per[name].append((time.perf_counter() - t0) * 1e3 / n)  # ms per sample
            for name, times in per.items():
                times.sort()
                out[name][b] = LatencyStats(
                    median_ms=statistics.median(times),
                    p90_ms=times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
                    mean_ms=statistics.fmean(times),
                    std_ms=statistics.pstdev(times) if len(times) > 1 else 0.0,
                    runs=rounds * len(batches),
                    threads=torch.get_num_threads(),
                    batch=b,
                )
        return out
    finally:
        torch.set_num_threads(old)


class _Passthrough(nn.Module):
    """The empty segment: its timing is the evaluator's cost of one model call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0  # one real op: a traced identity returns its input and may be elided


def reseeded(evaluator, settings=None, offset: int = 0):
    """The measurement settings a timing on ``evaluator`` uses (``settings``, else the evaluator's own, else
    the defaults) with the seed moved by ``offset``: a new seed is a new cache key, so the timing is
    taken afresh instead of coming from the evaluator's cache."""
    from dataclasses import replace

    from .evaluator import MeasureSettings

    s0 = settings if settings is not None else (getattr(evaluator, "settings", None) or MeasureSettings())
    return s0 if offset == 0 else replace(s0, seed=(s0.seed + offset) % 2**32)


LATENCY_STATS = ("median_ms", "min_ms", "mean_ms")
"""The statistics of one timing (its groups of runs) a latency profile may be built from."""


def check_latency_stat(stat, name: str = "stat") -> None:
    """A one-line error naming the parameter ``name`` unless ``stat`` is one of :data:`LATENCY_STATS`."""
    from .errors import AutoExitError

    if not isinstance(stat, str) or stat not in LATENCY_STATS:
        raise AutoExitError(f"{name} must be one of {', '.join(LATENCY_STATS)} (a timing's statistic), got {stat!r}")


def one_exit_anchors(n: int) -> list[int]:
    """The candidates (indices, in order) whose one-exit models anchor the fixed cost of going on past an
    exit: the quarter, middle and three-quarter candidates, distinct (none with a single candidate)."""
    return sorted({n // 4, n // 2, (3 * n) // 4}) if n > 1 else []


def _raw_overheads(t_none: float, t_every: float, t_ones, scale: float, hd) -> tuple[float | None, float]:
    """(F, d) solved from the anchors as :func:`fit_exit_overheads` describes, F unclipped (None with no
    one-exit anchor to separate it from d, which then takes the whole surplus)."""
    import numpy as np

    hd = np.asarray(hd, dtype=np.float64)
    n = len(hd)
    surplus = t_every - t_none - scale * float(hd.sum())  # the every-exit model beyond its scaled heads: F + N d
    ones = dict(t_ones or {})
    if not (ones and n > 1):
        return None, surplus / n
    f_plus_d = float(np.median([t - t_none - scale * float(hd[j]) for j, t in ones.items()]))
    decision = (surplus - f_plus_d) / (n - 1)
    return f_plus_d - decision, decision


def fit_exit_overheads(t_none: float, t_every: float, t_ones, scale: float, hd) -> tuple[float, float]:
    """The fixed cost F of going on past an exit and the per-decision cost d from the end-to-end anchors
    (:func:`exit_latency_costs`): ``every = none + F + scale * sum(hd) + N d`` and, for each one-exit
    anchor j (``t_ones``: {candidate index: ms}, the model with exit j alone, never taken; empty or ``None``
    with a single candidate), ``one_j = none + F + scale * hd[j] + d``.

    Each one-exit anchor gives F + d; their median stands for it (a single anchor timed in a slow spell
    cannot move it), and the every-exit anchor then separates d from F. A negative F (noise) is taken as
    0, d then an equal share of the every-exit model's surplus. Returns (F, d).
    """
    fixed, decision = _raw_overheads(t_none, t_every, t_ones, scale, hd)
    if fixed is None:
        return 0.0, float(decision)
    if fixed <= 0.0:  # F + N d is the every-exit model's surplus: spread it over the decisions
        return 0.0, float((fixed + len(hd) * decision) / len(hd))
    return float(fixed), float(decision)


ANCHOR_SLACK = 0.05  # share of the no-exit model's time an anchor may be off by as noise


def anchors_consistent(t_none: float, t_every: float, scale: float, hd, t_ones=None) -> bool:
    """Whether the anchors are physically possible together (:func:`anchor_contradiction` says what is not)."""
    return anchor_contradiction(t_none, t_every, scale, hd, t_ones) is None


def anchor_contradiction(t_none: float, t_every: float, scale: float, hd, t_ones=None) -> str | None:
    """What makes the anchors physically impossible together, or None. The model with every candidate exit at
    +inf does all the no-exit model does plus every head, so it must take at least half its scaled heads
    longer; and it does all that each one-exit model (``t_ones``, as in :func:`fit_exit_overheads`) does
    beyond the no-exit model, once per exit, so the fixed cost of going on past an exit that the two imply
    cannot be negative. Each allows :data:`ANCHOR_SLACK` of the no-exit time for noise. A device that changed
    speed between the timings (a busy machine, a Pi that heats up) breaks them: an every-exit model timed too
    fast gives a hugely negative decision cost (every exit would look like it saves time), one timed too slow
    a hugely positive one (every exit would look far dearer than it is)."""
    import numpy as np

    heads = scale * float(np.sum(np.asarray(hd, dtype=np.float64)))
    if t_every - t_none < 0.5 * heads - ANCHOR_SLACK * t_none:
        return f"less than the backbone alone ({t_none:.3f} ms) plus half its heads ({0.5 * heads:.3f} ms)"
    fixed, _ = _raw_overheads(t_none, t_every, t_ones, scale, hd)
    if fixed is not None and fixed < -ANCHOR_SLACK * t_none:
        return (f"more than the one-exit models' overheads once per exit allow (a fixed cost of "
                f"{fixed:+.3f} ms)")
    return None


ANCHOR_SAMPLES = 64  # real inputs the end-to-end anchors of exit_latency_costs are timed on (at least a batch)


def exit_latency_costs(backbone, heads: Sequence, temperatures: Sequence[float], inputs: torch.Tensor | None,
                       evaluator=None, *, batch_size: int = 1, settings=None, calibrate: bool = True,
                       samples: int = ANCHOR_SAMPLES, rounds: int = 3, stat: str = "min_ms",
                       round_stat: str | None = None) -> dict:
    """Per-exit latency costs in ms per sample, measured by a device evaluator (local CPU by default).

    ``backbone``: the :class:`~autoexit.graph.TracedBackbone`; ``heads``: the candidate exits' trained heads
    (:class:`~autoexit.heads.TrainedHead`) in backbone order, with their ``temperatures``; ``inputs``: real
    samples for the end-to-end anchors (``enable`` passes the train split's; ``None``: no anchors). Returns ``{"c1": head ms per
    exit, "before": backbone ms up to each exit, "base": the backbone's ms, "source": how it was obtained,
    "calibration": every figure or None, "fixed": ms per sample going on past an exit, "unit": "ms"}``, what
    ``ExitCosts.from_dict`` reads.

    The backbone is cut at every candidate point; each stage and head is timed (the evaluator caches
    results), giving a segment profile that a search or a policy combines with exit rates.

    ``calibrate``: a segment timed on its own is not what it costs inside the deployed model. Each timing
    includes one model call (the runtime's dispatch: tens of microseconds, a large share of a small stage)
    that inside the model is paid once; the fused model runs its stages somewhat faster or slower than they
    run alone; and the model adds what the segments lack (the exit decisions, gathering the answers). So an
    empty segment (the identity) measures the per-call cost, which is taken off every stage and head, and two
    end-to-end timings on ``samples`` real inputs anchor the rest: the multi-exit model with no exit fixes a
    **scale** (the no-exit model's time less one call, over the sum of the corrected stages; it applies to
    stages and heads alike); the model with every candidate exit at +inf and the models with a single
    candidate at +inf (the quarter, middle and three-quarter candidates, :func:`one_exit_anchors`) fix, between
    them, the cost of each exit decision beyond its scaled head and the **fixed** cost of going on past an
    exit (``ExitCosts.fixed``, paid once by every sample that passes at least one exit: the backbone resumed
    after a head runs slower as a whole than the straight-line backbone, by about 0.1 ms per sample on a
    2-core x86 CPU with ResNet-20, which a per-exit cost alone spreads over the exits and so under-predicts
    every model with fewer exits than the candidates; a sample answered by the first exit it meets does not
    pay it: a model whose first exit takes every input costs no more than its stem, its head and the early
    answer); and that model (threshold -inf at the first candidate) fixes the cost of answering early
    (writing the answer, shrinking the batch), added to every early exit's path. The one-exit anchors each give the fixed
    cost plus one decision; their median stands for it, so one anchor timed in a slow spell cannot move it
    (:func:`fit_exit_overheads`). The decision and early-answer costs may come out negative; only the
    per-path costs are kept non-negative. A negative fixed cost is taken as 0, the decisions then fitted on
    the every-exit model alone. The calibrated profile reproduces the no-exit, every-exit and first-exit
    anchors exactly, and the one-exit anchors to within their spread (exactly with a single one).

    ``rounds``: the profile and the anchors are timed this many times, interleaved (profile, anchors, profile,
    anchors, ...; a new measurement seed each round, so no cached result is reused), and each segment and anchor
    keeps its minimum or median over the rounds (``round_stat``). A device whose speed drifts (a shared VM, a Pi
    that heats up) then drifts under profile and anchors alike, instead of one of them being timed during a slow
    spell. A speed change can still outlast the rounds: the every-exit model then times faster than the no-exit
    model plus half its heads (:func:`anchors_consistent`), which no model doing more work can, and the fitted
    decision cost comes out hugely negative (one such ResNet-56 run fitted -0.48 ms per decision, so every exit
    seemed to save time and the policy kept 14, running 1.31x the backbone against a predicted 0.89x). Timed too
    slow, it says the fixed cost of going on past an exit is negative (its surplus is more than the one-exit models'
    overheads once per exit), and the decision cost comes out huge instead (a ResNet-20 run: +0.46 ms per decision
    against heads of 0.14 ms, and no exit kept). Such rounds are discarded and profile and anchors timed afresh
    (``rounds`` new rounds, new seeds; ``retimed: True`` in the calibration); if they contradict each other again,
    the decision and fixed costs are left at 0 (the scaled profile alone, whose single scale keeps the exits'
    relative costs), with a warning, ``consistent: False`` in the calibration and a note in ``source``.

    ``round_stat``: how the rounds of one segment or anchor combine: ``"min"`` (the fastest group of all the
    rounds' groups; the default with ``stat="min_ms"``, for the same reason: a slow spell that covers two of
    three rounds of a timing moves their median, never their minimum) or ``"median"`` (the default otherwise).
    On this 2-core VM the median of three rounds once put a ResNet-20 profile at 3.07 ms against a no-exit model
    of 1.85 ms (rounds 1.84, 3.07 and 4.59 ms), a scale of x0.63 and +0.37 ms on every sample going on past an
    exit, so the policy kept no exit; the minimum over rounds, which is also what ``min_ms`` means for a single
    timing, reads at most 1.84 ms.

    ``stat``: which statistic of one timing (its groups of runs) stands for it, for segments and anchors
    alike: ``min_ms`` (default: the fastest group; far steadier than the median on a busy machine whose slow
    spells only add time, and the same on a quiet device; ``bench/evaluator_noise.py``,
    ``bench/evaluator_predict.py --min-stat``), ``median_ms`` or ``mean_ms``. It is recorded in the
    calibration, and :func:`autoexit.search.outer.verify_end_to_end` measures with the same statistic.
    """
    import numpy as np

    from .errors import AutoExitError

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise AutoExitError(f"rounds must be an integer >= 1 (anchor timings per model), got {rounds!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AutoExitError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_latency_stat(stat)
    if round_stat is None:
        round_stat = "min" if stat == "min_ms" else "median"
    if round_stat not in ("min", "median"):
        raise AutoExitError(f"round_stat must be 'min' or 'median' (how the rounds of a timing combine), "
                            f"got {round_stat!r}")
    combine = np.min if round_stat == "min" else np.median
    if len(heads) != len(temperatures):
        raise AutoExitError(f"give one temperature per head: {len(heads)} heads, {len(temperatures)} temperatures")
    from .evaluator import LocalEvaluator, segment_profile

    ev = evaluator if evaluator is not None else LocalEvaluator()
    heads = list(heads)
    names = [h.point.name for h in heads]
    points = [h.point for h in heads]
    stages = backbone.split([p.node for p in points])
    example = backbone.example_input[:1]
    segments: dict = {"stage0": (stages[0], example)}
    for i, (p, h) in enumerate(zip(points, heads)):
        segments[f"stage{i + 1}"] = (stages[i + 1], tuple(p.shape))
        segments[f"head:{p.name}"] = (h.module, tuple(p.shape))
    info = ev.info()
    src = str(getattr(info, "name", None) or getattr(ev, "device_key", "device"))
    if reseeded(ev, settings).optimize:  # timed as load(optimize=True) runs the model there
        src += ", optimised runtime"
    def profile(r: int) -> dict[str, float]:
        res = ev.measure_segments(segments, batch_sizes=(batch_size,), settings=reseeded(ev, settings, r))
        return {k: v / batch_size for k, v in segment_profile(res, batch_size, stat).items()}

    def costs(prof: dict[str, float], call: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st = np.array([max(prof[f"stage{i}"] - call, 0.0) for i in range(len(names) + 1)])
        hd = np.array([max(prof[f"head:{n}"] - call, 0.0) for n in names])
        return st, hd, np.cumsum(st)[:-1]

    x = None
    if calibrate and names:
        segments["call"] = (_Passthrough(), tuple(example.shape[1:]))
        if inputs is not None:
            x = inputs[: max(int(samples), batch_size)]
            x = x[: len(x) - len(x) % batch_size]
            if len(x) < batch_size:
                x = None
    if x is None:  # not calibrating, no exit, or no inputs to anchor on: the (per-call corrected) profile
        prof = profile(0)
        call = prof.pop("call", None)
        st, hd, before = costs(prof, call or 0.0)
        if not st.sum() > 0:
            raise AutoExitError("the measured backbone stages add up to 0 ms; time with larger min_repeat_ms")
        source = (f"{src} ({stat.removesuffix('_ms')} per timing)" if call is None
                  else f"{src}; segment profile - {call:.3f} ms per segment call ({stat.removesuffix('_ms')} per timing)")
        return {"c1": hd, "before": before, "base": float(st.sum()), "source": source, "calibration": None,
                "fixed": 0.0, "unit": "ms"}

    from .model import MultiExitModel, scripted_backbone, to_torchscript

    nc = int(backbone.num_classes)
    temps = [float(t) for t in temperatures]
    every = MultiExitModel(stages, [h.module for h in heads], temps, [float("inf")] * len(names), names, nc)
    first = MultiExitModel(stages, [h.module for h in heads], temps,
                           [-float("inf")] + [float("inf")] * (len(names) - 1), names, nc)
    scripted = {"none": scripted_backbone(backbone), "every": to_torchscript(every, backbone.example_input),
                "first": to_torchscript(first, backbone.example_input)}
    ones = one_exit_anchors(len(names))  # the one-exit anchors: single candidates at +inf
    for j in ones:
        one = MultiExitModel(backbone.split([points[j].node]), [heads[j].module], [temps[j]], [float("inf")],
                             [names[j]], nc)
        scripted[f"one:{j}"] = to_torchscript(one, backbone.example_input)
    for attempt in range(2):  # anchors that contradict each other are timed afresh, with new seeds
        profiles: list[dict[str, float]] = []
        timed: dict[str, list[float]] = {k: [] for k in scripted}
        for r in range(attempt * rounds, (attempt + 1) * rounds):
            profiles.append(profile(r))
            for k in scripted:
                timed[k].append(float(getattr(ev.measure_end_to_end(scripted[k], x, batch_sizes=(batch_size,),
                                                                    settings=reseeded(ev, settings, r))
                                              .at(batch_size), stat)) / batch_size)
        prof = {k: float(combine([p[k] for p in profiles])) for k in profiles[0]}
        call = prof.pop("call")
        st, hd, before = costs(prof, call)
        t_none, t_every, t_first = (float(combine(timed[k])) for k in ("none", "every", "first"))
        scale = (t_none - call) / float(st.sum()) if st.sum() > 0 and t_none > call else 1.0
        t_ones = {j: float(combine(timed[f"one:{j}"])) for j in ones}
        contradiction = anchor_contradiction(t_none, t_every, scale, hd, t_ones)
        if contradiction is None:
            break
    before = call + scale * before
    if contradiction is None:
        fixed, decision = fit_exit_overheads(t_none, t_every, t_ones, scale, hd)
    else:  # still contradictory: the scaled profile alone (one scale keeps the exits' relative costs)
        fixed, decision = 0.0, 0.0
        warnings.warn(f"latency calibration on {src}: the model with every exit timed {t_every:.3f} ms per sample, "
                      f"{contradiction}, twice in {rounds} rounds: the device changed speed while timing, so the "
                      "exit-decision and fixed costs are left at 0; time on a quiet device or with more rounds",
                      stacklevel=2)
    c1 = np.maximum(scale * hd + decision, 0.0)
    taken = t_first - float(before[0] + c1[0])  # answering early: writing the answer, shrinking the batch
    cal = {"call_ms": call, "scale": scale, "decision_ms": decision, "exit_taken_ms": taken,
           "exits_fixed_ms": fixed, "no_exit_ms": t_none, "every_exit_ms": t_every, "first_exit_ms": t_first,
           "one_exit_ms": [t_ones[j] for j in ones], "one_exit": [names[j] for j in ones],
           "one_exit_fixed_ms": [t_ones[j] - t_none - scale * float(hd[j]) - decision for j in ones],
           "no_exit_rounds_ms": timed["none"], "every_exit_rounds_ms": timed["every"],
           "first_exit_rounds_ms": timed["first"], "one_exit_rounds_ms": [timed[f"one:{j}"] for j in ones],
           "profile_base_rounds_ms": [float(sum(v for k, v in p.items() if k.startswith("stage")))
                                      for p in profiles],
           "profile_ms": {k: float(v) for k, v in prof.items()} | {"call": call},
           "profile_rounds_ms": [{k: float(v) for k, v in p.items()} for p in profiles],  # to recombine later
           "samples": int(len(x)), "rounds": int(rounds), "retimed": attempt > 0,
           "consistent": contradiction is None,
           "batch_size": int(batch_size), "stat": stat, "round_stat": round_stat}
    return {"c1": c1, "before": np.maximum(before + taken, 0.0),
            "base": max(t_none, 1e-9), "fixed": fixed, "unit": "ms",
            "source": f"{src}; segment profile - {call:.3f} ms per segment call, x{scale:.3f} to the no-exit "
                      f"model + {call:.3f} ms per model call, {fixed:+.3f} ms per sample going on past an exit, "
                      f"{decision:+.3f} ms per exit decision, "
                      f"{taken:+.3f} ms per early answer ({stat.removesuffix('_ms')} per timing, {round_stat} of "
                      f"{rounds} interleaved rounds"
                      + ("" if not attempt else ", timed again: the first rounds' anchors contradicted each other"
                         if contradiction is None else "; the anchors contradicted each other twice, so no "
                         "decision or fixed cost was fitted") + ")",
            "calibration": cal}
