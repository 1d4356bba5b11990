"""Long runs of tiny models (tutorial 002: 10,000 epochs, a checkpoint every 1000): no write
whose cost grows with the run, console output throttled, metrics.csv still complete, and a
resume still exact (history read back from metrics.csv)."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch
from conftest import compose, run_script

from engine.checkpoint import load_checkpoint

TUTORIAL_002 = ["experiment=quadratic_csv", "data.batch_size=128", "optimizer.lr=0.0001", "trainer.device=cpu"]


def _train(tmp_path, overrides, monkeypatch=None):
    import train

    cfg = compose("train", [*TUTORIAL_002, f"checkpoint.root={tmp_path}", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train(cfg)
    return out.getvalue()


def test_checkpoint_writes_do_not_grow_with_the_run(tmp_path, monkeypatch):
    """Before: best.pt (with the whole history) was rewritten at every improving epoch, so
    a run of N epochs wrote ~N files of growing size. Now: only the periodic saves write
    (best.pt with them), and a checkpoint is the same size at epoch 10 and at epoch 60."""
    import engine.run_dir

    writes = []
    real = engine.run_dir.atomic_save
    monkeypatch.setattr(
        engine.run_dir, "atomic_save", lambda state, path: (writes.append(path.name), real(state, path))
    )
    _train(tmp_path, ["trainer.epochs=60", "checkpoint.every_n_epochs=10", "checkpoint.keep_last=10", "run_name=sizes"])
    run = tmp_path / "sizes"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 61  # every epoch is in metrics.csv
    val = [float(r.split(",")[3]) for r in rows[1:]]
    improving = sum(v < min(val[:i], default=float("inf")) for i, v in enumerate(val))
    assert improving > 50  # lr 1e-4: the val loss falls almost every epoch
    periodic = [n for n in writes if n.startswith("epoch_")]
    assert periodic == [f"epoch_{e:04d}.pt" for e in range(10, 61, 10)]
    assert len(writes) <= 2 * len(periodic)  # at most one best.pt write per save
    sizes = {(run / n).stat().st_size for n in periodic}
    # No per-epoch history inside (it added ~6 KB by epoch 60); the list of saved files
    # (keep_last names) and zip alignment move the size by a few bytes.
    assert max(sizes) - min(sizes) < 256, sizes
    assert "history" not in load_checkpoint(run / "epoch_0060.pt")


def test_best_pt_is_the_best_epoch_even_between_saves(tmp_path):
    """best.pt of an epoch that is not a save is written with the next save, and it is that
    epoch's state (a full, resumable checkpoint)."""
    # lr 0.1 with momentum: val loss goes up and down, so the best epoch is not a save.
    _train(tmp_path, ["optimizer.lr=0.3", "trainer.epochs=24", "checkpoint.every_n_epochs=8", "run_name=between"])
    run = tmp_path / "between"
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().split()[1:]]
    val = [float(r[3]) for r in rows]
    best_epoch = val.index(min(val)) + 1
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == best_epoch and best["best"]["value"] == min(val)
    assert best["global_step"] == int(rows[best_epoch - 1][1])


def test_console_output_is_throttled_and_metrics_csv_keeps_every_epoch(tmp_path):
    result = run_script(
        "train.py",
        *TUTORIAL_002,
        "trainer.epochs=300",
        "checkpoint.every_n_epochs=100",
        "trainer.print_every_s=3600",
        "run_name=quiet",
        root=tmp_path,
    )
    epochs = [int(m) for m in re.findall(r"^epoch (\d+) ", result.stdout, re.M)]
    assert epochs == [1, 100, 200, 300]  # first, every checkpoint epoch, the last
    assert len((tmp_path / "quiet" / "metrics.csv").read_text().splitlines()) == 301

    every = run_script(
        "train.py", *TUTORIAL_002, "trainer.epochs=5", "trainer.print_every_s=0", "run_name=loud", root=tmp_path
    )
    assert re.findall(r"^epoch (\d+) ", every.stdout, re.M) == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("extra_rows", [0, 3])
def test_resume_reads_the_history_back_from_metrics_csv(tmp_path, extra_rows):
    """A checkpoint carries no history: a resume keeps exactly metrics.csv's rows up to the
    checkpoint's epoch (rows of later epochs, written before a kill, are dropped and
    recomputed), and the finished file is byte-identical to an uninterrupted run's."""
    _train(tmp_path, ["trainer.epochs=12", "checkpoint.every_n_epochs=4", "run_name=whole"])
    _train(tmp_path, ["trainer.epochs=8", "checkpoint.every_n_epochs=4", "run_name=cut"])
    cut = tmp_path / "cut"
    whole_csv = (tmp_path / "whole" / "metrics.csv").read_text()
    lines = whole_csv.splitlines(keepends=True)
    assert (cut / "metrics.csv").read_text() == "".join(lines[:9])
    # As after a kill past epoch 8: rows of epochs the checkpoint has not seen (wrong ones
    # here, to prove they are not kept).
    with open(cut / "metrics.csv", "a") as f:
        for epoch in range(9, 9 + extra_rows):
            f.write(f"{epoch},0,9.0,9.0,0.1\n")
    out = _train(tmp_path, ["trainer.epochs=12", "checkpoint.every_n_epochs=4", "run_name=cut", "resume=auto"])
    assert "resumed at epoch 8" in out
    assert (cut / "metrics.csv").read_text() == whole_csv
    final, expected = load_checkpoint(cut / "last.pt"), load_checkpoint(tmp_path / "whole" / "last.pt")
    for key, value in expected["model_state_dict"].items():
        assert torch.equal(final["model_state_dict"][key], value)
    assert final["best"] == expected["best"]
