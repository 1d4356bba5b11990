"""A run's state between steps: opening the run directory, building and restoring checkpoints."""

from __future__ import annotations

import functools
import math
import platform
import re
import warnings
import weakref
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import (
    FORMAT_VERSION,
    atomic_link,
    find_latest,
    load_checkpoint,
    load_file,
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
from engine.fingerprint import changes, run_fingerprint
from engine.metrics import read_history
from engine.outputs import write_atomic
from engine.runlock import lock_run_dir, unlock_run_dir
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
    fingerprint: dict | None = None  # data, batch and model the run trains (engine/fingerprint)

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
        run_dir, saver, resumed, _ = _open_locked(cfg, device)
        return run_dir, saver, _own_best(cfg, run_dir, resumed)
    opened: dict[str, Any] = {}

    def on_rank0() -> tuple[Path, str | None]:
        run_dir, opened["saver"], opened["resumed"], source = _open_locked(cfg, device)
        return run_dir, source

    run_dir, source = on_main(on_rank0)
    if is_main():
        return run_dir, MainOnly(opened["saver"]), _own_best(cfg, run_dir, opened["resumed"])
    resumed = _own_best(cfg, run_dir, with_history(load_on_rank(source, device), source)
                        if source else None)
    saver = Saver(run_dir, cfg.checkpoint.keep_last,
                  resumed.get("saved_files") if resumed else None)
    return run_dir, MainOnly(saver), resumed


def _own_best(cfg: DictConfig, run_dir: Path, resumed: dict | None) -> dict | None:
    """resume=PATH from another run's folder keeps the best value as an uninterrupted run would
    (exact resume; Lightning's ModelCheckpoint restores best_model_score the same way). The
    file of that best epoch is brought along once the run is accepted (accept_run)."""
    if resumed and str(cfg.resume) != "auto" and \
            Path(str(cfg.resume)).resolve().parent != run_dir.resolve():
        resumed["best_from"] = str(cfg.resume)
    return resumed


def _bring_best_along(run_dir: Path, resumed: dict | None) -> None:
    """The inherited best epoch's checkpoint becomes this folder's best.pt when it is at hand
    (the resumed file itself, or epoch_N.pt beside it), so `evaluate.py ckpt=NEW/best.pt`
    works even when no later epoch beats it; otherwise best.pt comes with the first better
    epoch, and the end of the run uses last.pt in its place (engine/finish.py)."""
    source = (resumed or {}).get("best_from")
    best_epoch = ((resumed or {}).get("best") or {}).get("epoch")
    if source is None or not isinstance(best_epoch, int) or (run_dir / "best.pt").exists():
        return
    source = Path(source)
    for candidate in (source, source.parent / f"epoch_{best_epoch:04d}.pt"):
        try:
            head = load_file(candidate, check=False)  # memory-mapped: only counters are read
        except UserError:
            continue
        if isinstance(head, dict) and head.get("epoch") == best_epoch and \
                not head.get("step_in_epoch"):
            atomic_link(candidate, run_dir / "best.pt")
            print(f"best.pt: {candidate} (the best epoch so far, {best_epoch})")
            return


def _open_locked(cfg: DictConfig, device: torch.device
                 ) -> tuple[Path, Saver, dict | None, str | None]:
    """_open_run_dir, releasing the run folder's lock again when the run is refused (an
    in-process caller may go on; a later `python train.py` must not find it held)."""
    try:
        return _open_run_dir(cfg, device)
    except BaseException:
        unlock_run_dir(run_dir_for(cfg.checkpoint.root, run_name_for(cfg)))
        raise


def _open_run_dir(cfg: DictConfig, device: torch.device
                  ) -> tuple[Path, Saver, dict | None, str | None]:
    run_dir = run_dir_for(cfg.checkpoint.root, run_name_for(cfg))
    if run_dir.is_dir():  # before reading or cleaning anything in it: one process at a time
        lock_run_dir(run_dir)
    existing = sorted(p.name for p in run_dir.glob("*.pt")) if run_dir.is_dir() else []
    resumed = source = None
    weights_mode = _weights_mode(cfg, run_dir, existing)
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
    lock_run_dir(run_dir)  # a new directory is locked once it exists (no-op if held)
    # config.yaml: accept_run, once the checkpoint is restored
    saver = _LockedSaver(run_dir, cfg.checkpoint.keep_last,
                         resumed.get("saved_files") if resumed and not weights_mode else None,
                         background=bool(cfg.checkpoint.get("async", False)))
    weakref.finalize(saver, unlock_run_dir, run_dir)  # also when train() ends another way
    return run_dir, saver, resumed, source


class _LockedSaver(Saver):
    """The run's Saver; closing it at the end of training also frees the run folder, so a
    train() called in-process (a notebook, a test) does not block a later `python train.py`."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            unlock_run_dir(self.run_dir)


def _weights_mode(cfg: DictConfig, run_dir: Path, existing: list[str]) -> bool:
    """resume_mode=weights starts a new schedule from a checkpoint's weights and optimizer:
    a new run, so it gets its own folder (its epoch_N.pt must not replace the old run's)."""
    mode = str(cfg.get("resume_mode", "exact"))
    if mode not in ("exact", "weights"):
        raise UserError(f"resume_mode={mode!r}: expected exact or weights")
    if mode == "exact":
        return False
    if cfg.resume is None or str(cfg.resume) == "auto":
        raise UserError("resume_mode=weights: name the checkpoint to start from with "
                        "resume=PATH (and a new run_name=)")
    if existing:
        raise UserError(f"resume_mode=weights starts a new run, but {run_dir} already has "
                        f"checkpoints; set run_name=NEW_NAME")
    return True


def accept_run(run_dir: Path, cfg: DictConfig, resumed: dict | None) -> None:
    """The run is accepted (its checkpoint restored): only now does the folder change.
    config.yaml is written atomically on rank 0 and records the values that run (optimizer
    overrides applied on resume included); a resume refused for weights or state that do not
    fit leaves the run folder as it was."""
    text = OmegaConf.to_yaml(cfg, resolve=True)

    def on_rank0() -> None:
        write_atomic(run_dir / "config.yaml", lambda out: out.write(text))
        _bring_best_along(run_dir, resumed)

    on_main(on_rank0)


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
        "fingerprint": progress.fingerprint,
    }
    if is_distributed():  # a collective: every rank builds the checkpoint, rank 0 saves it
        state["rank_states"] = rank_states({"rng_state": state["rng_state"],
                                            "epoch_step_losses": state["epoch_step_losses"]})
    return state


def restore_checkpoint(state: dict | None, model: torch.nn.Module, optimizer, scheduler,
                       scaler, cfg: DictConfig, data: Any) -> Progress:
    fingerprint = (run_fingerprint(data, model, int(cfg.data.batch_size) * world_size())
                   if data is not None else None)
    if state is None:
        return Progress(fingerprint=fingerprint)
    source = f"checkpoint (epoch {state.get('epoch')})"
    weights_mode = str(cfg.get("resume_mode", "exact")) == "weights"
    load_model_state(model, state["model_state_dict"], source)  # names the misfit keys
    _check_fingerprint(state, fingerprint, source, weights_mode)
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
    _check_optimizer_state(optimizer, source)
    applied = apply_optimizer_overrides(state, optimizer, scheduler, cfg)
    _check_schedule_length(state, fresh_schedule, cfg, source, ignore=applied)
    if not tutorial:
        _warn_config_changes(state.get("config") or {}, cfg, ignore=applied)
    rng, losses, step_in_epoch = resume_state_for_rank(state)  # this rank's share
    _check_step_in_epoch(step_in_epoch, data, source)
    _check_history_columns(state.get("history") or [], data, source)
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


def apply_optimizer_overrides(state: dict, optimizer, scheduler, cfg: DictConfig) -> set[str]:
    """After a restore, make the optimizer/scheduler run with the config's values where they
    differ from the checkpoint's (`resume=auto optimizer.lr=0.04`): loading a state would
    otherwise silently bring the old ones back. Returns the keys changed, printed in one line.

    The checkpoint's values come from its saved config; a tutorial file has none, so its
    optimizer's param_groups are compared instead. A changed lr rescales the scheduled lr
    (and the scheduler's base_lrs), so the schedule goes on from where it was."""
    saved = state.get("config") if isinstance(state.get("config"), dict) else None
    changes: list[str] = []
    group0 = optimizer.param_groups[0]
    saved_opt = (saved or {}).get("optimizer") or {}
    for key, value in (cfg.get("optimizer") or {}).items():
        key = str(key)
        if key.startswith("_") or key not in group0:
            continue
        before = saved_opt.get(key) if saved is not None else group0.get(
            "initial_lr", group0[key]) if key == "lr" else group0[key]
        if before is None or before == value:
            continue
        for group in optimizer.param_groups:
            if key == "lr":
                base = group.get("initial_lr", group["lr"])
                group["lr"] = group["lr"] * value / base if base else value
                if "initial_lr" in group:
                    group["initial_lr"] = value
            else:
                group[key] = value
        if key == "lr" and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [value for _ in optimizer.param_groups]
        changes.append(f"optimizer.{key} {before} -> {value}")
    saved_sched = (saved or {}).get("scheduler") or {}
    if scheduler is not None and state.get("scheduler_state_dict") is not None:
        for key, value in (cfg.get("scheduler") or {}).items():
            key = str(key)
            # T_max follows trainer.epochs, which the resume checks handle on their own.
            if key.startswith("_") or key == "T_max" or not hasattr(scheduler, key):
                continue
            before = saved_sched.get(key)
            if before is not None and before != value:
                setattr(scheduler, key, value)
                changes.append(f"scheduler.{key} {before} -> {value}")
    if changes and is_main():
        lr = f" (lr now {group0['lr']:.4g})" if scheduler is not None and any(
            c.startswith("optimizer.lr") for c in changes) else ""
        print(f"resume: applied config changes to the restored state: {', '.join(changes)}{lr}")
    return {c.split(" ", 1)[0] for c in changes}


def _check_optimizer_state(optimizer, source: str) -> None:
    """Per-parameter optimizer buffers (momentum, ...) must have their parameter's shape:
    load_state_dict does not check, and the first step would fail with a traceback."""
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():  # lr, momentum, ...: same kind
            value = group.get(key)
            plain = isinstance(default, bool) or default is None
            if not plain and isinstance(default, (int, float)) and not (
                    isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
                    and (not isinstance(value, torch.Tensor) or value.numel() == 1)
                    and math.isfinite(float(value))):
                raise UserError(f"{source}: optimizer param_groups {key}={_brief(value)}: "
                                f"expected a finite number")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise UserError(f"{source}: optimizer param_groups {key}={_brief(value)}: "
                                f"expected true or false")
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0
                        and value.shape != param.shape):
                    raise UserError(f"{source}: optimizer state {name!r} has shape "
                                    f"{list(value.shape)}, its parameter {list(param.shape)}; "
                                    f"the checkpoint does not fit this model")


