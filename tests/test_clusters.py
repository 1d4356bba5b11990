"""Clusters without a cluster: the SLURM/submitit launchers
(hydra_plugins/torch_template/launchers.py),
the preemption notice (SIGUSR2) -> save -> requeue with resume=auto, and the SLURM/submitit
task variables that put a multi-task job on the torchrun code path.

The end-to-end test runs a real sweep through submitit's local executor, whose job
controller requeues a job that exits with submitit's requeue code, as `scontrol requeue`
does on SLURM."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import REPO, run_script, train_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from engine import training
from engine.distributed import adopt_scheduler_env, first_host
from engine.errors import EXIT_INTERRUPTED
from engine.training import StopSignal
from hydra_plugins.torch_template.launchers import (
    RequeueLocalLauncher,
    RequeueSlurmLauncher,
    picklable_modules,
    with_resume_auto,
)
from tests.faults import fault_env
from tests.resume_helpers import assert_same_run

PLUGIN_MODULE = "hydra_plugins.torch_template.launchers"


def _launcher_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            return compose("train", list(overrides), return_hydra_config=True).hydra.launcher
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------ configs


def test_slurm_preset_is_the_requeue_aware_submitit_slurm_launcher():
    cfg = _launcher_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
    )
    assert cfg._target_ == f"{PLUGIN_MODULE}.RequeueSlurmLauncher"
    assert (cfg.partition, cfg.gpus_per_node, cfg.tasks_per_node) == ("gpu", 4, 4)
    assert cfg.signal_delay_s == 120 and cfg.max_num_timeout > 0 and cfg.timeout_min == 240


def test_submitit_local_and_slurm_are_the_requeue_aware_launchers():
    """The plugin's names, the project's classes (whatever order Hydra scans plugins in)."""
    assert _launcher_cfg("hydra/launcher=submitit_local")._target_ == f"{PLUGIN_MODULE}.RequeueLocalLauncher"
    assert _launcher_cfg("hydra/launcher=submitit_slurm")._target_ == f"{PLUGIN_MODULE}.RequeueSlurmLauncher"


# ------------------------------------------------------------------- requeue decisions


def test_with_resume_auto_replaces_any_resume_override():
    assert with_resume_auto(["optimizer.lr=0.1", "resume=null", "+resume=x"]) == ["optimizer.lr=0.1", "resume=auto"]
    assert with_resume_auto([]) == ["resume=auto"]


@pytest.mark.parametrize("cls", [RequeueLocalLauncher, RequeueSlurmLauncher])
def test_checkpoint_requeues_the_same_job_with_resume_auto(cls):
    from submitit.helpers import DelayedSubmission

    launcher = cls(submitit_folder="x")
    args = (["optimizer.lr=0.1", "resume=null"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    delayed = launcher.checkpoint(*args)
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.function is launcher
    assert delayed.args == (["optimizer.lr=0.1", "resume=auto"], *args[1:])


def _run_stopped(monkeypatch, sig, code, restart_count=None):
    """Call the launcher on a job that received `sig` and exited with `code`; what
    submitit's (fake) SIGUSR2 handler and the job saw."""
    # hydra-submitit-launcher's class (Hydra's plugin scan may have re-imported its module)
    base = next(c for c in RequeueLocalLauncher.__mro__ if c.__name__ == "LocalLauncher")
    seen: dict = {}

    def job(self, overrides, *rest):  # train.py: StopSignal over submitit's handler
        seen["overrides"], seen["stop"] = overrides, StopSignal()
        if sig is not None:
            os.kill(os.getpid(), sig)  # the training loop's handler notes it, saves, exits 3
        raise SystemExit(code)

    def submitit_handler(signum, frame):
        seen["requeued"] = signum

    monkeypatch.setattr(base, "__call__", job)
    if restart_count is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart_count))
    previous = signal.signal(signal.SIGUSR2, submitit_handler)  # as submitit's job does
    try:
        with pytest.raises(SystemExit) as info:
            RequeueLocalLauncher(submitit_folder="x")(["a=1"], "hydra.sweep.dir", 0, "j", {})
    finally:
        seen["stop"].restore()
        signal.signal(signal.SIGUSR2, previous)
    assert info.value.code == code
    return seen


def test_preemption_notice_saves_then_hands_over_to_submitits_requeue(monkeypatch):
    seen = _run_stopped(monkeypatch, signal.SIGUSR2, EXIT_INTERRUPTED)
    assert seen["requeued"] == signal.SIGUSR2
    assert training.received == {signal.SIGUSR2}


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, EXIT_INTERRUPTED), (signal.SIGINT, EXIT_INTERRUPTED), (None, 2), (None, 0)]
)
def test_no_requeue_after_sigterm_ctrl_c_or_an_error(monkeypatch, sig, code):
    """SIGTERM (scancel, the end of the time limit) and Ctrl-C stop as without a scheduler;
    a failed job is not retried."""
    assert "requeued" not in _run_stopped(monkeypatch, sig, code)


