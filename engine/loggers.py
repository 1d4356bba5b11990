"""Experiment tracking (configs/logger/): metrics.csv always, TensorBoard and MLflow when
chosen (`logger=[csv,tensorboard,mlflow]`). One class per tracker behind one small interface
(`Logger`); `Loggers` hands each call to all of them, so train.py calls it in four places.
Only rank 0 tracks under torchrun (the other ranks get an empty `Loggers`).

A resumed run continues the same tracker run, no step twice, none missing, also after a
kill -9 past the last checkpoint: metrics.csv is rewritten from the checkpoint's history,
TensorBoard purges what came after the checkpoint (`purge_step`), MLflow reopens the run whose
id the checkpoint holds (`loggers` key) and drops the values logged after its epoch
(engine/mlflow_logger.py)."""

from __future__ import annotations

import importlib.util
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine.distributed import on_main
from engine.errors import UserError
from engine.metrics import append_csv, confusion_figure, loss_figure, write_csv
from engine.mlflow_logger import MLflowLogger

KNOWN = {"csv": (), "tensorboard": ("flush_secs",),
         "mlflow": ("tracking_uri", "experiment_name", "artifacts")}


class Logger:
    """What every tracker may do; the defaults do nothing."""

    wants_steps = False  # log_step is called (one host sync every trainer.log_every_n_steps)

    def log_step(self, step: int, loss: float) -> None:
        """The training loss of optimizer step `step`."""

    def log_epoch(self, row: dict) -> None:
        """One epoch's metrics row (epoch, step, train_loss, val_loss, [val_acc,] lr), logged
        before the epoch's checkpoint is written."""

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool) -> None:
        """The end of a complete run: figures, test metrics, artifacts. `again`: resume=auto
        of a run that was already complete (log only what may be missing)."""

    def close(self, status: str) -> None:
        """Flush and release; status FINISHED, or KILLED when the run stops before its end."""

    def state_dict(self) -> dict[str, str]:
        """What a resumed run needs to continue this tracker's run (kept in the checkpoint)."""
        return {}


class CSVLogger(Logger):
    """<run>/metrics.csv: rewritten from the checkpoint's history at start (exactly the epochs
    the model has seen), one appended row per epoch (resume reads it back)."""

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        self.path = run_dir / "metrics.csv"
        write_csv(self.path, history)

    def log_epoch(self, row: dict) -> None:
        append_csv(self.path, row)


class TensorBoardLogger(Logger):
    """Event files in <run>/tensorboard/, x axis the global step: train_loss_step every
    trainer.log_every_n_steps, the epoch rows at the epoch's last step, the config as text,
    the loss curve and test metrics at the end.

    Resume at global step G: the new writer's `purge_step` hides every event at a step >= it
    that the killed process wrote. An epoch-end checkpoint holds everything up to step G
    (purge from G + 1); a mid-epoch one holds the losses up to G but not the epoch's row,
    which a killed run may have logged at G itself (a checkpoint on the epoch's last batch):
    purge from G and log step G's loss again from the checkpoint."""

    wants_steps = True

    def __init__(self, run_dir: Path, config: dict, progress: Any, flush_secs: int,
                 log_every: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: ~1 s

        log_dir = run_dir / "tensorboard"
        _check_writable(log_dir)
        old = sorted(log_dir.glob("events.out.tfevents.*"))
        step, mid_epoch = progress.global_step, progress.step_in_epoch > 0
        purge = (step if mid_epoch else step + 1) if step else None
        if old and purge is not None:
            _sort_after(old[-1])
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=flush_secs)
        if mid_epoch and progress.losses and step % log_every == 0:
            self.log_step(step, float(progress.losses[-1]))
        if not old:  # a new run (or the first with tensorboard): config, earlier epochs
            text = OmegaConf.to_yaml(config).replace("\n", "\n    ")
            self.writer.add_text("config", "    " + text, step)
            for row in progress.history:
                self.log_epoch(row)
        self.writer.flush()

    def log_step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train_loss_step", loss, step)

    def log_epoch(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()  # a kill -9 loses at most the steps of one epoch

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool) -> None:
        if again or not history:  # logged by the run that completed it
            return
        step = history[-1]["step"]
        for key, value in metrics.items():
            if key.startswith("test_"):
                self.writer.add_scalar(key, value, step)
        self.writer.add_figure("loss_curve", loss_figure(history), step)  # closes the figure
        if metrics.get("confusion_matrix"):  # a classifier: best.pt on the test split
            matrix = torch.tensor(metrics["confusion_matrix"])
            self.writer.add_figure("test_confusion_matrix", confusion_figure(matrix), step)

    def close(self, status: str) -> None:
        self.writer.close()


