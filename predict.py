"""Predict for new inputs and write a CSV.

    python predict.py ckpt=checkpoints/linear_regression/best.pt input=points.csv output=preds.csv
    python predict.py ckpt=checkpoints/digits_cnn/best.pt input=images/ output=preds.csv

CSV inputs: the output is the input's columns and `prediction` (a classifier: `class`, its name,
and `probability`). Images: an image file or a folder of them; the output has input (the file),
class and probability.
invert=true turns black-on-white drawings into the white-on-black digits the model knows.
Either every input is predicted or the command fails naming the bad input: never a partial CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from data.base import data_path
from engine.cli import exit_without_teardown, run_main, validate_inference
from engine.config import paths_from_start_dir
from engine.errors import UserError, cli_errors
from engine.metrics import load_for_inference
from engine.run_dir import check_output, is_predictions_csv, write_atomic


def predict(cfg: DictConfig) -> Path:
    validate_inference(cfg, "predict")
    output = Path(str(cfg.output))
    if output.suffix.lower() != ".csv":
        raise UserError(f"output={output}: expected a .csv file name")
    source = data_path(cfg.input, "input")
    if not source.exists():
        raise UserError(f"input={source}: no such file or folder")
    loaded = load_for_inference(cfg)
    if cfg.get("invert"):
        if loaded.data.task != "classification":
            raise UserError(
                f"invert=true: inverts image inputs; {source} is read as CSV features for a regression model"
            )
        names, inputs = loaded.data.predict_inputs(source, invert=True)
    else:
        names, inputs = loaded.data.predict_inputs(source)
    _check_features(loaded.model, inputs, source)
    check_output(
        output, is_predictions_csv, "a predict.py CSV", reads=(source, loaded.source)
    )  # refused before the model runs
    outputs = []
    with torch.inference_mode():
        for chunk in inputs.split(int(cfg.batch_size)):
            try:
                outputs.append(loaded.model(chunk.to(loaded.device)).float().cpu())
            except RuntimeError as err:  # a shape the model cannot take
                first = str(err).strip().splitlines()[0][:200]
                raise UserError(
                    f"input={source}: inputs of shape {tuple(chunk.shape[1:])} do not fit the model ({first})"
                ) from None
    predictions = loaded.data.decode(torch.cat(outputs))  # in the target's units
    # The input's own columns (a CSV's) or its file names, then the prediction.
    table = names if isinstance(names, dict) else {"input": names}
    header, rows = list(table), [list(row) for row in zip(*table.values(), strict=True)]
    if loaded.data.task == "classification":
        probabilities = predictions.softmax(1)  # log_softmax outputs (loss=nll) give the same
        confidence, classes = probabilities.max(1)
        labels = loaded.data.class_names or [str(i) for i in range(predictions.shape[1])]
        header += ["class", "probability"]
        for row, c, p in zip(rows, classes, confidence, strict=True):
            row += [labels[int(c)], f"{float(p):.6f}"]
    else:
        header += (
            ["prediction"] if predictions.shape[1] == 1 else [f"prediction_{i}" for i in range(predictions.shape[1])]
        )
        for row, p in zip(rows, predictions, strict=True):
            row += [f"{float(v):.6g}" for v in p]
    write_atomic(output, lambda out: csv.writer(out).writerows([header, *rows]))  # never partial
    print(f"wrote {len(rows)} predictions to {output}")
    return output


def _check_features(model: torch.nn.Module, inputs: torch.Tensor, source: Path) -> None:
    """A wrong feature count fails here with the file named, not deep inside the model."""
    expected = getattr(model, "in_features", None)
    if expected is None:
        first = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
        expected = first.in_features if first is not None and inputs.dim() == 2 else None
    if expected is None and hasattr(model, "weights") and inputs.dim() == 2:
        expected = model.weights.shape[0]
    if expected is not None and inputs.dim() == 2 and inputs.shape[1] != expected:
        raise UserError(f"input={source}: rows have {inputs.shape[1]} feature(s), the model expects {expected}")


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
@cli_errors
def main(cfg: DictConfig):
    paths_from_start_dir(cfg)  # hydra.job.chdir=true: paths relative to where it was started
    return predict(cfg)


if __name__ == "__main__":
    run_main(main, "predict")  # an override that does not compose: one line, exit 2
    exit_without_teardown()  # skips ~1 s of freeing modules (engine/cli.py)
