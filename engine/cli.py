"""The command line: `run_main` starts a script's `@hydra.main` function; an override that does
not compose is one line naming it and what is valid, exit 2 (Hydra: many lines, exit 1). A
multirun checks every job first. `validate_train`/`validate_inference`: each script's checks
before any work starts."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, open_dict
from omegaconf import errors as oe

from engine import config
from engine.errors import EXIT_BAD_INPUT, UserError, compose_errors_raised, first_line
from engine.loggers import check_logger_config
from engine.run_dir import run_dir_for
from engine.runtime import resolve_device

MULTIRUN_FLAGS = ("-m", "--multirun")
SHELL_COMPLETION_FLAGS = ("-sc", "--shell-completion")
COMPOSE_ERRORS = (HydraException, oe.OmegaConfBaseException, ValueError, TypeError)


def validate_train(cfg: DictConfig) -> None:
    """Everything train.py needs to know is right, before it opens the run folder."""
    config.drop_other_optimizers_keys(cfg)  # optimizer=adamw on an experiment tuned for SGD
    config.check_config(cfg, "train")
    config.check_limits(cfg, required=("data.batch_size", "optimizer.lr"))
    check_logger_config(cfg.get("logger"))  # logger=: known trackers and keys
    resolve_device(cfg.trainer.device)
    if cfg.get("weights") and cfg.resume is not None and str(cfg.resume) != "auto":
        raise UserError(
            f"weights={cfg.weights} starts a new run and resume={cfg.resume} continues one: give only one of them"
        )
    root = Path(str(cfg.checkpoint.root))
    if root.exists() and not root.is_dir():
        raise UserError(f"checkpoint.root={root}: exists and is not a folder")
    run_dir_for(root, cfg.name, key="name") if cfg.run_name is None else run_dir_for(root, cfg.run_name)


def validate_inference(cfg: DictConfig, script: str) -> None:
    """evaluate.py / predict.py: the same kind of checks on their own keys."""
    if bool(cfg.get("ckpt")) == bool(cfg.get("weights")):
        raise UserError(
            "give exactly one of ckpt=PATH (a train.py checkpoint or export folder) "
            "or weights=PATH (a bare state_dict, with model=... data=...)"
        )
    if cfg.get("weights") and (cfg.get("model") is None or cfg.get("data") is None):
        raise UserError(f"weights={cfg.weights}: name the architecture and data too, e.g. model=small_cnn data=digits")
    config.check_config(cfg, script)
    config.check_limits(cfg)
    try:
        resolve_device(cfg.get("device", "auto"))
    except UserError as err:  # resolve_device names train.py's key
        raise UserError(str(err).replace("trainer.device", "device")) from None
    if cfg.get("output") is not None and Path(str(cfg.output)).is_dir():
        raise UserError(f"output={cfg.output}: is a folder; expected a file name")


def run_main(main: Callable[[], Any], config_name: str) -> None:
    """Call a script's `@hydra.main` function. A single run composes once, inside Hydra (asked
    to raise); only a failure is composed again, piece by piece, to name the culprit. Other
    flags (--help, --cfg, ...), debug=true and HYDRA_FULL_ERROR=1 are left to Hydra."""
    argv = sys.argv[1:]
    if any(a in SHELL_COMPLETION_FLAGS for a in argv) and not _full_errors(argv):
        _shell_completion(main, argv)
    elif _left_to_hydra(argv):
        main()
    elif any(a in MULTIRUN_FLAGS for a in argv):
        check_command_line(config_name, argv)  # every job, before the first one starts
        main()
    else:
        try:
            with compose_errors_raised():
                main()
        except COMPOSE_ERRORS as err:
            if _task_ran(err):  # a bug in a task that does not hand errors back (cli_errors)
                raise
            _bad_input(explain(err, config_name, argv))  # no flags here: all are overrides


def _left_to_hydra(argv: list[str]) -> bool:
    return any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv) or _full_errors(argv)


def _full_errors(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "debug=true" in map(str.lower, argv)


def _bad_input(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _task_ran(err: BaseException) -> bool:
    """Did `err` come from the task, not from composing? Hydra's own test: its `run_job` is on
    the way (as in hydra._internal.utils.run_and_report)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_name != "run_job":
        tb = tb.tb_next
    return tb is not None


def _shell_completion(main: Callable[[], Any], argv: list[str]) -> None:
    """Hydra's --shell-completion without one of install=, uninstall=, query= and a shell it
    knows raises a traceback (as does a failed query): one line here."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.completion_plugin import CompletionPlugin

    try:
        with compose_errors_raised():  # Hydra raises instead of printing a traceback
            main()
    except Exception as err:  # noqa: BLE001 - no subcommand, an unknown shell, query= outside a shell
        shells = ", ".join(sorted(plugin.provides() for plugin in Plugins.instance().discover(CompletionPlugin)))
        args = " ".join(a for a in argv if a not in SHELL_COMPLETION_FLAGS) or "(nothing)"
        problem = f"{type(err).__name__}: {first_line(err, 80).rstrip(' :')}"  # Hydra's list of shells is on line 2
        _bad_input(
            f"--shell-completion {args}: {problem}; expected one of install=SHELL, uninstall=SHELL or query=SHELL "
            f"(SHELL: {shells}), e.g. --shell-completion install=bash"
        )


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Exit 2 with one line if the overrides in `argv` do not compose or fail the script's
    checks, for every job of a multirun; nothing with Hydra's full errors."""
    if _left_to_hydra(argv):
        return
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    multirun = len(overrides) < len(argv)  # outside multirun a comma is an error compose explains
    try:
        for combination in _combinations(overrides) if multirun else [overrides]:
            cfg = compose_checked(config_name, combination)
            if config_name == "train":
                validate_train(cfg)
            elif config_name in ("evaluate", "predict"):
                validate_inference(cfg, config_name)
    except UserError as err:
        _bad_input(str(err))


