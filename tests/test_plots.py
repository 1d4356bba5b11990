"""The plots a user looks at first: evaluate.py's predictions and confusion matrix, and
loss_curve.png, which a stopped run has too (it is written at every checkpoint save)."""

from __future__ import annotations

import signal

import torch
from conftest import run_script
from matplotlib.colors import to_rgba

from engine.metrics import confusion_figure, loss_figure, regression_figure
from tests.faults import fault_env


def test_predictions_plot_has_axis_labels_and_test_points_above_predictions():
    x = torch.linspace(0, 1, 50).unsqueeze(1)
    y = 0.7 * x + 0.3
    fig = regression_figure((x[:40], y[:40]), (x[40:], y[40:]), y[40:].clone())
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    by_label = {c.get_label(): c for c in ax.collections}
    test, predictions = by_label["test data"], by_label["predictions"]
    assert test.get_zorder() > predictions.get_zorder()  # drawn on top
    assert test.get_sizes()[0] < predictions.get_sizes()[0]  # and not covered by a bigger marker
    assert predictions.get_alpha() < 1


def test_confusion_matrix_labels_every_class_with_readable_counts():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 40, (10, 10), generator=gen)
    matrix.diagonal().add_(100)
    fig = confusion_figure(matrix)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(10)]
    counts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(counts) == 100 and all(t.get_fontsize() >= 9 for t in counts.values())
    assert counts[(3, 3)].get_text() == str(int(matrix[3, 3]))
    # dark cells (the diagonal) get white numbers, light ones black
    assert to_rgba(counts[(0, 0)].get_color()) == to_rgba("white")
    low = min(((i, j) for i in range(10) for j in range(10)), key=lambda ij: matrix[ij])
    assert to_rgba(counts[low].get_color()) == to_rgba("black")


def test_loss_curve_has_a_title_and_labels():
    rows = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e} for e in range(1, 6)]
    ax = loss_figure(rows).axes[0]
    assert "loss" in ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel()
    assert [line.get_label() for line in ax.get_lines()] == ["train loss", "val loss"]


def test_a_killed_run_has_its_loss_curve(tmp_path):
    """SIGKILL in epoch 5 of 8: the save after epoch 4 wrote loss_curve.png."""
    result = run_script(
        "train.py",
        "experiment=quadratic_csv",
        "trainer.epochs=8",
        "trainer.device=cpu",
        "checkpoint.every_n_epochs=2",
        "run_name=killed",
        root=tmp_path,
        env=fault_env("kill_at_step=45"),
        check=False,
    )
    assert result.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert (run / "epoch_0004.pt").is_file() and not (run / "epoch_0006.pt").exists()
    png = (run / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_a_run_stopped_by_max_time_has_its_loss_curve(tmp_path):
    result = run_script(
        "train.py",
        "experiment=quadratic_csv",
        "trainer.epochs=100000",
        "trainer.device=cpu",
        "checkpoint.every_n_epochs=100000",
        "trainer.max_time=3",
        "run_name=timed",
        root=tmp_path,
        check=False,
    )
    assert result.returncode == 3, result.stderr[-2000:]  # stopped, saved, resumable
    assert (tmp_path / "timed" / "loss_curve.png").stat().st_size > 1000
