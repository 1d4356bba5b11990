"""A Hydra Sweeper running an Optuna study that survives a crash (hparams_search presets).

Why not hydra-optuna-sweeper: its 1.3.0 pins optuna<3, and on SQLAlchemy 2 its SQLite storage
fails (AssertionError in get_current_version); in memory a study cannot be continued.

The study is stored in SQLite (default <sweep dir>/optuna.db) and loaded if it exists, so the
same command re-run after a crash or Ctrl-C continues it: finished trials are kept, a trial
left RUNNING is run again with its own parameters and resume=auto (each trial has its own run
folder, named by its overrides), which continues its run from the newest checkpoint, and then
told its value. `n_trials` counts all finished trials of the study, of every run of the
command. The objective is the best value of checkpoint.monitor in the trial's metrics.csv
(the value best.pt was kept for); a trial that failed (a diverged loss: exit-2 user error, or
a bug) is told FAIL and the study goes on. One sweep process per storage at a time (a flock on
`<storage file>.lock`, engine/run_dir.py). The storage is data, never code: a stored trial's
params become overrides only inside the declared search space (`checked_params`), so a crafted
optuna.db can set no other key (`_target_`) and no other value (`${oc.create:...}`).

Hydra instantiates sweepers only from the `hydra_plugins` package: `register()` (train.py
calls it before Hydra starts) registers the class under that name and its config as the
`hydra/sweeper` option `optuna`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from engine.errors import EXIT_BAD_INPUT, JOB_FAILED, UserError, first_line, one_line
from engine.run_dir import lock_file, unlock_file
from engine.sweep_summary import best_of, job_run_dir

PLUGIN_MODULE = "hydra_plugins.torch_template_optuna"


@dataclass
class OptunaSweeperConf:
    _target_: str = f"{PLUGIN_MODULE}.OptunaSweeper"
    n_trials: int = 20  # finished trials of the study in all (re-runs count what is done)
    direction: str | None = None  # minimize | maximize; null: from checkpoint.mode
    study_name: str | None = None  # null: the sweep folder's name
    storage: str | None = None  # null: sqlite:///<sweep dir>/optuna.db
    seed: int | None = None  # the TPE sampler's seed
    # key: search space, Hydra's sweep syntax: interval(a,b), tag(log,interval(a,b)),
    # choice(a,b,c), range(a,b[,step])
    params: dict[str, str] = field(default_factory=dict)


class OptunaSweeper(Sweeper):
    """Ask the study for a trial, launch it as one job, tell it the job's result."""

    def __init__(self, n_trials: int = 20, direction: str | None = None,
                 study_name: str | None = None, storage: str | None = None,
                 seed: int | None = None, params: Any = None) -> None:
        self.n_trials, self.direction, self.study_name = int(n_trials), direction, study_name
        self.storage, self.seed = storage, seed
        self.params = {str(k): str(v) for k, v in (params or {}).items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        try:
            return self._sweep(arguments)
        except UserError as err:  # a bad search space or study: one line, exit 2
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    def _sweep(self, arguments: list[str]) -> list[Any]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        db = _sqlite_file(storage)
        lock = Path(f"{db}.lock") if db else sweep_dir / "optuna.lock"
        lock_file(lock, f"{storage} is in use by another sweep ({{holder}}); wait for it to "
                  "finish or stop it, or pick another hydra.sweeper.storage")
        try:
            if db is not None:
                _check_sqlite(db, storage)
            return self._run_study(arguments, sweep_dir, storage)
        finally:
            unlock_file(lock)

    def _run_study(self, arguments: list[str], sweep_dir: Path, storage: str) -> list[Any]:
        import optuna
        from optuna.trial import TrialState
        from sqlalchemy.exc import SQLAlchemyError

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()])
        fixed = [a for a in arguments if a.split("=")[0] not in self.params]
        if not any(a.split("=")[0] == "resume" for a in fixed):
            fixed.append("resume=auto")  # a re-run trial continues its run folder
        distributions = {o.get_key_element(): _distribution(o) for o in space}
        mode = str(self.config.checkpoint.mode)
        direction = self.direction or ("maximize" if mode == "max" else "minimize")
        name = self.study_name or sweep_dir.name
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                        load_if_exists=True)
            directions = [d.name.lower() for d in study.directions]
            trials = study.get_trials(deepcopy=False)
        except (SQLAlchemyError, RuntimeError, ValueError, LookupError, TypeError) as err:
            raise UserError(f"{storage}: cannot open the Optuna study {name!r} "
                            f"({first_line(err, 80)})") from None
        if directions != [direction]:
            raise UserError(f"{storage}: study {name!r} is to {' and '.join(directions)}"
                            f", not {direction} (checkpoint.mode={mode}); pick another "
                            f"hydra.sweeper.study_name")
        for stored in trials:  # all of them, before a trial is asked for (and left RUNNING)
            checked_params(stored, distributions, storage)
        # A re-run seeds on from the trials so far: seed 42 again would sample the same points.
        study.sampler = optuna.samplers.TPESampler(
            seed=None if self.seed is None else self.seed + len(trials))
        finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        done = sum(t.state in finished for t in trials)
        stale = [t for t in trials if t.state == TrialState.RUNNING]
        print(f"optuna: study {name!r} in {storage}: {done} of {self.n_trials} trials done"
              + (f", continuing {len(stale)} interrupted" if stale else ""), flush=True)
        returns = []
        while done < self.n_trials:
            if stale:  # left RUNNING by a crash: run it again, its run folder resumes
                trial = stale.pop(0)
                values = checked_params(trial, distributions, storage)
            else:
                trial = study.ask(distributions)
                values = trial.params
            overrides = fixed + [f"{k}={_value(v)}" for k, v in values.items()]
            [ret] = self.launcher.launch([overrides], initial_job_idx=trial.number)
            value = self._objective(ret)
            if value is None:
                study.tell(trial.number, state=TrialState.FAIL)
            else:
                study.tell(trial.number, value)
            returns.append(ret)
            done += 1
        self._report(study, name)
        return [returns]

    def _objective(self, ret: JobReturn) -> float | None:
        """Best monitored value of the job's run (what best.pt was kept for); None: failed."""
        result = ret._return_value
        if ret.status != JobStatus.COMPLETED or (isinstance(result, dict) and JOB_FAILED in result):
            return None
        cfg = ret.cfg
        value, _ = best_of(job_run_dir(cfg, ret.hydra_cfg), str(cfg.checkpoint.monitor),
                           str(cfg.checkpoint.mode))
        return value if value is not None and math.isfinite(value) else None

    @staticmethod
    def _report(study: Any, name: str) -> None:
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            print(f"optuna: study {name!r}: no trial completed", file=sys.stderr)
            return
        shown = " ".join(f"{k}={_value(v)}" for k, v in best.params.items())
        print(f"optuna: best trial {best.number}: value {best.value:.6g} with {shown}",
              flush=True)


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


