"""The Optuna sweeper as its users know Optuna (hydra_plugins/torch_template/optuna_sweeper.py):
a study is what it searches (a smoke test or other epochs are other studies), sampler and pruner
settings, pruning that a kill and re-run does not change, parallel trials on one SQLite study,
k-fold trials, and the refusals (torchrun, bad settings) in one line."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import compose, run_script
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.torch_template.optuna_sweeper import (
    OptunaSweeper,
    PrunerConf,
    SamplerConf,
    TrialPruning,
    make_pruner,
    make_sampler,
)
from tests.faults import fault_env
from tests.helpers import raises_user_error

optuna.logging.set_verbosity(optuna.logging.WARNING)
ARGS = ("-m", "hparams_search=linear_optuna", "trainer.model_summary=false", "checkpoint.export=false")


def _studies(root: Path) -> dict[str, optuna.Study]:
    """Every study of every sweep folder (<root>/linear_regression/multirun/<overrides>/optuna.db)."""
    studies = {}
    for db in sorted((root / "linear_regression" / "multirun").glob("*/optuna.db")):
        storage = f"sqlite:///{db}"
        studies.update(
            {n: optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)}
        )
    return studies


def _summary(root: Path) -> list[dict]:
    [summary] = (root / "linear_regression" / "multirun").glob("*/summary.csv")  # the one sweep's
    with open(summary, newline="") as f:
        return list(csv.DictReader(f))


def _one_error(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needles), result.stderr[-2000:]
    return line


# ------------------------------------------------------------------ what a study is


def test_a_smoke_study_then_a_real_one_then_other_epochs_are_separate_studies(tmp_path):
    smoke = run_script(
        "train.py", *ARGS, "hydra.sweeper.n_trials=3", "trainer.fast_dev_run=true", root=tmp_path, timeout=120
    )
    assert "trainer.fast_dev_run=true: an in-memory study, nothing stored" in smoke.stdout
    assert smoke.stdout.count("nothing was written") == 3 and "best trial" in smoke.stdout
    assert not list(tmp_path.rglob("optuna.db"))

    real = run_script("train.py", *ARGS, "hydra.sweeper.n_trials=2", "trainer.epochs=2", root=tmp_path, timeout=120)
    [(name, study)] = _studies(tmp_path).items()
    assert f"study {name!r} (" in real.stdout and "trainer.epochs=2" in real.stdout
    assert "0 of 2 trials done" in real.stdout
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert "trainer.epochs=2" in study.user_attrs["overrides"]

    other = run_script("train.py", *ARGS, "hydra.sweeper.n_trials=1", "trainer.epochs=1", root=tmp_path, timeout=120)
    assert "0 of 1 trials done" in other.stdout  # not "2 of 1": another study
    studies = _studies(tmp_path)
    assert len(studies) == 2 and len(studies[name].trials) == 2
    [new] = set(studies) - {name}
    assert [t.state for t in studies[new].trials] == [TrialState.COMPLETE]


def test_no_trial_completed_exits_2_and_the_summary_says_failed(tmp_path):
    missing = tmp_path / "missing.pt"
    result = run_script(
        "train.py", *ARGS, "hydra.sweeper.n_trials=2", f"weights={missing}", root=tmp_path, check=False, timeout=120
    )
    _one_error(result, "no trial completed (2 fail)")
    [study] = _studies(tmp_path).values()
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    rows = _summary(tmp_path)
    assert [r["status"] for r in rows] == ["failed"] * 2 and all(str(missing) in r["error"] for r in rows)


def test_torchrun_is_refused_in_one_line(tmp_path):
    result = run_script("train.py", *ARGS, root=tmp_path, check=False, timeout=60, env={"WORLD_SIZE": "2", "RANK": "0"})
    _one_error(result, "under torchrun (WORLD_SIZE=2)", "python train.py -m hparams_search=")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("optuna.db"))


# ------------------------------------------------------------------ sampler and pruner settings


def test_sampler_settings_from_the_command_line_reach_the_study(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:  # the failing override composes
        with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
            cfg = compose(
                "train",
                ["hparams_search=linear_optuna", "hydra.sweeper.sampler.n_startup_trials=3"],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    options = OptunaSweeper(**{k: v for k, v in cfg.hydra.sweeper.items() if k != "_target_"}).options
    assert (options.sampler.name, options.sampler.seed, options.sampler.n_startup_trials) == ("tpe", 42, 3)
    assert options.pruner.name == "median"

    seed = random.Random(0).randrange(1000)
    run_script(
        "train.py",
        *ARGS,
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=1",
        "hydra.sweeper.sampler.name=random",
        f"hydra.sweeper.sampler.seed={seed}",
        root=tmp_path,
        timeout=120,
    )
    [study] = _studies(tmp_path).values()
    for trial in study.trials:  # trial N samples with seed + N
        alone = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + trial.number))
        assert alone.ask(trial.distributions).params == trial.params


def _sweeper(sweep_dir: Path, launcher, **options) -> OptunaSweeper:
    options.setdefault("params", {"optimizer.lr": "tag(log, interval(0.001, 0.5))"})
    options.setdefault("study_name", "s")
    s = OptunaSweeper(**options)
    s.config = OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(sweep_dir)}},
            "checkpoint": {"mode": "min", "monitor": "val_loss"},
            "trainer": {"epochs": 3},
        }
    )
    s.hydra_context, s.launcher = SimpleNamespace(config_loader=None), launcher
    return s


@pytest.mark.parametrize(
    "options, needles",
    [
        ({"sampler": {"name": "grid"}}, ("hydra.sweeper.sampler.name='grid'", "tpe, random or cmaes")),
        ({"pruner": {"name": "asha"}}, ("hydra.sweeper.pruner.name='asha'", "median, hyperband or none")),
        ({"seed": 1}, ("hydra.sweeper.seed=1", "hydra.sweeper.sampler.seed")),
        ({"n_jobs": 0}, ("hydra.sweeper.n_jobs=0",)),
    ],
)
def test_bad_settings_are_one_line_before_any_file(tmp_path, options, needles):
    s = _sweeper(tmp_path / "sweep", None, **options)
    raises_user_error(s._sweep, [], needles=needles)
    assert not (tmp_path / "sweep").exists()


def test_a_named_study_refuses_other_overrides_than_it_searched_with(tmp_path):
    launcher = FoldLauncher()
    for epochs in (1, 1):  # the same search: continued
        s = _sweeper(tmp_path / "sweep", launcher, n_trials=2, study_name="mine")
        s._objective = lambda ret: 0.5
        s._sweep([f"trainer.epochs={epochs}", "resume=auto", "trainer.device=cpu"])
    assert len(launcher.batches) == 2
    s = _sweeper(tmp_path / "sweep", launcher, n_trials=3, study_name="mine")
    raises_user_error(
        s._sweep,
        ["trainer.epochs=2"],
        needles=("study 'mine' was searched with trainer.epochs=1, now trainer.epochs=2",),
    )
    assert len(launcher.batches) == 2


def test_cmaes_is_optunas_cma_es_sampler_and_one_line_without_its_package(tmp_path, monkeypatch):
    pytest.importorskip("cmaes")  # the dev extra installs it
    assert isinstance(make_sampler(SamplerConf("cmaes", seed=1), 0), optuna.samplers.CmaEsSampler)
    monkeypatch.setitem(sys.modules, "cmaes", None)  # import cmaes -> ImportError
    s = _sweeper(tmp_path / "sweep", None, sampler={"name": "cmaes"})
    raises_user_error(s._sweep, [], needles=("cmaes", "pip install cmaes"))


# ------------------------------------------------------------------ pruning


def _decide(pruning: TrialPruning, curve: list[float], start: int = 0) -> int | None:
    """A job's epochs start+1..: the epoch it was pruned at, or None (it ran them all)."""
    for epoch in range(start + 1, len(curve) + 1):
        if pruning.prune(epoch, curve[epoch - 1]):
            return epoch
    return None


