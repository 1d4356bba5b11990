"""Checks on the composed config, run before any work starts: one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from engine.errors import UserError
from engine.runtime import PRECISIONS, resolve_device


def _positive_int(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}: expected an integer >= 1")


def validate_train(cfg: DictConfig) -> None:
    trainer, ckpt = cfg.trainer, cfg.checkpoint
    _positive_int(trainer.epochs, "trainer.epochs")
    _positive_int(ckpt.every_n_epochs, "checkpoint.every_n_epochs")
    _positive_int(ckpt.every_n_steps, "checkpoint.every_n_steps", allow_none=True)
    _positive_int(ckpt.keep_last, "checkpoint.keep_last")
    _positive_int(trainer.log_every_n_steps, "trainer.log_every_n_steps")
    _positive_int(cfg.data.get("batch_size"), "data.batch_size")
    if str(ckpt.mode) not in ("min", "max"):
        raise UserError(f"checkpoint.mode={ckpt.mode!r}: expected min or max")
    if str(trainer.precision) not in PRECISIONS:
        raise UserError(f"trainer.precision={trainer.precision!r}: expected one of "
                        f"{list(PRECISIONS)}")
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise UserError(f"optimizer.lr={lr!r}: expected a number > 0")
    if trainer.max_time is not None and not (isinstance(trainer.max_time, (int, float))
                                             and trainer.max_time > 0):
        raise UserError(f"trainer.max_time={trainer.max_time!r}: expected seconds > 0 or null")
    resolve_device(trainer.device)


def run_dir_for(root: str | Path, run_name: str) -> Path:
    """<root>/<run_name>, refusing names that would leave the checkpoint root."""
    name = str(run_name)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise UserError(f"run_name={name!r}: expected a relative name inside checkpoint.root "
                        f"(no '..', no absolute path)")
    root = Path(root)
    run_dir = root / name
    if not run_dir.resolve().is_relative_to(root.resolve()):
        raise UserError(f"run_name={name!r}: resolves outside checkpoint.root={root}")
    return run_dir