def compose_checked(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's compose, with its errors turned into a one-line UserError."""
    try:
        return _compose(config_name, overrides)
    except COMPOSE_ERRORS as err:
        raise UserError(explain(err, config_name, list(overrides))) from None


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config.CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as under @hydra.main: `${hydra:...}` resolves
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _combinations(overrides: list[str]) -> list[list[str]]:
    """A multirun sweep (`optimizer.lr=0.1,0.01`, `model=a,b`): every value of every swept key,
    once, with the other sweeps at their first value."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return [overrides]  # compose reports the parse error
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else []
        except Exception:  # a sweep kind only a sweeper plugin understands
            return []
        choices.append([f"{override.get_key_element()}={v}" for v in values] or [text])
    first = [options[0] for options in choices]
    return [first] + [
        first[:index] + [option] + first[index + 1 :] for index, options in enumerate(choices) for option in options[1:]
    ]


def explain(err: Exception, config_name: str, overrides: list[str]) -> str:
    """One line for a config that did not compose with these overrides; composes again, part
    by part, where Hydra's message does not name the override or the valid choices."""
    first, cause, groups = first_line(err, 1000), err.__cause__, config.config_groups()
    if not isinstance(err, (HydraException, oe.OmegaConfBaseException)):  # `=5`, `data=[1,2]`: Hydra's bugs
        return _culprit(config_name, overrides, first, groups)
    if isinstance(err, MissingConfigException):
        group, _, choice = str(err.missing_cfg_file or "").rpartition("/")
        options = list(err.options or []) or config.group_options(group)
        if not (group and options):
            return first
        hint = config.did_you_mean(choice, options)
        return f"{group}={choice}: unknown {group} choice{hint}; valid options: {', '.join(options)}"
    if isinstance(err, OverrideParseException):
        return f"{err.override}: cannot parse this override ({err.message.splitlines()[0]})"
    if isinstance(cause, (oe.ConfigAttributeError, oe.ConfigKeyError)) and cause.full_key:
        return _unknown_key(cause, overrides, groups)
    if isinstance(cause, oe.ValidationError):  # a value of the wrong type for the schema
        return config.schema_error(cause)
    if first.startswith("Ambiguous value for argument"):
        text = first.split("'")[1] if "'" in first else first
        return (
            f"{text}: a comma makes a sweep: add -m for one job per value, write [a,b] for a list or quote it for text"
        )
    if first.startswith("Could not append to config"):
        return f"{first} Remove the + prefix to change it"
    return f"{first} ({first_line(cause, 1000)})" if cause is not None and str(cause).strip() else first


def _culprit(config_name: str, overrides: list[str], first: str, groups: list[str]) -> str:
    """The override Hydra failed on with a plain exception (it does not say which)."""
    for override in overrides:
        try:
            _compose(config_name, [override])
        except Exception:  # noqa: BLE001 - this one fails alone: it is the culprit
            key, _, value = override.partition("=")
            if (group := key.lstrip("+~")) in groups:
                options = ", ".join(config.group_options(group))
                return f"{override}: {value!r} is not one of the {group} choices; valid options: {options}"
            return f"{override}: cannot apply this override ({first})"
    return f"{' '.join(overrides)}: cannot apply these overrides ({first})"


def _unknown_key(cause: oe.OmegaConfBaseException, overrides: list[str], groups: list[str]) -> str:
    """`trainer.epoch`: the valid keys of `trainer` as composed (`model.foo`: the chosen model's)."""
    key, node = str(cause.full_key), cause.parent_node
    named = [o for o in overrides if f"{o.lstrip('+~').split('=')[0]}.".startswith(f"{key}.")]  # key or below
    offending, group = named[0] if named else key, key.split(".")[0]
    if "." in key and group in groups and not node:
        options = ", ".join(config.group_options(group))
        return f"{offending}: no {group} config is selected; choose one first with {group}=NAME ({options})"
    if not isinstance(node, DictConfig):
        return f"{offending}: unknown key {key!r}"
    return config.unknown_key(offending, key, [str(k) for k in node if not str(k).startswith("_") and k != "hydra"])


def exit_without_teardown() -> NoReturn:
    """End a script whose work is done. Python's teardown would then free torch's ~3,600 modules
    one by one (about 1 s on 2 cores, as long as a short run's training; make bench, item 9).
    What teardown does that matters runs first: threads joined (a checkpoint write, a tracker's),
    atexit handlers (DataLoader workers, logging), output flushed. Both are private CPython
    functions, so where one is missing this is the normal exit."""
    join_threads, run_atexit = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if join_threads is None or run_atexit is None:
        sys.exit(0)
    join_threads()
    run_atexit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
