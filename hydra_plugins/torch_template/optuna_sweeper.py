"""`hydra/sweeper=optuna` (the hparams_search presets): an Optuna study that survives a crash.

Not hydra-optuna-sweeper: 1.3.0 pins optuna<3 and its SQLite storage fails on SQLAlchemy 2.
The study is stored in SQLite (default <sweep dir>/optuna.db) and loaded if it exists; its
default name is the sweep folder's plus a hash of the overrides that change results
(engine.sweeps.result_overrides): other epochs or data are another study, and a named study
refuses other overrides. The same command re-run after a crash runs a trial left RUNNING again
with its own params and resume=auto (its run folder is named by its overrides); `n_trials`
counts the finished trials of this study. The objective is the trial run's best
checkpoint.monitor value (with cv.fold in params: the mean over the folds' runs); a failed trial
is told FAIL and the study goes on; a trial its job pruned (hydra.sweeper.pruner, TrialPruning)
is told PRUNED. trainer.fast_dev_run=true searches an in-memory study. One sweep per storage (a
flock on `<storage file>.lock`; the jobs' reports do not take it). The storage is data, never
code: a stored trial's params become overrides only inside the declared search space
(`checked_params`), so optuna.db can set no other key and no `${oc.create:...}`.
"""

# No `from __future__ import annotations` here: Hydra's plugin scan runs a plugin module before
# it is in sys.modules, where dataclasses look string annotations up.
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from engine.errors import EXIT_BAD_INPUT, UserError, first_line, one_line
from engine.run_dir import lock_file, unlock_file
from engine.sweeps import PRUNED, best_of, job_run_dir, job_status, quoted, result_overrides

CV_FOLD = "cv.fold"  # in params: one job per fold for each trial, not a search dimension
PRUNED_AT = "pruned_at_epoch"  # a trial's user attr: its job decided to prune it (a resumed job obeys it)


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | cmaes (cmaes: pip install cmaes)
    seed: int | None = None  # trial N samples with seed + N: a re-run samples as an unbroken sweep
    n_startup_trials: int | None = None  # tpe, cmaes: random trials first; null: Optuna's default


@dataclass
class PrunerConf:
    name: str = "none"  # median | hyperband | none: stop a trial whose per-epoch checkpoint.monitor lags
    n_startup_trials: int = 5  # median: no pruning until this many trials completed
    n_warmup_steps: int = 0  # median: no pruning at an epoch below this


@dataclass
class OptunaSweeperConf:
    _target_: str = f"{__name__}.OptunaSweeper"
    n_trials: int = 20  # finished trials of the study in all (re-runs count what is done)
    n_jobs: int = 1  # trials launched at once, in one batch (hydra/launcher=submitit_local: side by side)
    direction: str | None = None  # minimize | maximize; null: from checkpoint.mode
    study_name: str | None = None  # null: the sweep folder's name (named by the overrides that change results)
    storage: str | None = None  # null: sqlite:///<sweep dir>/optuna.db
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    seed: int | None = None  # moved to sampler.seed: refused
    trial: int | None = None  # set by the sweeper in a trial's job (with storage, study_name): pruning
    # key: search space, Hydra's sweep syntax: interval(a,b), tag(log,interval(a,b)),
    # choice(a,b,c), range(a,b[,step])
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="torch_template")


