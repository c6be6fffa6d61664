"""Several worker processes on one study: an exact trial cap, nothing lost or duplicated, killed workers recovered.

The PostgreSQL variants need a server: set ``AUTOEXIT_TEST_POSTGRES_URL`` (e.g.
``postgresql://autoexit:autoexit@127.0.0.1:5432/autoexit_test``); CI installs
Debian's postgresql, starts it on loopback and exports it. The SQLite variants
always run (file lock beside the database).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the outer search needs the 'search' extra (optuna)")

from test_outer_support import make_recorded  # noqa: E402

PG_URL = os.environ.get("AUTOEXIT_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="no PostgreSQL: set AUTOEXIT_TEST_POSTGRES_URL=postgresql://user:pass@127.0.0.1:5432/db "
    "(apt-get install postgresql; pg_ctlcluster 15 main start; createuser/createdb) to run the distributed tests",
)

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from autoexit.search.outer import Recorded, make_objective, optimize

    rec_path, url, name, cap, seed, delay, ready_dir, n_ready = sys.argv[1:9]
    rec = Recorded.load(rec_path)
    settings = {"seed": int(seed), "heartbeat_interval": 1, "grace_period": 2}
    obj = make_objective(rec, "outer_ci", settings)

    def slow(trial):  # sample and score, then 'work' a while: a kill lands mid-trial, after the sampling
        trial.set_user_attr("worker", os.getpid())
        values = obj(trial)
        time.sleep(float(delay))
        return values

    ready = Path(ready_dir)
    (ready / f"{os.getpid()}").touch()
    t0 = time.time()
    while len(list(ready.iterdir())) < int(n_ready) and time.time() - t0 < 120:
        time.sleep(0.05)
    res = optimize(rec, storage=url, study_name=name, max_trials=int(cap), settings=settings, space="outer_ci",
                   objective=slow, progress=False, test=False)
    print(json.dumps({"pid": os.getpid(), "ran": res.timings["trials_this_call"]}))
    """
)


@pytest.fixture(scope="module")
def recorded_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    return make_recorded(seed=4, exits=5, n=800).save(d / "recorded.npz")


def _storages(tmp_path: Path):
    return {"sqlite": f"sqlite:///{tmp_path / 'study.db'}", "postgresql": PG_URL}


def _spawn(tmp_path, recorded_file, url, name, cap, seed, delay, ready, n_ready):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(recorded_file), url, name, str(cap), str(seed),
                             str(delay), str(ready), str(n_ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _load(url, name):
    from autoexit.search.outer import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(url))


