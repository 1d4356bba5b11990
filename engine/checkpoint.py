"""Checkpoint files: atomic durable writes, verified weights-only loads, auto-resume, retention.

A checkpoint is a plain `torch.save` of a dict with the PyTorch tutorial's general-checkpoint
keys (`epoch`, `model_state_dict`, `optimizer_state_dict`, `loss`) plus what exact resume needs.
Everything in it is a tensor, number, string or plain container, so
`torch.load(path, weights_only=True)` reads it without this project.

Integrity: torch.save writes a zip whose every record carries a CRC-32. torch.load does not
check those CRCs, so `verify()` does (zipfile reads the directory, zlib checks each record
through a memory map); a truncated file fails earlier, when its zip directory is missing.
"""

from __future__ import annotations

import mmap
import os
import pickle
import re
import signal
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.early_stopping import check_state as check_early_stopping
from engine.errors import UserError

FORMAT_VERSION = 1
TUTORIAL_KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "loss")
PERIODIC = re.compile(r"^(epoch_\d+|step_\d+)\.pt$")
TMP_SUFFIX = ".tmp"
LINKS = ("last.pt", "best.pt")


class CheckpointWriteError(UserError):
    """The disk refused a write; the previous checkpoints are untouched."""


# ---------------------------------------------------------------------------------- writing

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder: `path` names either the old complete file or the new complete file, never a part."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as raw:
            out = _fault_wrapper(raw) if _FAULTS else raw
            torch.save(state, _EarlyWriteback(out))
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


def _os_error(err: BaseException | None) -> OSError | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


WRITEBACK_BYTES = 32 << 20


class _EarlyWriteback:
    """File wrapper for torch.save that starts the disk every WRITEBACK_BYTES.

    Linux keeps up to ~10% of RAM of written data in memory before it begins writing, so for
    a 1 GiB checkpoint the disk would idle while torch.save pickles and checksums, and all the
    writing would wait for the final fsync. posix_fadvise(DONTNEED) on each chunk just written
    starts its writeback without waiting (the pages are dirty then, so they stay cached), which
    overlaps the two; measured here, dirty data peaks at 32 MiB instead of the whole file.
    The fsync that follows is unchanged and is still what makes the file durable."""

    def __init__(self, out) -> None:
        self.out, self.written, self.started = out, 0, 0
        self.advise = getattr(os, "posix_fadvise", None)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a 400 MiB record goes in chunks: the disk starts at once
            n = self.out.write(view[done:done + WRITEBACK_BYTES])
            done += n
            self.written += n
            if self.advise is not None and self.written - self.started >= WRITEBACK_BYTES:
                self.out.flush()
                try:
                    self.advise(self.out.fileno(), self.started, self.written - self.started,
                                os.POSIX_FADV_DONTNEED)
                except OSError:  # only a hint; some file systems refuse it
                    self.advise = None
                self.started = self.written
        return done

    def __getattr__(self, name: str):
        return getattr(self.out, name)


def atomic_link(source: Path, link: Path) -> None:
    """Point `link` (last.pt, best.pt) at the complete file `source` without copying it.

    A hard link keeps its data even after retention deletes `source`; where the file system
    has no hard links, fall back to a full copy (still atomic)."""
    tmp = _tmp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            import shutil

            shutil.copyfile(source, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{link}: could not update ({err.strerror or err}); "
                                   f"{source} is intact") from None


def prune(run_dir: Path, saved: list[str], keep_last: int) -> list[str]:
    """Delete the oldest periodic checkpoints this run wrote beyond `keep_last` (called only
    after the newest one is durable). Files this run did not write are never touched, and
    only a bare periodic name (epoch_NNNN.pt, step_NNNNNNNN.pt) of a regular file inside
    `run_dir` is ever deleted, whatever a (crafted) checkpoint's saved_files says."""
    keep, drop = saved[-keep_last:], saved[:-keep_last]
    for name in drop:
        if name not in keep and is_retained_name(run_dir, name):
            (run_dir / name).unlink(missing_ok=True)
    return keep


def is_retained_name(run_dir: Path, name: Any) -> bool:
    """Can retention manage `name`: a periodic file name of this folder's own, no path parts,
    not a link (a link would point elsewhere)."""
    if not isinstance(name, str) or not PERIODIC.match(name) or Path(name).name != name:
        return False
    path = run_dir / name
    return not path.is_symlink() and path.resolve().parent == run_dir.resolve()


