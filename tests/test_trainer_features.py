"""The everyday trainer features (issue 13): each off by default, each exact on resume."""

from __future__ import annotations

import csv
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose
from torch.optim.optimizer import register_optimizer_step_pre_hook

from engine.checkpoint import Progress, check_finite
from engine.cli import validate_train
from engine.errors import EXIT_INTERRUPTED, UserError
from tests.forkrun import ForkServer
from tests.resume_helpers import assert_same
from train import train

# ------------------------------------------- optimizers, schedules, clipping, accumulation
# data=linear: 32 training points; data.batch_size=4 gives 8 batches per epoch, and
# trainer.accumulate_grad_batches=3 windows of 3, 3 and 2 batches (3 optimizer steps).
FAST = ("trainer.device=cpu", "trainer.print_every_s=0", "checkpoint.export=false")


@pytest.fixture
def train_cfg(tmp_path):
    def _cfg(*overrides: str):
        return compose("train", [f"checkpoint.root={tmp_path}", *FAST, *overrides])

    return _cfg


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as rows:
        return list(csv.DictReader(rows))


def _record_steps(record):
    """Call record(optimizer) before every optimizer step of any optimizer (a global hook)."""
    return register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: record(optimizer))


@pytest.mark.parametrize("name,decay", [("adam", 0.0), ("adamw", 0.01)])
def test_adam_and_adamw_compose_and_train(train_cfg, tmp_path, name, decay):
    cfg = train_cfg(f"optimizer={name}", "optimizer.lr=0.05", "trainer.epochs=20")
    assert cfg.optimizer._target_ == f"torch.optim.{'Adam' if name == 'adam' else 'AdamW'}"
    train(cfg)
    run_dir = tmp_path / "linear_regression"
    optimizer = _load(run_dir / "last.pt")["optimizer_state_dict"]
    group = optimizer["param_groups"][0]
    assert list(group["betas"]) == [0.9, 0.999] and group["eps"] == 1e-8
    assert group["weight_decay"] == decay
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in optimizer["state"].values())
    losses = [float(r["train_loss"]) for r in _rows(run_dir)]
    assert losses[-1] < losses[0] / 4, losses


def test_betas_given_on_resume_are_applied_and_saved_as_plain_values(train_cfg, tmp_path):
    common = ("optimizer=adam", "checkpoint.every_n_epochs=1")
    train(train_cfg(*common, "trainer.epochs=2"))
    train(train_cfg(*common, "trainer.epochs=3", "resume=auto", "optimizer.betas=[0.8,0.99]"))
    group = _load(tmp_path / "linear_regression" / "last.pt")["optimizer_state_dict"]["param_groups"][
        0
    ]  # weights-only loading: no omegaconf ListConfig in the file
    assert list(group["betas"]) == [0.8, 0.99]


def test_resume_with_another_scheduler_interval_is_refused(train_cfg):
    common = ("scheduler=warmup_cosine", "scheduler.warmup_epochs=1", "trainer.epochs=2", "checkpoint.every_n_epochs=1")
    train(train_cfg(*common))
    with pytest.raises(UserError, match="scheduler.interval changed epoch -> step"):
        train(train_cfg(*common, "scheduler.interval=step", "resume=auto"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0]: expected two numbers >= 0 and < 1"),
        ("optimizer.eps=0", "optimizer.eps=0: expected a number > 0"),
        ("scheduler.interval=batch", "scheduler.interval='batch': expected epoch or step"),
        ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs=-1: expected an integer >= 0"),
        ("scheduler.min_lr=0.5", "scheduler.min_lr=0.5: expected a number >= 0 and <= optimizer.lr"),
        ("trainer.grad_clip_norm=0", "trainer.grad_clip_norm=0.0: expected a number > 0 or null"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: expected an integer >= 1"),
    ],
)
def test_bad_feature_values_are_one_line_errors(train_cfg, override, message):
    cfg = train_cfg("optimizer=adam", "scheduler=warmup_cosine", override)
    with pytest.raises(UserError, match=re.escape(message)):
        validate_train(cfg)


