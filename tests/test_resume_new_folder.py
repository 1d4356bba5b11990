"""`resume=OTHER_RUN/epoch_N.pt run_name=NEW` (the README's example, found by its doctest):
the best value goes on exactly as in an uninterrupted run, and the checkpoint of that best
epoch comes along as the new folder's best.pt, so the final export and
`evaluate.py ckpt=NEW/best.pt` work even when no later epoch beats it."""

from __future__ import annotations

import pytest
import torch
from conftest import run_script


@pytest.mark.slow
def test_resume_into_a_new_folder_writes_its_own_best(tmp_path):
    run_script("train.py", "trainer.epochs=2", "checkpoint.every_n_epochs=1", root=tmp_path)
    source = tmp_path / "linear_regression" / "epoch_0002.pt"
    state = torch.load(source, weights_only=True)
    state["best"]["value"] = -1.0  # an L1 loss no later epoch can beat
    hard_to_beat = tmp_path / "hard_to_beat.pt"
    torch.save(state, hard_to_beat)

    result = run_script("train.py", f"resume={hard_to_beat}", "run_name=continued", "trainer.epochs=3", root=tmp_path)
    best = tmp_path / "continued" / "best.pt"
    assert best.is_file(), result.stdout
    assert torch.load(best, weights_only=True)["epoch"] == 2  # the inherited best epoch
    last = torch.load(tmp_path / "continued" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["best"]["value"] == -1.0  # not reset
    assert (tmp_path / "continued" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "linear_regression" / "best.pt").is_file()  # the old run is untouched
