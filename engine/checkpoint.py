"""What a checkpoint is, and reading any file safely.

A checkpoint is a plain `torch.save` of one dict, readable without this project by
`torch.load(path, weights_only=True)` (only tensors, numbers, strings and plain containers).
Every key is described here and nowhere else; SCHEMA below checks each on every load.

The PyTorch tutorial's general-checkpoint keys (a tutorial file has only these four):
  epoch                 int    epochs fully done (a tutorial file: the 0-based loop index)
  model_state_dict      dict   parameter name -> tensor (never the DDP/compile wrapper's names)
  optimizer_state_dict  dict   optimizer.state_dict()
  loss                  float  the last step's training loss (a tutorial's 0-dim tensor is read)
What an exact resume needs besides (the run goes on bit for bit, mid-epoch included):
  global_step           int    optimizer steps done
  step_in_epoch         int    batches of epoch `epoch + 1` already trained (0 at an epoch end)
  epoch_step_losses     tensor this epoch's per-step losses so far (the epoch's mean train loss)
  rng_state             dict   python / numpy / torch / cuda generator states (rank 0's)
  scheduler_state_dict  dict | None
  scaler_state_dict     dict | None   GradScaler, with trainer.precision=16-mixed
  best                  dict   {monitor, value, epoch}: what best.pt holds
  world_size            int    processes that wrote it (torchrun)
  rank_states           list | None   per rank: {rng_state, epoch_step_losses} (torchrun)
  fingerprint           dict | None   the data, global batch and model shapes (resume checks)
  ema_state_dict        dict   trainer.ema_decay only: the averaged weights (name -> tensor);
                               evaluate, predict, export and best.pt use them
  early_stopping        dict   early_stopping.patience only: {monitor, best, wait}
  loggers               dict   logger=mlflow: {mlflow_run_id}, the tracker run to continue;
                               logger=tensorboard: tensorboard_step, the first step this file's
                               hand-over sends, and tensorboard_losses, a float64 tensor of
                               (step, train_loss_step) rows from there on (a resume resends them)
  data_state_dict       dict   what training learned about the data (data=csv: column and class
                               names, the train split's mean and std): text lists and tensors
Where it came from:
  config                dict   the resolved run config (builds the model/data again)
  versions              dict   python, torch, torchvision, hydra-core
  format_version        int    FORMAT_VERSION; absent in other programs' (tutorial) files
  saved_files           list   periodic files this run wrote: retention deletes only these
  history               list   older files only: the metrics rows (metrics.csv is the history)

Also read here, checked: export folders (`model.safetensors` + `config.yaml`). Writing:
engine.run_dir (checkpoints), engine.export (exports; a `model.pt2` is written, never read).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import platform
import random
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Subset

from engine.batches import batches_per_epoch
from engine.config import build, check_loaded_targets, plain_problem, saved_sections
from engine.distributed import FollowerError, any_rank, gather_to_main, is_distributed, is_main, rank, world_size
from engine.errors import UserError, first_line
from engine.run_dir import verify  # the CRC check; run_dir's find-latest uses it too
from engine.runtime import rng_state, set_rng_state

FORMAT_VERSION = 1
# A run's stateful parts (each with state_dict()/load_state_dict()) -> their key.
PARTS = {
    "model": "model_state_dict",
    "optimizer": "optimizer_state_dict",
    "scheduler": "scheduler_state_dict",
    "scaler": "scaler_state_dict",
    "ema": "ema_state_dict",
    "early_stopping": "early_stopping",
    "loggers": "loggers",
    "data": "data_state_dict",
}
WEIGHTS, CONFIG, PT2 = "model.safetensors", "config.yaml", "model.pt2"  # an export folder's


# ------------------------------------------------------------------ the schema of each key
# Each check takes (value, the whole state) and returns what is wrong with it, or None.
Check = Callable[[Any, dict], str | None]
_NONE = type(None)


def _is(value: Any, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """isinstance, where True is not a number."""
    return isinstance(value, kinds) and not isinstance(value, bool)


def _brief(value: Any, limit: int = 80) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor {list(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expect(wanted: str, ok: Callable[[Any], bool]) -> Check:
    return lambda value, state: None if ok(value) else f"expected {wanted}, got {_brief(value)}"


def _int_in(low: int, high: int) -> Check:
    return _expect(f"an integer from {low} to {high}", lambda value: low <= value <= high)


def _tensors(value: Any, state: dict | None = None) -> str | None:
    """A state_dict: names -> tensors."""
    if not isinstance(value, dict):
        return f"should be a dict of tensors, got {type(value).__name__}"
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    return f"entry {bad[0]!r} should map a name to a tensor, got {type(value[bad[0]]).__name__}" if bad else None


_INTS = (torch.int64, torch.int32, *((torch.uint32,) if hasattr(torch, "uint32") else ()))


def _rng(value: Any, state: dict | None = None) -> str | None:
    """engine.runtime.rng_state(), tried on fresh generators: each library refuses what it cannot
    use. By hand: what they take unchecked (numpy reads past its 624 words at a larger pos)."""
    try:
        py, nps, cuda = value["python"], value["numpy"], value.get("cuda") or []
        if not (
            py["state"].dtype in _INTS
            and nps["keys"].dtype in _INTS
            and tuple(nps["keys"].shape) == (624,)
            and 0 <= nps["pos"] <= 624
            and (py["gauss"] is None or _is(py["gauss"]))
            and len(cuda) <= 1024
            and all(t.dtype == torch.uint8 and t.dim() == 1 and t.numel() <= 1024 for t in cuda)
        ):
            return "python/numpy/cuda generator states are not those of a saved state"
        random.Random().setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
        np.random.RandomState().set_state(
            (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
        )
        torch.Generator().set_state(value["torch"])
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError, OverflowError) as err:
        return f"expected python, numpy and torch generator states ({first_line(err, 120)})"
    return None


def _losses(value: Any, state: dict, what: str = "") -> str | None:
    steps = state.get("step_in_epoch", 0) if _is(state.get("step_in_epoch", 0), int) else 0
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 1 and value.numel() == steps:
        return None
    return (
        f"{what}should be a float tensor of one loss per batch already trained this "
        f"epoch (step_in_epoch={steps}), got {_brief(value)}"
    )


def _history(value: Any, state: dict) -> str | None:
    """metrics.csv rows: column name -> number, the same columns in every row."""
    for index, row in enumerate(value):
        if not isinstance(row, dict) or not all(isinstance(k, str) and _is(v) for k, v in row.items()):
            return f"entry {index} should map column names to numbers, got {_brief(row)}"
        if list(row) != list(value[0]):
            return f"entry {index} has columns {list(row)}, entry 0 has {list(value[0])}"
    return None


def _data_state(value: dict, state: dict | None = None) -> str | None:
    """A data module's state: names -> 1-D float tensors, lists of text, or None."""
    for key, item in value.items():
        tensor = isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() == 1
        texts = isinstance(item, list) and len(item) <= 1 << 20 and all(isinstance(t, str) for t in item)
        if not isinstance(key, str) or not (tensor or texts or item is None):
            return f"entry {key!r} should be a 1-D float tensor, a list of text or None, got {_brief(item)}"
    return None


