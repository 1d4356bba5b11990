"""What no config library checks: a `_target_` section (data, model, loss, optimizer,
scheduler) against the signature of the class or function it names, the kind of object it
names, and which targets a config read from a file may name at all. Also `build`, Hydra's
instantiate with its errors turned back into one line.

A new data module or model needs no schema of its own: its constructor's keyword parameters
and type hints are the schema.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.config_schema import describe
from engine.errors import UserError

# Modules a config read from a file (checkpoint, export) may name in `_target_`: hydra's
# instantiate calls whatever the string names, so a downloaded file could otherwise run
# os.system. Project data modules and models, and torch.nn modules (losses) only.
SAFE_TARGET_MODULES = ("data.", "models.", "torch.nn.", "torchvision.transforms.v2.")
# Keys of a `_target_` section that train.py reads itself (removed before instantiate).
TRAINER_KEYS = {"scheduler": ("interval",)}


def locate(path: str) -> Any:
    """The object a dotted `_target_` names, as hydra.utils.get_object finds it (without its
    error logging, which would print a second, multi-line message)."""
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
    """A torchvision.transforms.v2 transform class (what data.augment may name); read from
    the class's bases, so checking a config does not import torchvision."""
    return inspect.isclass(obj) and (obj.__module__ or "").startswith(
        "torchvision.transforms.v2") and any(
        base.__name__ == "Transform" and base.__module__.startswith("torchvision.transforms.v2")
        for base in obj.__mro__)


def is_data_module(obj: Any) -> bool:
    """A data module is a class with `setup()` and `split(name)` (data.base.DataModule and
    its subclasses; the engine needs nothing else from data/)."""
    return inspect.isclass(obj) and all(callable(getattr(obj, name, None))
                                        for name in ("setup", "split"))


def check_target_kind(section: DictConfig, key: str, source: str = "") -> None:
    """`data` must name a concrete data module, `model` an nn.Module class or a builder
    function (the abstract data.base.DataModule is neither)."""
    target = section.get("_target_")
    if target is None:
        return
    try:
        obj = locate(str(target))
    except Exception:  # check_target_section reports import errors
        return
    where = f"{source}: " if source else ""
    if key == "data":
        if not is_data_module(obj) or inspect.isabstract(obj):
            raise UserError(f"{where}data._target_={target}: expected a data module (a "
                            f"subclass of data.base.DataModule that implements setup())")
    elif key == "model":
        if inspect.isclass(obj) and not issubclass(obj, torch.nn.Module) or not callable(obj) \
                or is_data_module(obj):
            raise UserError(f"{where}model._target_={target}: expected a torch.nn.Module class "
                            f"or a function that builds one")


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
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{key}.{name}={shown}: expected {describe(hint)}")


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


def build(section: Any, key: str, source: Path | str | None = None) -> Any:
    """hydra.utils.instantiate, with anything the `_target_` raises as one line naming the key
    and target: a constructor's own UserError as it is, any other exception too (the config,
    typed or read from a file, chose what to call; debug=true shows the traceback). A
    `_partial_` target (optimizer, scheduler) is checked alike when it is called.

    `source`: the file `section` was read from. Then the node about to be instantiated is
    checked as a file's config (check_loaded_targets) and instantiated as the plain dict
    that was checked, so nothing the check did not see (an interpolation resolved against a
    parent node, a key added later) reaches instantiate."""
    if source is not None:
        plain = OmegaConf.to_container(section, resolve=False) \
            if isinstance(section, (DictConfig, ListConfig)) else section
        check_loaded_targets(plain, source, key)
        section = plain
    target = section.get("_target_") if hasattr(section, "get") else None
    try:
        built = instantiate(section)
    except Exception as err:
        _raise_build_error(err, key, target, source)
    if isinstance(built, functools.partial):
        return functools.partial(_call_built, built, key, target, source)
    if key == "model" and not isinstance(built, torch.nn.Module) or \
            key == "loss" and not callable(built):
        kind = "a torch.nn.Module" if key == "model" else "something callable (a loss module)"
        where = f"{source}: " if source else ""
        raise UserError(f"{where}{key}._target_={target}: built a {type(built).__name__}; "
                        f"expected {kind}")
    return built


def _call_built(built: functools.partial, key: str, target: Any, source: Any, *args: Any,
                **kwargs: Any) -> Any:
    try:
        return built(*args, **kwargs)
    except Exception as err:
        _raise_build_error(err, key, target, source)


