"""The ``autoexit`` command.

Subcommands live next to the code they drive: each of the modules named in
``_PLUGINS`` exposes ``register(subparsers)`` that adds its parsers and sets
``func`` on them. ``register`` must stay cheap (no torch/nni/optuna imports at
module import time); the handler imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AutoExitError

_PLUGINS = [
    "autoexit.commands",  # quickstart, enable, inspect
    "autoexit.search.cli",  # search heads / outer / whole pipeline
    "autoexit.evaluator.cli",  # evaluator serve / probe
    "autoexit.partition_cli",  # partition (performance model, runtime)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoexit",
        description="Turn a pre-trained classifier into a searched early-exit model.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # plugin not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except AutoExitError as exc:
        print(f"autoexit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoexit: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
