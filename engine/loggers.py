"""Experiment tracking (configs/logger/): metrics.csv always, TensorBoard and MLflow when chosen;
rank 0 only. Trackers get a value once a checkpoint holds it (`Loggers.hand_over`), and a
checkpoint records what its hand-over sends (`loggers` key): a resume sends it again, so each
value reaches a tracker once, whenever the process was killed, in the same tracker run."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from omegaconf import DictConfig, OmegaConf

from engine.distributed import on_main
from engine.errors import UserError, first_line
from engine.metrics import append_csv, confusion_figure, loss_figure, write_csv

KNOWN = {"csv": (), "tensorboard": ("flush_secs",), "mlflow": ("tracking_uri", "experiment_name", "artifacts")}
PARAM_LENGTH = 6000  # MLflow's limit (log_batch splits long lists itself)
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
FOLDER_TAG = "run_folder"  # MLflow tag: finds a run whose process died before any value


class TensorBoardLogger:
    """Event files in <run>/tensorboard/ (x axis: global step), made at the first send. A resumed
    writer purges the steps from `start` on (default: after `step`), the first of its checkpoint's
    hand-over, which the resume sends again whether or not it ran before the process ended."""

    def __init__(
        self, run_dir: Path, config: dict, history: list[dict], step: int, flush_secs: int, start: int | None = None
    ) -> None:
        self.dir, self.writer = run_dir / "tensorboard", None
        try:  # refused here in one line: the writer's thread would print a traceback
            self.dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.dir).close()
        except OSError as err:
            what = "not a folder" if self.dir.exists() and not self.dir.is_dir() else err.strerror
            raise UserError(f"{self.dir}: {what}; logger=tensorboard expected a folder it can write to") from None
        self.new = not any(self.dir.glob("events.out.tfevents.*"))
        self.config, self.history, self.start, self.flush = config, list(history), start or step + 1, flush_secs

    def send(self, entries: list[dict]) -> None:
        """Epoch rows and {step, train_loss_step} entries, each at its global step."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: ~1 s

            purge = None if self.new else self.start
            # TensorBoard reads files in name order (creation second, host, pid): the resend must
            # come after the killed process's file, even one made this second
            if f"{int(time.time()):010d}" in {p.name.split(".")[3] for p in self.dir.glob("events.out.tfevents.*")}:
                time.sleep(1 - time.time() % 1)
            self.writer = SummaryWriter(str(self.dir), flush_secs=self.flush, purge_step=purge)
            if self.new:  # a new run (or the first with tensorboard): config, earlier epochs
                text = OmegaConf.to_yaml(self.config).replace("\n", "\n    ")
                self.writer.add_text("config", "    " + text, self.start - 1)
                entries = [row for row in self.history if row["step"] < self.start] + entries
        for entry in entries:
            for key, value in entry.items():
                if key != "step":
                    self.writer.add_scalar(key, value, entry["step"])
        self.writer.flush()

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool) -> None:
        """Test metrics and figures at the last step; again: only when a resend purged them."""
        if not history or (again and self.writer is None):
            return
        step = history[-1]["step"]
        self.send([{"step": step, **{k: v for k, v in metrics.items() if k.startswith("test_")}}])
        self.writer.add_figure("loss_curve", loss_figure(history), step)  # closes the figure
        if metrics.get("confusion_matrix"):  # a classifier: best.pt on the test split
            matrix = torch.tensor(metrics["confusion_matrix"])
            self.writer.add_figure("test_confusion_matrix", confusion_figure(matrix), step)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowLogger:
    """One MLflow run per training run, opened at start so that its id is in the first checkpoint.
    A resume reopens it and logs the epochs it lacks; MLflow cannot delete, so one holding later
    epochs (a resume from an earlier checkpoint) is left as it is and a new run starts."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str,
        config: dict,
        history: list[dict],
        run_id: str | None,
        artifacts: bool,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient  # installed: check_logger_config

        logging.getLogger("alembic").setLevel(logging.WARNING)  # table creation chatter
        logging.getLogger("mlflow.store.db").setLevel(logging.CRITICAL)  # tracebacks of what it raises
        self.artifacts, self.failed = artifacts, False
        self.db = Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None
        try:
            # Two runs creating a new SQLite store's tables at once clash: a flock on <db>.lock takes turns.
            if self.db is not None:
                self.db.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.db}.lock", "a") if self.db else nullcontext() as lock:
                if lock and os.name != "nt":  # Windows: no flock; up to the user
                    import fcntl

                    fcntl.flock(lock, fcntl.LOCK_EX)  # closing the file releases it
                self.client = MlflowClient(tracking_uri)
            # MLflow retries a missing server for 4 minutes: the start-up probe tries once (5 s).
            with patch.dict(os.environ, {k: v for k, v in QUICK.items() if k not in os.environ}):
                self.client.search_experiments(max_results=1)
            epoch = history[-1]["epoch"] if history else 0
            run = self._open_run(run_id, epoch, experiment, run_name, str(run_dir.resolve()))
            self.run_id, params, self.logged = run.info.run_id, run.data.params, self._logged(run)
            self.client.update_run(self.run_id, status="RUNNING")
            # Params cannot change within a run: a resume keeps them and names those changed.
            flat = {k: str(v)[:PARAM_LENGTH] for k, v in _flatten(config).items()}
            changed = [k for k, v in flat.items() if params.get(k, v) != v]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items() if k not in params])
            self._log(history)
        except Exception as err:  # noqa: BLE001 - a store or server MLflow cannot use
            expected = "an MLflow SQLite file (sqlite:///PATH/mlflow.db) or a reachable server (http://HOST:PORT)"
            raise UserError(f"logger.mlflow.tracking_uri={tracking_uri}: {_reason(err)}; expected {expected}") from None
        print(f"mlflow: run {self.run_id} in experiment {experiment!r} at {tracking_uri}")
        if changed:
            more = " ..." if len(changed) > 6 else ""
            print(f"mlflow: params keep their first values; changed on resume: {', '.join(changed[:6])}{more}")

    def _logged(self, run: Any) -> dict[str, set[int]]:
        """Metric key -> the epochs `run` holds a value at."""
        return {key: {m.step for m in self.client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}

    def _open_run(self, run_id: str | None, epoch: int, experiment: str, run_name: str, folder: str) -> Any:
        """The checkpoint's run, else this folder's run that never got a value (killed before), else new."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                why = "is not in this store (or deleted)"
            elif any(step > epoch for steps in self._logged(run).values() for step in steps):
                why = f"holds epochs after this checkpoint's epoch {epoch}"
            else:
                return run
            print(f"mlflow: run {run_id} of the checkpoint {why}; starting a new MLflow run with the history so far")
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        # A SQLite store keeps the artifacts beside it, not in ./mlruns of the working folder.
        where = self.db and (self.db.parent / "mlartifacts" / experiment.replace("/", "_")).resolve().as_uri()
        try:
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, where)
        except MlflowException:  # another job of a sweep created it just now
            experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        for run in self.client.search_runs([experiment_id], "attributes.status != 'FINISHED'", max_results=1000):
            if run.data.tags.get(FOLDER_TAG) == folder and not run.data.metrics:
                return run
        return self.client.create_run(experiment_id, run_name=run_name, tags={FOLDER_TAG: folder})

    def _log(self, rows: list[dict]) -> None:
        """Each row's values at its epoch but those the run holds (a resend, a resumed run's history)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(row["epoch"]))
            for row in rows
            for key, value in row.items()
            if key not in ("epoch", "step") and row["epoch"] not in self.logged.get(key, ())
        ]
        self.client.log_batch(self.run_id, metrics=metrics)
        for metric in metrics:
            self.logged.setdefault(metric.key, set()).add(metric.step)

    def send(self, entries: list[dict]) -> None:
        """The epoch rows among `entries` (not the step losses)."""
        self._guarded(lambda: self._log([entry for entry in entries if "epoch" in entry]))

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool) -> None:
        """Test metrics at the last epoch, best.pt and export/ as artifacts (again: they are replaced)."""

        def finish() -> None:
            tests = {k: v for k, v in metrics.items() if k.startswith("test_")}
            self._log([{"epoch": history[-1]["epoch"] if history else 0, **tests}])
            best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
            if self.artifacts and best.is_file():
                self.client.log_artifact(self.run_id, str(best.resolve()))
            if self.artifacts and (run_dir / "export").is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / "export"), "export")

        self._guarded(finish)

    def close(self, status: str) -> None:
        self._guarded(lambda: self.client.set_terminated(self.run_id, status))

    def _guarded(self, action: Callable[[], Any]) -> None:
        """A server gone or a disk full mid-run stops the tracking, not the training."""
        if self.failed:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001
            self.failed = True
            why = f"{_reason(err)}; training goes on without MLflow (resume=auto fills in the missing epochs)"
            print(f"warning: mlflow: {why}", flush=True)


def _reason(err: BaseException) -> str:
    """The innermost OS or database error under MLflow's, requests' and SQLAlchemy's wrappers."""
    found, inner, depth = None, err, 0
    while inner is not None and (depth := depth + 1) < 20:
        if isinstance(getattr(inner, "orig", None), Exception):  # SQLAlchemy's DBAPIError
            found = inner.orig
        found = inner if isinstance(inner, OSError) else found
        inner = inner.__cause__ or inner.__context__
    return first_line(found, 120) if found else first_line(err, 120).split(". ")[0]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.removesuffix("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


class Loggers:
    """metrics.csv, written at once (a resume reads the history from it), and the chosen
    trackers, whose values wait in memory until a checkpoint holding them is written."""

    def __init__(self, csv: Path, trackers: list[Any], carried: dict[str, str], progress: Any, resend: list) -> None:
        self.csv, self.trackers, self.carried, self.progress = csv, trackers, carried, progress
        self.steps = any(isinstance(tracker, TensorBoardLogger) for tracker in trackers)
        # epoch rows and {step, train_loss_step}, in order; first the resumed checkpoint's
        self.pending: list[dict] = list(resend)
        self.handed: list[dict] = []  # the last step loss handed over (its step may start `pending`)
        self._closer = weakref.finalize(self, _close_all, list(trackers), "KILLED")

    def log_step(self, step: int, loss: torch.Tensor) -> None:
        if self.steps:  # train.py has just synced (check_finite): float() costs nothing
            self.pending.append({"step": step, "train_loss_step": float(loss)})

    def log_epoch(self, row: dict) -> None:
        append_csv(self.csv, row)
        self.pending.append(row)  # dropped at the save when there are no trackers

    def hand_over(self) -> Callable[[], None]:
        """The values so far, held by the checkpoint being written: sends them to the trackers
        once it is durable (CheckpointSaver.save's `then`; checkpoint.async: its writer thread)."""
        ready, self.pending = self.pending, []
        self.handed = [e for e in ready if "train_loss_step" in e][-1:] or self.handed

        def send() -> None:
            for tracker in self.trackers if ready else []:
                tracker.send(ready)

        return send

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool = False) -> None:
        """After the last write: the values left, each tracker's end of run, then close."""
        self.hand_over()()
        for tracker in self.trackers:
            tracker.finish(run_dir, history, metrics, again)
        self._closer.detach()
        _close_all(self.trackers, "FINISHED")

    def state_dict(self) -> dict[str, Any]:
        """The `loggers` key: tracker run ids (a resumed run's stay while their tracker is not
        chosen); with TensorBoard, what this checkpoint's hand-over will send (called before
        hand_over): its first step and the step losses from there on (`handed`'s at that step
        included), which a resume purges and sends again (the epoch rows are in the history)."""
        mlflow = [t.run_id for t in self.trackers if isinstance(t, MLflowLogger)]
        state: dict[str, Any] = {**self.carried, **({"mlflow_run_id": mlflow[0]} if mlflow else {})}
        if self.steps:
            start = self.pending[0]["step"] if self.pending else self.progress.global_step + 1
            resent = [e for e in self.handed + self.pending if "train_loss_step" in e and e["step"] >= start]
            losses = torch.tensor([[e["step"], e["train_loss_step"]] for e in resent], dtype=torch.float64)
            state.update(tensorboard_step=start, tensorboard_losses=losses.reshape(-1, 2))
        return state


