"""Early stopping (`early_stopping.patience`): end the run once the monitored metric has not
improved by more than `min_delta` for `patience` epochs in a row (Lightning's EarlyStopping
rule). Its counter travels in the checkpoint (`early_stopping`), so a resumed run stops at the
same epoch as an uninterrupted one, and `resume=auto` of a stopped run finds it complete
(unless early_stopping.patience was raised)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from engine.distributed import is_main

KEY = "early_stopping"


class EarlyStopping:
    def __init__(self, patience: int, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        self.patience, self.monitor, self.mode = patience, monitor, mode
        self.min_delta = abs(min_delta)
        self.best: float | None = None
        self.wait = 0  # epochs since the last improvement

    @property
    def stopped(self) -> bool:
        return self.wait >= self.patience

    def update(self, row: dict[str, Any]) -> bool:
        """Record an epoch's metrics row; True when the run should stop now."""
        value = float(row[self.monitor])
        if self.best is None:
            better = math.isfinite(value)
        elif self.mode == "min":
            better = value < self.best - self.min_delta
        else:
            better = value > self.best + self.min_delta
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.stopped

    @property
    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.4g}"
        return (f"early stopping: {self.monitor} has not improved by more than "
                f"{self.min_delta:g} for {self.wait} epochs (patience {self.patience}, best "
                f"{best})")

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") != self.monitor:  # another metric: its counter does not apply
            if is_main():
                print(f"resume: early stopping now monitors {self.monitor} (the checkpoint's "
                      f"counter is for {state.get('monitor')}); its count starts again")
            return
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


def make_early_stopping(cfg: DictConfig, resumed: dict | None) -> EarlyStopping | None:
    """None when early_stopping.patience is null; otherwise the rule, restored from the
    resumed checkpoint (a resume_mode=weights run starts counting afresh)."""
    section = cfg.get("early_stopping") or {}
    if section.get("patience") is None:
        return None
    stopper = EarlyStopping(int(section.patience), str(section.monitor),
                            str(cfg.checkpoint.mode), float(section.get("min_delta", 0.0)))
    exact = str(cfg.get("resume_mode", "exact")) == "exact"
    if resumed is not None and exact and isinstance(resumed.get(KEY), dict):
        stopper.load_state_dict(resumed[KEY])
    return stopper
