"""The config: typed schema (Hydra's ConfigStore), value ranges, `_target_` sections against
the constructors they name, what a config read from a file may hold (README "Security"), build."""

from __future__ import annotations

import difflib
import enum
import functools
import importlib.util
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra._internal.utils import _locate
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf import errors as oe

from engine.errors import UserError, first_line
from engine.runtime import PRECISIONS, max_workers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TARGET_SECTIONS = ("data", "model", "loss", "optimizer", "scheduler")
REQUIRED_SECTIONS = ("trainer", "checkpoint", "data", "model", "loss", "optimizer")
# Values of the right type that would still overflow torch's C integers or the machine.
MAX_COUNT = 2**31 - 1
MAX_BATCH = 1 << 24
MAX_LR = 10**6
TRANSFORMS = "torchvision.transforms.v2."


# ------------------------------------------------------------------------------ the schema
class Choice(enum.StrEnum):
    """A key with fixed values (OmegaConf 2.3 has no Literal); its members' names are their values."""

    @classmethod
    def _missing_(cls, value: object) -> Choice | None:  # `trainer.precision=32`: an int
        return cls.__members__.get(str(value))


# Metrics train.py logs per epoch, by task: the choices for checkpoint.monitor.
METRICS = {"regression": ("val_loss", "train_loss"), "classification": ("val_loss", "val_acc", "train_loss")}
Precision = Choice("Precision", PRECISIONS)
Monitor = Choice("Monitor", METRICS["classification"])
Mode = Choice("Mode", ("min", "max"))
ResumeMode = Choice("ResumeMode", ("exact", "weights"))
Split = Choice("Split", ("train", "val", "test"))


def _schema(name: str, hints: dict[str, Any], base: type = object, **defaults: Any) -> type:
    """A dataclass made from its annotations: `checkpoint.async` is a Python keyword, which no
    class body or make_dataclass can declare (and no generated __init__/__repr__ can spell)."""
    return dataclass(init=False, repr=False, eq=False)(type(name, (base,), {"__annotations__": hints, **defaults}))


# Values and their documentation are in configs/*.yaml: these say which keys exist, of what type.
TrainerConfig = _schema(
    "TrainerConfig",
    {
        "epochs": int,
        "device": str,
        "precision": Precision,
        "channels_last": bool,
        "compile": bool,
        "deterministic": bool,
        "max_time": float | None,
        "log_every_n_steps": int,
        "print_every_s": float,
        "global_batch_size": int | None,
        "grad_clip_norm": float | None,
        "accumulate_grad_batches": int,
        "model_summary": bool,
        "ema_decay": float | None,
        "fast_dev_run": bool,  # limits: batches (int) or a fraction (float); OmegaConf has no union
        "limit_train_batches": Any,
        "limit_val_batches": Any,
        "overfit_batches": Any,
    },
)
EarlyStoppingConfig = _schema("EarlyStoppingConfig", {"patience": int | None, "monitor": Monitor, "min_delta": float})
CheckpointConfig = _schema(
    "CheckpointConfig",
    {
        "root": str,
        "every_n_epochs": int,
        "every_n_steps": int | None,
        "keep_last": int,
        "monitor": Monitor,
        "mode": Mode,
        "async": bool,
        "export": bool,
        "export_pt2": bool,
    },
)
# k-fold cross-validation (configs/cv, with -m): which fold of how many is this run's val split.
CVConfig = _schema("CVConfig", {"folds": int | None, "fold": int | None}, folds=None, fold=None)
_FREE = (*TARGET_SECTIONS, "logger")  # `_target_` sections and trackers: any value, None
TrainConfig = _schema(
    "TrainConfig",
    {
        "name": str,
        "run_name": str | None,
        "resume": str | None,
        "weights": str | None,
        "strict": bool | None,
        "weights_key": str | None,
        "resume_mode": ResumeMode,
        "seed": int,
        "debug": bool,
        "trainer": TrainerConfig,
        "early_stopping": EarlyStoppingConfig,
        "checkpoint": CheckpointConfig,
        "cv": CVConfig,
        **dict.fromkeys(_FREE, Any),
    },
    **dict.fromkeys(_FREE),
)
InferenceConfig = _schema(
    "InferenceConfig",
    {"ckpt": str | None, "weights": str | None, "strict": bool, "weights_key": str | None, "device": str}
    | {"seed": int, "debug": bool, **dict.fromkeys(("data", "model", "loss"), Any)},
    **dict.fromkeys(("data", "model", "loss")),
)
EvaluateConfig = _schema(
    "EvaluateConfig", {"split": Split, "batch_size": int | None, "output": str | None}, InferenceConfig
)
PredictConfig = _schema(
    "PredictConfig", {"input": str, "output": str, "batch_size": int, "invert": bool}, InferenceConfig
)
SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "predict": PredictConfig}
for _script, _schema_class in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_script}_schema", node=_schema_class)