def _study_with_past(rng: random.Random, conf: PrunerConf, epochs: int):
    """A study whose trials ran through TrialPruning, as jobs would have, plus one asked trial."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="s", storage=storage, pruner=make_pruner(conf, epochs))
    for _ in range(rng.randint(2, 6)):
        curve = _curve(rng, epochs)
        number = study.ask().number
        if _decide(TrialPruning(storage, "s", number, make_pruner(conf, epochs), epochs), curve):
            study.tell(number, state=TrialState.PRUNED)
        else:
            study.tell(number, min(curve))
    return storage, study, study.ask().number


def _curve(rng: random.Random, epochs: int) -> list[float]:
    start = rng.uniform(0.5, 2.0)
    return [start * rng.uniform(0.6, 1.0) ** e for e in range(1, epochs + 1)]


def _last_trial(study: optuna.Study) -> tuple:
    trial = study.trials[-1]
    return trial.state, trial.value, trial.intermediate_values


def test_a_killed_and_resumed_trial_decides_as_the_unbroken_one():
    """Seeded cases: past trials, a pruner (median or hyperband), and a kill of the last trial's
    job after a random epoch (and maybe the next epoch's report, before its decision), resumed from
    a checkpoint at or before that epoch. The trial ends in the same state with the same value and
    reports as the unbroken job's."""
    pruned = 0
    for case in range(40):
        setup = random.Random(case)
        epochs = setup.randint(3, 6)
        conf = setup.choice([PrunerConf("median", setup.randint(0, 2), setup.randint(0, 2)), PrunerConf("hyperband")])
        start = setup.getstate()

        def attach(storage, number):
            return TrialPruning(storage, "s", number, make_pruner(conf, epochs), epochs)  # noqa: B023

        setup.setstate(start)
        storage, study, number = _study_with_past(setup, conf, epochs)
        curve = _curve(setup, epochs)
        unbroken = _decide(attach(storage, number), curve)
        study.tell(number, state=TrialState.PRUNED) if unbroken else study.tell(number, min(curve))
        expected, pruned = _last_trial(study), pruned + (unbroken is not None)

        kill = random.Random(1000 + case)
        setup.setstate(start)
        storage, study, number = _study_with_past(setup, conf, epochs)
        assert _curve(setup, epochs) == curve
        before = attach(storage, number)  # the job until the kill
        killed = kill.randint(0, unbroken or epochs)
        at = _decide(before, curve[:killed])
        if at is None and killed < epochs and kill.random() < 0.5:  # reported, killed before deciding
            before.trial.report(curve[killed], killed + 1)
        checkpoint = kill.randint(0, killed)
        if checkpoint < epochs:  # else the run was complete: nothing to decide
            resumed = attach(storage, number)
            history = [{"epoch": e, "val_loss": curve[e - 1]} for e in range(1, checkpoint + 1)]
            at = checkpoint if resumed.resume(history, "val_loss") else _decide(resumed, curve, start=checkpoint)
        again = optuna.load_study(study_name="s", storage=storage)
        again.tell(number, state=TrialState.PRUNED) if at else again.tell(number, min(curve))
        assert _last_trial(again) == expected, (case, conf, killed, checkpoint, at, unbroken)
    assert pruned >= 5  # not a test of trials that are never pruned


PRUNING = (
    *ARGS,
    "hydra.sweeper.n_trials=5",
    "trainer.epochs=4",
    "checkpoint.every_n_epochs=1",
    "hydra.sweeper.sampler.n_startup_trials=2",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=2",  # epochs 2 and 3 may prune
)


def _trials(root: Path) -> list[tuple]:
    [study] = _studies(root).values()
    return [(t.number, t.state, t.value, t.params, t.intermediate_values) for t in study.trials]


@pytest.mark.slow  # (the seeded in-process kills above are the fast tier's)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_pruned_sweep_killed_and_rerun_ends_as_the_unbroken_sweep(tmp_path, seed):
    unbroken = run_script("train.py", *PRUNING, root=tmp_path / "a", timeout=180)
    expected = _trials(tmp_path / "a")
    states = [t[1] for t in expected]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, expected
    assert unbroken.stdout.count("pruned by Optuna") == states.count(TrialState.PRUNED)
    rows = _summary(tmp_path / "a")
    assert sorted(r["status"] for r in rows) == sorted("pruned" if s == TrialState.PRUNED else "ok" for s in states)

    steps = 4 * sum(len(t[4]) for t in expected)  # 4 steps an epoch, in every trial's epochs
    kill = random.Random(seed).randrange(5, steps)
    killed = run_script(
        "train.py", *PRUNING, root=tmp_path / "b", check=False, timeout=180, env=fault_env(f"kill_at_step={kill}")
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = run_script("train.py", *PRUNING, root=tmp_path / "b", timeout=180)
    assert "continuing 1 interrupted" in again.stdout
    assert _trials(tmp_path / "b") == expected  # params, states, values, every epoch's report


# ------------------------------------------------------------------ parallel trials, k folds


@pytest.mark.slow
def test_two_parallel_trials_on_one_sqlite_study_both_complete(tmp_path):
    result = run_script(
        "train.py",
        *ARGS,
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=3",
        "hydra.sweeper.pruner.n_startup_trials=0",  # each job reports and asks every epoch
        root=tmp_path,
        timeout=240,
    )
    [study] = _studies(tmp_path).values()
    first, second = study.trials
    assert (first.state, second.state) == (TrialState.COMPLETE, TrialState.COMPLETE)
    assert list(first.intermediate_values) == list(second.intermediate_values) == [1, 2, 3]
    assert second.datetime_start < first.datetime_complete  # asked together, launched in one batch
    assert len(list((tmp_path / "linear_regression" / "multirun").glob("*/.submitit/*/*_result.pkl"))) == 2
    assert "all ok" in result.stdout


class FoldLauncher:
    """Runs nothing: records each batch; every job completes (the objective is stubbed)."""

    def __init__(self) -> None:
        self.batches: list[list[list[str]]] = []

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append([list(o) for o in job_overrides])
        rets = [JobReturn(status=JobStatus.COMPLETED, overrides=list(o)) for o in job_overrides]
        for ret in rets:
            ret._return_value = {}
        return rets


def test_cv_fold_in_params_runs_each_trial_on_every_fold_and_tells_the_mean(tmp_path, capsys):
    rng = random.Random(3)
    by_job = {}  # (lr, fold) -> value; None: that fold failed

    def objective(ret):
        key = tuple(o.split("=")[1] for o in ret.overrides if o.startswith(("optimizer.lr=", "cv.fold=")))
        return by_job.setdefault(key, rng.choice([None, rng.random(), rng.random(), rng.random()]))

    params = {"optimizer.lr": "tag(log, interval(0.001, 0.5))", "cv.fold": "range(0,3)"}
    s = _sweeper(tmp_path / "sweep", FoldLauncher(), params=params, n_trials=4, n_jobs=2, pruner={"name": "median"})
    s._objective = objective
    s._sweep(["cv.folds=3"])
    assert "pruning is off with cross-validation" in capsys.readouterr().out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert len(s.launcher.batches) == 2  # 2 trials x 3 folds a batch
    for batch, trials in zip(s.launcher.batches, (study.trials[:2], study.trials[2:]), strict=True):
        assert len(batch) == 6 and not any(o.startswith("hydra.sweeper.trial") for job in batch for o in job)
        for trial, jobs in zip(trials, (batch[:3], batch[3:]), strict=True):
            assert [job[-1] for job in jobs] == ["cv.fold=0", "cv.fold=1", "cv.fold=2"]
            assert all(f"optimizer.lr={trial.params['optimizer.lr']!r}" in job for job in jobs)
            values = [by_job[(repr(trial.params["optimizer.lr"]), str(f))] for f in range(3)]
            if None in values:
                assert trial.state == TrialState.FAIL
            else:
                assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(sum(values) / 3)
    assert {t.state for t in study.trials} == {TrialState.FAIL, TrialState.COMPLETE}


def test_cv_folds_through_train_py(tmp_path):
    """A stand-in for configs/cv/: cv.folds and hydra.sweeper.params' cv.fold, as a group."""
    if "cv" not in compose("train"):
        pytest.skip("no cv.folds/cv.fold keys in the train schema (k-fold data side not merged)")
    group = tmp_path / "conf" / "cvtest"
    group.mkdir(parents=True)
    (group / "3fold.yaml").write_text(
        "# @package _global_\ncv:\n  folds: 3\nhydra:\n  sweeper:\n    params:\n      cv.fold: range(0,3)\n"
    )
    run_script(
        "train.py",
        "--config-dir",
        str(tmp_path / "conf"),
        *ARGS,
        "+cvtest=3fold",
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=1",
        root=tmp_path,
        timeout=180,
    )
    [study] = _studies(tmp_path).values()
    rows = _summary(tmp_path)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for trial in study.trials:
        lr = f"optimizer.lr={trial.params['optimizer.lr']!r}"
        folds = [r for r in rows if lr in r["overrides"]]
        assert sorted(r["overrides"].split("cv.fold=")[1][0] for r in folds) == ["0", "1", "2"]
        assert trial.value == pytest.approx(sum(float(r["best_val_loss"]) for r in folds) / 3)