def _warmup_cosine(t: int, lr: float, warmup: int, total: int, floor: float) -> float:
    """The documented schedule (configs/scheduler/warmup_cosine.yaml), written out."""
    if t < warmup:
        return lr * (t + 1) / (warmup + 1)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    "scheduler,interval", [("warmup_cosine", "epoch"), ("warmup_cosine", "step"), ("cosine", "step")]
)
def test_schedule_per_epoch_or_step_follows_the_formula(train_cfg, tmp_path, scheduler, interval):
    epochs, warmup, steps, lr, floor = 6, 2, 3, 0.01, 0.001
    lrs: list[float] = []
    handle = _record_steps(lambda optimizer: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        train(
            train_cfg(
                f"scheduler={scheduler}",
                f"scheduler.interval={interval}",
                f"optimizer.lr={lr}",
                f"trainer.epochs={epochs}",
                "data.batch_size=4",
                "trainer.accumulate_grad_batches=3",
                *(
                    (f"scheduler.warmup_epochs={warmup}", f"scheduler.min_lr={floor}")
                    if scheduler == "warmup_cosine"
                    else ("scheduler.eta_min=0.001",)
                ),
            )
        )
    finally:
        handle.remove()
    assert len(lrs) == epochs * steps
    if scheduler == "cosine":  # T_max=trainer.epochs, counted in optimizer steps
        expected = [_warmup_cosine(t, lr, 0, epochs * steps, floor) for t in range(len(lrs))]
    elif interval == "step":  # warm-up and length in optimizer steps
        expected = [_warmup_cosine(t, lr, warmup * steps, epochs * steps, floor) for t in range(len(lrs))]
    else:  # one value per epoch, for each of its steps
        expected = [_warmup_cosine(t // steps, lr, warmup, epochs, floor) for t in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-6 if scheduler == "cosine" else 1e-12)
    assert lrs[0] < lrs[steps * warmup] if scheduler == "warmup_cosine" else True
    # metrics.csv: the lr of each epoch's last optimizer step
    logged = [float(r["lr"]) for r in _rows(tmp_path / "linear_regression")]
    assert logged == [lrs[e * steps - 1] for e in range(1, epochs + 1)]


def _gradient_norms(train_cfg, *overrides: str) -> list[float]:
    norms: list[float] = []

    def record(optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))

    handle = _record_steps(record)
    try:
        train(train_cfg("trainer.epochs=3", *overrides))
    finally:
        handle.remove()
    return norms


def test_grad_clip_norm_bounds_the_gradient_norm(train_cfg):
    free = _gradient_norms(train_cfg, "run_name=free")
    assert max(free) > 0.5  # L1 loss of a line from a random start: norms near 1
    clipped = _gradient_norms(train_cfg, "run_name=clipped", "trainer.grad_clip_norm=0.1")
    assert len(clipped) == len(free) == 12
    assert max(clipped) <= 0.1 * (1 + 1e-5)
    assert max(clipped) == pytest.approx(0.1, rel=1e-5)  # clipped to the bound, not below


def test_grad_clip_norm_under_amp_clips_the_unscaled_gradients(train_cfg):
    """With a GradScaler the gradients are unscaled before clipping: the optimizer sees norms
    at the bound (clipping the scaled gradients would leave them 65536 times smaller)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # GradScaler("cpu") exists too
    clipped = _gradient_norms(
        train_cfg, f"trainer.device={device}", "trainer.precision=16-mixed", "trainer.grad_clip_norm=0.1"
    )
    finite = [n for n in clipped if math.isfinite(n)]  # a skipped overflow step may show inf
    assert finite and max(finite) == pytest.approx(0.1, rel=1e-3)


def test_accumulating_k_batches_equals_one_batch_of_k_times_the_size(train_cfg, tmp_path):
    """3 batches of 4 (and a short last window of 2) equal batches of 12 (and a last of 8):
    the same samples per optimizer step, since the batch order depends on the seed only."""
    common = (
        "loss=mse",
        "trainer.epochs=2",
        "optimizer.lr=0.2",
        "optimizer.momentum=0.9",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=20",
    )
    train(train_cfg(*common, "run_name=accumulated", "data.batch_size=4", "trainer.accumulate_grad_batches=3"))
    train(train_cfg(*common, "run_name=big", "data.batch_size=12"))
    train(train_cfg(*common, "run_name=small", "data.batch_size=4"))
    for step in range(1, 7):
        name = f"step_{step:08d}.pt"
        accumulated, big = _load(tmp_path / "accumulated" / name), _load(tmp_path / "big" / name)
        assert accumulated["global_step"] == big["global_step"] == step
        assert accumulated["step_in_epoch"] == [3, 6, 8][(step - 1) % 3]  # window ends only
        for key, value in big["model_state_dict"].items():
            torch.testing.assert_close(accumulated["model_state_dict"][key], value, rtol=1e-5, atol=1e-6)
    small = _load(tmp_path / "small" / "step_00000006.pt")["model_state_dict"]
    assert not torch.allclose(small["weights"], big["model_state_dict"]["weights"], atol=1e-3)
    for a, b in zip(_rows(tmp_path / "accumulated"), _rows(tmp_path / "big"), strict=True):
        assert a["step"] == b["step"]
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)


def test_non_finite_loss_names_the_optimizer_step_under_accumulation():
    nan = torch.tensor(float("nan"))
    # 3 steps of epoch 1 before; now 6 batches (2 windows of 3) into epoch 2, the 5th bad
    losses = [torch.tensor(1.0)] * 4 + [nan, torch.tensor(1.0)]
    progress = Progress(epoch=1, step_in_epoch=6, global_step=5, losses=losses, accumulate=3)
    with pytest.raises(UserError, match=r"at epoch 2, step 5 \(batch 5 of the epoch\)"):
        check_finite(progress)


# A run with every feature above on, through a dropout layer (the RNG state matters at every
# step): 4 epochs of 3 optimizer steps, a checkpoint every 2 steps.
ALL_ON = (
    "data=linear",
    "data.batch_size=4",
    "trainer.epochs=4",
    *FAST,
    "optimizer=adamw",
    "optimizer.lr=0.05",
    "scheduler=warmup_cosine",
    "scheduler.warmup_epochs=1",
    "scheduler.min_lr=0.001",
    "scheduler.interval=step",
    "trainer.grad_clip_norm=0.05",
    "trainer.accumulate_grad_batches=3",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=10",
    "model._target_=torch.nn.Sequential",
    "~model.in_features",
    "+model._args_=[{_target_:torch.nn.Dropout,p:0.2},{_target_:torch.nn.Linear,in_features:1,out_features:1}]",
)
COMPARED = (
    "epoch",
    "global_step",
    "step_in_epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "rng_state",
    "epoch_step_losses",
    "best",
    "loss",
)


def _signal_at(sig: str, batch: int) -> tuple[str, ...]:
    """The loss sends `sig` to its process during its `batch`-th training batch."""
    return ("loss._target_=tests.signal_loss.SignalAtCall", f"+loss.signal={sig}", f"+loss.at={batch}")


@pytest.mark.slow
def test_stop_and_kill_mid_window_with_all_features_resume_bitwise(tmp_path):
    """SIGTERM, then SIGKILL, each in the middle of an accumulation window, each followed by
    `resume=auto`: the result is the uninterrupted run's, bit for bit (model, AdamW moments,
    per-step schedule, RNG, metrics.csv)."""
    server = ForkServer(tmp_path / "forkrun")
    try:
        server.run(*ALL_ON, "run_name=whole", root=tmp_path)
        run_dir = tmp_path / "cut"
        # SIGTERM in batch 5 (window 4-6 of epoch 1): the window is finished, then saved.
        result = server.run(*ALL_ON, "run_name=cut", *_signal_at("SIGTERM", 5), root=tmp_path, check=False)
        assert result.returncode == EXIT_INTERRUPTED, result.stderr[-2000:]
        state = _load(run_dir / "step_00000002.pt")
        assert (state["global_step"], state["step_in_epoch"], state["epoch"]) == (2, 6, 0)
        # Resumed, then SIGKILLed in its 7th batch (epoch 2, batch 5: mid-window); the newest
        # checkpoint is step 4 (epoch 2, batch 3), the window after it is lost and redone.
        result = server.run(
            *ALL_ON, "run_name=cut", "resume=auto", *_signal_at("SIGKILL", 7), root=tmp_path, check=False
        )
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        steps = sorted(p.name for p in run_dir.glob("step_*.pt"))
        assert steps == ["step_00000002.pt", "step_00000004.pt"]
        assert _load(run_dir / steps[-1])["step_in_epoch"] == 3
        result = server.run(*ALL_ON, "run_name=cut", "resume=auto", root=tmp_path)
        assert "(resumed at epoch 1, step 4)" in result.stdout
    finally:
        server.close()
    final, whole = _load(run_dir / "last.pt"), _load(tmp_path / "whole" / "last.pt")
    assert final["global_step"] == 12
    for key in COMPARED:
        assert_same(final[key], whole[key], key)
    assert (run_dir / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_accumulation_under_torchrun_matches_one_process(train_cfg, tmp_path):
    """2 processes x 4 samples, 2 batches per step (no_sync on the first; the epoch's last
    window is 1 batch) equal one process with batches of 8 and the same windows."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    common = (
        "data=linear",
        "data.end=1.14",
        "loss=mse",
        "trainer.epochs=2",
        "optimizer.momentum=0.9",
        "trainer.accumulate_grad_batches=2",
        *FAST,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ENGINE_FAULT", "HYDRA_FULL_ERROR")
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train.py"),
            *common,
            "trainer.global_batch_size=8",
            "run_name=ddp",
            f"checkpoint.root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train(train_cfg(*common, "data.batch_size=8", "run_name=single"))
    ddp, single = _load(tmp_path / "ddp" / "last.pt"), _load(tmp_path / "single" / "last.pt")
    assert ddp["global_step"] == single["global_step"] == 6  # 5 batches: windows 2, 2, 1
    for key, value in single["model_state_dict"].items():
        torch.testing.assert_close(ddp["model_state_dict"][key], value, rtol=1e-5, atol=1e-6)
