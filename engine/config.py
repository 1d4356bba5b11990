"""Checks on the composed config, run before any work starts: one clear line per mistake.

Three layers, all before a file is written:
  1. every interpolation resolves and no `???` is left (`resolve_all`);
  2. types and key names: the fixed sections (top level, trainer, checkpoint, and the keys of
     evaluate.yaml / predict.yaml) against the shipped YAML defaults, and each `_target_`
     section (data, model, loss, optimizer, scheduler) against the type hints of the
     constructor it names, so a new module needs no schema of its own;
  3. value ranges (epochs >= 1, lr > 0, known device, ...).
Unknown keys on the command line (`trainer.epoch=5`) are caught earlier still, by Hydra's
struct mode; engine/cli.py turns its message into one line.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from engine.errors import UserError
from engine.runtime import PRECISIONS, resolve_device

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TARGET_SECTIONS = ("data", "model", "loss", "optimizer", "scheduler")
# Keys of a `_target_` section that train.py reads itself (removed before instantiate).
TRAINER_KEYS = {"scheduler": ("interval",)}
# Metrics train.py logs per epoch: the choices for checkpoint.monitor.
METRICS = {"regression": ("val_loss", "train_loss"),
           "classification": ("val_loss", "val_acc", "train_loss")}


def _positive_int(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}: expected an integer >= 1")


def validate_train(cfg: DictConfig) -> None:
    """Everything train.py needs to know is right before it opens the run directory."""
    check_required_sections(cfg)
    resolve_all(cfg)
    check_fixed_sections(cfg, "train")
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)
    check_limits(cfg)
    trainer, ckpt = cfg.trainer, cfg.checkpoint
    _positive_int(trainer.epochs, "trainer.epochs")
    _positive_int(ckpt.every_n_epochs, "checkpoint.every_n_epochs")
    _positive_int(ckpt.every_n_steps, "checkpoint.every_n_steps", allow_none=True)
    _positive_int(ckpt.keep_last, "checkpoint.keep_last")
    _positive_int(trainer.log_every_n_steps, "trainer.log_every_n_steps")
    _positive_int(cfg.data.get("batch_size"), "data.batch_size")
    if str(ckpt.mode) not in ("min", "max"):
        raise UserError(f"checkpoint.mode={ckpt.mode!r}: expected min or max")
    known = sorted(set().union(*METRICS.values()))
    if str(ckpt.monitor) not in known:
        raise UserError(f"checkpoint.monitor={ckpt.monitor!r}: expected one of {known}")
    if str(trainer.precision) not in PRECISIONS:
        raise UserError(f"trainer.precision={trainer.precision!r}: expected one of "
                        f"{list(PRECISIONS)}")
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise UserError(f"optimizer.lr={lr!r}: expected a number > 0")
    for key in ("momentum", "weight_decay"):
        value = cfg.optimizer.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise UserError(f"optimizer.{key}={value!r}: expected a number >= 0")
    if cfg.optimizer.get("nesterov") is True and not cfg.optimizer.get("momentum", 0) > 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    _check_trainer_features(cfg)
    _check_fractions(cfg.data, "data")
    if trainer.max_time is not None and not (isinstance(trainer.max_time, (int, float))
                                             and trainer.max_time > 0):
        raise UserError(f"trainer.max_time={trainer.max_time!r}: expected seconds > 0 or null")
    every = trainer.get("print_every_s", 0)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise UserError(f"trainer.print_every_s={every!r}: expected seconds >= 0")
    resolve_device(trainer.device)
    _check_stopping_ema_debug(cfg)
    _check_weights_keys(cfg)
    if cfg.get("weights") and cfg.resume is not None and str(cfg.resume) != "auto":
        raise UserError(f"weights={cfg.weights} starts a new run and resume={cfg.resume} "
                        f"continues one: give only one of them")
    root = Path(str(ckpt.root))
    if root.exists() and not root.is_dir():
        raise UserError(f"checkpoint.root={root}: exists and is not a folder")
    if cfg.run_name is None:
        run_dir_for(root, cfg.name, key="name")
    else:
        run_dir_for(root, cfg.run_name)


def _check_trainer_features(cfg: DictConfig) -> None:
    """Adam's betas/eps, the warm-up schedule, scheduler.interval, clipping, accumulation."""
    betas, eps = cfg.optimizer.get("betas"), cfg.optimizer.get("eps")
    if betas is not None and not (isinstance(betas, (ListConfig, list)) and len(betas) == 2
                                  and all(_finite(b) and 0 <= b < 1 for b in betas)):
        raise UserError(f"optimizer.betas={_plain(cfg.optimizer, 'betas')!r}: expected two "
                        f"numbers >= 0 and < 1, e.g. [0.9,0.999]")
    if eps is not None and not (_finite(eps) and eps > 0):
        raise UserError(f"optimizer.eps={eps!r}: expected a number > 0, e.g. 1e-8")
    scheduler = cfg.get("scheduler") or {}
    if str(scheduler.get("interval", "epoch")) not in ("epoch", "step"):
        raise UserError(f"scheduler.interval={scheduler.interval!r}: expected epoch or step")
    warmup, floor = scheduler.get("warmup_epochs"), scheduler.get("min_lr")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int)
                               or warmup < 0):
        raise UserError(f"scheduler.warmup_epochs={warmup!r}: expected an integer >= 0")
    if floor is not None and not (_finite(floor) and 0 <= floor <= cfg.optimizer.lr):
        raise UserError(f"scheduler.min_lr={floor!r}: expected a number >= 0 and <= "
                        f"optimizer.lr ({cfg.optimizer.lr})")
    clip = cfg.trainer.get("grad_clip_norm")
    if clip is not None and not (_finite(clip) and clip > 0):
        raise UserError(f"trainer.grad_clip_norm={clip!r}: expected a number > 0 or null (off)")
    _positive_int(cfg.trainer.get("accumulate_grad_batches", 1),
                  "trainer.accumulate_grad_batches")
