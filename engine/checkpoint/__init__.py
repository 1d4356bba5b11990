"""What a checkpoint IS: a plain `torch.save` of one dict, readable without this project by
`torch.load(path, weights_only=True)` (only tensors, numbers, strings and plain containers).

The PyTorch tutorial's general-checkpoint keys (a tutorial file has only these four):
  epoch                 int    epochs fully done (a tutorial file: the 0-based loop index)
  model_state_dict      dict   parameter name -> tensor (never the DDP/compile wrapper's names)
  optimizer_state_dict  dict   optimizer.state_dict()
  loss                  float  the last step's training loss (a tutorial's 0-dim tensor is read)

What an exact resume needs besides (the run goes on bit for bit, mid-epoch included):
  global_step           int    optimizer steps done
  step_in_epoch         int    batches of epoch `epoch + 1` already trained (0 at an epoch end)
  epoch_step_losses     tensor this epoch's per-step losses so far (the epoch's mean train loss)
  rng_state             dict   python / numpy / torch / cuda generator states (rank 0's)
  scheduler_state_dict  dict | None
  scaler_state_dict     dict | None   GradScaler, with trainer.precision=16-mixed
  best                  dict   {monitor, value, epoch}: what best.pt holds
  world_size            int    processes that wrote it (torchrun)
  rank_states           list | None   per rank: {rng_state, epoch_step_losses} (torchrun)
  fingerprint           dict | None   the data, global batch and model shapes (resume checks)
  ema_state_dict        dict   trainer.ema_decay only: the averaged weights (name -> tensor);
                               evaluate, predict, export and best.pt use them (load.py)
  early_stopping        dict   early_stopping.patience only: {monitor, best, wait}
  loggers               dict   logger=mlflow only: {mlflow_run_id}: the tracker run a resume
                               continues (engine/loggers.py)

Where it came from:
  config                dict   the resolved run config (builds the model/data again)
  versions              dict   python, torch, torchvision, hydra-core
  format_version        int    FORMAT_VERSION; absent in other programs' (tutorial) files
  saved_files           list   periodic files this run wrote: retention deletes only these

Not in this format's files: `history` (older files carried the metrics rows; metrics.csv beside
the checkpoint is the history now, read back by engine.run.with_history).

The modules of this package:
  state.py   Progress; build_checkpoint / restore_checkpoint; each rank's share (torchrun)
  schema.py  the type and range of every key above, checked before anything uses a file
  limits.py  size/depth/overlap limits for any loaded structure (a few bytes can claim GiBs)
  load.py    weights-only loading with one-line errors; picking and loading a state_dict
  compat.py  may this state resume this config (fingerprint, schedule, optimizer overrides)
How the files sit in a run folder (names, links, retention, auto-resume) is engine.run_folder;
how they are written is engine.saver.
"""

FORMAT_VERSION = 1
TUTORIAL_KEYS = ("epoch", "model_state_dict", "optimizer_state_dict", "loss")