def data_state_of(config: dict, source: Path | str) -> dict | None:
    """An export's `data_state` (plain lists in its config) as the data module's state: numbers
    -> float32 tensors, text stays."""
    state = config.get("data_state")
    if state is None:
        return None
    try:
        state = {
            k: torch.tensor(v, dtype=torch.float32) if v and all(_is(x) for x in v) else v for k, v in state.items()
        }
    except (AttributeError, TypeError, ValueError):
        state = {"data_state": state}  # not a dict of lists: refused below
    problem = _data_state(state)
    if problem:
        raise UserError(f"{source}: data_state: {problem}")
    return state


def _rank_states(value: Any, state: dict) -> str | None:
    world = state.get("world_size", 1)
    if value is not None and len(value) != world:
        return f"expected one entry per process (world_size={world}), got {len(value)}"
    for index, share in enumerate(value or []):
        problem = (
            f"should be a dict, got {type(share).__name__}"
            if not isinstance(share, dict)
            else _rng(share.get("rng_state")) or _losses(share.get("epoch_step_losses"), state, "epoch_step_losses ")
        )
        if problem:
            return f"entry {index}: {problem}"
    return None


def _fields(record: Any, /, **kinds: Any) -> bool:
    """A small dict (or None) whose named values are of these types."""
    return record is None or all(_is(record.get(name), k) for name, k in kinds.items())


def _loggers(value: dict, state: dict) -> str | None:
    """Run ids (e.g. mlflow_run_id: the tracker run to continue), and TensorBoard's resend: a
    start step and the (step, loss) rows from it, in order."""
    start, losses = value.get("tensorboard_step", 1), value.get("tensorboard_losses", torch.zeros(0, 2).double())
    ids = {k: v for k, v in value.items() if k not in ("tensorboard_step", "tensorboard_losses")}
    if len(ids) > 16 or not all(
        _is(k, str) and k.endswith("_id") and len(k) <= 64 and _is(i, str) and 0 < len(i) <= 256 and i.isprintable()
        for k, i in ids.items()
    ):
        return f"expected names ending in _id -> run ids (text), got {_brief(ids)}"
    if not _is(start, int) or not 1 <= start <= 10**12 + 1:
        return f"tensorboard_step: expected a step from 1 to 1000000000001, got {_brief(start)}"
    if not isinstance(losses, torch.Tensor) or losses.dtype != torch.float64 or list(losses.shape[1:]) != [2]:
        return f"tensorboard_losses: expected a float64 tensor of (step, loss) rows, got {_brief(losses)}"
    steps = losses[:, 0]
    if not bool(((steps >= start) & (steps <= 10**12) & (steps == steps.round())).all() and (steps.diff() > 0).all()):
        got = _brief(steps[:5].tolist())
        return f"tensorboard_losses: expected whole steps from tensorboard_step={start} on, rising, got {got}"
    return None