# --------------------------------------------------------------- ranges: each key, once
class Range(NamedTuple):
    """`low <= value <= high` (`<` where open). `high` None: at most MAX_COUNT for an integer,
    unbounded for a number; a str: the key whose value bounds it. Null or absent values pass."""

    kind: type
    low: float
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""


RANGES = {
    "seed": Range(int, 0, 2**32 - 1),  # NumPy's seeds
    "batch_size": Range(int, 1, MAX_BATCH),  # evaluate.py, predict.py
    "trainer.epochs": Range(int, 1),
    "trainer.max_time": Range(float, 0, open_low=True, note=" (seconds) or null"),
    "trainer.log_every_n_steps": Range(int, 1),
    "trainer.print_every_s": Range(float, 0, note=" (seconds)"),
    "trainer.global_batch_size": Range(int, 1, MAX_BATCH),
    "trainer.grad_clip_norm": Range(float, 0, open_low=True, note=" or null (off)"),
    "trainer.accumulate_grad_batches": Range(int, 1),
    "trainer.ema_decay": Range(float, 0, 1, True, True, " (e.g. 0.999), or null"),
    "early_stopping.patience": Range(int, 1),
    "early_stopping.min_delta": Range(float, 0),
    "checkpoint.every_n_epochs": Range(int, 1),
    "checkpoint.every_n_steps": Range(int, 1),
    "checkpoint.keep_last": Range(int, 1),
    "cv.folds": Range(int, 2),
    "cv.fold": Range(int, 0, "cv.folds", open_high=True),
    "data.batch_size": Range(int, 1, MAX_BATCH),
    "data.num_workers": Range(int, 0, max_workers(), note=" (4 per CPU core of this machine)"),
    "data.num_classes": Range(int, 1, 1_000_000),
    "optimizer.lr": Range(float, 0, MAX_LR, open_low=True),
    "optimizer.momentum": Range(float, 0, MAX_LR),
    "optimizer.weight_decay": Range(float, 0, MAX_LR),
    "optimizer.eps": Range(float, 0, open_low=True, note=", e.g. 1e-8"),
    "scheduler.step_size": Range(int, 1),
    "scheduler.T_max": Range(int, 1),
    "scheduler.gamma": Range(float, 0),
    "scheduler.eta_min": Range(float, 0),
    "scheduler.warmup_epochs": Range(int, 0),
    "scheduler.min_lr": Range(float, 0, "optimizer.lr"),
    # shares of the data set: 0 < train < 1, 0 <= the others < 1
    "data.train_fraction": Range(float, 0, 1, True, True, " (a fraction)"),
    "data.val_fraction": Range(float, 0, 1, False, True, " (a fraction)"),
    "data.test_fraction": Range(float, 0, 1, False, True, " (a fraction)"),
}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(cfg: DictConfig, key: str, value: Any, rule: Range) -> None:
    high = OmegaConf.select(cfg, rule.high) if isinstance(rule.high, str) else rule.high
    high = MAX_COUNT if high is None and rule.kind is int else high
    kind_ok = is_number(value) and (isinstance(value, int) or rule.kind is float and math.isfinite(value))
    above = kind_ok and (value > rule.low if rule.open_low else value >= rule.low)
    if above and (high is None or (value < high if rule.open_high else value <= high)):
        return
    text = f"{'an integer' if rule.kind is int else 'a number'} {'>' if rule.open_low else '>='} {rule.low}"
    if high is not None and (above or rule.kind is float):  # an integer's bound: once it is passed
        shown = f"{rule.high} ({high})" if isinstance(rule.high, str) else high
        text += f" and {'<' if rule.open_high else '<='} {shown}"
    raise UserError(f"{key}={value!r}: expected {text}{rule.note}")


