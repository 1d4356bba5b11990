"""Test-only faults, injected from outside the product: a read-only or full disk, and the
kill points of the resume tests.

Put this folder first on a subprocess's PYTHONPATH (`tests.faults.fault_env` does): Python
imports `sitecustomize` at start-up, and the environment arms it; torchrun's ranks inherit
both. The fork server (tests/forkrun.py) calls `install_from_env()` in each child instead,
because a forked child does not run sitecustomize again.

Disk faults. The tests run as root here, and chmod does not stop root from writing, so the OS
errors are raised by wrapping the calls that write:

  WRITE_FAULT_EROFS=/a/dir[:/b/dir]  creating, replacing, renaming, linking or deleting
                                     anything under these folders fails with EROFS
  WRITE_FAULT_ENOSPC=GLOB[:GLOB]     a file opened for writing whose absolute path matches
                                     (fnmatch) is created, then its first write fails with
                                     ENOSPC, as on a full disk

In-process tests call `install(read_only=..., full=...)` and the function it returns undoes it.

Kill points. TEST_FAULTS="name=N,..." (e.g. `kill_in_write=2,term_at_step=37`):

  kill_in_write=N    SIGKILL halfway through this process's Nth checkpoint write
  enospc_in_write=N  the Nth checkpoint write fails with ENOSPC (a full disk)
  int_in_write=N     SIGINT at each record of the Nth write after its first (Ctrl-C pressed
                     twice while saving)
  kill_after_write=N SIGKILL as soon as the Nth checkpoint write is renamed into place
                     (durable), before anything else: links, retention, the trackers' hand-over
  kill_in_hand_over=N
                     SIGKILL as soon as TensorBoard has the Nth batch of values this process
                     sends it (before MLflow gets them)
  kill_at_step=N     SIGKILL after optimizer step N, after that step's periodic save
  term_at_step=N     SIGTERM after step N (a scheduler's preemption notice)
  int_at_step=N      SIGINT after step N (Ctrl-C)
  usr2_at_step=N     SIGUSR2 after step N (SLURM's notice before a time limit, via submitit)

A checkpoint write is a `torch.save` into a temporary `.NAME.pt.PID.tmp` (NAME: epoch_N,
step_N, best, last); its file object is wrapped. N of the step points is the run's global
step: a process counts optimizer steps (a global post-hook; a step the GradScaler skips
counts too) from the step it says it resumed at ("(resumed at epoch E, step S)"). SIGTERM and
SIGINT are sent at once: the product's handler only notes them, so step N is still saved
where it would be and the stop is taken at step N. SIGKILL waits for the next module forward
(the next batch, or validation at an epoch's end), so it lands after step N's periodic save
and before anything later reaches the disk.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import re
import signal
from collections.abc import Callable, Mapping

_READ_ONLY: list[str] = []
_FULL: list[str] = []
_REAL = {"open": builtins.open, "os.open": os.open}
_GUARDED = {
    "mkdir": "missing",
    "replace": "exists",
    "rename": "exists",
    "link": "exists",
    "unlink": "exists",
    "remove": "exists",
    "rmdir": "exists",
    "truncate": "exists",
}
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


def install(read_only: list[str] | tuple[str, ...] = (), full: list[str] | tuple[str, ...] = ()) -> Callable[[], None]:
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


# -------------------------------------------------------------------------- kill points

_STEP_SIGNALS = {
    "kill_at_step": signal.SIGKILL,
    "term_at_step": signal.SIGTERM,
    "int_at_step": signal.SIGINT,
    "usr2_at_step": signal.SIGUSR2,
}
_WRITE_POINTS = ("kill_in_write", "enospc_in_write", "int_in_write", "kill_after_write")
_OTHER_POINTS = ("kill_in_hand_over",)
_CHECKPOINT_TMP = re.compile(r"^\.(epoch_\d+|step_\d+|best|last)\.pt\.\d+\.tmp$")
_RESUMED = re.compile(r"\(resumed at epoch \d+, step (\d+)\)")


class _Kills:
    """What is armed in this process, and the counters the points are numbered by."""

    def __init__(self, faults: dict[str, int]) -> None:
        self.faults, self.step, self.writes, self.kill_after, self.sends = faults, 0, 0, "", 0


_ARMED: _Kills | None = None


def parse(spec: str) -> dict[str, int]:
    """ "kill_at_step=5,int_in_write=2" -> {"kill_at_step": 5, "int_in_write": 2}."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in (*_STEP_SIGNALS, *_WRITE_POINTS, *_OTHER_POINTS):
            known = ", ".join([*_STEP_SIGNALS, *_WRITE_POINTS, *_OTHER_POINTS])
            raise ValueError(f"TEST_FAULTS: unknown fault {name!r} (known: {known})")
        faults[name] = int(value)
    return faults


def _signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