def _check_stopping_ema_debug(cfg: DictConfig) -> None:
    """Ranges of the EMA, early-stopping and debug-run keys (all off by default)."""
    trainer, stopping = cfg.trainer, cfg.get("early_stopping") or {}
    decay = trainer.get("ema_decay")
    if decay is not None and not (_finite(decay) and 0 < decay < 1):
        raise UserError(f"trainer.ema_decay={decay!r}: expected a number > 0 and < 1 "
                        f"(e.g. 0.999), or null")
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches"):
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 1 or isinstance(value, float)
                                      and 0 < value <= 1):
            raise UserError(f"trainer.{key}={value!r}: expected batches (an integer >= 1), "
                            f"a fraction in (0, 1], or null")
    _positive_int(stopping.get("patience"), "early_stopping.patience", allow_none=True)
    if stopping.get("patience") is not None:
        known = sorted(set().union(*METRICS.values()))
        if str(stopping.get("monitor")) not in known:
            raise UserError(f"early_stopping.monitor={stopping.get('monitor')!r}: expected "
                            f"one of {known}")
        delta = stopping.get("min_delta", 0.0)
        if not (_finite(delta) and delta >= 0):
            raise UserError(f"early_stopping.min_delta={delta!r}: expected a number >= 0")


# ------------------------------------------------------------------- limits (all scripts)
# Upper and lower bounds on what a config may ask for, checked before any work: values that
# pass the type checks but would overflow, divide by zero, or exhaust the machine.
# (Kept apart from the schema walk above, which structured configs will replace.)
REQUIRED_SECTIONS = ("trainer", "checkpoint", "data", "model", "loss", "optimizer")
MAX_SEED = 2**32 - 1  # NumPy's seed range; the batch order multiplies the seed further
MAX_BATCH = 1 << 24
MAX_LR = 1e6