def check_limits(cfg: DictConfig, required: tuple[str, ...] = ()) -> None:
    """Every value of `cfg` against its range (null or absent passes unless `required`), the
    values that must agree, and that `data` and `model` name the right kind of object."""
    get = functools.partial(OmegaConf.select, cfg, default=None)
    if get("cv.fold") is not None and get("cv.folds") is None:
        raise UserError(f"cv.fold={get('cv.fold')!r}: needs cv.folds (pick a split with cv=5fold, or set cv.folds=K)")
    for key, rule in RANGES.items():
        if get(key) is not None or key in required:
            check_range(cfg, key, get(key), rule)
    held_out = {key: get(f"data.{key}") for key in ("val_fraction", "test_fraction") if get(f"data.{key}") is not None}
    if get("data.train_fraction") is None and sum(held_out.values()) >= 1:
        raise UserError(
            f"data: {' + '.join(held_out)} = {sum(held_out.values()):g} leaves no training data; expected a sum < 1"
        )
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.overfit_batches"):
        value = get(key)
        batches = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT
        if value is not None and not batches and not (isinstance(value, float) and 0 < value <= 1):
            raise UserError(
                f"{key}={value!r}: expected batches (an integer from 1 to {MAX_COUNT}), a fraction in (0, 1], or null"
            )
    betas = get("optimizer.betas")
    betas = OmegaConf.to_container(betas) if isinstance(betas, ListConfig) else betas
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise UserError(f"optimizer.betas={betas!r}: expected two numbers >= 0 and < 1, e.g. [0.9,0.999]")
    if get("optimizer.nesterov") is True and not (get("optimizer.momentum") or 0) > 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if str(interval := get("scheduler.interval") or "epoch") not in ("epoch", "step"):
        raise UserError(f"scheduler.interval={interval!r}: expected epoch or step")
    if cfg.get("weights_key") is not None and not cfg.get("weights"):
        raise UserError(f"weights_key={cfg.weights_key}: only used with weights=PATH (a file with several models)")
    for key in ("data", "model"):
        if isinstance(cfg.get(key), DictConfig):
            check_target_section(cfg[key], key)


def check_monitor(cfg: DictConfig, task: str) -> None:
    """checkpoint.monitor (and early_stopping.monitor, when on): a metric this task logs."""
    stopping = cfg.get("early_stopping") or {}
    monitors = {"checkpoint.monitor": cfg.checkpoint.monitor}
    if stopping.get("patience") is not None:
        monitors["early_stopping.monitor"] = stopping.get("monitor")
    for key, monitor in monitors.items():
        if monitor is not None and str(monitor) not in METRICS[task]:
            raise UserError(f"{key}={str(monitor)!r}: a {task} run logs {list(METRICS[task])}")


# ------------------------------------------------------------- sections, keys and types
def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_required_sections(cfg: DictConfig) -> None:
    """`~optimizer`, `loss=null`, ...: a section train.py cannot run without."""
    for key in REQUIRED_SECTIONS:
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            options = group_options(key)
            how = f"pick one with {key}=NAME ({', '.join(options)})" if options else "do not delete it"
            raise UserError(f"{key}: a required section is missing or null; {how}")