class _FaultyFile:
    """The file object torch.save writes a checkpoint to: the first write goes through, the
    later ones fail, kill or interrupt as armed."""

    def __init__(self, raw, kill: bool, enospc: bool, interrupt: bool) -> None:
        self.raw, self.kill, self.enospc, self.interrupt = raw, kill, enospc, interrupt
        self.written = 0

    def write(self, data) -> int:
        if self.written > 0 and self.interrupt:  # one SIGINT per record written
            _signal_self(signal.SIGINT)
        if self.written > 0 and (self.kill or self.enospc):
            if self.kill:
                self.raw.flush()  # the partial file really is on disk
                _signal_self(signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _target_name(f) -> str:
    """The name of the file torch.save writes: a path, or a file object's (wrapped) name."""
    name = f if isinstance(f, (str, bytes, os.PathLike)) else getattr(f, "name", None)
    try:
        return os.path.basename(os.fsdecode(name))
    except TypeError:  # a file descriptor, or no name at all (a BytesIO)
        return ""


def _install_kills(kills: _Kills) -> None:
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    real_save, real_print, real_replace = torch.save, builtins.print, os.replace
    real_scaler_step = torch.amp.GradScaler.step

    def save(obj, f, *args, **kwargs):
        if not _CHECKPOINT_TMP.match(_target_name(f)):
            return real_save(obj, f, *args, **kwargs)
        kills.writes += 1
        armed = {name: kills.faults.get(name) == kills.writes for name in _WRITE_POINTS}
        if armed["kill_after_write"]:
            kills.kill_after = _target_name(f)
        if not any(armed[name] for name in _WRITE_POINTS[:3]):
            return real_save(obj, f, *args, **kwargs)
        faulty = dict(kill=armed["kill_in_write"], enospc=armed["enospc_in_write"], interrupt=armed["int_in_write"])
        if isinstance(f, (str, bytes, os.PathLike)):  # a path: open it, so the writes pass here
            with builtins.open(f, "wb") as raw:
                return real_save(obj, _FaultyFile(raw, **faulty), *args, **kwargs)
        return real_save(obj, _FaultyFile(f, **faulty), *args, **kwargs)

    def print_(*args, **kwargs):  # the step a resumed run goes on from, as it says it
        if args and isinstance(args[0], str):
            resumed = _RESUMED.search(args[0])
            if resumed:
                kills.step = int(resumed.group(1))
        return real_print(*args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if kills.kill_after and _target_name(src) == kills.kill_after:
            _signal_self(signal.SIGKILL)

    def kill_at_next_forward(module, args) -> None:
        _signal_self(signal.SIGKILL)

    def stepped() -> None:
        kills.step += 1
        for name, sig in _STEP_SIGNALS.items():
            if kills.faults.get(name) == kills.step:
                if sig == signal.SIGKILL:  # after this step's save: at the next forward
                    register_module_forward_pre_hook(kill_at_next_forward)
                else:  # the handler notes it; the loop stops after this step's save
                    _signal_self(sig)

    def after_step(optimizer, args, kwargs) -> None:
        stepped()

    def scaler_step(self, optimizer, *args, **kwargs):
        before = kills.step
        result = real_scaler_step(self, optimizer, *args, **kwargs)
        if kills.step == before:  # inf/NaN gradients: skipped, still a step of the loop
            stepped()
        return result

    torch.save = save
    os.replace = replace
    if "kill_in_hand_over" in kills.faults:
        from engine.loggers import TensorBoardLogger

        real_send = TensorBoardLogger.send

        def send(self, entries):
            real_send(self, entries)
            kills.sends += 1
            if kills.sends == kills.faults["kill_in_hand_over"]:
                _signal_self(signal.SIGKILL)

        TensorBoardLogger.send = send
    builtins.print = print_
    torch.amp.GradScaler.step = scaler_step
    register_optimizer_step_post_hook(after_step)


def install_kills(spec: str) -> None:
    """Arm the TEST_FAULTS kill points in this process (once: they are never disarmed, the
    process is meant to die by them)."""
    global _ARMED
    faults = parse(spec)
    if not faults:
        return
    if _ARMED is not None:
        raise RuntimeError("TEST_FAULTS: kill points are already armed in this process")
    _ARMED = _Kills(faults)
    _install_kills(_ARMED)


def install_from_env(env: Mapping[str, str] | None = None) -> None:
    """Arm what the environment asks for: WRITE_FAULT_EROFS, WRITE_FAULT_ENOSPC, TEST_FAULTS."""
    env = os.environ if env is None else env
    read_only = list(filter(None, env.get("WRITE_FAULT_EROFS", "").split(os.pathsep)))
    full = list(filter(None, env.get("WRITE_FAULT_ENOSPC", "").split(os.pathsep)))
    if read_only or full:
        install(read_only, full)
    install_kills(env.get("TEST_FAULTS", ""))


install_from_env()
