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
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint.load import (
    inference_weights,
    load_checkpoint,
    load_model_state,
    load_state_dict_file,
)
from engine.errors import UserError
from engine.export_read import is_export, load_export, load_pt2
from engine.runtime import resolve_device
from engine.target_checks import build, saved_sections


@dataclass
class Loaded:
    model: torch.nn.Module
    data: Any  # a data.base.DataModule
    config: DictConfig  # data/model/loss sections used
    source: Path
    device: torch.device
    trusted: set[str]  # sections from the command line; the others are the file's: checked

    def build(self, key: str) -> Any:
        return build(self.config[key], key, None if key in self.trusted else self.source)


def load_for_inference(cfg: DictConfig) -> Loaded:
    device = resolve_device(cfg.get("device", "auto"))
    ckpt, weights = cfg.get("ckpt"), cfg.get("weights")
    program, trusted = None, set()  # trusted: sections from the command line, not the file
    if bool(ckpt) == bool(weights):
        raise UserError("give exactly one of ckpt=PATH (a train.py checkpoint or export folder) "
                        "or weights=PATH (a bare state_dict, with model=... data=...)")
    if ckpt:
        source = Path(str(ckpt))
        if source.suffix == ".pt2" and source.is_file():  # a whole model: no model config
            program, saved = load_pt2(source)
            state = None
        elif is_export(source):
            saved, state = load_export(source)
        elif source.is_dir():
            raise UserError(f"ckpt={source}: a folder without {source / 'model.safetensors'}; "
                            f"expected a checkpoint file (.pt) or an export folder")
        else:
            checkpoint = load_checkpoint(source, "cpu")
            saved, state = checkpoint.get("config"), inference_weights(checkpoint)  # EMA
        # The file's config names the classes to build: only project/torch.nn ones.
        config = saved_sections(saved, source, ("data",) if program is not None
                                else ("data", "model"))  # .pt2: no model section
        # A command-line data choice wins (evaluate on another dataset or a moved root).
        if cfg.get("data") is not None:
            config.data = OmegaConf.to_container(cfg.data, resolve=True)
            trusted = {"data"}
    else:
        source = Path(str(weights))
        if cfg.get("model") is None or cfg.get("data") is None:
            raise UserError(f"weights={source}: name the architecture and data too, e.g. "
                            f"model=small_cnn data=digits")
        config = OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                                   "model": OmegaConf.to_container(cfg.model, resolve=True),
                                   "loss": OmegaConf.to_container(cfg.loss, resolve=True)
                                   if cfg.get("loss") is not None else None})
        state, trusted = None, {"data", "model", "loss"}
    if cfg.get("batch_size"):
        config.data.batch_size = int(cfg.batch_size)
    loaded = Loaded(None, None, config, source, device, trusted)
    loaded.data = loaded.build("data")
    if program is not None:
        loaded.model = program.to(device)  # exported in eval mode; .eval() is not supported
        return loaded
    if "weights" in config.model:  # never re-import pretrained weights over trained ones
        config.model.weights = None
    model = loaded.build("model")
    strict = bool(cfg.get("strict", True))
    if state is not None:
        load_model_state(model, state, source, strict=strict)
    else:
        load_state_dict_file(model, source, strict=strict, key=cfg.get("weights_key"))
    loaded.model = model.to(device).eval()
    return loaded


def loss_for(loaded: Loaded) -> torch.nn.Module:
    if loaded.config.get("loss") is not None:
        return loaded.build("loss")
    if loaded.data.task == "classification":
        return torch.nn.CrossEntropyLoss()
    return torch.nn.MSELoss()
