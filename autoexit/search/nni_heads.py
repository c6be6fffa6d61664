"""NNI head search: one NNI 3.0 experiment per exit point over a head space from ``search_spaces/``.

The only module of autoexit that imports NNI (``pip install 'autoexit[nas]'``); the
NNI-free half (spaces, settings, the trial objective, persistence) is
:mod:`autoexit.search.head_space`, so replacing NNI means replacing this file.

    from autoexit.search import search_heads
    found = search_heads(backbone, data, space="default", strategy="tpe", max_trials=20, port=8081)
    found.specs      # {exit point: HeadSpec}, heterogeneous per point
    found.heads      # {exit point: TrainedHead}, ready for autoexit.pipeline.assemble
    found.failed     # points discarded: no sampled head agreed with the backbone above chance

    autoexit search heads --config experiments/digits_nni_heads.yaml --port 8081

How it maps onto NNI (paper 003, appendix A: "an NNI experiment per candidate layer"):

- the model space (:class:`HeadModelSpace`) is generated from the space file: one
  ``nni.choice`` per searched HeadSpec field plus a one-value ``exit_point`` choice, so
  the web UI shows the exit point and the sampled head in every trial's parameters;
- the evaluator is a ``FunctionalEvaluator`` of :func:`evaluate_head`, a module-level
  function of this installed module (trial processes import it), whose only arguments
  are the point's name and the path of its ``context.json`` (NNI's message parser cuts
  strings at ``#`` and ``//``, so no URL or user path travels through NNI);
- a trial trains its head on the recorded activations
  (:func:`autoexit.search.head_space.run_trial`), reports the score as NNI's
  ``default`` metric and ``agreement``, ``flops``, ``cost_fraction``, ``latency_ms``
  (with an evaluator), ``chance``, ``params``, ``kl`` beside it; a head no better than
  chance fails the trial;
- strategies: ``random`` (Random), ``tpe`` (TPE, maximising), ``evolution``
  (RegularizedEvolution);
- engines: ``ts`` runs every trial as a process under NNI's manager, with the web UI and
  the REST API (``/api/v1/nni/...``) on ``port``; ``sequential`` runs trials in this
  process (no web UI; what the benchmark uses).

NNI's own state (database, logs, trial directories and its experiment manifest, which
NNI otherwise keeps in ``~/nni-experiments``) goes under ``<workdir>/nni``. Finished
experiments can be browsed again with ``python -m autoexit.search.nni_heads view <workdir>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path

from ..errors import AutoExitError, MissingExtraError
from .head_space import (
    HeadSearchConfig,
    HeadSearchResult,
    HeadSpace,
    PointResult,
    TrialStore,
    load_head_space,
    point_dir,
    run_trial,
    scoring_chance,
    search_key,
    trial_context,
)

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch Buffer / LinearCrossEntropyOptions notices at import
        import nni
        import torch
        from nni.common import serializer as _nni_serializer
        from nni.experiment import RunMode
        from nni.mutable import ensure_frozen
        from nni.nas import strategy as _strategies
        from nni.nas.evaluator import FunctionalEvaluator
        from nni.nas.experiment import NasExperiment, NasExperimentConfig
        from nni.nas.nn.pytorch import ModelSpace
        from nni.nas.space import model_context
        from nni.tools.nnictl import config_utils as _nni_config_utils
        from nni.tools.nnictl import constants as _nni_constants
except ModuleNotFoundError as _exc:  # nni, pytorch_lightning or pkg_resources (setuptools<81) missing
    raise MissingExtraError(_exc.name or "nni", "nas", "the NNI head search (autoexit search heads)") from None

__all__ = ["search_heads", "run_from_args", "HeadModelSpace", "evaluate_head", "view_experiment",
           "list_experiments", "DEFAULT_PORT"]

DEFAULT_PORT = 8081
_log = logging.getLogger(__name__)

# REQUIRED: nni.load() parses NNI's messages with json_tricks(ignore_comments=True), which cuts any string at
# '#' or '//' (paths, URLs, base64) -> JSONDecodeError in the listener thread -> the experiment hangs.
# Machine-written JSON has no comments; one function object serves every importer, so this fixes them all.
_nni_serializer.load.__kwdefaults__["ignore_comments"] = False


# --------------------------------------------------------------------------- model space and trial


class HeadModelSpace(ModelSpace):
    """The NNI model space of one exit point, generated from a head space (arguments are plain JSON).

    Registers ``exit_point`` (one value: the point, so it shows in every sample) and one
    choice per searched field; the frozen module is the head :func:`autoexit.heads.build_head`
    builds from the sample's canonical :class:`~autoexit.heads.HeadSpec` (``self.head_spec``).
    """

    def __init__(self, space: dict, in_shape: list, num_classes: int, point: str):
        super().__init__()
        from ..heads import build_head

        hs = HeadSpace.from_dict(space, name="space")
        sample = {"exit_point": ensure_frozen(self.add_mutable(nni.choice("exit_point", [point])))}
        for label, values in hs.searched.items():
            sample[label] = ensure_frozen(self.add_mutable(nni.choice(label, list(values))))
        self.sample_values = sample
        self.head_spec = hs.spec(sample, in_shape)
        self.head = build_head(self.head_spec, list(in_shape), int(num_classes))

    def forward(self, x):
        return self.head(x)

    def freeze(self, sample: dict) -> HeadModelSpace:
        """The space with ``sample`` fixed (NNI's 'simplified' format re-creates it the same way)."""
        with model_context(sample):
            return self.__class__(*self.trace_args, **self.trace_kwargs)


class HeadNoBetterThanChance(RuntimeError):
    """Raised in a trial whose head does not beat chance: NNI marks the trial FAILED."""


class HeadTooCostly(RuntimeError):
    """Raised in a trial whose head costs more than ``max_cost_fraction`` (not trained): FAILED in NNI."""


def _final_metrics(rec: Mapping) -> dict:
    m = rec["metrics"]
    out = {"default": m["score"], "agreement": m["agreement"], "flops": m["flops"],
           "cost_fraction": m["cost_fraction"], "chance": m["chance"], "params": m["params"], "kl": m["kl"]}
    if "latency_ms" in m:
        out["latency_ms"] = m["latency_ms"]
    return {k: float(v) for k, v in out.items()}


def evaluate_head(model: HeadModelSpace, context: str, point: str) -> None:
    """The trial: train the sampled head on the point's cached activations, score it, report to NNI."""
    ctx = json.loads(Path(context).read_text())
    if ctx["point"] != point:
        raise AutoExitError(f"trial context {context} is for point {ctx['point']!r}, not {point!r}")
    param = nni.get_current_parameter()
    sample = dict(getattr(param, "sample", None) or model.sample_values)
    if ctx["engine"] == "ts":
        trial_id = nni.get_trial_id()
    else:  # in-process trials share one id: number them
        trial_id = f"seq{TrialStore(ctx['store']).count():04d}"

    def on_epoch(h: dict) -> None:
        if "val_agreement" in h:
            nni.report_intermediate_result({"default": float(h["val_agreement"]), "val_kl": float(h["val_kl"])})

    rec = run_trial(ctx, model.head_spec, trial_id, sample, on_epoch=on_epoch)
    m = rec["metrics"]
    if ctx["engine"] == "ts":  # the trial's stdout (trial.log); in-process trials keep the console for progress
        print(f"[autoexit] {point}: {rec['describe']} agreement {m.get('agreement', float('nan')):.4f} "
              f"(chance {m['chance']:.4f}) flops {m['flops']:.0f} score {m.get('score', float('nan')):.4f} "
              f"status {rec['status']}"
              + (f" (duplicate of {rec['duplicate_of']})" if rec.get("duplicate_of") else ""), flush=True)
    if rec["status"] == "too_costly":
        raise HeadTooCostly(f"head {rec['describe']} at {point}: cost {m['cost_fraction']:.3f} of the "
                            f"{ctx['cost_basis']} backbone exceeds max_cost_fraction {ctx['max_cost_fraction']}")
    if rec["status"] != "ok":
        raise HeadNoBetterThanChance(f"head {rec['describe']} at {point}: agreement {m['agreement']:.4f} is not above "
                                     f"chance {m['chance']:.4f} + margin {ctx['chance_margin']}")
    nni.report_final_result(_final_metrics(rec))


def _make_strategy(name: str, seed: int, n_labels: int, max_trials: int):
    if name == "random":
        return _strategies.Random(seed=seed)
    if name == "tpe":
        return _strategies.TPE(optimize_mode="maximize", seed=seed)  # NNI's TPE minimises by default
    population = max(2, min(100, max_trials // 3))
    return _strategies.RegularizedEvolution(population_size=population, sample_size=max(1, population // 2),
                                            mutation_prob=max(0.05, 1.0 / max(1, n_labels)), seed=seed)


# --------------------------------------------------------------------------- NNI plumbing


@contextlib.contextmanager
def _environ(env: Mapping[str, str]):
    """``env`` on top of os.environ while the block runs (what a process started in it inherits)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _manager_env(nni_dir: Path) -> dict[str, str]:
    """NNI's manager writes its experiment manifest under $HOME; trial processes must import autoexit."""
    root = str(Path(__file__).resolve().parents[2])
    return {"HOME": str(nni_dir),
            "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}


class _Experiment(NasExperiment):
    """NasExperiment whose NNI manager (and so every trial process) gets ``manager_env`` on top of ours."""

    manager_env: dict[str, str] = {}

    def _start_nni_manager(self, *args, **kwargs):
        with _environ(self.manager_env):
            return super()._start_nni_manager(*args, **kwargs)


@contextlib.contextmanager
def _nni_home(home: Path):
    """NNI's experiment manifest (``~/nni-experiments/.experiment``) under ``home`` while the block runs."""
    d = str(home / "nni-experiments")
    os.makedirs(d, exist_ok=True)
    old_const, old_defaults = _nni_constants.NNI_HOME_DIR, _nni_config_utils.Experiments.__init__.__defaults__
    _nni_constants.NNI_HOME_DIR = d
    _nni_config_utils.Experiments.__init__.__defaults__ = (d,)
    try:
        yield
    finally:
        _nni_constants.NNI_HOME_DIR = old_const
        _nni_config_utils.Experiments.__init__.__defaults__ = old_defaults


class _ExpectedTrialFailures(logging.Filter):
    """The sequential engine logs every failed trial as an ERROR with its traceback; heads below chance or
    too costly fail by design (they are recorded), so only other failures get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "fails to be executed" in msg or "Continue on failure" in msg:
            return False
        return not ("HeadNoBetterThanChance" in msg or "HeadTooCostly" in msg)


@contextlib.contextmanager
def _quiet_nni(debug: bool = False):
    """NNI logs every step at INFO on the console; keep warnings and errors only."""
    levels = {"nni": logging.WARNING, "nni.nas": logging.WARNING, "nni.experiment": logging.WARNING,
              "nni.runtime": logging.WARNING,
              # "Sampling failed after 500 retries": a small space is exhausted before max_trials; expected
              "nni.nas.strategy": logging.ERROR}
    loggers = [logging.getLogger(n) for n in levels]
    old = [lg.level for lg in loggers]
    seq = logging.getLogger("nni.nas.execution.sequential")
    filt = _ExpectedTrialFailures()
    if not debug:
        for lg in loggers:
            lg.setLevel(levels[lg.name])
        seq.addFilter(filt)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ResourceWarning)
            warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module.*")
            yield
    finally:
        seq.removeFilter(filt)
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the experiment cleanly (a killed driver would orphan NNI's manager, which keeps the port)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port_free(port: int, timeout: float = 15.0) -> bool:
    t0 = time.monotonic()
    while _port_in_use(port):
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.3)
    return True


def _rest(port: int, endpoint: str, timeout: float = 3.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{endpoint}", timeout=timeout) as r:
        body = r.read()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body.decode(errors="replace")


class _Watcher(threading.Thread):
    """Progress while an experiment runs: trials done (from the point's trials.jsonl) and, with the ``ts``
    engine, what NNI's REST API lists (``check-status``, ``trial-jobs``)."""

    def __init__(self, store: TrialStore, bar, base: int, port: int | None, interval: float = 1.0):
        super().__init__(daemon=True, name="autoexit-nni-watch")
        self.store, self.bar, self.base, self.port, self.interval = store, bar, base, port, interval
        self.stop_event = threading.Event()
        self.polls = 0
        self.max_listed = 0
        self.statuses: list[str] = []
        self.errors = 0

    def _tick(self) -> None:
        if self.bar is not None:
            n = self.base + self.store.count()
            if n != self.bar.n:
                self.bar.n = n
                self.bar.refresh()
        if self.port is None:
            return
        try:
            st = _rest(self.port, "check-status")
            jobs = _rest(self.port, "trial-jobs")
        except Exception:  # noqa: BLE001 - the manager is starting or gone
            self.errors += 1
            return
        self.polls += 1
        status = st.get("status") if isinstance(st, dict) else None
        if status and (not self.statuses or self.statuses[-1] != status):
            self.statuses.append(status)
        if isinstance(jobs, list) and status == "RUNNING":
            self.max_listed = max(self.max_listed, len(jobs))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._tick()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self._tick()


def _trial_log_tail(exp_dir: Path, trial: str) -> str:
    f = exp_dir / "environments" / "local-env" / "trials" / trial / "stderr"
    if not f.is_file():
        f = exp_dir / "environments" / "local-env" / "trials" / trial / "trial.log"
    try:
        lines = [x for x in f.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- one exit point


def _run_point(i: int, n: int, p, rec, space: HeadSpace, cfg: HeadSearchConfig, ctx: dict, pdir: Path,
               workdir: Path, bar, debug: bool = False) -> PointResult:
    store = TrialStore(pdir)
    (pdir / "weights").mkdir(parents=True, exist_ok=True)
    for f in (store.file, *(pdir / "weights").glob("*.pt")):  # an unfinished earlier run of this point
        f.unlink(missing_ok=True)
    context_file = pdir / "context.json"
    context_file.write_text(json.dumps(ctx, indent=1))
    model_space = HeadModelSpace(space.to_dict(), list(p.shape), rec.num_classes, p.name)
    evaluator = FunctionalEvaluator(evaluate_head, context=str(context_file), point=p.name)
    strat = _make_strategy(cfg.strategy, cfg.seed + i, len(space.searched) + 1, cfg.max_trials)
    if cfg.engine == "ts":
        config = NasExperimentConfig("ts", "simplified", "local")
        config.trial_gpu_number = 0
        config.training_service.use_active_gpu = False
        config.trial_concurrency = cfg.concurrency
    else:
        config = NasExperimentConfig("sequential", "simplified")
        config.execution_engine.continue_on_failure = True  # a head below chance fails its trial, not the search
        config.trial_concurrency = 1
    config.experiment_name = f"autoexit heads {p.name} [{i + 1}/{n}] {space.name}/{cfg.strategy}"
    config.max_trial_number = cfg.max_trials
    config.experiment_working_directory = str(workdir / "nni")
    if cfg.max_duration:
        config.max_experiment_duration = cfg.max_duration
    exp = _Experiment(model_space, evaluator, strat, config)
    exp.manager_env = _manager_env(workdir / "nni")
    port = cfg.port if cfg.engine == "ts" else None
    if port is not None and not _wait_port_free(port, timeout=5):
        raise AutoExitError(f"port {port} is in use (another NNI experiment, web UI or server?); pass a free one "
                            f"with --port N (heads.port in the experiment file)")
    msg = (f"NNI experiment {exp.id} for exit point {p.name} ({i + 1}/{n}): "
           + (f"web UI http://localhost:{port}" if port else "sequential engine (no web UI)"))
    (bar.write if bar is not None else print)(msg)
    watcher = _Watcher(store, bar, bar.n if bar is not None else 0, port)
    watcher.start()
    t0 = time.perf_counter()
    stopped = False
    nni_trials: list[dict] = []
    top: list[dict] = []
    try:
        ok = exp.run(port=port or DEFAULT_PORT, debug=debug)
        if ok is None:  # NNI caught a KeyboardInterrupt and stopped the experiment itself
            stopped = True
            raise KeyboardInterrupt
        trained = sum(1 for r in store.records() if r.get("status") == "ok")
        # before stop(): the engine is gone after it
        top = exp.export_top_models(top_k=min(cfg.top_k, trained), formatter="dict") if trained else []
        if cfg.engine == "ts":
            for tj in exp.list_trial_jobs():
                final = tj.finalMetricData[0].data if tj.finalMetricData else None
                hp = tj.hyperParameters[0].parameters if tj.hyperParameters else {}
                nni_trials.append({"trial": tj.trialJobId, "status": tj.status, "sample": hp.get("sample"),
                                   "final": final if isinstance(final, dict) else None})
        else:
            for m in exp.strategy.list_models(sort=False):
                nni_trials.append({"trial": None, "status": m.status.value, "sample": dict(m.sample or {}),
                                   "final": {"default": m.metric} if m.metric is not None else None})
    finally:
        watcher.stop()
        if not stopped:
            exp.stop()
        if port is not None:
            _wait_port_free(port)
    seconds = time.perf_counter() - t0
    records = store.records()
    exp_dir = workdir / "nni" / exp.id
    ok_records = [r for r in records if r.get("status") == "ok"]
    if not records and nni_trials:
        bad = next((t["trial"] for t in nni_trials if t["trial"]), None)
        tail = _trial_log_tail(exp_dir, bad) if bad else ""
        raise AutoExitError(f"every NNI trial of exit point {p.name} crashed before training a head"
                            + (f" ({tail})" if tail else "")
                            + f"; trial logs: {exp_dir / 'environments' / 'local-env' / 'trials'}")
    # the best score in our own trial records wins; NNI's export_top_models order (not always by score with
    # concurrent trials) only breaks ties
    rank = {space.spec(sample, p.shape).to_json(): i for i, sample in reversed(list(enumerate(top)))}
    unique = [r for r in ok_records if not r.get("duplicate_of")]
    best = max(unique, key=lambda r: (r["metrics"]["score"], -rank.get(r["spec_json"], len(top)))) if unique else None
    rest = {"experiment_dir": str(exp_dir), "engine": cfg.engine, "port": port, "trials": nni_trials,
            "top": top, "rest_polls": watcher.polls, "rest_max_trials_listed_while_running": watcher.max_listed,
            "rest_statuses": watcher.statuses}
    if best is not None:
        status = "ok"
    elif records and all(r.get("status") == "too_costly" for r in records):
        status = "too_costly"
    else:
        status = "chance"
    return PointResult(p.name, status, pdir, exp.id, records, best, seconds, False, rest)


# --------------------------------------------------------------------------- export


def _export_head(pr: PointResult, rec, retrain, progress: bool, backbone=None):
    """The winner of a point as a TrainedHead: the trial's weights, or trained again with ``retrain``."""
    import hashlib

    from ..cost import count_flops, count_params, param_bytes
    from ..distill import TrainedHead, agreement, kd_loss, predict_head, train_heads
    from ..heads import HeadSpec, build_head

    best = pr.best
    spec = HeadSpec.from_dict(best["spec"])
    p = rec.point(pr.point)
    tag = "trial" if retrain is None else hashlib.sha256(
        json.dumps(retrain.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    f = pr.dir / f"best-{tag}.pt"
    if f.is_file():
        try:
            d = torch.load(f, map_location="cpu", weights_only=True)
            if d["spec"] == spec.to_dict():
                module = build_head(spec, p.shape, rec.num_classes)
                module.load_state_dict(d["state_dict"])
                module.eval()
                return TrainedHead(point=p, spec=spec, module=module, **d["meta"])
        except Exception:  # noqa: BLE001 - a damaged export is redone
            pass
    if retrain is not None:
        h = train_heads(rec, {p.name: spec}, retrain, points=[p.name], progress=False, backbone=backbone)[p.name]
    else:
        module = build_head(spec, p.shape, rec.num_classes)
        module.load_state_dict(torch.load(pr.dir / "weights" / best["weights"], map_location="cpu",
                                          weights_only=True))
        module.eval()
        x_va, t_va = rec.activations(p, "val"), rec.logits("val")
        pv = predict_head(module, x_va)
        h = TrainedHead(point=p, spec=spec, module=module, flops=count_flops(module, x_va[:1]),
                        params=count_params(module), param_bytes=param_bytes(module),
                        val_agreement=agreement(pv, t_va), val_kl=float(kd_loss(pv, t_va)),
                        epochs=len(best.get("history") or []), seconds=float(best["metrics"]["train_seconds"]),
                        history=list(best.get("history") or []))
    meta = {"flops": h.flops, "params": h.params, "param_bytes": h.param_bytes, "val_agreement": h.val_agreement,
            "val_kl": h.val_kl, "epochs": h.epochs, "seconds": h.seconds, "history": h.history}
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    torch.save({"spec": spec.to_dict(), "state_dict": h.module.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, f)
    return h


# --------------------------------------------------------------------------- the search


def _as_config(config, overrides: dict) -> HeadSearchConfig:
    if config is None:
        return HeadSearchConfig.from_dict({}, **overrides)
    if isinstance(config, HeadSearchConfig):
        valid = {f.name for f in fields(HeadSearchConfig)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise AutoExitError(f"unknown heads setting(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if isinstance(config, Mapping):
        return HeadSearchConfig.from_dict(config, **overrides)
    raise AutoExitError(f"config must be a HeadSearchConfig or a mapping of heads settings, got {type(config).__name__}")


def _check_path(p: Path, what: str) -> None:
    s = str(p)
    if "#" in s or "//" in s:
        raise AutoExitError(f"{what} {s} contains '#' or '//', which NNI's message parser cuts; choose another folder")


def _evaluator_key(evaluator) -> str | None:
    if evaluator is None:
        return None
    return json.dumps(evaluator, sort_keys=True, default=str)


def _base_latency_ms(evaluator, tb, p, basis: str) -> float:
    from ..evaluator import MeasureSettings, evaluator_from_config

    ev = evaluator_from_config(evaluator)
    if basis == "backbone":
        model, shape = tb.model, tuple(tb.example_input.shape[1:])
    else:
        model, shape = tb.split([p.node])[-1], tuple(p.shape)
    return float(ev.measure(model, input_shapes=shape, settings=MeasureSettings.quick()).median_ms)


def search_heads(backbone=None, data=None, space: str | Path | Mapping | HeadSpace | None = None,
                 strategy: str | None = None, max_trials: int | None = None, port: int | None = None, *,
                 config: HeadSearchConfig | Mapping | None = None, enable=None, prepared=None,
                 evaluator: Mapping | str | None = None, workdir: str | Path | None = None,
                 progress: bool = True, debug: bool = False, **settings) -> HeadSearchResult:
    """Search an exit head per exit point of ``backbone`` on ``data`` with NNI; export the winners.

    backbone, data: as for :func:`autoexit.enable` (or ``prepared=(traced, points, recording)``
    from :func:`autoexit.pipeline.prepare`, which skips tracing and recording); space: a head
    space name (``default``, ``ci``), YAML file or mapping; strategy: ``random``, ``tpe``,
    ``evolution``; max_trials: trials per exit point; port: NNI web UI / REST port (default
    8081). ``config``: a :class:`~autoexit.search.head_space.HeadSearchConfig` or the
    ``heads:`` mapping of an experiment file; keyword ``settings`` override its fields
    (``engine``, ``concurrency``, ``points``, ``cost``, ``cost_weight``, ``train``,
    ``retrain``, ...). enable: the :class:`~autoexit.pipeline.EnableConfig` (exit points,
    recording cache; its ``train`` settings retrain the winners). evaluator: device
    evaluator settings (``autoexit.evaluator.evaluator_from_config``): each trial's head
    latency is measured and shown; ``cost: latency`` scores by it. workdir: where results,
    trial weights and NNI's experiments go (default ``runs/nni-heads``); a point whose
    search already finished there with the same settings is reused.
    """
    from ..distill import TrainConfig
    from ..pipeline import EnableConfig, prepare

    overrides = {"space": space, "strategy": strategy, "max_trials": max_trials, "port": port, **settings}
    overrides = {k: (str(v) if k == "space" and isinstance(v, Path) else v) for k, v in overrides.items()}
    space_obj = space if isinstance(space, (HeadSpace, Mapping)) else None
    if space_obj is not None:
        overrides["space"] = None
    cfg = _as_config(config, overrides)
    nulls = sorted(k for k, v in settings.items() if v is None)  # an explicit None (e.g. max_cost_fraction=None)
    if nulls:
        valid = {f.name for f in fields(HeadSearchConfig)}
        if set(nulls) - valid:
            raise AutoExitError(f"unknown heads setting(s) {', '.join(sorted(set(nulls) - valid))}; "
                                f"valid: {', '.join(sorted(valid))}")
        cfg = replace(cfg, **dict.fromkeys(nulls))
    hspace = load_head_space(space_obj if space_obj is not None else cfg.space)
    if enable is None:
        enable_cfg = EnableConfig()
    elif isinstance(enable, EnableConfig):
        enable_cfg = enable
    elif isinstance(enable, Mapping):
        enable_cfg = EnableConfig.from_dict(enable)
    else:
        raise AutoExitError(f"enable must be an EnableConfig or a mapping of its fields, got {type(enable).__name__}")
    if evaluator is not None and not isinstance(evaluator, (Mapping, str)):
        raise AutoExitError("evaluator must be evaluator settings (a mapping such as {url: ..., token_file: ...} or a "
                            "URL), which every trial process turns into its own client")
    if evaluator is not None:
        evaluator = dict(evaluator) if isinstance(evaluator, Mapping) else {"url": evaluator}
    if cfg.cost == "latency" and evaluator is None:
        evaluator = {}  # the local evaluator: latency on this machine
    if evaluator is not None:
        json.dumps(evaluator)
    if prepared is not None:
        tb, points, rec = prepared
    else:
        if backbone is None or data is None:
            raise AutoExitError("search_heads needs a backbone and data (or prepared=(traced, points, recording))")
        tb, points, rec = prepare(backbone, data, enable_cfg, progress=progress)
    names = [p.name for p in points]
    if cfg.points is not None:
        unknown = [x for x in cfg.points if x not in names]
        if unknown:
            raise AutoExitError(f"heads.points names unknown exit point(s) {', '.join(unknown)}; the points are: "
                                f"{', '.join(names)}")
        todo = [p for p in points if p.name in cfg.points]
    else:
        todo = list(points)
    wd = Path(workdir if workdir is not None else Path("runs") / "nni-heads").resolve()
    _check_path(wd, "the head-search folder")
    wd.mkdir(parents=True, exist_ok=True)
    retrain = None
    if cfg.retrain:
        retrain = cfg.final_train or (enable_cfg.train if enable is not None else TrainConfig())
        if retrain == cfg.train and not cfg.trial_samples and cfg.score_on == "val":
            retrain = None  # the trials trained exactly so (on all of train): keep their weights
    chance = scoring_chance(rec, cfg)
    t_start = time.perf_counter()
    results: dict[str, PointResult] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * cfg.max_trials, desc="NNI head search", unit="trial", dynamic_ncols=True)
    try:
        with _nni_home(wd / "nni"), _quiet_nni(debug), _sigterm_as_interrupt():
            for i, p in enumerate(todo):
                key = search_key(rec, p.name, hspace, cfg, _evaluator_key(evaluator))
                pdir = point_dir(wd, p.name, key)
                done = pdir / "result.json"
                if cfg.resume and done.is_file():
                    try:
                        pr = PointResult.from_dict(json.loads(done.read_text()))
                        pr.trials = TrialStore(pdir).records() or pr.trials
                        if pr.best is not None:
                            pr.best = next((r for r in pr.trials if r.get("trial") == pr.best.get("trial")), pr.best)
                        results[p.name] = pr
                        if bar is not None:
                            bar.update(cfg.max_trials)
                            bar.write(f"exit point {p.name}: reusing the finished search in {pdir}")
                        continue
                    except (OSError, json.JSONDecodeError, KeyError):
                        pass
                pdir.mkdir(parents=True, exist_ok=True)
                base_ms = _base_latency_ms(evaluator, tb, p, cfg.cost_basis) if evaluator is not None else None
                ctx = trial_context(rec, p, cfg, pdir, total_flops=tb.total_flops, chance=chance,
                                    evaluator=evaluator, base_latency_ms=base_ms)
                base_count = bar.n if bar is not None else 0
                pr = _run_point(i, len(todo), p, rec, hspace, cfg, ctx, pdir, wd, bar, debug)
                if bar is not None:
                    bar.n = base_count + cfg.max_trials
                    bar.refresh()
                done.write_text(json.dumps(pr.to_dict(), indent=1, default=str))
                results[p.name] = pr
    finally:
        if bar is not None:
            bar.close()
    specs, heads, failed = {}, {}, []
    from ..heads import HeadSpec

    it = [pr for pr in results.values() if pr.status == "ok"]
    if progress and retrain is not None and it:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="training the winners", unit="head")
    for pr in it:
        specs[pr.point] = HeadSpec.from_dict(pr.best["spec"])
        heads[pr.point] = _export_head(pr, rec, retrain, progress, backbone=tb)
    failed = [name for name, pr in results.items() if pr.status != "ok"]
    res = HeadSearchResult(cfg, hspace, specs, heads, failed, results, wd, time.perf_counter() - t_start)
    res.save()
    return res


# --------------------------------------------------------------------------- CLI


PIPELINE_HEAD_KEYS = ("search", "space", "strategy", "max_trials", "port")


def _read_experiment(path: str) -> tuple[dict, str]:
    import yaml

    p = Path(path)
    if not p.is_file():
        cand = Path(__file__).resolve().parents[2] / "experiments" / f"{p.name}.yaml"
        if p.suffix or not cand.is_file():
            raise AutoExitError(f"experiment file {p} does not exist; give a YAML file such as experiments/*.yaml")
        p = cand
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AutoExitError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise AutoExitError(f"{p} must hold a mapping (name, backbone, data, heads, ...)")
    return d, str(p)


def run_from_args(args) -> int:
    """``autoexit search heads --config X.yaml [--port 8081 --max-trials N --strategy S]``."""
    from rich.console import Console
    from rich.table import Table

    from ..pipeline import prepare
    from .pipeline import ExperimentConfig, build_backbone, build_data

    raw, source = _read_experiment(args.config)
    heads = raw.get("heads") or {}
    if not isinstance(heads, Mapping):
        raise AutoExitError("experiment.heads must be a mapping (space, strategy, max_trials, port, ...)")
    port = getattr(args, "port", None)
    if port in (None, DEFAULT_PORT) and heads.get("port") is not None:
        port = heads["port"]  # the CLI default does not override the file
    hcfg = HeadSearchConfig.from_dict(heads, port=port, max_trials=getattr(args, "max_trials", None),
                                      strategy=getattr(args, "strategy", None))
    ecfg = ExperimentConfig.from_dict({**raw, "heads": {k: v for k, v in heads.items() if k in PIPELINE_HEAD_KEYS}},
                                      source=source)
    con = Console()
    torch.manual_seed(ecfg.seed)
    data = build_data(ecfg)
    backbone = build_backbone(ecfg, progress=True, example=data.example())
    enable = ecfg.enable_config()
    tb, points, rec = prepare(backbone, data, enable, progress=True)
    wd = Path(ecfg.run_dir) / "nni-heads"
    ev = ecfg.evaluator
    if isinstance(ev, str):
        ev = {"url": ev}
    con.print(f"head search: {len(hcfg.points or points)} exit point(s), space {hcfg.space}, strategy "
              f"{hcfg.strategy}, {hcfg.max_trials} trials per point, engine {hcfg.engine}"
              + (f"; NNI web UI on http://localhost:{hcfg.port}" if hcfg.engine == "ts" else ""))
    res = search_heads(prepared=(tb, points, rec), config=hcfg, enable=enable, evaluator=ev, workdir=wd)
    t = Table(title=f"best head per exit point (score = agreement - {hcfg.cost_weight:g} x {hcfg.cost} / "
                    f"{hcfg.cost_basis} backbone {hcfg.cost})", title_justify="left")
    for c in ("exit point", "status", "trials", "head", "val agreement", "chance", "head FLOPs", "latency ms",
              "score", "NNI experiment"):
        t.add_column(c)
    for r in res.rows():
        status = {"ok": "ok", "chance": "discarded (chance)", "too_costly": "discarded (too costly)"}[r["status"]]
        t.add_row(r["point"], status, str(r["trials"]), r["head"],
                  _fmt(r["agreement"]), _fmt(r["chance"]), _fmt(r["flops"], "{:,.0f}"), _fmt(r["latency_ms"]),
                  _fmt(r["score"]), str(r["experiment"] or "-"))
    con.print(t)
    con.print(f"results: {res.workdir / 'search.json'}  (specs per point; trials in points/*/trials.jsonl)")
    con.print(f"browse a finished experiment: python -m autoexit.search.nni_heads view {res.workdir} "
              f"--port {hcfg.port}")
    return 0


def _fmt(v, f: str = "{:.4f}") -> str:
    return "-" if v is None else f.format(v)


# --------------------------------------------------------------------------- viewing finished experiments


def list_experiments(workdir: str | Path) -> list[dict]:
    """The NNI experiments under ``workdir`` (id, name, status), newest last."""
    wd = Path(workdir)
    f = wd / "nni" / "nni-experiments" / ".experiment"
    if not f.is_file():
        return []
    d = json.loads(f.read_text() or "{}")
    rows = [{"id": k, "name": v.get("experimentName"), "status": v.get("status"), "start": v.get("startTime")}
            for k, v in d.items()]
    return sorted(rows, key=lambda r: r.get("start") or 0)


def view_experiment(workdir: str | Path, experiment_id: str, port: int = DEFAULT_PORT):
    """Serve a finished experiment's web UI (read-only) on ``port``; returns the experiment (``.stop()`` it).

    ``nnictl view`` cannot reopen NAS experiments in NNI 3.0 (their stored config has a
    search space and a trial directory it refuses); this clears both first.
    """
    from nni.experiment import Experiment
    from nni.tools.nnictl.config_utils import Config

    exp_root = Path(workdir).resolve() / "nni"
    if not (exp_root / experiment_id).is_dir():
        raise AutoExitError(f"no NNI experiment {experiment_id} under {exp_root}; list them with: python -m "
                            f"autoexit.search.nni_heads view {workdir}")
    if _port_in_use(port):
        raise AutoExitError(f"port {port} is in use; pass another with --port N")
    with _nni_home(exp_root), _quiet_nni():
        cfg = Config(experiment_id, str(exp_root)).get_config()
        cfg["searchSpace"] = {}
        cfg["trialCodeDirectory"] = os.getcwd()
        cfg.get("trainingService", {}).pop("trialCodeDirectory", None)
        exp = Experiment(NasExperimentConfig(**cfg), id=experiment_id)
        exp._action = "view"
        with _environ(_manager_env(exp_root)):
            exp.start(port=port, run_mode=RunMode.Background)
    return exp


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m autoexit.search.nni_heads",
                                 description="Browse finished NNI head-search experiments in NNI's web UI.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("view", help="serve a finished experiment's web UI until Ctrl-C")
    v.add_argument("workdir", help="the head-search folder (<run_dir>/nni-heads)")
    v.add_argument("--experiment", help="experiment id (default: list them, then serve the newest)")
    v.add_argument("--port", type=int, default=DEFAULT_PORT)
    a = ap.parse_args(argv)
    try:
        rows = list_experiments(a.workdir)
        for r in rows:
            print(f"{r['id']}  {r['status']:<8} {r['name']}")
        if not rows:
            raise AutoExitError(f"no NNI experiments under {a.workdir}/nni")
        exp_id = a.experiment or rows[-1]["id"]
        exp = view_experiment(a.workdir, exp_id, a.port)
    except AutoExitError as exc:
        print(f"autoexit: {exc}", file=sys.stderr)
        return 2
    print(f"serving experiment {exp_id} on http://localhost:{a.port} (Ctrl-C to stop)", flush=True)
    try:
        with _sigterm_as_interrupt():
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with _nni_home(Path(a.workdir).resolve() / "nni"), _quiet_nni():
            exp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
