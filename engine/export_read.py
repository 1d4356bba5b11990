"""Reading a deployment export (engine.export writes them): an export folder
(`model.safetensors` + `config.yaml`) or a `model.pt2` program, checked before use.

safetensors holds only tensors, so loading it can never run code. `torch.export.load` is NOT
weights-only: it unpickles some records (`use_pickle` weights and constants, custom objects,
a `torch.load(weights_only=False)` fallback for sample inputs), may load AOTInductor shared
libraries, and hands shape expressions to `sympy.sympify`, which calls `eval`. So `load_pt2`
first checks the archive (only the records torch.export.save writes for a plain model, none
pickled, sample inputs weights-only, shape expressions from a small grammar) and afterwards
that the graph calls only torch operators.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import operator
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.checkpoint.limits import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, TooBig, expanded_size
from engine.config import check_loaded_targets
from engine.errors import UserError
from engine.fast_io import verify

WEIGHTS, CONFIG, PT2 = "model.safetensors", "config.yaml", "model.pt2"


def is_export(path: Path) -> bool:
    """An export folder, or the model.safetensors file inside one."""
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    return path.is_dir() and (path / WEIGHTS).is_file()


@contextlib.contextmanager
def quiet_torch():
    """torch.export logs and prints pages of tracing detail on failure: the one-line
    message says enough."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# Records torch.export.save writes for a plain model; anything else (AOTInductor libraries,
# legacy pickled files, custom objects) is refused before torch.export.load sees it.
_PT2_RECORDS = re.compile(
    r"[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt|extra/[\w.-]+"
    r"|data/weights/(weight_\d+|model_weights_config\.json)"
    r"|data/constants/(tensor_\d+|model_constants_config\.json))")
# sympy.sympify(expr_str) evals: only symbols, numbers, operators and shape functions pass.
_EXPR_TOKEN = re.compile(r"\s+|\d+(\.\d+)?([eE][-+]?\d+)?|'[a-z]+\d*'|[A-Za-z_]\w*|\*\*"
                         r"|[-+*/%(),<>=!&|~]")
_EXPR_NAMES = set(
    "Symbol Integer Rational Float positive integer real nonnegative True False oo Max Min "
    "Abs Eq Ne Lt Le Gt Ge And Or Not FloorDiv ModularIndexing Where PythonMod Mod CleanDiv "
    "CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv "
    "IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt "
    "RoundDecimal ToFloat Identity".split())


def _safe_expr(text: Any) -> bool:
    if not isinstance(text, str) or "__" in text:
        return False
    at = 0
    while at < len(text):
        token = _EXPR_TOKEN.match(text, at)
        if token is None:
            return False
        word = token.group(0)
        if (word[0].isalpha() or word[0] == "_") and word not in _EXPR_NAMES \
                and not re.fullmatch(r"[a-z]+\d+", word):
            return False
        at = token.end()
    return True


def _exprs(tree: Any) -> list[Any]:
    """Every string of the program JSON that the deserializer hands to sympy."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "expr_str":
                found.append(value)
            elif key == "range_constraints" and isinstance(value, dict):
                found.extend(value)
            found.extend(_exprs(value))
    elif isinstance(tree, list):
        for value in tree:
            found.extend(_exprs(value))
    return found


def check_pt2(path: Path) -> None:
    """Refuse a .pt2 that torch.export.load could run code from (see the module docstring)."""
    verify(path)  # CRC of every record; a damaged zip is one line
    bad = lambda why: UserError(f"{path}: refused .pt2: {why}")  # noqa: E731
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        odd = [n for n in names if not _PT2_RECORDS.fullmatch(n)]
        if odd or not any(n.endswith("/models/model.json") for n in names):
            raise bad(f"records other than a plain torch.export program ({odd[:3]})")
        for name in names:
            raw = archive.read(name)
            if name.endswith("_config.json"):
                entries = json.loads(raw).get("config", {})
                for fqn, meta in entries.items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                            ("weight_", "tensor_")):
                        raise bad(f"{fqn} is stored as a pickle")
            elif name.endswith("/models/model.json"):
                exprs = _exprs(json.loads(raw))
                unsafe = [e for e in exprs if not _safe_expr(e)]
                if unsafe:
                    raise bad(f"shape expression {str(unsafe[0])[:80]!r} is not a plain "
                              f"formula")
            elif name.endswith("/sample_inputs/model.pt"):
                try:  # torch retries a failed weights-only load with weights_only=False
                    torch.load(io.BytesIO(raw), weights_only=True)
                except Exception:
                    raise bad("its sample inputs are not weights-only") from None


def load_pt2(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(module, saved data/loss config) of a model.pt2, checked first: never runs its code."""
    try:
        check_pt2(path)
        extra = {"config.json": ""}
        with quiet_torch():
            program = torch.export.load(path, extra_files=extra)
        config = json.loads(extra["config.json"] or "{}")
    except UserError:
        raise
    except Exception as err:  # damaged JSON, a weights-only refusal, torch's own errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{path}: not a readable .pt2 export ({first})") from None
    for node in program.graph.nodes:  # only torch operators (and getitem) may be called
        target = node.target
        if node.op == "call_function" and not (
                isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
                or target is operator.getitem):
            raise UserError(f"{path}: refused .pt2: its graph calls {target!r}, not a torch "
                            f"operator")
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise UserError(f"{path}: .pt2 export has no data config (extra/config.json)")
    try:
        expanded_size(config, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH)
    except TooBig as err:
        raise UserError(f"{path}: refused: {err}") from None
    check_loaded_targets(config, path)
    return _Exported(program.module()), config


class _Exported(torch.nn.Module):
    """An exported program as a module whose .eval()/.train() do nothing: it was traced in
    eval mode, and torch's own module refuses to switch modes."""

    def __init__(self, program: torch.nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> _Exported:
        return self


def load_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) of an export folder, or a one-line UserError."""
    from safetensors.torch import load_file  # lazy: safetensors costs start-up time

    if path.is_file():
        path = path.parent
    config_path = path / CONFIG
    if not config_path.is_file():
        raise UserError(f"{path}: export folder has no {CONFIG}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{config_path}: not valid YAML ({first})") from None

    try:  # YAML aliases load as shared references: an alias bomb is small until walked
        expanded_size(config, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH)
    except TooBig as err:
        raise UserError(f"{config_path}: refused: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config.get("data"), dict):
        raise UserError(f"{config_path}: expected 'model' and 'data' sections")
    check_loaded_targets(config, config_path)
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError, ValueError, ... one line for each
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path / WEIGHTS}: not a readable safetensors file "
                        f"({first[:200]})") from None
    return config, state

