"""Command-line overrides that do not compose: one line naming the override and what is
valid, exit code 2 (Hydra itself prints a multi-line message and exits 1).

`run_main` starts a script's `@hydra.main` function. A single run composes its config once,
inside Hydra: Hydra is asked to raise a composition error instead of printing it (until the
task starts, engine.errors), and only then is the config composed again, piece by piece, to
name the culprit. A multirun (-m) composes and checks every job before the first one starts.
Flags other than -m/--multirun (--help, --cfg, --config-dir, ...) are left to Hydra, and so is
everything with debug=true or HYDRA_FULL_ERROR=1 (Hydra's full messages).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from engine.config import (
    CONFIG_DIR,
    config_groups,
    did_you_mean,
    group_options,
    schema_error,
    validate_inference,
    validate_train,
)
from engine.errors import EXIT_BAD_INPUT, UserError, compose_errors_raised

MULTIRUN_FLAGS = ("-m", "--multirun")
SHELL_COMPLETION_FLAGS = ("-sc", "--shell-completion")
COMPLETION_COMMANDS = ("install", "uninstall", "query")
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError, TypeError)


def run_main(main: Callable[[], Any], config_name: str) -> None:
    """Call a script's `@hydra.main` function; a config that does not compose ends in one
    line on stderr and exit code 2."""
    argv = sys.argv[1:]
    if any(a in SHELL_COMPLETION_FLAGS for a in argv) and not _full_errors(argv):
        _shell_completion(main, argv)
        return
    if _left_to_hydra(argv):
        main()
        return
    if any(a in MULTIRUN_FLAGS for a in argv):
        check_command_line(config_name, argv)  # every job, before the first one starts
        main()
        return
    try:
        with compose_errors_raised():
            main()
    except COMPOSE_ERRORS as err:
        if _task_ran(err):  # a bug in a task that does not hand errors back (cli_errors)
            raise
        print(f"error: {explain(err, config_name, argv)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _task_ran(err: BaseException) -> bool:
    """Did `err` come from the task rather than from composing? Hydra's own test: its
    `run_job` is on the way (as in hydra._internal.utils.run_and_report)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_job":
            return True
        tb = tb.tb_next
    return False


def _left_to_hydra(argv: list[str]) -> bool:
    return any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv) or \
        _full_errors(argv)


def _full_errors(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "debug=true" in map(str.lower, argv)


def _shell_completion(main: Callable[[], Any], argv: list[str]) -> None:
    """Hydra's --shell-completion needs exactly one of install=, uninstall=, query= with a
    shell it knows; otherwise (and on a failed query) it raises a traceback: one line here."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.completion_plugin import CompletionPlugin

    shells = sorted(plugin.provides() for plugin in Plugins.instance().discover(CompletionPlugin))
    args = [a for a in argv if a not in SHELL_COMPLETION_FLAGS]
    commands = [a.partition("=") for a in args if a.partition("=")[0] in COMPLETION_COMMANDS]
    problem = None
    if len(commands) != 1 or commands[0][2] not in shells:
        problem = "expected one of install=SHELL, uninstall=SHELL or query=SHELL"
    else:
        try:
            with compose_errors_raised():  # Hydra raises instead of printing a traceback
                main()
        except Exception as err:  # noqa: BLE001 - e.g. query=bash outside a shell's completion
            problem = f"failed ({type(err).__name__}: {str(err).strip()[:80]})"
    if problem:
        print(f"error: --shell-completion {' '.join(args) or '(nothing)'}: {problem} "
              f"(SHELL: {', '.join(shells)}), e.g. --shell-completion install=bash",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit 2 with one line if the overrides in `argv` (default sys.argv[1:]) do not compose
    or fail the script's checks, for every job of a multirun. With debug=true or
    HYDRA_FULL_ERROR=1 it checks nothing: Hydra's full message is shown instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _left_to_hydra(argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
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
    if config_name == "train":
        validate_train(cfg)
    elif config_name in ("evaluate", "predict"):
        validate_inference(cfg, config_name)


def compose_checked(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's compose, with its errors turned into a one-line UserError."""
    try:
        return _compose(config_name, overrides)
    except COMPOSE_ERRORS as err:
        raise UserError(explain(err, config_name, list(overrides))) from None


def explain(err: Exception, config_name: str, argv: Sequence[str]) -> str:
    """One line for a config that did not compose with these overrides; composes again, part
    by part, where Hydra's message does not name the override or the valid choices."""
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return _explain(err, config_name, overrides)
    return _culprit(config_name, overrides, err)  # `=5`, `data=[1,2]`: Hydra's own bugs


def _culprit(config_name: str, overrides: list[str], err: Exception) -> str:
    """Name the override that Hydra failed on with a plain exception (it does not say)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for override in overrides:
        try:
            _compose(config_name, [override])
        except Exception:  # noqa: BLE001 - this one fails alone: it is the culprit
            key, _, value = override.partition("=")
            if key.lstrip("+~") in config_groups():
                options = ", ".join(group_options(key.lstrip("+~")))
                return (f"{override}: {value!r} is not one of the {key.lstrip('+~')} "
                        f"choices; valid options: {options}")
            return f"{override}: cannot apply this override ({first})"
    return f"{' '.join(overrides)}: cannot apply these overrides ({first})"


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
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
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MissingConfigException):
        missing = str(err.missing_cfg_file or "")
        group, _, choice = missing.rpartition("/")
        options = list(err.options or []) or group_options(group)
        if group and options:
            hint = did_you_mean(choice, options)
            return (f"{group}={choice}: unknown {group} choice{hint}; valid options: "
                    f"{', '.join(options)}")
        return first
    if isinstance(err, OverrideParseException):
        return f"{err.override}: cannot parse this override ({err.message.splitlines()[0]})"
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key(str(full_key), config_name, overrides)
    if isinstance(cause, ValidationError):  # a value of the wrong type for the schema
        return schema_error(cause)
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
    groups = set(config_groups())
    choices = [o for o in overrides if o.split("=")[0].lstrip("+~") in groups]
    try:
        base = _compose(config_name, choices)
    except Exception:
        base = _compose(config_name, [])
    node = OmegaConf.select(base, parent) if parent else base
    group = full_key.split(".")[0]
    if group in groups and (not parent and group not in base or parent and node is None):
        return (f"{offending}: no {group} config is selected; choose one first with "
                f"{group}=NAME ({', '.join(group_options(group))})")
    where = parent or "the config"
    if not isinstance(node, DictConfig):
        return f"{offending}: unknown key {full_key!r}"
    valid = [str(k) for k in node if not str(k).startswith("_")]
    return (f"{offending}: unknown key {name!r} in {where}{did_you_mean(name, valid)}; "
            f"valid keys: {', '.join(valid)}")