def _check_history_columns(history: list, data: Any, source: str) -> None:
    """The saved rows go back into metrics.csv next to the rows this run appends, and into
    the loss plot: they must have the same columns (train.py's epoch-end row)."""
    task = getattr(data, "task", None)
    if not history or task is None:
        return
    columns = ["epoch", "step", "train_loss", "val_loss",
               *(["val_acc"] if task == "classification" else []), "lr"]
    if list(history[0]) != columns:
        raise UserError(f"{source}: history rows have columns {list(history[0])}; a "
                        f"{task} run writes {columns}")


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {list(value.shape)}>"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _check_step_in_epoch(step_in_epoch: int, data: Any, source: str) -> None:
    """Now the data is known: a saved mid-epoch position must lie inside an epoch."""
    if not step_in_epoch:
        return
    try:
        samples, batch = len(data.split("train")), int(data.batch_size)
    except (AttributeError, TypeError):  # not a DataModule (a test double): nothing to check
        return
    per_rank = math.ceil(samples / world_size())  # as engine.batches.Batches
    steps = math.ceil(per_rank / batch)
    if step_in_epoch > steps:  # == steps: saved on the epoch's last step, before validation
        raise UserError(f"{source}: step_in_epoch={step_in_epoch} but an epoch of this data "
                        f"has {steps} batches; the checkpoint does not fit data.*")


