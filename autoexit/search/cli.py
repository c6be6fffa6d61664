"""``autoexit search``: the whole searched pipeline, the Optuna outer search, the NNI head search.

    autoexit search --config experiments/X.yaml            record -> (NNI heads) -> heads -> Optuna -> emit
    autoexit search outer --config X.yaml [--storage URL --study-name NAME --n-trials N]
    autoexit search outer --recorded runs/X/recorded.npz --storage URL --study-name NAME --n-trials N
    autoexit search heads --config X.yaml --port 8081      (NNI; pip install 'autoexit[nas]')

``register`` imports nothing heavy: each handler imports what it needs.
"""

from __future__ import annotations

import argparse

DASHBOARD_PORT = 8080
NNI_PORT = 8081


def _common_outer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="Optuna storage: a database URL (postgresql://user@host/db, sqlite:///f.db) or a "
                   "journal file (*.log); default: sqlite:///<run_dir>/optuna.db")
    p.add_argument("--study-name", help="study to create or continue (default: the experiment name)")
    p.add_argument("--n-trials", type=int, help="total trials of the study, over all workers and resumes "
                   "(default: outer.n_trials of the config)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker of a distributed study its own)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search heads (NNI) and the outer parameters (Optuna), then emit the winner",
        description="Without a subcommand: the whole pipeline of an experiment file: record -> optional NNI head "
        "search -> train heads -> Optuna outer search -> emit the chosen Pareto-front point. Every stage resumes "
        f"from its cache / study. Watch the study with: optuna-dashboard <storage URL> --port {DASHBOARD_PORT}",
    )
    p.add_argument("--config", dest="pipeline_config", metavar="CONFIG",
                   help="experiment file (experiments/*.yaml) for the whole pipeline")
    p.add_argument("--head-search", choices=["on", "off"], help="override heads.search of the config")
    p.add_argument("--no-emit", action="store_true", help="search only; write no artifact")
    _common_outer(p)
    p.set_defaults(func=_search_all, _parser=p)
    ss = p.add_subparsers(dest="search_command", metavar="SUBCOMMAND")

    o = ss.add_parser(
        "outer",
        help="Optuna search of tolerance, split scheme, kept exits (no head search)",
        description="Optuna outer search on recorded predictions. Several machines running this command with the "
        "same --storage (PostgreSQL) and --study-name cooperate on one study; --n-trials caps its total exactly. "
        "A killed worker's trial is retried by the others (heartbeat). Re-running continues the study. "
        f"Dashboard: optuna-dashboard <storage URL> --port {DASHBOARD_PORT}",
    )
    o.add_argument("--config", help="experiment file (experiments/*.yaml): records and trains heads from its caches")
    o.add_argument("--recorded", help="recorded predictions (<run_dir>/recorded.npz of a previous run): run trials "
                   "only, no backbone, no artifact - what extra workers run")
    o.add_argument("--run-dir", help="where the default SQLite study lives with --recorded (default runs/outer)")
    o.add_argument("--no-emit", action="store_true", help="write no artifact")
    _common_outer(o)
    o.set_defaults(func=_search_outer)

    h = ss.add_parser(
        "heads",
        help="NNI search of the exit heads, with NNI's web UI (pip install 'autoexit[nas]')",
        description=f"NNI architecture search of the exit heads of an experiment; the web UI listens on --port "
        f"(default {NNI_PORT}; optuna-dashboard keeps {DASHBOARD_PORT}).",
    )
    h.add_argument("--config", required=True, help="experiment file (experiments/*.yaml)")
    h.add_argument("--port", type=int, default=NNI_PORT, help=f"NNI web UI port (default {NNI_PORT})")
    h.add_argument("--max-trials", type=int, help="trials per experiment (default: from the config)")
    h.add_argument("--strategy", help="NNI strategy: random, tpe, evolution (default: from the config)")
    h.set_defaults(func=_search_heads)


def _search_all(args: argparse.Namespace) -> int:
    from ..errors import AutoExitError

    if not args.pipeline_config:
        raise AutoExitError("autoexit search needs --config experiments/X.yaml (or a subcommand: outer, heads)")
    from .pipeline import run_search

    hs = None if args.head_search is None else args.head_search == "on"
    run = run_search(args.pipeline_config, head_search=hs, storage=args.storage, study_name=args.study_name,
                     n_trials=args.n_trials, seed=args.seed, emit=not args.no_emit, progress=not args.quiet)
    _print_outer(run.outer, run.artifact, run.recorded_path)
    return 0


