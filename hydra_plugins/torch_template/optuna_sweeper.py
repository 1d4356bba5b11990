"""`hydra/sweeper=optuna` (the hparams_search presets): an Optuna study that survives a crash.

Not hydra-optuna-sweeper: 1.3.0 pins optuna<3 and its SQLite storage fails on SQLAlchemy 2.
The study is stored in SQLite (default <sweep dir>/optuna.db) and loaded if it exists: the
same command re-run after a crash runs a trial left RUNNING again with its own params and
resume=auto (its run folder is named by its overrides); `n_trials` counts the finished trials
of every run. The objective is the trial run's best checkpoint.monitor value; a failed trial is
told FAIL and the study goes on. One sweep per storage (a flock on `<storage file>.lock`). The
storage is data, never code: a stored trial's params become overrides only inside the declared
search space (`checked_params`), so optuna.db can set no other key and no `${oc.create:...}`.
"""

# No `from __future__ import annotations` here: Hydra's plugin scan runs a plugin module before
# it is in sys.modules, where dataclasses look string annotations up.
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from engine.errors import EXIT_BAD_INPUT, UserError, first_line, one_line
from engine.run_dir import lock_file, unlock_file
from engine.sweeps import best_of, job_error, job_run_dir


@dataclass
class OptunaSweeperConf:
    _target_: str = f"{__name__}.OptunaSweeper"
    n_trials: int = 20  # finished trials of the study in all (re-runs count what is done)
    direction: str | None = None  # minimize | maximize; null: from checkpoint.mode
    study_name: str | None = None  # null: the sweep folder's name
    storage: str | None = None  # null: sqlite:///<sweep dir>/optuna.db
    seed: int | None = None  # the TPE sampler's seed
    # key: search space, Hydra's sweep syntax: interval(a,b), tag(log,interval(a,b)),
    # choice(a,b,c), range(a,b[,step])
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="torch_template")


