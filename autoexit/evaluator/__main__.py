"""``python -m autoexit.evaluator [serve options]``: start the evaluator server."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # guard: the worker process re-imports the main module under spawn
    from .cli import main

    sys.exit(main())