def check_required_sections(cfg: DictConfig) -> None:
    """`~optimizer`, `loss=null`, ...: a section train.py cannot run without."""
    for key in REQUIRED_SECTIONS:  # (a value that is not a section: reported by the walk)
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            group = key in config_groups()
            how = f"pick one with {key}=NAME ({', '.join(_group_options(key))})" if group \
                else "do not delete it"
            raise UserError(f"{key}: a required section is missing or null; {how}")
    for key in TARGET_SECTIONS:
        section = cfg.get(key)
        if isinstance(section, DictConfig) and len(section) and "_target_" not in section:
            raise UserError(f"{key}: the section has no _target_ (was its group deleted with "
                            f"~{key}?); pick one with {key}=NAME "
                            f"({', '.join(_group_options(key))})")


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _finite(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def check_limits(cfg: DictConfig) -> None:
    """Ranges of the keys every script shares: seed, batch size, workers, classes,
    learning rate, scheduler periods; and that `data`/`model` name the right kind of
    object. Only keys present are checked."""
    from data.base import max_workers

    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        raise UserError(f"seed={seed!r}: expected an integer from 0 to {MAX_SEED}")
    data = cfg.get("data")
    if isinstance(data, DictConfig):
        batch = data.get("batch_size")
        if isinstance(batch, int) and not isinstance(batch, bool) and batch > MAX_BATCH:
            raise UserError(f"data.batch_size={batch}: expected at most {MAX_BATCH}")
        workers = data.get("num_workers")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or not 0 <= workers <= max_workers()):
            raise UserError(f"data.num_workers={workers!r}: expected an integer from 0 to "
                            f"{max_workers()} (4 per CPU core of this machine)")
        classes = data.get("num_classes")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                    or not 1 <= classes <= 1_000_000):
            raise UserError(f"data.num_classes={classes!r}: expected an integer from 1 to "
                            f"1000000")
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, DictConfig):
        lr = optimizer.get("lr")
        if lr is not None and not (_finite(lr) and 0 < lr <= MAX_LR):
            raise UserError(f"optimizer.lr={lr!r}: expected a number > 0 and <= {MAX_LR:g}")
        for key in ("momentum", "weight_decay"):
            value = optimizer.get(key)
            if value is not None and not (_finite(value) and 0 <= value <= MAX_LR):
                raise UserError(f"optimizer.{key}={value!r}: expected a finite number >= 0")
    scheduler = cfg.get("scheduler")
    if isinstance(scheduler, DictConfig):
        for key in ("step_size", "T_max"):
            value = scheduler.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise UserError(f"scheduler.{key}={value!r}: expected an integer >= 1")
        for key in ("gamma", "eta_min"):
            value = scheduler.get(key)
            if value is not None and not (_finite(value) and value >= 0):
                raise UserError(f"scheduler.{key}={value!r}: expected a finite number >= 0")
    for key in ("data", "model"):
        if isinstance(cfg.get(key), DictConfig):
            check_target_kind(cfg[key], key)


def check_target_kind(section: DictConfig, key: str, source: str = "") -> None:
    """`data` must name a concrete DataModule, `model` an nn.Module class or a builder
    function (the abstract data.base.DataModule is neither)."""
    import torch

    from data.base import DataModule

    target = section.get("_target_")
    if target is None:
        return
    try:
        obj = locate(str(target))
    except Exception:  # check_target_section reports import errors
        return
    where = f"{source}: " if source else ""
    if key == "data":
        if not (inspect.isclass(obj) and issubclass(obj, DataModule)
                and obj.setup is not DataModule.setup):
            raise UserError(f"{where}data._target_={target}: expected a data module (a "
                            f"subclass of data.base.DataModule that implements setup())")
    elif key == "model":
        if inspect.isclass(obj) and not issubclass(obj, torch.nn.Module) or not callable(obj) \
                or (inspect.isclass(obj) and issubclass(obj, DataModule)):
            raise UserError(f"{where}model._target_={target}: expected a torch.nn.Module class "
                            f"or a function that builds one")