NEW_SCHEDULE = ("to continue deliberately from its weights and optimizer with a new schedule "
                "(epoch 0), add resume_mode=weights run_name=NEW_NAME resume=PATH_OF_CHECKPOINT")


def _check_fingerprint(state: dict, now: dict | None, source: str, weights_mode: bool) -> None:
    """Refuse an exact resume on other data, another global batch or another model.
    Checkpoints without a fingerprint (older ones, tutorial files) are not checked."""
    saved = state.get("fingerprint")
    if not isinstance(saved, dict) or now is None:
        return
    try:
        model, data = changes(saved, now)
    except (AttributeError, TypeError, KeyError, ValueError):  # a crafted or damaged file
        raise UserError(f"{source}: key 'fingerprint' is malformed (expected the model's "
                        f"parameter shapes and each split's size and hash)") from None
    if model:
        raise UserError(f"{source}: the model differs from the checkpoint's "
                        f"({'; '.join(model)}); check model=/data= overrides, or start a new "
                        f"run with run_name=NEW_NAME")
    if data and not weights_mode:
        raise UserError(f"{source}: {'; '.join(data)} since the checkpoint, so an exact "
                        f"resume is impossible; {NEW_SCHEDULE}")


# Scheduler entries that count progress; the others are settings (T_max, step_size, ...).
_SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step",
                      "_is_initial", "base_lrs", "verbose"}


