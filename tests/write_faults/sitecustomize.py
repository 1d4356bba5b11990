"""Test-only: a read-only or full disk, injected from outside the product.

Put this folder first on a subprocess's PYTHONPATH: Python imports `sitecustomize` at
start-up, and the environment arms it. The tests run as root here, and chmod does not stop
root from writing, so the OS errors are raised by wrapping the calls that write:

  WRITE_FAULT_EROFS=/a/dir[:/b/dir]  creating, replacing, renaming, linking or deleting
                                     anything under these folders fails with EROFS
  WRITE_FAULT_ENOSPC=GLOB[:GLOB]     a file opened for writing whose absolute path matches
                                     (fnmatch) is created, then its first write fails with
                                     ENOSPC, as on a full disk

In-process tests call `install(read_only=..., full=...)` and the function it returns undoes it.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
from collections.abc import Callable

_READ_ONLY: list[str] = []
_FULL: list[str] = []
_REAL = {"open": builtins.open, "os.open": os.open}
_GUARDED = {"mkdir": "missing", "replace": "exists", "rename": "exists", "link": "exists",
            "unlink": "exists", "remove": "exists", "rmdir": "exists", "truncate": "exists"}
_REAL.update({name: getattr(os, name) for name in _GUARDED})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _abs(file) -> str | None:
    if isinstance(file, int):
        return None
    try:
        return os.path.abspath(os.fsdecode(os.fspath(file)))
    except TypeError:
        return None


def _refuse_if_read_only(file) -> None:
    path = _abs(file)
    if path and any(path == d or path.startswith(d + os.sep) for d in _READ_ONLY):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(file)))


class _Full:
    """A file handle whose writes fail as on a full disk (the file itself was created)."""

    def __init__(self, raw) -> None:
        self._raw = raw

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _open(file, mode="r", *args, **kwargs):
    writing = any(c in mode for c in "wax+")
    if writing:
        _refuse_if_read_only(file)
    handle = _REAL["open"](file, mode, *args, **kwargs)
    path = _abs(file)
    if writing and path and any(fnmatch.fnmatch(path, g) for g in _FULL):
        return _Full(handle)
    return handle


def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS:
        _refuse_if_read_only(path)
    return _REAL["os.open"](path, flags, *args, **kwargs)


def _guard(name: str):
    """Like the kernel: a missing source (ENOENT) or an existing folder (EEXIST) is reported
    as such; only a real change under a read-only folder is refused."""
    real, refuse_when = _REAL[name], _GUARDED[name]

    def wrapped(path, *args, **kwargs):
        if os.path.lexists(path) == (refuse_when == "exists"):
            _refuse_if_read_only(path)
        return real(path, *args, **kwargs)

    return wrapped


def install(read_only: list[str] | tuple[str, ...] = (),
            full: list[str] | tuple[str, ...] = ()) -> Callable[[], None]:
    """Arm the faults in this process; returns the function that disarms them."""
    _READ_ONLY[:] = [os.path.abspath(p) for p in read_only]
    _FULL[:] = list(full)
    builtins.open = io.open = _open
    os.open = _os_open
    for name in _GUARDED:
        setattr(os, name, _guard(name))

    def uninstall() -> None:
        builtins.open = io.open = _REAL["open"]
        os.open = _REAL["os.open"]
        for name in _GUARDED:
            setattr(os, name, _REAL[name])
        _READ_ONLY.clear()
        _FULL.clear()

    return uninstall


_env_read_only = list(filter(None, os.environ.get("WRITE_FAULT_EROFS", "").split(os.pathsep)))
_env_full = list(filter(None, os.environ.get("WRITE_FAULT_ENOSPC", "").split(os.pathsep)))
if _env_read_only or _env_full:
    install(_env_read_only, _env_full)
