"""`optimizer=adam|adamw|sgd` on any experiment (found on disk): keys of one optimizer never leak
into another, with no `~` trick; a key typed on the command line is still the user's choice."""

from __future__ import annotations

import inspect

import pytest
import torch
from hydra.utils import instantiate

from engine.cli import validate_train
from engine.errors import UserError
from tests.conftest import REPO, compose
from tests.helpers import assert_one_line

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (REPO / "configs" / "optimizer").glob("*.yaml"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_optimizer_on_every_experiment(experiment, optimizer, tmp_path, capsys):
    overrides = [f"optimizer={optimizer}", f"checkpoint.root={tmp_path}"]
    cfg = compose("train", [f"experiment={experiment}", *overrides] if experiment else overrides)
    chosen = {k for k in cfg.optimizer if not str(k).startswith("_")}
    validate_train(cfg)
    kept = {k for k in cfg.optimizer if not str(k).startswith("_")}
    params = inspect.signature(
        instantiate(cfg.optimizer, _partial_=False, params=[torch.zeros(1)]).__class__
    ).parameters
    assert kept <= set(params)  # what is left, the chosen optimizer takes
    dropped = chosen - kept
    assert all(f"optimizer.{k}" not in cfg for k in dropped)
    out = capsys.readouterr().out
    assert all(k in out for k in dropped) and ("dropped" in out) == bool(dropped)  # said, never silent
    assert cfg.optimizer.lr == compose("train", [f"experiment={experiment}"] if experiment else []).optimizer.lr


def test_a_typed_key_of_another_optimizer_is_refused(tmp_path):
    cfg = compose(
        "train", ["experiment=digits_cnn", "optimizer=adamw", "optimizer.momentum=0.5", f"checkpoint.root={tmp_path}"]
    )
    with pytest.raises(UserError) as info:
        validate_train(cfg)
    assert_one_line(info.value, "optimizer.momentum", "AdamW")


def test_a_key_of_no_optimizer_is_still_refused(tmp_path):
    cfg = compose("train", ["experiment=digits_cnn", "+optimizer.momentun=0.5", f"checkpoint.root={tmp_path}"])
    with pytest.raises(UserError) as info:
        validate_train(cfg)
    assert_one_line(info.value, "optimizer.momentun")


def test_the_readme_case_drops_sgd_momentum_with_a_note(tmp_path, capsys):
    cfg = compose("train", ["experiment=digits_cnn", "optimizer=adamw", f"checkpoint.root={tmp_path}"])
    assert "momentum" in cfg.optimizer  # the experiment sets it for SGD
    validate_train(cfg)
    assert "momentum" not in cfg.optimizer and "takes no momentum" in capsys.readouterr().out