def _check_writable(log_dir: Path) -> None:
    """The event file is written by the writer's thread, which would print its own traceback
    for a folder it cannot write: a plain file or a read-only folder is refused here."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=log_dir).close()
    except OSError as err:
        what = "not a folder" if log_dir.exists() and not log_dir.is_dir() else err.strerror
        raise UserError(f"{log_dir}: {what}; logger=tensorboard expected a folder it can "
                        f"write its event files to") from None


def _sort_after(newest: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and the name starts with the
    creation time in whole seconds (then host and pid): the resumed run's file must sort after
    the killed run's for its purge to apply to them. A killed run of this very second is
    waited out (at most 2 s); a name from the future (a clock set back, a copied file) is not:
    said in one line."""
    stamp = newest.name.split(".")[3]  # events.out.tfevents.STAMP.host.pid...
    ahead = int(stamp) + 1 - time.time() if stamp.isdigit() else 0
    if f"{int(time.time()):010d}" > stamp:
        return
    if 0 < ahead <= 2:
        time.sleep(ahead)
    else:
        print(f"warning: {newest}: its name (a time from the future?) sorts after this "
              f"run's new event file; TensorBoard reads it last, so it may show the steps "
              f"after the checkpoint twice")


class Loggers:
    """Every chosen tracker (metrics.csv first); each call goes to all of them."""

    def __init__(self, loggers: list[Logger], carried: dict[str, str] | None = None) -> None:
        self.loggers, self.carried = loggers, dict(carried or {})
        self.wants_steps = any(logger.wants_steps for logger in loggers)
        self._closer = weakref.finalize(self, _close_all, list(loggers), "KILLED")

    def log_step(self, step: int, loss: torch.Tensor) -> None:
        if self.wants_steps:  # the host sync only when a tracker takes the value
            value = float(loss)
            for logger in self.loggers:
                if logger.wants_steps:
                    logger.log_step(step, value)

    def log_epoch(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log_epoch(row)

    def finish(self, run_dir: Path, history: list[dict], metrics: dict,
               again: bool = False) -> None:
        """The end of the run: each tracker's end-of-run output, then all are closed."""
        for logger in self.loggers:
            logger.finish(run_dir, history, metrics, again)
        self.close("FINISHED")

    def close(self, status: str = "KILLED") -> None:
        self._closer.detach()
        _close_all(self.loggers, status)

    def state_dict(self) -> dict[str, str]:
        """The `loggers` checkpoint key; a resumed checkpoint's entries are kept even when
        their tracker is not chosen this time (choosing it again continues its run)."""
        state = dict(self.carried)
        for logger in self.loggers:
            state.update(logger.state_dict())
        return state


def _close_all(loggers: list[Logger], status: str) -> None:
    for logger in loggers:
        logger.close(status)


def open_loggers(cfg: DictConfig, run_dir: Path, resumed: dict | None, progress: Any
                 ) -> Loggers:
    """The trackers `logger=` chose (metrics.csv always), opened to continue `resumed`'s run.
    Rank 0 only (on_main: one that cannot start stops every rank); no trackers but metrics.csv
    under trainer.fast_dev_run (nothing is kept)."""
    carried = (resumed or {}).get("loggers") or {} if _same_run(cfg, run_dir) else {}
    opened: list[Logger] = []
    on_main(_open_trackers, cfg, run_dir, progress, carried, opened)
    return Loggers(opened, carried)


def _open_trackers(cfg: DictConfig, run_dir: Path, progress: Any, carried: dict[str, str],
                   opened: list[Logger]) -> None:
    """Into `opened`: first the trackers that may refuse to start (a store, server or folder
    they cannot use), then metrics.csv (rewritten only once they did); a failure closes again
    those already open."""
    chosen = check_logger_config(cfg.get("logger"))
    try:
        if not cfg.trainer.fast_dev_run:
            _open_chosen(cfg, chosen, run_dir, progress, carried, opened)
        opened.insert(0, CSVLogger(run_dir, progress.history))
    except BaseException:
        _close_all(opened, "FAILED")
        opened.clear()
        raise


def _open_chosen(cfg: DictConfig, chosen: dict[str, dict], run_dir: Path, progress: Any,
                 carried: dict[str, str], opened: list[Logger]) -> None:
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if "tensorboard" in chosen:
        opened.append(TensorBoardLogger(run_dir, config, progress,
                                        int(chosen["tensorboard"].get("flush_secs", 30)),
                                        int(cfg.trainer.log_every_n_steps)))
    if "mlflow" in chosen:
        settings = chosen["mlflow"]
        root = Path(str(cfg.checkpoint.root))
        opened.append(MLflowLogger(
            tracking_uri=str(settings.get("tracking_uri") or f"sqlite:///{root}/mlflow.db"),
            experiment=str(settings.get("experiment_name") or cfg.run_name or cfg.name),
            run_name=_relative(run_dir, root), config=config, progress=progress,
            run_id=carried.get("mlflow_run_id"), artifacts=bool(settings.get("artifacts", True))))


def _same_run(cfg: DictConfig, run_dir: Path) -> bool:
    """Does this resume continue the checkpoint's own run? A checkpoint of another folder
    (resume=PATH with a new run_name: a branch) or resume_mode=weights starts new tracker runs
    (the history so far copied in): continuing the old one would delete its later epochs."""
    if str(cfg.get("resume_mode", "exact")) != "exact" or cfg.resume is None:
        return False
    return str(cfg.resume) == "auto" or \
        Path(str(cfg.resume)).resolve().parent == run_dir.resolve()


def check_logger_config(section: Any) -> dict[str, dict]:
    """`logger`: a mapping of tracker name to its settings, names and keys from KNOWN."""
    if section is None:
        return {}
    section = OmegaConf.to_container(section, resolve=True) if isinstance(
        section, DictConfig) else section
    if not isinstance(section, dict):
        raise UserError(f"logger={section!r}: expected a mapping; choose trackers with "
                        f"logger=[csv,tensorboard,mlflow]")
    for name, settings in section.items():
        if name not in KNOWN:
            raise UserError(f"logger.{name}: unknown tracker; expected csv, tensorboard or "
                            f"mlflow (logger=[csv,tensorboard])")
        extra = [k for k in settings or {} if k not in KNOWN[name]] if isinstance(
            settings or {}, dict) else ["(expected a mapping)"]
        if extra:
            raise UserError(f"logger.{name}.{extra[0] if extra else ''}: unknown key; valid "
                            f"keys: {', '.join(KNOWN[name]) or 'none'}")
    flush = (section.get("tensorboard") or {}).get("flush_secs", 30)
    if not isinstance(flush, int) or isinstance(flush, bool) or flush < 1:
        raise UserError(f"logger.tensorboard.flush_secs={flush!r}: expected whole seconds >= 1")
    if "mlflow" in section and importlib.util.find_spec("mlflow") is None:
        raise UserError("logger=mlflow: mlflow is not installed; pip install -e '.[mlflow]'")
    return {name: settings or {} for name, settings in section.items()}


def _relative(run_dir: Path, root: Path) -> str:
    try:
        return str(run_dir.resolve().relative_to(root.resolve()))
    except ValueError:
        return run_dir.name
