"""The config: typed schema (Hydra's ConfigStore), value ranges, `_target_` sections against
the constructors they name, what a config read from a file may hold (README "Security"), build."""

from __future__ import annotations

import difflib
import enum
import functools
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra._internal.utils import _locate
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf import errors as oe

from engine.errors import UserError, first_line
from engine.runtime import PRECISIONS, max_workers

PROJECT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT / "configs"
TARGET_SECTIONS = ("data", "model", "loss", "optimizer", "scheduler")
REQUIRED_SECTIONS = ("trainer", "checkpoint", "data", "model", "loss", "optimizer")
# Values of the right type that would still overflow torch's C integers or the machine.
MAX_COUNT = 2**31 - 1
MAX_BATCH = 1 << 24
MAX_LR = 10**6
TRANSFORMS = "torchvision.transforms.v2."


# ------------------------------------------------------------- each key: its type and range
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


class Range(NamedTuple):
    """A key of type `hint` in `low <= value <= high` (`<` where open). `high` None: at most
    MAX_COUNT for an integer, unbounded for a number; a str: the key whose value bounds it."""

    hint: Any
    low: float
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""


class Check(NamedTuple):
    """A key of type `hint` whose values must pass `fits`: else `key=value: expected <expected>`."""

    hint: Any
    fits: Callable[[Any], bool]
    expected: str


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _batches(value: Any) -> bool:
    return is_number(value) and (
        isinstance(value, int) and 1 <= value <= MAX_COUNT or isinstance(value, float) and 0 < value <= 1
    )


def _betas(value: Any) -> bool:
    return isinstance(value, (list, ListConfig)) and len(value) == 2 and all(is_number(b) and 0 <= b < 1 for b in value)


# A limit is a number of batches (int) or a fraction (float): typed Any (OmegaConf has no union).
BATCHES = Check(Any, _batches, f"batches (an integer from 1 to {MAX_COUNT}), a fraction in (0, 1], or null")

