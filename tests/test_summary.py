"""Model summary at start (issue 13): counts, size, per-layer output shapes; printed once on
rank 0; `trainer.model_summary=false` prints none; the run's RNG and module modes untouched."""

from __future__ import annotations

import re
import warnings

import torch
from conftest import compose
from torch import nn

from engine.batches import TensorSplit
from engine.training import MAX_ROWS, layer_rows, model_summary, parameter_counts, size_mib
from models.small_cnn import SmallCNN
from models.vgg16 import build_vgg16
from train import train

CPU = torch.device("cpu")


def _digits_split(n: int = 4) -> TensorSplit:
    return TensorSplit(torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long))


def test_counts_and_size_match_the_parameters_and_frozen_layers_are_not_trainable():
    model = SmallCNN(in_channels=1, image_size=8, num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == (total, total)
    for p in model.conv1.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.conv1.parameters())
    assert frozen == 6 * 1 * 5 * 5 + 6
    assert parameter_counts(model) == (total, total - frozen)
    assert size_mib(model) == total * 4 / 2**20
    text = model_summary(model, _digits_split(), CPU)
    assert f"{total:,} parameters ({total - frozen:,} trainable, {frozen:,} frozen)" in text
    assert f"{total * 4 / 2**20:.2f} MiB" in text


def test_small_cnn_on_digits_output_shapes_in_call_order():
    model = SmallCNN(in_channels=1, image_size=8, num_classes=10)  # padding 2 for 8x8
    rows = layer_rows(model, torch.randn(2, 1, 8, 8))
    assert [(name, shape) for name, _, shape, _ in rows] == [
        ("conv1", "[2, 6, 8, 8]"),
        ("pool", "[2, 6, 4, 4]"),
        ("conv2", "[2, 16, 4, 4]"),
        ("pool", "[2, 16, 2, 2]"),
        ("fc1", "[2, 120]"),
        ("fc2", "[2, 84]"),
        ("fc3", "[2, 10]"),
    ]
    params = {name: p for name, _, _, p in rows if p != "(reused)"}
    assert params == {"conv1": "156", "pool": "0", "conv2": "2,416", "fc1": "7,800", "fc2": "10,164", "fc3": "850"}
    assert rows[3][3] == "(reused)"  # the pool's second call does not count twice


def test_forward_uses_no_rng_and_restores_every_module_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model.train()
    model[2].eval()  # a frozen batch norm stays in eval mode
    stats = model[2].running_mean.clone()
    split = TensorSplit(torch.randn(3, 4), torch.zeros(3))
    state = torch.get_rng_state()
    text = model_summary(model, split, CPU)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model] == [True, True, False, True] and model.training
    assert torch.equal(model[2].running_mean, stats)
    assert "Dropout" in text and "[2, 8]" in text
    assert all(p.grad is None for p in model.parameters())


def test_unused_leaf_is_listed_and_a_failing_forward_only_drops_the_table():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    rows = layer_rows(Odd(), torch.randn(2, 4))
    assert rows == [("used", "Linear", "[2, 3]", "15"), ("spare", "Linear", "-", "12")]
    text = model_summary(nn.Linear(5, 2), TensorSplit(torch.randn(2, 4), torch.zeros(2)), CPU)
    assert text.startswith("model Linear: 12 parameters") and "no layer table" in text


def test_vgg16_table_is_capped():
    model = build_vgg16(num_classes=10, in_channels=3)
    text = model_summary(model, TensorSplit(torch.randn(2, 3, 32, 32), torch.zeros(2)), CPU)
    lines = text.splitlines()
    table = lines[3:]  # headline, "layers for ...", header
    assert len(table) == MAX_ROWS + 1, text
    assert re.search(r"^  \.\.\. +\(\d+ more layers\)", text, re.M)
    assert "features.0" in text and "classifier.6" in text and "[2, 10]" in lines[-1]
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,} parameters" in lines[0]


def test_printed_once_and_off_with_model_summary_false(tmp_path, capsys):
    common = [
        "data=digits",
        "model=small_cnn",
        "trainer.epochs=2",
        "trainer.device=cpu",
        f"checkpoint.root={tmp_path}",
        "checkpoint.every_n_epochs=1",
    ]
    train(compose("train", [*common, "run_name=on"]))
    out = capsys.readouterr().out
    assert out.count("model SmallCNN: 21,386 parameters") == 1
    assert out.count("  conv1  Conv2d     [2, 6, 8, 8]") == 1
    assert out.index("model SmallCNN") < out.index("run directory:")
    train(compose("train", [*common, "run_name=off", "trainer.model_summary=false"]))
    off = capsys.readouterr().out
    assert "model SmallCNN" not in off and "run directory:" in off
    a = torch.load(tmp_path / "on/last.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "off/last.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the summary changes nothing in the run
    with warnings.catch_warnings(record=True) as caught:  # a resume with it switched off:
        warnings.simplefilter("always")  # no "config differs" warning (printing only)
        train(
            compose(
                "train",
                [
                    *common[:2],
                    "trainer.epochs=3",
                    *common[3:],
                    "run_name=on",
                    "resume=auto",
                    "trainer.model_summary=false",
                ],
            )
        )
    assert not [w for w in caught if "differs" in str(w.message)], caught
    assert "model SmallCNN" not in capsys.readouterr().out