def _raise_build_error(err: Exception, key: str, target: Any, source: Any) -> NoReturn:
    """The UserError behind `err` (Hydra wraps a constructor's in InstantiationException), or
    one naming the key, the target and the innermost exception (chained: debug=true shows
    where it came from)."""
    cause = err
    while not isinstance(cause, UserError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, UserError):
        raise cause from None
    first = str(cause).strip().splitlines()[0][:150] if str(cause).strip() else ""
    where = f"{source}: " if source else ""
    raise UserError(f"{where}could not build {key} from {key}._target_={target} "
                    f"({type(cause).__name__}{': ' + first if first else ''})") from err


# Hydra's special keys a file's config may hold besides `_target_`; `_partial_` is refused
# (a file describes objects to build, not factories to call later with other arguments).
FILE_CONVERT_MODES = ("none", "partial", "object", "all")


def plain_problem(value: Any, where: str = "") -> str | None:
    """What keeps `value` (read from a file) from being plain config data, or None.

    Plain means text keys, str/int/float/bool/None leaves, and no `${` anywhere: OmegaConf
    resolves an interpolation when the config is read or instantiated, so `${oc.create:...}`
    would build nodes (with a `_target_`) nobody checked and `${oc.env:...}` would read the
    environment. A checkpoint's config was stored resolved, so a real one never holds `${`.
    The value itself is never quoted: it comes from the file."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):
                return f"{where or 'top level'}: key {str(key)[:40]!r} is not text"
            name = f"{where}.{key}" if where else key
            if "${" in key:
                return f"{where or 'top level'}: a key holds an interpolation (${{...}})"
            problem = plain_problem(child, name)
            if problem:
                return problem
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            problem = plain_problem(child, f"{where}[{index}]")
            if problem:
                return problem
    elif isinstance(value, str):
        if "${" in value:
            return f"{where}: holds an interpolation (${{...}})"
    elif not (value is None or isinstance(value, (int, float, bool))):
        return f"{where}: a {type(value).__name__} is not a config value"
    return None


def check_loaded_targets(config: Any, source: Path | str, where: str = "config") -> None:
    """A config read from a file (checkpoint, export, .pt2) is plain data (plain_problem), its
    `_target_`s name only project data modules, project models (class or builder function)
    and torch.nn modules, and of Hydra's other special keys it uses only `_args_`,
    `_convert_` and `_recursive_`. One line naming the key, never the file's text."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    problem = plain_problem(config, where)
    if problem:
        raise UserError(f"{source}: refused {problem}: a file's config must be plain data "
                        f"(interpolations are resolved only in configs/ and on the command "
                        f"line)")
    _check_special_keys(config, source, where)


def _check_special_keys(config: Any, source: Path | str, where: str) -> None:
    if isinstance(config, dict):
        target = config.get("_target_")
        if "_target_" in config and not _safe_target(target):
            shown = repr(target)[:80] if isinstance(target, str) else type(target).__name__
            raise UserError(f"{source}: refused {where}._target_={shown}: a file's config "
                            f"may only name data.*, models.*, torch.nn or "
                            f"torchvision.transforms.v2 classes")
        if config.get("_partial_", False) is not False:
            raise UserError(f"{source}: refused {where}._partial_: a file's config builds "
                            f"objects, not partial functions")
        if "_convert_" in config and config["_convert_"] not in FILE_CONVERT_MODES:
            raise UserError(f"{source}: refused {where}._convert_: expected one of "
                            f"{', '.join(FILE_CONVERT_MODES)}")
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


def saved_sections(saved: Any, source: Path | str, need: tuple[str, ...] = ("data", "model")
                   ) -> DictConfig:
    """The data/model/loss/seed sections of a config read from a file (a checkpoint's, an
    export's, a .pt2's), checked as a file's config and against the signatures of what they
    name: what evaluate.py, predict.py and engine.export accept, the same for all three."""
    if not isinstance(saved, dict) or any(key not in saved for key in need):
        raise UserError(f"{source}: no usable saved config ({'/'.join(need)}); evaluate it "
                        f"with weights={source} model=... data=...")
    kept = {key: saved.get(key) for key in ("data", "model", "loss", "seed")}
    for key in need:
        if not isinstance(kept[key], dict) or not isinstance(kept[key].get("_target_"), str):
            raise UserError(f"{source}: saved config: {key} has no _target_ naming what to "
                            f"build")
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
        raise UserError(f"{source}: unusable config ({str(err).splitlines()[0][:200]})"
                        ) from None
    return config

