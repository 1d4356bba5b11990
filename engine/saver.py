"""The run directory's checkpoint files: periodic saves, last.pt, best.pt and retention.

With `checkpoint.async=true` a save copies the state into CPU memory and returns; a background
thread then writes the file with the same atomic protocol and updates last.pt, best.pt and
retention. At most one write is in flight: a save waits for the previous write first. A write
that failed in the background raises its error at the next save, at `wait()`/`close()`, or is
printed at interpreter exit; the process never exits with a write half done (the thread is
not a daemon, so Python waits for it)."""

from __future__ import annotations

import atexit
import copy
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import (
    CheckpointWriteError,
    atomic_link,
    atomic_save,
    prune,
    retained_names,
)


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
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot = _Snapshot()
        self._best: dict[str, Any] | None = None  # best state not yet written (save_best_only)
        if background:
            _LIVE.add(self)

    def save(self, state: dict[str, Any], name: str, best: bool = False) -> Path:
        start = time.monotonic()
        self.wait()  # at most one write in flight; a failed background write raises here
        path = self.run_dir / name
        if name not in self.saved:
            self.saved.append(name)
        state["saved_files"] = list(self.saved)
        saved = list(self.saved)
        pending, self._best = (None if best else self._best), None
        if self.background:
            self.saved = saved[-self.keep_last:]  # what prune() keeps once the file is durable
            self._start(self._write, self._snapshot.take(state), path, best, saved, start,
                        pending)
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
        copied = _Snapshot().take({k: v for k, v in state.items() if k not in shared})
        self._best = {k: shared[k] if k in shared else copied[k] for k in state}

    def wait(self) -> None:
        """Block until the background write (if any) is durable; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointWriteError):
                raise CheckpointWriteError(f"{error} (background write, checkpoint.async=true)")
            raise error

    def close(self) -> None:
        """Wait for the last write and release the snapshot buffers."""
        try:
            self.wait()
        finally:
            self._snapshot = _Snapshot()
            _LIVE.discard(self)

    # -------------------------------------------------------------------------- internals

    def _write(self, state: dict[str, Any], path: Path, best: bool, saved: list[str],
               start: float, pending_best: dict[str, Any] | None = None) -> list[str]:
        if pending_best is not None:  # first: a resume from `path` must find its best.pt
            atomic_save(pending_best, self.run_dir / "best.pt")
        atomic_save(state, path)
        atomic_link(path, self.run_dir / "last.pt")
        if best:
            atomic_link(path, self.run_dir / "best.pt")
        keep = prune(self.run_dir, saved, self.keep_last)
        self.last_seconds = time.monotonic() - start
        return keep

    def _start(self, target: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as err:  # kept for the main thread, raised by wait()
                self._error = err

        # Not a daemon: at interpreter exit Python joins it, so a started write always ends.
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()


class _Snapshot:
    """Copies a checkpoint's tensors into CPU buffers kept from one save to the next.

    Copying storage by storage keeps what torch.save would write: views and tied weights
    still share one storage, so the file holds the same records as a synchronous save.
    Reusing the buffers avoids fresh page faults on every save (on this kind of machine
    allocating 1 GiB costs several times the copy itself)."""

    def __init__(self) -> None:
        self.buffers: list[torch.UntypedStorage] = []

    def take(self, state: Any) -> Any:
        copies: dict[tuple[str, int], torch.UntypedStorage] = {}
        used: list[torch.UntypedStorage] = []
        cuda = False

        def storage_copy(source: torch.UntypedStorage) -> torch.UntypedStorage:
            nonlocal cuda
            # Tensors sharing a storage share its copy; empty storages are never shared.
            key = (str(source.device), source.data_ptr() or -len(used) - 1)
            if key not in copies:
                index = len(used)
                buffer = self.buffers[index] if index < len(self.buffers) else None
                if buffer is None or buffer.nbytes() != source.nbytes():
                    pin = source.device.type == "cuda"
                    buffer = torch.empty(source.nbytes(), dtype=torch.uint8,
                                         pin_memory=pin).untyped_storage()
                buffer.copy_(source, non_blocking=source.device.type == "cuda")
                cuda = cuda or source.device.type == "cuda"
                copies[key] = buffer
                used.append(buffer)
            return copies[key]

        def tensor_copy(tensor: torch.Tensor) -> torch.Tensor:
            if (type(tensor) is not torch.Tensor or tensor.layout != torch.strided
                    or tensor.is_quantized):  # rare kinds: a plain deep copy
                return copy.deepcopy(tensor.detach()).cpu()
            out = torch.empty(0, dtype=tensor.dtype).set_(
                storage_copy(tensor.untyped_storage()), tensor.storage_offset(),
                tensor.size(), tensor.stride())
            return out.requires_grad_(tensor.requires_grad)

        def walk(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor_copy(obj)
            if isinstance(obj, dict):
                out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
                for key, value in obj.items():
                    out[key] = walk(value)
                if getattr(obj, "__dict__", None) and hasattr(out, "__dict__"):  # `_metadata`
                    out.__dict__.update(copy.deepcopy(obj.__dict__))
                return out
            if isinstance(obj, list):
                return [walk(v) for v in obj]
            if isinstance(obj, tuple):
                items = [walk(v) for v in obj]
                return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
            if obj is None or type(obj) in (int, float, str, bool):
                return obj  # immutable: no deepcopy (a checkpoint has many of these)
            return copy.deepcopy(obj)

        result = walk(state)
        if cuda:
            torch.cuda.synchronize()
        self.buffers = used
        return result


# Savers with a background writer, checked at exit for an error nobody has seen yet.
_LIVE: weakref.WeakSet[Saver] = weakref.WeakSet()


@atexit.register
def _report_unseen_errors() -> None:
    for saver in list(_LIVE):
        try:
            saver.wait()
        except BaseException as err:  # noqa: BLE001 - reporting at exit is all we can do
            print(f"error: {err}", file=sys.stderr)
