"""Learning-rate schedules (per epoch or per optimizer step) and gradient-accumulation windows.

`scheduler.interval` is read here, not passed to the scheduler: `epoch` steps the schedule once
per epoch (train.py, after validation); `step` once per optimizer step. Schedule lengths stay
in epochs either way (T_max, step_size, warmup_epochs, epochs): with `step` they are converted
to optimizer steps, so switching the interval makes the curve smooth, not shorter.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from engine.config import build

# Keys of the shipped schedulers counted in epochs: scaled by steps per epoch for interval=step.
EPOCH_KEYS = ("T_max", "step_size", "warmup_epochs", "epochs")


class WarmupCosine:
    """lr factor at schedule step t: linear warm-up to 1 over `warmup` steps (step t < warmup
    uses (t+1)/(warmup+1)), then cosine from 1 down to min_lr/base_lr at step `total`.

    A callable object rather than a function so LambdaLR saves its settings in the checkpoint
    (a resume with another trainer.epochs is then refused, as for cosine's T_max)."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (t - self.warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_epochs: int = 5,
                  min_lr: float = 0.0, epochs: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_epochs`, then cosine decay to `min_lr` at `epochs`
    (torch's LambdaLR; with interval=step both counts are in optimizer steps)."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_epochs, epochs, min_lr / base if base else 0.0))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, batches: int
                    ) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """(scheduler or None, True when it steps per optimizer step). `batches`: training
    batches per epoch on this rank; an epoch has ceil(batches / accumulate) optimizer steps."""
    section = cfg.get("scheduler")
    if not section:
        return None, False
    section = OmegaConf.create(OmegaConf.to_container(section, resolve=True))
    with open_dict(section):
        per_step = section.pop("interval", "epoch") == "step"
        if per_step:
            steps = math.ceil(batches / int(cfg.trainer.get("accumulate_grad_batches", 1)))
            for key in EPOCH_KEYS:
                if isinstance(section.get(key), int):
                    section[key] = section[key] * steps
    return build(section, "scheduler")(optimizer), per_step


def window_length(batch: int, batches: int, size: int) -> int:
    """Batches in the accumulation window holding `batch` (1-based) of an epoch of `batches`:
    `size`, or fewer for the epoch's last window when `size` does not divide the epoch."""
    return min(size, batches - (batch - 1) // size * size)
