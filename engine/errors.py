"""Exit codes and the one-line error handling shared by the three scripts."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import reprlib
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

# Exit codes: 0 done; 1 a bug (full traceback); and:
EXIT_BAD_INPUT = 2  # bad config, data file or checkpoint: one line, nothing written
EXIT_INTERRUPTED = 3  # SIGINT/SIGTERM/max_time: checkpoint saved, rerun with resume=auto
EXIT_ABORTED = 130  # second SIGINT: stopped at once, nothing saved for the current step
# What a multirun job that failed on bad input returns instead of exiting (exit code 2 would
# end the whole sweep): the sweep goes on, and the summary and the Optuna sweeper see it.
JOB_FAILED = "job_failed"
# What the file system answers, not a bug: read-only, full, no permission, I/O error, ...
DISK_ERRNOS = {
    getattr(errno, name)
    for name in "EROFS ENOSPC EDQUOT EACCES EPERM EIO EFBIG ENAMETOOLONG ENOTDIR EISDIR EMLINK ETXTBSY EBUSY".split()
}


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Interrupted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Training stopped on request after saving a checkpoint: exit code 3."""


def preempt_signal() -> signal.Signals | None:
    """The scheduler's notice before a time limit (SUBMITIT_PREEMPT_SIGNAL, as submitit reads it,
    else SIGUSR2): here because engine/batches.py's workers must ignore it too."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", getattr(signal, "SIGUSR2", None))


def failed_job(message: str) -> dict[str, Any]:
    return {JOB_FAILED: message, "exit_code": EXIT_BAD_INPUT}


_hydra_raises_until_task = False


@contextlib.contextmanager
def compose_errors_raised() -> Iterator[None]:
    """Until the task starts, Hydra raises what fails (a config that does not compose) instead
    of printing it, for engine.cli.run_main to say in one line; after, Hydra reports again."""
    global _hydra_raises_until_task
    _hydra_raises_until_task = os.environ.get("HYDRA_FULL_ERROR") != "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # read by Hydra when an exception reaches it
    try:
        yield
    finally:
        _task_started()


def _task_started() -> None:
    global _hydra_raises_until_task
    if _hydra_raises_until_task:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _hydra_raises_until_task = False


def cli_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input: one line on stderr, exit code 2 (a multirun job returns `failed_job`: the sweep
    goes on), the traceback too with debug=true. A bug propagates: Hydra's traceback, exit 1."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        _task_started()
        debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
        with contextlib.suppress(Exception):  # a broken config is reported by the checks, not here
            debug = debug or cfg.get("debug", False) is True
        try:
            return main(cfg)
        except Interrupted as err:
            if os.environ.get("RANK", "0") == "0":  # all torchrun ranks stop alike: one line
                print(f"interrupted: {err}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:  # Ctrl-C outside the training loop's handler
            print("\ninterrupted by Ctrl-C", file=sys.stderr)
            sys.exit(EXIT_ABORTED)
        except Exception as err:
            user = user_error_in(err)
            if user is None:
                raise
            if debug:
                traceback.print_exc()
            if not getattr(user, "quiet", False):  # another torchrun rank already printed it
                print(f"error: {one_line(user)}", file=sys.stderr)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep goes on
                return failed_job(one_line(user))
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind `err` (itself, or what a wrapper such as instantiate raised it from),
    or a disk's refusal (read-only, full, no permission) in what it wraps, as one line."""
    cause = err
    for _ in range(20):
        if isinstance(cause, UserError):
            return cause
        cause = getattr(cause, "__cause__", None)
    for _ in range(20):  # torch reports a failed write as a RuntimeError whose context is the OSError
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            names = [str(n) for n in (err.filename, err.filename2) if n is not None]
            return UserError(f"{' -> '.join(names) or 'a write'}: {err.strerror or os.strerror(err.errno)}")
        err = getattr(err, "__cause__", None) or getattr(err, "__context__", None)
    return None


def one_line(err: BaseException) -> str:
    """The message as one line; of a UserError a DataLoader worker re-raised with its traceback
    as the message, the original message (the last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(err):
        return lines[-1].removeprefix(f"{type(err).__module__}.").removeprefix(f"{type(err).__name__}: ")
    return " ".join(lines) or type(err).__name__


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty): a parser's may be pages."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def quote(text: str, limit: int = 40) -> str:
    """Text from a user's file in an error message: repr'd, cut to about `limit` characters (its
    start and end); never the whole of it (a 'CSV' header may be a whole file)."""
    short = reprlib.Repr()
    short.maxstring = limit
    return short.repr(str(text))
