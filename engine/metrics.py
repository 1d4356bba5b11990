"""Metrics: evaluation (over every rank under torchrun), metrics.csv (one row per epoch) and
the plots (matplotlib is imported only when a plot is made: it costs start-up time)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import torch

from engine.distributed import all_sum, broadcast_from_main, is_distributed, rank_zero_only, unwrap
from engine.errors import UserError
from engine.outputs import write_atomic


@rank_zero_only
def write_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file from the checkpoint's history (atomic): after a resume the CSV
    holds exactly the epochs the model state has seen, none duplicated, none missing."""
    def write(out) -> None:
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)  # a full disk: one line, no temporary left


@rank_zero_only
def append_csv(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(row))
    if new:
        writer.writeheader()
    writer.writerow(row)
    try:
        with open(path, "a", newline="") as out:
            out.write(buffer.getvalue())
    except OSError as err:  # resume=auto rewrites the file from the checkpoint's history
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None


def read_history(path: Path, epoch: int) -> list[dict]:
    """The rows of metrics.csv for epochs 1..`epoch` (the history of a checkpoint at `epoch`).

    Checkpoints do not carry the history (it would make every save grow with the run's
    length): metrics.csv is the history. A row is appended before the checkpoint of its epoch
    is written, so the file has at least the checkpoint's epochs; later rows (of epochs the
    resumed run recomputes) are dropped. Values are read back as int/float, so rewriting
    them with write_csv gives the same bytes."""
    if not path.is_file():
        return []
    with open(path, newline="") as rows:
        history = []
        for row in csv.DictReader(rows):
            try:
                parsed = {k: int(v) if k in ("epoch", "step") else float(v)
                          for k, v in row.items()}
            except (TypeError, ValueError):
                break  # a torn or foreign row: keep what came before it
            if parsed.get("epoch") != len(history) + 1 or parsed["epoch"] > epoch:
                break
            history.append(parsed)
    return history


@rank_zero_only
def plot_losses(rows: list[dict], path: Path) -> None:
    """Train and validation loss per epoch, as PNG (written atomically: a kill mid-write
    never leaves a torn file that a later resume would take as done)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(rows)
    try:
        write_atomic(path, lambda out: fig.savefig(out, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


def loss_figure(rows: list[dict]):
    """The loss-curve figure (open, for tests to inspect before it is saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in rows], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if min(r["val_loss"] for r in rows) > 0 else "linear")
    ax.set_title(f"training and validation loss ({len(rows)} epochs)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def regression_figure(train: tuple[torch.Tensor, torch.Tensor],
                      test: tuple[torch.Tensor, torch.Tensor], predictions: torch.Tensor,
                      split: str = "test"):
    """The workflow tutorial's plot_predictions: train and `split` points and the model's
    predictions against the last feature column (x). The data points are drawn above the
    prediction markers, so a good fit does not hide them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(train[0][:, -1], train[1][:, 0], s=8, c="tab:blue", label="training data",
               zorder=2)
    ax.scatter(test[0][:, -1], predictions[:, 0], s=60, c="tab:red", alpha=0.5,
               label="predictions", zorder=3)
    ax.scatter(test[0][:, -1], test[1][:, 0], s=12, c="tab:green", label=f"{split} data",
               zorder=4)
    ax.set_xlabel("x (input feature)")
    ax.set_ylabel("y (target / prediction)")
    ax.set_title(f"predictions on the {split} split")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: torch.Tensor, class_names: list[str] | None = None):
    """Confusion matrix with every class labelled and each count readable (white on dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = matrix.shape[0]
    names = class_names or [str(i) for i in range(classes)]
    size = max(5.0, 0.6 * classes + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(classes), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(classes), names)
    dark = float(matrix.max()) / 2
    for i in range(classes):
        for j in range(classes):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=10,
                    color="white" if float(matrix[i, j]) > dark else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = float(matrix.sum())
    ax.set_title(f"accuracy {float(matrix.diag().sum()) / total if total else 0:.3f}")
    fig.tight_layout()
    return fig


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches, loss_fn, classification: bool,
             autocast_ctx=None, confusion: bool = False) -> dict[str, Any]:
    """Mean loss (and accuracy) over a split; sums stay on the device, read once at the end.
    confusion=True (a classifier): also `confusion_matrix`, counts[true][predicted]."""
    model.eval()
    total = correct = counts = None
    n = 0
    for x, y in batches:
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            out = model(x)
            loss = loss_fn(out, y).float() * len(y)
        total = loss if total is None else total + loss
        if classification:
            predicted = out.argmax(1)
            hits = (predicted == y).sum()
            correct = hits if correct is None else correct + hits
            if confusion:
                classes = out.shape[1]
                pairs = torch.bincount(y * classes + predicted, minlength=classes * classes)
                counts = pairs if counts is None else counts + pairs
        n += len(y)
    if total is None:
        return {"loss": float("nan")}
    result: dict[str, Any] = {"loss": total.item() / n}
    if classification:
        result["acc"] = correct.item() / n
    if counts is not None:
        side = int(round(len(counts) ** 0.5))
        result["confusion_matrix"] = counts.reshape(side, side).tolist()
    return result


def evaluate_all(model: torch.nn.Module, batches: Any, loss_fn: Any, classification: bool,
                 autocast_ctx: Any = None) -> dict[str, float]:
    """`evaluate` over every rank's `distributed.shard` of the split, summed and divided
    once: the same numbers one process gets on the whole split. Runs the plain module, so no
    collective happens inside the loop and shards may differ in length."""
    if not is_distributed():
        return evaluate(model, batches, loss_fn, classification, autocast_ctx)
    module = unwrap(model)
    broadcast_from_main(module.buffers())  # BatchNorm statistics: rank 0's, the ones it saves
    local = evaluate(module, batches, loss_fn, classification, autocast_ctx)
    n = batches.samples()  # this rank's samples (trainer.limit_val_batches may cut them)
    loss_sum, hits, total = all_sum([local["loss"] * n if n else 0.0,
                                     local.get("acc", 0.0) * n if n else 0.0, float(n)])
    result = {"loss": loss_sum / total if total else float("nan")}
    if classification:
        result["acc"] = hits / total if total else float("nan")
    return result
