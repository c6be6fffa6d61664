"""Searches: NNI over exit heads (``nni_heads``), Optuna over the outer parameters (``outer``), both in one run
(``pipeline``).

Importing this package imports nothing heavy (no optuna, nni or torch); the
names below load their module on first use::

    from autoexit.search import optimize, Recorded
    res = optimize(Recorded.from_result(enable_result), n_trials=200)   # optuna
    study, plan = res                                                  # the study and the chosen configuration

Extras: ``pip install 'autoexit[search]'`` (Optuna, optuna-dashboard, psycopg2)
and ``pip install 'autoexit[nas]'`` (NNI) for the head search.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # Optuna outer search (autoexit.search.outer)
    "optimize": "outer",
    "make_objective": "outer",
    "Objective": "outer",
    "Recorded": "outer",
    "ExitCosts": "outer",
    "ExitPlan": "outer",
    "OuterSpace": "outer",
    "OuterSettings": "outer",
    "OuterSearchResult": "outer",
    "Budgets": "outer",
    "PickRule": "outer",
    "TrialCap": "outer",
    "load_space": "outer",
    "make_storage": "outer",
    "fixed_rule": "outer",
    "evaluate_plan": "outer",
    "plan_from_params": "outer",
    "latency_costs": "outer",
    "verify_end_to_end": "outer",
    # the whole run (autoexit.search.pipeline)
    "run_search": "pipeline",
    "run_outer": "pipeline",
    "ExperimentConfig": "pipeline",
    "load_experiment": "pipeline",
    "train_heads_cached": "pipeline",
}

__all__ = sorted([*_LAZY, "search_heads"])


def search_heads(*args: Any, **kwargs: Any):
    """NNI head search (``autoexit.search.nni_heads.search_heads``); needs ``pip install 'autoexit[nas]'``."""
    from .pipeline import _nni_heads

    return _nni_heads().search_heads(*args, **kwargs)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'autoexit.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