def _search_outer(args: argparse.Namespace) -> int:
    from ..errors import AutoExitError

    if not args.config and not args.recorded:
        raise AutoExitError("autoexit search outer needs --config experiments/X.yaml or --recorded recorded.npz")
    if args.recorded:
        from .pipeline import run_outer

        res = run_outer(args.recorded, config=args.config, storage=args.storage, study_name=args.study_name,
                        n_trials=args.n_trials, seed=args.seed, run_dir=args.run_dir, progress=not args.quiet)
        _print_outer(res, None, None)
        return 0
    from .pipeline import run_search

    run = run_search(args.config, head_search=False, storage=args.storage, study_name=args.study_name,
                     n_trials=args.n_trials, seed=args.seed, emit=not args.no_emit, progress=not args.quiet)
    _print_outer(run.outer, run.artifact, run.recorded_path)
    return 0


def _search_heads(args: argparse.Namespace) -> int:
    from .pipeline import _nni_heads

    mod = _nni_heads()
    return int(mod.run_from_args(args) or 0)


def _print_outer(res, artifact, recorded_path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .outer import _redact, _storage_url

    con = Console()
    cert = res.certificate is not None
    oof = str(res.recorded.info.get("fit_predictions", "in-sample"))
    how = (f"trials on train{'' if oof == 'in-sample' else f' ({oof})'}, certified on val" if cert
           else "chosen on val")
    t = Table(title=f"Pareto front of study {res.study.study_name} ({how}; test held out)", title_justify="left")
    cols = ["trial", "", "configuration", *(["train cost", "train drop"] if cert else []), "val cost", "val drop",
            *(["certified"] if cert else []), "test cost", "test drop"]
    for c in cols:
        t.add_column(c)
    for r in res.front_rows:
        tc = r.get("test_cost_fraction")
        td = r.get("test_drop_pp")
        fit = [f"{100 * r['fit_cost_fraction']:.1f} %", f"{r['fit_drop_pp']:.2f}"] if cert else []
        t.add_row(str(r["trial"]), "*" if r["chosen"] else "", escape(r["plan"]), *fit,
                  f"{100 * r['val_cost_fraction']:.1f} %", f"{r['val_drop_pp']:.2f}",
                  *(["yes" if r["certified"] else "no"] if cert else []),
                  "-" if tc is None else f"{100 * tc:.1f} %", "-" if td is None else f"{td:.2f}")
    con.print(t)
    s = Table(show_header=False, title="chosen configuration", title_justify="left")
    s.add_column(style="bold")
    s.add_column()
    cf = "latency_fraction" if res.settings.cost == "latency" else "flops_fraction"
    s.add_row("pick rule", escape(res.pick.describe()))
    s.add_row("plan", escape(res.chosen.describe()) if res.chosen.kept else "no exit: the backbone alone")
    if cert:
        s.add_row("guarantee", escape(res.certificate["statement"]))
    s.add_row("val", f"cost {100 * res.val[cf]:.1f} % of the backbone, drop {res.val['drop_pp']:.2f} points "
                     f"({res.val['drop_kind']})")
    if res.test:
        s.add_row("test (held out)", f"cost {100 * res.test[cf]:.1f} %, drop {res.test['drop_pp']:.2f} points")
    if res.baseline and res.baseline.get("test"):
        b = res.baseline
        s.add_row("fixed rule", f"{b['describe']}: test cost {100 * b['test']['flops_fraction']:.1f} %, "
                                f"drop {b['test']['drop_pp']:.2f} points")
    s.add_row("trials", f"{len(res.study.get_trials(deepcopy=False))} in the study, "
                        f"{res.timings.get('trials_this_call', 0)} by this run")
    if recorded_path:
        s.add_row("recorded", f"{recorded_path} (give it to other workers with --recorded)")
    if artifact:
        s.add_row("artifact", str(artifact))
        s.add_row("report", str(artifact / "report.html"))
    con.print(s)
    url = _storage_url(res.study._storage)
    if url:
        con.print(f"dashboard: optuna-dashboard '{_redact(url)}' --port {DASHBOARD_PORT}", soft_wrap=True,
                  highlight=False, markup=False)