_MISSING = "(missing)"


def checked_params(trial: Any, space: dict[str, Any], storage: str) -> dict[str, Any]:
    """A stored trial's params as the sweep's own values (a declared choice, a number in
    range), or a UserError: they become a job's overrides, so a crafted storage must not set
    other keys or values. An enqueued (WAITING) trial's fixed params are checked alike."""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:  # study.ask() takes its fixed params as they are
        params, stored = dict(trial.system_attrs.get("fixed_params") or {}), {}
        names = list(params)
    else:
        params, stored = trial.params, trial.distributions
        names = list(space) + [n for n in params if n not in space]
    values = {}
    for name in names:
        value = params.get(name, _MISSING)
        try:
            values[name] = _own_value(value, stored.get(name), space.get(name))
        except (ValueError, TypeError, ArithmeticError) as err:
            shown = value if value is _MISSING else _cap(repr(value))
            raise UserError(f"{storage}: trial {trial.number} param {_cap(name)}={shown}: not "
                            f"in the search space ({_cap(str(err), 160)}); a changed search "
                            f"space needs another hydra.sweeper.study_name") from None
    return values


def _own_value(value: Any, stored: Any, dist: Any) -> Any:
    """The value `dist` gives for a stored one; ValueError saying why it is outside."""
    from optuna.distributions import (
        CategoricalDistribution,
        IntDistribution,
        check_distribution_compatibility,
    )

    if dist is None:
        raise ValueError("not a key of hydra.sweeper.params")
    if value is _MISSING:
        raise ValueError(f"the sweep declares {dist}")
    if isinstance(value, str) and "${" in value:
        raise ValueError("an interpolation")
    if stored is not None:
        try:
            check_distribution_compatibility(stored, dist)
        except ValueError:
            raise ValueError(f"stored with another distribution than {dist}") from None
    if isinstance(dist, CategoricalDistribution):  # the declared choice, not the stored one
        try:
            return dist.choices[int(dist.to_internal_repr(value))]
        except ValueError:
            raise ValueError(f"not one of {dist.choices}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number in {dist}")
    if not dist._contains(dist.to_internal_repr(value)):
        raise ValueError(f"outside {dist}")
    return int(value) if isinstance(dist, IntDistribution) else float(value)


def _cap(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _sqlite_file(storage: str) -> Path | None:
    """The file of an `sqlite:///` storage; None for another database or in memory."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError:
        raise UserError(f"hydra.sweeper.storage={_cap(storage)}: expected a database URL such "
                        f"as sqlite:///path/optuna.db") from None
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    return Path(database)


def _check_sqlite(path: Path, storage: str) -> None:
    """Refuse a file that is not an intact Optuna storage before Optuna opens it: Optuna would
    add its tables to any SQLite file, and fail midway in a damaged one."""
    import sqlite3
    from contextlib import closing

    from optuna.storages._rdb.models import BaseModel  # Optuna's tables (no public list)

    if not path.is_file() or path.stat().st_size == 0:
        return  # Optuna creates it
    try:
        with closing(sqlite3.connect(path)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            check = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        raise UserError(f"{storage}: not a readable SQLite database ({_cap(str(err))})") from None
    if check != "ok":
        raise UserError(f"{storage}: a damaged SQLite database ({_cap(check)})")
    other = sorted(t for t in tables - set(BaseModel.metadata.tables) - {"alembic_version"}
                   if not t.startswith("sqlite_"))
    if other:
        raise UserError(f"{storage}: not an Optuna storage (other tables: "
                        f"{_cap(', '.join(other))}); pick another hydra.sweeper.storage")


def _distribution(override: Override) -> Any:
    """An Optuna distribution for one hydra.sweeper.params entry."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value, key = override.value(), override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=lambda x: x)))
    if isinstance(value, RangeSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=lambda x: x)))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise UserError(f"hydra.sweeper.params.{key}={override.input_line!r}: expected "
                    f"interval(a,b), tag(log,interval(a,b)), choice(...) or range(...)")


def register() -> None:
    """Make `hydra/sweeper=optuna` known to Hydra (call before @hydra.main runs)."""
    module = sys.modules.setdefault(PLUGIN_MODULE, type(sys)(PLUGIN_MODULE))
    if not hasattr(module, "OptunaSweeper"):
        plugin = type("OptunaSweeper", (OptunaSweeper,), {"__module__": PLUGIN_MODULE})
        module.OptunaSweeper = plugin
        Plugins.instance().register(plugin)
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
                                 provider="torch-hydra-template")