def check_config(cfg: DictConfig, script: str) -> None:
    """Every `${...}` resolves, no `???` is left; keys and types against the script's schema
    (merged as plain containers: a typed node would bring its extra keys); `_target_` sections."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[script]), resolved)
    except oe.OmegaConfBaseException as err:
        raise UserError(schema_error(err)) from None
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)


def schema_error(err: oe.OmegaConfBaseException) -> str:
    """OmegaConf's refusal of a key or value as one line: the key, the value, what is expected."""
    key, owner = str(err.full_key or "config"), err.object_type  # the dataclass that holds the key
    if isinstance(err, oe.MissingMandatoryValue):
        return f"{key}: a value is required (the config has ???); pass {key}=VALUE"
    if isinstance(err, oe.InterpolationResolutionError):
        hint = "; the model does not fit this data: pick a matching data=/model= or experiment="
        return f"{key}: {first_line(err)}{hint if key.startswith('model.') else ''}"
    if is_dataclass(owner) and isinstance(err, oe.ValidationError):
        hint = typing.get_type_hints(owner).get(key.rpartition(".")[2], Any)
        return f"{key}={err.value!r}: expected {describe(hint)}"
    if is_dataclass(owner) and isinstance(err, (oe.ConfigKeyError, oe.ConfigAttributeError)):
        return unknown_key(key, key, [f.name for f in fields(owner)])
    return f"{key}: {first_line(err)}"


def unknown_key(shown: str, key: str, valid: list[str]) -> str:
    """`shown` (the key or the override naming it) sets an unknown `key`: the valid ones instead."""
    parent, _, name = key.rpartition(".")
    hint = did_you_mean(name, valid)
    return f"{shown}: unknown key {name!r} in {parent or 'the config'}{hint}; valid keys: {', '.join(valid)}"


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# A type hint -> the plain config values that fit it, and those in words.
PLAIN_TYPES = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: ((str, int, float), "text"),
    Path: ((str, int, float), "a path"),
    list: ((list, tuple), "a list"),
    tuple: ((list, tuple), "a list"),
    dict: (dict, "a mapping"),
    type(None): (type(None), "null"),
}