def check_monitor(cfg: DictConfig, task: str) -> None:
    """checkpoint.monitor must be a metric this task logs (val_acc only for classifiers)."""
    valid = METRICS.get(task)
    stopping = cfg.get("early_stopping") or {}
    for key, monitor in (("checkpoint.monitor", cfg.checkpoint.monitor),
                         ("early_stopping.monitor", stopping.get("monitor")
                          if stopping.get("patience") is not None else None)):
        if valid is not None and monitor is not None and str(monitor) not in valid:
            raise UserError(f"{key}={monitor!r}: a {task} run logs {list(valid)}")


def validate_inference(cfg: DictConfig, script: str) -> None:
    """evaluate.py / predict.py: the same kind of checks on their own keys."""
    ckpt, weights = cfg.get("ckpt"), cfg.get("weights")
    if bool(ckpt) == bool(weights):
        raise UserError("give exactly one of ckpt=PATH (a train.py checkpoint or export folder) "
                        "or weights=PATH (a bare state_dict, with model=... data=...)")
    if weights and (cfg.get("model") is None or cfg.get("data") is None):
        raise UserError(f"weights={weights}: name the architecture and data too, e.g. "
                        f"model=small_cnn data=digits")
    resolve_all(cfg)
    check_fixed_sections(cfg, script)
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)
    _check_weights_keys(cfg)
    _positive_int(cfg.get("batch_size"), "batch_size", allow_none=script == "evaluate")
    check_limits(cfg)
    if "split" in cfg and cfg.split not in ("train", "val", "test"):
        raise UserError(f"split={cfg.split!r}: expected train, val or test")
    try:
        resolve_device(cfg.get("device", "auto"))
    except UserError as err:  # resolve_device names train.py's key
        raise UserError(str(err).replace("trainer.device", "device")) from None
    output = cfg.get("output")
    if output is not None and Path(str(output)).is_dir():
        raise UserError(f"output={output}: is a folder; expected a file name")


def _check_weights_keys(cfg: DictConfig) -> None:
    """strict= and weights_key= only mean something with weights=."""
    strict = cfg.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise UserError(f"strict={strict!r}: expected true or false")
    key = cfg.get("weights_key")
    if key is not None and not cfg.get("weights"):
        raise UserError(f"weights_key={key}: only used with weights=PATH (a file with several "
                        f"models)")
    if key is not None and not isinstance(key, str):
        raise UserError(f"weights_key={key!r}: expected the name of an entry of the file")


def run_dir_for(root: str | Path, run_name: str, key: str = "run_name") -> Path:
    """<root>/<run_name>, refusing names that would leave the checkpoint root."""
    name = str(run_name)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise UserError(f"{key}={name!r}: expected a relative name inside checkpoint.root "
                        f"(no '..', no absolute path)")
    root = Path(root)
    run_dir = root / name
    if not run_dir.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{key}={name!r}: resolves outside checkpoint.root={root}")
    return run_dir


def locate(path: str) -> Any:
    """The object a dotted `_target_` names, as hydra.utils.get_object finds it (without its
    error logging, which would print a second, multi-line message)."""
    import importlib

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


# ------------------------------------------------------------------------ 1. resolution

def resolve_all(cfg: DictConfig) -> None:
    """Every `${...}` resolves and no `???` is left, or one line naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = _full_key(err)
        raise UserError(f"{key}: a value is required (the config has ???); pass "
                        f"{key}=VALUE") from None
    except InterpolationResolutionError as err:
        key = _full_key(err)
        first = str(err).strip().splitlines()[0]
        hint = ""
        if key.startswith("model."):
            hint = "; the model does not fit this data: pick a matching data=/model= or " \
                   "experiment="
        raise UserError(f"{key}: {first}{hint}") from None
    except OmegaConfBaseException as err:
        raise UserError(f"{_full_key(err)}: {str(err).strip().splitlines()[0]}") from None


def _full_key(err: Exception) -> str:
    return str(getattr(err, "full_key", None) or "config")


# ------------------------------------------------------------------------ 2. types, keys

def _schema(script: str) -> DictConfig:
    """The script's own YAML (not composed): its defaults define the keys and their types."""
    schema = OmegaConf.load(CONFIG_DIR / f"{script}.yaml")
    for key in ("defaults", "hydra"):
        schema.pop(key, None)
    return schema