def retained_names(run_dir: Path, saved: Any) -> list[str]:
    """The entries of a checkpoint's saved_files that retention may delete; anything else
    (absolute paths, '../', other names, links) is dropped with one warning line."""
    names = list(saved) if isinstance(saved, (list, tuple)) else []
    kept = [n for n in names if is_retained_name(run_dir, n)]
    ignored = [n for n in names if n not in kept]
    if ignored:
        print(f"warning: {run_dir}: the checkpoint's saved_files lists {len(ignored)} "
              f"name(s) that are not this run's periodic checkpoints, e.g. {ignored[0]!r}; "
              f"retention ignores them and never deletes them", file=sys.stderr)
    return kept


# ---------------------------------------------------------------------------------- reading

def verify(path: Path) -> None:
    """Check every record's CRC-32 (a flipped bit anywhere in the payload is caught)."""
    try:
        with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            bad = _first_bad_record(handle, archive)
    except Exception as err:  # a damaged header raises BadZipFile, NotImplementedError, ...
        raise UserError(f"{path}: not a complete checkpoint file ({_first_line(err)})") from None
    if bad is not None:
        raise UserError(f"{path}: corrupted checkpoint (checksum mismatch in record {bad})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _first_bad_record(handle, archive: zipfile.ZipFile) -> str | None:
    """archive.testzip() without its copies (0.32 s instead of 0.43 s for 1 GiB here):
    torch.save stores records uncompressed, so each one's CRC-32 is computed by zlib straight
    from a memory map of the file. The offsets come from zipfile's parsing of the central
    directory (zip64 included)."""
    size = os.fstat(handle.fileno()).st_size
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    try:  # not written by torch.save: let zipfile decompress and check it
                        with archive.open(info) as member:
                            while member.read(1 << 20):
                                pass
                    except zipfile.BadZipFile:
                        return info.filename
                    continue
                header = bytes(view[info.header_offset:info.header_offset + 30])
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header of record {info.filename}")
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                start = info.header_offset + 30 + name_length + extra_length
                end = start + info.compress_size
                if end > size:
                    raise zipfile.BadZipFile(f"record {info.filename} is truncated")
                if zlib.crc32(view[start:end]) != info.CRC:
                    return info.filename
        finally:
            view.release()
    return None


def load_file(path: Path | str, map_location: str | torch.device = "cpu", *,
              check: bool = True, mmap: bool = True) -> Any:
    """`torch.load(weights_only=True)` with one-line errors. Never runs code from the file.

    The bytes come from anywhere (a download, a shared drive), so any exception while
    parsing them is bad input, reported in one line; only the weights-only refusal gets
    its own message."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (expected a checkpoint .pt file)")
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    if check and is_zip:
        verify(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        found = re.search(r"\bGLOBAL ([\w.]+)", str(err))  # torch words it several ways
        if found:  # a class or function reference: loading it would run code
            raise UserError(f"{path}: refused: the file holds objects other than tensors and "
                            f"plain containers, which could run code when loaded (it names "
                            f"{found.group(1)}){_whole_model_advice(found.group(1))}"
                            ) from None
        if "weights only load failed" in str(err).lower():  # torch's advice is not for us
            detail = re.search(r"Unsupported operand \d+|Unsupported class \S+", str(err))
            raise UserError(f"{path}: not a readable checkpoint (the weights-only loader "
                            f"cannot read it{': ' + detail.group(0) if detail else ''})"
                            ) from None
        raise UserError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None


def _whole_model_advice(name: str) -> str:
    """`torch.save(model, PATH)` pickles the model's class (`__main__.Net`, a torch.nn
    class): say how to get a weights-only file instead. Functions (`posix.system`) get none."""
    if not name.rsplit(".", 1)[-1][:1].isupper():
        return ""
    return ("; if it is a whole model saved with torch.save(model, PATH), save "
            "model.state_dict() instead, or convert it where its class is defined and you "
            "trust the file: torch.save(torch.load(PATH, weights_only=False).state_dict(), "
            "'weights.pt'), then use weights=weights.pt")


# Types of a training checkpoint's keys (what train.py writes); None allowed where noted.
# `loss` may be a tensor: the tutorials save the last batch's loss tensor (read as a float).
CHECKPOINT_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,), "global_step": (int,), "step_in_epoch": (int,),
    "optimizer_state_dict": (dict,), "scheduler_state_dict": (dict, type(None)),
    "scaler_state_dict": (dict, type(None)), "rng_state": (dict,), "history": (list,),
    "config": (dict,), "best": (dict, type(None)), "epoch_step_losses": (torch.Tensor,),
    "loss": (int, float, torch.Tensor, type(None)), "saved_files": (list,),
    "world_size": (int,), "rank_states": (list, type(None)), "format_version": (int,),
    "versions": (dict,),
    "fingerprint": (dict, type(None)),
    "ema_state_dict": (dict,), "early_stopping": (dict, type(None)),  # trainer features
}


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """A full training checkpoint written by train.py, verified and checked field by field
    (types, then shapes, sizes and ranges: see CHECKPOINT_FIELDS) before anything uses it.
    Every key but model_state_dict is optional (tutorial checkpoints have only four)."""
    state = load_file(path, map_location)
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: not a training checkpoint (expected a dict with keys "
                        f"{list(TUTORIAL_KEYS)}); for a bare state_dict use weights=PATH")
    check_structure(state, path)
    check_state_dict(state["model_state_dict"], path, "model_state_dict")
    for key, kinds in CHECKPOINT_TYPES.items():
        value = state.get(key)
        if key in state and (not isinstance(value, kinds) or isinstance(value, bool)):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise UserError(f"{path}: key {key!r} should be {names}, "
                            f"got {type(value).__name__}")
    for key, checker in CHECKPOINT_FIELDS.items():
        if key in state:
            problem = checker(state[key], state)
            if problem:
                raise UserError(f"{path}: key {key!r}: {problem}")
    if isinstance(state.get("loss"), torch.Tensor):  # a tutorial's `loss` tensor
        if state["loss"].numel() != 1 or not state["loss"].is_floating_point():
            raise UserError(f"{path}: key 'loss' should be a number or a one-element float "
                            f"tensor, got a tensor of shape {tuple(state['loss'].shape)}")
        state["loss"] = float(state["loss"])
    return state


# ------------------------------------------------------------- what a file may hold (limits)
# A weights-only file can still describe huge things in a few bytes: a stride-0 tensor of
# billions of elements, or a list that holds the same list twice, nested 30 levels deep
# (2**30 elements once anything walks it). These checks run on the loaded objects, in time
# proportional to the file's own size, before anything expands them.
MAX_NODES = 1_000_000  # containers and leaves of a whole checkpoint, counted as expanded
MAX_DEPTH = 64
MAX_CONFIG_NODES = 20_000  # a config is a few hundred nodes; OmegaConf is slow beyond this
MAX_CONFIG_DEPTH = 32
OVERLAP_SLACK = 1 << 20  # bytes a tensor may claim beyond its storage (an expand()ed buffer)


class _TooBig(Exception):
    pass


def expanded_size(obj: Any, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
                  what: str = "") -> int:
    """Nodes `obj` has when every shared reference is expanded (what a recursive walk such
    as OmegaConf.create or yaml.dump visits), computed once per distinct container, so a
    "billion laughs" structure is measured in microseconds. Raises _TooBig (a cycle, too
    deep, too many nodes, or a tensor that claims more memory than its storage holds)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int, where: str) -> int:
        if isinstance(node, torch.Tensor):
            _check_tensor_memory(node, where)
            return 1
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _TooBig(f"{where or 'the file'} contains itself (a reference cycle)")
        if depth > max_depth:
            raise _TooBig(f"{where or 'the file'} is nested deeper than {max_depth} levels")
        active.add(key)
        total = 1
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for name, value in items:
            total += size(value, depth + 1, f"{where}[{name!r}]")
            if total > max_nodes:
                raise _TooBig(f"{where or 'the file'} holds more than {max_nodes} values "
                              f"(counting shared references once per use)")
        active.discard(key)
        sizes[key] = total
        return total

    return size(obj, 0, what)


