"""Writing a run's checkpoints, as timm's CheckpointSaver: write a temporary file, fsync,
rename it over the name, fsync the folder, point last.pt (and best.pt) at it, prune.

With `checkpoint.async=true` a save copies the state into CPU memory and returns; a
background thread (engine.fast_io) then does the same steps. At most one write is in
flight: a save waits for the previous write first. A write that failed in the background
raises its error at the next save, at `wait()`/`close()`, or is printed at interpreter exit.

The Saver writes; it does not know about ranks. Under torchrun train.py calls it on rank 0
only, through `distributed.on_main`, which is also the barrier the other ranks wait at.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError
from engine.fast_io import BackgroundWriter, EarlyWriteback, Snapshot
from engine.run_folder import prune, retained_names, tmp_path


class CheckpointWriteError(UserError):
    """The disk refused a write; the previous checkpoints are untouched."""


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder: `path` names either the old complete file or the new complete file, never a part."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as raw:
            torch.save(state, EarlyWriteback(raw))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        # torch.save's zip writer reports a failed write (ENOSPC, EIO) as a RuntimeError from
        # its cleanup, with the OSError as its context: find it, or re-raise a real bug.
        cause = _os_error(err)
        tmp.unlink(missing_ok=True)
        if cause is None:
            raise
        raise CheckpointWriteError(
            f"{path}: checkpoint write failed ({cause.strerror or cause}); the previous "
            f"checkpoints in {path.parent} are intact") from None


def atomic_link(source: Path, link: Path) -> None:
    """Point `link` (last.pt, best.pt) at the complete file `source` without copying it.

    A hard link keeps its data even after retention deletes `source`; where the file system
    has no hard links, fall back to a full copy (still atomic)."""
    tmp = tmp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{link}: could not update ({err.strerror or err}); "
                                   f"{source} is intact") from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(err: BaseException | None) -> OSError | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class Saver:
    """Writes `epoch_NNNN.pt` / `step_NNNNNNNN.pt`, then points last.pt at it, then prunes.

    Order matters for crash safety: a file is durable before last.pt names it, and old files
    are deleted only after that. `saved` (kept in each checkpoint) lists the periodic files
    this run wrote, so retention never deletes a file it did not write."""

    def __init__(self, run_dir: Path, keep_last: int, saved: list[str] | None = None,
                 background: bool = False) -> None:
        self.run_dir, self.keep_last = run_dir, keep_last
        self.saved = retained_names(run_dir, saved) if saved else []
        self.last_seconds = 0.0  # duration of the latest save (all of it), for trainer.max_time
        self.background = background
        self._writer = BackgroundWriter() if background else None
        self._best: dict[str, Any] | None = None  # best state not yet written (save_best_only)

    def save(self, state: dict[str, Any], name: str, best: bool = False) -> Path:
        start = time.monotonic()
        self.wait()  # at most one write in flight; a failed background write raises here
        path = self.run_dir / name
        if name not in self.saved:
            self.saved.append(name)
        state["saved_files"] = list(self.saved)
        saved = list(self.saved)
        pending, self._best = (None if best else self._best), None
        if self._writer is not None:
            self.saved = saved[-self.keep_last:]  # what prune() keeps once the file is durable
            self._writer.start(self._write, self._writer.snapshot(state), path, best, saved,
                               start, pending)
        else:
            self.saved = self._write(state, path, best, saved, start, pending)
        return path

    def save_best_only(self, state: dict[str, Any]) -> None:
        """best.pt for an epoch that is not a periodic save: a CPU copy kept in memory and
        written (a full, resumable file) just before the next save.

        Writing it at every improving epoch made each epoch cost a file write that grows
        with the model and the run. Deferring is still exact: a kill before the next save
        loses only epochs that the resumed run recomputes bit for bit, best.pt included."""
        state["saved_files"] = list(self.saved)
        # Own buffers: the live tensors keep changing. The config and versions are the same
        # unchanging objects at every save, so they are shared, not deep-copied each epoch.
        shared = {k: state[k] for k in ("config", "versions") if k in state}
        copied = Snapshot().take({k: v for k, v in state.items() if k not in shared})
        self._best = {k: shared[k] if k in shared else copied[k] for k in state}

    def wait(self) -> None:
        """Block until the background write (if any) is durable; raise its error if it failed."""
        if self._writer is None:
            return
        try:
            self._writer.wait()
        except CheckpointWriteError as error:
            raise CheckpointWriteError(f"{error} (background write, checkpoint.async=true)"
                                       ) from None

    def close(self) -> None:
        """Wait for the last write and release the snapshot buffers."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.close()

    def _write(self, state: dict[str, Any], path: Path, best: bool, saved: list[str],
               start: float, pending_best: dict[str, Any] | None = None) -> list[str]:
        """The steps of one save, in their crash-safe order (also the background thread's)."""
        if pending_best is not None:  # first: a resume from `path` must find its best.pt
            atomic_save(pending_best, self.run_dir / "best.pt")
        atomic_save(state, path)
        atomic_link(path, self.run_dir / "last.pt")
        if best:
            atomic_link(path, self.run_dir / "best.pt")
        keep = prune(self.run_dir, saved, self.keep_last)
        self.last_seconds = time.monotonic() - start
        return keep