def test_a_job_slurm_requeued_itself_resumes(monkeypatch):
    """Preemption with PreemptMode=REQUEUE, a node failure: SLURM_RESTART_COUNT > 0."""
    assert _run_stopped(monkeypatch, None, 0, restart_count=1)["overrides"] == ["a=1", "resume=auto"]
    assert _run_stopped(monkeypatch, None, 0, restart_count=0)["overrides"] == ["a=1"]


def test_sigusr2_stops_training_like_sigterm():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.reason == "SIGUSR2" and signal.SIGUSR2 in training.received
    finally:
        stop.restore()


# --------------------------------------------------------- DDP from SLURM/submitit tasks


def test_slurm_step_variables_become_torchrun_variables():
    env = {
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-10],cpu1",
        "SLURM_JOB_ID": "4242",
    }
    assert adopt_scheduler_env(env) == "slurm"
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"]) == ("8", "5", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24242"


def test_submitit_local_tasks_become_torchrun_variables():
    env = {
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "777",
        "MASTER_PORT": "1234",
    }
    assert adopt_scheduler_env(env) == "submitit_local"
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"]) == ("2", "1", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "1234")  # user's port kept


@pytest.mark.parametrize(
    "env",
    [
        {"WORLD_SIZE": "2", "RANK": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"},  # torchrun
        {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"},  # salloc shell: no step
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # one task
        {},
    ],
)
def test_torchrun_single_tasks_and_plain_shells_are_left_alone(env):
    before = dict(env)
    assert adopt_scheduler_env(env) is None
    assert env == before


def test_first_host_of_a_slurm_node_list():
    assert first_host("node[001-004,9]") == "node001"
    assert first_host("rack[2-3]-gpu[10,12],login") == "rack2-gpu10"
    assert first_host("a1,b[1-2]") == "a1"


# ------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_submitit_local_sweep_preempted_and_requeued_ends_as_uninterrupted(tmp_path):
    """A 2-job sweep through submitit's local executor; each job gets SLURM's notice
    (SIGUSR2) after step 7 of 12, saves, is requeued by submitit with resume=auto and
    finishes bitwise equal to the same run without a scheduler."""
    settings = [
        "data=linear",
        "trainer.epochs=3",
        "data.batch_size=8",
        "trainer.log_every_n_steps=1",
        "trainer.model_summary=false",
        "checkpoint.every_n_epochs=1",
    ]
    run_script(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "optimizer.lr=0.1,0.01",
        *settings,
        root=tmp_path / "slurm",
        env=fault_env("usr2_at_step=7"),
        timeout=240,
    )
    runs = {p.parent.name: p.parent for p in (tmp_path / "slurm").rglob("last.pt")}
    assert len(runs) == 2
    for lr in ("0.1", "0.01"):
        run_dir = runs[f"optimizer.lr={lr}"]
        assert (run_dir / "step_00000007.pt").exists()  # the save on the notice
        reference = train_run(tmp_path / "plain", f"optimizer.lr={lr}", *settings, name=lr)
        assert_same_run(run_dir, reference, epochs=3)
    logs = "".join(p.read_text() for p in (tmp_path / "slurm").rglob("*_log.*"))
    assert logs.count("Requeued job") == 2
    assert logs.count("(resumed at epoch 1, step 7)") == 2
    assert logs.count("Job completed successfully") == 2


def test_train_py_functions_can_be_pickled_for_submitit():
    """cloudpickle pickles train.py's functions by value with the torch submodules they name;
    torch.utils.deterministic (a ModuleType subclass) must go as an import."""
    import cloudpickle
    import torch.utils.deterministic

    picklable_modules()
    assert cloudpickle.loads(cloudpickle.dumps(torch.utils.deterministic)) is torch.utils.deterministic


@pytest.mark.slow
def test_a_two_task_slurm_step_trains_with_ddp(tmp_path):
    """Two `train.py` processes with the variables srun gives each task of a step (no
    torchrun variables): one DDP run of world size 2, as under torchrun."""
    import subprocess
    import sys

    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_ID": "31",
            "SLURM_STEP_NODELIST": "localhost",
            "MASTER_PORT": str(29500 + os.getpid() % 500),
        }
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "train.py",
                    "data=linear",
                    "trainer.epochs=2",
                    "trainer.device=cpu",
                    "trainer.model_summary=false",
                    f"checkpoint.root={tmp_path}",
                    "run_name=ddp",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "distributed: 2 processes (gloo)" in outputs[0]
    last = torch.load(tmp_path / "ddp" / "last.pt", map_location="cpu", weights_only=True)
    assert last["world_size"] == 2 and last["epoch"] == 2
