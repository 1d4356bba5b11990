"""Resume at the seams: a step checkpoint on an epoch's last step, two processes on one run
folder, changed data / batch size / model / epoch count between stop and resume, and a
scheduler's SIGTERM to a run with DataLoader workers. Each test runs train.py as a user would
(through the fork server of tests/forkrun.py, a real process per run)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from tests.forkrun import ForkServer
from tests.resume_helpers import assert_same_run, fork_server, image_folder, load, one_line_error

QUADRATIC = (
    "experiment=quadratic_csv",
    "trainer.device=cpu",
    "trainer.epochs=4",
    "trainer.print_every_s=0",
    "checkpoint.keep_last=10",
    "model._target_=torch.nn.Sequential",
    "~model.in_features",
    "+model._args_=[{_target_:torch.nn.Dropout,p:0.2},{_target_:torch.nn.Linear,in_features:2,out_features:1}]",
)  # 10 steps/epoch


server = fork_server()
images = image_folder(seed=1)


def image_args(images: Path, workers: int) -> tuple[str, ...]:
    """32 training images, batch 4: 8 steps per epoch."""
    return (
        "data=image_folder",
        "model=small_cnn",
        "loss=cross_entropy",
        f"data.root={images}",
        "data.num_classes=2",
        "data.image_size=8",
        "data.batch_size=4",
        f"data.num_workers={workers}",
        "trainer.device=cpu",
        "checkpoint.keep_last=10",
        "trainer.print_every_s=0",
    )


# ----------------------------------------------------- 1. a step checkpoint at an epoch's end


@pytest.mark.parametrize("path", ["tensor", "dataloader"])
def test_resume_from_step_checkpoint_on_an_epochs_last_step(server, tmp_path, images, path):
    """step_N.pt written on the last step of an epoch (every_n_steps divides the epoch): the
    resume runs that epoch's validation and end-of-epoch work once, then continues exactly
    (was: an empty batch, NaN loss on tensors, IndexError on a DataLoader)."""
    if path == "tensor":
        args, steps = (*QUADRATIC, "checkpoint.every_n_steps=10"), 10
    else:
        args, steps = (*image_args(images, 0), "trainer.epochs=3", "checkpoint.every_n_steps=8"), 8
    server.run(*args, "run_name=whole", root=tmp_path)
    seam = tmp_path / "whole" / f"step_{2 * steps:08d}.pt"
    state = load(seam)
    assert (state["epoch"], state["step_in_epoch"]) == (1, steps)  # epoch 2 trained, not ended

    # export=false: best.pt of an epoch before the seam is in the other folder (a follow-up)
    result = server.run(*args, "run_name=resumed", f"resume={seam}", "checkpoint.export=false", root=tmp_path)
    assert "(resumed at epoch 1, step" in result.stdout
    assert re.findall(r"^epoch (\d+) ", result.stdout, re.M) == ["2", "3"][:1] + (
        ["3", "4"] if path == "tensor" else ["3"]
    )  # epoch 2's end once, then on
    assert_same_run(tmp_path / "resumed", tmp_path / "whole", best=False)


def test_batches_past_the_end_yield_nothing():
    from engine.batches import Batches, TensorSplit

    split = TensorSplit(torch.arange(10.0).unsqueeze(1), torch.zeros(10, 1))
    batches = Batches(split, 4, torch.device("cpu"), shuffle=True)
    assert [len(x) for x, _ in batches(1, start=2)] == [2]
    assert list(batches(1, start=3)) == [] and list(batches(1, start=7)) == []


# ---------------------------------------------------------------- 2. one process per folder


def test_second_process_on_a_run_folder_is_refused_naming_the_holder(server, tmp_path):
    args = (
        *QUADRATIC,
        "trainer.epochs=100000",
        "checkpoint.every_n_steps=7",
        "run_name=busy",
        f"checkpoint.root={tmp_path}",
    )
    pid, out, _ = server.start(*args)
    try:
        deadline = time.monotonic() + 240
        while "epoch 2 " not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.02)
        run_dir = tmp_path / "busy"
        tmp = run_dir / ".step_00000999.pt.12345.tmp"  # as if the holder were mid-save
        tmp.write_bytes(b"partial")
        before = (run_dir / "metrics.csv").read_text()
        second = ForkServer(tmp_path / "second")
        try:
            result = second.run(*QUADRATIC, "run_name=busy", "resume=auto", root=tmp_path, check=False)
        finally:
            second.close()
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        error = one_line_error(result)
        assert f"{run_dir} is in use by another training process (pid {pid})" in error
        assert tmp.exists()  # the holder's in-flight temporary is left alone
        assert (run_dir / "metrics.csv").read_text().startswith(before)  # no rows from it
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it died: before the lock, a second
            os.killpg(pid, signal.SIGKILL)  # run deleted its in-flight .tmp)
        assert server.finish() == -signal.SIGKILL  # the kernel releases the lock with it
    result = server.run(
        *QUADRATIC,
        "run_name=busy",
        "resume=auto",
        "trainer.epochs=100000",
        "trainer.max_time=2",
        root=tmp_path,
        check=False,
    )
    assert result.returncode == EXIT_INTERRUPTED, result.stderr  # a killed run never blocks
    assert not (tmp_path / "busy" / tmp.name).exists()  # and now stale temporaries go


# ------------------------------------------------------------ 3. changed inputs on resume


def test_changed_data_or_batch_size_is_refused_and_resume_mode_weights_starts_anew(server, tmp_path):
    csv = tmp_path / "points.csv"
    shutil.copy("data/quadratic.csv", csv)
    args = (*QUADRATIC, f"data.path={csv}", "checkpoint.every_n_steps=7")
    server.run(*args, "run_name=a", "trainer.epochs=2", root=tmp_path)
    run_dir = tmp_path / "a"
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    result = server.run(*args, "run_name=a", "resume=auto", "data.batch_size=32", root=tmp_path, check=False)
    assert result.returncode == EXIT_BAD_INPUT
    error = one_line_error(result)
    assert "global batch size 16 -> 32" in error and "resume_mode=weights" in error, error

    lines = csv.read_text().splitlines()  # the edit: y * 10 + 5
    edited = [lines[0]] + [f"{x},{float(y) * 10 + 5}" for x, y in (line.split(",") for line in lines[1:])]
    csv.write_text("\n".join(edited) + "\n")
    result = server.run(*args, "run_name=a", "resume=auto", root=tmp_path, check=False)
    assert result.returncode == EXIT_BAD_INPUT
    error = one_line_error(result)
    assert "train split content changed" in error and "val split content changed" in error
    assert "resume_mode=weights run_name=NEW_NAME resume=" in error, error
    kept = ("config.yaml", ".lock")  # config.yaml: t10b's item (written once accepted)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in kept} == {
        k: v for k, v in files.items() if k not in kept
    }

    result = server.run(*args, "run_name=a", "resume=auto", "resume_mode=weights", root=tmp_path, check=False)
    assert result.returncode == EXIT_BAD_INPUT and "resume=PATH" in one_line_error(result)
    source = run_dir / "epoch_0002.pt"
    server.run(*args, "run_name=b", f"resume={source}", "resume_mode=weights", "data.batch_size=32", root=tmp_path)
    new = load(tmp_path / "b" / "last.pt")
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]  # a new schedule
    assert new["global_step"] == 4 * 5  # 160 training rows / 32
    assert new["fingerprint"]["global_batch_size"] == 32


def test_changed_model_is_refused_in_one_line(server, tmp_path):
    plain = ("experiment=quadratic_csv", "trainer.device=cpu", "trainer.epochs=1")
    server.run(*plain, "run_name=m", root=tmp_path)
    result = server.run(*QUADRATIC, "run_name=m", "resume=auto", root=tmp_path, check=False)
    assert result.returncode == EXIT_BAD_INPUT
    error = one_line_error(result)
    assert "weights do not fit the model" in error and "layer.weight" in error, error


def test_more_epochs_with_cosine_is_refused_but_fine_with_step(server, tmp_path):
    for scheduler in ("cosine", "step"):
        args = (*QUADRATIC, f"scheduler={scheduler}", f"run_name={scheduler}")
        server.run(*args, "trainer.epochs=2", root=tmp_path)
        result = server.run(*args, "trainer.epochs=4", "resume=auto", root=tmp_path, check=False)
        if scheduler == "cosine":
            assert result.returncode == EXIT_BAD_INPUT
            error = one_line_error(result)
            assert "trainer.epochs changed 2 -> 4" in error and "T_max 2 -> 4" in error, error
        else:
            assert result.returncode == 0, result.stderr
            assert load(tmp_path / "step" / "last.pt")["epoch"] == 4


def test_checkpoint_without_fingerprint_resumes(server, tmp_path):
    """Older checkpoints (and tutorial files) carry no fingerprint: resumed unchecked."""
    server.run(*QUADRATIC, "run_name=old", "trainer.epochs=2", root=tmp_path)
    last = tmp_path / "old" / "epoch_0002.pt"
    state = load(last)
    del state["fingerprint"]
    torch.save(state, tmp_path / "older.pt")
    server.run(
        *QUADRATIC,
        "run_name=new",
        f"resume={tmp_path / 'older.pt'}",
        "data.batch_size=32",
        "checkpoint.export=false",
        root=tmp_path,
    )
    assert load(tmp_path / "new" / "last.pt")["epoch"] == 4


# ------------------------------------------------ 5. SIGTERM to a run with DataLoader workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server and killpg")
def test_sigterm_to_the_process_group_with_workers_saves_and_exits_3(server, tmp_path, images):
    """`kill -TERM -PGID` (a scheduler) reaches the DataLoader workers too: they ignore it, the
    main process finishes the step, saves and exits 3, every time (was: 3 of 6 lost)."""
    args = (
        *image_args(images, 2),
        "trainer.epochs=1000",
        "checkpoint.every_n_epochs=1000",
        f"checkpoint.root={tmp_path}",
    )
    rng = random.Random(5)
    for attempt in range(4):
        pid, out, err = server.start(*args, f"run_name=term{attempt}")
        deadline = time.monotonic() + 240
        while "epoch 1 " not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # lands in training, in validation, in a fork
        os.killpg(pid, signal.SIGTERM)
        code, stderr = server.finish(), err.read_text()
        assert code == EXIT_INTERRUPTED, stderr
        assert "Traceback" not in stderr and "interrupted: SIGTERM: saved" in stderr, stderr