# Which keys exist, of what type and range (a section: a table of its own). Null or absent values
# pass the ranges. Values and their documentation are in configs/*.yaml.
TRAIN_KEYS = {
    "name": str,
    "run_name": str | None,
    "resume": str | None,
    "weights": str | None,
    "strict": bool | None,
    "weights_key": str | None,
    "resume_mode": ResumeMode,
    "seed": Range(int, 0, 2**32 - 1),  # NumPy's seeds
    "debug": bool,
    "trainer": {
        "epochs": Range(int, 1),
        "device": str,
        "precision": Precision,
        "channels_last": bool,
        "compile": bool,
        "deterministic": bool,
        "max_time": Range(float | None, 0, open_low=True, note=" (seconds) or null"),
        "log_every_n_steps": Range(int, 1),
        "print_every_s": Range(float, 0, note=" (seconds)"),
        "global_batch_size": Range(int | None, 1, MAX_BATCH),
        "grad_clip_norm": Range(float | None, 0, open_low=True, note=" or null (off)"),
        "accumulate_grad_batches": Range(int, 1),
        "model_summary": bool,
        "ema_decay": Range(float | None, 0, 1, True, True, " (e.g. 0.999), or null"),
        "fast_dev_run": bool,
        "limit_train_batches": BATCHES,
        "limit_val_batches": BATCHES,
        "overfit_batches": BATCHES,
    },
    "early_stopping": {"patience": Range(int | None, 1), "monitor": Monitor, "min_delta": Range(float, 0)},
    "checkpoint": {
        "root": str,
        "every_n_epochs": Range(int, 1),
        "every_n_steps": Range(int | None, 1),
        "keep_last": Range(int, 1),
        "monitor": Monitor,
        "mode": Mode,
        "async": bool,
        "export": bool,
        "export_pt2": bool,
    },
    # k-fold cross-validation (configs/cv, with -m): which fold of how many is this run's val split.
    "cv": {"folds": Range(int | None, 2), "fold": Range(int | None, 0, "cv.folds", open_high=True)},
    **dict.fromkeys((*TARGET_SECTIONS, "logger"), Any),  # `_target_` sections and trackers: free
}
INFERENCE_KEYS = {
    "ckpt": str | None,
    "weights": str | None,
    "strict": bool,
    "weights_key": str | None,
    "device": str,
    "seed": TRAIN_KEYS["seed"],
    "debug": bool,
    **dict.fromkeys(("data", "model", "loss"), Any),
}
EVALUATE_KEYS = INFERENCE_KEYS | {"split": Split, "batch_size": Range(int | None, 1, MAX_BATCH), "output": str | None}
PREDICT_KEYS = INFERENCE_KEYS | {"input": str, "output": str, "batch_size": Range(int, 1, MAX_BATCH), "invert": bool}
# Keys of the free `_target_` sections that the engine relies on (their types: the constructors').
FREE_KEYS = {
    "data.batch_size": Range(int, 1, MAX_BATCH),
    "data.num_workers": Range(int, 0, max_workers(), note=" (4 per CPU core of this machine)"),
    "data.num_classes": Range(int, 1, 1_000_000),
    # shares of the data set: 0 < train < 1, 0 <= the others < 1
    "data.train_fraction": Range(float, 0, 1, True, True, " (a fraction)"),
    "data.val_fraction": Range(float, 0, 1, False, True, " (a fraction)"),
    "data.test_fraction": Range(float, 0, 1, False, True, " (a fraction)"),
    "optimizer.lr": Range(float, 0, MAX_LR, open_low=True),
    "optimizer.momentum": Range(float, 0, MAX_LR),
    "optimizer.weight_decay": Range(float, 0, MAX_LR),
    "optimizer.eps": Range(float, 0, open_low=True, note=", e.g. 1e-8"),
    "optimizer.betas": Check(Any, _betas, "two numbers >= 0 and < 1, e.g. [0.9,0.999]"),
    "scheduler.step_size": Range(int, 1),
    "scheduler.T_max": Range(int, 1),
    "scheduler.gamma": Range(float, 0),
    "scheduler.eta_min": Range(float, 0),
    "scheduler.warmup_epochs": Range(int, 0),
    "scheduler.min_lr": Range(float, 0, "optimizer.lr"),
    "scheduler.interval": Check(Any, lambda v: v in ("epoch", "step"), "epoch or step"),  # train.py's own key
}


def _schema(name: str, keys: dict[str, Any], prefix: str = "") -> type:
    """The dataclass of a table (a key that may be null defaults to null: cv=null, no section);
    each key's Range or Check into RULES. Made from annotations: `checkpoint.async` is a Python
    keyword, which no class body or make_dataclass can declare."""
    hints = {}
    for key, rule in keys.items():
        if isinstance(rule, dict):
            rule = _schema(key.title().replace("_", "") + "Config", rule, f"{prefix}{key}.")
        elif isinstance(rule, (Range, Check)):
            RULES[prefix + key] = rule
        hints[key] = getattr(rule, "hint", rule)
    defaults = {key: None for key, hint in hints.items() if hint is Any or type(None) in typing.get_args(hint)}
    schema = dataclass(init=False, repr=False, eq=False)(type(name, (), {"__annotations__": hints, **defaults}))
    globals()[name] = schema  # a module attribute: pickled by name (a submitit job unpickles the config)
    return schema


RULES: dict[str, Range | Check] = {}  # each key's, by dotted name: the schemas' (below), FREE_KEYS
TrainConfig = _schema("TrainConfig", TRAIN_KEYS)
PredictConfig = _schema("PredictConfig", PREDICT_KEYS)
SCHEMAS = {"train": TrainConfig, "evaluate": _schema("EvaluateConfig", EVALUATE_KEYS), "predict": PredictConfig}
for _script, _schema_class in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{_script}_schema", node=_schema_class)
RULES |= FREE_KEYS


