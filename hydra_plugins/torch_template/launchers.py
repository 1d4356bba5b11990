"""`hydra/launcher=submitit_local|submitit_slurm` (and the slurm.yaml preset on top):
hydra-submitit-launcher's launchers, requeue-aware.

Its job calls `checkpoint()` from submitit's SIGUSR2 handler (SLURM's notice `signal_delay_s`
before a time limit) and requeues at once, mid-step. Here the training loop's handler
(engine/training.py) takes the signal, finishes the step, saves and exits 3; only then does
`__call__` hand the signal to submitit's handler, and `checkpoint()` adds resume=auto. A job
SLURM requeued itself (SLURM_RESTART_COUNT > 0) resumes alike. SIGTERM and Ctrl-C just stop.
A job killed outright (SIGKILL, out of memory, node failure) leaves no result: one `error:` line
naming it, the sweep goes on, and ends with exit 2 (the job `interrupted` in the summary).
"""

import copyreg
import importlib
import os
import signal
import sys
import types
from dataclasses import dataclass
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

from engine import training
from engine.errors import EXIT_INTERRUPTED, failed_job, preempt_signal


def with_resume_auto(overrides: list[str]) -> list[str]:
    """The overrides with any `resume=...` replaced by resume=auto (`resume` is not part of a
    sweep job's folder name: the run folder stays the same)."""
    return [*(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"), "resume=auto"]


def _by_import(module: types.ModuleType) -> tuple[Any, tuple[str]]:
    return importlib.import_module, (module.__name__,)


def picklable_modules() -> None:
    """Pickle every module of a ModuleType subclass as its import: cloudpickle pickles
    train.py's functions by value (it is __main__) with the submodules they name, and cannot
    pickle torch.utils.deterministic, whose class is a ModuleType subclass."""
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType) and type(module) is not types.ModuleType:
            copyreg.pickle(type(module), _by_import)


class _Requeue(base.BaseSubmititLauncher):
    """The requeue decisions; the launching itself is hydra-submitit-launcher's."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        """The plugin's launch, with a killed job's result a failed job's instead of submitit's
        UncompletedJobError (the plugin waits for each job with `Job.results`)."""
        from submitit.core.core import Job

        picklable_modules()  # submitit pickles the task function next
        results = Job.results
        Job.results = lambda job: _results_or_killed(job, results)
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            Job.results = results

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:  # SLURM requeued it
            sweep_overrides = with_resume_auto(sweep_overrides)
        notice = preempt_signal()
        submitit_handler = signal.getsignal(notice) if notice is not None else None
        training.received.clear()
        try:
            return super().__call__(sweep_overrides, *args, **kwargs)
        except SystemExit as stop:  # saved and stopped (exit 3) on the notice: requeue now
            if stop.code == EXIT_INTERRUPTED and notice in training.received and callable(submitit_handler):
                # submitit's handler: checkpoint() below, pickle, requeue (local: exit code
                # 144), exit. On ranks > 0 it does nothing.
                submitit_handler(notice, None)
            raise

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The job to requeue: the same one, continuing its run."""
        picklable_modules()
        return super().checkpoint(with_resume_auto(list(sweep_overrides)), *args, **kwargs)


def _results_or_killed(job: Any, results: Any) -> list:
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    try:
        return results(job)
    except UncompletedJobError:
        try:
            overrides = list(job.submission().args[0])
        except Exception:  # noqa: BLE001 - its submission file gone too: named by its id alone
            overrides = []
        shown = " ".join(o for o in overrides if not o.startswith("resume=")) or "?"
        message = (
            f"sweep job {job.job_id} ({shown}) was killed before it finished (log: {job.paths.stderr}); "
            "the same command with resume=auto continues it"
        )
        print(f"error: {message}", file=sys.stderr, flush=True)
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret.return_value = failed_job(message)
        return [ret]


class RequeueLocalLauncher(_Requeue, base.LocalLauncher):
    pass


class RequeueSlurmLauncher(_Requeue, base.SlurmLauncher):
    pass


@dataclass
class RequeueLocalConf(LocalQueueConf):
    _target_: str = f"{__name__}.RequeueLocalLauncher"


@dataclass
class RequeueSlurmConf(SlurmQueueConf):
    _target_: str = f"{__name__}.RequeueSlurmLauncher"
    max_num_timeout: int = 20  # requeues after a time limit (preemptions do not count)


def register() -> None:
    """The plugin's names, the project's launchers."""
    store = ConfigStore.instance()
    for name, node in (("submitit_local", RequeueLocalConf), ("submitit_slurm", RequeueSlurmConf)):
        store.store(group="hydra/launcher", name=name, node=node, provider="torch_template")


class TakeBackNames(SearchPathPlugin):
    """Hydra's plugin scan re-runs every plugin module in sys.path order: with the repository
    first, hydra-submitit-launcher's config module runs after this one and stores its own
    `submitit_local`. Search path plugins run after the scan, before any config is composed."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register()


register()
