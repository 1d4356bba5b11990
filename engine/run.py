"""A run's state between steps: opening the run directory, building and restoring checkpoints."""

from __future__ import annotations

import functools
import math
import platform
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import (
    FORMAT_VERSION,
    find_latest,
    load_checkpoint,
    load_model_state,
    remove_stale_tmp,
)
from engine.config import run_dir_for
from engine.distributed import (
    FollowerError,
    MainOnly,
    any_rank,
    is_distributed,
    is_main,
    load_on_rank,
    on_main,
    rank_states,
    resume_state_for_rank,
    world_size,
)
from engine.errors import UserError
from engine.metrics import read_history
from engine.runtime import rng_state, set_rng_state
from engine.saver import Saver


@dataclass
class Progress:
    """Everything about where training is that is not model/optimizer/scheduler state."""

    epoch: int = 0  # last fully completed epoch
    step_in_epoch: int = 0  # batches of epoch `epoch + 1` already trained
    global_step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # this epoch's per-step losses
    checked: int = 0  # losses[:checked] are known to be finite
    history: list[dict] = field(default_factory=list)  # one metrics row per epoch
    best_value: float | None = None
    best_epoch: int | None = None

    def epoch_train_loss(self, batch_sizes: torch.Tensor) -> float:
        """Sample-weighted mean of the epoch's step losses: one host sync per epoch."""
        losses = torch.stack(self.losses).float().cpu()
        return float((losses * batch_sizes[:len(losses)]).sum() / batch_sizes.sum())

    def end_epoch(self, row: dict, monitor: str, mode: str) -> bool:
        """Record the epoch's row; True when `monitor` improved (NaN never improves)."""
        self.history.append(row)
        self.epoch, self.step_in_epoch, self.losses, self.checked = row["epoch"], 0, [], 0
        if monitor not in row:
            raise UserError(f"checkpoint.monitor={monitor!r}: not a logged metric; "
                            f"expected one of {[k for k in row if k not in ('epoch', 'step')]}")
        value = float(row[monitor])
        better = (self.best_value is None or (value < self.best_value if mode == "min"
                                              else value > self.best_value))
        if math.isfinite(value) and better:
            self.best_value, self.best_epoch = value, row["epoch"]
            return True
        return False


def check_finite(progress: Progress) -> None:
    """Stop on a NaN/inf loss, naming the first bad step (losses are checked in bulk)."""
    fresh = progress.losses[progress.checked:]
    if not fresh:
        return
    finite = torch.isfinite(torch.stack(fresh))
    bad = not bool(finite.all())
    if any_rank(bad):  # under torchrun all ranks stop together, or the others would hang
        if not bad:
            raise FollowerError(f"non-finite loss on another rank by step "
                                f"{progress.global_step}")
        first = progress.checked + int((~finite).nonzero()[0, 0])
        step = progress.global_step - len(progress.losses) + first + 1
        raise UserError(f"non-finite loss at epoch {progress.epoch + 1}, step {step} "
                        f"(batch {first + 1} of the epoch); lower optimizer.lr or check the "
                        f"data; the last good checkpoint is kept")
    progress.checked = len(progress.losses)