_NUMBER_OR_NONE = (int, float, _NONE)
# key -> (allowed types, check of shape, size and range); each key's meaning: the docstring.
SCHEMA: dict[str, tuple[tuple[type, ...], Check | None]] = {
    "epoch": ((int,), _int_in(0, 10**7)),
    "model_state_dict": ((dict,), _tensors),
    "optimizer_state_dict": ((dict,), None),  # checked against the optimizer on restore
    "loss": (
        (int, float, torch.Tensor, _NONE),
        _expect(
            "a number or a one-element float tensor",
            lambda v: not isinstance(v, torch.Tensor) or (v.numel() == 1 and v.is_floating_point()),
        ),
    ),
    "global_step": ((int,), _int_in(0, 10**12)),
    "step_in_epoch": ((int,), _int_in(0, 10**9)),
    "epoch_step_losses": ((torch.Tensor,), _losses),
    "rng_state": ((dict,), _rng),
    "scheduler_state_dict": ((dict, _NONE), None),
    "scaler_state_dict": ((dict, _NONE), None),
    "best": (
        (dict, _NONE),
        _expect(
            "monitor (text), value (a number or None) and epoch (an integer or None)",
            lambda v: _fields(v, monitor=(str, _NONE), value=_NUMBER_OR_NONE, epoch=(int, _NONE)),
        ),
    ),
    "world_size": ((int,), _int_in(1, 1 << 16)),
    "rank_states": ((list, _NONE), _rank_states),
    "fingerprint": ((dict, _NONE), None),  # its contents: check_fingerprint
    "ema_state_dict": ((dict,), _tensors),
    "data_state_dict": ((dict,), _data_state),
    "early_stopping": (
        (dict, _NONE),
        _expect(
            "monitor (text), best (a number or None) and wait (an integer from 0 to 10000000)",
            lambda v: (
                _fields(v, monitor=str, best=_NUMBER_OR_NONE, wait=int) and (v is None or 0 <= v["wait"] <= 10**7)
            ),
        ),
    ),
    "loggers": ((dict,), _loggers),
    "config": ((dict,), lambda v, s: plain_problem(v)),  # no `${`, no objects
    "versions": ((dict,), lambda v, s: plain_problem(v)),
    "format_version": ((int,), None),
    "saved_files": (
        (list,),
        _expect("a list of file names", lambda v: len(v) <= 100_000 and all(_is(n, str) and len(n) < 4096 for n in v)),
    ),
    "history": ((list,), _history),
}


def check_checkpoint(state: dict, path: Path | str) -> None:
    """Each present key's type, shape and range, one line naming the key; a tensor loss -> float."""
    for key, (kinds, check) in SCHEMA.items():
        if key not in state:
            continue
        value = state[key]
        if not _is(value, kinds):
            names = " or ".join("None" if k is _NONE else k.__name__ for k in kinds)
            raise UserError(f"{path}: key {key!r} should be {names}, got {type(value).__name__}")
        problem = check(value, state) if check is not None else None
        if problem:
            raise UserError(f"{path}: key {key!r}: {problem}")
    if isinstance(state.get("loss"), torch.Tensor):
        state["loss"] = float(state["loss"])


# ------------------------------------------------- limits of anything read from a file
# A few bytes can describe a stride-0 tensor of billions of elements, or a list holding the
# same list twice 30 levels deep: checked in time proportional to the file's own size.
MAX_NODES, MAX_DEPTH = 1_000_000, 64  # a whole checkpoint, shared references expanded
MAX_CONFIG_NODES, MAX_CONFIG_DEPTH = 20_000, 32  # a config: OmegaConf is slow beyond this
OVERLAP_SLACK = 1 << 20  # bytes a tensor may claim beyond its storage (an expand()ed buffer)


