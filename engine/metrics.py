"""Evaluation (one `evaluate` for validation, the end-of-run test and evaluate.py),
metrics.csv, the plots, the end-of-run outputs, and rebuilding a model for evaluate/predict.
matplotlib is imported only when a plot is made: it costs start-up time."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine import distributed as ddp
from engine.batches import Batches
from engine.checkpoint import (
    CONFIG,
    WEIGHTS,
    data_state_of,
    inference_weights,
    is_export,
    load_checkpoint,
    load_export,
    load_model_state,
    load_state_dict_file,
)
from engine.config import build, saved_sections
from engine.errors import UserError
from engine.export import export_checkpoint
from engine.run_dir import write_atomic
from engine.runtime import resolve_device


# ------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Any,
    loss_fn: Any,
    classification: bool,
    autocast_ctx: Any = None,
    *,
    all_ranks: bool = False,
    confusion: bool = False,
    outputs: bool = False,
) -> dict[str, Any]:
    """`loss`, `acc` (a classifier) and `samples` of a split; sums stay on the device until
    the end. all_ranks: each rank's `distributed.shard`, summed over ranks (the plain module
    runs: no collective in the loop, shards may differ in length). confusion: also
    `confusion_matrix` (counts[true][predicted]); outputs: also `outputs` (float, CPU)."""
    if all_ranks and ddp.is_distributed():
        model = ddp.unwrap(model)
        ddp.broadcast_from_main(model.buffers())  # BatchNorm statistics: rank 0's, as saved
    model.eval()
    losses, hits, pairs, kept, n = [], [], [], [], 0
    for x, y in batches:
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            out = model(x)
            losses.append(loss_fn(out, y).float() * len(y))
        if classification:
            predicted, classes = out.argmax(1), out.shape[1]
            hits.append((predicted == y).sum())
        if confusion:
            pairs.append(torch.bincount(y * classes + predicted, minlength=classes**2))
        if outputs:
            kept.append(out.float().cpu())
        n += len(y)
    loss_sum = torch.stack(losses).sum().item() if losses else 0.0
    hit_sum = torch.stack(hits).sum().item() if hits else 0
    if all_ranks:
        loss_sum, hit_sum, n = ddp.all_sum([loss_sum, hit_sum, n])
    result: dict[str, Any] = {"loss": loss_sum / n if n else float("nan"), "samples": int(n)}
    if classification:
        result["acc"] = hit_sum / n if n else float("nan")
    if pairs:
        result["confusion_matrix"] = torch.stack(pairs).sum(0).view(classes, classes).tolist()
    if outputs:
        result["outputs"] = torch.cat(kept) if kept else torch.empty(0)
    return result


# -------------------------------------------------------------------- metrics.csv
@ddp.rank_zero_only
def write_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file from the run's history (atomic): after a resume the CSV holds
    exactly the epochs the model state has seen, none duplicated, none missing."""

    def write(out) -> None:
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


@ddp.rank_zero_only
def append_csv(path: Path, row: dict) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(row))
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow(row)
    try:
        with open(path, "a", newline="") as out:
            out.write(buffer.getvalue())
    except OSError as err:  # resume=auto rewrites the file from the checkpoint's history
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None


# -------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """PNG, written atomically (a kill mid-write never leaves a torn file), then closed."""
    try:
        return write_atomic(path, lambda out: fig.savefig(out, format="png", dpi=100), binary=True)
    finally:
        _pyplot().close(fig)


@ddp.rank_zero_only
def plot_losses(rows: list[dict], path: Path) -> None:
    save_figure(loss_figure(rows), path)


