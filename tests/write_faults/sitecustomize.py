"""Test-only: a read-only or full disk for a subprocess, injected from outside the product.

Put this folder first on PYTHONPATH; Python imports `sitecustomize` at start-up. The tests
run as root here, and chmod does not stop root from writing, so the OS errors are raised
by wrapping the calls that write:

  WRITE_FAULT_EROFS=/a/dir[:/b/dir]  creating, replacing, renaming, linking or deleting
                                     anything under these folders fails with EROFS
  WRITE_FAULT_ENOSPC=GLOB[:GLOB]     a file opened for writing whose absolute path matches
                                     (fnmatch) is created, then its first write fails with
                                     ENOSPC (a full disk), like the real thing
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os

_READ_ONLY = [os.path.abspath(p) for p in filter(None, os.environ.get(
    "WRITE_FAULT_EROFS", "").split(os.pathsep))]
_FULL = list(filter(None, os.environ.get("WRITE_FAULT_ENOSPC", "").split(os.pathsep)))


def _path(file) -> str | None:
    if isinstance(file, int):
        return None
    try:
        return os.path.abspath(os.fsdecode(os.fspath(file)))
    except TypeError:
        return None


def _read_only(file) -> None:
    path = _path(file)
    if path and any(path == d or path.startswith(d + os.sep) for d in _READ_ONLY):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(file)))


class _Full:
    """A file whose writes fail as on a full disk."""

    def __init__(self, raw, name: str) -> None:
        self._raw, self._name = raw, name

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    def __iter__(self):
        return iter(self._raw)

    def __getattr__(self, name):
        return getattr(self._raw, name)


_open = builtins.open


def _fault_open(file, mode="r", *args, **kwargs):
    writing = any(c in mode for c in "wax+")
    if writing:
        _read_only(file)
    handle = _open(file, mode, *args, **kwargs)
    path = _path(file)
    if writing and path and any(fnmatch.fnmatch(path, g) for g in _FULL):
        return _Full(handle, path)
    return handle


def _guard(fn, *positions):
    """Like the kernel: a missing source (ENOENT) or an existing folder (EEXIST) is
    reported as such; only a real change is refused."""

    def wrapped(*args, **kwargs):
        for i in positions:
            if i < len(args):
                exists = os.path.lexists(args[i])
                if (fn.__name__ == "mkdir") != exists:
                    _read_only(args[i])
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


if _READ_ONLY or _FULL:
    builtins.open = io.open = _fault_open
    _os_open = os.open
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _fault_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            _read_only(path)
        return _os_open(path, flags, *args, **kwargs)

    os.open = _fault_os_open
    for _name, _positions in (("mkdir", (0,)), ("replace", (0,)), ("rename", (0,)),
                              ("link", (0,)),
                              ("unlink", (0,)), ("remove", (0,)), ("rmdir", (0,)),
                              ("truncate", (0,))):
        setattr(os, _name, _guard(getattr(os, _name), *_positions))