def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def check_fixed_sections(cfg: DictConfig, script: str) -> None:
    """Top-level keys and the sections written out in configs/<script>.yaml: no unknown key
    (a `+trainer.epoch=5` typo), and each value of the same type as its non-null default."""
    _check_against(cfg, _schema(script), "", allowed_extra=set(config_groups()))


def _check_against(node: DictConfig, schema: DictConfig, prefix: str,
                   allowed_extra: set[str]) -> None:
    defaults = OmegaConf.to_container(schema, resolve=False)
    for key in node:
        key = str(key)
        full = f"{prefix}{key}"
        if key not in defaults:  # (`in schema` is False for a ??? value)
            if key in allowed_extra:
                continue
            valid = ", ".join(str(k) for k in defaults)
            raise UserError(f"{full}: unknown key in {prefix.rstrip('.') or 'the config'}; "
                            f"valid keys: {valid}")
        default = defaults[key]
        if isinstance(default, dict):
            value = node[key]
            if not isinstance(value, DictConfig):
                raise UserError(f"{full}={_plain(node, key)!r}: expected a section with keys "
                                f"{', '.join(str(k) for k in default)}")
            _check_against(value, schema[key], f"{full}.", set())
        elif default is not None and not (isinstance(default, str) and default == "???"):
            value = _plain(node, key)
            if not _matches(value, _type_of(default)):
                raise UserError(f"{full}={value!r}: expected {_describe(_type_of(default))}")


def _plain(node: DictConfig, key: str) -> Any:
    value = node[key]
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _type_of(default: Any) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, str):
        return str
    if isinstance(default, list):
        return list
    return object


def check_target_section(section: Any, key: str) -> None:
    """A `_target_` section against the signature of the class/function it names: unknown
    keys and wrong types, read from the constructor's type hints."""
    if not isinstance(section, DictConfig):
        raise UserError(f"{key}={section!r}: expected a section (pick one with {key}=NAME)")
    target = section.get("_target_")
    if target is None:
        return
    try:
        obj = locate(str(target))
    except Exception as err:  # ImportError, AttributeError, errors raised by the import
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}._target_={target!r}: cannot be imported ({first})") from None
    params, hints, open_ended = _parameters(obj)
    values = OmegaConf.to_container(section, resolve=True)
    for name, value in values.items():
        if str(name).startswith("_") or name in TRAINER_KEYS.get(key, ()):
            continue
        if name not in params:
            if open_ended:
                continue
            valid = ", ".join(p for p in params if p not in ("self",))
            # e.g. experiment=digits_cnn (tuned for SGD: momentum) with optimizer=adamw
            hint = f"; set for another optimizer? drop it with ~{key}.{name}" \
                if key == "optimizer" else ""
            raise UserError(f"{key}.{name}: unknown key for {target}; valid keys: {valid}{hint}")
        hint = hints.get(name)
        if hint is not None and _matches(value, hint) is False:
            raise UserError(f"{key}.{name}={value!r}: expected {_describe(hint)}")


def _parameters(obj: Any) -> tuple[list[str], dict[str, Any], bool]:
    """Keyword parameters of a function or class constructor, following `**kwargs` into the
    base classes' __init__ (DataModule subclasses pass batch_size etc. on)."""
    functions = []
    if inspect.isclass(obj):
        for cls in obj.__mro__:
            if cls is object:
                break
            if "__init__" in vars(cls):
                functions.append(cls.__init__)
    elif callable(obj):
        functions.append(obj)
    params: list[str] = []
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return params, hints, True
        try:
            function_hints = typing.get_type_hints(function)
        except Exception:  # unresolvable annotations: check names only
            function_hints = {}
        var_keyword = False
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                var_keyword = True
            elif param.kind is not param.VAR_POSITIONAL and name not in params:
                params.append(name)
                if name in function_hints:
                    hints[name] = function_hints[name]
        if not var_keyword:
            return [p for p in params if p != "self"], hints, False
    return [p for p in params if p != "self"], hints, True