def _check_tensor_memory(tensor: torch.Tensor, where: str) -> None:
    """A tensor whose strides overlap (stride 0) claims more elements than its storage has:
    any copy (.tolist(), .unbind(), .to()) materialises them all."""
    if tensor.layout != torch.strided:
        raise _TooBig(f"{where}: a {tensor.layout} tensor (only dense tensors are expected)")
    claimed = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if claimed > stored + OVERLAP_SLACK:
        raise _TooBig(f"{where}: a tensor of shape {tuple(tensor.shape)} with strides "
                      f"{tensor.stride()} claims {claimed} bytes from a {stored}-byte storage")


def check_structure(state: Any, source: Path | str) -> None:
    """Bounded size and depth, no cycles, no overlapping tensors; config much smaller."""
    try:
        expanded_size(state)
        if isinstance(state, dict) and isinstance(state.get("config"), (dict, list)):
            expanded_size(state["config"], MAX_CONFIG_NODES, MAX_CONFIG_DEPTH, "['config']")
    except _TooBig as err:
        raise UserError(f"{source}: refused: {err}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(low: int, high: int) -> Callable[[Any, dict], str | None]:
    def check(value: Any, state: dict) -> str | None:
        if not low <= value <= high:
            return f"expected an integer from {low} to {high}, got {value}"
        return None
    return check


def _tensor_shape(value: Any, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                  what: str) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{what} should be a tensor, got {type(value).__name__}"
    if tuple(value.shape) != shape or value.dtype not in dtypes:
        return (f"{what} should be a {'/'.join(str(d).removeprefix('torch.') for d in dtypes)}"
                f" tensor of shape {list(shape)}, got {str(value.dtype).removeprefix('torch.')} "
                f"{list(value.shape)}")
    return None


_TORCH_RNG_SHAPE = tuple(torch.get_rng_state().shape)
_INTS = (torch.int64, torch.int32, torch.uint32) if hasattr(torch, "uint32") else (
    torch.int64, torch.int32)


def check_rng_state(value: Any, state: dict | None = None) -> str | None:
    """Exactly what engine.runtime.rng_state() writes: Python's Mersenne Twister (624 words
    and a position), NumPy's (624 words), torch's CPU state and one state per CUDA device."""
    if not isinstance(value, dict):
        return f"should be a dict, got {type(value).__name__}"
    missing = [k for k in ("python", "numpy", "torch") if k not in value]
    if missing:
        return f"missing {missing} (expected python, numpy and torch generator states)"
    py, nps = value["python"], value["numpy"]
    if not isinstance(py, dict) or not isinstance(nps, dict):
        return "python and numpy states should be dicts"
    problem = (_tensor_shape(py.get("state"), (625,), _INTS, "python state")
               or _tensor_shape(nps.get("keys"), (624,), _INTS, "numpy keys")
               or _tensor_shape(value["torch"], _TORCH_RNG_SHAPE, (torch.uint8,), "torch state"))
    if problem:
        return problem
    words, position = py["state"][:624], int(py["state"][624])
    if bool((words < 0).any() or (words >= 2**32).any()) or not 0 <= position <= 624:
        return "python state holds values outside a Mersenne Twister state"
    if bool((nps["keys"] < 0).any() or (nps["keys"] >= 2**32).any()):
        return "numpy keys hold values outside 32 bits"
    version, gauss, kind = py.get("version"), py.get("gauss"), nps.get("kind")
    pos, has_gauss = nps.get("pos"), nps.get("has_gauss")
    if (not isinstance(version, int) or version != 3 or not (gauss is None or _number(gauss))
            or not isinstance(kind, str) or kind != "MT19937"
            or not isinstance(pos, int) or not 0 <= pos <= 624
            or not isinstance(has_gauss, int) or has_gauss not in (0, 1)
            or not _number(nps.get("cached_gaussian"))):
        return "python/numpy generator settings are not those of a saved state"
    cuda = value.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, (list, tuple)) or len(cuda) > 1024 or not all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                and t.numel() <= 1024 for t in cuda):
            return "cuda should be a list of per-device uint8 generator states"
    return None


