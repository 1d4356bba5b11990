"""May this checkpoint resume under this config? The checks restore_checkpoint runs once the
state is loaded: same model, data and global batch (fingerprint), a schedule whose length
still fits, optimizer state that fits the optimizer, a mid-epoch position inside an epoch;
and the config changes given on resume (optimizer.lr=...) applied to the restored state."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.batches import batches_per_epoch
from engine.distributed import is_main, world_size
from engine.errors import UserError
from engine.fingerprint import changes


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
        if isinstance(value, ListConfig):  # Adam's betas: a plain list in the checkpoint
            value = OmegaConf.to_container(value)
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


def check_optimizer_state(optimizer, source: str) -> None:
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


def check_history_columns(history: list, data: Any, source: str) -> None:
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


def check_step_in_epoch(step_in_epoch: int, data: Any, source: str) -> None:
    """Now the data is known: a saved mid-epoch position must lie inside an epoch."""
    if not step_in_epoch:
        return
    try:
        samples, batch = len(data.split("train")), int(data.batch_size)
    except (AttributeError, TypeError):  # not a DataModule (a test double): nothing to check
        return
    steps = batches_per_epoch(samples, batch, world_size())
    if step_in_epoch > steps:  # == steps: saved on the epoch's last step, before validation
        raise UserError(f"{source}: step_in_epoch={step_in_epoch} but an epoch of this data "
                        f"has {steps} batches; the checkpoint does not fit data.*")


NEW_SCHEDULE = ("to continue deliberately from its weights and optimizer with a new schedule "
                "(epoch 0), add resume_mode=weights run_name=NEW_NAME resume=PATH_OF_CHECKPOINT")


def check_fingerprint(state: dict, now: dict | None, source: str, weights_mode: bool) -> None:
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


def check_schedule_length(state: dict, fresh: dict | None, cfg: DictConfig, source: str,
                           ignore: set[str] = frozenset()) -> None:
    """A changed trainer.epochs is fine unless the schedule was derived from it (cosine's
    T_max): the loaded scheduler would keep the old length while config.yaml says the new.
    Settings given explicitly on resume (`ignore`, e.g. scheduler.gamma) were applied."""
    saved = state.get("scheduler_state_dict")
    # scheduler.interval: a saved schedule counts epochs or optimizer steps, not either
    was = (((state.get("config") or {}).get("scheduler") or {}).get("interval")) or "epoch"
    now = str((cfg.get("scheduler") or {}).get("interval", "epoch"))
    if fresh is not None and isinstance(saved, dict) and isinstance(was, str) and was != now:
        raise UserError(f"{source}: scheduler.interval changed {was} -> {now}: the saved "
                        f"schedule counts {was}s; keep scheduler.interval={was} for an exact "
                        f"resume, or {NEW_SCHEDULE}")
    before = ((state.get("config") or {}).get("trainer") or {}).get("epochs")
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


# Keys that change what is printed, logged or where, not the weights: no warning on resume.
_IGNORED_CHANGES = {"resume", "resume_mode", "trainer.epochs", "trainer.device", "debug",
                    "run_name", "trainer.max_time", "checkpoint.root", "weights", "strict",
                    "weights_key", "trainer.model_summary", "trainer.print_every_s",
                    "trainer.log_every_n_steps"}
_IGNORED_SECTIONS = ("logger.",)  # trackers: what is recorded, not what is trained


def warn_config_changes(saved: dict, cfg: DictConfig, ignore: set[str] = frozenset()) -> None:
    now = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    before = _flatten(saved)
    changed = sorted(k for k in now.keys() | before.keys()
                     if now.get(k) != before.get(k) and k not in _IGNORED_CHANGES
                     and k not in ignore and not k.endswith("T_max")
                     and not k.startswith(_IGNORED_SECTIONS))
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
