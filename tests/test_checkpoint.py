"""Checkpoint files: tutorial keys, project-free loading, atomic links, retention."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from engine.checkpoint import load_checkpoint
from engine.run_dir import atomic_link, atomic_save, prune
from engine.runtime import rng_state, set_rng_state


def _state() -> dict:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 2,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.5,
        "rng_state": rng_state(),
        "config": {"model": {"_target_": "x"}, "data": {}},
    }


def test_plain_torch_load_reads_it_without_this_project(tmp_path):
    path = tmp_path / "epoch_0002.pt"
    atomic_save(_state(), path)
    code = textwrap.dedent(f"""
        import sys, torch
        ckpt = torch.load({str(path)!r}, weights_only=True)
        assert {{'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}} <= set(ckpt)
        assert not any(m in sys.modules for m in ('engine', 'data', 'models'))
        print(ckpt['epoch'], sorted(ckpt['model_state_dict']))
    """)
    # -I: isolated mode, no PYTHONPATH, no current directory on sys.path
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "2"


def test_atomic_save_leaves_no_temporary_and_links_share_data(tmp_path):
    path = tmp_path / "epoch_0001.pt"
    atomic_save(_state(), path)
    atomic_link(path, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "last.pt"]
    assert (tmp_path / "last.pt").stat().st_ino == path.stat().st_ino
    path.unlink()  # retention deleting the periodic file keeps last.pt whole
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_prune_keeps_newest_and_never_touches_foreign_files(tmp_path):
    names = [f"epoch_{i:04d}.pt" for i in range(1, 6)]
    for name in [*names, "epoch_0099.pt"]:
        (tmp_path / name).write_bytes(b"x")
    kept = prune(tmp_path, names, keep_last=2)
    assert kept == names[-2:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names[-2:], "epoch_0099.pt"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    atomic_save({"rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
