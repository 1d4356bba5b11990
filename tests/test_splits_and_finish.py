"""Distinct train/val/test splits, best.pt tested on the test split at the end of training,
and an idempotent end of run: `resume=auto` on a complete run makes what is missing."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from conftest import compose, run_script


def _rows(split) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in torch.cat([split.x, split.y], dim=1)}


@pytest.mark.parametrize("seed", [0, 7])
def test_linear_splits_are_disjoint_and_keep_the_tutorials_test_part(seed):
    from data.linear import LinearData

    data = LinearData(seed=seed)
    train, val, test = (data.split(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 8, 10)
    assert not (_rows(train) & _rows(val) or _rows(train) & _rows(test) or _rows(val) & _rows(test))
    # the tutorial's ordered 80/20 split: test is the last fifth, val comes from the rest
    assert test.x.min() >= 0.79 and max(train.x.max(), val.x.max()) < 0.79


@pytest.mark.parametrize("seed", [0, 3])
def test_quadratic_csv_splits_are_disjoint(tmp_path, seed):
    from data.quadratic_csv import QuadraticCSVData

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(100, generator=gen, dtype=torch.float64) * 10 - 5
    path = tmp_path / "dataset.csv"
    path.write_text("x,y\n" + "".join(f"{a:.6f},{2 * a * a + 3 * a + 1:.6f}\n" for a in x))
    data = QuadraticCSVData(path=str(path), seed=seed)
    train, val, test = (data.split(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert not (_rows(train) & _rows(val) or _rows(train) & _rows(test) or _rows(val) & _rows(test))


def test_training_ends_with_best_pt_on_the_test_split(tmp_path):
    """test_metrics.json holds best.pt's metrics on the test split: the same numbers
    evaluate.py gives for best.pt on that split, and not the validation numbers that picked
    it."""
    result = run_script(
        "train.py", "experiment=digits_cnn", "trainer.epochs=2", "trainer.device=cpu", "run_name=tested", root=tmp_path
    )
    run = tmp_path / "tested"
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert f"test_loss {metrics['test_loss']:.4g}" in result.stdout
    best = torch.load(run / "best.pt", weights_only=True)
    assert metrics["epoch"] == best["epoch"]
    out = tmp_path / "eval.json"
    run_script("evaluate.py", f"ckpt={run / 'best.pt'}", "split=test", f"output={out}")
    evaluated = json.loads(out.read_text())
    assert metrics["test_loss"] == pytest.approx(evaluated["test_loss"], rel=1e-5)
    assert metrics["test_acc"] == pytest.approx(evaluated["test_acc"])
    assert metrics["samples"] == evaluated["samples"]
    val_loss = float((run / "metrics.csv").read_text().splitlines()[best["epoch"]].split(",")[3])
    assert metrics["test_loss"] != val_loss


def test_resume_auto_on_a_complete_run_makes_the_missing_end_of_run_outputs(tmp_path, monkeypatch):
    """Ctrl-C right after the final checkpoint: no plot, no test metrics, no export. Every
    later `resume=auto` used to say "already complete" and leave it so."""
    import train

    overrides = [
        "experiment=quadratic_csv",
        "trainer.epochs=4",
        "trainer.device=cpu",
        f"checkpoint.root={tmp_path}",
        "run_name=done",
    ]
    run = tmp_path / "done"
    ends = ("loss_curve.png", "test_metrics.json", "export")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "finish_run", interrupted)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        train.train(compose("train", overrides))
    monkeypatch.undo()
    assert (run / "epoch_0004.pt").is_file()
    shutil.rmtree(run / "export", ignore_errors=True)
    (run / "loss_curve.png").unlink(missing_ok=True)  # written by the final save; a kill
    assert not any((run / name).exists() for name in ends)  # before it leaves none

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train(compose("train", [*overrides, "resume=auto"]))
    assert "already complete" in out.getvalue()
    assert all((run / name).exists() for name in ends), out.getvalue()
    assert (run / "export" / "model.safetensors").is_file()
    made = {p: (run / p).stat().st_mtime_ns for p in ("loss_curve.png", "test_metrics.json")}

    # Idempotent: one output missing -> only that one is made again.
    (run / "export" / "config.yaml").unlink()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train(compose("train", [*overrides, "resume=auto"]))
    assert "made the missing end-of-run output: export/" in out.getvalue()
    assert (run / "export" / "config.yaml").is_file()
    assert made == {p: (run / p).stat().st_mtime_ns for p in made}
