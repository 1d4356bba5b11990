"""Command-line overrides checked before Hydra runs, so a typo is one line and exit code 2.

Hydra itself rejects `trainer.epoch=5` (struct mode) and `model=foo`, but prints a multi-line
message and exits 1. `check_command_line` composes the same config with Hydra's compose API
first and, on failure, prints one line naming the override and what is valid. Flags other
than -m/--multirun (--help, --cfg, --config-dir, ...) are left to Hydra.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from engine.errors import EXIT_BAD_INPUT, UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MULTIRUN_FLAGS = ("-m", "--multirun")


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit 2 with one line if the overrides in `argv` (default sys.argv[1:]) do not compose.
    With debug=true or HYDRA_FULL_ERROR=1, Hydra's own full message is shown instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or "debug=true" in map(str.lower, overrides):
        return
    try:
        multirun = any(a in MULTIRUN_FLAGS for a in argv)
        for combination in _combinations(overrides, multirun):
            _validate(config_name, compose_checked(config_name, combination))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _validate(config_name: str, cfg: DictConfig) -> None:
    """The script's own checks (engine/config.py), so every job of a multirun is checked
    before the first one starts."""
    from engine.config import validate_inference, validate_train

    if config_name == "train":
        validate_train(cfg)
    elif config_name in ("evaluate", "predict"):
        validate_inference(cfg, config_name)


def compose_checked(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's compose, with its errors turned into a one-line UserError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_explain(err, config_name, list(overrides))) from None
    except (ValueError, TypeError) as err:  # `=5`, `data=[1,2]`, `loss=null`: Hydra's own bugs
        raise UserError(_culprit(config_name, list(overrides), err)) from None


def _culprit(config_name: str, overrides: list[str], err: Exception) -> str:
    """Name the override that Hydra failed on with a plain exception (it does not say)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for override in overrides:
        try:
            _compose(config_name, [override])
        except Exception:  # noqa: BLE001 - this one fails alone: it is the culprit
            key, _, value = override.partition("=")
            if key.lstrip("+~") in _groups():
                options = ", ".join(_group_options(key.lstrip("+~")))
                return (f"{override}: {value!r} is not one of the {key.lstrip('+~')} "
                        f"choices; valid options: {options}")
            return f"{override}: cannot apply this override ({first})"
    return f"{' '.join(overrides)}: cannot apply these overrides ({first})"


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides),
                      return_hydra_config=True)
    # As under @hydra.main: `${hydra:runtime.choices.data}` (train.yaml's `name`) resolves.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _combinations(overrides: list[str], multirun: bool) -> list[list[str]]:
    """A multirun sweep (`optimizer.lr=0.1,0.01`, `model=a,b`): every value of every swept
    key is checked once, with the other sweeps at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return [overrides]  # compose reports the parse error
    if not multirun:
        return [overrides]  # outside multirun a comma is an error compose explains
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # a sweep kind only a sweeper plugin understands
                return []
            choices.append([f"{override.get_key_element()}={v}" for v in values] or [text])
        else:
            choices.append([text])
    first = [options[0] for options in choices]
    out = [first]
    for index, options in enumerate(choices):
        for option in options[1:]:
            out.append(first[:index] + [option] + first[index + 1:])
    return out


def _explain(err: Exception, config_name: str, overrides: list[str]) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MissingConfigException):
        missing = str(err.missing_cfg_file or "")
        group, _, choice = missing.rpartition("/")
        options = list(err.options or []) or _group_options(group)
        if group and options:
            hint = _did_you_mean(choice, options)
            return (f"{group}={choice}: unknown {group} choice{hint}; valid options: "
                    f"{', '.join(options)}")
        return first
    if isinstance(err, OverrideParseException):
        return f"{err.override}: cannot parse this override ({err.message.splitlines()[0]})"
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        return _unknown_key(str(full_key), config_name, overrides)
    if first.startswith("Ambiguous value for argument"):
        text = first.split("'")[1] if "'" in first else first
        return (f"{text}: a comma makes a sweep: add -m to run one job per value, or write "
                f"[a,b] for a list or quote the value for text")
    if first.startswith("Could not append to config"):
        return f"{first} Remove the + prefix to change it"
    if first.startswith("Could not delete from config"):
        return first
    deleted = [o for o in overrides if o.startswith("~")]
    if deleted and "not in struct" in str(cause or err):
        return (f"{deleted[0]}: cannot delete {deleted[0][1:].split('=')[0]!r}: train, "
                f"evaluate and predict need it")
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() \
        else ""
    return f"{first} ({detail})" if detail else first


def _unknown_key(full_key: str, config_name: str, overrides: list[str]) -> str:
    """`trainer.epoch`: list the valid keys of `trainer` as composed with the same group
    choices (so `model.foo` lists the chosen model's keys)."""
    offending = next((o for o in overrides if o.lstrip("+~").split("=")[0] == full_key
                      or o.lstrip("+~").split("=")[0].startswith(full_key + ".")), full_key)
    parent, _, name = full_key.rpartition(".")
    groups = set(_groups())
    if not parent and name in groups:  # `data.batch_size=8` where no data config is chosen
        return (f"{offending}: no {name} config is selected; choose one first with "
                f"{name}=NAME ({', '.join(_group_options(name))})")
    choices = [o for o in overrides if o.split("=")[0].lstrip("+~") in groups]
    try:
        base = _compose(config_name, choices)
    except Exception:
        base = _compose(config_name, [])
    node = OmegaConf.select(base, parent) if parent else base
    where = parent or "the config"
    if not isinstance(node, DictConfig):
        return f"{offending}: unknown key {full_key!r}"
    valid = [str(k) for k in node if not str(k).startswith("_")]
    if not parent:
        valid += [g for g in sorted(groups) if g not in valid and not _global_group(g)]
    hint = _did_you_mean(name, valid)
    return (f"{offending}: unknown key {name!r} in {where}{hint}; valid keys: "
            f"{', '.join(valid)}")


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def _global_group(group: str) -> bool:
    """Presets such as experiment/ (`# @package _global_`) set other keys; not a key."""
    return any("@package _global_" in f.read_text()[:300]
               for f in (CONFIG_DIR / group).glob("*.yaml"))


def _group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