def check_rule(cfg: DictConfig, key: str, value: Any, rule: Range | Check) -> None:
    """`key=value: expected ...` unless `value` passes `rule` (bounds by another key: in `cfg`)."""
    if isinstance(rule, Check):
        if not rule.fits(value):
            raise UserError(f"{key}={value!r}: expected {rule.expected}")
        return
    integer = int in (rule.hint, *typing.get_args(rule.hint))
    high = OmegaConf.select(cfg, rule.high) if isinstance(rule.high, str) else rule.high
    high = MAX_COUNT if high is None and integer else high
    kind_ok = is_number(value) and (isinstance(value, int) or not integer and math.isfinite(value))
    above = kind_ok and (value > rule.low if rule.open_low else value >= rule.low)
    if above and (high is None or (value < high if rule.open_high else value <= high)):
        return
    text = f"{'an integer' if integer else 'a number'} {'>' if rule.open_low else '>='} {rule.low}"
    if high is not None and (above or not integer):  # an integer's bound: once it is passed
        shown = f"{rule.high} ({high})" if isinstance(rule.high, str) else high
        text += f" and {'<' if rule.open_high else '<='} {shown}"
    raise UserError(f"{key}={value!r}: expected {text}{rule.note}")


def check_limits(cfg: DictConfig, required: tuple[str, ...] = ()) -> None:
    """Every value of `cfg` against its rule (null or absent passes unless `required`), and the
    values that must agree."""
    get = functools.partial(OmegaConf.select, cfg, default=None)
    if get("cv.fold") is not None and get("cv.folds") is None:
        raise UserError(f"cv.fold={get('cv.fold')!r}: needs cv.folds (pick a split with cv=5fold, or set cv.folds=K)")
    for key, rule in RULES.items():
        if get(key) is not None or key in required:
            check_rule(cfg, key, get(key), rule)
    held_out = {key: get(f"data.{key}") for key in ("val_fraction", "test_fraction") if get(f"data.{key}") is not None}
    if get("data.train_fraction") is None and sum(held_out.values()) >= 1:
        raise UserError(
            f"data: {' + '.join(held_out)} = {sum(held_out.values()):g} leaves no training data; expected a sum < 1"
        )
    if get("optimizer.nesterov") is True and not (get("optimizer.momentum") or 0) > 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if get("weights_key") is not None and not get("weights"):
        raise UserError(f"weights_key={get('weights_key')}: only used with weights=PATH (a file with several models)")


def check_monitor(cfg: DictConfig, task: str) -> None:
    """checkpoint.monitor (and early_stopping.monitor, when on): a metric this task logs."""
    keys = ["checkpoint.monitor"]
    if OmegaConf.select(cfg, "early_stopping.patience") is not None:
        keys.append("early_stopping.monitor")
    for key in keys:
        if (monitor := OmegaConf.select(cfg, key)) is not None and str(monitor) not in METRICS[task]:
            raise UserError(f"{key}={str(monitor)!r}: a {task} run logs {list(METRICS[task])}")


# ------------------------------------------------------------- sections, keys and types
def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_config(cfg: DictConfig, script: str) -> None:
    """train.py's required sections are there (`~optimizer`, `loss=null`: not); every `${...}`
    resolves, no `???` is left; keys and types against the script's schema (merged as plain
    containers: a typed node would bring its extra keys); `_target_` sections."""
    for key in REQUIRED_SECTIONS if script == "train" else ():
        if OmegaConf.select(cfg, key, default=None) is None:
            options = group_options(key)
            how = f"pick one with {key}=NAME ({', '.join(options)})" if options else "do not delete it"
            raise UserError(f"{key}: a required section is missing or null; {how}")
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


UNIONS = (typing.Union, types.UnionType)  # `X | Y`, Optional[X]


def describe(hint: Any) -> str:
    """A type hint in words ('an integer', 'min or max'); '' for what no config value can be."""
    if typing.get_origin(hint) in UNIONS:
        return " or ".join(d for d in map(describe, typing.get_args(hint)) if d)
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        *others, last = [str(member.value) for member in hint]
        return f"{', '.join(others)} or {last}" if others else last
    if is_dataclass(hint):
        return f"a section with keys {', '.join(f.name for f in fields(hint))}"
    return (PLAIN_TYPES.get(hint) or PLAIN_TYPES.get(typing.get_origin(hint)) or (None, ""))[1]


