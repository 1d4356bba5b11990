"""The type, shape and range of every key of a training checkpoint (see engine.checkpoint),
checked on every load before anything uses the file: a crafted or damaged file fails in one
line naming the key, never deep inside a restore. Add a key here when checkpoints gain one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import plain_problem
from engine.errors import UserError

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
    "ema_state_dict": (dict,), "early_stopping": (dict, type(None)),  # trainer features
    "fingerprint": (dict, type(None)),
    "loggers": (dict,),  # tracker runs to continue (engine/loggers.py)
}


def check_checkpoint(state: dict, path: Path | str) -> None:
    """Every present key's type (CHECKPOINT_TYPES), then its shape, size and range
    (CHECKPOINT_FIELDS). A tutorial's `loss` tensor is read as a float."""
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
    every row (engine.checkpoint.compat checks them against the columns this run writes)."""
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


def _check_plain(value: Any, state: dict | None = None) -> str | None:
    """A config is what OmegaConf.to_container(resolve=True) writes: plain data, no `${`
    (depth and size were bounded by check_structure, so this walk is short)."""
    return plain_problem(value)


def _check_tensors(value: dict) -> str | None:
    bad = [k for k, v in value.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    return f"expected names -> tensors, got entry {bad[0]!r}" if bad else None


def _check_early_stopping(value: Any, state: dict) -> str | None:
    """engine/training.py's EarlyStopping: monitor, best value so far, epochs without gain."""
    if value is None:
        return None
    monitor, best, wait = value.get("monitor"), value.get("best"), value.get("wait")
    if not isinstance(monitor, str) or not (best is None or _number(best)) or not (
            isinstance(wait, int) and not isinstance(wait, bool) and 0 <= wait <= 10**7):
        return (f"expected monitor (text), best (a number or None) and wait (an integer "
                f"from 0 to 10000000), got {' '.join(repr(value).split())[:80]}")
    return None


def _check_loggers(value: Any, state: dict) -> str | None:
    """engine/loggers.py's state: tracker name -> the id of its run, e.g. mlflow_run_id."""
    if len(value) > 16 or not all(
            isinstance(k, str) and k.endswith("_id") and len(k) <= 64 and isinstance(v, str)
            and 0 < len(v) <= 256 and v.isprintable() for k, v in value.items()):
        return f"expected names ending in _id -> run ids (text), got {_short_repr(value)}"
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
    "early_stopping": _check_early_stopping,
    "loggers": _check_loggers,
}