def _check_losses(value: Any, state: dict, what: str = "") -> str | None:
    """One finite-or-not float per batch of the current epoch already trained."""
    steps = state.get("step_in_epoch", 0)
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else 0
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"{what}should be a float tensor"
    if value.dim() != 1 or value.numel() != steps:
        return (f"{what}should hold one loss per batch already trained this epoch "
                f"(step_in_epoch={steps}), got shape {list(value.shape)}")
    return None


def _check_best(value: Any, state: dict) -> str | None:
    if value is None:
        return None
    monitor, best, epoch = value.get("monitor"), value.get("value"), value.get("epoch")
    if not (monitor is None or isinstance(monitor, str)) or not (
            best is None or _number(best)) or not (
            epoch is None or (isinstance(epoch, int) and not isinstance(epoch, bool))):
        return (f"expected monitor (text), value (a number or None) and epoch (an integer "
                f"or None), got {_short_repr(value)}")
    return None


def _check_history(value: Any, state: dict) -> str | None:
    """The metrics.csv rows: each a mapping of column name to number, the same columns in
    every row (engine.run checks them against the columns this run writes)."""
    columns = None
    for index, row in enumerate(value):
        if not isinstance(row, dict) or not all(isinstance(k, str) and _number(v)
                                                for k, v in row.items()):
            return f"entry {index} should map column names to numbers, got {_short_repr(row)}"
        if columns is None:
            columns = list(row)
        elif list(row) != columns:
            return f"entry {index} has columns {list(row)}, entry 0 has {columns}"
    return None


