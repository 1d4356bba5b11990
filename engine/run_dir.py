"""A run folder and everything that writes to it: checkpoints/RUN_NAME/ holds .lock (flock),
epoch_NNNN.pt / step_NNNNNNNN.pt (the newest checkpoint.keep_last), last.pt / best.pt (hard
links), metrics.csv, config.yaml, loss_curve.png, test_metrics.json, export/. Every file is
written under a temporary name and renamed over its name: a kill or a full disk leaves the old
file or the new one, never a part; a damaged checkpoint is set aside as NAME.corrupt[.N]."""

from __future__ import annotations

import atexit
import contextlib
import copy
import csv
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import weakref
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engine import distributed as ddp
from engine.config import from_start_dir
from engine.errors import UserError, first_line

PERIODIC = re.compile(r"^(epoch_\d+|step_\d+)\.pt$")
LINKS = ("last.pt", "best.pt")
RUN_FILES = re.compile(r"^(epoch_\d+|step_\d+|last|best)\.pt$|^metrics\.csv$")
LOCK_NAME = ".lock"
Loader = Callable[[Any, Any], dict]  # (path, map_location) -> a verified checkpoint


def job_name(hydra_cfg: Any) -> str:
    """A multirun job's folder name: its overrides (hydra.job.override_dirname), made safe."""
    return re.sub(r"[^\w.,=+-]", "_", hydra_cfg.job.override_dirname) or str(hydra_cfg.job.num)


def run_dir_of(cfg: DictConfig, hydra_cfg: Any = None) -> Path:
    """<checkpoint.root>/<run_name or name>; a multirun job's: <hydra.sweep.dir>/<its overrides>
    (the sweep's folder, engine/sweeps.py). `hydra_cfg`: a finished job's (default: the running
    job's)."""
    if hydra_cfg is None and HydraConfig.initialized():  # not when tests compose configs
        hydra_cfg = HydraConfig.get()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = from_start_dir(str(hydra_cfg.sweep.dir))  # hydra.job.chdir=true
        return run_dir_for(sweep_dir, job_name(hydra_cfg), key="hydra.job.override_dirname")
    return run_dir_for(cfg.checkpoint.root, str(cfg.run_name or cfg.name))


def run_dir_for(root: str | Path, run_name: str, key: str = "run_name") -> Path:
    """<root>/<run_name>, refusing names that would leave the root (checkpoint.root, or a
    multirun's sweep folder)."""
    name = str(run_name)
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or name.startswith("~"):
        raise UserError(f"{key}={name!r}: expected a relative name inside checkpoint.root (no '..', no absolute path)")
    run_dir = Path(root) / name
    if not run_dir.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{key}={name!r}: resolves outside checkpoint.root={root}")
    return run_dir


# Hand-written, not filelock: the refusal names the holding pid, and forked workers drop their
# copy. A killed run's flock goes with its last descriptor; the file stays (deleting it would
# let a third process lock a new file the second never sees).
_held: dict[str, int] = {}  # lock file -> descriptor: a second train() in this process reuses it


def lock_file(path: Path, busy: str) -> None:
    """Hold a flock on `path` for this process, or refuse with `busy` ({holder}: 'pid N')."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process at a time is then up to the user
        return
    key = str(path.parent.resolve() / path.name)
    if key in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"{path}: cannot open the lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:  # busy, or a file system without flock (some network mounts)
        holder = _holder(fd) if isinstance(err, BlockingIOError) else None
        os.close(fd)
        why = busy.replace("{holder}", holder) if holder else f"{path}: cannot lock it ({err.strerror or err})"
        raise UserError(why) from None
    _held[key] = fd


def unlock_file(path: Path) -> None:
    if (fd := _held.pop(str(path.parent.resolve() / path.name), None)) is not None:
        os.close(fd)


def _holder(fd: int) -> str:
    """'pid N' holding the flock on `fd`'s file, from Linux's /proc/locks."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as table:
        for fields in map(str.split, table):  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF"
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                return f"pid {fields[4]}"
    return "pid unknown"


