"""Loading what a file holds, weights-only and with one-line errors: a training checkpoint
(verified: CRC, structure limits, every key's type and range), a bare state_dict, an entry
of a file with several models, or an export folder; and loading weights into a model."""

from __future__ import annotations

import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint import TUTORIAL_KEYS
from engine.checkpoint.limits import check_structure
from engine.checkpoint.schema import check_checkpoint
from engine.config import build, plain_problem, saved_sections
from engine.errors import UserError, first_line
from engine.export_read import CONFIG, WEIGHTS, is_export, load_export
from engine.fast_io import verify


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
        raise UserError(f"{path}: not a readable checkpoint ({first_line(err)})") from None
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
        raise UserError(f"{path}: not a readable checkpoint ({first_line(err)})") from None
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({first_line(err)})") from None


def _whole_model_advice(name: str) -> str:
    """`torch.save(model, PATH)` pickles the model's class (`__main__.Net`, a torch.nn
    class): say how to get a weights-only file instead. Functions (`posix.system`) get none."""
    if not name.rsplit(".", 1)[-1][:1].isupper():
        return ""
    return ("; if it is a whole model saved with torch.save(model, PATH), save "
            "model.state_dict() instead, or convert it where its class is defined and you "
            "trust the file: torch.save(torch.load(PATH, weights_only=False).state_dict(), "
            "'weights.pt'), then use weights=weights.pt")


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """A full training checkpoint written by train.py, verified and checked field by field
    (types, then shapes, sizes and ranges: see engine.checkpoint.schema) before anything uses it.
    Every key but model_state_dict is optional (tutorial checkpoints have only four)."""
    state = load_file(path, map_location)
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: not a training checkpoint (expected a dict with keys "
                        f"{list(TUTORIAL_KEYS)}); for a bare state_dict use weights=PATH")
    check_structure(state, path)
    check_state_dict(state["model_state_dict"], path, "model_state_dict")
    check_checkpoint(state, path)
    return state


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
    if is_export(path):
        state = load_export(path)[1]
        if key is not None:
            raise UserError(f"weights_key={key}: {path} is an export folder with one model; "
                            f"drop weights_key")
    else:
        obj = load_file(path)
        problem = plain_problem(obj.get("config")) if isinstance(obj, dict) else None
        if problem:  # a checkpoint's config is never used here, but a crafted one is refused
            raise UserError(f"{path}: refused config.{problem}: a file's config must be plain "
                            f"data")
        state = pick_state_dict(obj, path, key)
    return load_model_state(model, state, path, strict=strict)


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def inference_weights(state: dict[str, Any]) -> Any:
    """The weights to evaluate, predict with or export: `ema_state_dict` (trainer.ema_decay)
    when the file has it, else `model_state_dict` (what training continues from)."""
    ema = state.get("ema_state_dict")
    return ema if isinstance(ema, dict) and ema else state["model_state_dict"]


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


def load_export_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """(model with its trained weights, config) of an export folder, for your own code: the
    config is checked as a file's (plain data, project/torch.nn targets only) and the model
    is built from exactly what was checked, so a crafted config.yaml cannot run code."""
    path = Path(path)
    config, state = load_export(path)
    model = build(saved_sections(config, path / CONFIG).model, "model", path / CONFIG)
    load_model_state(model, state, path / WEIGHTS)
    return model.eval(), config

