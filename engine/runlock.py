"""One process at a time in a run directory: an exclusive `flock` on `<run_dir>/.lock`.

Two `resume=auto` started together would both append to metrics.csv and one would delete the
other's in-flight `.tmp` file. The kernel releases a flock when the last descriptor of the
lock file closes, so a killed run (SIGKILL, OOM, power loss on a local disk) never blocks the
next one, and there is nothing stale to clean up. The file itself stays (deleting it would
let a third process lock a fresh file while the second still holds the old one).
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # run dir -> descriptor: a second train() in this process reuses it


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for the rest of this process, or refuse in one line
    naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then up to the user
        return

    key = str(run_dir.resolve())
    if key in _held:
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"{path}: cannot open the run's lock file ({err.strerror or err})"
                        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another training process (pid {holder}); "
                        f"wait for it to finish or stop it, or pick another run_name=") from None
    except OSError as err:  # a file system without flock (some network mounts)
        os.close(fd)
        raise UserError(f"{path}: cannot lock the run directory ({err.strerror or err})"
                        ) from None
    try:  # who holds it, for the refusal message (only informative: a full disk may refuse)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    _held[key] = fd


def release_inherited_lock() -> None:
    """In a forked child (a DataLoader worker): close the copies of the lock descriptors, so
    that a worker outliving a killed main process cannot keep the run locked."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()