class OptunaSweeper(Sweeper):
    """Ask the study for trials, launch them as jobs (n_jobs trials, each its folds, in one batch),
    tell it each job's result."""

    def __init__(self, **options: Any) -> None:
        self.options = OmegaConf.to_object(OmegaConf.merge(OptunaSweeperConf, options))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        try:
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                raise UserError(
                    f"hparams_search under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): start the sweep as one "
                    "process, python train.py -m hparams_search=...; a trial on several GPUs: "
                    "hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node"
                )
            return self._sweep(arguments)
        except UserError as err:  # a bad search space or study: one line, exit 2
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None

    def _sweep(self, arguments: list[str]) -> list[Any]:
        opt = self.options
        if opt.seed is not None:
            raise UserError(f"hydra.sweeper.seed={opt.seed}: moved to hydra.sweeper.sampler.seed")
        if opt.n_jobs < 1:
            raise UserError(f"hydra.sweeper.n_jobs={opt.n_jobs}: expected 1 or more trials at once")
        epochs = int(self.config.trainer.epochs)
        make_sampler(opt.sampler, 0)  # a bad name or setting: one line, before any file
        make_pruner(opt.pruner, epochs)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if self.config.trainer.get("fast_dev_run"):  # a smoke test: never part of a real study
            print("optuna: trainer.fast_dev_run=true: an in-memory study, nothing stored", flush=True)
            return self._run_study(arguments, sweep_dir, None)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = opt.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
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

    def _run_study(self, arguments: list[str], sweep_dir: Path, storage: str | None) -> list[Any]:
        import optuna
        from optuna.trial import TrialState
        from sqlalchemy.exc import SQLAlchemyError

        opt = self.options
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parser.parse_overrides([f"{k}={v}" for k, v in opt.params.items()])
        folds = [list(o.sweep_iterator(transformer=lambda x: x)) for o in space if o.get_key_element() == CV_FOLD]
        distributions = {o.get_key_element(): _distribution(o) for o in space if o.get_key_element() != CV_FOLD}
        fixed = [a for a in arguments if a.split("=")[0] not in opt.params]
        if not any(a.split("=")[0] == "resume" for a in fixed):
            fixed.append("resume=auto")  # a re-run trial continues its run folder
        mode = str(self.config.checkpoint.mode)
        direction = opt.direction or ("maximize" if mode == "max" else "minimize")
        name = opt.study_name or sweep_dir.name  # the folder is named by the result overrides
        identity = result_overrides(arguments)
        pruner = make_pruner(opt.pruner, int(self.config.trainer.epochs))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(
                study_name=name, storage=open_storage(storage), direction=direction, pruner=pruner, load_if_exists=True
            )
            directions = [d.name.lower() for d in study.directions]
            trials = study.get_trials(deepcopy=False)
            searched = study.user_attrs.get("overrides")
            if searched is None and not trials:
                study.set_user_attr("overrides", identity)
        except (SQLAlchemyError, RuntimeError, ValueError, LookupError, TypeError) as err:
            raise UserError(f"{storage}: cannot open the Optuna study {name!r} ({first_line(err, 80)})") from None
        if directions != [direction]:
            raise UserError(
                f"{storage}: study {name!r} is to {' and '.join(directions)}"
                f", not {direction} (checkpoint.mode={mode}); pick another "
                f"hydra.sweeper.study_name"
            )
        if searched is not None and searched != identity:
            was, now = (
                _cap(" ".join(sorted(set(a) - set(b))) or "(none)")
                for a, b in ((searched, identity), (identity, searched))
            )
            raise UserError(
                f"{storage}: study {name!r} was searched with {was}, now {now}: another search; pick another "
                "hydra.sweeper.study_name (null: a study per set of overrides)"
            )
        # every stored trial, before a trial is asked for (and left RUNNING)
        checked = {t.number: checked_params(t, distributions, storage or "memory") for t in trials}
        done = sum(t.state.is_finished() for t in trials)
        stale = [t for t in trials if t.state == TrialState.RUNNING]
        print(
            f"optuna: study {name!r} ({' '.join(identity) or 'no overrides'}) in {storage or 'memory'}: "
            f"{done} of {opt.n_trials} trials done" + (f", continuing {len(stale)} interrupted" if stale else ""),
            flush=True,
        )
        if folds and opt.pruner.name != "none":
            print("optuna: pruning is off with cross-validation (cv.fold in params)", flush=True)
        # each trial's job finds its trial through the storage (it may run in another process)
        pruning = storage is not None and opt.pruner.name != "none" and not folds
        find = [f"hydra.sweeper.{k}={quoted(str(v))}" for k, v in (("storage", storage), ("study_name", name))]
        returns, asked = [], len(trials)
        while done < opt.n_trials:
            batch = []  # (trial number, params): left RUNNING by a crash first (their run folders resume)
            for _ in range(min(opt.n_jobs, opt.n_trials - done)):
                if stale:
                    trial = stale.pop(0)
                    batch.append((trial.number, checked[trial.number]))
                else:  # sampler seed + trial number: the same points whether or not the sweep was restarted
                    study.sampler = make_sampler(opt.sampler, asked)
                    trial = study.ask(distributions)
                    asked += 1
                    batch.append((trial.number, trial.params))
            jobs = [
                fixed
                + [f"{k}={_value(v)}" for k, v in values.items()]
                + ([f"{CV_FOLD}={_value(f)}"] if folds else [])
                + (find + [f"hydra.sweeper.trial={number}"] if pruning else [])
                for number, values in batch
                for f in (folds[0] if folds else [None])
            ]
            rets = list(self.launcher.launch(jobs, initial_job_idx=batch[0][0]))
            per_trial = len(folds[0]) if folds else 1
            for i, (number, _) in enumerate(batch):
                mine = rets[i * per_trial : (i + 1) * per_trial]
                if not folds and job_status(mine[0])[0] == PRUNED:
                    study.tell(number, state=TrialState.PRUNED)  # its value: the last one reported
                    continue
                values = [self._objective(r) for r in mine]
                value = None if None in values else statistics.fmean(values)
                study.tell(number, value, state=TrialState.FAIL if value is None else None)
            done += len(batch)
            returns.extend(rets)
        try:
            best = study.best_trial
            shown = " ".join(f"{k}={_value(v)}" for k, v in best.params.items())
            print(f"optuna: best trial {best.number}: value {best.value:.6g} with {shown}", flush=True)
        except ValueError:  # no trial completed: a failed search, as a failed run
            states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
            counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
            print(f"error: optuna: study {name!r}: no trial completed ({counts})", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        return [returns]

    def _objective(self, ret: JobReturn) -> float | None:
        """Best monitored value of the job's run (what best.pt was kept for); None: failed.
        trainer.fast_dev_run writes no run: the value of its one epoch, as the job returned it."""
        if job_status(ret)[0] == "failed":
            return None
        cfg = ret.cfg
        monitor = str(cfg.checkpoint.monitor)
        if cfg.trainer.get("fast_dev_run"):
            return ret._return_value.get(monitor) if isinstance(ret._return_value, dict) else None
        return best_of(job_run_dir(cfg, ret.hydra_cfg), monitor, str(cfg.checkpoint.mode))[0]


def make_sampler(conf: SamplerConf, number: int) -> Any:
    """The sampler of hydra.sweeper.sampler for trial `number` (seeded seed + number)."""
    import optuna

    seed = None if conf.seed is None else conf.seed + number
    startup = {} if conf.n_startup_trials is None else {"n_startup_trials": conf.n_startup_trials}
    if conf.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    if conf.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if conf.name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise UserError("hydra.sweeper.sampler.name=cmaes needs the cmaes package: pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **startup)
    raise UserError(f"hydra.sweeper.sampler.name={conf.name!r}: expected tpe, random or cmaes")


def make_pruner(conf: PrunerConf, epochs: int) -> Any:
    """The pruner of hydra.sweeper.pruner (steps: epochs)."""
    import optuna

    if conf.name == "none":
        return optuna.pruners.NopPruner()
    if conf.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.n_startup_trials, n_warmup_steps=conf.n_warmup_steps)
    if conf.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    raise UserError(f"hydra.sweeper.pruner.name={conf.name!r}: expected median, hyperband or none")


def open_storage(url: str | None) -> Any:
    """Optuna's storage for `url` (None: in memory); SQLite waits up to a minute for a lock held
    by a parallel trial's job instead of failing at once."""
    import optuna

    if url is None:
        return None
    timeout = {} if _sqlite_file(url) is None else {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    return optuna.storages.RDBStorage(url, **timeout)


class TrialPruning:
    """This job's Optuna trial (hydra.sweeper.pruner): each epoch reports the monitored value and
    says whether to stop. A job resumed after a kill reports what the storage lacks and decides as
    the unbroken job did: the pruner judges the newest report, and a prune decided before the kill
    stands (Hyperband's decisions change its trial's state: asked again, it would answer otherwise)."""

    def __init__(self, storage: Any, study_name: str, number: int, pruner: Any, epochs: int) -> None:
        import optuna

        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
        frozen = storage.get_trial(trial_id)
        self.trial, self.epochs = optuna.Trial(study, trial_id), epochs
        self.stored, self.decided = dict(frozen.intermediate_values), frozen.user_attrs.get(PRUNED_AT)

    def _report(self, epoch: int, value: float) -> None:
        if epoch not in self.stored:  # (reported before a kill: the same value, as training resumes exactly)
            self.trial.report(value, epoch)
            self.stored[epoch] = value

    def prune(self, epoch: int, value: float) -> bool:
        """Report `value` at `epoch`; True: the trial is pruned (never at the last epoch: complete)."""
        self._report(epoch, value)
        if epoch >= self.epochs:
            return False
        if self.decided is not None or self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT, epoch)
            return True
        return False

    def resume(self, history: list[dict], monitor: str) -> bool:
        """A resumed job: report what its history has and the storage lacks; pruned again?"""
        for row in history:
            self._report(row["epoch"], row[monitor])
        return bool(history) and self.prune(history[-1]["epoch"], history[-1][monitor])


def is_pruned_trial_job() -> bool:
    """Is this job an Optuna trial with a pruner (read from its hydra config: the same on every
    rank, so only such jobs pay a collective per epoch to agree on pruning)?"""
    if not HydraConfig.initialized():
        return False
    conf = HydraConfig.get().sweeper
    return str(conf.get("_target_", "")).endswith(".OptunaSweeper") and conf.get("trial") is not None


def trial_pruning(cfg: DictConfig) -> TrialPruning | None:
    """The pruning of the Optuna trial this job runs, found through its hydra config and the
    storage; None outside an Optuna sweep with a pruner."""
    import optuna

    if not is_pruned_trial_job():
        return None
    conf = HydraConfig.get().sweeper
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs = int(cfg.trainer.epochs)
    pruner = make_pruner(PrunerConf(**conf.pruner), epochs)
    return TrialPruning(open_storage(str(conf.storage)), str(conf.study_name), int(conf.trial), pruner, epochs)


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
