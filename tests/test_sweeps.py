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

from engine.sweeps import SweepSummary, best_of, cv_rows, result_overrides, sweep_folder
from tests.faults import fault_env

FAST = ("trainer.model_summary=false", "checkpoint.export=false", "checkpoint.every_n_epochs=1")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(root: Path, name: str = "linear_regression") -> Path:
    """The one sweep folder under <root>/<name>/multirun/."""
    [sweep] = (root / name / "multirun").iterdir()
    return sweep


def test_result_overrides_ignore_resume_and_device():
    a = result_overrides(["optimizer.lr=0.1,0.01", "trainer.epochs=2"])
    assert a == result_overrides(["trainer.epochs=2", "optimizer.lr=0.1,0.01", "resume=auto", "trainer.device=cpu"])
    assert a != result_overrides(["optimizer.lr=0.1,0.02", "trainer.epochs=2"])


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
    sweep = _sweep(tmp_path)
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
    sweep = _sweep(tmp_path)
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name=sweep.name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "RUNNING"], states

    again = run_script("train.py", *args, root=tmp_path, timeout=120)
    assert "continuing 1 interrupted" in again.stdout
    assert "resumed at epoch 1" in again.stdout  # the 2nd trial's run continued, not redone
    study = optuna.load_study(study_name=sweep.name, storage=storage)
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
    sweep = _sweep(tmp_path)
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


def test_sweep_folder_is_named_by_the_overrides_that_change_results():
    lrs = ["optimizer.lr=0.1,0.01", "trainer.epochs=2"]
    folder = sweep_folder("lin", None, lrs)
    assert folder == "lin/multirun/optimizer.lr=0.1,0.01,trainer.epochs=2"
    again = ["trainer.epochs=2", "resume=auto", "optimizer.lr=0.1,0.01", "trainer.device=cpu", "checkpoint.root=/x"]
    assert sweep_folder("lin", None, again) == folder  # the same command re-run finds it
    assert (
        sweep_folder("lin", "mine", [*lrs, "run_name=mine"]) == "mine/multirun/optimizer.lr=0.1,0.01,trainer.epochs=2"
    )
    assert sweep_folder("lin", None, []) == "lin/multirun/default"
    odd = sweep_folder("lin", None, ["data.path=/a/b.csv"])  # unsafe characters: made safe, hashed
    assert odd.startswith("lin/multirun/data.path=_a_b.csv-") and "/" not in odd.split("multirun/")[1]
    assert odd != sweep_folder("lin", None, ["data.path=_a_b.csv"])
    long = sweep_folder("lin", None, [f"model.k{i}={i}" for i in range(40)])
    assert len(long.split("/")[-1]) <= 100


def test_cv_rows_give_mean_and_sample_std_over_completed_folds():
    rng = __import__("random").Random(5)
    rows, by_hand = [], {}
    for lr in ("0.1", "0.01"):
        values = [rng.uniform(0, 1) for _ in range(4)]
        for fold, value in enumerate(values):
            status = "failed" if lr == "0.01" and fold == 3 else "ok"  # not counted
            rows.append(
                {"overrides": f"cv.fold={fold} optimizer.lr={lr} cv=4fold", "status": status, "best_val_loss": value}
                | ({"test_acc": value / 2} if status == "ok" else {})
            )
        by_hand[lr] = values[:3] if lr == "0.01" else values
    rows.append({"overrides": "optimizer.lr=1.0", "status": "ok", "best_val_loss": 0.0})  # no fold: not grouped
    cv = cv_rows(rows, "best_val_loss", "min", folds=4)
    assert len(cv) == 2 and cv[0]["best_val_loss_mean"] <= cv[1]["best_val_loss_mean"]  # best first (min)
    for row in cv:
        lr = row["overrides"].split("optimizer.lr=")[1].split()[0]
        assert row["overrides"] == f"optimizer.lr={lr} cv=4fold"
        assert (row["folds_done"], row["folds"]) == (len(by_hand[lr]), 4)
        assert row["best_val_loss_mean"] == pytest.approx(sum(by_hand[lr]) / len(by_hand[lr]))
        mean = row["best_val_loss_mean"]
        var = sum((v - mean) ** 2 for v in by_hand[lr]) / (len(by_hand[lr]) - 1)  # ddof=1
        assert row["best_val_loss_std"] == pytest.approx(var**0.5)
        assert row["test_acc_mean"] == pytest.approx(mean / 2)