def _check_saved_files(value: Any, state: dict) -> str | None:
    if len(value) > 100_000 or not all(isinstance(n, str) and len(n) < 4096 for n in value):
        return "expected a list of file names"
    return None


def _check_loss(value: Any, state: dict) -> str | None:
    if isinstance(value, torch.Tensor) and (value.numel() != 1
                                            or not value.is_floating_point()):
        return f"expected one number (a 0-dim float tensor), got shape {list(value.shape)}"
    return None


def _check_rank_states(value: Any, state: dict) -> str | None:
    if value is None:
        return None
    world = state.get("world_size", 1)
    if len(value) != world:
        return f"expected one entry per process (world_size={world}), got {len(value)}"
    for index, share in enumerate(value):
        if not isinstance(share, dict):
            return f"entry {index} should be a dict, got {type(share).__name__}"
        problem = (check_rng_state(share.get("rng_state"))
                   or _check_losses(share.get("epoch_step_losses"), state, "epoch_step_losses "))
        if problem:
            return f"entry {index}: {problem}"
    return None


def _check_plain(value: Any, state: dict | None = None, where: str = "") -> str | None:
    """A config is what OmegaConf.to_container writes: text keys, plain values, no tensors
    (depth and size were bounded by check_structure, so this walk is short)."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):
                return f"{where or 'top level'}: key {key!r} is not text"
            problem = _check_plain(child, None, f"{where}.{key}" if where else key)
            if problem:
                return problem
    elif isinstance(value, list):
        for index, child in enumerate(value):
            problem = _check_plain(child, None, f"{where}[{index}]")
            if problem:
                return problem
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        return f"{where}: a {type(value).__name__} is not a config value"
    return None


def _short_repr(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


# Field -> checker(value, whole state) -> problem or None; run after the type check above,
# only for keys present. Add a key here when checkpoints gain one.
CHECKPOINT_FIELDS: dict[str, Callable[[Any, dict], str | None]] = {
    "epoch": _int_in(0, 10**7),
    "global_step": _int_in(0, 10**12),
    "step_in_epoch": _int_in(0, 10**9),
    "world_size": _int_in(1, 1 << 16),
    "loss": _check_loss,
    "rng_state": check_rng_state,
    "epoch_step_losses": _check_losses,
    "rank_states": _check_rank_states,
    "best": _check_best,
    "history": _check_history,
    "saved_files": _check_saved_files,
    "config": _check_plain,
    "versions": _check_plain,
    "ema_state_dict": lambda value, state: _check_tensors(value),
    "early_stopping": check_early_stopping,
}


def _check_tensors(value: dict) -> str | None:
    bad = [k for k, v in value.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    return f"expected names -> tensors, got entry {bad[0]!r}" if bad else None


def check_state_dict(state: Any, path: Path | str, what: str = "state_dict") -> None:
    """A state_dict is a mapping of str names to tensors; anything else fails in one line."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: {what} should be a dict of tensors, got "
                        f"{type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: {what} entry {name!r} should map a name to a tensor, "
                            f"got {type(value).__name__}")


