"""`trainer.fast_dev_run=true`: one train and one val batch through the whole training code
(Lightning's name), to find a bug in seconds. It writes nothing: the run lives in a scratch
folder that is removed afterwards, and the end-of-run test and export are skipped.
(limit_train_batches, limit_val_batches and overfit_batches are handled by engine.batches.)"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from engine import distributed as ddp


def fast_dev_run(cfg: DictConfig, fit: Callable[[DictConfig], dict]) -> dict:
    """Run `fit` on a copy of `cfg` cut to one epoch of one train and one val batch, its
    checkpoint root a temporary folder; return its metrics row."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    with tempfile.TemporaryDirectory(prefix="fast_dev_run-") as scratch, open_dict(cfg):
        OmegaConf.update(cfg, "checkpoint.root", scratch)
        for key, value in {"resume": None, "trainer.epochs": 1, "trainer.max_time": None,
                           "trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1,
                           "trainer.overfit_batches": None, "checkpoint.every_n_steps": None,
                           "checkpoint.async": False, "checkpoint.export": False,
                           "early_stopping.patience": None}.items():
            OmegaConf.update(cfg, key, value)
        row = fit(cfg)
        if ddp.is_distributed():  # every rank done before rank 0 removes the folder
            torch.distributed.barrier()
    losses = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.endswith("loss"))
    print(f"fast_dev_run: one train batch and one val batch ran ({losses}); nothing was "
          f"written")
    return row