def _refuses(hint: Any, value: Any) -> bool:
    """A plain config value that surely does not fit a type hint (one not understood: fits)."""
    if typing.get_origin(hint) in UNIONS:
        return all(_refuses(member, value) for member in typing.get_args(hint))
    if plain := PLAIN_TYPES.get(hint) or PLAIN_TYPES.get(typing.get_origin(hint)):
        return not isinstance(value, plain[0]) or isinstance(value, bool) and hint is not bool
    # a tensor, an optimizer, ...: never a plain config value
    return inspect.isclass(hint) and hint not in (Any, object) and value is not None


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
        if _refuses(params[name], value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}.{name}={shown}: expected {describe(params[name])}")


def _parameters(obj: Any) -> tuple[dict[str, Any], bool]:
    """Keyword parameters and type hints (None: no hint), following `**kwargs` into the bases'
    __init__; True if still open-ended."""
    functions = [c.__init__ for c in obj.__mro__[:-1] if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
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


def build(section: Any, key: str, source: Path | str | None = None) -> Any:
    """hydra.utils.instantiate, errors (also of a `_partial_` when called) as one line naming
    key and target. With `source` (the file it was read from) the section is checked as a file's
    config and the plain dict that was checked is what instantiate sees."""
    if source is not None:
        section = check_loaded_targets(section, source, key)
    target = section.get("_target_") if hasattr(section, "get") else None
    where = f"{source}: " if source else ""
    failed = f"{where}could not build {key} from {key}._target_={target}"
    built = _reported(instantiate, failed, section)
    if isinstance(built, functools.partial):
        return functools.partial(_reported, built, failed)
    if key == "model" and not isinstance(built, torch.nn.Module) or key == "loss" and not callable(built):
        kind = "a torch.nn.Module" if key == "model" else "something callable (a loss module)"
        raise UserError(f"{where}{key}._target_={target}: built a {type(built).__name__}; expected {kind}")
    return built


def _reported(function: Any, failed: str, *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs); what it raises as the UserError behind it (Hydra wraps it), or
    as `failed (the cause)`."""
    try:
        return function(*args, **kwargs)
    except Exception as err:
        cause = err
        while not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        first = f": {first_line(cause, 150)}" if str(cause).strip() else ""
        raise UserError(f"{failed} ({type(cause).__name__}{first})") from err


def drop_other_optimizers_keys(cfg: DictConfig) -> None:
    """optimizer=adamw on an experiment tuned for SGD (its `optimizer.momentum`): a key the chosen
    optimizer does not take but another torch.optim optimizer does, set by a preset rather than on
    the command line, is dropped with a note. Typed keys and unknown keys stay (and are refused)."""
    section = cfg.get("optimizer")
    try:
        target = section._target_
        params, open_ended = _parameters(locate(str(target)))
    except Exception:  # no or a bad _target_: check_config says so
        return
    typed = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    typed = {str(override).split("=")[0].lstrip("+~") for override in typed}
    foreign = [key for key in section if key in _OPTIMIZER_KEYS - params.keys() and f"optimizer.{key}" not in typed]
    if foreign and not open_ended:
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
NOT_USER_CODE = ("engine", "train", "evaluate", "predict", "tests", "hydra_plugins", "benchmarks")
ALLOWED_TARGETS = (
    "classes of your project's own modules (not engine, the scripts or tests), torch.nn or "
    "torchvision.transforms.v2; for an installed package's model, subclass or wrap it in a module of your project"
)
# Hydra's other special keys: the plain form each must have in a file's config.
FILE_SPECIAL_KEYS = {
    "_partial_": (lambda v: v is False, "a file's config builds objects, not partial functions"),
    "_convert_": (lambda v: v in ("none", "partial", "object", "all"), "expected one of none, partial, object, all"),
    "_recursive_": (lambda v: isinstance(v, bool), "expected true or false"),
    "_args_": (lambda v: isinstance(v, list), "expected a list"),
}


def _nodes(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(where, node) for `value` and everything in it, each container before what it holds."""
    yield where, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            yield from _nodes(child, f"{where}[{index}]")


def plain_problem(value: Any, where: str = "") -> str | None:
    """What keeps `value` (read from a file) from being plain data, or None: text keys, plain
    leaves, no `${` (oc.create, oc.env would run). The value is never quoted (the file's)."""
    for path, node in _nodes(value, where):
        keys = list(node) if isinstance(node, dict) else []
        if bad := [key for key in keys if not isinstance(key, str)]:
            return f"{path or 'top level'}: key {str(bad[0])[:40]!r} is not text"
        if any("${" in key for key in keys):
            return f"{path or 'top level'}: a key holds an interpolation (${{...}})"
        if isinstance(node, str) and "${" in node:
            return f"{path}: holds an interpolation (${{...}})"
        if not (node is None or isinstance(node, (str, int, float, bool, dict, list, tuple))):
            return f"{path}: a {type(node).__name__} is not a config value"
    return None


def check_loaded_targets(config: Any, source: Path | str, where: str = "config") -> Any:
    """A file's config is plain data, its `_target_`s name only data modules, models and torch.nn
    modules, and Hydra's other special keys have their plain forms (`_partial_` none).
    Returns the plain containers that were checked (what may be built)."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    if problem := plain_problem(config, where):
        raise UserError(
            f"{source}: refused {problem}: a file's config must be plain data "
            "(interpolations are resolved only in configs/ and on the command line)"
        )
    for path, node in _nodes(config, where):
        if not isinstance(node, dict):
            continue
        if "_target_" in node and not _safe_target(target := node["_target_"]):
            shown = repr(target)[:80] if isinstance(target, str) else type(target).__name__
            raise UserError(
                f"{source}: refused {path}._target_={shown}: a file's config may only name {ALLOWED_TARGETS}"
            )
        for key, (plain, expected) in FILE_SPECIAL_KEYS.items():
            if key in node and not plain(node[key]):
                raise UserError(f"{source}: refused {path}.{key}: {expected}")
    return config


def project_module(name: str) -> bool:
    """`name` is in a module of this project (the user's code), found without importing it."""
    top = name.split(".")[0]
    if top in NOT_USER_CODE or not top.isidentifier():
        return False
    try:
        spec = importlib.util.find_spec(top)
        where = spec.origin if spec.has_location else next(iter(spec.submodule_search_locations))
        path = Path(where).resolve().relative_to(PROJECT)
    except Exception:  # not found, not a file, outside the project: not the user's code
        return False
    return not {".venv", "site-packages"} & set(path.parts)


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
    """The data/model/loss/seed/cv sections of a file's config, checked (evaluate, predict, export)."""
    sections = [saved.get(key) for key in need] if isinstance(saved, dict) else [None]
    if not all(isinstance(section, dict) and isinstance(section.get("_target_"), str) for section in sections):
        raise UserError(
            f"{source}: no usable saved config ({'/'.join(need)}, each naming what to build in _target_); "
            f"evaluate it with weights={source} model=... data=..."
        )
    kept = {key: saved.get(key) for key in ("data", "model", "loss", "seed", "cv")}
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
    """`path` relative to the start folder under hydra.job.chdir=true; as given without chdir."""
    if HydraConfig.initialized() and Path(HydraConfig.get().runtime.cwd).resolve() != Path.cwd().resolve():
        return to_absolute_path(path)
    return path


def paths_from_start_dir(cfg: DictConfig) -> None:
    """Every PATH_KEYS value of `cfg` through `from_start_dir` (a no-op without chdir)."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value and not (key == "resume" and value == "auto"):
            OmegaConf.update(cfg, key, from_start_dir(value), merge=False)
