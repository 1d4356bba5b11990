"""Hydra's submitit launchers, requeue-aware: `hydra/launcher=submitit_local` and
`hydra/launcher=submitit_slurm` (and the configs/hydra/launcher/slurm.yaml preset on top).

hydra-submitit-launcher runs each job as `launcher(overrides, ...)` in a submitit process
whose SIGUSR2 handler (the notice SLURM sends `signal_delay_s` before a time limit) calls
`launcher.checkpoint(...)`, pickles the DelayedSubmission it returns as the job and requeues
it - at once, in the middle of a training step. Here the training loop's own handler
(engine/training.py) takes the signal instead: it finishes the step, saves and exits with code
3; only then does `__call__` hand the signal to submitit's handler, so the job is requeued
with a checkpoint on disk. `checkpoint()` adds `resume=auto`, so the requeued job continues
the run exactly; a job that SLURM itself requeued (preemption, node failure: its
SLURM_RESTART_COUNT > 0) resumes the same way. SIGTERM and Ctrl-C save and stop as without
a scheduler: no requeue by this launcher.

Hydra takes launchers only from its `hydra_plugins` package, and this repository keeps its top
level to configs/ data/ models/ engine/ and the scripts: `register()` (called by train.py
before Hydra composes) publishes the two classes under an alias module of that package and
tells cloudpickle to pickle them by value, so a submitit job process, which has no alias,
rebuilds them from their bases here.
"""

import copyreg
import importlib
import os
import signal
import sys
import types
from dataclasses import dataclass
from typing import Any

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher,
    LocalLauncher,
    SlurmLauncher,
)

from engine import training
from engine.errors import EXIT_INTERRUPTED, preempt_signal

RESUME = "resume=auto"
PLUGIN_MODULE = "hydra_plugins.torch_template_submitit"


def with_resume_auto(overrides: list[str]) -> list[str]:
    """The job's overrides with `resume=...` replaced by resume=auto (the run folder stays
    the same: `resume` is not part of a sweep job's folder name)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]
    return [*kept, RESUME]


def _by_import(module: types.ModuleType) -> tuple[Any, tuple[str]]:
    return importlib.import_module, (module.__name__,)


def picklable_modules() -> None:
    """Pickle every module of a ModuleType subclass as its import. cloudpickle pickles
    train.py's functions by value, with the submodules they name (`torch.utils`, ...), and it
    cannot pickle torch.utils.deterministic, whose class is a ModuleType subclass."""
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType) and type(module) is not types.ModuleType:
            copyreg.pickle(type(module), _by_import)


class _Requeue(BaseSubmititLauncher):
    """The requeue decisions; the launching itself is hydra-submitit-launcher's."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        picklable_modules()
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:  # SLURM requeued it
            sweep_overrides = with_resume_auto(sweep_overrides)
        notice = preempt_signal()
        submitit_handler = signal.getsignal(notice) if notice is not None else None
        training.received.clear()
        try:
            return super().__call__(sweep_overrides, *args, **kwargs)
        except SystemExit as stop:
            if not should_requeue(stop, notice, submitit_handler):
                raise
            # submitit's own handler, now that the checkpoint is saved: checkpoint() below,
            # pickle, requeue (scontrol requeue; local: exit code 144), exit. On ranks > 0
            # it does nothing and this task exits with code 3 as before.
            submitit_handler(notice, None)
            raise

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The job to requeue: the same one, continuing its run (resume=auto)."""
        picklable_modules()  # submitit pickles it next
        return super().checkpoint(with_resume_auto(list(sweep_overrides)), *args, **kwargs)


def should_requeue(stop: SystemExit, notice: Any, submitit_handler: Any) -> bool:
    """Requeue after a training loop saved and stopped (exit code 3) on the preemption
    notice, when submitit's handler is there to do it."""
    return (stop.code == EXIT_INTERRUPTED and notice is not None
            and notice in training.received and callable(submitit_handler))


class RequeueLocalLauncher(_Requeue, LocalLauncher):
    pass


class RequeueSlurmLauncher(_Requeue, SlurmLauncher):
    pass


@dataclass
class RequeueLocalConf(LocalQueueConf):
    _target_: str = f"{PLUGIN_MODULE}.RequeueLocalLauncher"


@dataclass
class RequeueSlurmConf(SlurmQueueConf):
    _target_: str = f"{PLUGIN_MODULE}.RequeueSlurmLauncher"
    max_num_timeout: int = 20  # requeues after a time limit (preemptions do not count)


def register() -> None:
    """`hydra/launcher=submitit_local|submitit_slurm` (and the slurm preset on top) become the
    requeue-aware launchers. Called after Hydra's plugin scan (Plugins.instance() runs it), so
    these configs replace hydra-submitit-launcher's own whatever the scan order."""
    module = sys.modules.get(PLUGIN_MODULE)
    if module is None:
        module = sys.modules[PLUGIN_MODULE] = types.ModuleType(PLUGIN_MODULE)
        for base in (RequeueLocalLauncher, RequeueSlurmLauncher):
            alias = type(base.__name__, (base,), {"__module__": PLUGIN_MODULE})
            setattr(module, base.__name__, alias)
            Plugins.instance().register(alias)
        cloudpickle.register_pickle_by_value(module)  # the job process has no alias module
    store = ConfigStore.instance()
    store.store(group="hydra/launcher", name="submitit_local", node=RequeueLocalConf(),
                provider="torch-hydra-template")
    store.store(group="hydra/launcher", name="submitit_slurm", node=RequeueSlurmConf(),
                provider="torch-hydra-template")
