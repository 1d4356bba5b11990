"""The MLflow tracker of engine/loggers.py (`logger=mlflow`, the `mlflow` extra): params = the
flattened config, metrics per epoch (step = epoch), best.pt and export/ as artifacts at the end.

Resume continues the same MLflow run: its id is kept in the checkpoint (`loggers` key,
`mlflow_run_id`). MLflow keeps every value logged for a step (`log_metric` at an existing step
adds a second value), so a run killed after logging epochs past its last checkpoint would
show them twice once they are trained again: on resume at epoch E the values at steps > E
are deleted from the store (a SQL store: SQLite by default; a tracking server has no call for
it, and says so), and epochs <= E that the store lacks are filled in from the history."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError

PARAM_BATCH, PARAM_LENGTH = 100, 6000  # MLflow's limits: params per call, value length


class MLflowLogger:
    """One MLflow run per training run, reopened on resume (same interface as loggers.Logger)."""

    wants_steps = False

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, config: dict,
                 progress: Any, run_id: str | None, artifacts: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("logger=mlflow: mlflow is not installed; pip install -e "
                            "'.[mlflow]'") from None
        for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.db"):
            logging.getLogger(name).setLevel(logging.WARNING)  # table creation chatter
        self.artifacts, self.epoch = artifacts, progress.epoch
        self.db = Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith(
            "sqlite:///") else None
        if self.db is not None:
            self.db.parent.mkdir(parents=True, exist_ok=True)
        self.failed = False
        try:
            self.client = MlflowClient(tracking_uri)  # a file that is no database fails here
            run = self._reopen(run_id) if run_id else None
            if run is None:
                run = self.client.create_run(self._experiment(experiment), run_name=run_name)
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.run_id = run.info.run_id
            self._log_params(config, dict(run.data.params))
            if run_id or progress.history:
                self._sync_history(progress.history)
        except Exception as err:  # noqa: BLE001 - a store or server MLflow cannot use
            raise UserError(f"logger.mlflow.tracking_uri={tracking_uri}: "
                            f"{_first_line(err)}") from None
        print(f"mlflow: run {self.run_id} in experiment {experiment!r} at {tracking_uri}")

    def _reopen(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            print(f"mlflow: run {run_id} of the checkpoint is not in this store (or deleted); "
                  f"starting a new MLflow run with the history so far")
            return None
        return run

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        # A SQLite store keeps the artifacts beside it, not in ./mlruns of the working folder.
        location = ((self.db.parent / "mlartifacts" / name.replace("/", "_")).resolve()
                    .as_uri() if self.db is not None else None)
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another job of a sweep created it just now
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, config: dict, existing: dict[str, str]) -> None:
        """The flattened config; params cannot change within a run, so a resume with other
        values keeps the first ones and names the keys that differ."""
        from mlflow.entities import Param

        flat = {k: str(v)[:PARAM_LENGTH] for k, v in _flatten(config).items()}
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for start in range(0, len(new), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + PARAM_BATCH])
        if changed:
            print(f"mlflow: params keep their first values; changed on resume: "
                  f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}")

    def _sync_history(self, history: list[dict]) -> None:
        """The run's metrics are exactly the checkpoint's epochs: values at steps > epoch
        (logged by a killed process after its last checkpoint) deleted, missing epochs
        logged from the history (metrics.csv)."""
        self._drop_after(self.epoch)
        keys = {k for row in history for k in row if k not in ("epoch", "step")}
        have = {k: {m.step for m in self.client.get_metric_history(self.run_id, k)}
                for k in keys}
        missing = [row for row in history if any(row["epoch"] not in have[k]
                                                 for k in row if k in have)]
        for row in missing:
            self.log_epoch({k: v for k, v in row.items()
                            if k in ("epoch", "step") or row["epoch"] not in have[k]})

    def _drop_after(self, epoch: int) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = self.client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore):
            later = [m for m in self.client.get_run(self.run_id).data.metrics
                     if any(v.step > epoch for v in self.client.get_metric_history(
                         self.run_id, m))]
            if later:
                print(f"mlflow: a tracking server cannot delete values: {', '.join(later)} "
                      f"keep those a stopped run logged after epoch {epoch}")
            return
        _delete_steps_after(store, self.run_id, epoch)

    def log_step(self, step: int, loss: float) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        """A server gone mid-run stops the tracking, not the training: the next resume=auto
        fills in the epochs it missed (_sync_history)."""
        from mlflow.entities import Metric

        if self.failed:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(row["epoch"])) for k, v in row.items()
                   if k not in ("epoch", "step")]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # noqa: BLE001
            self.failed = True
            print(f"warning: mlflow: {_first_line(err)}; training goes on without MLflow "
                  f"(resume=auto fills in the missing epochs)", flush=True)

    def finish(self, run_dir: Path, history: list[dict], metrics: dict, again: bool) -> None:
        """Test metrics (once), best.pt and export/ as artifacts (again: they are replaced)."""
        from mlflow.entities import Metric

        if self.failed:
            return
        logged = self.client.get_run(self.run_id).data.metrics
        now, step = int(time.time() * 1000), int(history[-1]["epoch"]) if history else 0
        tests = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if k.startswith("test_") and k not in logged]
        if tests:
            self.client.log_batch(self.run_id, metrics=tests)
        if not self.artifacts:
            return
        best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best.resolve()))
        if (run_dir / "export").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "export"), "export")

    def close(self, status: str) -> None:
        if not self.failed:
            self.client.set_terminated(self.run_id, status)

    def state_dict(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id}


def _delete_steps_after(store: Any, run_id: str, epoch: int) -> None:
    """Delete a run's metric values at steps > epoch from a SQL store, and set each key's
    latest value (the one the UI's table shows) back to its newest remaining one."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from sqlalchemy.orm import Session

    with Session(store.engine) as session, session.begin():
        mine = session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id)
        if not mine.filter(SqlMetric.step > epoch).delete():
            return
        session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == run_id).delete()
        for (key,) in mine.with_entities(SqlMetric.key).distinct().all():
            last = mine.filter(SqlMetric.key == key).order_by(
                SqlMetric.step.desc(), SqlMetric.timestamp.desc(), SqlMetric.value.desc()).first()
            session.add(SqlLatestMetric(run_uuid=run_id, key=key, value=last.value,
                                        timestamp=last.timestamp, step=last.step,
                                        is_nan=last.is_nan))


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
