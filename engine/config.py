"""Checks on the composed config, run before any work starts: one clear line per mistake.

Four layers, all before a file is written:
  1. key names and types of the fixed sections (top level, trainer, checkpoint): Hydra, while
     composing, against the structured configs of engine/config_schema.py; `check_schema`
     repeats it for keys added with `+key=value` (Hydra's append lets any key in);
  2. every interpolation resolves and no `???` is left (`resolve_all`);
  3. each `_target_` section (data, model, loss, optimizer, scheduler) against the
     constructor it names (engine/target_checks.py);
  4. value ranges (epochs >= 1, lr > 0, known device, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from engine.config_schema import METRICS, check_schema, did_you_mean, schema_error
from engine.errors import UserError
from engine.feature_checks import check_trainer_features, finite, positive_int
from engine.loggers import check_logger_config
from engine.run_dir import run_dir_for
from engine.runtime import max_workers, resolve_device
from engine.target_checks import (
    SAFE_TARGET_MODULES,
    build,
    check_loaded_targets,
    check_target_kind,
    check_target_section,
    locate,
)

__all__ = ["METRICS", "SAFE_TARGET_MODULES", "build", "check_limits", "check_loaded_targets",
           "check_monitor", "check_schema", "check_target_kind", "check_target_section",
           "did_you_mean", "from_start_dir", "locate", "paths_from_start_dir", "resolve_all",
           "schema_error", "validate_inference", "validate_train"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TARGET_SECTIONS = ("data", "model", "loss", "optimizer", "scheduler")
REQUIRED_SECTIONS = ("trainer", "checkpoint", "data", "model", "loss", "optimizer")
# Bounds on what a config may ask for: values of the right type that would still overflow,
# divide by zero, or exhaust the machine.
MAX_SEED = 2**32 - 1  # NumPy's seed range; the batch order multiplies the seed further
MAX_BATCH = 1 << 24
MAX_LR = 1e6


def validate_train(cfg: DictConfig) -> None:
    """Everything train.py needs to know is right before it opens the run directory."""
    check_required_sections(cfg)
    check_schema(cfg, "train")
    resolve_all(cfg)
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)
    check_limits(cfg)
    check_logger_config(cfg.get("logger"))  # logger=: known trackers and keys
    trainer, ckpt = cfg.trainer, cfg.checkpoint
    positive_int(trainer.epochs, "trainer.epochs")
    positive_int(ckpt.every_n_epochs, "checkpoint.every_n_epochs")
    positive_int(ckpt.every_n_steps, "checkpoint.every_n_steps", allow_none=True)
    positive_int(ckpt.keep_last, "checkpoint.keep_last")
    positive_int(trainer.log_every_n_steps, "trainer.log_every_n_steps")
    positive_int(cfg.data.get("batch_size"), "data.batch_size")
    positive_int(trainer.global_batch_size, "trainer.global_batch_size", allow_none=True,
                 maximum=MAX_BATCH)
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise UserError(f"optimizer.lr={lr!r}: expected a number > 0")
    if cfg.optimizer.get("nesterov") is True and not cfg.optimizer.get("momentum", 0) > 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    _check_fractions(cfg.data, "data")
    if trainer.max_time is not None and not trainer.max_time > 0:
        raise UserError(f"trainer.max_time={trainer.max_time!r}: expected seconds > 0 or null")
    if not trainer.print_every_s >= 0:
        raise UserError(f"trainer.print_every_s={trainer.print_every_s!r}: expected seconds "
                        f">= 0")
    resolve_device(trainer.device)
    check_trainer_features(cfg)
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


def validate_inference(cfg: DictConfig, script: str) -> None:
    """evaluate.py / predict.py: the same kind of checks on their own keys."""
    ckpt, weights = cfg.get("ckpt"), cfg.get("weights")
    if bool(ckpt) == bool(weights):
        raise UserError("give exactly one of ckpt=PATH (a train.py checkpoint or export folder) "
                        "or weights=PATH (a bare state_dict, with model=... data=...)")
    if weights and (cfg.get("model") is None or cfg.get("data") is None):
        raise UserError(f"weights={weights}: name the architecture and data too, e.g. "
                        f"model=small_cnn data=digits")
    check_schema(cfg, script)
    resolve_all(cfg)
    for key in TARGET_SECTIONS:
        if cfg.get(key) is not None:
            check_target_section(cfg[key], key)
    _check_weights_keys(cfg)
    positive_int(cfg.get("batch_size"), "batch_size", allow_none=script == "evaluate")
    check_limits(cfg)
    try:
        resolve_device(cfg.get("device", "auto"))
    except UserError as err:  # resolve_device names train.py's key
        raise UserError(str(err).replace("trainer.device", "device")) from None
    output = cfg.get("output")
    if output is not None and Path(str(output)).is_dir():
        raise UserError(f"output={output}: is a folder; expected a file name")


# ------------------------------------------------------------ sections and groups

def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_required_sections(cfg: DictConfig) -> None:
    """`~optimizer`, `loss=null`, ...: a section train.py cannot run without."""
    for key in REQUIRED_SECTIONS:
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            group = key in config_groups()
            how = f"pick one with {key}=NAME ({', '.join(group_options(key))})" if group \
                else "do not delete it"
            raise UserError(f"{key}: a required section is missing or null; {how}")
    for key in TARGET_SECTIONS:
        section = cfg.get(key)
        if isinstance(section, DictConfig) and len(section) and "_target_" not in section:
            raise UserError(f"{key}: the section has no _target_ (was its group deleted with "
                            f"~{key}?); pick one with {key}=NAME "
                            f"({', '.join(group_options(key))})")


# ------------------------------------------------------------------------ 2. resolution

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


# ------------------------------------------------------------------------ 4. value ranges

def check_limits(cfg: DictConfig) -> None:
    """Ranges of the keys every script shares: seed, batch size, workers, classes,
    learning rate, scheduler periods; and that `data`/`model` name the right kind of
    object. Only keys present are checked."""
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
        if lr is not None and not (finite(lr) and 0 < lr <= MAX_LR):
            raise UserError(f"optimizer.lr={lr!r}: expected a number > 0 and <= {MAX_LR:g}")
        for key in ("momentum", "weight_decay"):
            value = optimizer.get(key)
            if value is not None and not (finite(value) and 0 <= value <= MAX_LR):
                raise UserError(f"optimizer.{key}={value!r}: expected a finite number >= 0")
    scheduler = cfg.get("scheduler")
    if isinstance(scheduler, DictConfig):
        for key in ("step_size", "T_max"):
            positive_int(scheduler.get(key), f"scheduler.{key}", allow_none=True)
        for key in ("gamma", "eta_min"):
            value = scheduler.get(key)
            if value is not None and not (finite(value) and value >= 0):
                raise UserError(f"scheduler.{key}={value!r}: expected a finite number >= 0")
    for key in ("data", "model"):
        if isinstance(cfg.get(key), DictConfig):
            check_target_kind(cfg[key], key)


def check_monitor(cfg: DictConfig, task: str) -> None:
    """checkpoint.monitor must be a metric this task logs (val_acc only for classifiers)."""
    valid = METRICS.get(task)
    stopping = cfg.get("early_stopping") or {}
    for key, monitor in (("checkpoint.monitor", cfg.checkpoint.monitor),
                         ("early_stopping.monitor", stopping.get("monitor")
                          if stopping.get("patience") is not None else None)):
        if valid is not None and monitor is not None and str(monitor) not in valid:
            raise UserError(f"{key}={str(monitor)!r}: a {task} run logs {list(valid)}")


def _check_weights_keys(cfg: DictConfig) -> None:
    """weights_key= only means something with weights=."""
    key = cfg.get("weights_key")
    if key is not None and not cfg.get("weights"):
        raise UserError(f"weights_key={key}: only used with weights=PATH (a file with several "
                        f"models)")


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


# Config keys naming files or folders (train, evaluate, predict): given relative to the folder
# the command was started in.
PATH_KEYS = ("checkpoint.root", "resume", "weights", "ckpt", "input", "output", "data.path",
             "data.root")


def from_start_dir(path: str) -> str:
    """`path` relative to the folder the command was started in: with hydra.job.chdir=true
    the job runs in Hydra's output folder, so a relative path is joined to the start folder
    (Hydra's runtime.cwd, as hydra.utils.to_absolute_path); otherwise unchanged."""
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
