"""Deployment export: `model.safetensors` + `config.yaml` in a folder (like Hugging Face's
save_pretrained). safetensors holds only tensors, so loading it can never run code; the
config (data/model/loss sections, also stored in the safetensors metadata) says how to build
the model with `hydra.utils.instantiate`, with no class definition in the user's code.

    python -m engine.export checkpoints/digits_cnn/best.pt [OUT_DIR]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.errors import UserError, one_line, user_error_in
from engine.outputs import check_export_dir, write_atomic

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
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


def export_checkpoint(source: Path, out_dir: Path | None = None) -> Path:
    """A train.py checkpoint's weights and config as an export folder (default: the
    checkpoint's name without .pt, e.g. best.pt -> best/)."""
    from engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source)
    out_dir = out_dir if out_dir is not None else source.with_suffix("")
    return export(ckpt["model_state_dict"], ckpt.get("config") or {}, out_dir)


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

    parser = argparse.ArgumentParser(
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
