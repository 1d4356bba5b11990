"""The config: typed schema (Hydra's ConfigStore), value ranges, `_target_` sections against
the constructors they name, what a config read from a file may hold (README "Security"), build."""

from __future__ import annotations

import difflib
import enum
import functools
import importlib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oe

from engine.errors import UserError, first_line
from engine.runtime import PRECISIONS, max_workers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TARGET_SECTIONS = ("data", "model", "loss", "optimizer", "scheduler")
REQUIRED_SECTIONS = ("trainer", "checkpoint", "data", "model", "loss", "optimizer")
# Values of the right type that would still overflow torch's C integers, NumPy's seed range
# or the machine: one line instead of a traceback.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_BATCH = 1 << 24
MAX_LR = 1e6

# ------------------------------------------------------------------------------ the schema


class Choice(str, enum.Enum):
    """A key with fixed values (OmegaConf 2.3 has no Literal), a str that formats as its text."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def _missing_(cls, value: object) -> Choice | None:  # `trainer.precision=32`: an int
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.__members__.get(str(value))
        return None


def _choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, [(value, value) for value in values])


# Metrics train.py logs per epoch, by task: the choices for checkpoint.monitor.
METRICS = {"regression": ("val_loss", "train_loss"), "classification": ("val_loss", "val_acc", "train_loss")}
Precision = _choice("Precision", PRECISIONS)
Monitor = _choice("Monitor", ("val_loss", "val_acc", "train_loss"))
Mode = _choice("Mode", ("min", "max"))
ResumeMode = _choice("ResumeMode", ("exact", "weights"))
Split = _choice("Split", ("train", "val", "test"))


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
        **dict.fromkeys(_FREE, Any),
    },
    **dict.fromkeys(_FREE),
)
InferenceConfig = _schema(
    "InferenceConfig",
    {
        "ckpt": str | None,
        "weights": str | None,
        "strict": bool,
        "weights_key": str | None,
        "device": str,
        "seed": int,
        "debug": bool,
        "data": Any,
        "model": Any,
    },
    data=None,
    model=None,
)
EvaluateConfig = _schema(
    "EvaluateConfig",
    {"split": Split, "batch_size": int | None, "output": str | None, "loss": Any},
    InferenceConfig,
    loss=None,
)
PredictConfig = _schema(
    "PredictConfig",
    {"input": str, "output": str, "batch_size": int, "invert": bool, "loss": Any},
    InferenceConfig,
    loss=None,
)
SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig, "predict": PredictConfig}
for _script, _schema in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_script}_schema", node=_schema)

# --------------------------------------------------------------- ranges: each key, once


class Range(NamedTuple):
    """`low <= value <= high` (`<` where open). `high` None: at most MAX_COUNT for an integer,
    unbounded for a number; a str: the key whose value bounds it."""

    kind: type
    low: float
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""


def ranges() -> dict[str, Range]:
    return {
        "seed": Range(int, 0, MAX_SEED),
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
    }


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_range(cfg: DictConfig, key: str, value: Any, rule: Range) -> None:
    high, shown = rule.high, None
    if isinstance(high, str):
        shown, high = f"{high} ({OmegaConf.select(cfg, high)})", OmegaConf.select(cfg, high)
    if rule.kind is int:
        whole = isinstance(value, int) and not isinstance(value, bool)
        high = MAX_COUNT if high is None else high
        if whole and rule.low <= value <= high:
            return
        if whole and value > high:
            raise UserError(f"{key}={value}: expected at most {high}{rule.note}")
        raise UserError(f"{key}={value!r}: expected an integer >= {rule.low}")
    high = math.inf if high is None else high
    if (
        finite(value)
        and (value > rule.low if rule.open_low else value >= rule.low)
        and (value < high if rule.open_high else value <= high)
    ):
        return
    text = f"a number {'>' if rule.open_low else '>='} {rule.low:g}"
    if high != math.inf:
        text += f" and {'<' if rule.open_high else '<='} {shown or format(high, 'g')}"
    raise UserError(f"{key}={value!r}: expected {text}{rule.note}")


def check_limits(cfg: DictConfig, required: tuple[str, ...] = ()) -> None:
    """Every value of `cfg` against its range (null or absent passes unless `required`), the
    values that must agree, and that `data` and `model` name the right kind of object."""
    get = functools.partial(OmegaConf.select, cfg, default=None)
    rules, data = ranges(), cfg.get("data")
    fractions = (
        {str(k): v for k, v in data.items() if str(k).endswith("_fraction")} if isinstance(data, DictConfig) else {}
    )
    for name in fractions:  # shares of the data set: 0 < train < 1, 0 <= the others < 1
        rules[f"data.{name}"] = Range(float, 0, 1, name == "train_fraction", True, " (a fraction)")
    for key, rule in rules.items():
        value = get(key)
        if value is not None or key in required:
            check_range(cfg, key, value, rule)
    held_out = sum(v for k, v in fractions.items() if k != "train_fraction")
    if "train_fraction" not in fractions and held_out >= 1:
        raise UserError(f"data: {' + '.join(fractions)} = {held_out:g} leaves no training data; expected a sum < 1")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.overfit_batches"):
        value = get(key)
        if value is not None and not (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 1 <= value <= MAX_COUNT
            or isinstance(value, float)
            and 0 < value <= 1
        ):
            raise UserError(
                f"{key}={value!r}: expected batches (an integer from 1 to {MAX_COUNT}), a fraction in (0, 1], or null"
            )
    betas = get("optimizer.betas")
    if betas is not None and not (
        isinstance(betas, (ListConfig, list)) and len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas)
    ):
        shown = OmegaConf.to_container(betas) if isinstance(betas, ListConfig) else betas
        raise UserError(f"optimizer.betas={shown!r}: expected two numbers >= 0 and < 1, e.g. [0.9,0.999]")
    if get("optimizer.nesterov") is True and not (get("optimizer.momentum") or 0) > 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if str(interval := get("scheduler.interval") or "epoch") not in ("epoch", "step"):
        raise UserError(f"scheduler.interval={interval!r}: expected epoch or step")
    if cfg.get("weights_key") is not None and not cfg.get("weights"):
        raise UserError(f"weights_key={cfg.weights_key}: only used with weights=PATH (a file with several models)")
    for key in ("data", "model"):
        if isinstance(cfg.get(key), DictConfig):
            check_target_kind(cfg[key], key)


def check_monitor(cfg: DictConfig, task: str) -> None:
    """checkpoint.monitor (and early_stopping.monitor, when on): a metric this task logs."""
    stopping = cfg.get("early_stopping") or {}
    for key, monitor in (
        ("checkpoint.monitor", cfg.checkpoint.monitor),
        ("early_stopping.monitor", stopping.get("monitor") if stopping.get("patience") is not None else None),
    ):
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
            how = (
                f"pick one with {key}=NAME ({', '.join(group_options(key))})"
                if key in config_groups()
                else "do not delete it"
            )
            raise UserError(f"{key}: a required section is missing or null; {how}")


def check_config(cfg: DictConfig, script: str) -> None:
    """Every `${...}` resolves, no `???` is left; keys and types against the script's schema
    (merged as plain containers: a typed node would bring its extra keys); `_target_` sections."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[script]), resolved)
    except oe.MissingMandatoryValue as err:
        key = _full_key(err)
        raise UserError(f"{key}: a value is required (the config has ???); pass {key}=VALUE") from None
    except oe.InterpolationResolutionError as err:
        key = _full_key(err)
        hint = (
            "; the model does not fit this data: pick a matching data=/model= or experiment="
            if key.startswith("model.")
            else ""
        )
        raise UserError(f"{key}: {first_line(err)}{hint}") from None
    except oe.OmegaConfBaseException as err:
        raise UserError(schema_error(err)) from None
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)


