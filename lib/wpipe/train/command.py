"""What an entry point's `__main__` runs: the command line, and bad input as one line.

Errors of the user's input (configuration, data, checkpoints, launch), found before
training starts, print one line `error: ...` on rank 0 (or on the one rank that alone can
see it: a corrupt rank file) and exit with status 2; WPIPE_DEBUG=1 shows the traceback
instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from .loop import setup

INPUT_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""What setting up a run raises for bad input (bugs there look the same: WPIPE_DEBUG=1)."""


def cli(config_class: type, make_task: Callable, argv: Sequence[str] | None = None) -> None:
    """What an entry point's `__main__` runs: `main`, with bad input as one line and status 2."""
    try:
        run = setup(config_class, make_task, argv)
    except INPUT_ERRORS as error:
        if os.environ.get("WPIPE_DEBUG"):
            raise
        if int(os.environ.get("RANK", 0)) == 0 or getattr(error, "rank_only", False):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    run()
