"""Configs compose with Hydra's compose API and build every object they name."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, run_script
from hydra.utils import instantiate

from engine.training import build_scheduler

EXPERIMENTS = ["linear_regression", "quadratic_csv", "digits_cnn", "vgg16_cifar10"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_composes_and_builds(experiment):
    cfg = compose("train", [f"experiment={experiment}"])
    assert cfg.name == experiment
    data = instantiate(cfg.data)
    loss = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(loss, torch.nn.Module) and callable(optimizer)
    if experiment != "vgg16_cifar10":  # VGG16 is built (and stepped) in test_train
        model = instantiate(cfg.model)
        x, _ = next(iter(_first_batch(data)))
        assert model(x).shape[0] == len(x)
    assert (data.task == "classification") == (cfg.loss._target_.endswith("CrossEntropyLoss"))


def _first_batch(data):
    split = data.split("train")
    yield split.x[:4], split.y[:4]


def test_default_is_the_linear_regression_experiment():
    cfg = compose("train")
    assert (cfg.name, cfg.model._target_, cfg.loss._target_) == (
        "linear_regression",
        "models.linear_regression.LinearRegressionModel",
        "torch.nn.L1Loss",
    )
    assert cfg.trainer.epochs == 300  # the experiment preset wins over train.yaml


@pytest.mark.parametrize(
    "group,option",
    [
        ("scheduler", "step"),
        ("scheduler", "cosine"),
        ("scheduler", "warmup_cosine"),
        ("optimizer", "adam"),
        ("optimizer", "adamw"),
        ("loss", "mse"),
        ("loss", "l1"),
    ],
)
def test_optional_groups_build(group, option):
    cfg = compose("train", [f"{group}={option}"])
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    if group == "scheduler":  # scheduler.interval is train.py's: build_scheduler removes it
        assert build_scheduler(cfg, optimizer, 10)[0].optimizer is optimizer
    elif group == "optimizer":
        assert type(optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW"}[option]
    else:
        assert isinstance(instantiate(cfg.loss), torch.nn.Module)


def test_help_lists_groups_and_options():
    out = run_script("train.py", "--help").stdout
    for word in (
        "data:",
        "model:",
        "loss:",
        "optimizer:",
        "scheduler:",
        "experiment:",
        "small_cnn",
        "vgg16",
        "digits",
        "every_n_epochs",
    ):
        assert word in out, word
