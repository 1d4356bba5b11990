"""Sweeps (-m): the multirun summary (engine/sweeps.py) and the Optuna sweeper
(hydra_plugins/torch_template/optuna_sweeper.py) whose SQLite study a re-run of the same
command continues."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose, run_script
from omegaconf import OmegaConf

from engine.sweeps import SweepSummary, best_of, sweep_id
from tests.faults import fault_env

FAST = ("trainer.model_summary=false", "checkpoint.export=false", "checkpoint.every_n_epochs=1")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_id_ignores_resume_and_device():
    a = sweep_id(["optimizer.lr=0.1,0.01", "trainer.epochs=2"])
    assert a == sweep_id(["trainer.epochs=2", "optimizer.lr=0.1,0.01", "resume=auto", "trainer.device=cpu"])
    assert a != sweep_id(["optimizer.lr=0.1,0.02", "trainer.epochs=2"])


def test_best_of_respects_mode(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,val_loss,val_acc\n1,0.5,0.7\n2,0.3,0.6\n3,nan,0.9\n4,0.4,0.8\n")
    assert best_of(tmp_path, "val_loss", "min") == (0.3, 2)
    assert best_of(tmp_path, "val_acc", "max") == (0.9, 3)
    assert best_of(tmp_path / "missing", "val_loss", "min") == (None, None)


def test_train_yaml_registers_the_summary_callback_and_presets_compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
            cfg = hydra_compose("train", ["hparams_search=digits_optuna"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.hydra.callbacks.sweep_summary._target_ == "engine.sweeps.SweepSummary"
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.torch_template.optuna_sweeper.OptunaSweeper"
    assert "optimizer.lr" in cfg.hydra.sweeper.params and cfg.checkpoint.mode == "max"
    assert OmegaConf.select(cfg, "data._target_") == "data.digits.DigitsData"
    assert compose("train").checkpoint.monitor == "val_loss"  # no preset: no change


@pytest.mark.slow
def test_multirun_summary_lists_every_job_sorted_with_a_failed_one(tmp_path):
    # lr=1e6 on MSE diverges: a non-finite loss is a user error (exit 2) of that job only.
    result = run_script(
        "train.py",
        "-m",
        "loss=mse",
        "optimizer.lr=0.01,1000000.0,0.1",
        "trainer.epochs=2",
        *FAST,
        root=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "non-finite" in result.stderr
    sweep = tmp_path / "linear_regression"
    rows = _rows(sweep / "summary.csv")
    by_lr = {r["overrides"].split("optimizer.lr=")[1].split()[0]: r for r in rows}
    assert sorted(by_lr) == ["0.01", "0.1", "1000000.0"] and len(rows) == 3
    assert by_lr["1000000.0"]["status"] == "failed"
    assert "non-finite" in by_lr["1000000.0"]["error"]
    for lr in ("0.01", "0.1"):
        ok = by_lr[lr]
        assert ok["status"] == "ok" and ok["best_epoch"] in ("1", "2")
        run_dir = Path(ok["best_pt"]).parent
        assert Path(ok["best_pt"]).is_file()
        tests = json.loads((run_dir / "test_metrics.json").read_text())
        assert float(ok["test_loss"]) == pytest.approx(tests["test_loss"])
        assert float(ok["best_val_loss"]) == pytest.approx(best_of(run_dir, "val_loss", "min")[0])
    md = (sweep / "summary.md").read_text().splitlines()
    ranked = [line for line in md if line.startswith("| ") and line[2].isdigit()]
    assert len(ranked) == 3
    values = [float(by_lr[lr]["best_val_loss"]) for lr in ("0.01", "0.1")]
    first = "optimizer.lr=0.1 " if values[1] < values[0] else "optimizer.lr=0.01 "
    assert first in ranked[0] and "failed" in ranked[-1]  # ascending (min); failed last
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_optuna_sweep_killed_in_its_second_trial_continues_to_n_trials(tmp_path):
    import optuna

    args = ("-m", "hparams_search=linear_optuna", "hydra.sweeper.n_trials=3", "trainer.epochs=2", *FAST)
    # 4 steps an epoch, 8 a trial: step 14 is in the 2nd trial's 2nd epoch.
    killed = run_script("train.py", *args, root=tmp_path, check=False, timeout=120, env=fault_env("kill_at_step=14"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    sweep = tmp_path / "linear_regression"
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name=None, storage=storage)  # the one study of this sweep
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "RUNNING"], states

    again = run_script("train.py", *args, root=tmp_path, timeout=120)
    assert "continuing 1 interrupted" in again.stdout
    assert "resumed at epoch 1" in again.stdout  # the 2nd trial's run continued, not redone
    study = optuna.load_study(study_name=None, storage=storage)  # the one study of this sweep
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 3
    rows = _rows(sweep / "summary.csv")
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    for trial in study.trials:  # the objective: best val_loss of the trial's own run
        row = next(r for r in rows if f"optimizer.lr={trial.params['optimizer.lr']!r}" in r["overrides"])
        assert trial.value == pytest.approx(float(row["best_val_loss"]))


def test_a_job_killed_before_its_end_is_listed_as_interrupted(tmp_path):
    summary = SweepSummary(plot=False)
    summary.sweep_dir, summary.sweep = tmp_path, "s1"
    records = tmp_path / ".sweep_jobs"
    records.mkdir()
    (records / "a.json").write_text(
        json.dumps(
            {"sweep": "s1", "job": "a", "status": "running", "run_dir": str(tmp_path / "a"), "overrides": ["x=1"]}
        )
    )
    (records / "b.json").write_text(json.dumps({"sweep": "other", "job": "b", "status": "ok", "overrides": []}))
    assert [r["status"] for r in summary.rows(final=False)] == ["running"]
    rows = summary.write(final=True)
    assert [(r["job"], r["status"]) for r in rows] == [("a", "interrupted")]
    assert _rows(tmp_path / "summary.csv")[0]["status"] == "interrupted"


@pytest.mark.slow
def test_multirun_stopped_by_ctrl_c_lists_the_job_interrupted_and_resume_completes_it(tmp_path):
    args = ("-m", "optimizer.lr=0.01,0.1", "trainer.epochs=2", *FAST)
    # 8 steps a job: step 10 is the 2nd job's 2nd step; Ctrl-C stops the whole sweep (exit 3).
    stopped = run_script("train.py", *args, root=tmp_path, check=False, timeout=120, env=fault_env("int_at_step=10"))
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    sweep = tmp_path / "linear_regression"
    status = {r["overrides"].split()[0]: r["status"] for r in _rows(sweep / "summary.csv")}
    assert status == {"optimizer.lr=0.01": "ok", "optimizer.lr=0.1": "interrupted"}
    again = run_script("train.py", *args, "resume=auto", root=tmp_path, timeout=120)
    assert "resumed at epoch 0, step 2" in again.stdout
    status = {r["overrides"].split()[0]: r["status"] for r in _rows(sweep / "summary.csv")}
    assert status == {"optimizer.lr=0.01": "ok", "optimizer.lr=0.1": "ok"}


def test_optuna_objective_fails_a_diverged_trial_and_reads_the_best_value(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import JobReturn, JobStatus
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from engine.errors import failed_job
    from hydra_plugins.torch_template.optuna_sweeper import OptunaSweeper, _distribution

    sweeper = OptunaSweeper()
    diverged = JobReturn(status=JobStatus.COMPLETED)
    diverged._return_value = failed_job("non-finite loss at epoch 2")
    assert sweeper._objective(diverged) is None
    crashed = JobReturn(status=JobStatus.FAILED)
    crashed._return_value = RuntimeError("a bug")
    assert sweeper._objective(crashed) is None

    parse = OverridesParser.create().parse_overrides
    [log_lr, choice] = parse(["optimizer.lr=tag(log, interval(0.001, 0.5))", "data.batch_size=choice(8, 16)"])
    assert _distribution(log_lr) == FloatDistribution(0.001, 0.5, log=True)
    assert _distribution(choice) == CategoricalDistribution([8, 16])
