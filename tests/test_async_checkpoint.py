"""checkpoint.async=true: the same file as a synchronous save, one write at a time, errors seen."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
import zipfile

import pytest
import torch
from conftest import REPO, compose

import engine.run_dir
from engine.checkpoint import load_checkpoint
from engine.errors import UserError
from engine.run_dir import CheckpointSaver, CheckpointWriteError, atomic_save, verify


def _state() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied weights: one storage in the file
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 1,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.5,
        "epoch_step_losses": torch.zeros(0),
        "history": [{"epoch": 1, "val_loss": 0.1}],
        "view": model[0].weight[2:5],
    }
    return model, state


def _saver(tmp_path, name: str, background: bool, keep_last: int = 3) -> CheckpointSaver:
    run_dir = tmp_path / name
    run_dir.mkdir()
    return CheckpointSaver(run_dir, keep_last, background=background)


def test_async_file_is_byte_identical_to_a_sync_save(tmp_path):
    _, state = _state()
    sync, background = _saver(tmp_path, "sync", False), _saver(tmp_path, "async", True)
    sync.save(state, "epoch_0001.pt", best=True)
    background.save(state, "epoch_0001.pt", best=True)
    background.close()
    written = (background.run_dir / "epoch_0001.pt").read_bytes()
    assert written == (sync.run_dir / "epoch_0001.pt").read_bytes()
    for link in ("last.pt", "best.pt"):
        assert os.path.samefile(background.run_dir / link, background.run_dir / "epoch_0001.pt")
    verify(background.run_dir / "last.pt")
    loaded = load_checkpoint(background.run_dir / "last.pt")
    weights = loaded["model_state_dict"]
    assert (
        weights["0.weight"].untyped_storage().data_ptr() == weights["2.weight"].untyped_storage().data_ptr()
    )  # still tied after the snapshot
    assert not list(background.run_dir.glob(".*.tmp"))


def test_state_is_snapshotted_when_save_returns(tmp_path, monkeypatch):
    """Training mutates the weights in place right after save() returns; the file must hold
    the values of the moment of the save."""
    model, state = _state()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    real_save = engine.run_dir.atomic_save

    def held_save(state, path):
        assert release.wait(30)
        real_save(state, path)

    monkeypatch.setattr(engine.run_dir, "atomic_save", held_save)
    saver = _saver(tmp_path, "run", True)
    saver.save(state, "step_00000001.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next optimizer step
    release.set()
    saver.close()
    saved = load_checkpoint(saver.run_dir / "step_00000001.pt")["model_state_dict"]
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_at_most_one_write_in_flight(tmp_path, monkeypatch):
    active, peak, order = 0, 0, []
    lock = threading.Lock()
    real_save = engine.run_dir.atomic_save

    def slow_save(state, path):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.2)  # long enough that an overlapping second write would be seen
        real_save(state, path)
        with lock:
            active -= 1
        order.append(f"wrote {path.name}")

    monkeypatch.setattr(engine.run_dir, "atomic_save", slow_save)
    _, state = _state()
    saver = _saver(tmp_path, "run", True, keep_last=2)
    for step in (1, 2, 3):
        saver.save(state, f"step_{step:08d}.pt")
        order.append(f"returned step_{step:08d}.pt")
    saver.close()
    assert peak == 1
    # save N+1 returns only after write N is durable
    assert order.index("wrote step_00000001.pt") < order.index("returned step_00000002.pt")
    assert order.index("wrote step_00000002.pt") < order.index("returned step_00000003.pt")
    names = sorted(p.name for p in saver.run_dir.glob("*.pt"))
    assert names == ["last.pt", "step_00000002.pt", "step_00000003.pt"]  # retention ran
    assert os.path.samefile(saver.run_dir / "last.pt", saver.run_dir / "step_00000003.pt")


def test_then_runs_when_the_background_write_is_durable(tmp_path, monkeypatch):
    """The trackers get a checkpoint's values as soon as its file is durable, not at the next
    save: a kill between two async saves leaves them with what the newest file holds."""
    release, durable, seen = threading.Event(), threading.Event(), []
    real_save = engine.run_dir.atomic_save

    def held_save(state, path):
        assert release.wait(30)
        real_save(state, path)

    def then():
        seen.append(os.path.samefile(saver.run_dir / "last.pt", saver.run_dir / "step_00000001.pt"))
        durable.set()

    monkeypatch.setattr(engine.run_dir, "atomic_save", held_save)
    _, state = _state()
    saver = _saver(tmp_path, "run", True)
    saver.save(state, "step_00000001.pt", then=then)
    assert not durable.wait(0.3)  # still writing: nothing handed to the trackers
    release.set()
    assert durable.wait(30) and seen == [True]  # no save(), wait() or close() needed
    saver.close()


def test_train_async_trackers_hold_what_the_newest_durable_checkpoint_holds(tmp_path, monkeypatch):
    import train
    from engine.loggers import TensorBoardLogger

    sent: list[dict] = []
    real_send = TensorBoardLogger.send

    def recording_send(self, entries):
        sent.extend(entries)
        real_send(self, entries)

    monkeypatch.setattr(TensorBoardLogger, "send", recording_send)
    written: list = []
    real_save, real_wait = engine.run_dir.atomic_save, CheckpointSaver.wait

    def recording_save(state, path):
        real_save(state, path)
        written.append((path.name, state["global_step"]))

    def checked_wait(self):
        real_wait(self)  # the newest write is durable now
        periodic = [step for name, step in written if name != "best.pt"]
        if periodic:  # every value the file holds, and none after it
            assert max(entry["step"] for entry in sent) == periodic[-1]

    monkeypatch.setattr(engine.run_dir, "atomic_save", recording_save)
    monkeypatch.setattr(CheckpointSaver, "wait", checked_wait)
    cfg = compose(
        "train",
        [
            "experiment=quadratic_csv",
            "trainer.epochs=3",
            "trainer.device=cpu",
            "trainer.log_every_n_steps=1",
            "checkpoint.every_n_epochs=1",
            "checkpoint.every_n_steps=3",
            "checkpoint.async=true",
            "logger=[csv,tensorboard]",
            f"checkpoint.root={tmp_path}",
            "run_name=tracked",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(cfg)
    assert len(written) > 3 and max(entry["step"] for entry in sent) == written[-1][1]


def test_failed_background_write_raises_at_next_save_and_keeps_old_files(tmp_path, monkeypatch):
    _, state = _state()
    saver = _saver(tmp_path, "run", True)
    saver.save(state, "epoch_0001.pt")
    saver.wait()
    before = (saver.run_dir / "epoch_0001.pt").read_bytes()

    def full_disk(state, path):
        raise CheckpointWriteError(
            f"{path}: checkpoint write failed (No space left on device); the previous checkpoints are intact"
        )

    monkeypatch.setattr(engine.run_dir, "atomic_save", full_disk)
    saver.save(state, "epoch_0002.pt")  # returns: the failure happens in the background
    with pytest.raises(CheckpointWriteError, match="epoch_0002.pt.*background write"):
        saver.save(state, "epoch_0003.pt")
    assert (saver.run_dir / "epoch_0001.pt").read_bytes() == before
    assert os.path.samefile(saver.run_dir / "last.pt", saver.run_dir / "epoch_0001.pt")
    monkeypatch.setattr(engine.run_dir, "atomic_save", atomic_save)  # disk has room again
    saver.save(state, "epoch_0004.pt")  # the error was reported once; the next save works
    saver.wait()
    assert os.path.samefile(saver.run_dir / "last.pt", saver.run_dir / "epoch_0004.pt")
    monkeypatch.setattr(engine.run_dir, "atomic_save", full_disk)
    saver.save(state, "epoch_0005.pt")
    with pytest.raises(UserError, match="epoch_0005.pt"):
        saver.close()  # the end of training sees it too


def test_train_async_gives_the_same_checkpoints_as_sync(tmp_path):
    import train

    finals = {}
    for mode in ("false", "true"):
        cfg = compose(
            "train",
            [
                "experiment=quadratic_csv",
                "trainer.epochs=3",
                "trainer.device=cpu",
                "checkpoint.every_n_epochs=1",
                "checkpoint.every_n_steps=2",
                "checkpoint.keep_last=2",
                f"checkpoint.async={mode}",
                f"checkpoint.root={tmp_path}",
                f"run_name=async-{mode}",
            ],
        )
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(cfg)
        run_dir = tmp_path / f"async-{mode}"
        assert not any(t.name == "checkpoint-writer" for t in threading.enumerate())
        finals[mode] = (sorted(p.name for p in run_dir.glob("*.pt")), load_checkpoint(run_dir / "last.pt"))
    (names_sync, sync), (names_async, background) = finals["false"], finals["true"]
    assert names_async == names_sync
    for part in ("model_state_dict", "optimizer_state_dict"):
        a, b = sync[part], background[part]
        if part == "optimizer_state_dict":
            a = {i: s["momentum_buffer"] for i, s in a["state"].items()}
            b = {i: s["momentum_buffer"] for i, s in b["state"].items()}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "async-false" / "metrics.csv").read_text() == (
        tmp_path / "async-true" / "metrics.csv"
    ).read_text()


def test_train_async_write_failure_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    import train

    def full_disk(state, path):
        raise CheckpointWriteError(
            f"{path}: checkpoint write failed (No space left on device); the previous checkpoints are intact"
        )

    monkeypatch.setattr(engine.run_dir, "atomic_save", full_disk)
    cfg = compose(
        "train",
        [
            "experiment=quadratic_csv",
            "trainer.epochs=2",
            "trainer.device=cpu",
            "checkpoint.every_n_epochs=1",
            "checkpoint.async=true",
            f"checkpoint.root={tmp_path}",
            "run_name=full",
        ],
    )
    with pytest.raises(CheckpointWriteError, match="epoch_0001.pt.*No space left.*background"):
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(cfg)  # UserError: cli_errors prints it as one line and exits 2
    assert not list((tmp_path / "full").glob("*.pt"))


def test_verify_refuses_a_truncated_file_and_reads_deflated_zips(tmp_path):
    """(A flipped bit: tests/test_fuzz.py, seeded over positions.)"""
    _, state = _state()
    state["big"] = torch.arange(100_000, dtype=torch.float32)
    path = tmp_path / "ck.pt"
    atomic_save(state, path)
    verify(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a complete checkpoint"):
        verify(truncated)
    compressed = tmp_path / "deflated.zip"  # not torch.save's: checked through zipfile
    with zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a", b"x" * 1000)
    verify(compressed)


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
import torch
import engine.run_dir
from engine.run_dir import CheckpointSaver, CheckpointWriteError, atomic_save

def slow_save(state, path):
    time.sleep(1.0)  # still writing when the main thread reaches the end of the script
    if sys.argv[2] == "fail":
        raise CheckpointWriteError(f"{path}: checkpoint write failed (disk full)")
    atomic_save(state, path)

engine.run_dir.atomic_save = slow_save
saver = CheckpointSaver(Path(sys.argv[1]), keep_last=2, background=True)
saver.save({"model_state_dict": {"w": torch.ones(1000)}}, "epoch_0001.pt")
print("main thread done", flush=True)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_process_exit_waits_for_the_write_in_flight(tmp_path, outcome):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), outcome],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "main thread done" in result.stdout, result.stderr
    if outcome == "ok":
        verify(tmp_path / "epoch_0001.pt")  # complete, although main ended mid-write
        assert os.path.samefile(tmp_path / "last.pt", tmp_path / "epoch_0001.pt")
        assert result.stderr == ""
    else:
        assert "error: " in result.stderr and "disk full" in result.stderr
        assert not list(tmp_path.glob("*.pt"))
