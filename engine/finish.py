"""The end of a run: the outputs made once training is over (loss curve, best.pt's test
metrics, the export), in one function that train.py calls at the end of training and again
on `resume=auto` of a complete run, so a stop between the last checkpoint and the end (a
kill, Ctrl-C, a full disk) is made good by the next `resume=auto`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from engine import distributed as ddp
from engine.batches import Batches
from engine.checkpoint.load import inference_weights, load_checkpoint, load_model_state
from engine.export import export_checkpoint
from engine.export_read import CONFIG, is_export
from engine.metrics import evaluate, plot_losses
from engine.outputs import write_atomic


def finish_run(cfg: DictConfig, run_dir: Path, model: torch.nn.Module, data: Any, loss_fn: Any,
               device: torch.device, history: list[dict], ctx: Any = None,
               only_missing: bool = False) -> dict[str, Any]:
    """Write loss_curve.png, test_metrics.json (best.pt on the test split) and export/.

    only_missing: make only the outputs that are not there (an already-complete run);
    otherwise (the end of training) all of them, replacing any left by a shorter run.
    Loads best.pt's weights into `model`. Returns the test metrics (read back if kept)."""
    # torchrun: rank 0 does it all; the other ranks wait for it (and get its errors). The
    # barrier: with a broadcast as the last collective, a rank leaving at once sometimes
    # aborted in gloo's teardown ("terminate called without an active exception").
    result = ddp.on_main(lambda: _finish(cfg, run_dir, model, data, loss_fn, device, history,
                                         ctx, only_missing))
    if ddp.is_distributed():
        torch.distributed.barrier()
    return result


def _finish(cfg: DictConfig, run_dir: Path, model: torch.nn.Module, data: Any, loss_fn: Any,
            device: torch.device, history: list[dict], ctx: Any,
            only_missing: bool) -> dict[str, Any]:
    plot, metrics_path, export_dir = (run_dir / "loss_curve.png", run_dir / "test_metrics.json",
                                      run_dir / "export")
    # A run continued in a new folder from another run's checkpoint has no best.pt of its own
    # until an epoch beats the best it inherited: then its newest checkpoint stands in.
    best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    made = []
    if history and not (only_missing and plot.exists()):
        plot_losses(history, plot)
        made.append(plot.name)
    if only_missing and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
    else:
        metrics = evaluate_best(best, model, data, loss_fn, device, ctx)
        write_atomic(metrics_path, lambda out: out.write(json.dumps(metrics, indent=2) + "\n"))
        print(f"test ({best.name}, epoch {metrics['epoch']}): " + "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("test_")))
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


def evaluate_best(best: Path, model: torch.nn.Module, data: Any, loss_fn: Any,
                  device: torch.device, ctx: Any = None) -> dict[str, Any]:
    """Metrics of best.pt on the test split (the split no choice of the run has seen)."""
    state = load_checkpoint(best, "cpu")
    load_model_state(ddp.unwrap(model), inference_weights(state), best)  # EMA when kept
    classification = data.task == "classification"
    split = data.split("test")
    batches = Batches(split, data.batch_size, device, num_workers=data.num_workers)
    result = evaluate(ddp.unwrap(model), batches, loss_fn, classification, ctx,
                      confusion=classification)
    metrics: dict[str, Any] = {"test_loss": result["loss"]}
    if classification:
        metrics["test_acc"] = result["acc"]
    metrics.update(epoch=int(state["epoch"]), samples=len(split), checkpoint=str(best))
    if "confusion_matrix" in result:  # rows: true class, columns: predicted
        metrics["confusion_matrix"] = result["confusion_matrix"]
    return metrics