class OptunaSweeper(Sweeper):
    """Ask the study for a trial, launch it as one job, tell it the job's result."""

    def __init__(self, **options: Any) -> None:
        self.options = OptunaSweeperConf(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        try:
            return self._sweep(arguments)
        except UserError as err:  # a bad search space or study: one line, exit 2
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    def _sweep(self, arguments: list[str]) -> list[Any]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.options.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        db = _sqlite_file(storage)
        lock = Path(f"{db}.lock") if db else sweep_dir / "optuna.lock"
        lock_file(
            lock,
            f"{storage} is in use by another sweep ({{holder}}); wait for it to "
            "finish or stop it, or pick another hydra.sweeper.storage",
        )
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

        opt = self.options
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parser.parse_overrides([f"{k}={v}" for k, v in opt.params.items()])
        distributions = {o.get_key_element(): _distribution(o) for o in space}
        fixed = [a for a in arguments if a.split("=")[0] not in opt.params]
        if not any(a.split("=")[0] == "resume" for a in fixed):
            fixed.append("resume=auto")  # a re-run trial continues its run folder
        mode = str(self.config.checkpoint.mode)
        direction = opt.direction or ("maximize" if mode == "max" else "minimize")
        name = opt.study_name or sweep_dir.name
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
            directions = [d.name.lower() for d in study.directions]
            trials = study.get_trials(deepcopy=False)
        except (SQLAlchemyError, RuntimeError, ValueError, LookupError, TypeError) as err:
            raise UserError(f"{storage}: cannot open the Optuna study {name!r} ({first_line(err, 80)})") from None
        if directions != [direction]:
            raise UserError(
                f"{storage}: study {name!r} is to {' and '.join(directions)}"
                f", not {direction} (checkpoint.mode={mode}); pick another "
                f"hydra.sweeper.study_name"
            )
        # every stored trial, before a trial is asked for (and left RUNNING)
        checked = {t.number: checked_params(t, distributions, storage) for t in trials}
        # A re-run seeds on from the trials so far: seed 42 again would sample the same points.
        study.sampler = optuna.samplers.TPESampler(seed=None if opt.seed is None else opt.seed + len(trials))
        done = sum(t.state.is_finished() for t in trials)
        stale = [t for t in trials if t.state == TrialState.RUNNING]
        print(
            f"optuna: study {name!r} in {storage}: {done} of {opt.n_trials} trials done"
            + (f", continuing {len(stale)} interrupted" if stale else ""),
            flush=True,
        )
        returns = []
        for _ in range(done, opt.n_trials):
            if stale:  # left RUNNING by a crash: run it again, its run folder resumes
                trial = stale.pop(0)
                values = checked[trial.number]
            else:
                trial = study.ask(distributions)
                values = trial.params
            overrides = fixed + [f"{k}={_value(v)}" for k, v in values.items()]
            [ret] = self.launcher.launch([overrides], initial_job_idx=trial.number)
            value = self._objective(ret)
            study.tell(trial.number, value, state=TrialState.FAIL if value is None else None)
            returns.append(ret)
        try:
            best = study.best_trial
            shown = " ".join(f"{k}={_value(v)}" for k, v in best.params.items())
            print(f"optuna: best trial {best.number}: value {best.value:.6g} with {shown}", flush=True)
        except ValueError:  # no trial completed
            print(f"optuna: study {name!r}: no trial completed", file=sys.stderr)
        return [returns]

    def _objective(self, ret: JobReturn) -> float | None:
        """Best monitored value of the job's run (what best.pt was kept for); None: failed."""
        if job_error(ret) is not None:
            return None
        cfg = ret.cfg
        return best_of(job_run_dir(cfg, ret.hydra_cfg), str(cfg.checkpoint.monitor), str(cfg.checkpoint.mode))[0]


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


_MISSING = "(missing)"


def checked_params(trial: Any, space: dict[str, Any], storage: str) -> dict[str, Any]:
    """A stored trial's params as the sweep's own values (a declared choice, a number in
    range), or a UserError: they become a job's overrides. An enqueued (WAITING) trial's fixed
    params are checked alike."""
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
            raise UserError(
                f"{storage}: trial {trial.number} param {_cap(name)}={shown}: not "
                f"in the search space ({_cap(str(err), 160)}); a changed search "
                f"space needs another hydra.sweeper.study_name"
            ) from None
    return values


def _own_value(value: Any, stored: Any, dist: Any) -> Any:
    """The value `dist` gives for a stored one; ValueError saying why it is outside."""
    from optuna import distributions as od

    if dist is None:
        raise ValueError("not a key of hydra.sweeper.params")
    if value is _MISSING:
        raise ValueError(f"the sweep declares {dist}")
    if isinstance(value, str) and "${" in value:
        raise ValueError("an interpolation")
    if stored is not None:
        try:
            od.check_distribution_compatibility(stored, dist)
        except ValueError:
            raise ValueError(f"stored with another distribution than {dist}") from None
    if isinstance(dist, od.CategoricalDistribution):  # the declared choice, not the stored one
        try:
            return dist.choices[int(dist.to_internal_repr(value))]
        except ValueError:
            raise ValueError(f"not one of {dist.choices}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number in {dist}")
    if not dist._contains(dist.to_internal_repr(value)):
        raise ValueError(f"outside {dist}")
    return int(value) if isinstance(dist, od.IntDistribution) else float(value)


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
        raise UserError(
            f"hydra.sweeper.storage={_cap(storage)}: expected a database URL such as sqlite:///path/optuna.db"
        ) from None
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
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            check = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        raise UserError(f"{storage}: not a readable SQLite database ({_cap(str(err))})") from None
    if check != "ok":
        raise UserError(f"{storage}: a damaged SQLite database ({_cap(check)})")
    other = sorted(
        t for t in tables - set(BaseModel.metadata.tables) - {"alembic_version"} if not t.startswith("sqlite_")
    )
    if other:
        raise UserError(
            f"{storage}: not an Optuna storage (other tables: "
            f"{_cap(', '.join(other))}); pick another hydra.sweeper.storage"
        )


def _distribution(override: Override) -> Any:
    """An Optuna distribution for one hydra.sweeper.params entry."""
    from optuna import distributions as od

    value = override.value()
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return od.CategoricalDistribution(list(override.sweep_iterator(transformer=lambda x: x)))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return od.IntDistribution(int(value.start), int(value.end), log=log)
        return od.FloatDistribution(float(value.start), float(value.end), log=log)
    raise UserError(
        f"hydra.sweeper.params.{override.get_key_element()}="
        f"{override.input_line!r}: expected interval(a,b), tag(log,interval(a,b)), "
        f"choice(...) or range(...)"
    )
