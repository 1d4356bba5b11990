"""Exit codes and the one-line error handling shared by the three scripts."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: full traceback
EXIT_BAD_INPUT = 2  # bad config, data file or checkpoint: one line, nothing written
EXIT_INTERRUPTED = 3  # SIGINT/SIGTERM/max_time: checkpoint saved, rerun with resume=auto
EXIT_ABORTED = 130  # second SIGINT: stopped at once, nothing saved for the current step


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Interrupted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Training stopped on request after saving a checkpoint: exit code 3."""


def cli_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into a one-line message and exit code; `debug=true` or
    HYDRA_FULL_ERROR=1 shows the traceback instead."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(cfg.get("debug", False))
        try:
            return main(cfg)
        except UserError as err:
            if debug:
                raise
            if not getattr(err, "quiet", False):  # another torchrun rank already printed it
                print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except Interrupted as err:
            if os.environ.get("RANK", "0") == "0":  # all torchrun ranks stop alike: one line
                print(f"interrupted: {err}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
