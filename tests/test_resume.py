"""Exact, crash-safe resume: any interruption, then `resume=auto`, gives the uninterrupted run.

Every test trains the same small run (the quadratic CSV task through a dropout layer, so the
RNG state matters at every step; cosine schedule; a checkpoint every 3 steps and every 2
epochs), interrupts it in some way, resumes it, and compares the result with one uninterrupted
run of plain `python train.py`: every tensor of the model, optimizer and scheduler state and
of the RNG state `torch.equal`, and metrics.csv identical byte for byte.

Interrupted runs go through a fork server (tests/forkrun.py): a real train.py process per run,
SIGKILLed for real, without paying torch's import time each time. The kill points are
injected from outside the product (tests/faults/sitecustomize.py, armed by `fault_env`).
"""

from __future__ import annotations

import random
import re
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.errors import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, UserError
from engine.run_dir import LINKS, PERIODIC, find_latest, read_history
from tests.conftest import run_script
from tests.faults import fault_env
from tests.resume_helpers import (
    assert_all_complete,
    assert_same_run,
    complete_files,
    fork_server,
    load,
    newest,
    one_line_error,
)

STEPS_PER_EPOCH = 10  # 160 training rows of data/quadratic.csv, batch size 16
EPOCHS = 10
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
RUN = (
    "experiment=quadratic_csv",
    "trainer.device=cpu",
    f"trainer.epochs={EPOCHS}",
    "scheduler=cosine",
    "checkpoint.every_n_steps=3",
    "checkpoint.every_n_epochs=2",
    "checkpoint.keep_last=3",
    # y = Linear(Dropout(features)): training draws from the torch RNG at every step.
    "model._target_=torch.nn.Sequential",
    "~model.in_features",
    "+model._args_=[{_target_:torch.nn.Dropout,p:0.2},{_target_:torch.nn.Linear,in_features:2,out_features:1}]",
)
RESUMED = re.compile(r"resuming from (\S+)\n.*\(resumed at epoch (\d+), step (\d+)\)")


# ------------------------------------------------------------------------------- helpers

server = fork_server()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def baseline(root) -> Path:
    """The uninterrupted run, as a user starts it: `python train.py ...` (no fork server)."""
    run_script("train.py", *RUN, "run_name=baseline", root=root)
    return root / "baseline"


def assert_matches_baseline(run_dir: Path, baseline: Path) -> None:
    assert load(run_dir / "last.pt")["global_step"] == TOTAL_STEPS
    assert_same_run(run_dir, baseline, epochs=EPOCHS)


def resumed_from(result, run_dir: Path, expected: tuple[int, int]) -> Path:
    """The file a resume picked, checked against the oracle: never a temporary, always the
    newest complete checkpoint."""
    match = RESUMED.search(result.stdout)
    assert match, result.stdout[-2000:]
    path = Path(match.group(1))
    assert path.parent == run_dir and (PERIODIC.match(path.name) or path.name in LINKS)
    assert not path.name.endswith(".tmp")
    assert (int(match.group(3)), int(match.group(2))) == expected
    return path


def temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_kill_harness_resumes_bitwise_after_sigkill_anywhere(server, root, baseline):
    """24 seeded SIGKILLs, at step boundaries (mid-epoch, at epoch ends, right after a save)
    and in the middle of checkpoint writes, each followed by `resume=auto` with the next kill
    armed, then a last resume to the end: the result is the uninterrupted run's, bit for bit."""
    run_dir = root / "killed"
    rng = random.Random(2024)
    kills = [
        ("kill_at_step", rng.randint(1, 7)) if rng.random() < 0.6 else ("kill_in_write", rng.randint(1, 3))
        for _ in range(24)
    ]
    args = (*RUN, "run_name=killed", "resume=auto")
    fired = []
    for kind, n in kills:
        start = newest(run_dir)
        if kind == "kill_in_write" and TOTAL_STEPS - start[0] < 12:
            kind = "kill_at_step"  # too few writes left: keep the kill certain to fire
        value = min(start[0] + n, TOTAL_STEPS) if kind == "kill_at_step" else n
        result = server.run(*args, root=root, env=fault_env(f"{kind}={value}"), check=False)
        assert result.returncode == -signal.SIGKILL, (kind, value, result.stderr[-2000:])
        if start != (0, 0):
            resumed_from(result, run_dir, start)
        assert "skipped" not in result.stderr  # nothing was ever corrupt
        assert_all_complete(run_dir)
        if kind == "kill_in_write":  # the half-written file it left: never a *.pt name
            (tmp,) = temporaries(run_dir)  # the resume removed older ones
            value = re.sub(r"\.\d+\.tmp$", "", tmp).lstrip(".")
        fired.append((kind, value, start[0]))
    print(f"{len(fired)} kills (kind, value, resumed at step): {fired}")
    assert len(fired) >= 20
    in_writes = {value.split("_")[0].split(".")[0] for kind, value, _ in fired if kind == "kill_in_write"}
    assert in_writes >= {"step", "epoch"} and in_writes & {"best", "last"}, in_writes
    assert any(
        kind == "kill_at_step" and value % STEPS_PER_EPOCH and value % 3 for kind, value, _ in fired
    )  # mid-epoch, between two periodic saves

    start = newest(run_dir)
    result = server.run(*args, root=root)
    resumed_from(result, run_dir, start)
    assert not temporaries(run_dir)
    assert_matches_baseline(run_dir, baseline)


