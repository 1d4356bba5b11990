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
_held: dict[str, int] = {}  # lock file -> descriptor: a second train() in this process reuses it


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for the rest of this process, or refuse in one line
    naming the process that holds it."""
    lock_file(run_dir / LOCK_NAME, f"{run_dir} is in use by another training process "
              "({holder}); wait for it to finish or stop it, or pick another run_name=")


def lock_file(path: Path, busy: str) -> None:
    """Hold an exclusive flock on `path` for the rest of this process, or refuse with the
    one line `busy` ({holder}: 'pid N' of the process that holds it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process at a time is then up to the user
        return

    key = _key(path)
    if key in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"{path}: cannot open the lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(busy.replace("{holder}", holder)) from None
    except OSError as err:  # a file system without flock (some network mounts)
        os.close(fd)
        raise UserError(f"{path}: cannot lock it ({err.strerror or err})") from None
    _held[key] = fd


def _key(path: Path) -> str:
    return str(path.parent.resolve() / path.name)


def _holder(fd: int) -> str:
    """'pid N' of the process holding the flock on `fd`'s file, from the kernel's lock table
    (Linux /proc/locks; nothing is written into the folder to say who holds it)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "pid unknown"


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock before the process ends: a train() called in-process (a notebook, a
    test) is done with the folder, and a `python train.py` started next must not be refused."""
    unlock_file(run_dir / LOCK_NAME)


def unlock_file(path: Path) -> None:
    """Release `lock_file(path)`'s lock (nothing if this process does not hold it)."""
    fd = _held.pop(_key(path), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the flock


def release_inherited_lock() -> None:
    """In a forked child (a DataLoader worker): close the copies of the lock descriptors, so
    that a worker outliving a killed main process cannot keep the run locked."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()

