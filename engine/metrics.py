"""metrics.csv (one row per epoch) and loss-curve plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from engine.distributed import rank_zero_only
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


@rank_zero_only
def plot_losses(rows: list[dict], path: Path) -> None:
    """Train and validation loss per epoch, as PNG."""
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
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path, lambda out: fig.savefig(out, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches, loss_fn, classification: bool,
             autocast_ctx=None) -> dict[str, float]:
    """Mean loss (and accuracy) over a split; sums stay on the device, read once at the end."""
    import contextlib

    model.eval()
    total = correct = None
    n = 0
    for x, y in batches:
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            out = model(x)
            loss = loss_fn(out, y).float() * len(y)
        total = loss if total is None else total + loss
        if classification:
            hits = (out.argmax(1) == y).sum()
            correct = hits if correct is None else correct + hits
        n += len(y)
    if total is None:
        return {"loss": float("nan")}
    result = {"loss": total.item() / n}
    if classification:
        result["acc"] = correct.item() / n
    return result