def check_size(
    obj: Any, source: Path | str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH, what: str = ""
) -> None:
    """Refuse a cycle, deep nesting, too many nodes (shared references counted per use, each
    container walked once), or a tensor claiming more memory than its storage."""
    sizes: dict[int, int] = {}
    active: set[int] = set()  # containers being walked: seeing one again is a cycle

    def size(node: Any, depth: int, where: str) -> int:
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided:
                raise UserError(f"{source}: refused: {where}: a {node.layout} tensor (only dense tensors are expected)")
            claimed = node.numel() * node.element_size()
            if claimed > node.untyped_storage().nbytes() + OVERLAP_SLACK:
                raise UserError(
                    f"{source}: refused: {where}: a tensor of shape {tuple(node.shape)} with strides {node.stride()}"
                    f" claims {claimed} bytes from a {node.untyped_storage().nbytes()}-byte storage"
                )
            return 1
        if not isinstance(node, (dict, list, tuple)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise UserError(f"{source}: refused: {where or 'the file'} contains itself (a reference cycle)")
        if depth > max_depth:
            raise UserError(f"{source}: refused: {where or 'the file'} is nested deeper than {max_depth} levels")
        active.add(id(node))
        total = 1
        for name, value in node.items() if isinstance(node, dict) else enumerate(node):
            total += size(value, depth + 1, f"{where}[{name!r}]")
            if total > max_nodes:
                raise UserError(
                    f"{source}: refused: {where or 'the file'} holds more than {max_nodes} values "
                    f"(counting shared references once per use)"
                )
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    size(obj, 0, what)


# ----------------------------------------------------------------------------- loading
def load_file(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)` (never runs code) with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (expected a checkpoint .pt file)")
    if path.suffix.lower() == ".pt2":  # never opened: torch.export.load is not weights-only
        folder = f"its export folder ({path.parent})" if is_export(path.parent) else "an export folder"
        raise UserError(
            f"{path}: a .pt2 program is not loaded here: torch.export.load can run code from the file; evaluate"
            f" or predict with {folder} or a checkpoint, and load a .pt2 you trust with torch.export.load"
        )
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        verify(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip)
    except Exception as err:
        found = re.search(r"\bGLOBAL ([\w.]+)", str(err))  # torch words it several ways
        if found:  # a class or function reference: loading it would run code
            name = found.group(1)
            advice = (  # a pickled class: a whole model, torch.save(model, PATH)
                "; if it is a whole model saved with torch.save(model, PATH), save model.state_dict() instead, or"
                " convert it where its class is defined and you trust the file: torch.save(torch.load(PATH,"
                " weights_only=False).state_dict(), 'weights.pt'), then use weights=weights.pt"
                if name.rsplit(".", 1)[-1][:1].isupper()
                else ""
            )
            raise UserError(
                f"{path}: refused: the file holds objects other than tensors and plain containers, which could run"
                f" code when loaded (it names {name}){advice}"
            ) from None
        reason = first_line(err)
        if "weights only load failed" in str(err).lower():  # torch's advice is not for us
            detail = re.search(r"Unsupported operand \d+|Unsupported class \S+", str(err))
            reason = f"the weights-only loader cannot read it{': ' + detail.group(0) if detail else ''}"
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint, verified and checked key by key; only model_state_dict is needed."""
    state = load_file(path, map_location)
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(
            f"{path}: not a training checkpoint (expected a dict with keys ['epoch', 'model_state_dict',"
            f" 'optimizer_state_dict', 'loss']); for a bare state_dict use weights=PATH"
        )
    check_size(state, path)
    if isinstance(state.get("config"), (dict, list)):
        check_size(state["config"], path, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH, "['config']")
    check_checkpoint(state, path)
    return state


def inference_weights(state: dict[str, Any]) -> Any:
    """The weights to evaluate, predict with or export: the EMA's when the run kept them."""
    ema = state.get("ema_state_dict")
    return ema if isinstance(ema, dict) and ema else state["model_state_dict"]


def load_state_dict_file(model: nn.Module, path: Path, strict: bool = True, key: str | None = None) -> list[str]:
    """Weights into `model` from a state_dict, a checkpoint, an export folder or file[key]."""
    path = Path(path)
    if is_export(path):
        if key is not None:
            raise UserError(f"weights_key={key}: {path} is an export folder with one model; drop weights_key")
        return load_model_state(model, load_export(path)[1], path, strict=strict)
    obj = load_file(path)
    problem = plain_problem(obj.get("config")) if isinstance(obj, dict) else None
    if problem:  # a checkpoint's config is never used here, but a crafted one is refused
        raise UserError(f"{path}: refused config.{problem}: a file's config must be plain data")
    return load_model_state(model, pick_state_dict(obj, path, key), path, strict=strict)


def pick_state_dict(obj: Any, path: Path | str, key: str | None = None) -> Any:
    """The file itself, its `model_state_dict`, or `obj[key]`; several models: never guessed."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state_dict (names -> tensors), got {type(obj).__name__}")
    # Optimizer states ({'state', 'param_groups'}) are not dicts of tensors: never candidates.
    candidates = [k for k, v in obj.items() if isinstance(k, str) and not _tensors(v) and v]
    if key is not None:
        if key not in obj:
            raise UserError(f"weights_key={key}: not in {path}; model state_dicts there: {candidates or 'none'}")
        return obj[key]
    if not obj or not _tensors(obj):
        return obj
    if "model_state_dict" in obj:
        return inference_weights(obj)
    if len(candidates) == 1:
        return obj[candidates[0]]
    if candidates:
        raise UserError(f"{path}: holds several models {candidates}; pick one with weights_key=NAME")
    raise UserError(
        f"{path}: no model state_dict in it (keys {_short(list(obj))}); "
        f"expected names -> tensors, or a checkpoint with 'model_state_dict'"
    )


def load_model_state(model: nn.Module, state: Any, source: Path | str, strict: bool = True) -> list[str]:
    """load_state_dict naming every misfit key in one line; strict=False loads what fits."""
    problem = _tensors(state)
    if problem:
        raise UserError(f"{source}: state_dict {problem}")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    shared = [k for k in own if k in state]
    to_real = [k for k in shared if state[k].is_complex() and not own[k].is_complex()]
    reshaped = [k for k in shared if state[k].shape != own[k].shape]
    problems = [
        f"{what} {_short(keys)}"
        for what, keys in (
            ("dtype mismatch", [f"{k} {state[k].dtype} vs model {own[k].dtype}" for k in to_real]),
            ("missing keys", [k for k in own if k not in state]),
            ("unexpected keys", [k for k in state if k not in own]),
            ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped]),
        )
        if keys
    ]
    if problems and strict:
        raise UserError(
            f"{source}: weights do not fit the model ({'; '.join(problems)}); "
            f"check model=/data= or pass strict=false to load what matches"
        )
    matching = {k: state[k] for k in shared if k not in to_real and k not in reshaped}
    try:
        model.load_state_dict(matching, strict=False)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into the parameter
        raise UserError(f"{source}: weights do not fit the model ({first_line(err, 300)})") from None
    if problems and 2 * len(matching) < len(own):  # mostly random: an error, not a model
        raise UserError(
            f"{source}: strict=false would load only {len(matching)} of {len(own)} tensors (fewer than half);"
            f" expected keys {_short(list(own))}, found {_short(list(state))}; check model=/data= or the file"
        )
    if problems:
        print(
            f"warning: {source}: strict=false loaded {len(matching)} of {len(own)} tensors; "
            f"not loaded (left as initialised): {'; '.join(problems)}",
            file=sys.stderr,
        )
    return problems


def _short(items: list[str], limit: int = 6) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


# -------------------------------------------------------------------------- export folders
def is_export(path: Path) -> bool:
    """An export folder, or the model.safetensors file inside one."""
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    return path.is_dir() and (path / WEIGHTS).is_file()


def load_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of an export folder. safetensors holds only tensors: no code."""
    from safetensors.torch import load_file  # lazy: safetensors costs start-up time

    path = path.parent if path.is_file() else path
    config_path = path / CONFIG
    if not config_path.is_file():
        raise UserError(f"{path}: export folder has no {CONFIG}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{config_path}: not valid YAML ({first_line(err)})") from None
    check_size(config, config_path, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH)  # a YAML alias bomb
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "data")):
        raise UserError(f"{config_path}: expected 'model' and 'data' sections")
    check_loaded_targets(config, config_path)
    try:
        return config, load_file(str(path / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError, ValueError, ... one line for each
        raise UserError(f"{path / WEIGHTS}: not a readable safetensors file ({first_line(err)})") from None


def load_export_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """(trained model, config) of an export folder, built from the checked config."""
    path = Path(path)
    config, state = load_export(path)
    model = build(saved_sections(config, path / CONFIG).model, "model", path / CONFIG)
    load_model_state(model, state, path / WEIGHTS)
    return model.eval(), config


# ------------------------------------------------------------------- building, restoring
@dataclass
class Progress:
    """Where training is: everything resumed that is not a stateful part's."""

    epoch: int = 0  # last fully completed epoch
    step_in_epoch: int = 0  # batches of epoch `epoch + 1` already trained
    global_step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # this epoch's per-step losses
    checked: int = 0  # losses[:checked] are known to be finite
    history: list[dict] = field(default_factory=list)  # one metrics row per epoch
    best_value: float | None = None
    best_epoch: int | None = None
    fingerprint: dict | None = None  # the data, batch and model the run trains
    accumulate: int = 1  # batches per optimizer step (trainer.accumulate_grad_batches; not saved)

    def epoch_train_loss(self, batch_sizes: torch.Tensor) -> float:
        """Sample-weighted mean of the epoch's step losses: one host sync per epoch."""
        losses = torch.stack(self.losses).float().cpu()
        return float((losses * batch_sizes[: len(losses)]).sum() / batch_sizes.sum())

    def end_epoch(self, row: dict, monitor: str, mode: str) -> bool:
        """Record the epoch's row; True when `monitor` improved (NaN never improves)."""
        self.history.append(row)
        self.epoch, self.step_in_epoch, self.losses, self.checked = row["epoch"], 0, [], 0
        value = float(row[monitor])
        better = self.best_value is None or (value < self.best_value if mode == "min" else value > self.best_value)
        if math.isfinite(value) and better:
            self.best_value, self.best_epoch = value, row["epoch"]
            return True
        return False


def check_finite(progress: Progress) -> None:
    """Stop on a NaN/inf loss, naming the first bad step (losses are checked in bulk)."""
    fresh = progress.losses[progress.checked :]
    if not fresh:
        return
    finite = torch.isfinite(torch.stack(fresh))
    bad = not bool(finite.all())
    if any_rank(bad):  # under torchrun all ranks stop together, or the others would hang
        if not bad:
            raise FollowerError(f"non-finite loss on another rank by step {progress.global_step}")
        first = progress.checked + int((~finite).nonzero()[0, 0])
        k = progress.accumulate  # windows of k batches from the epoch's start
        step = progress.global_step - -(-len(progress.losses) // k) + first // k + 1
        raise UserError(
            f"non-finite loss at epoch {progress.epoch + 1}, step {step} (batch {first + 1} of the epoch);"
            f" lower optimizer.lr or check the data; the last good checkpoint is kept"
        )
    progress.checked = len(progress.losses)


@functools.cache
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("torchvision", "hydra-core"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def build_checkpoint(parts: dict[str, Any], progress: Progress, config: dict | DictConfig) -> dict[str, Any]:
    """One state_dict() per part (name in PARTS -> part, never wrapped), progress, provenance."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    state: dict[str, Any] = {}
    for name, part in parts.items():
        value = part.state_dict() if part is not None else None
        if name in ("scheduler", "scaler"):  # None when off (a disabled GradScaler's is {})
            value = value or None
        elif not value and name not in ("model", "optimizer"):
            continue  # trainer features and trackers: absent when off
        state[PARTS[name]] = value
    weights = state["model_state_dict"]  # never write a NaN/inf model: one host sync
    finite = {k: torch.isfinite(t).all() for k, t in weights.items() if t.is_floating_point()}
    if finite and not bool(torch.stack(list(finite.values())).all()):
        bad = [k for k, ok in finite.items() if not ok]
        raise UserError(
            f"non-finite weights [{', '.join(bad[:3])}{' ...' if bad[3:] else ''}]"
            f" at epoch {progress.epoch + (1 if progress.step_in_epoch else 0)}, step {progress.global_step}:"
            f" not saved; lower optimizer.lr; the last good checkpoint is kept"
        )
    losses, history = progress.losses, progress.history
    best = {"monitor": str(config["checkpoint"]["monitor"]), "value": progress.best_value, "epoch": progress.best_epoch}
    state.update(
        epoch=progress.epoch,
        global_step=progress.global_step,
        loss=float(losses[-1]) if losses else history[-1]["train_loss"] if history else None,
        step_in_epoch=progress.step_in_epoch,
        epoch_step_losses=torch.stack(losses).cpu() if losses else torch.zeros(0),
        rng_state=rng_state(),  # rank 0's; every rank's in rank_states under torchrun
        best=best,
        config=config,
        versions=dict(_versions()),
        format_version=FORMAT_VERSION,
        world_size=world_size(),
        fingerprint=progress.fingerprint,
    )
    if is_distributed():  # a collective: every rank builds the checkpoint, rank 0 saves it
        state["rank_states"] = gather_to_main(
            {"rng_state": state["rng_state"], "epoch_step_losses": state["epoch_step_losses"]}
        )
    return state


def restore_checkpoint(state: dict | None, parts: dict[str, Any], cfg: DictConfig, data: Any) -> Progress:
    """Check the checkpoint may resume this config, restore each part and the RNGs; the
    Progress to go on from. resume_mode=weights: model and optimizer buffers only."""
    model, optimizer, scheduler = parts["model"], parts["optimizer"], parts.get("scheduler")
    fingerprint = run_fingerprint(data, model, int(cfg.data.batch_size) * world_size()) if data is not None else None
    if state is None:
        return Progress(fingerprint=fingerprint)
    source = f"checkpoint (epoch {state.get('epoch')})"
    weights_mode = str(cfg.get("resume_mode", "exact")) == "weights"
    load_model_state(model, state["model_state_dict"], source)  # names the misfit keys
    if fingerprint and state.get("fingerprint") and not weights_mode:  # no fingerprint (older files): unchecked
        check_fingerprint(state["fingerprint"], fingerprint, source)
    tutorial = "format_version" not in state  # its `epoch`: the 0-based index of the last loop
    epoch = state.get("epoch", -1) + 1 if tutorial else state.get("epoch", 0)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict() if scheduler is not None else None
    try:
        if "optimizer_state_dict" in state or not tutorial:
            optimizer.load_state_dict(state["optimizer_state_dict"])
        if weights_mode:  # a new schedule: the optimizer's buffers, the config's settings
            for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
                group.update(fresh)
            return Progress(fingerprint=fingerprint)
        for name, part in parts.items():
            if name in ("model", "optimizer") or part is None:
                continue
            # an EMA the file lacks starts from the restored weights, as a fresh one would
            saved = state.get(PARTS[name], state["model_state_dict"] if name == "ema" else None)
            if saved is not None:
                part.load_state_dict(saved)
            if PARTS[name] not in state and not tutorial and part.state_dict() and is_main():
                print(f"resume: the checkpoint has no {PARTS[name]}; it starts afresh")
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        raise UserError(
            f"{source}: optimizer/scheduler state does not fit this config ({err}); check"
            f" optimizer=/scheduler= overrides"
        ) from None
    if tutorial and is_main():
        wanted = ["optimizer_state_dict", "global_step", "rng_state", "history", "best", "config"]
        fresh = [k for k in wanted + ["scheduler_state_dict"] * (scheduler is not None) if state.get(k) is None]
        print(
            f"resume: a general checkpoint (no format_version): its epoch {state.get('epoch', 'key (absent)')} is"
            f" read as the tutorials' 0-based loop index, so {epoch} epoch(s) are done and training goes on at"
            f" epoch {epoch + 1}"
        )
        print(f"resume: not in the file, started fresh: {', '.join(fresh) or 'nothing'}")
    check_optimizer_state(optimizer, source)
    apply_config_changes(state, optimizer, scheduler, fresh_schedule, cfg, source)
    rng, losses, step_in_epoch = resume_state_for_rank(state)  # this rank's share
    if data is not None:  # None: a test's bare parts
        check_fits_data(step_in_epoch, state.get("history") or [], data, source)
    if rng is not None:
        try:  # load_checkpoint tried it on fresh generators; a CUDA one may still refuse it
            set_rng_state(rng)
        except (ValueError, TypeError, RuntimeError, OverflowError) as err:
            raise UserError(f"{source}: rng_state cannot be restored ({first_line(err, 160)})") from None
    best = state.get("best") or {}
    return Progress(
        epoch=epoch,
        step_in_epoch=step_in_epoch,
        global_step=state.get("global_step", 0),
        losses=list(losses.unbind()) if losses is not None and len(losses) else [],
        history=list(state.get("history") or []),
        best_value=best.get("value"),
        best_epoch=best.get("epoch"),
        fingerprint=fingerprint,
    )


def resume_state_for_rank(checkpoint: dict[str, Any]) -> tuple[dict | None, Any, int]:
    """(RNG state, epoch step losses, step in epoch) of this rank. Another world size: rank 0
    takes the saved RNG state, and a half-done epoch restarts (its per-rank slices changed)."""
    saved_world, step = checkpoint.get("world_size", 1), checkpoint.get("step_in_epoch", 0)
    if saved_world == world_size():
        shares = checkpoint.get("rank_states")
        share = shares[rank()] if shares else checkpoint  # one per process: SCHEMA checked the count
        return share.get("rng_state"), share.get("epoch_step_losses"), step
    if is_main():
        warnings.warn(
            f"the checkpoint was written by {saved_world} process(es), this run has {world_size()}: each process"
            f" now sees other samples, so the result will not match an uninterrupted run"
            + (f"; epoch {checkpoint['epoch'] + 1} restarts from its first batch" if step else ""),
            stacklevel=3,
        )
    return (checkpoint.get("rng_state") if is_main() else None), None, 0  # the epoch's losses: none, or restarted


# -------------------------------------------------- may this checkpoint resume this run
# What a run trains on, checked on exact resume: split sizes and content hashes (large tensors
# by a strided ~16 MB sample, image folders by names and sizes), global batch, model shapes.
HASHED_BYTES = 16 << 20


def _tensor_digest(h: Any, tensor: Any) -> None:
    t = torch.as_tensor(tensor).detach().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.reshape(-1)
    if flat.numel() * flat.element_size() > HASHED_BYTES:
        flat = flat[:: -(-flat.numel() * flat.element_size() // HASHED_BYTES)]
    h.update(flat.contiguous().view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _digest(h: Any, obj: Any) -> bool:
    """Feed what identifies `obj`'s content into `h`; False when nothing is known of it."""
    if isinstance(obj, Subset):
        h.update(repr(list(obj.indices)).encode())
        return _digest(h, obj.dataset)
    if hasattr(obj, "x") and hasattr(obj, "y"):  # TensorSplit
        _tensor_digest(h, obj.x)
        _tensor_digest(h, obj.y)
        return True
    samples = getattr(obj, "samples", None)  # torchvision ImageFolder: (path, label) pairs
    if isinstance(samples, list):
        root = Path(str(getattr(obj, "root", "")))
        for path, label in samples:
            file = Path(path)
            name = file.relative_to(root) if file.is_relative_to(root) else file
            h.update(f"{name}\0{label}\0{file.stat().st_size}\n".encode())
        return True
    data = getattr(obj, "data", None)  # torchvision MNIST, CIFAR: arrays in memory
    if data is not None and hasattr(data, "shape"):
        _tensor_digest(h, data)
        if getattr(obj, "targets", None) is not None:
            _tensor_digest(h, torch.as_tensor(obj.targets))
        return True
    return False


def run_fingerprint(data: Any, model: nn.Module, global_batch: int) -> dict[str, Any]:
    splits = {}
    for name in ("train", "val"):
        split, h = data.split(name), hashlib.blake2b(digest_size=16)
        splits[name] = {"size": len(split), "hash": h.hexdigest() if _digest(h, split) else None}
    return {
        "data": splits,
        "global_batch_size": int(global_batch),
        "model": {name: list(t.shape) for name, t in model.state_dict().items()},
    }


NEW_SCHEDULE = (
    "to continue deliberately from its weights and optimizer with a new schedule "
    "(epoch 0), add resume_mode=weights run_name=NEW_NAME resume=PATH_OF_CHECKPOINT"
)


def check_fingerprint(saved: dict, now: dict, source: str) -> None:
    """Refuse an exact resume on other data or global batch. Another model is refused before,
    by load_model_state, naming the misfit keys."""
    changed = []
    try:
        for name, split in (saved.get("data") or {}).items():
            current = now["data"].get(name)
            if current is None:
                continue
            if split.get("size") != current["size"]:
                changed.append(f"{name} split {split.get('size')} -> {current['size']} samples")
            elif None not in (split.get("hash"), current["hash"]) and split["hash"] != current["hash"]:
                changed.append(f"{name} split content changed")
        batch = saved.get("global_batch_size")
        if batch is not None and batch != now["global_batch_size"]:
            changed.append(
                f"global batch size {batch} -> {now['global_batch_size']} (data.batch_size"
                f" x processes; trainer.global_batch_size=N keeps it whatever the count)"
            )
    except (AttributeError, TypeError, KeyError, ValueError, RuntimeError):  # a crafted or damaged file
        raise UserError(f"{source}: key 'fingerprint' is malformed (expected each split's size and hash)") from None
    if changed:
        raise UserError(
            f"{source}: {'; '.join(changed)} since the checkpoint, so an exact resume is impossible; {NEW_SCHEDULE}"
        )


def check_optimizer_state(optimizer, source: str) -> None:
    """The optimizer's own kind of settings, buffers of their parameter's shape (load_state_dict
    checks neither)."""
    lacking = [k for k in optimizer.defaults if k not in optimizer.param_groups[0]]
    if lacking:  # e.g. an Adam state loaded into SGD: its first step would fail
        raise UserError(
            f"{source}: optimizer state is not {type(optimizer).__name__}'s (no {lacking[:4]} in its"
            f" param_groups); check optimizer="
        )
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():  # lr, momentum, ...: same kind
            value = group.get(key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise UserError(f"{source}: optimizer param_groups {key}={_brief(value, 60)}: expected true or false")
            if _is(default) and not (
                (_is(value) or isinstance(value, torch.Tensor) and value.numel() == 1) and math.isfinite(float(value))
            ):
                raise UserError(f"{source}: optimizer param_groups {key}={_brief(value, 60)}: expected a finite number")
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise UserError(
                        f"{source}: optimizer state {name!r} has shape {list(value.shape)}, its parameter"
                        f" {list(param.shape)}; the checkpoint does not fit this model"
                    )


def check_fits_data(step_in_epoch: int, history: list, data: Any, source: str) -> None:
    """Now the data is known: a mid-epoch position inside an epoch, saved metrics rows (they go
    back into metrics.csv beside this run's) with this task's columns."""
    steps = batches_per_epoch(len(data.split("train")), int(data.batch_size), world_size())
    if step_in_epoch > steps:  # == steps: saved on the epoch's last step, before validation
        raise UserError(
            f"{source}: step_in_epoch={step_in_epoch} but an epoch of this data has {steps} batches; the"
            f" checkpoint does not fit data.*"
        )
    columns = ["epoch", "step", "train_loss", "val_loss", *(["val_acc"] if data.task == "classification" else []), "lr"]
    if history and list(history[0]) != columns:
        raise UserError(f"{source}: history rows have columns {list(history[0])}; a {data.task} run writes {columns}")


# Scheduler entries that count progress; the others are settings (T_max, step_size, ...).
_SCHEDULE_PROGRESS = set(
    "last_epoch _step_count _last_lr _get_lr_called_within_step _is_initial base_lrs verbose".split()
)
# Keys that change what is printed, logged or where, not the weights: no warning on resume.
_UNTRAINED = re.compile(
    r"resume|resume_mode|run_name|debug|weights|strict|weights_key|checkpoint\.root|logger\..*|.*T_max"
    r"|trainer\.(epochs|device|max_time|model_summary|print_every_s|log_every_n_steps)"
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def apply_config_changes(
    state: dict, optimizer, scheduler, fresh_schedule: dict | None, cfg: DictConfig, source: str
) -> None:
    """Compare the saved config with this one, key by key: the new optimizer/scheduler settings
    win over the file's (a new lr rescales the scheduled lr and base_lrs); a changed schedule
    length (scheduler.interval, or trainer.epochs where the schedule derives from it, e.g.
    cosine's T_max) is refused unless set explicitly; any other change that trains differently warns."""
    group0, saved, schedule = optimizer.param_groups[0], state.get("config"), state.get("scheduler_state_dict")
    if saved is None:  # a tutorial file: the config's settings against its optimizer's own
        own = {k: list(v) if isinstance(v, tuple) else v for k, v in group0.items() if k != "params"}
        saved = {"optimizer": {**own, "lr": group0.get("initial_lr", group0["lr"])}}
    before = _flatten(saved)
    now = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    changes = {k: (before.get(k), now.get(k)) for k in before.keys() | now.keys() if before.get(k) != now.get(k)}
    applied = []
    for key, (was, value) in sorted(changes.items()):
        section, _, name = key.partition(".")
        if None in (was, value) or name.startswith("_"):
            continue
        if section == "optimizer" and name in group0:
            for group in optimizer.param_groups:
                if name != "lr":
                    group[name] = value
                    continue
                base = group.get("initial_lr", group["lr"])
                group["lr"] = group["lr"] * value / base if base else value  # the schedule's phase kept
                if "initial_lr" in group:
                    group["initial_lr"] = value
            if name == "lr" and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [value for _ in optimizer.param_groups]
        elif section == "scheduler" and name != "T_max" and hasattr(scheduler, name) and schedule is not None:
            setattr(scheduler, name, value)  # T_max follows trainer.epochs: checked below
        else:
            continue
        applied.append(key)
    if applied and is_main():
        shown = ", ".join(f"{k} {changes[k][0]} -> {changes[k][1]}" for k in applied)
        lr = f" (lr now {group0['lr']:.4g})" if scheduler is not None and "optimizer.lr" in applied else ""
        print(f"resume: applied config changes to the restored state: {shown}{lr}")
    if fresh_schedule is not None and isinstance(schedule, dict):
        was, value = (v or "epoch" for v in changes.get("scheduler.interval", ("epoch", "epoch")))
        if was != value:
            raise UserError(
                f"{source}: scheduler.interval changed {was} -> {value}: the saved schedule counts {was}s; keep"
                f" scheduler.interval={was} for an exact resume, or {NEW_SCHEDULE}"
            )
        was, value = changes.get("trainer.epochs", (None, None))
        if was is not None:
            derived = [
                f"{k} {schedule[k]} -> {v}"
                for k, v in fresh_schedule.items()
                if k not in _SCHEDULE_PROGRESS
                and k in schedule
                and schedule[k] != v
                and f"scheduler.{k}" not in applied
            ]
            if derived:
                raise UserError(
                    f"{source}: trainer.epochs changed {was} -> {value} and the schedule depends on it"
                    f" ({', '.join(derived)}); keep trainer.epochs={was} for an exact resume, or {NEW_SCHEDULE}"
                )
    changed = sorted(k for k in changes if k not in applied and not _UNTRAINED.fullmatch(k))
    if changed and "format_version" in state:  # a tutorial file has no config to compare
        warnings.warn(
            f"resuming with a config that differs from the checkpoint's in {changed[:8]}: the result will not"
            f" match an uninterrupted run",
            stacklevel=3,
        )