def loss_figure(rows: list[dict]):
    """Train and validation loss per epoch (open, for tests to inspect)."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in rows], label="val loss")
    scale = "log" if min(r["val_loss"] for r in rows) > 0 else "linear"
    ax.set(xlabel="epoch", ylabel="loss", title=f"training and validation loss ({len(rows)} epochs)", yscale=scale)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def regression_figure(train: tuple, test: tuple, predictions: torch.Tensor, split: str = "test"):
    """train, test: (inputs, targets). One input feature: the workflow tutorial's plot_predictions
    against x, data drawn above the predictions; more: predicted against true, and the diagonal."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    if train[0].dim() == 2 and train[0].shape[1] == 1:
        ax.scatter(train[0][:, -1], train[1][:, 0], s=8, c="tab:blue", label="training data", zorder=2)
        ax.scatter(test[0][:, -1], predictions[:, 0], s=60, c="tab:red", alpha=0.5, label="predictions", zorder=3)
        ax.scatter(test[0][:, -1], test[1][:, 0], s=12, c="tab:green", label=f"{split} data", zorder=4)
        ax.set(xlabel="x (input feature)", ylabel="y (target / prediction)", title=f"predictions on the {split} split")
    else:
        true, predicted = test[1][:, 0], predictions[:, 0]
        low, high = float(torch.minimum(true.min(), predicted.min())), float(torch.maximum(true.max(), predicted.max()))
        ax.plot([low, high], [low, high], c="gray", lw=1, label="perfect")
        ax.scatter(true, predicted, s=12, c="tab:red", alpha=0.6, label=f"{split} samples", zorder=3)
        ax.set(xlabel="true target", ylabel="prediction", title=f"predicted vs true on the {split} split")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: torch.Tensor, names: list[str] | None = None):
    """Confusion matrix with every class labelled and each count readable (white on dark)."""
    classes = matrix.shape[0]
    names = [str(i) for i in range(classes)] if names is None else [str(n)[:20] for n in names]
    size = max(5.0, 0.6 * classes + 1.5)
    fig, ax = _pyplot().subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(classes), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(classes), names)
    dark = float(matrix.max()) / 2
    for i in range(classes):
        for j in range(classes):
            color = "white" if float(matrix[i, j]) > dark else "black"
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=10, color=color)
    accuracy = float(matrix.diag().sum()) / max(float(matrix.sum()), 1)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"accuracy {accuracy:.3f}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- the end of a run
def finish_run(cfg, run_dir, model, data, loss_fn, device, history, ctx=None, only_missing=False) -> dict[str, Any]:
    """loss_curve.png, test_metrics.json (best.pt on the test split, under the autocast `ctx`) and
    export/; with only_missing (`resume=auto` of a complete run) only those a kill, Ctrl-C or full
    disk left unmade. Loads best.pt into `model`; returns its metrics. torchrun: rank 0 does it all;
    the barrier: a rank leaving right after a broadcast sometimes aborted in gloo's teardown."""
    result = ddp.on_main(_finish, cfg, run_dir, model, data, loss_fn, device, history, ctx, only_missing)
    if ddp.is_distributed():
        torch.distributed.barrier()
    return result


def _finish(cfg, run_dir, model, data, loss_fn, device, history, ctx, only_missing) -> dict:
    plot, metrics_path, export_dir = run_dir / "loss_curve.png", run_dir / "test_metrics.json", run_dir / "export"
    # A run continued in a new folder from another run's checkpoint has no best.pt of its own
    # until an epoch beats the best it inherited: then its newest checkpoint stands in.
    best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    made = []
    if history and not (only_missing and plot.exists()):
        plot_losses(history, plot)
        made.append(plot.name)
    if only_missing and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
    else:  # best.pt on the test split: the split no choice of the run has seen
        state = load_checkpoint(best, "cpu")
        load_model_state(ddp.unwrap(model), inference_weights(state), best)  # EMA when kept
        split, classification = data.split("test"), data.task == "classification"
        batches = Batches(split, data.batch_size, device, num_workers=data.num_workers)
        result = evaluate(ddp.unwrap(model), batches, loss_fn, classification, ctx, confusion=classification)
        metrics = {f"test_{k}": result[k] for k in ("loss", "acc") if k in result}
        metrics.update(epoch=int(state["epoch"]), samples=len(split), checkpoint=str(best))
        if "confusion_matrix" in result:  # a classifier's, unless the split is empty
            metrics["confusion_matrix"] = result["confusion_matrix"]
        write_atomic(metrics_path, lambda out: out.write(json.dumps(metrics, indent=2) + "\n"))
        scores = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("test_"))
        print(f"test ({best.name}, epoch {metrics['epoch']}): {scores}")
        made.append(metrics_path.name)
    exported = is_export(export_dir) and (export_dir / CONFIG).is_file()
    if cfg.checkpoint.export and not (only_missing and exported):
        pt2 = cfg.checkpoint.get("export_pt2")  # + model.pt2 (torch.export): seconds to trace
        example = next(iter(Batches(data.split("val"), 2, device)))[0][:2] if pt2 else None
        exported = export_checkpoint(best, export_dir, model if pt2 else None, example)
        print(f"exported best weights to {exported}")
        made.append(f"{export_dir.name}/")
    if only_missing and made:
        print(f"made the missing end-of-run output: {', '.join(made)}")
    return metrics


