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
from engine.cli import exit_without_teardown, run_main, validate_inference
from engine.config import paths_from_start_dir
from engine.errors import cli_errors
from engine.metrics import confusion_figure, load_for_inference, regression_figure, save_figure
from engine.metrics import evaluate as evaluate_split
from engine.run_dir import check_output, is_eval_json, is_png, write_atomic


def evaluate(cfg: DictConfig) -> dict:
    validate_inference(cfg, "evaluate")
    loaded = load_for_inference(cfg)
    data, split = loaded.data, str(cfg.split)  # split: train | val | test
    if "data" not in loaded.trusted and (cv := loaded.config.get("cv")):  # a cross-validation run:
        data.use_fold(cv.get("fold"), cv.get("folds"))  # its fold's train and val (test: the same)
    classification = data.task == "classification"
    out, plot = _output_paths(cfg, loaded.source, classification)
    batches = Batches(data.split(split), data.batch_size, loaded.device)
    # one pass: the metrics and the plot use the same outputs
    result = evaluate_split(
        loaded.model, batches, loaded.loss(), classification, confusion=classification, outputs=not classification
    )
    metrics = {f"{split}_{k}": result[k] for k in ("loss", "acc") if k in result}
    metrics.update(samples=result["samples"], source=str(loaded.source))
    if classification:
        fig = confusion_figure(torch.tensor(result["confusion_matrix"]), data.class_names)
    else:
        (train_x, train_y), (x, y) = _cat(Batches(data.split("train"), data.batch_size, loaded.device)), _cat(batches)
        # in the target's units (data=csv standardises it for training)
        fig = regression_figure(
            (train_x, data.decode(train_y)), (x, data.decode(y)), data.decode(result["outputs"]), split
        )
    save_figure(fig, plot)
    write_atomic(out, lambda handle: handle.write(json.dumps(metrics, indent=2) + "\n"))
    print("  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"wrote {out} and {plot}")
    return metrics


def _output_paths(cfg: DictConfig, source: Path, classification: bool) -> tuple[Path, Path]:
    """The metrics JSON (output=, default next to the checkpoint) and its plot, beside it.
    Checked before any work: never a checkpoint, export, metrics.csv or config.yaml, nor the
    file being read."""
    if cfg.output:
        out = Path(str(cfg.output))
        stem = out.with_suffix("")
    else:
        stem = source / "eval" if source.is_dir() else source.with_name(source.stem + "_eval")
        out = stem.with_suffix(".json")
    plot = stem.with_name(stem.name + ("_confusion.png" if classification else "_predictions.png"))
    check_output(out, is_eval_json, "an evaluate.py metrics JSON", reads=(source,))
    check_output(plot, is_png, "a PNG plot", name=f"plot {plot} (beside output=)")
    return out, plot


def _cat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs).cpu(), torch.cat(ys).cpu()


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
@cli_errors
def main(cfg: DictConfig):
    paths_from_start_dir(cfg)  # hydra.job.chdir=true: paths relative to where it was started
    return evaluate(cfg)


if __name__ == "__main__":
    run_main(main, "evaluate")  # an override that does not compose: one line, exit 2
    exit_without_teardown()  # skips ~1 s of freeing modules (engine/cli.py)
