"""Train a model from Hydra configs.

    python train.py                                   # default experiment (linear regression)
    python train.py experiment=digits_cnn trainer.epochs=5
    python train.py experiment=digits_cnn resume=auto # continue the run after a stop
    python train.py -m optimizer.lr=0.1,0.01          # one run directory per job
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from engine import distributed as ddp
from engine.batches import Batches
from engine.checkpoint import load_state_dict_file, step_faults
from engine.cli import run_main
from engine.config import build, check_monitor, validate_train
from engine.errors import Interrupted, UserError, cli_errors
from engine.finish import finish_run
from engine.metrics import append_csv, plot_losses, write_csv
from engine.preempt import StopSignal
from engine.run import (
    accept_run,
    build_checkpoint,
    check_finite,
    open_run,
    pin_memory_for,
    restore_checkpoint,
)
from engine.runtime import autocast, seed_everything, set_deterministic


def train(cfg: DictConfig) -> dict:
    validate_train(cfg)
    device = ddp.setup_distributed(cfg)  # torchrun: join the process group, cuda:LOCAL_RANK
    set_deterministic(cfg.trainer.deterministic)
    seed_everything(cfg.seed + ddp.rank())  # own dropout stream per rank; DDP syncs the weights

    data = build(cfg.data, "data")
    ddp.setup_data(data)  # torchrun: rank 0 prepares (downloads) first
    check_monitor(cfg, data.task)
    model = build(cfg.model, "model").to(device)
    if cfg.weights:  # warm start: a new run from the weights in a file (strict=false: what fits)
        load_state_dict_file(model, Path(str(cfg.weights)), cfg.strict is not False,
                             cfg.weights_key)
        print(f"initial weights from {cfg.weights}")
    loss_fn = build(cfg.loss, "loss")
    optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    scheduler = build(cfg.scheduler, "scheduler")(optimizer) if cfg.get("scheduler") else None
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed")
    classification = data.task == "classification"
    loader_args = dict(num_workers=data.num_workers, pin_memory=pin_memory_for(data, device))
    train_batches = Batches(data.split("train"), data.batch_size, device, shuffle=True,
                            seed=cfg.seed, **loader_args, **ddp.rank_args())
    val_batches = Batches(ddp.shard(data.split("val")), data.batch_size, device, **loader_args)

    # Only now, with data and model known to build, touch the run directory.
    run_dir, saver, resumed = open_run(cfg, device)

    progress = restore_checkpoint(resumed, model, optimizer, scheduler, scaler, cfg, data)
    accept_run(run_dir, cfg, resumed)  # config.yaml: only now, with the checkpoint restored
    write_csv(run_dir / "metrics.csv", progress.history)  # exactly the epochs in the state
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what gets saved: never the compiled or DDP wrapper
    model = ddp.wrap_model(model, device)
    if cfg.trainer.compile:
        model = torch.compile(model)
    # Loop settings read once: a DictConfig lookup costs as much as a small model's step.
    channels_last, precision = bool(cfg.trainer.channels_last), str(cfg.trainer.precision)
    ctx = lambda: autocast(precision, device)  # noqa: E731
    stop = StopSignal(cfg.trainer.max_time)
    every_n_steps = cfg.checkpoint.every_n_steps or 0
    log_every = cfg.trainer.log_every_n_steps
    epochs, every_n_epochs = cfg.trainer.epochs, cfg.checkpoint.every_n_epochs
    monitor, mode = str(cfg.checkpoint.monitor), str(cfg.checkpoint.mode)
    print_every_s = float(cfg.trainer.get("print_every_s", 0))
    # Stored in every checkpoint: plain values (a fixed-choice key is an Enum in cfg).
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    show_bar = sys.stdout.isatty()
    plotted, plotted_at = len(progress.history), float("-inf")

    def checkpoint() -> dict:
        return build_checkpoint(cfg, raw_model, optimizer, scheduler, scaler, progress, config)

    def save(name: str, best: bool = False) -> Path:
        nonlocal plotted, plotted_at
        check_finite(progress)
        path = saver.save(checkpoint(), name, best=best)
        # The loss curve too, so a stopped or diverged run has one; at most every 30 s, as a
        # plot of a long history costs up to a second.
        if len(progress.history) > plotted and (
                stop.reason or time.perf_counter() - plotted_at >= 30):
            plot_losses(progress.history, run_dir / "loss_curve.png")
            plotted, plotted_at = len(progress.history), time.perf_counter()
        if stop.reason:  # the process exits next: with checkpoint.async the file must be done
            saver.wait()
        return path

    def finish(only_missing: bool = False) -> dict:
        return finish_run(cfg, run_dir, raw_model, data, loss_fn, device, progress.history,
                          ctx, only_missing=only_missing)

    if resumed and progress.epoch >= epochs:
        print(f"run {run_dir} is already complete ({progress.epoch} epochs); nothing to do. "
              f"Raise trainer.epochs to train on, or pick a new run_name=")
        finish(only_missing=True)  # an interruption after the last checkpoint: make the rest
        return progress.history[-1] if progress.history else {}
    print(f"run directory: {run_dir}" + (f" (resumed at epoch {progress.epoch}, step "
                                         f"{progress.global_step})" if resumed else ""))
    printed = float("-inf")  # when the last epoch line was printed
    for epoch in range(progress.epoch + 1, epochs + 1):
        started = time.perf_counter()
        model.train()
        batches = train_batches(epoch, start=progress.step_in_epoch)
        if show_bar:
            from tqdm import tqdm

            batches = tqdm(batches, total=len(train_batches), initial=progress.step_in_epoch,
                           desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        for x, y in batches:
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx():
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            progress.losses.append(loss.detach())
            progress.step_in_epoch += 1
            progress.global_step += 1

            if progress.global_step % log_every == 0:  # the only per-step host sync
                check_finite(progress)
                if show_bar:
                    batches.set_postfix(loss=f"{progress.losses[-1].item():.4f}")
            saved = None
            if every_n_steps and progress.global_step % every_n_steps == 0:
                saved = save(f"step_{progress.global_step:08d}.pt")
            step_faults(progress.global_step)  # test-only kill/signal points; no-op otherwise
            if ddp.should_stop(stop, 2 * saver.last_seconds, progress.global_step, log_every):
                path = saved or save(f"step_{progress.global_step:08d}.pt")
                raise Interrupted(f"{stop.reason}: saved {path} at epoch {epoch}, step "
                                  f"{progress.global_step}; continue with resume=auto")

        # End of epoch: metrics, schedule, best/periodic checkpoints, CSV row, summary line.
        check_finite(progress)
        train_loss = ddp.mean_over_ranks(progress.epoch_train_loss(train_batches.batch_sizes()))
        val = ddp.evaluate_all(model, val_batches, loss_fn, classification, ctx)
        if val["loss"] != val["loss"] or abs(val["loss"]) == float("inf"):
            raise UserError(f"non-finite validation loss at epoch {epoch}, step "
                            f"{progress.global_step}; lower optimizer.lr; the last good "
                            f"checkpoint is kept")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "step": progress.global_step, "train_loss": train_loss,
               "val_loss": val["loss"]}
        if classification:
            row["val_acc"] = val["acc"]
        row["lr"] = lr
        improved = progress.end_epoch(row, monitor, mode)
        append_csv(run_dir / "metrics.csv", row)  # before the checkpoint: resume reads it back
        ddp.should_stop(stop)  # torchrun: the ranks agree on stop.reason
        periodic = epoch % every_n_epochs == 0 or epoch == epochs
        if periodic or stop.reason:  # a stop during validation saves here
            save(f"epoch_{epoch:04d}.pt", best=improved)
        elif improved:
            saver.save_best_only(checkpoint())  # kept in memory, written with the next save
        now = time.perf_counter()
        if periodic or stop.reason or now - printed >= print_every_s:  # long runs: throttled
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items())
            print(f"{shown}  ({now - started:.2f}s)", flush=True)
            printed = now
        if stop.reason:
            raise Interrupted(f"{stop.reason}: saved {run_dir}/epoch_{epoch:04d}.pt after "
                              f"epoch {epoch}; continue with resume=auto")

    saver.close()  # checkpoint.async: the last write is durable (or its error raised) here
    stop.restore()
    finish()  # loss curve, best.pt on the test split, export/
    print(f"done: {run_dir}/last.pt, best.pt (best {monitor} {progress.best_value:.4g} at "
          f"epoch {progress.best_epoch}), metrics.csv, loss_curve.png, test_metrics.json"
          + (", export/" if cfg.checkpoint.export else ""))
    return progress.history[-1]


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@cli_errors
def main(cfg: DictConfig):
    return train(cfg)


if __name__ == "__main__":
    run_main(main, "train")  # an override that does not compose: one line, exit 2
