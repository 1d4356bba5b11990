"""The Optuna sweeper's storage is a file, never code
(hydra_plugins/torch_template/optuna_sweeper.py): a stored trial's params become a job's
overrides only inside the declared search space, and a corrupt or foreign optuna.db, a changed
search space or a second sweep of the same storage end in one line, exit 2, with no trial
left RUNNING and the storage's bytes untouched.

The crafted storages are made with Optuna's public API (create_trial, add_trial,
enqueue_trial) by a seeded generator, and run through the sweeper in-process with a launcher
that only records what it is given; three cases also go through `python train.py -m`."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import run_script
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from engine.sweeps import sweep_folder
from hydra_plugins.torch_template.optuna_sweeper import OptunaSweeper, checked_params
from tests.helpers import assert_one_line, deadline, raises_user_error

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "optimizer.lr": "tag(log, interval(0.001, 0.5))",
    "data.batch_size": "choice(8, 16)",
    "optimizer.momentum": "interval(0.5, 0.95)",
}
DISTS = {
    "optimizer.lr": FloatDistribution(0.001, 0.5, log=True),  # what the sweeper builds
    "data.batch_size": CategoricalDistribution([8, 16]),
    "optimizer.momentum": FloatDistribution(0.5, 0.95),
}
GOOD = {"optimizer.lr": 0.01, "data.batch_size": 16, "optimizer.momentum": 0.9}
SPECIAL = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
DEPTHS = ("", "model.", "optimizer.", "data.augment.0.", "model.encoder.layers.1.", "hydra.")


def resolvers(marker: Path) -> list[str]:
    """Every OmegaConf/Hydra resolver a value could smuggle in (the first runs a command)."""
    return [
        f"${{oc.create:{{_target_: os.system, _args_: [touch {marker}]}}}}",
        "${oc.env:HOME}",
        "${oc.decode:'{_target_: os.system, _args_: [id]}'}",
        "${oc.select:hydra.run.dir,x}",
        "${hydra:runtime.cwd}",
        "a${oc.env:PATH}b",
        "${oc.dict.values:model}",
        "${now:%H}",
        "${model._target_}",
    ]


class Recorder:
    """A launcher that runs nothing: it records the overrides and says the job failed."""

    def __init__(self) -> None:
        self.jobs: list[list[str]] = []

    def launch(self, job_overrides, initial_job_idx):
        self.jobs.extend(job_overrides)
        return [JobReturn(status=JobStatus.FAILED)]


def sweeper(sweep_dir: Path, params: dict = SPACE, n_trials: int = 3, study: str = "s") -> OptunaSweeper:
    """The sweeper as Hydra sets it up, with the Recorder as launcher."""
    s = OptunaSweeper(n_trials=n_trials, study_name=study, sampler={"seed": 0}, params=params)
    s.config = OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(sweep_dir)}},
            "checkpoint": {"mode": "min", "monitor": "val_loss"},
            "trainer": {"epochs": 2},
        }
    )
    s.hydra_context, s.launcher = SimpleNamespace(config_loader=None), Recorder()
    return s


def storage_of(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"


def add(study: optuna.Study, state: TrialState, params: dict, dists: dict | None = None) -> int:
    """A stored trial with `params` (each stored in `dists`, default the sweep's own); its
    number."""
    if state == TrialState.WAITING:
        study.enqueue_trial(params)
    else:
        dists = {k: (dists or {}).get(k, DISTS.get(k)) for k in params}
        study.add_trial(
            create_trial(
                state=state, params=params, distributions=dists, value=0.5 if state == TrialState.COMPLETE else None
            )
        )
    return study.trials[-1].number


def _stored_as(name: str, value) -> object:
    """A distribution holding `value`, as a crafted storage would write it (log like the
    sweep's where it can be, so that only the range is wrong)."""
    if isinstance(value, float):
        ours = DISTS.get(name)
        log = isinstance(ours, FloatDistribution) and ours.log and value > 0
        return FloatDistribution(1e-300 if log else -1e300, 1e300, log=log)
    if isinstance(value, int) and not isinstance(value, bool):
        return IntDistribution(-(10**9), 10**9)
    return CategoricalDistribution([value])


def crafted(rng: random.Random, marker: Path, waiting: bool) -> tuple[str, str, dict, dict]:
    """One attack: (what, the param the error must name first, params, their distributions).
    An enqueued (`waiting`) trial has fixed params only: no distributions to get wrong."""
    params, dists = dict(GOOD), dict(DISTS)
    kind = rng.choice(
        ["resolver", "special", "outside_name", "out_of_range"] + ([] if waiting else ["wrong_kind", "missing"])
    )
    if kind == "resolver":  # a resolver string as the value of a declared or a special key
        name = rng.choice([*GOOD, rng.choice(DEPTHS) + rng.choice(SPECIAL)])
        params[name] = rng.choice(resolvers(marker))
    elif kind == "special":  # a Hydra special key as a param name, at some depth
        name = rng.choice(DEPTHS) + rng.choice(SPECIAL)
        params[name] = rng.choice(["os.system", "builtins.exec", True, f"[touch {marker}]"])
    elif kind == "outside_name":
        name = rng.choice(
            [
                "seed",
                "checkpoint.root",
                "hydra.run.dir",
                "optimizer.lr,x",
                "optimizer.lr=1",
                "+model.extra",
                "~model",
                "optimizer",
            ]
        )
        params[name] = rng.choice([1, 0.5, "x", "/tmp"])
    elif kind == "out_of_range":
        name, value = rng.choice(
            [
                ("optimizer.lr", rng.choice([0.0, -1.0, 0.6, 1e300, 5e-4])),
                ("optimizer.momentum", rng.choice([0.4, 0.96, -1.0] + [10**400] * waiting)),
                ("data.batch_size", rng.choice([32, 0, "8", "16 ", None])),
            ]
        )
        params[name] = value
    elif kind == "missing":  # a declared param left out
        name = rng.choice(list(GOOD))
        del params[name], dists[name]
        return kind, name, params, dists
    else:  # the declared name and a fitting value, stored under another kind of distribution
        name, value, dist = rng.choice(
            [
                ("optimizer.lr", 0.01, CategoricalDistribution([0.01, 0.1])),
                ("optimizer.lr", 0.01, FloatDistribution(0.001, 0.5)),  # not log
                ("optimizer.lr", 1, IntDistribution(1, 3)),
                ("data.batch_size", 8, IntDistribution(8, 16)),
                ("data.batch_size", 8, CategoricalDistribution([8, 16, "${oc.env:HOME}"])),
                ("optimizer.momentum", 0.9, FloatDistribution(0.5, 0.95, log=True)),
                ("optimizer.momentum", 0.9, CategoricalDistribution([0.9])),
            ]
        )
        params[name], dists[name] = value, dist
    if name not in DISTS or kind in ("resolver", "out_of_range"):
        dists[name] = _stored_as(name, params[name])
    if waiting:
        return kind, name, {name: params[name]}, {}
    return kind, name, params, dists


def _running(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]


def test_the_sweep_reruns_a_stored_trial_with_the_declared_values_only(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    study = optuna.create_study(study_name="s", storage=storage_of(sweep_dir))
    add(study, TrialState.COMPLETE, GOOD)
    add(study, TrialState.RUNNING, {"optimizer.lr": 0.2, "data.batch_size": 8, "optimizer.momentum": 0.5})
    s = sweeper(sweep_dir)
    s._sweep(["trainer.max_time=60"])
    assert s.launcher.jobs[0] == [
        "trainer.max_time=60",
        "resume=auto",
        "optimizer.lr=0.2",
        "data.batch_size=8",
        "optimizer.momentum=0.5",
    ]
    assert len(s.launcher.jobs) == 2  # then one asked trial: 3 done
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL"]
    # the sweep's own declared choice is used, never the stored object (True == 1)
    trial = create_trial(
        state=TrialState.RUNNING, params={"k": True}, distributions={"k": CategoricalDistribution([True, 16])}
    )
    [value] = checked_params(trial, {"k": CategoricalDistribution([1, 16])}, "db").values()
    assert value == 1 and type(value) is int


@pytest.mark.parametrize("seed", range(3))
def test_crafted_trials_are_refused_before_any_job_runs(tmp_path, seed):
    rng = random.Random(seed)
    marker = tmp_path / "MARKER"
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    storage = storage_of(sweep_dir)
    for case in range(12):
        state = rng.choice(
            [TrialState.RUNNING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
        )
        kind, name, params, dists = crafted(rng, marker, state == TrialState.WAITING)
        study = optuna.create_study(study_name=f"s{case}", storage=storage)
        if all(dists[k] == DISTS[k] for k in DISTS if k in dists):  # (Optuna refuses a
            # trial whose param is stored in another distribution than an earlier one's)
            for _ in range(rng.randrange(3)):
                add(study, rng.choice([TrialState.COMPLETE, TrialState.RUNNING]), GOOD)
        number = add(study, state, params, dists)
        before = [(t.number, t.state) for t in study.trials]
        s = sweeper(sweep_dir, study=f"s{case}")
        what = f"case {case}: {kind} {state.name} {params}"
        with deadline(30):
            message = raises_user_error(
                s._sweep, [], needles=(storage, f"trial {number} param ", "not in the search space")
            )
        shown = message.split(f"trial {number} param ")[1]
        assert shown.startswith(f"{name}="), (what, message)
        assert s.launcher.jobs == [], what
        assert [(t.number, t.state) for t in study.trials] == before, what
        assert not marker.exists()


def test_corrupt_or_foreign_storage_is_refused_and_left_as_it_was(tmp_path):
    import sqlite3
    from contextlib import closing

    rng = random.Random(7)
    good = tmp_path / "good"
    good.mkdir()
    study = optuna.create_study(study_name="s", storage=storage_of(good))
    for _ in range(15):
        add(study, TrialState.COMPLETE, GOOD)
    data = (good / "optuna.db").read_bytes()

    def edited(sql: str, content: bytes = data) -> bytes:
        path = tmp_path / "edited.db"
        path.write_bytes(content)
        with closing(sqlite3.connect(path)) as db:
            db.execute(sql)
            db.commit()
        return path.read_bytes()

    cases = {  # what -> (the file's bytes, what the error names besides the storage)
        "garbage": (rng.randbytes(rng.randrange(100, 20000)), "not a readable SQLite database"),
        "truncated": (data[: rng.randrange(1, len(data) - 4096)], ""),
        "other tables": (edited("CREATE TABLE customers (name TEXT)", b""), "customers"),
        "extra table": (edited("CREATE TABLE evil (x)"), "evil"),
        "unknown distribution": (
            edited('UPDATE trial_params SET distribution_json = \'{"name": "Evil", "attributes": {}}\''),
            "",
        ),
        "choice index": (edited("UPDATE trial_params SET param_value = 99 WHERE param_name = 'data.batch_size'"), ""),
        "infinite value": (
            edited("UPDATE trial_params SET param_value = 1e999 WHERE param_name = 'optimizer.lr'"),
            "trial 0 param optimizer.lr",
        ),
    }
    for what, (content, needle) in cases.items():
        sweep_dir = tmp_path / what.replace(" ", "_")
        sweep_dir.mkdir()
        (sweep_dir / "optuna.db").write_bytes(content)
        s = sweeper(sweep_dir)
        with deadline(30):
            raises_user_error(s._sweep, [], needles=(storage_of(sweep_dir), needle))
        assert (sweep_dir / "optuna.db").read_bytes() == content, what
        assert s.launcher.jobs == [], what


def test_a_changed_search_space_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    s = sweeper(sweep_dir, n_trials=2)
    with pytest.raises(SystemExit):  # every trial failed (the Recorder runs none)
        s._sweep([])
    storage = storage_of(sweep_dir)
    changed = {**SPACE, "optimizer.lr": "choice(0.01, 0.1)"}  # interval -> choice
    for space, needle in ((changed, "optimizer.lr="), ({**SPACE, "seed": "choice(1, 2)"}, "seed=(missing)")):
        again = sweeper(sweep_dir, params=space, n_trials=4)
        raises_user_error(again._sweep, [], needles=(storage, "trial 0 param ", needle))
        assert again.launcher.jobs == []
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]


def test_a_second_sweep_of_the_same_storage_is_refused_at_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    with open(sweep_dir / "optuna.db.lock", "w") as held:  # as another sweep process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        s = sweeper(sweep_dir)
        with deadline(30):
            raises_user_error(
                s._sweep, [], needles=(storage_of(sweep_dir), f"in use by another sweep (pid {os.getpid()})")
            )
    assert not (sweep_dir / "optuna.db").exists() and s.launcher.jobs == []
    with pytest.raises(SystemExit):  # released: it runs (the Recorder's trials fail: exit 2)
        s._sweep([])
    assert len(s.launcher.jobs) == 3


# ---------------------------------------------------------------- through `python train.py -m`

ARGS = (
    "-m",
    "hparams_search=linear_optuna",
    "hydra.sweeper.n_trials=2",
    "trainer.epochs=1",
    "trainer.model_summary=false",
    "checkpoint.export=false",
)
LR = FloatDistribution(0.001, 0.5, log=True)


def _one_error(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    from engine.errors import UserError

    return assert_one_line(UserError(lines[0]), *needles)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["resolver value", "special keys"])
def test_train_refuses_a_crafted_running_trial(tmp_path, attack):
    marker = tmp_path / "MARKER"
    sweep_dir = tmp_path / sweep_folder("linear_regression", None, list(ARGS[1:]))  # the command's folder
    sweep_dir.mkdir(parents=True)
    storage = storage_of(sweep_dir)
    study = optuna.create_study(study_name=sweep_dir.name, storage=storage)
    if attack == "resolver value":  # (stored as a choice: no other trial may have lr a float)
        name, params = "optimizer.lr", {"optimizer.lr": resolvers(marker)[0]}
    else:  # what the old sweeper passed as `model._target_=os.system model._args_=[touch ..]`
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE, value=0.1, params={"optimizer.lr": 0.01}, distributions={"optimizer.lr": LR}
            )
        )
        name, params = (
            "model._target_",
            {"optimizer.lr": 0.01, "model._target_": "os.system", "model._args_": f"[touch {marker}]"},
        )
    dists = {k: LR if isinstance(v, float) else CategoricalDistribution([v]) for k, v in params.items()}
    study.add_trial(create_trial(state=TrialState.RUNNING, params=params, distributions=dists))
    before = [t.state.name for t in study.trials]
    result = run_script("train.py", *ARGS, root=tmp_path, check=False, timeout=120)
    _one_error(result, storage, f"trial {len(before) - 1} param {name}=", "not in the search space")
    assert not marker.exists()
    assert [t.state.name for t in study.trials] == before  # none added, none RUNNING more
    assert not any(p.is_dir() for p in sweep_dir.iterdir())  # no job ran


@pytest.mark.slow
def test_train_refuses_a_second_sweep_at_once(tmp_path):
    sweep_dir = tmp_path / sweep_folder("linear_regression", None, list(ARGS[1:]))
    sweep_dir.mkdir(parents=True)
    with open(sweep_dir / "optuna.db.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_script("train.py", *ARGS, root=tmp_path, check=False, timeout=120)
    _one_error(result, storage_of(sweep_dir), f"in use by another sweep (pid {os.getpid()})")
    assert not (sweep_dir / "optuna.db").exists()
