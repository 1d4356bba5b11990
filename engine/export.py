"""Deployment export: `model.safetensors` + `config.yaml` in a folder (like Hugging Face's
save_pretrained). safetensors holds only tensors, so loading it can never run code; the
config (data/model/loss sections, also stored in the safetensors metadata) says how to build
the model with `hydra.utils.instantiate`, with no class definition in the user's code.

    python -m engine.export checkpoints/digits_cnn/best.pt [OUT_DIR]

With `checkpoint.export_pt2=true`, train.py also writes `model.pt2`: a `torch.export` program,
the whole model without its Python class (the safe stand-in for `torch.save(model, PATH)`),
with the data config inside; predict.py/evaluate.py take `ckpt=.../model.pt2` alone.
`torch.export.load` is NOT weights-only: it unpickles some records (`use_pickle` weights and
constants, custom objects, a `torch.load(weights_only=False)` fallback for sample inputs),
may load AOTInductor shared libraries, and hands shape expressions to `sympy.sympify`, which
calls `eval`. So `load_pt2` first checks the archive (only the records torch.export.save
writes for a plain model, none pickled, sample inputs weights-only, shape expressions from a
small grammar) and afterwards that the graph calls only torch operators.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import operator
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.errors import UserError, one_line, user_error_in
from engine.outputs import check_export_dir, write_atomic

WEIGHTS, CONFIG, PT2 = "model.safetensors", "config.yaml", "model.pt2"
KEPT = ("data", "model", "loss", "seed")


def is_export(path: Path) -> bool:
    """An export folder, or the model.safetensors file inside one."""
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    return path.is_dir() and (path / WEIGHTS).is_file()


def export(state_dict: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path) -> Path:
    """Write both files, each atomically (temporary file + rename), never into a run folder's
    own files; a read-only or full disk is one line naming the file."""
    from safetensors.torch import save_file

    check_export_dir(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    keep = {k: config[k] for k in KEPT if k in config}
    tmp = out_dir / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(keep)})
        os.replace(tmp, out_dir / WEIGHTS)
    except Exception as err:  # an OSError, or safetensors' own error wrapping one
        io = re.search(r"I/O error: (.*?)(?: \(os error \d+\)|$)", str(err))
        if not isinstance(err, OSError) and io is None:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) else io.group(1)
        raise UserError(f"{out_dir / WEIGHTS}: cannot write ({reason})") from None
    write_atomic(out_dir / CONFIG, lambda out: out.write(yaml.safe_dump(keep, sort_keys=False)))
    return out_dir


def export_checkpoint(source: Path, out_dir: Path | None = None,
                      model: torch.nn.Module | None = None,
                      example: torch.Tensor | None = None) -> Path:
    """A train.py checkpoint's weights and config as an export folder (default: the
    checkpoint's name without .pt, e.g. best.pt -> best/). With `model` (its architecture)
    and `example` (a batch of inputs), also `model.pt2` there."""
    from engine.checkpoint import load_checkpoint
    from engine.ema import inference_weights

    ckpt = load_checkpoint(source)
    weights = inference_weights(ckpt)  # the EMA weights when the run kept them
    out_dir = out_dir if out_dir is not None else source.with_suffix("")
    export(weights, ckpt.get("config") or {}, out_dir)
    if model is not None and example is not None:
        model.load_state_dict(weights)
        export_pt2(model, example, ckpt.get("config") or {}, out_dir / PT2)
    return out_dir


def export_pt2(model: torch.nn.Module, example: torch.Tensor, config: dict[str, Any],
               path: Path) -> Path | None:
    """`torch.export` `model` (any batch size) to `path`, with the data/loss config inside.
    A model torch.export cannot trace (data-dependent control flow, ...) gets a one-line
    warning and no file: the safetensors export beside it still serves."""
    keep = {k: config[k] for k in ("data", "loss", "seed") if k in config}
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch wants a .pt2 name
    try:
        model = model.cpu().eval()
        batch = torch.export.Dim("batch")
        with _quiet_torch():
            program = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp, extra_files={"config.json": json.dumps(keep)})
        os.replace(tmp, path)
        return path
    except Exception as err:  # any tracing failure: the export is optional
        tmp.unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"warning: {path}: torch.export failed, no .pt2 written ({type(err).__name__}: "
              f"{first}); the safetensors export is kept", file=sys.stderr)
        return None


@contextlib.contextmanager
def _quiet_torch():
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
    from engine.checkpoint import verify

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
        with _quiet_torch():
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
    from safetensors.torch import load_file

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
    from engine.checkpoint import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, _TooBig, expanded_size

    try:  # YAML aliases load as shared references: an alias bomb is small until walked
        expanded_size(config, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH)
    except _TooBig as err:
        raise UserError(f"{config_path}: refused: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config.get("data"), dict):
        raise UserError(f"{config_path}: expected 'model' and 'data' sections")
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError, ValueError, ... one line for each
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path / WEIGHTS}: not a readable safetensors file "
                        f"({first[:200]})") from None
    return config, state


def _parse_args(argv: list[str] | None = None):
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message: str):  # the project's one-line errors, not usage + error
            self.exit(2, f"error: {message}; usage: python -m engine.export CHECKPOINT "
                         f"[OUT_DIR] (--help for more)\n")

    parser = OneLineParser(
        prog="python -m engine.export",
        description="Export a train.py checkpoint's model for deployment: a folder with\n"
                    "model.safetensors (tensors only: loading it runs no code) and config.yaml\n"
                    "(the data/model/loss sections that rebuild the model). evaluate.py and\n"
                    "predict.py take the folder as ckpt=.",
        epilog="examples:\n"
               "  python -m engine.export checkpoints/digits_cnn/best.pt\n"
               "  python -m engine.export checkpoints/digits_cnn/epoch_0010.pt exports/digits\n"
               "  python predict.py ckpt=exports/digits input=my_digits/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a train.py checkpoint file (.pt)")
    parser.add_argument("out_dir", type=Path, nargs="?", default=None,
                        help="export folder (default: the checkpoint's path without .pt, "
                             "e.g. best.pt -> best/)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args()  # --help prints usage and exits 0; a wrong argument count exits 2
    try:
        print(f"exported to {export_checkpoint(args.checkpoint, args.out_dir)}")
    except Exception as err:  # bad input or a disk's refusal: one line, exit 2
        user = user_error_in(err)
        if user is None:
            raise
        print(f"error: {one_line(user)}", file=sys.stderr)
        sys.exit(2)
