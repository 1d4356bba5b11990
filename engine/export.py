"""Deployment export: `model.safetensors` + `config.yaml` in a folder (like Hugging Face's
save_pretrained). safetensors holds only tensors, so loading it can never run code; the
config (data/model/loss sections, also stored in the safetensors metadata) says how to build
the model with `hydra.utils.instantiate`, with no class definition in the user's code.

    python -m engine.export checkpoints/digits_cnn/best.pt [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
KEPT = ("data", "model", "loss", "seed")


def is_export(path: Path) -> bool:
    """An export folder, or the model.safetensors file inside one."""
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    return path.is_dir() and (path / WEIGHTS).is_file()


def export(state_dict: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path) -> Path:
    """Write both files, each atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    keep = {k: config[k] for k in KEPT if k in config}
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(keep)})
    os.replace(tmp, out_dir / WEIGHTS)
    tmp = out_dir / f".{CONFIG}.tmp"
    tmp.write_text(yaml.safe_dump(keep, sort_keys=False))
    os.replace(tmp, out_dir / CONFIG)
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


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("error: usage: python -m engine.export CHECKPOINT [OUT_DIR]", file=sys.stderr)
        sys.exit(2)
    try:
        out = Path(sys.argv[2]) if len(sys.argv) == 3 else None
        print(f"exported to {export_checkpoint(Path(sys.argv[1]), out)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
