"""Every config on disk composes with Hydra's compose API and names objects that exist:
each configs/experiment/*.yaml and each option of the data, model, loss, optimizer,
scheduler and hparams_search groups, found when the tests are collected (Lightning-Hydra-
Template's test_configs). A new experiment or model YAML is tested with no edit here.
Experiments whose data is on this machine also build data and model and run a 2-sample
batch through the model and the loss."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, run_script
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from engine.batches import Batches
from engine.config import check_config
from engine.errors import UserError
from engine.training import build_scheduler

CONFIGS = REPO / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


EXPERIMENTS = options("experiment")
GROUP_OPTIONS = [
    (group, option)
    for group in ("data", "model", "loss", "optimizer", "scheduler", "hparams_search")
    for option in options(group)
]
# A model needs data of its shape and the other way round: each is tried with the other's options.
PARTNER = {"data": "model", "model": "data"}
CLASSIFICATION_LOSSES = ("torch.nn.CrossEntropyLoss", "torch.nn.NLLLoss")


def _placeholder(cfg: DictConfig, key: str) -> object:
    """A stand-in for a `???` value (data.root, data.num_classes of image_folder), of the type
    its constructor takes, so that the rest of the config can be resolved and checked."""
    section, _, name = key.rpartition(".")
    target = OmegaConf.select(cfg, f"{section}._target_") if section else None
    hint = str
    if isinstance(target, str):
        obj = get_object(target)
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
        hint = hints.get(name, str)
    for kind, value in ((bool, False), (int, 2), (float, 0.5)):
        if hint is kind or kind in typing.get_args(hint):
            return value
    return "/nonexistent/placeholder"


def _targets(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


def _missing(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of the `???` values (OmegaConf.missing_keys resolves, and fails first)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def checked(cfg: DictConfig) -> DictConfig:
    """The config with its `???` values filled in: every `${...}` resolves, keys and types fit
    the schema and the constructors (engine.config.check_config), every `_target_` imports."""
    for key in _missing(OmegaConf.to_container(cfg, resolve=False)):
        OmegaConf.update(cfg, key, _placeholder(cfg, key), merge=False)
    check_config(cfg, "train")
    targets = _targets(OmegaConf.to_container(cfg, resolve=True))
    assert {"data", "model", "loss", "optimizer"} <= set(cfg) and targets
    for target in targets:
        assert get_object(target) is not None, target
    return cfg


def composed(overrides: list[str]) -> DictConfig:
    return checked(compose("train", overrides))


def needs_files(data: DictConfig) -> bool:
    """Data read from a folder that is not on this machine (cifar10, mnist, ... to download)."""
    root = data.get("root")
    return root is not None and not Path(str(root)).exists()


def first_batch(data, n: int = 2):
    return next(iter(Batches(data.split("train"), n, torch.device("cpu"))))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_composes_and_builds(experiment):
    cfg = composed([f"experiment={experiment}"])
    assert cfg.name  # an experiment names its runs
    data = instantiate(cfg.data)
    loss = instantiate(cfg.loss)
    assert callable(loss) and callable(instantiate(cfg.optimizer))
    assert (data.task == "classification") == (cfg.loss._target_ in CLASSIFICATION_LOSSES)
    if needs_files(cfg.data):  # the model is built in the tests that have its data (test_train)
        return
    model = instantiate(cfg.model)
    x, y = first_batch(data)
    out = model(x)
    assert out.shape[0] == len(x) == 2
    value = loss(out, y)
    assert value.ndim == 0 and torch.isfinite(value), (experiment, value)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_each_group_option_composes(group, option):
    partner = PARTNER.get(group)
    tries = [[]] + ([[f"{partner}={p}"] for p in options(partner)] if partner else [])
    errors = []
    for extra in tries:
        try:
            cfg = composed([f"{group}={option}", *extra])
            break
        except UserError as err:
            errors.append(f"{' '.join(extra) or 'alone'}: {err}")
    else:
        pytest.fail(f"{group}={option} resolves with no {partner or 'other'} option:\n" + "\n".join(errors))
    if group in ("optimizer", "scheduler", "loss"):  # cheap to build with the default model
        model = instantiate(cfg.model)
        optimizer = instantiate(cfg.optimizer)(model.parameters())
        assert isinstance(optimizer, torch.optim.Optimizer)
        if group == "scheduler":  # scheduler.interval is train.py's: build_scheduler removes it
            scheduler = build_scheduler(cfg, optimizer, 10)[0]
            assert scheduler is None or scheduler.optimizer is optimizer
        assert isinstance(instantiate(cfg.loss), torch.nn.Module)


def test_default_is_the_linear_regression_experiment():
    cfg = compose("train")
    assert (cfg.name, cfg.model._target_, cfg.loss._target_) == (
        "linear_regression",
        "models.linear_regression.LinearRegressionModel",
        "torch.nn.L1Loss",
    )
    assert cfg.trainer.epochs == 300  # the experiment preset wins over train.yaml


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
        "nll",
        "every_n_epochs",
    ):
        assert word in out, word


def test_every_schema_class_pickles_by_name():
    """A submitit sweep job unpickles the config with its schema: each dataclass, nested ones
    included, must be found by name in engine.config (a class pickled by value loses its
    defaults: the job then fails composing `trainer.epochs`)."""
    import dataclasses
    import pickle

    from engine.config import SCHEMAS

    seen, todo = [], list(SCHEMAS.values())
    while todo:
        schema = todo.pop()
        seen.append(schema)
        hints = typing.get_type_hints(schema)
        todo += [hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])]
    assert len(seen) >= 7  # train, evaluate, predict; trainer, early_stopping, checkpoint, cv
    for schema in seen:
        assert pickle.loads(pickle.dumps(schema)) is schema, schema