def _full_key(err: Exception) -> str:
    return str(getattr(err, "full_key", None) or "config")


def schema_error(err: oe.OmegaConfBaseException) -> str:
    """OmegaConf's refusal of a key or value as one line: the key, the value, what is expected."""
    key = _full_key(err)
    parent, _, name = key.rpartition(".")
    owner = getattr(err, "object_type", None)  # the dataclass that holds the key
    if is_dataclass(owner) and isinstance(err, oe.ValidationError):
        hint = typing.get_type_hints(owner).get(name, Any)
        return f"{key}={err.value!r}: expected {describe(hint)}"
    if is_dataclass(owner) and isinstance(err, (oe.ConfigKeyError, oe.ConfigAttributeError)):
        valid = [f.name for f in fields(owner)]
        return (
            f"{key}: unknown key in {parent or 'the config'}{did_you_mean(name, valid)}; valid keys: {', '.join(valid)}"
        )
    return f"{key}: {first_line(err)}"


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(hint: Any) -> str:
    """A type hint in words ('an integer', 'min or max'); '' for what no config value can be."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(d for d in map(describe, typing.get_args(hint)) if d)
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        Path: "a path",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
        type(None): "null",
        typing.Any: "any value",
    }
    if name := names.get(hint) or names.get(origin):
        return name
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        values = [str(member.value) for member in hint]
        return " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)
    if is_dataclass(hint):
        return f"a section with keys {', '.join(f.name for f in fields(hint))}"
    return ""


# ------------------------------------------------------------------- `_target_` sections

# Keys of a `_target_` section that train.py reads itself (removed before instantiate).
TRAINER_KEYS = {"scheduler": ("interval",)}


def locate(path: str) -> Any:
    """What a dotted `_target_` names, as hydra.utils.get_object (without its error logging)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def is_transform_class(obj: Any) -> bool:
    """A torchvision.transforms.v2 transform class, from its bases (not importing torchvision)."""
    return (
        inspect.isclass(obj)
        and (obj.__module__ or "").startswith("torchvision.transforms.v2")
        and any(
            base.__name__ == "Transform" and base.__module__.startswith("torchvision.transforms.v2")
            for base in obj.__mro__
        )
    )