def _close_all(trackers: list[Any], status: str) -> None:
    for tracker in trackers:
        tracker.close(status)


def open_loggers(cfg: DictConfig, run_dir: Path, resumed: dict | None, progress: Any) -> Loggers:
    """The chosen trackers, continuing `resumed`'s run (rank 0: one that cannot start stops every
    rank), then metrics.csv rewritten from the history; only metrics.csv under fast_dev_run."""
    # a branch into another folder or resume_mode=weights starts new tracker runs
    resume, exact = str(cfg.resume), str(cfg.get("resume_mode", "exact")) == "exact"
    same_run = exact and (resume == "auto" or Path(resume).resolve().parent == run_dir.resolve())
    saved = (resumed or {}).get("loggers") or {} if same_run else {}
    carried = {key: value for key, value in saved.items() if key.endswith("_id")}
    chosen = {} if cfg.trainer.fast_dev_run else check_logger_config(cfg.get("logger"))
    opened: list[Any] = []
    # TensorBoard: the resumed checkpoint's hand-over, sent again after a purge from its start
    start, resend = int(saved.get("tensorboard_step", progress.global_step + 1)), []
    if "tensorboard" in chosen:
        losses = saved.get("tensorboard_losses", torch.zeros(0, 2)).tolist()
        resend = [{"step": int(step), "train_loss_step": loss} for step, loss in losses]
        resend = sorted(resend + [row for row in progress.history if row["step"] >= start], key=lambda e: e["step"])

    def open_all() -> None:
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        history, root, folder = progress.history, Path(str(cfg.checkpoint.root)).resolve(), run_dir.resolve()
        try:
            if "tensorboard" in chosen:
                flush = int(chosen["tensorboard"].get("flush_secs", 30))
                opened.append(TensorBoardLogger(run_dir, config, history, progress.global_step, flush, start))
            if "mlflow" in chosen:
                settings = chosen["mlflow"]
                uri = str(settings.get("tracking_uri") or f"sqlite:///{root}/mlflow.db")
                experiment = str(settings.get("experiment_name") or cfg.run_name or cfg.name)
                name = str(folder.relative_to(root) if folder.is_relative_to(root) else run_dir.name)
                run_id, artifacts = carried.get("mlflow_run_id"), bool(settings.get("artifacts", True))
                opened.append(MLflowLogger(uri, experiment, run_dir, name, config, history, run_id, artifacts))
            write_csv(run_dir / "metrics.csv", history)
        except BaseException:
            _close_all(opened, "FAILED")
            raise

    on_main(open_all)
    return Loggers(run_dir / "metrics.csv", opened, carried, progress, resend if opened else [])