def describe(hint: Any) -> str:
    """A type hint in words ('an integer', 'min or max'); '' for what no config value can be."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(d for d in map(describe, typing.get_args(hint)) if d)
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        *others, last = [str(member.value) for member in hint]
        return f"{', '.join(others)} or {last}" if others else last
    if is_dataclass(hint):
        return f"a section with keys {', '.join(f.name for f in fields(hint))}"
    return (PLAIN_TYPES.get(hint) or PLAIN_TYPES.get(origin) or (None, ""))[1]


# ------------------------------------------------------------------- `_target_` sections

# What a dotted `_target_` names, found as instantiate finds it (hydra.utils.get_object would
# also log the error: a second line on stderr).
locate = _locate


def is_transform_class(obj: Any) -> bool:
    """A torchvision.transforms.v2 transform class, from its bases (not importing torchvision)."""
    if not inspect.isclass(obj) or not (obj.__module__ or "").startswith(TRANSFORMS):
        return False
    return any(base.__name__ == "Transform" and base.__module__.startswith(TRANSFORMS) for base in obj.__mro__)


def is_data_module(obj: Any) -> bool:
    """A class with `setup()` and `split(name)`: all the engine needs from data/."""
    return inspect.isclass(obj) and all(callable(getattr(obj, name, None)) for name in ("setup", "split"))


def check_target_section(section: Any, key: str) -> None:
    """A `_target_` section against what it names: `data` a concrete data module, `model` an
    nn.Module class or a function that builds one; keys and types against its signature."""
    if not isinstance(section, DictConfig):
        raise UserError(f"{key}={section!r}: expected a section (pick one with {key}=NAME)")
    target = section.get("_target_")
    if target is None and len(section):
        raise UserError(
            f"{key}: the section has no _target_ (was its group deleted with ~{key}?); "
            f"pick one with {key}=NAME ({', '.join(group_options(key))})"
        )
    if target is None:
        return
    try:
        obj = locate(str(target))
    except Exception as err:  # ImportError (Hydra's, naming the cause), errors raised by the import
        raise UserError(f"{key}._target_={target!r}: cannot be imported ({first_line(err.__cause__ or err)})") from None
    if key == "data" and (not is_data_module(obj) or inspect.isabstract(obj)):
        raise UserError(f"data._target_={target}: expected a data module (a data.base.DataModule with setup())")
    if key == "model" and (
        inspect.isclass(obj) and not issubclass(obj, torch.nn.Module) or not callable(obj) or is_data_module(obj)
    ):
        raise UserError(f"model._target_={target}: expected a torch.nn.Module class or a function that builds one")
    params, open_ended = _parameters(obj)
    raw = OmegaConf.to_container(section, resolve=False)
    for name, value in OmegaConf.to_container(section, resolve=True).items():
        interval = f"{key}.{name}" == "scheduler.interval"  # train.py's own key (not instantiate's)
        if str(name).startswith("_") or interval or name not in params and open_ended:
            continue
        if value is None and str(raw[name]).startswith("${data."):
            continue  # a size the data finds at start (data=csv: num_features), set before the build
        if name not in params:  # e.g. experiment=digits_cnn (tuned for SGD: momentum) with optimizer=adamw
            hint = f"; set for another optimizer? drop it with ~{key}.{name}" if key == "optimizer" else ""
            raise UserError(f"{key}.{name}: unknown key for {target}; valid keys: {', '.join(params)}{hint}")
        if params[name] is not None and _matches(value, params[name]) is False:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}.{name}={shown}: expected {describe(params[name])}")


def _parameters(obj: Any) -> tuple[dict[str, Any], bool]:
    """Keyword parameters and type hints (None: no hint), following `**kwargs` into the bases'
    __init__; True if still open-ended."""
    functions = (
        [c.__init__ for c in obj.__mro__ if c is not object and "__init__" in vars(c)]
        if inspect.isclass(obj)
        else [obj]
    )
    params: dict[str, Any] = {}
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return params, True
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # unresolvable annotations: check names only
            hints = {}
        for name, param in signature.parameters.items():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and name != "self":
                params.setdefault(name, hints.get(name))
        if all(p.kind is not p.VAR_KEYWORD for p in signature.parameters.values()):
            return params, False
    return params, True


def _matches(value: Any, hint: Any) -> bool | None:
    """Does a plain config value fit a type hint? None when the hint is not understood."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        return True if True in results else None if None in results else False
    if plain := PLAIN_TYPES.get(hint) or PLAIN_TYPES.get(origin):
        return isinstance(value, plain[0]) and (hint is bool or not isinstance(value, bool))
    if inspect.isclass(hint):  # a tensor, an optimizer, ...: never a plain config value
        return False if value is not None else None
    return None


def build(section: Any, key: str, source: Path | str | None = None) -> Any:
    """hydra.utils.instantiate, errors (also of a `_partial_` when called) as one line naming
    key and target. With `source` (the file it was read from) the section is checked as a file's
    config and the plain dict that was checked is what instantiate sees."""
    if source is not None:
        section = check_loaded_targets(section, source, key)
    target = section.get("_target_") if hasattr(section, "get") else None
    built = _reported(instantiate, key, target, source, section)
    if isinstance(built, functools.partial):
        return functools.partial(_reported, built, key, target, source)
    if key == "model" and not isinstance(built, torch.nn.Module) or key == "loss" and not callable(built):
        kind = "a torch.nn.Module" if key == "model" else "something callable (a loss module)"
        where = f"{source}: " if source else ""
        raise UserError(f"{where}{key}._target_={target}: built a {type(built).__name__}; expected {kind}")
    return built