def load_state_dict_file(model: nn.Module, path: Path, strict: bool = True,
                         key: str | None = None) -> list[str]:
    """Load weights into `model` from a bare state_dict (tutorial
    `torch.save(model.state_dict(), ...)`), a checkpoint's `model_state_dict`, an export
    folder, or the entry `key` of a file with several models (tutorial
    `torch.save({'modelA_state_dict': ..., 'modelB_state_dict': ...}, PATH)`)."""
    path = Path(path)
    from engine.export import is_export, load_export

    if is_export(path):
        state = load_export(path)[1]
        if key is not None:
            raise UserError(f"weights_key={key}: {path} is an export folder with one model; "
                            f"drop weights_key")
    else:
        state = pick_state_dict(load_file(path), path, key)
    return load_model_state(model, state, path, strict=strict)


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def pick_state_dict(obj: Any, path: Path | str, key: str | None = None) -> dict:
    """The model weights in a loaded file: the file itself (a bare state_dict), its
    `model_state_dict` (a general checkpoint), or `obj[key]`. A file holding several models
    and no `key` is refused with their names: guessing would load the wrong one."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state_dict (names -> tensors), got "
                        f"{type(obj).__name__}")
    # Optimizer states ({'state', 'param_groups'}) are not dicts of tensors: never candidates.
    candidates = [k for k, v in obj.items() if isinstance(k, str) and _is_state_dict(v)]
    if key is not None:
        if key not in obj:
            raise UserError(f"weights_key={key}: not in {path}; model state_dicts there: "
                            f"{candidates or 'none'}")
        state = obj[key]
    elif _is_state_dict(obj) or not obj:
        state = obj
    elif "model_state_dict" in obj:  # the EMA weights when the run kept them
        from engine.ema import inference_weights

        state = inference_weights(obj)
    elif len(candidates) == 1:
        state = obj[candidates[0]]
    elif candidates:
        raise UserError(f"{path}: holds several models {candidates}; pick one with "
                        f"weights_key=NAME")
    else:
        raise UserError(f"{path}: no model state_dict in it (keys {_short(list(obj))}); "
                        f"expected names -> tensors, or a checkpoint with 'model_state_dict'")
    check_state_dict(state, path, f"{key}" if key else "state_dict")
    return state


def load_model_state(model: nn.Module, state: dict, source: Path | str,
                     strict: bool = True) -> list[str]:
    """load_state_dict with a one-line error listing missing/unexpected keys and shape
    mismatches. strict=False loads what matches, and reports and returns what did not."""
    check_state_dict(state, source)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor)
              and state[k].shape != own[k].shape]
    dtypes = [f"{k} {state[k].dtype} vs model {own[k].dtype}" for k in own
              if k in state and state[k].is_complex() and not own[k].is_complex()]
    problems = []
    if dtypes:
        problems.append(f"dtype mismatch {_short(dtypes)}")
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_short(shapes)}")
    if problems and strict:
        raise UserError(f"{source}: weights do not fit the model ({'; '.join(problems)}); "
                        f"check model=/data= or pass strict=false to load what matches")
    matching = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape
                and not (v.is_complex() and not own[k].is_complex())}
    try:
        model.load_state_dict(matching, strict=False)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into the parameter
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{source}: weights do not fit the model ({first[:300]})") from None
    if problems and 2 * len(matching) < len(own):  # mostly random: an error, not a model
        raise UserError(f"{source}: strict=false would load only {len(matching)} of {len(own)} "
                        f"tensors (fewer than half); expected keys {_short(list(own))}, found "
                        f"{_short(list(state))}; check model=/data= or the file")
    if problems:
        print(f"warning: {source}: strict=false loaded {len(matching)} of {len(own)} tensors; "
              f"not loaded (left as initialised): {'; '.join(problems)}", file=sys.stderr)
    return problems


def _short(items: list[str], limit: int = 6) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


# ---------------------------------------------------------------------------- auto-resume

def progress_key(state: dict) -> tuple[int, int]:
    return int(state.get("global_step", 0)), int(state.get("epoch", 0))


def find_latest(run_dir: Path, map_location: str | torch.device = "cpu"
                ) -> tuple[Path, dict] | None:
    """Newest checkpoint of `run_dir` that loads and verifies; warns about (and sets aside,
    never deletes) any newer file that does not.

    Only the names train.py writes are candidates (epoch_N.pt, step_N.pt, last.pt, best.pt):
    other files in the folder are never touched. Temporaries (.NAME.PID.tmp) never match."""
    if not run_dir.is_dir():
        return None
    # last.pt / best.pt are hard links to periodic files: try each file once, under its
    # periodic name, which is what the warning and the "resuming from" line then show.
    groups: dict[int, list[Path]] = {}
    for path in sorted(run_dir.glob("*.pt"), key=lambda p: (not PERIODIC.match(p.name), p.name)):
        if not path.is_file():  # a folder named *.pt is not a checkpoint: leave it alone
            continue
        if PERIODIC.match(path.name) or path.name in LINKS:
            groups.setdefault(path.stat().st_ino, []).append(path)
    candidates = []
    for paths in groups.values():
        try:  # cheap (mmap) read of the progress counters; full verification below
            head = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)
            key = progress_key(head)
        except Exception as err:  # any unreadable file is skipped, not fatal
            _set_aside(paths, _why_unreadable(paths[0], err))
            continue
        candidates.append((key, paths))
    for _, paths in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            return paths[0], load_checkpoint(paths[0], map_location)
        except UserError as err:
            _set_aside(paths, str(err).removeprefix(f"{paths[0]}: "))
    return None


def _why_unreadable(path: Path, err: Exception) -> str:
    try:  # the zip check names the problem better (truncated, checksum) than torch.load
        verify(path)
    except UserError as bad:
        return str(bad).removeprefix(f"{path}: ")
    first = (str(err).strip().splitlines() or [""])[0][:160]
    return f"unreadable ({type(err).__name__}: {first})"


def _set_aside(paths: list[Path], why: str) -> None:
    """Rename a bad file (and its hard links) to NAME.corrupt, NAME.corrupt.1, ...: kept for
    inspection, never overwritten, and no longer a resume candidate."""
    moved = []
    for path in paths:
        aside, n = path.with_name(path.name + ".corrupt"), 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt.{n}")
        try:
            os.replace(path, aside)
        except OSError as err:  # a read-only folder: say what was wrong with the file too
            raise UserError(f"{path}: {why}; cannot set it aside as {aside.name} "
                            f"({err.strerror or err})") from None
        moved.append(aside.name)
    links = f" (and its links {', '.join(moved[1:])})" if len(moved) > 1 else ""
    warnings.warn(f"skipped {paths[0]}: {why}; kept it as {moved[0]}{links}", stacklevel=3)


def remove_stale_tmp(run_dir: Path) -> None:
    """Half-written temporaries of a process that died mid-save: never a checkpoint."""
    for tmp in run_dir.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------ fault injection (tests only)
# ENGINE_FAULT="name=N,..." (read once, at import) arms crash points for the resume tests:
#   kill_in_write=N    SIGKILL halfway through this process's Nth checkpoint write
#   enospc_in_write=N  the Nth write fails with ENOSPC (a full disk)
#   int_in_write=N     SIGINT twice during the Nth write (Ctrl-C pressed twice while saving)
#   kill_at_step=N     SIGKILL after optimizer step N (after that step's periodic save)
#   term_at_step=N     SIGTERM after step N (a scheduler's preemption notice)
#   int_at_step=N      SIGINT after step N (Ctrl-C)

def _parse_faults(spec: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        faults[name.strip()] = int(value)
    return faults


_FAULTS = _parse_faults(os.environ.get("ENGINE_FAULT", ""))
_writes = 0
_STEP_SIGNALS = (("kill_at_step", signal.SIGKILL), ("term_at_step", signal.SIGTERM),
                 ("int_at_step", signal.SIGINT))


def fault(name: str) -> int:
    """The value of a test-only fault point, 0 when unset."""
    return _FAULTS.get(name, 0)


def step_faults(global_step: int) -> None:
    """Test-only: send the signal armed for this step to this process (no-op when unset)."""
    if _FAULTS:
        for name, sig in _STEP_SIGNALS:
            if _FAULTS.get(name) == global_step:
                os.kill(os.getpid(), sig)


class _FaultyFile:
    def __init__(self, raw, kill: bool, enospc: bool, interrupt: bool) -> None:
        self.raw, self.kill, self.enospc, self.interrupt = raw, kill, enospc, interrupt
        self.written = 0

    def write(self, data) -> int:
        if self.written > 0 and self.interrupt:  # one SIGINT per record written
            os.kill(os.getpid(), signal.SIGINT)
        if self.written > 0 and (self.kill or self.enospc):
            if self.kill:
                self.raw.flush()  # the partial file really is on disk
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device")
        self.written += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _fault_wrapper(raw):
    global _writes
    _writes += 1
    return _FaultyFile(raw, kill=_FAULTS.get("kill_in_write") == _writes,
                       enospc=_FAULTS.get("enospc_in_write") == _writes,
                       interrupt=_FAULTS.get("int_in_write") == _writes)