@pytest.mark.parametrize("fault,sig", [("term_at_step=37", "SIGTERM"), ("int_at_step=36", "SIGINT")])
def test_sigterm_or_sigint_saves_the_step_exits_3_and_resumes_exactly(server, root, baseline, fault, sig):
    name = fault.split("=")[0]
    run_dir = root / name
    step = int(fault.split("=")[1])
    result = server.run(*RUN, f"run_name={name}", root=root, env=fault_env(fault), check=False)
    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    saved = run_dir / f"step_{step:08d}.pt"
    assert f"interrupted: {sig}: saved {saved} at epoch {step // 10 + 1}, step {step}" in (result.stderr)
    state = load(saved)
    assert (state["global_step"], state["step_in_epoch"]) == (step, step % 10)
    assert newest(run_dir) == (step, step // 10)

    result = server.run(*RUN, f"run_name={name}", "resume=auto", root=root)
    resumed_from(result, run_dir, (step, step // 10))
    assert_matches_baseline(run_dir, baseline)


def test_mid_epoch_resume_from_every_n_steps_checkpoint(server, root, baseline):
    """Killed just after an epoch whose end wrote no checkpoint (odd epoch, not periodic; an
    improvement writes best.pt only with the next save): metrics.csv already has that
    epoch's row, the newest checkpoint (a mid-epoch every_n_steps save) has not. The resume
    redoes the epoch's last steps and the CSV ends with every row once."""
    epoch = 7  # newest every_n_steps=3 save before the kill at step 71: 69, mid-epoch 7
    run_dir = root / "mid_epoch"
    args = (*RUN, "run_name=mid_epoch")
    result = server.run(*args, root=root, env=fault_env(f"kill_at_step={epoch * 10 + 1}"), check=False)
    assert result.returncode == -signal.SIGKILL
    step = newest(run_dir)[0]
    state = load(run_dir / f"step_{step:08d}.pt")  # the newest every_n_steps=3 save
    assert step == (epoch * 10) // 3 * 3 and state["epoch"] == epoch - 1
    assert state["step_in_epoch"] == len(state["epoch_step_losses"]) == (step % 10 or 10)
    assert "history" not in state  # metrics.csv is the history (engine.run_dir.read_history)
    assert (run_dir / "metrics.csv").read_text().count("\n") == epoch + 1  # header + rows

    result = server.run(*args, "resume=auto", root=root)
    resumed_from(result, run_dir, (step, epoch - 1))
    assert_matches_baseline(run_dir, baseline)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:  # in place: last.pt, a hard link to it, breaks too
        f.truncate(path.stat().st_size // 2)


def _flip_bit(path: Path) -> None:
    """Flip one bit inside the largest tensor record: the file still unpickles, only the
    zip CRC-32 can tell."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        offset = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize(
    "damage,why", [(_truncate, "not a complete checkpoint file"), (_flip_bit, "checksum mismatch")]
)
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(server, root, baseline, damage, why):
    name = f"corrupt_{damage.__name__.strip('_')}"
    run_dir = root / name
    args = (*RUN, f"run_name={name}")
    result = server.run(*args, root=root, env=fault_env("kill_at_step=47"), check=False)
    assert result.returncode == -signal.SIGKILL
    files = complete_files(run_dir)
    newest_name = max((key, n) for n, key in files.items() if PERIODIC.match(n))[1]
    assert newest_name == "step_00000045.pt"
    previous = sorted(key for n, key in files.items() if key != files[newest_name])[-1]
    damage(run_dir / newest_name)
    damaged = (run_dir / newest_name).read_bytes()

    result = server.run(*args, "resume=auto", root=root)
    warning = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warning) == 1 and f"skipped {run_dir / newest_name}: " in warning[0], result.stderr
    assert why in warning[0] and f"kept it as {newest_name}.corrupt" in warning[0]
    assert "last.pt.corrupt" in warning[0]  # its hard link, set aside with it
    resumed_from(result, run_dir, previous)
    assert (run_dir / f"{newest_name}.corrupt").read_bytes() == damaged  # kept, not deleted
    assert_matches_baseline(run_dir, baseline)


def test_enospc_during_a_save_keeps_previous_checkpoints(server, root, baseline):
    run_dir = root / "enospc"
    args = (*RUN, "run_name=enospc")
    result = server.run(*args, root=root, env=fault_env("enospc_in_write=5"), check=False)
    assert result.returncode == EXIT_BAD_INPUT
    error = one_line_error(result)
    failed = re.match(
        r"error: (\S+): checkpoint write failed \(No space left on device\); "
        r"the previous checkpoints in (\S+) are intact$",
        error,
    )
    assert failed and Path(failed.group(2)) == run_dir, error
    assert not Path(failed.group(1)).exists()
    assert not temporaries(run_dir)
    assert_all_complete(run_dir)
    before = newest(run_dir)
    assert 0 < before[0] < int(re.search(r"_(\d+)\.pt$", failed.group(1)).group(1))

    result = server.run(*args, "resume=auto", root=root)
    resumed_from(result, run_dir, before)
    assert_matches_baseline(run_dir, baseline)


def test_second_sigint_during_a_save_aborts_at_once(server, root, baseline):
    """Ctrl-C, then Ctrl-C again while the checkpoint is being written: exit 130 at once,
    the half-written temporary is never a checkpoint, and the run resumes exactly."""
    run_dir = root / "abort"
    args = (*RUN, "run_name=abort")
    result = server.run(*args, root=root, env=fault_env("int_in_write=5"), check=False)
    assert result.returncode == EXIT_ABORTED, result.stderr
    assert "second SIGINT: aborting without saving" in result.stderr
    assert temporaries(run_dir)  # the write it abandoned
    assert_all_complete(run_dir)
    before = newest(run_dir)

    result = server.run(*args, "resume=auto", root=root)
    resumed_from(result, run_dir, before)
    assert not temporaries(run_dir)
    assert_matches_baseline(run_dir, baseline)


def test_max_time_saves_exits_3_and_resumes_exactly(server, root, baseline):
    run_dir = root / "max_time"
    args = (*RUN, "run_name=max_time")
    result = server.run(*args, "trainer.max_time=1e-6", root=root, check=False)
    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    assert f"interrupted: trainer.max_time: saved {run_dir / 'step_00000001.pt'}" in (result.stderr)
    result = server.run(*args, "resume=auto", root=root)
    resumed_from(result, run_dir, (1, 0))
    assert_matches_baseline(run_dir, baseline)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_good_checkpoints(server, root):
    run_dir = root / "nan"
    result = server.run(
        "experiment=quadratic_csv",
        "trainer.device=cpu",
        "trainer.epochs=6",
        "optimizer.lr=3",
        "checkpoint.every_n_steps=3",
        "checkpoint.every_n_epochs=1",
        "run_name=nan",
        root=root,
        check=False,
    )
    assert result.returncode == EXIT_BAD_INPUT
    error = one_line_error(result)
    stop = re.match(
        r"error: non-finite loss at epoch (\d+), step (\d+) \(batch (\d+) of the "
        r"epoch\);.* the last good checkpoint is kept$",
        error,
    )
    assert stop, error
    epoch, step, batch = map(int, stop.groups())
    assert (epoch, batch) == ((step - 1) // 10 + 1, (step - 1) % 10 + 1)
    assert_all_complete(run_dir)
    files = complete_files(run_dir)
    assert max(files.values())[0] < step  # nothing saved at or after the bad step
    for name in files:
        weights = load(run_dir / name)["model_state_dict"]
        assert all(torch.isfinite(t).all() for t in weights.values()), name
    best = load(run_dir / "best.pt")
    rows = read_history(run_dir / "metrics.csv", best["epoch"])
    assert best["best"]["value"] == min(row["val_loss"] for row in rows)


def test_a_nan_model_is_never_written(tmp_path):
    from omegaconf import OmegaConf

    from engine.checkpoint import Progress, build_checkpoint

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    cfg = OmegaConf.create({"checkpoint": {"monitor": "val_loss"}})
    progress = Progress(epoch=2, step_in_epoch=3, global_step=23)
    with pytest.raises(UserError, match=r"non-finite weights \[bias\] at epoch 3, step 23"):
        build_checkpoint(
            {
                "model": model,
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                "scheduler": None,
                "scaler": torch.amp.GradScaler("cpu", enabled=False),
            },
            progress,
            cfg,
        )


def test_find_latest_ignores_foreign_files_and_never_overwrites_set_aside_ones(tmp_path):
    from engine.run_dir import atomic_save

    def state(step: int) -> dict:
        return {"model_state_dict": {"w": torch.ones(3) * step}, "epoch": 0, "global_step": step}

    for step in (3, 6):
        atomic_save(state(step), tmp_path / f"step_{step:08d}.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")  # a user's file: not a candidate
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "step_00000006.pt.corrupt").write_text("set aside earlier")
    _truncate(tmp_path / "step_00000006.pt")

    with pytest.warns(
        UserWarning,
        match=r"step_00000006\.pt: .*kept it as "
        r"step_00000006\.pt\.corrupt\.1",
    ):
        path, found = find_latest(tmp_path, load_checkpoint)
    assert path.name == "step_00000003.pt" and found["global_step"] == 3
    assert (tmp_path / "step_00000006.pt.corrupt").read_text() == "set aside earlier"
    assert (tmp_path / "notes.pt").exists() and (tmp_path / "weights.pt").exists()