@pytest.mark.slow
def test_two_sweeps_side_by_side_each_keep_their_folder_and_a_rerun_finds_its_own(tmp_path):
    fast = ("trainer.model_summary=false", "checkpoint.export=false")  # keys that name no sweep
    first = ("-m", "optimizer.lr=0.1,0.01", "trainer.epochs=1", *fast)
    second = ("-m", "optimizer.lr=0.05", "trainer.epochs=2", *fast)
    run_script("train.py", *first, root=tmp_path, timeout=120)
    run_script("train.py", *second, root=tmp_path, timeout=120)
    folders = {p.name: p for p in (tmp_path / "linear_regression" / "multirun").iterdir()}
    assert sorted(folders) == ["optimizer.lr=0.05,trainer.epochs=2", "optimizer.lr=0.1,0.01,trainer.epochs=1"]
    for name, jobs in (
        ("optimizer.lr=0.1,0.01,trainer.epochs=1", ["optimizer.lr=0.01", "optimizer.lr=0.1"]),
        ("optimizer.lr=0.05,trainer.epochs=2", ["0"]),  # nothing swept: the job's number
    ):
        sweep = folders[name]
        assert sorted(p.parent.name for p in sweep.glob("*/best.pt")) == jobs  # the runs inside
        rows = _rows(sweep / "summary.csv")
        assert sorted(r["job"] for r in rows) == jobs and all(r["status"] == "ok" for r in rows)
        assert all(Path(r["best_pt"]).parent.parent == sweep for r in rows)
        assert (sweep / "summary.md").is_file() and (sweep / "multirun.yaml").is_file()
    summary = folders["optimizer.lr=0.1,0.01,trainer.epochs=1"] / "summary.csv"
    results = lambda: sorted((r["job"], r["status"], r["best_val_loss"], r["test_loss"]) for r in _rows(summary))  # noqa: E731
    before = results()
    again = run_script("train.py", *first, "resume=auto", "trainer.device=cpu", root=tmp_path, timeout=120)
    assert again.stdout.count("is already complete") == 2  # its own runs, found again
    assert len(list((tmp_path / "linear_regression" / "multirun").iterdir())) == 2
    assert results() == before
    # hydra.sweep.dir=: the runs and the summary there, outside checkpoint.root
    elsewhere = tmp_path / "elsewhere" / "s1"
    run_script("train.py", *second, f"hydra.sweep.dir={elsewhere}", root=tmp_path / "ck", timeout=120)
    assert [p.parent.name for p in elsewhere.glob("*/best.pt")] == ["0"]
    assert _rows(elsewhere / "summary.csv")[0]["status"] == "ok" and not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_a_killed_submitit_job_is_one_line_and_exit_2_with_the_summary_written(tmp_path):
    # 4 steps an epoch: the trainer.epochs=1 job ends at step 4, the epochs=3 one is killed at step 6.
    args = ("-m", "hydra/launcher=submitit_local", "trainer.epochs=1,3", "data.batch_size=8", *FAST)
    result = run_script("train.py", *args, root=tmp_path, check=False, timeout=240, env=fault_env("kill_at_step=6"))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: sweep job "), result.stderr[-2000:]
    assert "trainer.epochs=3" in errors[0] and "killed" in errors[0] and "Traceback" not in result.stderr
    status = {r["job"]: r["status"] for r in _rows(_sweep(tmp_path) / "summary.csv")}
    assert status == {"trainer.epochs=1": "ok", "trainer.epochs=3": "interrupted"}


def test_quoted_values_come_back_from_hydras_parser_unchanged():
    """Paths and names handed to jobs as overrides (the sweep folder, the storage URL): seeded
    strings of Hydra's special characters, quotes and backslashes parse back to themselves."""
    import random

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from engine.sweeps import quoted

    parser, rng = OverridesParser.create(), random.Random(0)
    alphabet = "ab/\\'\",=()[]{}: .$~*"
    texts = ["", "\\", "'", "a\\", "C:\\runs\\", "it's", "x,y=z()"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    for text in texts:
        assert parser.parse_override(f"k={quoted(text)}").value() == text, text
        listed = parser.parse_override(f"k=[{quoted(text)},{quoted('b')}]").value()
        assert listed == [text, "b"], text
