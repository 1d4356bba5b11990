"""Rebuild a trained model and its data module for evaluate.py and predict.py.

Sources, in order of preference:
  ckpt=PATH     a train.py checkpoint: the config inside it says how to build everything;
  ckpt=DIR      an export (model.safetensors + config.yaml) made by `export.py`-style code;
  weights=PATH  a bare state_dict (tutorial `torch.save(model.state_dict(), ...)`), with the
                model/data chosen on the command line (model=small_cnn data=digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import load_checkpoint, load_model_state, load_state_dict_file
from engine.errors import UserError
from engine.runtime import resolve_device


@dataclass
class Loaded:
    model: torch.nn.Module
    data: Any  # a data.base.DataModule
    config: DictConfig  # data/model/loss sections used
    source: Path
    device: torch.device


def _build(section: Any, what: str, source: Path):
    try:
        return instantiate(section)
    except UserError:
        raise
    except Exception as err:  # instantiate wraps constructor errors; keep the message
        cause = err.__cause__ or err
        if isinstance(cause, UserError):
            raise cause from None
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        raise UserError(f"{source}: could not build {what} from its config ({first})") from None


def load_for_inference(cfg: DictConfig) -> Loaded:
    device = resolve_device(cfg.get("device", "auto"))
    ckpt, weights = cfg.get("ckpt"), cfg.get("weights")
    if bool(ckpt) == bool(weights):
        raise UserError("give exactly one of ckpt=PATH (a train.py checkpoint or export folder) "
                        "or weights=PATH (a bare state_dict, with model=... data=...)")
    if ckpt:
        source = Path(str(ckpt))
        from engine.export import is_export, load_export

        if is_export(source):
            saved, state = load_export(source)
        else:
            checkpoint = load_checkpoint(source, "cpu")
            saved, state = checkpoint.get("config"), checkpoint["model_state_dict"]
            if not isinstance(saved, dict) or "model" not in saved or "data" not in saved:
                raise UserError(f"{source}: checkpoint has no usable 'config' (model/data); "
                                f"evaluate it with weights={source} model=... data=...")
        config = OmegaConf.create({k: saved.get(k) for k in ("data", "model", "loss", "seed")})
        # A command-line data choice wins (evaluate on another dataset or a moved root).
        if cfg.get("data") is not None:
            config.data = cfg.data
    else:
        source = Path(str(weights))
        if cfg.get("model") is None or cfg.get("data") is None:
            raise UserError(f"weights={source}: name the architecture and data too, e.g. "
                            f"model=small_cnn data=digits")
        config = OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                                   "model": OmegaConf.to_container(cfg.model, resolve=True),
                                   "loss": OmegaConf.to_container(cfg.loss, resolve=True)
                                   if cfg.get("loss") is not None else None})
        state = None
    if cfg.get("batch_size"):
        config.data.batch_size = int(cfg.batch_size)
    if "weights" in config.model:  # never re-import pretrained weights over trained ones
        config.model.weights = None
    data = _build(config.data, "the data module", source)
    model = _build(config.model, "the model", source)
    strict = bool(cfg.get("strict", True))
    if state is not None:
        load_model_state(model, state, source, strict=strict)
    else:
        load_state_dict_file(model, source, strict=strict)
    model.to(device).eval()
    return Loaded(model=model, data=data, config=config, source=source, device=device)


def loss_for(loaded: Loaded) -> torch.nn.Module:
    if loaded.config.get("loss") is not None:
        return _build(loaded.config.loss, "the loss", loaded.source)
    if loaded.data.task == "classification":
        return torch.nn.CrossEntropyLoss()
    return torch.nn.MSELoss()