def check_logger_config(section: Any) -> dict[str, dict]:
    """`logger`: a mapping of tracker name to its settings, names and keys from KNOWN."""
    section = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section or {}
    if not isinstance(section, dict):
        raise UserError(f"logger={section!r}: expected a mapping; choose trackers with logger=[csv,tensorboard,mlflow]")
    chosen = {name: settings or {} for name, settings in section.items()}
    for name, settings in chosen.items():
        if name not in KNOWN:
            raise UserError(f"logger.{name}: unknown tracker; expected csv, tensorboard or mlflow")
        extra = (
            [k for k in settings if k not in KNOWN[name]] if isinstance(settings, dict) else ["(expected a mapping)"]
        )
        if extra:
            raise UserError(f"logger.{name}.{extra[0]}: unknown key; valid keys: {', '.join(KNOWN[name]) or 'none'}")
    flush = chosen.get("tensorboard", {}).get("flush_secs", 30)
    if type(flush) is not int or flush < 1:
        raise UserError(f"logger.tensorboard.flush_secs={flush!r}: expected whole seconds >= 1")
    if "mlflow" in chosen and importlib.util.find_spec("mlflow") is None:
        raise UserError("logger=mlflow: mlflow is not installed; pip install -e '.[mlflow]'")
    return chosen