def _lock_run(run_dir: Path) -> None:
    busy = f"{run_dir} is in use by another training process ({{holder}}); wait for it to finish or stop it"
    lock_file(run_dir / LOCK_NAME, busy + ", or pick another run_name=")


def _drop_inherited_locks() -> None:
    """A forked child (DataLoader worker) outliving a killed run must not hold its lock."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


# ------------------------------------------------------------------------- writing files
def _replace(path: Path, write: Callable[[IO], object], binary: bool = True, durable: bool = True) -> None:
    """`write(handle)` into a temporary file renamed over `path`; durable: fsynced, and its folder.
    On failure the temporary goes and the OSError is raised (torch's zip writer wraps it in a
    RuntimeError)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise  # a bug, not the disk
        raise cause from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """A small output (metrics, plots, predictions, config.yaml); a failure is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, write, binary, durable=False)
    except OSError as err:
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
    return path


def check_output(path: Path, own_kind: Callable[[Path], bool], what: str, reads: tuple = (), name: str = "") -> None:
    """evaluate.py / predict.py replace an existing file only when it is their own kind of
    output (by content: a renamed checkpoint is still a checkpoint), never one being read."""
    name = name or f"output={path}"
    for source in filter(None, reads):
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise UserError(f"{name}: is the same file as {source}, which is being read; choose another output=")
    if path.is_dir():
        raise UserError(f"{name}: is a folder; expected a file name")
    if path.exists() and not own_kind(path):
        raise UserError(
            f"{name}: exists and is not {what}; refusing to overwrite it (a checkpoint, export, metrics.csv "
            "or config.yaml is never overwritten); choose another output="
        )


def is_eval_json(path: Path) -> bool:
    """evaluate.py's metrics JSON: an object with `samples` and `source` keys."""
    try:
        data = json.loads(path.read_bytes()) if path.stat().st_size < 1 << 20 else None
    except ValueError:  # UnicodeDecodeError too
        return False
    return isinstance(data, dict) and {"samples", "source"} <= data.keys()


def is_predictions_csv(path: Path) -> bool:
    """predict.py's CSV: the header ends with `prediction` (or `prediction_N`) or `class,probability`."""
    with open(path, "rb") as handle:
        header = handle.readline(1 << 16).rstrip(b"\r\n").split(b",")
    return bool(re.fullmatch(rb"prediction(_.*)?", header[-1])) or header[-2:] == [b"class", b"probability"]


def is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def check_export_dir(out_dir: Path) -> None:
    """An export folder is new, empty or an earlier export: not a run's, nor another config's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; expected an export folder")
    run_files = sorted(p.name for p in out_dir.iterdir() if RUN_FILES.match(p.name)) if out_dir.is_dir() else []
    if run_files:
        where = f"export into a folder of its own, e.g. {out_dir / 'export'}"
        raise UserError(f"{out_dir}: is a run folder ({', '.join(run_files[:3])}); {where}")
    if (out_dir / "config.yaml").exists() and not (out_dir / "model.safetensors").is_file():
        raise UserError(
            f"{out_dir}: has a config.yaml that is not an export's; refusing to overwrite it; choose another folder"
        )


# ------------------------------------------------------------------------ checkpoint files
class CheckpointWriteError(UserError):
    """The disk refused a write; the previous checkpoints are intact."""


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, fsync, rename over `path`, fsync the folder."""
    try:
        _replace(path, lambda out: torch.save(state, out))
    except OSError as err:
        why = f"checkpoint write failed ({err.strerror or err}); the previous checkpoints in {path.parent} are intact"
        raise CheckpointWriteError(f"{path}: {why}") from None


def atomic_link(source: Path, link: Path) -> None:
    """Point `link` (last.pt, best.pt) at `source`: a hard link (outlives retention deleting
    `source`), or a copy where there are none."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
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
        raise CheckpointWriteError(f"{link}: could not update ({err.strerror or err}); {source} is intact") from None


def verify(path: Path) -> None:
    """Every zip record's CRC-32 (torch.load checks none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # a damaged header raises BadZipFile, NotImplementedError, ...
        raise UserError(f"{path}: not a complete checkpoint file ({first_line(err)})") from None
    if bad is not None:
        raise UserError(f"{path}: corrupted checkpoint (checksum mismatch in record {bad})")