def _check_schedule_length(state: dict, fresh: dict | None, cfg: DictConfig, source: str,
                           ignore: set[str] = frozenset()) -> None:
    """A changed trainer.epochs is fine unless the schedule was derived from it (cosine's
    T_max): the loaded scheduler would keep the old length while config.yaml says the new.
    Settings given explicitly on resume (`ignore`, e.g. scheduler.gamma) were applied."""
    before = ((state.get("config") or {}).get("trainer") or {}).get("epochs")
    saved = state.get("scheduler_state_dict")
    if fresh is None or not isinstance(saved, dict) or before in (None, cfg.trainer.epochs):
        return
    derived = {k: (saved[k], v) for k, v in fresh.items()
               if k not in _SCHEDULE_PROGRESS and k in saved and saved[k] != v
               and f"scheduler.{k}" not in ignore}
    if derived:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in derived.items())
        raise UserError(f"{source}: trainer.epochs changed {before} -> {cfg.trainer.epochs} "
                        f"and the schedule depends on it ({shown}); keep "
                        f"trainer.epochs={before} for an exact resume, or {NEW_SCHEDULE}")


_IGNORED_CHANGES = {"resume", "resume_mode", "trainer.epochs", "trainer.device", "debug",
                    "run_name", "trainer.max_time", "checkpoint.root", "weights", "strict",
                    "weights_key",
                    "trainer.model_summary"}  # issue 13: printing only, results unchanged


def _warn_config_changes(saved: dict, cfg: DictConfig, ignore: set[str] = frozenset()) -> None:
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    before = _flatten(saved)
    changed = sorted(k for k in now.keys() | before.keys()
                     if now.get(k) != before.get(k) and k not in _IGNORED_CHANGES
                     and k not in ignore and not k.endswith("T_max"))
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
