"""Train a model from Hydra configs.

python train.py                                   # default experiment (linear regression)
python train.py experiment=digits_cnn trainer.epochs=5
python train.py experiment=digits_cnn resume=auto # continue the run after a stop
python train.py -m optimizer.lr=0.1,0.01          # one run directory per job
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.augment import augmented_train_split, check_augment
from engine import distributed as ddp
from engine.batches import Batches
from engine.checkpoint import build_checkpoint, check_finite, load_checkpoint, load_state_dict_file, restore_checkpoint
from engine.cli import exit_without_teardown, run_main, validate_train
from engine.config import build, check_monitor, paths_from_start_dir
from engine.errors import Interrupted, UserError, cli_errors
from engine.loggers import open_loggers
from engine.metrics import evaluate, finish_run, plot_losses
from engine.run_dir import accept_run, open_run
from engine.runtime import autocast, seed_everything, set_deterministic
from engine.sweeps import PRUNED  # importing it registers ${sweep_folder:}, train.yaml's hydra.sweep.dir
from engine.training import (
    EMA,
    EarlyStopping,
    StopSignal,
    build_scheduler,
    check_fits,
    fast_dev_run,
    model_summary,
    window_length,
)
from hydra_plugins.torch_template.optuna_sweeper import is_pruned_trial_job, trial_pruning


def train(cfg: DictConfig) -> dict:
    validate_train(cfg)
    if cfg.trainer.fast_dev_run:  # one train + one val batch in a scratch folder, removed after
        return fast_dev_run(cfg, fit)
    result = fit(cfg)
    ddp.shutdown()  # torchrun: the run is done on every rank (finish_run's barrier)
    return result


def fit(cfg: DictConfig) -> dict:
    device = ddp.setup_distributed(cfg)  # torchrun: join the process group, cuda:LOCAL_RANK
    set_deterministic(cfg.trainer.deterministic)
    seed_everything(cfg.seed + ddp.rank())  # own dropout stream per rank; DDP syncs the weights

    check_augment(cfg.data)  # data.augment, one line per mistake
    data = build(cfg.data, "data")
    data.use_fold(cfg.cv.fold, cfg.cv.folds)  # cv=KFOLD: train+val cut into folds, this run's is val
    ddp.setup_data(data)  # torchrun: rank 0 prepares (downloads) first
    data.fill_sizes(cfg.data)  # data=csv: num_features/num_outputs from its columns (model=mlp)
    check_monitor(cfg, data.task)
    model = build(cfg.model, "model").to(device)
    if cfg.weights:  # warm start: a new run from the weights in a file (strict=false: what fits)
        load_state_dict_file(model, Path(str(cfg.weights)), cfg.strict is not False, cfg.weights_key)
        print(f"initial weights from {cfg.weights}")
    loss_fn = build(cfg.loss, "loss")
    check_fits(model, loss_fn, data.split("train"), device, cfg)  # one line naming layer and key
    if cfg.trainer.model_summary and ddp.is_main():  # once, rank 0, RNG untouched
        print(model_summary(model, data.split("train"), device))
    optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed")
    classification = data.task == "classification"
    loader_args = dict(num_workers=data.num_workers, pin_memory=getattr(data, "pin_memory", False))
    overfit = cfg.trainer.overfit_batches  # debug: train and validate on the same N batches
    train_split = data.split("train") if overfit else augmented_train_split(data, cfg.seed)
    train_batches = Batches(
        train_split,
        data.batch_size,
        device,
        shuffle=not overfit,
        seed=cfg.seed,
        limit=overfit or cfg.trainer.limit_train_batches,
        **loader_args,
        rank=ddp.rank(),
        world_size=ddp.world_size(),  # each rank's slice of the same (seed, epoch) order
    )
    val_batches = (
        train_batches
        if overfit
        else Batches(
            ddp.shard(data.split("val")), data.batch_size, device, limit=cfg.trainer.limit_val_batches, **loader_args
        )
    )
    scheduler, step_lr = build_scheduler(cfg, optimizer, len(train_batches))  # step_lr: per step

    # Only now, with data and model known to build, touch the run directory.
    run_dir, saver, resumed = open_run(cfg, device, load_checkpoint)

    # The run's stateful parts (Fabric style: each with state_dict/load_state_dict, saved
    # under its key in engine.checkpoint.PARTS); trainer features are None when off.
    stopping, decay = cfg.early_stopping, cfg.trainer.ema_decay
    stopper = (
        None
        if stopping.patience is None
        else EarlyStopping(stopping.patience, stopping.monitor, cfg.checkpoint.mode, stopping.min_delta)
    )
    ema = None if decay is None else EMA(model, decay, cfg.trainer.channels_last)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "early_stopping": stopper,
        "data": data,  # what training learned about the data (data=csv: its scaling)
    }
    progress = restore_checkpoint(resumed, state, cfg, data)
    train_batches.check_start(progress.step_in_epoch)  # trainer.limit_train_batches changed?
    # metrics.csv (exactly the epochs in the state) and logger=tensorboard/mlflow, rank 0 only:
    # a resumed run continues the same tracker run (engine/loggers.py: its ids are read back
    # from `resumed`); one that cannot start stops the run before config.yaml is written
    state["loggers"] = loggers = open_loggers(cfg, run_dir, resumed, progress)
    stopped = stopper is not None and stopper.stopped  # early stopping ended it before
    complete = bool(resumed) and (progress.epoch >= cfg.trainer.epochs or stopped)
    # hparams_search with a pruner: this job's Optuna trial; resumed, it decides as the unbroken job did
    trial_job = not complete and is_pruned_trial_job()  # every rank knows; rank 0 asks the study
    pruning = trial_pruning(cfg) if trial_job and ddp.is_main() else None
    agree = ddp.any_rank if trial_job and ddp.is_distributed() else bool  # no collective otherwise
    pruned = agree(pruning is not None and pruning.resume(progress.history, str(cfg.checkpoint.monitor)))
    complete = complete or pruned
    # config.yaml: only now, with the checkpoint restored and the trackers open; a run that
    # trains nothing more keeps its own
    accept_run(run_dir, cfg, resumed, trains=not complete)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what gets saved: never the compiled or DDP wrapper
    model = ddp.wrap_model(model, device)
    in_sync = nullcontext()  # accumulation under DDP: all-reduce on a window's last batch only
    no_sync = getattr(model, "no_sync", lambda: in_sync)
    if cfg.trainer.compile:
        model = torch.compile(model)
    eval_model = ema.module if ema is not None else model  # validation: the EMA weights
    # Loop settings read once: a DictConfig lookup costs as much as a small model's step.
    channels_last, precision = bool(cfg.trainer.channels_last), str(cfg.trainer.precision)
    ctx = lambda: autocast(precision, device)  # noqa: E731
    stop = StopSignal(cfg.trainer.max_time)
    every_n_steps = cfg.checkpoint.every_n_steps or 0
    log_every = cfg.trainer.log_every_n_steps
    epochs, every_n_epochs = cfg.trainer.epochs, cfg.checkpoint.every_n_epochs
    monitor, mode = str(cfg.checkpoint.monitor), str(cfg.checkpoint.mode)
    print_every_s = float(cfg.trainer.get("print_every_s", 0))
    accumulate = progress.accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))  # 1: off
    clip_norm, params = cfg.trainer.get("grad_clip_norm"), list(raw_model.parameters())
    amp, n_batches = scaler.is_enabled(), len(train_batches)
    # Stored in every checkpoint: plain values (a fixed-choice key is an Enum in cfg).
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    show_bar = sys.stdout.isatty()
    plotted, plotted_at = len(progress.history), float("-inf")

    def checkpoint() -> dict:
        return build_checkpoint(state, progress, config)

    def save(name: str, best: bool = False, final: bool = False) -> Path:
        check_finite(progress)
        # checkpoint() on every rank (under torchrun it gathers their RNG states); rank 0 writes.
        # It records the trackers' waiting values, which hand_over() then takes for after the write.
        state = checkpoint()
        path = ddp.on_main(saver.save, state, name, best=best, then=loggers.hand_over())
        after_save(final)
        return path

    def after_save(final: bool) -> None:
        """`final`: the ranks agreed to stop (never a rank's own stop.reason, which a signal
        may set on one rank only: its collective below would wait for ranks that skip it)."""
        nonlocal plotted, plotted_at
        # The loss curve too, so a killed or stopped run has one; at most every 30 s (a plot of a
        # long history costs up to a second), not at the last epoch (the end of the run draws it).
        due = final or (time.perf_counter() - plotted_at >= 30 and progress.epoch < epochs)
        if len(progress.history) > plotted and due:
            plot_losses(progress.history, run_dir / "loss_curve.png")
            plotted, plotted_at = len(progress.history), time.perf_counter()
        if final:  # the process exits next: with checkpoint.async the file must be done
            ddp.on_main(saver.wait)

    def finish(only_missing: bool = False) -> dict:
        return finish_run(
            cfg, run_dir, raw_model, data, loss_fn, device, progress.history, ctx, only_missing=only_missing
        )

    if complete:
        why = f"; {stopper.reason}" if stopped else "; pruned by Optuna" if pruned else ""
        more = "early_stopping.patience" if stopped else "trainer.epochs"
        how = "" if pruned else f". Raise {more} to train on, or pick a new run_name="
        print(f"run {run_dir} is already complete ({progress.epoch} epochs{why}); nothing to do{how}")
        # an interruption after the last checkpoint: make the rest
        loggers.finish(run_dir, progress.history, finish(only_missing=True), again=True)
        return {**progress.history[-1], PRUNED: pruned} if progress.history else {}
    print(
        f"run directory: {run_dir}"
        + (f" (resumed at epoch {progress.epoch}, step {progress.global_step})" if resumed else "")
    )
    printed = float("-inf")  # when the last epoch line was printed
    for epoch in range(progress.epoch + 1, epochs + 1):
        started = time.perf_counter()
        model.train()
        batches = train_batches(epoch, start=progress.step_in_epoch)
        if show_bar:
            from tqdm import tqdm

            batches = tqdm(
                batches,
                total=len(train_batches),
                initial=progress.step_in_epoch,
                desc=f"epoch {epoch}",
                leave=False,
                dynamic_ncols=True,
            )
        for x, y in batches:
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            progress.step_in_epoch += 1  # batches; global_step counts optimizer steps
            last = (
                accumulate == 1 or progress.step_in_epoch % accumulate == 0 or progress.step_in_epoch == n_batches
            )  # the accumulation window's last batch
            with in_sync if last else no_sync():
                with ctx():
                    loss = loss_fn(model(x), y)
                scaled = (
                    loss if accumulate == 1 else loss / window_length(progress.step_in_epoch, n_batches, accumulate)
                )
                (scaler.scale(scaled) if amp else scaled).backward()
            progress.losses.append(loss.detach())
            if not last:  # mid-window: no step, save or stop (checkpoints lie on window ends)
                continue
            if clip_norm is not None:
                scaler.unscale_(optimizer)  # AMP: clip the true gradients (no-op without)
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if step_lr and progress.global_step:  # before the step: lr is the last step's
                scheduler.step()
            if amp:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model, progress.global_step)  # warm-up: the steps before
            progress.global_step += 1

            if progress.global_step % log_every == 0:  # the only per-step host sync
                check_finite(progress)
                loggers.log_step(progress.global_step, progress.losses[-1])
                if show_bar:
                    batches.set_postfix(loss=f"{progress.losses[-1].item():.4f}")
            saved = None
            if every_n_steps and progress.global_step % every_n_steps == 0:
                saved = save(f"step_{progress.global_step:08d}.pt")
            if ddp.should_stop(stop, 2 * saver.last_seconds, progress.global_step, log_every):
                if saved:  # saved before the ranks agreed to stop
                    after_save(final=True)
                path = saved or save(f"step_{progress.global_step:08d}.pt", final=True)
                raise Interrupted(
                    f"{stop.reason}: saved {path} at epoch {epoch}, step "
                    f"{progress.global_step}; continue with resume=auto"
                )

        # End of epoch: metrics, schedule, best/periodic checkpoints, CSV row, summary line.
        check_finite(progress)
        train_loss = ddp.mean_over_ranks(progress.epoch_train_loss(train_batches.batch_sizes()))
        val = evaluate(eval_model, val_batches, loss_fn, classification, ctx, all_ranks=True)
        if val["loss"] != val["loss"] or abs(val["loss"]) == float("inf"):
            raise UserError(
                f"non-finite validation loss at epoch {epoch}, step "
                f"{progress.global_step}; lower optimizer.lr; the last good "
                f"checkpoint is kept"
            )
        lr = optimizer.param_groups[0]["lr"]  # interval=step: the epoch's last step's
        if scheduler is not None and not step_lr:
            scheduler.step()
        row = {"epoch": epoch, "step": progress.global_step, "train_loss": train_loss, "val_loss": val["loss"]}
        if classification:
            row["val_acc"] = val["acc"]
        row["lr"] = lr
        improved = progress.end_epoch(row, monitor, mode)
        stopping = stopper is not None and stopper.update(row)  # early_stopping.patience
        pruned = agree(pruning is not None and pruning.prune(epoch, row[monitor])) and not stopping
        loggers.log_epoch(row)  # metrics.csv now (resume reads it); trackers after the save
        # torchrun: the ranks agree; a signal after this is seen at the next check
        stop_now = ddp.should_stop(stop)
        periodic = epoch % every_n_epochs == 0 or epoch == epochs or stopping or pruned
        if periodic or stop_now:  # a stop during validation saves here
            save(f"epoch_{epoch:04d}.pt", best=improved, final=stop_now)
        elif improved:
            ddp.on_main(saver.save_best_only, checkpoint())  # written with the next save
        now = time.perf_counter()
        if periodic or stop_now or now - printed >= print_every_s:  # long runs: throttled
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"{shown}  ({now - started:.2f}s)", flush=True)
            printed = now
        if stop_now:
            raise Interrupted(
                f"{stop.reason}: saved {run_dir}/epoch_{epoch:04d}.pt after epoch {epoch}; continue with resume=auto"
            )
        if stopping or pruned:
            print(f"stopped after epoch {epoch} of {epochs}: {stopper.reason if stopping else 'pruned by Optuna'}")
            break

    ddp.on_main(saver.close)  # checkpoint.async: the last write is durable (or raised) here
    stop.restore()
    if cfg.trainer.fast_dev_run:
        return progress.history[-1]
    # loss curve, best.pt on the test split, export/; trackers: figures, artifacts
    loggers.finish(run_dir, progress.history, finish())
    print(
        f"done: {run_dir}/last.pt, best.pt (best {monitor} {progress.best_value:.4g} at "
        f"epoch {progress.best_epoch}), metrics.csv, loss_curve.png, test_metrics.json"
        + (", export/" if cfg.checkpoint.export else "")
    )
    return {**progress.history[-1], PRUNED: pruned}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@cli_errors
def main(cfg: DictConfig):
    paths_from_start_dir(cfg)  # hydra.job.chdir=true: paths relative to where it was started
    return train(cfg)


if __name__ == "__main__":
    run_main(main, "train")  # an override that does not compose: one line, exit 2
    exit_without_teardown()  # skips ~1 s of freeing modules (engine/cli.py)
