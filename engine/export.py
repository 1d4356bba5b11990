"""Deployment export: `model.safetensors` + `config.yaml` in a folder (like Hugging Face's
save_pretrained). safetensors holds only tensors, so loading it can never run code.

    python -m engine.export checkpoints/digits_cnn/best.pt [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file()


def export(state_dict: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    keep = {k: config[k] for k in ("data", "model", "loss", "seed") if k in config}
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(yaml.safe_dump(keep, sort_keys=False))
    return out_dir


def load_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path / CONFIG
    if not config_path.is_file():
        raise UserError(f"{path}: export folder has no {CONFIG}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{config_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise UserError(f"{config_path}: expected 'model' and 'data' sections")
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path / WEIGHTS}: not a readable safetensors file ({err})") from None
    return config, state


if __name__ == "__main__":
    from engine.checkpoint import load_checkpoint

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m engine.export CHECKPOINT [OUT_DIR]")
    try:
        source = Path(sys.argv[1])
        out = Path(sys.argv[2]) if len(sys.argv) == 3 else source.with_suffix("")
        ckpt = load_checkpoint(source)
        print(f"exported to {export(ckpt['model_state_dict'], ckpt.get('config') or {}, out)}")
    except UserError as err:
        sys.exit(f"error: {err}")