def is_data_module(obj: Any) -> bool:
    """A class with `setup()` and `split(name)`: all the engine needs from data/."""
    return inspect.isclass(obj) and all(callable(getattr(obj, name, None)) for name in ("setup", "split"))


def check_target_kind(section: DictConfig, key: str) -> None:
    """`data` names a concrete data module; `model` an nn.Module class or a builder function."""
    target = section.get("_target_")
    try:
        obj = locate(str(target)) if target is not None else None
    except Exception:  # check_target_section reports import errors
        return
    if key == "data" and obj is not None and (not is_data_module(obj) or inspect.isabstract(obj)):
        raise UserError(
            f"data._target_={target}: expected a data module (a subclass "
            f"of data.base.DataModule that implements setup())"
        )
    if (
        key == "model"
        and obj is not None
        and (inspect.isclass(obj) and not issubclass(obj, torch.nn.Module) or not callable(obj) or is_data_module(obj))
    ):
        raise UserError(f"model._target_={target}: expected a torch.nn.Module class or a function that builds one")


def check_target_section(section: Any, key: str) -> None:
    """A `_target_` section against the signature of what it names: unknown keys, wrong types."""
    if not isinstance(section, DictConfig):
        raise UserError(f"{key}={section!r}: expected a section (pick one with {key}=NAME)")
    target = section.get("_target_")
    if target is None and len(section):
        raise UserError(
            f"{key}: the section has no _target_ (was its group deleted with "
            f"~{key}?); pick one with {key}=NAME ({', '.join(group_options(key))})"
        )
    if target is None:
        return
    try:
        obj = locate(str(target))
    except Exception as err:  # ImportError, AttributeError, errors raised by the import
        raise UserError(f"{key}._target_={target!r}: cannot be imported ({first_line(err)})") from None
    params, open_ended = _parameters(obj)
    raw = OmegaConf.to_container(section, resolve=False)
    for name, value in OmegaConf.to_container(section, resolve=True).items():
        if str(name).startswith("_") or name in TRAINER_KEYS.get(key, ()):
            continue
        if value is None and str(raw[name]).startswith("${data."):
            continue  # a size the data finds at start (data=csv: num_features), set before the build
        if name not in params:
            if open_ended:
                continue
            # e.g. experiment=digits_cnn (tuned for SGD: momentum) with optimizer=adamw
            hint = f"; set for another optimizer? drop it with ~{key}.{name}" if key == "optimizer" else ""
            raise UserError(f"{key}.{name}: unknown key for {target}; valid keys: {', '.join(params)}{hint}")
        if params[name] is not None and _matches(value, params[name]) is False:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}.{name}={shown}: expected {describe(params[name])}")