def _reported(function: Any, key: str, target: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs); what it raises as the UserError behind it (Hydra wraps it), or
    one naming key, target and the cause."""
    try:
        return function(*args, **kwargs)
    except Exception as err:
        cause = err
        while not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        first = f": {first_line(cause, 150)}" if str(cause).strip() else ""
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}could not build {key} from {key}._target_={target} ({type(cause).__name__}{first})"
        ) from err


def drop_other_optimizers_keys(cfg: DictConfig) -> None:
    """optimizer=adamw on an experiment tuned for SGD (its `optimizer.momentum`): a key the chosen
    optimizer does not take but another torch.optim optimizer does, set by a preset rather than on
    the command line, is dropped with a note. Typed keys and unknown keys stay (and are refused)."""
    section = cfg.get("optimizer")
    target = section.get("_target_") if isinstance(section, DictConfig) else None
    try:
        params, open_ended = _parameters(locate(str(target)))
    except Exception:  # no or a bad _target_: check_config says so
        return
    if open_ended:
        return
    typed = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if typed is None and HydraConfig.initialized():
        typed = HydraConfig.get().overrides.task
    typed = {str(o).split("=")[0].lstrip("+~") for o in typed or []}
    foreign = [key for key in section if key in _OPTIMIZER_KEYS - params.keys() and f"optimizer.{key}" not in typed]
    if foreign:
        with open_dict(section):
            for key in foreign:
                del section[key]
        print(f"note: {target} takes no {', '.join(foreign)} (set for another optimizer by a preset); dropped")


_OPTIMIZER_KEYS = {
    name
    for cls in vars(torch.optim).values()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    for name in inspect.signature(cls).parameters
}


# ------------------------------------------------------- a file's config (README Security)

# What a file's config may name in `_target_` (a downloaded one could otherwise run os.system):
# torch.nn and torchvision.transforms.v2 classes, and classes of the project's own modules (the
# user's code anywhere in it) but not of the engine, the scripts, the tests or installed packages.
LIBRARY_TARGETS = ("torch.nn.", TRANSFORMS)
PROJECT = Path(__file__).resolve().parents[1]
NOT_USER_CODE = ("engine", "train", "evaluate", "predict", "tests", "hydra_plugins", "benchmarks")
ALLOWED_TARGETS = (
    "classes of your project's own modules (not engine, the scripts or tests), torch.nn or "
    "torchvision.transforms.v2; for an installed package's model, subclass or wrap it in a module of your project"
)
# `_convert_` values a file may use; `_partial_` is refused (objects to build, not factories).
FILE_CONVERT_MODES = ("none", "partial", "object", "all")


def plain_problem(value: Any, where: str = "") -> str | None:
    """What keeps `value` (read from a file) from being plain data, or None: text keys, plain
    leaves, no `${` (oc.create, oc.env would run). The value is never quoted (the file's)."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):
                return f"{where or 'top level'}: key {str(key)[:40]!r} is not text"
            if "${" in key:
                return f"{where or 'top level'}: a key holds an interpolation (${{...}})"
            if problem := plain_problem(child, f"{where}.{key}" if where else key):
                return problem
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            if problem := plain_problem(child, f"{where}[{index}]"):
                return problem
    elif isinstance(value, str) and "${" in value:
        return f"{where}: holds an interpolation (${{...}})"
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        return f"{where}: a {type(value).__name__} is not a config value"
    return None


def check_loaded_targets(config: Any, source: Path | str, where: str = "config") -> Any:
    """A file's config is plain data, its `_target_`s name only data modules, models and torch.nn
    modules, and of Hydra's other special keys it uses `_args_`, `_convert_`, `_recursive_`.
    Returns the plain containers that were checked (what may be built)."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    if problem := plain_problem(config, where):
        raise UserError(
            f"{source}: refused {problem}: a file's config must be plain data "
            "(interpolations are resolved only in configs/ and on the command line)"
        )
    _check_special_keys(config, source, where)
    return config


def _check_special_keys(config: Any, source: Path | str, where: str) -> None:
    if isinstance(config, list):
        for index, value in enumerate(config):
            _check_special_keys(value, source, f"{where}[{index}]")
    if not isinstance(config, dict):
        return
    target = config.get("_target_")
    if "_target_" in config and not _safe_target(target):
        shown = repr(target)[:80] if isinstance(target, str) else type(target).__name__
        raise UserError(f"{source}: refused {where}._target_={shown}: a file's config may only name {ALLOWED_TARGETS}")
    if config.get("_partial_", False) is not False:
        raise UserError(f"{source}: refused {where}._partial_: a file's config builds objects, not partial functions")
    if "_convert_" in config and config["_convert_"] not in FILE_CONVERT_MODES:
        raise UserError(f"{source}: refused {where}._convert_: expected one of {', '.join(FILE_CONVERT_MODES)}")
    if "_recursive_" in config and not isinstance(config["_recursive_"], bool):
        raise UserError(f"{source}: refused {where}._recursive_: expected true or false")
    if "_args_" in config and not isinstance(config["_args_"], list):
        raise UserError(f"{source}: refused {where}._args_: expected a list")
    for key, value in config.items():
        _check_special_keys(value, source, f"{where}.{key}")


def project_module(name: str) -> bool:
    """`name` is in a module of this project (the user's code), found without importing it."""
    top = name.split(".")[0]
    if top in NOT_USER_CODE or not top.isidentifier():
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    where = spec and (spec.origin if spec.has_location else next(iter(spec.submodule_search_locations or []), None))
    if not where:
        return False
    path = Path(where).resolve()
    return path.is_relative_to(PROJECT) and not {".venv", "site-packages"} & set(path.relative_to(PROJECT).parts)


def _safe_target(target: Any) -> bool:
    if not isinstance(target, str) or not (target.startswith(LIBRARY_TARGETS) or project_module(target)):
        return False
    try:
        obj = locate(target)
    except Exception:  # what cannot be shown safe is refused
        return False
    module = getattr(obj, "__module__", "") or ""
    if is_data_module(obj):
        return project_module(module)
    if target.startswith(TRANSFORMS):  # data.augment
        return is_transform_class(obj)
    if inspect.isclass(obj):
        return issubclass(obj, torch.nn.Module) and (module.startswith("torch.nn.") or project_module(module))
    return inspect.isfunction(obj) and module.startswith("models.") and project_module(module)  # model builders


def saved_sections(saved: Any, source: Path | str, need: tuple[str, ...] = ("data", "model")) -> DictConfig:
    """The data/model/loss/seed sections of a file's config, checked (evaluate, predict, export)."""
    if not isinstance(saved, dict) or any(key not in saved for key in need):
        raise UserError(
            f"{source}: no usable saved config ({'/'.join(need)}); evaluate it with weights={source} model=... data=..."
        )
    kept = {key: saved.get(key) for key in ("data", "model", "loss", "seed", "cv")}
    for key in need:
        if not isinstance(kept[key], dict) or not isinstance(kept[key].get("_target_"), str):
            raise UserError(f"{source}: saved config: {key} has no _target_ naming what to build")
    check_loaded_targets(kept, source)
    try:
        config = OmegaConf.create(kept)
        for key in ("data", "model", "loss"):
            if config.get(key) is not None:
                check_target_section(config[key], key)
        if config.get("cv") is not None:  # a cross-validation run's fold (evaluate.py split=val)
            if not isinstance(config.cv, DictConfig) or set(config.cv) - {"folds", "fold"}:
                raise UserError(f"cv={kept['cv']!r}: expected a section with keys folds, fold")
            check_limits(OmegaConf.create({"cv": config.cv}))
    except UserError as err:
        raise UserError(f"{source}: saved config: {err}") from None
    except Exception as err:  # omegaconf's errors on odd keys/values: one line
        raise UserError(f"{source}: unusable config ({first_line(err)})") from None
    return config


# ---------------------------------------------------------------------------------- paths

# Keys naming files or folders (train, evaluate, predict): relative to the start folder.
PATH_KEYS = ("checkpoint.root", "resume", "weights", "ckpt", "input", "output", "data.path", "data.root")


def from_start_dir(path: str) -> str:
    """`path` relative to the start folder under hydra.job.chdir=true (to_absolute_path)."""
    if not HydraConfig.initialized() or os.path.isabs(path):  # not under @hydra.main: tests compose configs
        return path
    start = HydraConfig.get().runtime.cwd
    return path if Path(start).resolve() == Path.cwd().resolve() else os.path.join(start, path)


def paths_from_start_dir(cfg: DictConfig) -> None:
    """Every PATH_KEYS value of `cfg` through `from_start_dir` (a no-op without chdir)."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value and not (key == "resume" and value == "auto"):
            OmegaConf.update(cfg, key, from_start_dir(value), merge=False)
