"""Issue 13's promise in one run: every trainer feature on at once, killed at seeded random
optimizer steps (SIGKILL, so nothing is saved at the kill) and resumed with resume=auto,
ends bitwise equal to the same run left alone.

On at once: AdamW, warm-up + cosine stepped per optimizer step, gradient clipping,
accumulation with a short last window, early stopping (it fires), EMA, seeded augmentation,
limit_train_batches / limit_val_batches and the model summary, on real 8x8 digits images.
"""

from __future__ import annotations

import random

import pytest

from tests.faults import fault_env
from tests.resume_helpers import assert_same, assert_same_run, fork_server, load

pytestmark = pytest.mark.slow
server = fork_server(timeout=300)

# 1257 train digits in batches of 32: 40 batches, limited to 8 -> windows of 3, 3, 2: three
# optimizer steps per epoch. min_delta=10 makes no epoch an improvement, so early stopping
# ends the run after epoch 1 + patience = 4 (of 6), with the counter carried across kills.
EPOCHS, STEPS_PER_EPOCH, STOP_EPOCH = 6, 3, 4
RUN = (
    "data=digits",
    "model=small_cnn",
    "data.batch_size=32",
    "data/augment=digits",
    "optimizer=adamw",
    "optimizer.lr=0.003",
    "~optimizer.momentum",
    "scheduler=warmup_cosine",
    "scheduler.warmup_epochs=1",
    "scheduler.min_lr=0.0001",
    "scheduler.interval=step",
    "trainer.grad_clip_norm=0.5",
    "trainer.accumulate_grad_batches=3",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=4",
    "trainer.ema_decay=0.9",
    "early_stopping.patience=3",
    "early_stopping.min_delta=10",
    f"trainer.epochs={EPOCHS}",
    "trainer.device=cpu",
    "trainer.print_every_s=0",
    "checkpoint.every_n_epochs=1",
    "checkpoint.every_n_steps=2",
    "checkpoint.export=false",
    "seed=7",
)
FEATURE_KEYS = ("ema_state_dict", "early_stopping")


def test_all_features_on_killed_at_random_steps_resume_bitwise(server, tmp_path):
    server.run(*RUN, "run_name=whole", root=tmp_path)
    whole = load(tmp_path / "whole" / "last.pt")
    assert whole["epoch"] == STOP_EPOCH and whole["global_step"] == STOP_EPOCH * STEPS_PER_EPOCH
    assert whole["early_stopping"]["wait"] == 3

    rng = random.Random(20261202)
    last_step = STOP_EPOCH * STEPS_PER_EPOCH
    kills = sorted(rng.sample(range(1, last_step), 2))  # two kills, at distinct random steps
    for kill in kills:
        killed = server.run(
            *RUN, "run_name=split", "resume=auto", root=tmp_path, check=False, env=fault_env(f"kill_at_step={kill}")
        )
        assert killed.returncode == -9, (kill, killed.stderr[-2000:])
    done = server.run(*RUN, "run_name=split", "resume=auto", root=tmp_path)
    assert f"stopped after epoch {STOP_EPOCH} of {EPOCHS}" in done.stdout, done.stdout[-2000:]

    assert_same_run(tmp_path / "split", tmp_path / "whole", epochs=STOP_EPOCH)
    split = load(tmp_path / "split" / "last.pt")
    for key in FEATURE_KEYS:
        assert_same(split[key], whole[key], key)
    again = server.run(*RUN, "run_name=split", "resume=auto", root=tmp_path)
    assert "already complete" in again.stdout