def _parameters(obj: Any) -> tuple[dict[str, Any], bool]:
    """Keyword parameters and type hints (None: no hint), following `**kwargs` into the bases'
    __init__; True if still open-ended."""
    functions = (
        [cls.__init__ for cls in obj.__mro__ if cls is not object and "__init__" in vars(cls)]
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
    if origin is typing.Union or origin is types.UnionType:
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        return True if True in results else None if None in results else False
    if hint in (type(None), bool):
        return value is None if hint is type(None) else isinstance(value, bool)
    if hint in (int, float, str, Path):
        kinds = {int: int, float: (int, float)}.get(hint, (str, int, float))
        return isinstance(value, kinds) and not isinstance(value, bool)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if inspect.isclass(hint):  # a tensor, an optimizer, ...: never a plain config value
        return False if value is not None else None
    return None


def build(section: Any, key: str, source: Path | str | None = None) -> Any:
    """hydra.utils.instantiate, errors (also of a `_partial_` when called) as one line naming
    key and target. With `source` (the file it was read from) the section is checked as a file's
    config and the plain dict that was checked is what instantiate sees."""
    if source is not None:
        plain = (
            OmegaConf.to_container(section, resolve=False) if isinstance(section, (DictConfig, ListConfig)) else section
        )
        check_loaded_targets(plain, source, key)
        section = plain
    target = section.get("_target_") if hasattr(section, "get") else None
    try:
        built = instantiate(section)
    except Exception as err:
        _raise_build_error(err, key, target, source)
    if isinstance(built, functools.partial):
        return functools.partial(_call_built, built, key, target, source)
    if key == "model" and not isinstance(built, torch.nn.Module) or key == "loss" and not callable(built):
        kind = "a torch.nn.Module" if key == "model" else "something callable (a loss module)"
        raise UserError(
            f"{f'{source}: ' if source else ''}{key}._target_={target}: built a {type(built).__name__}; expected {kind}"
        )
    return built


def _call_built(built: functools.partial, key: str, target: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return built(*args, **kwargs)
    except Exception as err:
        _raise_build_error(err, key, target, source)


def _raise_build_error(err: Exception, key: str, target: Any, source: Any) -> NoReturn:
    """The UserError behind `err` (Hydra wraps it), or one naming key, target and the cause."""
    cause = err
    while not isinstance(cause, UserError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, UserError):
        raise cause from None
    first = str(cause).strip().splitlines()[0][:150] if str(cause).strip() else ""
    raise UserError(
        f"{f'{source}: ' if source else ''}could not build {key} from "
        f"{key}._target_={target} ({type(cause).__name__}"
        f"{': ' + first if first else ''})"
    ) from err


# ------------------------------------------------------- a file's config (README Security)

# What a file's config may name in `_target_` (a downloaded one could otherwise run os.system).
SAFE_TARGET_MODULES = ("data.", "models.", "torch.nn.", "torchvision.transforms.v2.")
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
    elif isinstance(value, str):
        if "${" in value:
            return f"{where}: holds an interpolation (${{...}})"
    elif not (value is None or isinstance(value, (int, float, bool))):
        return f"{where}: a {type(value).__name__} is not a config value"
    return None


def check_loaded_targets(config: Any, source: Path | str, where: str = "config") -> None:
    """A file's config is plain data, its `_target_`s name only data modules, models and torch.nn
    modules, and of Hydra's other special keys it uses `_args_`, `_convert_`, `_recursive_`."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    if problem := plain_problem(config, where):
        raise UserError(
            f"{source}: refused {problem}: a file's config must be plain data "
            f"(interpolations are resolved only in configs/ and on the command "
            f"line)"
        )
    _check_special_keys(config, source, where)


def _check_special_keys(config: Any, source: Path | str, where: str) -> None:
    if isinstance(config, dict):
        target = config.get("_target_")
        if "_target_" in config and not _safe_target(target):
            shown = repr(target)[:80] if isinstance(target, str) else type(target).__name__
            raise UserError(
                f"{source}: refused {where}._target_={shown}: a file's config "
                f"may only name data.*, models.*, torch.nn or "
                f"torchvision.transforms.v2 classes"
            )
        if config.get("_partial_", False) is not False:
            raise UserError(
                f"{source}: refused {where}._partial_: a file's config builds objects, not partial functions"
            )
        if "_convert_" in config and config["_convert_"] not in FILE_CONVERT_MODES:
            raise UserError(f"{source}: refused {where}._convert_: expected one of {', '.join(FILE_CONVERT_MODES)}")
        if "_recursive_" in config and not isinstance(config["_recursive_"], bool):
            raise UserError(f"{source}: refused {where}._recursive_: expected true or false")
        if "_args_" in config and not isinstance(config["_args_"], list):
            raise UserError(f"{source}: refused {where}._args_: expected a list")
        for key, value in config.items():
            _check_special_keys(value, source, f"{where}.{key}")
    elif isinstance(config, list):
        for index, value in enumerate(config):
            _check_special_keys(value, source, f"{where}[{index}]")


def _safe_target(target: Any) -> bool:
    if not isinstance(target, str) or not target.startswith(SAFE_TARGET_MODULES):
        return False
    try:
        obj = locate(target)
    except Exception:  # what cannot be shown safe is refused
        return False
    module = getattr(obj, "__module__", "") or ""
    if inspect.isclass(obj):
        if is_data_module(obj):
            return module.startswith("data.")
        if target.startswith("torchvision.transforms.v2."):  # data.augment
            return is_transform_class(obj)
        return issubclass(obj, torch.nn.Module) and module.startswith(SAFE_TARGET_MODULES)
    return inspect.isfunction(obj) and module.startswith("models.")


def saved_sections(saved: Any, source: Path | str, need: tuple[str, ...] = ("data", "model")) -> DictConfig:
    """The data/model/loss/seed sections of a file's config, checked (evaluate, predict, export)."""
    if not isinstance(saved, dict) or any(key not in saved for key in need):
        raise UserError(
            f"{source}: no usable saved config ({'/'.join(need)}); evaluate it with weights={source} model=... data=..."
        )
    kept = {key: saved.get(key) for key in ("data", "model", "loss", "seed")}
    for key in need:
        if not isinstance(kept[key], dict) or not isinstance(kept[key].get("_target_"), str):
            raise UserError(f"{source}: saved config: {key} has no _target_ naming what to build")
    check_loaded_targets(kept, source)
    try:
        config = OmegaConf.create(kept)
        for key in ("data", "model", "loss"):
            if config.get(key) is not None:
                check_target_section(config[key], key)
                if key != "loss":
                    check_target_kind(config[key], key)
    except UserError as err:
        raise UserError(f"{source}: saved config: {err}") from None
    except Exception as err:  # omegaconf's errors on odd keys/values: one line
        raise UserError(f"{source}: unusable config ({str(err).splitlines()[0][:200]})") from None
    return config


# ---------------------------------------------------------------------------------- paths

# Keys naming files or folders (train, evaluate, predict): relative to the start folder.
PATH_KEYS = ("checkpoint.root", "resume", "weights", "ckpt", "input", "output", "data.path", "data.root")


def from_start_dir(path: str) -> str:
    """`path` relative to the start folder under hydra.job.chdir=true (to_absolute_path)."""
    try:
        start = HydraConfig.get().runtime.cwd
    except ValueError:  # not under @hydra.main (tests compose configs directly)
        return path
    if os.path.isabs(path) or Path(start).resolve() == Path.cwd().resolve():
        return path
    return os.path.join(start, path)


def paths_from_start_dir(cfg: DictConfig) -> None:
    """Every PATH_KEYS value of `cfg` through `from_start_dir` (a no-op without chdir)."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value and not (key == "resume" and value == "auto"):
            moved = from_start_dir(value)
            if moved != value:
                OmegaConf.update(cfg, key, moved, merge=False)