class Snapshot:
    """CPU copies of a state's tensors in buffers reused between saves (allocating costs more than
    copying), storage by storage: views and tied weights share one, as in a synchronous save. The
    containers are copied by pickle, as torch.save writes them."""

    def __init__(self) -> None:
        self.buffers: list[torch.UntypedStorage] = []

    def take(self, state: Any) -> Any:
        copies: dict[tuple[str, int], torch.UntypedStorage] = {}
        tensors: list[torch.Tensor] = []

        def storage_copy(source: torch.UntypedStorage) -> torch.UntypedStorage:
            # tensors sharing a storage share its copy; empty storages are never shared
            key = (str(source.device), source.data_ptr() or -len(copies) - 1)
            if key not in copies:
                buffer = self.buffers[len(copies)] if len(copies) < len(self.buffers) else None
                on_gpu = source.device.type == "cuda"
                if buffer is None or buffer.nbytes() != source.nbytes():
                    buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=on_gpu).untyped_storage()
                buffer.copy_(source, non_blocking=on_gpu)
                copies[key] = buffer
            return copies[key]

        def tensor_copy(obj: Any) -> int | None:  # pickle's persistent id: the copy's index
            if not isinstance(obj, torch.Tensor):
                return None
            if type(obj) is torch.Tensor and obj.layout == torch.strided and not obj.is_quantized:
                out = torch.empty(0, dtype=obj.dtype).set_(
                    storage_copy(obj.untyped_storage()), obj.storage_offset(), obj.size(), obj.stride()
                )
                tensors.append(out.requires_grad_(obj.requires_grad))
            else:  # rare kinds (subclasses, sparse): a plain deep copy
                tensors.append(copy.deepcopy(obj.detach()).cpu())
            return len(tensors) - 1

        containers = io.BytesIO()
        pickler = pickle.Pickler(containers, pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = tensor_copy
        pickler.dump(state)
        containers.seek(0)
        unpickler = pickle.Unpickler(containers)
        unpickler.persistent_load = tensors.__getitem__
        result = unpickler.load()
        if torch.cuda.is_initialized():  # the non-blocking copies have landed
            torch.cuda.synchronize()
        self.buffers = list(copies.values())
        return result


def prune(run_dir: Path, saved: list[str], keep_last: int) -> list[str]:
    """Delete the periodic files this run wrote beyond the newest `keep_last`; return the rest."""
    keep = saved[-keep_last:]
    for name in saved[:-keep_last]:
        if name not in keep and _retainable(run_dir, name):
            (run_dir / name).unlink(missing_ok=True)
    return keep


def _retainable(run_dir: Path, name: Any) -> bool:
    """Only a periodic name of a non-link is ever deleted, whatever saved_files says."""
    return isinstance(name, str) and bool(PERIODIC.match(name)) and not (run_dir / name).is_symlink()


class CheckpointSaver:
    """Writes a periodic file, points last.pt (and best.pt) at it, prunes only what this run wrote
    (`saved`, kept in each checkpoint). background=True (checkpoint.async): one write in flight
    at a time; its error raises at the next save(), wait() or close(), or prints at exit."""

    def __init__(self, run_dir: Path, keep_last: int, saved: list[str] | None = None, background: bool = False) -> None:
        self.run_dir, self.keep_last = run_dir, keep_last
        self.saved = [name for name in saved or [] if _retainable(run_dir, name)]
        if ignored := [name for name in saved or [] if name not in self.saved]:
            print(
                f"warning: {run_dir}: the checkpoint's saved_files lists {len(ignored)} name(s) that are not this "
                f"run's periodic checkpoints, e.g. {ignored[0]!r}; retention ignores them and never deletes them",
                file=sys.stderr,
            )
        self.last_seconds = 0.0  # the latest save's duration, for trainer.max_time
        # the writer thread is joined at exit before atexit runs: the process never exits mid-write
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._pending: Future | None = None
        self._snapshot = Snapshot()
        self._best: dict[str, Any] | None = None  # best state not written yet (save_best_only)
        _LIVE.add(self)

    def save(self, state: dict[str, Any], name: str, best: bool = False, then: Callable | None = None) -> Path:
        """`then()` once the file is durable (checkpoint.async: in the writer thread, before the
        next save starts): the trackers get the values it holds, not before, not later."""
        start = time.monotonic()
        self.wait()  # at most one write in flight; a failed background write raises here
        path = self.run_dir / name
        if name not in self.saved:
            self.saved.append(name)
        state["saved_files"] = saved = list(self.saved)
        self.saved = saved[-self.keep_last :]  # what prune() keeps once the file is durable
        best_state, self._best = (None if best else self._best), None

        def write(state: dict[str, Any]) -> None:
            if best_state is not None:  # first: a resume from `path` must find its best.pt
                atomic_save(best_state, self.run_dir / "best.pt")
            atomic_save(state, path)
            atomic_link(path, self.run_dir / "last.pt")
            if best:
                atomic_link(path, self.run_dir / "best.pt")
            prune(self.run_dir, saved, self.keep_last)
            self.last_seconds = time.monotonic() - start
            if then is not None:
                then()

        if self._writer is None:
            write(state)
        else:
            self._pending = self._writer.submit(write, self._snapshot.take(state))
        return path

    def save_best_only(self, state: dict[str, Any]) -> None:
        """best.pt of an epoch that is not a periodic save: a CPU copy written with the next
        save; a kill before then loses only epochs a resume recomputes exactly."""
        state["saved_files"] = list(self.saved)
        # the config and versions are the same objects at every save: shared, not copied
        copied = Snapshot().take({k: v for k, v in state.items() if k not in ("config", "versions")})
        self._best = {k: copied.get(k, v) for k, v in state.items()}

    def wait(self) -> None:
        """Block until the background write is durable; raise its error."""
        if self._pending is None:
            return
        error = self._pending.exception()  # Ctrl-C while waiting leaves it pending
        self._pending = None
        if isinstance(error, CheckpointWriteError):
            raise CheckpointWriteError(f"{error} (background write, checkpoint.async=true)")
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the last write; free the writer, the buffers and the lock (for a later train())."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
            self._snapshot = Snapshot()
            _LIVE.discard(self)
            unlock_file(self.run_dir / LOCK_NAME)


_LIVE: weakref.WeakSet[CheckpointSaver] = weakref.WeakSet()  # savers with a write maybe in flight


@atexit.register
def _report_unseen_errors() -> None:
    for saver in list(_LIVE):
        try:
            saver.wait()
        except BaseException as err:  # noqa: BLE001 - reporting at exit is all we can do
            print(f"error: {err}", file=sys.stderr)


# --------------------------------------------------------------------- find latest
def find_latest(run_dir: Path, load: Loader, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of `run_dir` that `load` accepts; newer ones it refuses are set
    aside. Only names train.py writes, each inode once under its periodic name."""
    groups: dict[int, list[Path]] = {}
    for path in sorted(run_dir.glob("*.pt"), key=lambda p: (not PERIODIC.match(p.name), p.name)):
        if path.is_file() and (PERIODIC.match(path.name) or path.name in LINKS):
            groups.setdefault(path.stat().st_ino, []).append(path)
    candidates = []
    for paths in groups.values():
        try:  # a cheap read of the progress counters; full verification below
            head = _head(paths[0])
            candidates.append(((int(head.get("global_step", 0)), int(head.get("epoch", 0))), paths))
        except Exception as err:  # any unreadable file is set aside, not fatal
            try:  # the zip check names the problem better (truncated, checksum)
                verify(paths[0])
                why = f"unreadable ({type(err).__name__}: {first_line(err, 160)})"
            except UserError as bad:
                why = str(bad).removeprefix(f"{paths[0]}: ")
            _set_aside(paths, why)
    for _, paths in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            return paths[0], load(paths[0], map_location)
        except UserError as err:
            _set_aside(paths, str(err).removeprefix(f"{paths[0]}: "))
    return None


def _head(path: Path) -> Any:
    """A checkpoint memory-mapped: its counters are read, its tensors are not."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _set_aside(paths: list[Path], why: str) -> None:
    """Rename a bad file (and its links) to NAME.corrupt[.N], never overwriting one."""
    moved = []
    for path in paths:
        aside, n = path.with_name(path.name + ".corrupt"), 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt.{n}")
        try:
            os.replace(path, aside)
        except OSError as err:  # a read-only folder: say what was wrong with the file too
            raise UserError(f"{path}: {why}; cannot set it aside as {aside.name} ({err.strerror or err})") from None
        moved.append(aside.name)
    links = f" (and its links {', '.join(moved[1:])})" if len(moved) > 1 else ""
    warnings.warn(f"skipped {paths[0]}: {why}; kept it as {moved[0]}{links}", stacklevel=3)


# ---------------------------------------------------------------------------- opening a run
def open_run(cfg: DictConfig, device: torch.device, load: Loader) -> tuple[Path, CheckpointSaver, dict | None]:
    """The run folder (locked), its saver and the checkpoint to resume from. Rank 0 decides;
    the other ranks read the file it names."""
    opened: list[Any] = []  # rank 0's saver and checkpoint

    def on_rank0() -> tuple[Path, Path | None]:
        run_dir, saver, resumed, source = _open(cfg, device, load)
        opened.extend((saver, resumed))
        return run_dir, source

    run_dir, source = ddp.on_main(on_rank0)
    if opened:
        saver, resumed = opened
    else:
        try:
            resumed = with_history(load(source, device), source) if source else None
        except UserError as err:
            hint = "with several nodes, checkpoint.root must be on a file system every node shares"
            raise UserError(f"rank {ddp.rank()}: {err} ({hint})") from None
        saver = CheckpointSaver(run_dir, cfg.checkpoint.keep_last)
    return run_dir, saver, resumed


def _open(
    cfg: DictConfig, device: torch.device, load: Loader
) -> tuple[Path, CheckpointSaver, dict | None, Path | None]:
    run_dir = run_dir_of(cfg)
    resume = None if cfg.resume is None else str(cfg.resume)
    # resume_mode=weights: a new schedule from a checkpoint's weights, so a new folder
    weights_mode = str(cfg.get("resume_mode", "exact")) == "weights"
    try:
        if run_dir.is_dir():  # before reading or cleaning anything in it
            _lock_run(run_dir)
        existing = sorted(p.name for p in run_dir.glob("*.pt"))
        if weights_mode and resume in (None, "auto"):
            raise UserError(
                "resume_mode=weights: name the checkpoint to start from with resume=PATH (and a new run_name=)"
            )
        if weights_mode and existing:
            raise UserError(
                f"resume_mode=weights starts a new run, but {run_dir} already has checkpoints; set run_name=NEW_NAME"
            )
        if resume is None and existing:
            listed = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
            how = "continue it with resume=auto or start another with run_name=NEW_NAME"
            raise UserError(f"{run_dir} already has checkpoints ({listed}); {how}")
        source = state = None
        if resume == "auto":
            for tmp in run_dir.glob(".*.tmp"):  # half-written by a process that died mid-save
                tmp.unlink(missing_ok=True)
            found = find_latest(run_dir, load, device)
            print(
                f"resuming from {found[0]}" if found else f"resume=auto: no checkpoint in {run_dir}, starting a new run"
            )
            if found:
                _mend_links(run_dir, *found)
                source, state = found
        elif resume is not None:
            source, state = Path(resume), load(Path(resume), device)
            if existing and source.resolve().parent != run_dir.resolve():
                how = f"set run_name=NEW_NAME to continue {source} there"
                raise UserError(f"resume={source}: {run_dir} already has checkpoints of another run; {how}")
        resumed = None if source is None else with_history(state, source)
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock_run(run_dir)  # a new folder is locked once it exists (no-op if held)
    except BaseException:  # refused: an in-process caller may go on, a later run must not wait
        unlock_file(run_dir / LOCK_NAME)
        raise
    saved = None if weights_mode else (resumed or {}).get("saved_files")
    saver = CheckpointSaver(run_dir, cfg.checkpoint.keep_last, saved, background=bool(cfg.checkpoint.get("async")))
    weakref.finalize(saver, unlock_file, run_dir / LOCK_NAME)  # however train() ends
    return run_dir, saver, resumed, source


def _mend_links(run_dir: Path, path: Path, state: dict) -> None:
    """last.pt (and best.pt, when `path` is the best epoch) point at the checkpoint resumed from:
    a kill between a file's rename and its links left them at the one before."""
    if path.name in LINKS:
        return
    best = (state.get("best") or {}).get("epoch") == state.get("epoch") and not state.get("step_in_epoch")
    last, best_pt = run_dir / "last.pt", run_dir / "best.pt"
    if not last.exists() or not last.samefile(path):
        atomic_link(path, last)
    if best and (not best_pt.exists() or _head(best_pt).get("epoch") != state.get("epoch")):
        atomic_link(path, best_pt)


def accept_run(run_dir: Path, cfg: DictConfig, resumed: dict | None, trains: bool = True) -> None:
    """The checkpoint is restored: only now does the folder change. A complete run (`trains`
    false) keeps its config.yaml, the values that ran."""
    text, source = OmegaConf.to_yaml(cfg, resolve=True), Path(str(cfg.resume))

    def on_rank0() -> None:
        if trains or not (run_dir / "config.yaml").exists():
            write_atomic(run_dir / "config.yaml", lambda out: out.write(text))
        if resumed and str(cfg.resume) != "auto" and source.resolve().parent != run_dir.resolve():
            _bring_best_along(run_dir, source, resumed)  # another folder's run keeps its best epoch

    ddp.on_main(on_rank0)


def _bring_best_along(run_dir: Path, source: Path, resumed: dict) -> None:
    """The inherited best epoch's file (the resumed one, or epoch_N.pt beside it) becomes
    best.pt; if it is gone, the run's end uses last.pt instead (engine/metrics.py)."""
    best_epoch = (resumed.get("best") or {}).get("epoch")
    if not isinstance(best_epoch, int) or (run_dir / "best.pt").exists():
        return
    for candidate in (source, source.parent / f"epoch_{best_epoch:04d}.pt"):
        try:
            head = _head(candidate)
        except Exception:  # missing or unreadable: try the next
            continue
        if isinstance(head, dict) and head.get("epoch") == best_epoch and not head.get("step_in_epoch"):
            atomic_link(candidate, run_dir / "best.pt")
            print(f"best.pt: {candidate} (the best epoch so far, {best_epoch})")
            return


def with_history(state: dict, source: str | Path) -> dict:
    """A checkpoint's metrics rows, from the metrics.csv beside it (other programs' files and
    ones that carry them are left as they are)."""
    if "history" in state or "format_version" not in state:
        return state
    csv_path = Path(source).parent / "metrics.csv"
    history = read_history(csv_path, int(state["epoch"]))
    if len(history) < int(state["epoch"]) and ddp.is_main():
        print(
            f"note: {csv_path} has rows for {len(history)} of the checkpoint's {state['epoch']} epochs; "
            "metrics.csv and loss_curve.png start from those"
        )
    return {**state, "history": history}


def read_history(path: Path, epoch: int) -> list[dict]:
    """metrics.csv's rows for epochs 1..`epoch`, as int/float: rewritten, the same bytes."""
    history: list[dict] = []
    with contextlib.suppress(FileNotFoundError), open(path, newline="") as rows:
        for row in csv.DictReader(rows):
            try:
                parsed = {k: int(v) if k in ("epoch", "step") else float(v) for k, v in row.items()}
            except (TypeError, ValueError):
                break  # a torn or foreign row: keep what came before it
            if parsed.get("epoch") != len(history) + 1 or parsed["epoch"] > epoch:
                break
            history.append(parsed)
    return history
