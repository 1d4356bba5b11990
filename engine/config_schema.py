"""Names and types of the fixed config keys, as OmegaConf structured configs registered in
Hydra's ConfigStore: Hydra itself refuses an unknown key or a value of the wrong type while
composing; `check_schema` catches what Hydra lets through (keys added with `+key=value`), and
`schema_error` says either in one line.

The values and their documentation stay in configs/train.yaml, evaluate.yaml and predict.yaml;
each names its schema first in its defaults list (`- train_schema`), so these classes only
say which keys exist and of what type (a field without a default is filled by the YAML).
The `_target_` sections (data, model, loss, optimizer, scheduler) are free-form here: their
keys are checked against the constructor they name (engine/target_checks.py).

Importing this module registers the schemas; engine.config and engine.cli import it, and so
must anything that composes the configs without them (tests/conftest.py).
"""
from __future__ import annotations

import difflib
import enum
import inspect
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from engine.errors import UserError
from engine.runtime import PRECISIONS


class Choice(str, enum.Enum):
    """A key with a fixed set of values. OmegaConf 2.3 has no `Literal`: an Enum it is, whose
    member names are the values themselves (so `precision: "32"` is a valid name), and a str
    so a member compares, hashes, formats and `str()`s as that text. A member is still no
    plain str to pickle: configs stored in checkpoints come from
    `OmegaConf.to_container(..., enum_to_str=True)`."""

    __str__ = str.__str__  # (enum.StrEnum, Python 3.11+, does the same)
    __format__ = str.__format__

    @classmethod
    def _missing_(cls, value: object) -> Choice | None:
        # `trainer.precision=32` on the command line arrives as the integer 32.
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.__members__.get(str(value))
        return None


def _choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, [(value, value) for value in values])


# Metrics train.py logs per epoch, by task: the choices for checkpoint.monitor.
METRICS = {"regression": ("val_loss", "train_loss"),
           "classification": ("val_loss", "val_acc", "train_loss")}

Precision = _choice("Precision", PRECISIONS)
Monitor = _choice("Monitor", ("val_loss", "val_acc", "train_loss"))
Mode = _choice("Mode", ("min", "max"))
ResumeMode = _choice("ResumeMode", ("exact", "weights"))
Split = _choice("Split", ("train", "val", "test"))


@dataclass
class TrainerConfig:
    epochs: int
    device: str  # auto | cpu | cuda | cuda:N | mps: checked by engine.runtime.resolve_device
    precision: Precision  # type: ignore[valid-type]
    channels_last: bool
    compile: bool
    deterministic: bool
    max_time: float | None
    log_every_n_steps: int
    print_every_s: float
    global_batch_size: int | None
    grad_clip_norm: float | None
    accumulate_grad_batches: int
    model_summary: bool
    ema_decay: float | None
    fast_dev_run: bool
    limit_train_batches: Any  # int batches or a float fraction (OmegaConf has no int | float)
    limit_val_batches: Any
    overfit_batches: Any


@dataclass
class EarlyStoppingConfig:
    patience: int | None
    monitor: Monitor  # type: ignore[valid-type]
    min_delta: float


class CheckpointConfig:  # made a dataclass below, once `async` is in
    root: str
    every_n_epochs: int
    every_n_steps: int | None
    keep_last: int
    monitor: Monitor  # type: ignore[valid-type]
    mode: Mode  # type: ignore[valid-type]
    # async: bool -- a Python keyword, added below under its config name
    export: bool
    export_pt2: bool


# `checkpoint.async` (the key users type) is a Python keyword, so no class body can declare it:
# it goes into the annotations after `mode` (where train.yaml has it), and dataclass() is told
# to generate no code (an __init__ would have to spell it).
_fields = list(CheckpointConfig.__annotations__.items())
_fields.insert([name for name, _ in _fields].index("mode") + 1, ("async", "bool"))
CheckpointConfig.__annotations__.clear()
CheckpointConfig.__annotations__.update(_fields)
CheckpointConfig = dataclass(init=False, repr=False, eq=False)(CheckpointConfig)


@dataclass
class TrainConfig:
    name: str
    run_name: str | None
    resume: str | None  # null | auto | a path
    weights: str | None
    strict: bool | None
    weights_key: str | None
    resume_mode: ResumeMode  # type: ignore[valid-type]
    seed: int
    debug: bool
    trainer: TrainerConfig
    early_stopping: EarlyStoppingConfig
    checkpoint: CheckpointConfig
    data: Any = None  # the config groups: `_target_` sections
    model: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    logger: Any = None  # trackers: checked by engine.loggers.check_logger_config


@dataclass
class EvaluateConfig:
    ckpt: str | None
    weights: str | None
    strict: bool
    weights_key: str | None
    split: Split  # type: ignore[valid-type]
    device: str
    batch_size: int | None
    output: str | None
    seed: int
    debug: bool
    data: Any = None
    model: Any = None
    loss: Any = None


@dataclass
class PredictConfig:
    ckpt: str | None
    weights: str | None
    strict: bool
    weights_key: str | None
    input: str
    output: str
    device: str
    batch_size: int
    invert: bool
    seed: int
    debug: bool
    data: Any = None
    model: Any = None


SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "predict": PredictConfig}

for _script, _schema in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_script}_schema", node=_schema)


def check_schema(cfg: DictConfig, script: str) -> None:
    """The fixed sections against the script's schema, by OmegaConf's own merge: Hydra checked
    every override while composing, except keys appended with `+` (`+trainer.epoch=5`). Merged
    as plain containers, as a typed node would bring its extra keys along."""
    try:
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[script]), OmegaConf.to_container(cfg))
    except OmegaConfBaseException as err:
        raise UserError(schema_error(err)) from None


def schema_error(err: OmegaConfBaseException) -> str:
    """OmegaConf's refusal of a key or value of a structured config, as one line naming the
    key, the value and what is expected."""
    key = str(getattr(err, "full_key", None) or "config")
    parent, _, name = key.rpartition(".")
    owner = getattr(err, "object_type", None)  # the dataclass that holds the key
    if is_dataclass(owner) and isinstance(err, ValidationError):
        expected = describe(typing.get_type_hints(owner).get(name, Any))
        return f"{key}={err.value!r}: expected {expected}"
    if is_dataclass(owner) and isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        valid = [f.name for f in fields(owner)]
        return (f"{key}: unknown key in {parent or 'the config'}{did_you_mean(name, valid)}; "
                f"valid keys: {', '.join(valid)}")
    return f"{key}: {str(err).strip().splitlines()[0]}"


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(hint: Any) -> str:
    """What a type hint asks for, in words: 'an integer', 'min or max', 'a section with keys
    ...'; '' for what no config value can be (a tensor, an optimizer)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(d for d in map(describe, typing.get_args(hint)) if d)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text",
             Path: "a path", list: "a list", tuple: "a list", dict: "a mapping",
             type(None): "null", typing.Any: "any value"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        values = [str(member.value) for member in hint]
        return " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)
    if is_dataclass(hint):
        return f"a section with keys {', '.join(f.name for f in fields(hint))}"
    return ""
