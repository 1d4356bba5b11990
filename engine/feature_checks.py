"""Value ranges of the optional trainer features (all off by default): one line per mistake.

Types are Hydra's job (engine/config_schema.py); these are the ranges no type says, kept
apart from engine/config.py so each stays a page."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.config_schema import METRICS
from engine.errors import UserError

# The largest count a config may give: beyond it a value still fits a Python int but not the
# C integers torch converts it to ("Overflow when unpacking long long" as a traceback).
MAX_COUNT = 2**31 - 1


def positive_int(value: Any, key: str, allow_none: bool = False,
                 maximum: int = MAX_COUNT) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}: expected an integer >= 1")
    if value > maximum:
        raise UserError(f"{key}={value}: expected at most {maximum}")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def check_trainer_features(cfg: DictConfig) -> None:
    """Adam's betas/eps, the warm-up schedule, scheduler.interval, clipping, accumulation,
    EMA, early stopping and the debug-run limits."""
    betas, eps = cfg.optimizer.get("betas"), cfg.optimizer.get("eps")
    if betas is not None and not (isinstance(betas, (ListConfig, list)) and len(betas) == 2
                                  and all(finite(b) and 0 <= b < 1 for b in betas)):
        shown = OmegaConf.to_container(betas) if isinstance(betas, ListConfig) else betas
        raise UserError(f"optimizer.betas={shown!r}: expected two numbers >= 0 and < 1, "
                        f"e.g. [0.9,0.999]")
    if eps is not None and not (finite(eps) and eps > 0):
        raise UserError(f"optimizer.eps={eps!r}: expected a number > 0, e.g. 1e-8")
    scheduler = cfg.get("scheduler") or {}
    if str(scheduler.get("interval", "epoch")) not in ("epoch", "step"):
        raise UserError(f"scheduler.interval={scheduler.interval!r}: expected epoch or step")
    warmup, floor = scheduler.get("warmup_epochs"), scheduler.get("min_lr")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int)
                               or warmup < 0):
        raise UserError(f"scheduler.warmup_epochs={warmup!r}: expected an integer >= 0")
    if warmup is not None and warmup > MAX_COUNT:
        raise UserError(f"scheduler.warmup_epochs={warmup}: expected at most {MAX_COUNT}")
    if floor is not None and not (finite(floor) and 0 <= floor <= cfg.optimizer.lr):
        raise UserError(f"scheduler.min_lr={floor!r}: expected a number >= 0 and <= "
                        f"optimizer.lr ({cfg.optimizer.lr})")
    trainer = cfg.trainer
    clip = trainer.get("grad_clip_norm")
    if clip is not None and not (finite(clip) and clip > 0):
        raise UserError(f"trainer.grad_clip_norm={clip!r}: expected a number > 0 or null (off)")
    positive_int(trainer.get("accumulate_grad_batches", 1), "trainer.accumulate_grad_batches")
    decay = trainer.get("ema_decay")
    if decay is not None and not (finite(decay) and 0 < decay < 1):
        raise UserError(f"trainer.ema_decay={decay!r}: expected a number > 0 and < 1 "
                        f"(e.g. 0.999), or null")
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches"):
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 1 <= value <= MAX_COUNT or isinstance(value, float)
                                      and 0 < value <= 1):
            raise UserError(f"trainer.{key}={value!r}: expected batches (an integer from 1 to "
                            f"{MAX_COUNT}), a fraction in (0, 1], or null")
    stopping = cfg.get("early_stopping") or {}
    positive_int(stopping.get("patience"), "early_stopping.patience", allow_none=True)
    if stopping.get("patience") is not None:
        known = sorted(set().union(*METRICS.values()))
        if str(stopping.get("monitor")) not in known:
            raise UserError(f"early_stopping.monitor={stopping.get('monitor')!r}: expected "
                            f"one of {known}")
        delta = stopping.get("min_delta", 0.0)
        if not (finite(delta) and delta >= 0):
            raise UserError(f"early_stopping.min_delta={delta!r}: expected a number >= 0")