# ------------------------------------------------- rebuilding a model (evaluate/predict)
@dataclass
class Loaded:
    model: torch.nn.Module
    data: Any  # a data.base.DataModule
    config: DictConfig  # data/model/loss sections used
    source: Path
    device: torch.device
    trusted: set[str]  # sections from the command line; the others are the file's: checked

    def build(self, key: str) -> Any:
        return build(self.config[key], key, None if key in self.trusted else self.source)

    def loss(self) -> torch.nn.Module:
        if self.config.get("loss") is not None:
            return self.build("loss")
        return torch.nn.CrossEntropyLoss() if self.data.task == "classification" else torch.nn.MSELoss()


def load_for_inference(cfg: DictConfig) -> Loaded:
    """The model and data module of ckpt=PATH (a train.py checkpoint or an export folder: its
    config says how to build them) or weights=PATH (a bare state_dict, with model=... data=...
    from the command line)."""
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = cfg.get("ckpt")  # or weights=; exactly one, and model/data with weights: cli.validate_inference
    source = Path(str(ckpt or cfg.weights))
    data, state, data_state = None, None, None
    if ckpt:
        if is_export(source):
            saved, state = load_export(source)
            data_state = data_state_of(saved, source)
        elif source.is_dir():
            raise UserError(f"ckpt={source}: a folder without {WEIGHTS}; expected a .pt file or an export folder")
        else:
            checkpoint = load_checkpoint(source, "cpu")
            saved, state = checkpoint.get("config"), inference_weights(checkpoint)  # EMA
            data_state = checkpoint.get("data_state_dict")
        config = saved_sections(saved, source)  # the file's classes to build: only project/torch.nn ones
        trusted = set()
        if cfg.get("data") is not None:  # a command-line data choice wins (another dataset, a moved root)
            config.data = OmegaConf.to_container(cfg.data, resolve=True)
            trusted = {"data"}
    else:
        if cfg.get("batch_size"):
            cfg.data.batch_size = int(cfg.batch_size)
        data = build(cfg.data, "data")  # first: the model's size may come from it (model=mlp)
        data.fill_sizes(cfg.data)
        sections = [k for k in ("data", "model", "loss") if cfg.get(k) is not None]
        config = OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) for k in sections})
        trusted = {"data", "model", "loss"}
    if cfg.get("batch_size"):
        config.data.batch_size = int(cfg.batch_size)
    loaded = Loaded(None, data, config, source, device, trusted)
    if data is None:
        loaded.data = loaded.build("data")
    if data_state:  # what training learned about the data (data=csv: its scaling)
        try:
            loaded.data.load_state_dict(data_state)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source}: data_state_dict does not fit {type(loaded.data).__name__} ({err})") from None
    if "weights" in config.model:  # never re-import pretrained weights over trained ones
        config.model.weights = None
    model = loaded.build("model")
    strict = bool(cfg.get("strict", True))
    if state is not None:
        load_model_state(model, state, source, strict=strict)
    else:
        load_state_dict_file(model, source, strict=strict, key=cfg.get("weights_key"))
    loaded.model = model.to(device).eval()
    return loaded