def _finish(p, timeout=240) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker failed ({p.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _concurrent(tmp_path, recorded_file, url):
    name = f"coop-{uuid.uuid4().hex[:8]}"
    cap = 30
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [_spawn(tmp_path, recorded_file, url, name, cap, seed, 0.05, ready, 2) for seed in (1, 2)]
    outs = [_finish(p) for p in workers]
    study = _load(url, name)
    trials = study.get_trials(deepcopy=False)
    S = optuna.trial.TrialState
    assert len(trials) == cap, "the study's trial count equals the cap"
    assert all(t.state == S.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(cap)), "no trial number lost or duplicated"
    assert len({t._trial_id for t in trials}) == cap
    assert sum(o["ran"] for o in outs) == cap, "every trial was run by exactly one worker"
    assert all(o["ran"] > 0 for o in outs), "both workers took part"
    assert {t.user_attrs["worker"] for t in trials} == {o["pid"] for o in outs}
    assert all("plan" in t.user_attrs and "val" in t.user_attrs for t in trials)


def _kill_and_resume(tmp_path, recorded_file, url):
    name = f"kill-{uuid.uuid4().hex[:8]}"
    cap = 20
    ready = tmp_path / "ready"
    ready.mkdir()
    a = _spawn(tmp_path, recorded_file, url, name, cap, 1, 0.6, ready, 2)
    b = _spawn(tmp_path, recorded_file, url, name, cap, 2, 0.3, ready, 2)
    S = optuna.trial.TrialState
    killed_trial = None
    deadline = time.time() + 180
    while time.time() < deadline and killed_trial is None:
        time.sleep(0.1)
        try:
            trials = _load(url, name).get_trials(deepcopy=False)
        except KeyError:  # study not created yet
            continue
        mine = [t for t in trials if t.user_attrs.get("worker") == a.pid]
        if sum(t.state == S.COMPLETE for t in mine) >= 2:
            # a running trial that has sampled its parameters: the worker marks the trial before sampling, so a
            # trial seen RUNNING may still have none, and its retry would then sample afresh
            running = [t for t in mine if t.state == S.RUNNING and t.params]
            if running:
                os.kill(a.pid, signal.SIGKILL)
                killed_trial = running[0].number
    assert killed_trial is not None, "worker A never got two trials done"
    a.wait(timeout=30)
    assert a.returncode == -signal.SIGKILL
    _finish(b)  # the other worker finishes
    done = {t.number: (t.params, t.values, t.user_attrs["plan"])
            for t in _load(url, name).get_trials(deepcopy=False) if t.state == S.COMPLETE}
    time.sleep(2.5)  # past the grace period: the killed trial is stale for sure
    ready2 = tmp_path / "ready2"
    ready2.mkdir()
    _finish(_spawn(tmp_path, recorded_file, url, name, cap, 3, 0.0, ready2, 1))  # resume the study
    trials = _load(url, name).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert len(by_number) == len(trials), "no duplicated trial numbers"
    complete = [t for t in trials if t.state == S.COMPLETE]
    assert len(complete) == cap
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
    failed = [t for t in trials if t.state == S.FAIL]
    assert killed_trial in {t.number for t in failed}, "the killed worker's trial was failed by the heartbeat"
    retries = {t.system_attrs.get("failed_trial"): t for t in complete if "failed_trial" in t.system_attrs}
    assert killed_trial in retries, "and retried by a live worker"
    # the retry re-uses every parameter the killed trial had drawn (Optuna enqueues them as fixed parameters); a
    # trial killed while it was still drawing has only some of them, and its retry draws the rest afresh
    drawn = by_number[killed_trial].params
    assert drawn and drawn.items() <= retries[killed_trial].params.items()
    for number, snap in done.items():  # finished trials are intact
        t = by_number[number]
        assert t.state == S.COMPLETE and (t.params, t.values, t.user_attrs["plan"]) == snap


def test_two_workers_share_one_sqlite_study(tmp_path, recorded_file):
    _concurrent(tmp_path, recorded_file, _storages(tmp_path)["sqlite"])


@needs_pg
def test_two_workers_share_one_postgresql_study(tmp_path, recorded_file):
    _concurrent(tmp_path, recorded_file, PG_URL)


@needs_pg
def test_killed_worker_postgresql(tmp_path, recorded_file):
    _kill_and_resume(tmp_path, recorded_file, PG_URL)


@pytest.mark.slow
def test_killed_worker_sqlite(tmp_path, recorded_file):
    _kill_and_resume(tmp_path, recorded_file, _storages(tmp_path)["sqlite"])


@needs_pg
def test_cli_workers_on_postgresql(tmp_path, recorded_file):
    """``autoexit search outer --recorded`` on two shells against one PostgreSQL study."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "autoexit", "search", "outer", "--recorded", str(recorded_file), "--storage", PG_URL,
           "--study-name", name, "--n-trials", "16", "--quiet"]
    ps = [subprocess.Popen([*cmd, "--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for s in (1, 2)]
    for p in ps:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        assert "Pareto front" in out
        cred = PG_URL.split("://", 1)[1].rsplit("@", 1)[0] if "@" in PG_URL else ""
        if ":" in cred:
            assert f":{cred.split(':', 1)[1]}@" not in out  # the dashboard line never shows the password
    trials = _load(PG_URL, name).get_trials(deepcopy=False)
    assert len(trials) == 16 and sorted(t.number for t in trials) == list(range(16))