def _matches(value: Any, hint: Any) -> bool | None:
    """Does a plain config value fit a type hint? None when the hint is not understood."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return True
    if origin is typing.Union or origin is types.UnionType:
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint is Path:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if inspect.isclass(hint):  # a tensor, an optimizer, ...: never a plain config value
        return False if value is not None else None
    return None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(d for d in map(_describe, typing.get_args(hint)) if d)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text",
             Path: "a path", list: "a list", tuple: "a list", dict: "a mapping",
             type(None): "null"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return ""  # a tensor, an optimizer: not something a config can hold


def _check_fractions(section: DictConfig, key: str) -> None:
    """`*_fraction` data keys are shares of the data set: 0 < train < 1, 0 <= others < 1."""
    fractions = {k: v for k, v in section.items() if str(k).endswith("_fraction")}
    for name, value in fractions.items():
        low_ok = value > 0 if name == "train_fraction" else value >= 0
        if not (isinstance(value, (int, float)) and low_ok and value < 1):
            raise UserError(f"{key}.{name}={value!r}: expected a fraction "
                            f"{'>' if name == 'train_fraction' else '>='} 0 and < 1")
    held_out = sum(v for k, v in fractions.items() if k != "train_fraction")
    if "train_fraction" not in fractions and held_out >= 1:
        raise UserError(f"{key}: {' + '.join(f'{k}' for k in fractions)} = {held_out:g} "
                        f"leaves no training data; expected a sum < 1")


# -------------------------------------------------------------------------- 3. building

def build(section: Any, key: str, source: Path | str | None = None) -> Any:
    """hydra.utils.instantiate, turning a constructor's bad-input error (which Hydra wraps in
    InstantiationException) back into its one-line UserError."""
    from hydra.utils import instantiate

    try:
        return instantiate(section)
    except UserError:
        raise
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
            if isinstance(cause, UserError):
                raise cause from None
        # A constructor refusing its arguments is bad input; from a file's config (source)
        # anything a constructor raises is, since the file chose the arguments.
        if source is None and not isinstance(err.__cause__, (ValueError, TypeError,
                                                             RuntimeError, OverflowError)):
            raise
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        where = f"{source}: " if source else ""
        raise UserError(f"{where}could not build {key} from its config ({first})") from None


# Modules a config read from a file (checkpoint, export) may name in `_target_`: hydra's
# instantiate calls whatever the string names, so a downloaded file could otherwise run
# os.system. Project data modules and models, and torch.nn modules (losses) only.
SAFE_TARGET_MODULES = ("data.", "models.", "torch.nn.", "torchvision.transforms.v2.")


def check_loaded_targets(config: Any, source: Path | str, where: str = "config") -> None:
    """Refuse any `_target_` in a config read from a file that is not a project data module,
    a project model (class or builder function) or a torch.nn module."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not _safe_target(target):
            raise UserError(f"{source}: refused {where}._target_={target!r}: a file's config "
                            f"may only name data.*, models.*, torch.nn or "
                            f"torchvision.transforms.v2 classes")
        for key, value in config.items():
            check_loaded_targets(value, source, f"{where}.{key}")
    elif isinstance(config, list):
        for index, value in enumerate(config):
            check_loaded_targets(value, source, f"{where}[{index}]")


def _safe_target(target: Any) -> bool:
    if not isinstance(target, str) or not target.startswith(SAFE_TARGET_MODULES):
        return False
    try:
        obj = locate(target)
    except Exception:  # what cannot be shown safe is refused
        return False
    import torch

    from data.base import DataModule

    module = getattr(obj, "__module__", "") or ""
    if inspect.isclass(obj):
        if issubclass(obj, DataModule):
            return module.startswith("data.")
        if target.startswith("torchvision.transforms.v2."):  # data.augment
            from data.augment import is_transform_class

            return is_transform_class(obj)
        return issubclass(obj, torch.nn.Module) and module.startswith(SAFE_TARGET_MODULES)
    return inspect.isfunction(obj) and module.startswith("models.")
