"""A checkpoint's state: where training is (`Progress`), building the dict that is saved
(`build_checkpoint`) and putting a loaded one back (`restore_checkpoint`), each rank's share
included. The keys are listed in engine/checkpoint/__init__.py."""

from __future__ import annotations

import functools
import math
import platform
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import FORMAT_VERSION
from engine.checkpoint.compat import (
    apply_optimizer_overrides,
    check_fingerprint,
    check_history_columns,
    check_optimizer_state,
    check_schedule_length,
    check_step_in_epoch,
    warn_config_changes,
)
from engine.checkpoint.load import load_model_state
from engine.distributed import (
    FollowerError,
    any_rank,
    gather_to_main,
    is_distributed,
    is_main,
    rank,
    world_size,
)
from engine.errors import UserError
from engine.fingerprint import run_fingerprint
from engine.runtime import rng_state, set_rng_state


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
    fingerprint: dict | None = None  # data, batch and model the run trains (engine/fingerprint)
    accumulate: int = 1  # batches per optimizer step (trainer.accumulate_grad_batches; not saved)

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
        k = progress.accumulate  # windows of k batches from the epoch's start
        step = progress.global_step - -(-len(progress.losses) // k) + first // k + 1
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


def build_checkpoint(config: dict | DictConfig, model: torch.nn.Module, optimizer, scheduler,
                     scaler, progress: Progress) -> dict[str, Any]:
    """The tutorial's general-checkpoint keys plus everything exact resume needs, all plain.

    No metrics history: metrics.csv is the history (see engine.metrics.read_history), so a
    save costs the same at epoch 10 and at epoch 10,000. `config`: the run's config, best
    resolved to containers once by the caller (resolving it costs more than a small model's
    epoch); a DictConfig is resolved here."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)
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
        "best": {"monitor": str(config["checkpoint"]["monitor"]), "value": progress.best_value,
                 "epoch": progress.best_epoch},
        "config": config,
        "versions": dict(_versions()),
        "format_version": FORMAT_VERSION,
        "world_size": world_size(),
        "fingerprint": progress.fingerprint,
    }
    if is_distributed():  # a collective: every rank builds the checkpoint, rank 0 saves it
        state["rank_states"] = rank_states({"rng_state": state["rng_state"],
                                            "epoch_step_losses": state["epoch_step_losses"]})
    return state


def restore_checkpoint(state: dict | None, model: torch.nn.Module, optimizer, scheduler,
                       scaler, cfg: DictConfig, data: Any) -> Progress:
    """Put a loaded checkpoint back into model, optimizer, scheduler, scaler and the RNGs,
    after checking that it may resume this config (engine.checkpoint.compat); the Progress
    to go on from. `state=None`: a new run."""
    fingerprint = (run_fingerprint(data, model, int(cfg.data.batch_size) * world_size())
                   if data is not None else None)
    if state is None:
        return Progress(fingerprint=fingerprint)
    source = f"checkpoint (epoch {state.get('epoch')})"
    weights_mode = str(cfg.get("resume_mode", "exact")) == "weights"
    load_model_state(model, state["model_state_dict"], source)  # names the misfit keys
    check_fingerprint(state, fingerprint, source, weights_mode)
    # A tutorial's general checkpoint (no format_version): its `epoch` is the 0-based index of
    # the last finished loop (`for epoch in range(N)`; the tutorials resume at epoch + 1).
    tutorial = "format_version" not in state
    epoch = state.get("epoch", -1 if tutorial else 0)
    if not isinstance(epoch, int) or epoch < (-1 if tutorial else 0):
        raise UserError(f"{source}: key 'epoch' should be an integer >= 0, got {epoch!r}")
    epoch = epoch + 1 if tutorial else epoch
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict() if scheduler is not None else None
    try:
        if "optimizer_state_dict" in state or not tutorial:
            optimizer.load_state_dict(state["optimizer_state_dict"])
        if weights_mode:  # a new schedule: the optimizer's buffers, the config's settings
            for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
                group.update(fresh)
            return Progress(fingerprint=fingerprint)
        if scheduler is not None and state.get("scheduler_state_dict") is not None:
            scheduler.load_state_dict(state["scheduler_state_dict"])
        if scaler.is_enabled() and state.get("scaler_state_dict") is not None:
            scaler.load_state_dict(state["scaler_state_dict"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise UserError(f"{source}: optimizer/scheduler state does not fit this config "
                        f"({err}); check optimizer=/scheduler= overrides") from None
    lacking = [k for k in optimizer.defaults if k not in optimizer.param_groups[0]]
    if lacking:  # e.g. an Adam state loaded into SGD: its first step would fail
        raise UserError(f"{source}: optimizer state is not {type(optimizer).__name__}'s (no "
                        f"{lacking[:4]} in its param_groups); check optimizer=")
    if tutorial:
        fresh = [k for k in ("optimizer_state_dict", "global_step", "rng_state", "history",
                             "best", "config") if k not in state]
        if scheduler is not None and state.get("scheduler_state_dict") is None:
            fresh.append("scheduler_state_dict")
        if is_main():
            print(f"resume: a general checkpoint (no format_version): its epoch "
                  f"{state.get('epoch', 'key (absent)')} is read as the tutorials' 0-based "
                  f"loop index, so {epoch} epoch(s) are done and training goes on at epoch "
                  f"{epoch + 1}")
            print(f"resume: not in the file, started fresh: {', '.join(fresh) or 'nothing'}")
    check_optimizer_state(optimizer, source)
    applied = apply_optimizer_overrides(state, optimizer, scheduler, cfg)
    check_schedule_length(state, fresh_schedule, cfg, source, ignore=applied)
    if not tutorial:
        warn_config_changes(state.get("config") or {}, cfg, ignore=applied)
    rng, losses, step_in_epoch = resume_state_for_rank(state)  # this rank's share
    check_step_in_epoch(step_in_epoch, data, source)
    check_history_columns(state.get("history") or [], data, source)
    if rng is not None:
        try:  # load_checkpoint checked shapes and ranges; a generator may still refuse it
            set_rng_state(rng)
        except (ValueError, TypeError, RuntimeError, OverflowError) as err:
            raise UserError(f"{source}: rng_state cannot be restored "
                            f"({str(err).strip().splitlines()[0][:160]})") from None
    best = state.get("best") or {}
    return Progress(
        epoch=epoch, step_in_epoch=step_in_epoch,
        global_step=int(state.get("global_step", 0)),
        losses=list(losses.unbind()) if losses is not None and len(losses) else [],
        history=list(state.get("history") or []), best_value=best.get("value"),
        best_epoch=best.get("epoch"), fingerprint=fingerprint)


def rank_states(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Each rank's resume state (RNG, this epoch's step losses), gathered on rank 0."""
    if not is_distributed():
        return None
    return gather_to_main(state)


def resume_state_for_rank(checkpoint: dict[str, Any]) -> tuple[dict | None, Any, int]:
    """(RNG state, epoch step losses, step in epoch) this rank resumes from.

    Same world size: each rank its own saved share, so the run continues bit for bit.
    Another world size (a single-process checkpoint under torchrun, or back): rank 0 takes
    the saved RNG state, the others keep their fresh seeds; a half-done epoch restarts
    from its first batch, because the per-rank slices of its order have changed."""
    saved_world = int(checkpoint.get("world_size", 1))
    step = int(checkpoint.get("step_in_epoch", 0))
    shares = checkpoint.get("rank_states")
    if saved_world == world_size():
        if shares and len(shares) == saved_world:
            mine = shares[rank()]
            return mine["rng_state"], mine["epoch_step_losses"], step
        return checkpoint.get("rng_state"), checkpoint.get("epoch_step_losses"), step
    if is_main():
        warnings.warn(f"the checkpoint was written by {saved_world} process(es), this run has "
                      f"{world_size()}: each process now sees other samples, so the result "
                      f"will not match an uninterrupted run"
                      + (f"; epoch {int(checkpoint['epoch']) + 1} restarts from its first "
                         f"batch" if step else ""), stacklevel=3)
    rng = checkpoint.get("rng_state") if is_main() else None
    if step:
        return rng, None, 0
    return rng, checkpoint.get("epoch_step_losses"), step


@functools.cache
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("torchvision", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
