"""EMA of the weights (`trainer.ema_decay`), with torch's own AveragedModel.

A checkpoint keeps the raw weights in `model_state_dict` (what training continues from, so a
resume is exact) and the averaged ones in `ema_state_dict`, with the model's own key names.
Validation, best.pt selection, the end-of-run test, evaluate.py/predict.py and the export use
`engine.checkpoint.load.inference_weights`: the EMA weights whenever the file has them.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine.checkpoint.load import load_model_state
from engine.distributed import is_main

KEY = "ema_state_dict"


class EMA:
    """ema = decay * ema + (1 - decay) * weights after each optimizer step; the first update
    copies the weights. Buffers (BatchNorm statistics) are averaged the same way."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (what validation runs)."""
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str,
                        updates: int) -> None:
        """`updates`: optimizer steps so far (only whether it is 0 matters to the average)."""
        load_model_state(self.module, state, f"{source} {KEY}")
        self.averaged.n_averaged.fill_(updates)


def make_ema(cfg: DictConfig, model: torch.nn.Module, resumed: dict | None,
             global_step: int) -> EMA | None:
    """None when trainer.ema_decay is null; otherwise the average, restored from the resumed
    checkpoint when it has one (a resume_mode=weights run starts a new average)."""
    decay = cfg.trainer.get("ema_decay")
    if decay is None:
        return None
    ema = EMA(model, float(decay))
    if cfg.trainer.get("channels_last"):  # as the model train.py trains
        ema.module.to(memory_format=torch.channels_last)
    exact = str(cfg.get("resume_mode", "exact")) == "exact"
    if resumed is not None and exact:
        if isinstance(resumed.get(KEY), dict):
            ema.load_state_dict(resumed[KEY], f"checkpoint (epoch {resumed.get('epoch')})",
                                global_step)
        elif is_main():
            print("resume: the checkpoint has no EMA weights; the average starts from the "
                  "current weights")
    return ema
