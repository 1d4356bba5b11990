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

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: full traceback
EXIT_BAD_INPUT = 2  # bad config, data file or checkpoint: one line, nothing written
EXIT_INTERRUPTED = 3  # SIGINT/SIGTERM/max_time: checkpoint saved, rerun with resume=auto
EXIT_ABORTED = 130  # second SIGINT: stopped at once, nothing saved for the current step


def preempt_signal() -> signal.Signals | None:
    """The scheduler's notice before a time limit, which also stops a run with
    EXIT_INTERRUPTED: SIGUSR2, or the one SUBMITIT_PREEMPT_SIGNAL names, as submitit reads it
    (None without SIGUSR2). Here, not in engine/training.py (which imports engine/batches.py),
    because engine/batches.py's workers must ignore it."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", getattr(signal, "SIGUSR2", None))


# What a multirun job that failed on bad input returns instead of exiting (exit code 2 would
# end the whole sweep): the sweep goes on, and the summary and the Optuna sweeper see it.
JOB_FAILED = "job_failed"


def failed_job(message: str) -> dict[str, Any]:
    return {JOB_FAILED: message, "exit_code": EXIT_BAD_INPUT}


def in_multirun() -> bool:
    """Is this a job of a Hydra multirun (-m)?"""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        return False


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Interrupted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Training stopped on request after saving a checkpoint: exit code 3."""


_hydra_raises_until_task = False


@contextlib.contextmanager
def compose_errors_raised() -> Iterator[None]:
    """Until the task starts, Hydra raises what fails (a config that does not compose)
    instead of printing it, so that engine.cli.run_main can say it in one line. From the
    task on (cli_errors), and whatever way the block ends, Hydra reports as usual again."""
    global _hydra_raises_until_task
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        os.environ["HYDRA_FULL_ERROR"] = "1"  # read by Hydra when an exception reaches it
        _hydra_raises_until_task = True
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
    """Turn bad input into one line on stderr and exit code 2 (in a multirun job: the
    `failed_job` result, so the sweep goes on); `debug=true` or
    HYDRA_FULL_ERROR=1 prints the traceback too (still exit 2). Any other exception is a bug:
    it propagates, and Hydra prints its traceback and exits 1."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        _task_started()
        debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or _debug(cfg)
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
            if in_multirun():  # the next job still runs; the sweep reports this one failed
                return failed_job(one_line(user))
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _debug(cfg: Any) -> bool:
    try:
        return cfg.get("debug", False) is True
    except Exception:  # a broken config is reported by the checks, not here
        return False


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind `err`: itself, or the cause that a wrapper (hydra's instantiate)
    raised it from; or a disk's refusal (read-only, full, no permission), as one line."""
    first, seen = err, 0
    while err is not None and seen < 20:
        if isinstance(err, UserError):
            return err
        err, seen = err.__cause__, seen + 1
    disk = _disk_error_in(first)
    return UserError(disk) if disk else None


# What the file system answers, not a bug: read-only, full, no permission, I/O error, ...
DISK_ERRNOS = {
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EMLINK,
    errno.ETXTBSY,
    errno.EBUSY,
}


def _disk_error_in(err: BaseException | None) -> str | None:
    """'PATH: strerror' for an OSError of DISK_ERRNOS in `err` or what it wraps (torch
    reports a failed write as a RuntimeError whose context is the OSError)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            names = [str(n) for n in (err.filename, err.filename2) if n is not None]
            where = " -> ".join(names) or "a write"
            return f"{where}: {err.strerror or os.strerror(err.errno)}"
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def one_line(err: BaseException) -> str:
    """The message as one line. A DataLoader worker re-raises a UserError with its whole
    traceback as the message: keep the original message (its last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and "Traceback" in str(err):
        last = lines[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        return last.removeprefix(prefix).removeprefix(f"{type(err).__name__}: ")
    return " ".join(lines)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty): for errors
    raised while parsing a file, whose full text may be pages long."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def quote(text: str, limit: int = 40) -> str:
    """Text from a user's file, quoted in an error message: repr'd and cut to about `limit`
    characters (its start and end), never the whole of it; a header line of a 'CSV' may be
    a whole file, such as /proc/self/environ."""
    short = reprlib.Repr()
    short.maxstring = limit
    return short.repr(str(text))