def check_finite_weights(weights: dict[str, torch.Tensor], progress: Progress) -> None:
    """Never write a NaN/inf model: a finite loss can still be followed by an update that
    overflows the weights. One host sync per save."""
    floats = [t for t in weights.values() if t.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        bad = [k for k, t in weights.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        epoch = progress.epoch + 1 if progress.step_in_epoch else progress.epoch
        raise UserError(f"non-finite weights {_short_list(bad)} at epoch {epoch}, step "
                        f"{progress.global_step}: not saved; lower optimizer.lr; the last good "
                        f"checkpoint is kept")


def _short_list(items: list[str], limit: int = 3) -> str:
    return "[" + ", ".join(items[:limit]) + (" ..." if len(items) > limit else "") + "]"


def run_name_for(cfg: DictConfig) -> str:
    """`run_name` (default: `name`), plus the job's overrides in a multirun so each job of a
    sweep gets its own folder."""
    base = str(cfg.run_name or cfg.name)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job = re.sub(r"[^\w.,=+-]", "_", hydra_cfg.job.override_dirname) or str(
                hydra_cfg.job.num)
            return f"{base}/{job}"
    except ValueError:  # not running under @hydra.main (tests compose configs directly)
        pass
    return base


def open_run(cfg: DictConfig, device: torch.device) -> tuple[Path, Saver, dict | None]:
    """Find (or refuse) the run directory and the checkpoint to resume from.

    Under torchrun rank 0 alone checks and writes the directory; every rank gets its
    result or its error, then reads the checkpoint rank 0 chose. The returned Saver writes
    on rank 0 only, and every rank waits for each save to finish."""
    if not is_distributed():
        run_dir, saver, resumed, _ = _open_run_dir(cfg, device)
        return run_dir, saver, resumed
    opened: dict[str, Any] = {}

    def on_rank0() -> tuple[Path, str | None]:
        run_dir, opened["saver"], opened["resumed"], source = _open_run_dir(cfg, device)
        return run_dir, source

    run_dir, source = on_main(on_rank0)
    if is_main():
        return run_dir, MainOnly(opened["saver"]), opened["resumed"]
    resumed = with_history(load_on_rank(source, device), source) if source else None
    saver = Saver(run_dir, cfg.checkpoint.keep_last,
                  resumed.get("saved_files") if resumed else None)
    return run_dir, MainOnly(saver), resumed


def _open_run_dir(cfg: DictConfig, device: torch.device
                  ) -> tuple[Path, Saver, dict | None, str | None]:
    run_dir = run_dir_for(cfg.checkpoint.root, run_name_for(cfg))
    existing = sorted(p.name for p in run_dir.glob("*.pt")) if run_dir.is_dir() else []
    resumed = source = None
    if cfg.resume is None:
        if existing:
            raise UserError(f"{run_dir} already has checkpoints ({', '.join(existing[:4])}"
                            f"{' ...' if len(existing) > 4 else ''}); continue it with "
                            f"resume=auto or start another with run_name=NEW_NAME")
    elif str(cfg.resume) == "auto":
        if run_dir.is_dir():
            remove_stale_tmp(run_dir)
        found = find_latest(run_dir, device)
        if found is None:
            print(f"resume=auto: no checkpoint in {run_dir}, starting a new run")
        else:
            print(f"resuming from {found[0]}")
            source, resumed = str(found[0]), found[1]
    else:
        path = Path(str(cfg.resume))
        source, resumed = str(path), load_checkpoint(path, device)
        inside = path.resolve().parent == run_dir.resolve()
        if existing and not inside:
            raise UserError(f"resume={path}: {run_dir} already has checkpoints of another "
                            f"run; set run_name=NEW_NAME to continue {path} there")
    if resumed is not None:
        resumed = with_history(resumed, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    saver = Saver(run_dir, cfg.checkpoint.keep_last,
                  resumed.get("saved_files") if resumed else None,
                  background=bool(cfg.checkpoint.get("async", False)))
    return run_dir, saver, resumed, source


def with_history(state: dict, source: str | None) -> dict:
    """A checkpoint's metrics rows, read from the metrics.csv beside it (checkpoints of this
    format do not carry them; older ones and other programs' files keep what they have)."""
    if "history" in state or "format_version" not in state or source is None:
        return state
    csv_path = Path(source).parent / "metrics.csv"
    history = read_history(csv_path, int(state["epoch"]))
    if len(history) < int(state["epoch"]) and is_main():
        print(f"note: {csv_path} has rows for {len(history)} of the checkpoint's "
              f"{state['epoch']} epochs; metrics.csv and loss_curve.png start from those")
    return {**state, "history": history}


def pin_memory_for(data: Any, device: torch.device) -> bool:
    pin = getattr(data, "pin_memory", False)
    return device.type == "cuda" if pin == "auto" else bool(pin)


def build_checkpoint(cfg: DictConfig, model: torch.nn.Module, optimizer, scheduler, scaler,
                     progress: Progress, config: dict | None = None) -> dict[str, Any]:
    """The tutorial's general-checkpoint keys plus everything exact resume needs, all plain.

    No metrics history: metrics.csv is the history (see engine.metrics.read_history), so a
    save costs the same at epoch 10 and at epoch 10,000. `config`: the resolved config as
    containers, computed once by the caller (resolving it costs more than a small model's
    epoch)."""
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    weights = model.state_dict()
    check_finite_weights(weights, progress)
    state = {
        "epoch": progress.epoch,
        "model_state_dict": weights,
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": float(progress.losses[-1]) if progress.losses else (
            progress.history[-1]["train_loss"] if progress.history else None),
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state_dict": scaler.state_dict() if scaler.is_enabled() else None,
        "global_step": progress.global_step,
        "step_in_epoch": progress.step_in_epoch,
        "epoch_step_losses": (torch.stack(progress.losses).cpu() if progress.losses
                              else torch.zeros(0)),
        "rng_state": rng_state(),  # rank 0's; every rank's in rank_states under torchrun
        "best": {"monitor": str(cfg.checkpoint.monitor), "value": progress.best_value,
                 "epoch": progress.best_epoch},
        "config": config if config is not None else OmegaConf.to_container(cfg, resolve=True),
        "versions": dict(_versions()),
        "format_version": FORMAT_VERSION,
        "world_size": world_size(),
    }
    if is_distributed():  # a collective: every rank builds the checkpoint, rank 0 saves it
        state["rank_states"] = rank_states({"rng_state": state["rng_state"],
                                            "epoch_step_losses": state["epoch_step_losses"]})
    return state


def restore_checkpoint(state: dict | None, model: torch.nn.Module, optimizer, scheduler,
                       scaler, cfg: DictConfig, data: Any) -> Progress:
    if state is None:
        return Progress()
    source = f"checkpoint (epoch {state.get('epoch')})"
    load_model_state(model, state["model_state_dict"], source)
    try:
        optimizer.load_state_dict(state["optimizer_state_dict"])
        if scheduler is not None and state.get("scheduler_state_dict") is not None:
            scheduler.load_state_dict(state["scheduler_state_dict"])
        if scaler.is_enabled() and state.get("scaler_state_dict") is not None:
            scaler.load_state_dict(state["scaler_state_dict"])
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{source}: optimizer/scheduler state does not fit this config "
                        f"({err}); check optimizer=/scheduler= overrides") from None
    _warn_config_changes(state.get("config") or {}, cfg)
    rng, losses, step_in_epoch = resume_state_for_rank(state)  # this rank's share
    if rng is not None:
        set_rng_state(rng)
    best = state.get("best") or {}
    return Progress(
        epoch=int(state["epoch"]), step_in_epoch=step_in_epoch,
        global_step=int(state.get("global_step", 0)),
        losses=list(losses.unbind()) if losses is not None and len(losses) else [],
        history=list(state.get("history") or []), best_value=best.get("value"),
        best_epoch=best.get("epoch"))


_IGNORED_CHANGES = {"resume", "trainer.epochs", "trainer.device", "debug", "run_name",
                    "trainer.max_time", "checkpoint.root"}


def _warn_config_changes(saved: dict, cfg: DictConfig) -> None:
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    before = _flatten(saved)
    changed = sorted(k for k in now.keys() | before.keys()
                     if now.get(k) != before.get(k) and k not in _IGNORED_CHANGES
                     and not k.endswith("T_max"))
    if changed:
        warnings.warn(f"resuming with a config that differs from the checkpoint's in "
                      f"{changed[:8]}: the result will not match an uninterrupted run",
                      stacklevel=3)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


@functools.cache
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("torchvision", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
