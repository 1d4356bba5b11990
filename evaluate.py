"""Evaluate a trained model on a split; prints metrics and writes them as JSON with a plot.

    python evaluate.py ckpt=checkpoints/digits_cnn/best.pt
    python evaluate.py ckpt=checkpoints/linear_regression/best.pt split=val
    python evaluate.py weights=model_weights.pth model=small_cnn data=digits
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from engine.batches import Batches
from engine.cli import run_main
from engine.config import paths_from_start_dir, validate_inference
from engine.errors import cli_errors
from engine.inference import load_for_inference, loss_for
from engine.metrics import confusion_figure, regression_figure
from engine.outputs import check_output, is_eval_json, is_png, write_atomic


def evaluate(cfg: DictConfig) -> dict:
    validate_inference(cfg, "evaluate")
    loaded = load_for_inference(cfg)
    data, model, device = loaded.data, loaded.model, loaded.device
    classification = data.task == "classification"
    out, stem = _output_paths(cfg, loaded.source)
    split = str(cfg.split)  # train | val | test
    batches = Batches(data.split(split), data.batch_size, device)
    with torch.inference_mode():  # one pass: the metrics and the plot use the same outputs
        outputs, targets = _predict_all(model, batches)
        metrics = {f"{split}_loss": float(loss_for(loaded)(outputs, targets))}
    if classification:
        metrics[f"{split}_acc"] = float((outputs.argmax(1) == targets).float().mean())
    metrics.update(samples=len(targets), source=str(loaded.source))

    if classification:
        plot = _confusion_matrix(outputs.argmax(1), targets, data.num_classes, stem)
    else:
        train = Batches(data.split("train"), data.batch_size, device)
        plot = _regression_plot(train, batches, outputs, stem, split)
    write_atomic(out, lambda handle: handle.write(json.dumps(metrics, indent=2) + "\n"))
    print("  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"wrote {out} and {plot}")
    return metrics


def _output_paths(cfg: DictConfig, source: Path) -> tuple[Path, Path]:
    """The metrics JSON (output=, default next to the checkpoint) and the stem of its plot,
    beside it. Checked before any work: never a checkpoint, export, metrics.csv or config.yaml,
    nor the file being read."""
    if cfg.output:
        out = Path(str(cfg.output))
        stem = out.with_suffix("")
    else:
        stem = source / "eval" if source.is_dir() else source.with_name(source.stem + "_eval")
        out = stem.with_suffix(".json")
    check_output(out, is_eval_json, "an evaluate.py metrics JSON", reads=(source,))
    return out, stem


def _save_plot(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        check_output(path, is_png, "a PNG plot", name=f"plot {path} (beside output=)")
        fig.tight_layout()
        write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=100),
                     binary=True)
    finally:
        plt.close(fig)


def _predict_all(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outputs, targets = [], []
    for x, y in batches:
        outputs.append(model(x).float().cpu())
        targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


def _confusion_matrix(pred: torch.Tensor, target: torch.Tensor, classes: int,
                      stem: Path) -> Path:
    counts = torch.bincount(target * classes + pred, minlength=classes * classes)
    return _save(confusion_figure(counts.reshape(classes, classes)),
                 stem.with_name(stem.name + "_confusion.png"))


def _regression_plot(train, test, predictions: torch.Tensor, stem: Path, split: str) -> Path:
    return _save(regression_figure([t.cpu() for t in _cat(train)],
                                   [t.cpu() for t in _cat(test)], predictions, split),
                 stem.with_name(stem.name + "_predictions.png"))


def _save(fig, path: Path) -> Path:
    _save_plot(fig, path)
    return path


def _cat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)



@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@cli_errors
def main(cfg: DictConfig):
    paths_from_start_dir(cfg)  # hydra.job.chdir=true: paths relative to where it was started
    return evaluate(cfg)


if __name__ == "__main__":
    run_main(main, "evaluate")  # an override that does not compose: one line, exit 2
