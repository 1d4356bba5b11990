"""A model that does not fit the data stops at start in one line naming the layer, the shape it
got and the key to change; a loss that does not fit the model's output, likewise. Random nets
(seeded) against the digits at random sizes, and the README's case as a user runs it."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from data.digits import DigitsData
from engine.errors import UserError
from engine.training import check_fits
from tests.conftest import run_script
from tests.helpers import assert_one_line


def random_net(rng: random.Random) -> tuple[nn.Module, int, int, int]:
    """Conv(in_channels -> 4, 3x3), ReLU, Flatten, Linear(flat -> 10); (net, in_channels, size it
    fits, flat)."""
    channels, size = rng.choice([1, 3]), rng.choice([8, 12, 16, 28])
    flat = 4 * (size - 2) ** 2
    net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(flat, 10))
    return net, channels, size, flat


@pytest.mark.parametrize("seed", range(8))
def test_random_net_against_random_digits_size(seed):
    rng = random.Random(seed)
    net, channels, size, flat = random_net(rng)
    data_channels, data_size = rng.choice([1, 3]), rng.choice([8, 12, 16, 28])
    data = DigitsData(image_size=data_size, in_channels=data_channels, batch_size=8, seed=seed)
    cfg = OmegaConf.create({"model": {"_target_": "tiny.Net"}, "data": {"_target_": "data.digits.DigitsData"}})
    before = [p.clone() for p in net.parameters()]
    rng_state = torch.get_rng_state()
    if (data_channels, data_size) == (channels, size):
        check_fits(net, nn.CrossEntropyLoss(), data.split("train"), torch.device("cpu"), cfg)
    else:
        with pytest.raises(UserError) as info:
            check_fits(net, nn.CrossEntropyLoss(), data.split("train"), torch.device("cpu"), cfg)
        layer = "layer 0 (Conv2d)" if data_channels != channels else "layer 3 (Linear)"
        got = [2, data_channels, data_size, data_size] if data_channels != channels else [2, 4 * (data_size - 2) ** 2]
        assert_one_line(info.value, "does not fit", layer, f"got input of shape {got}", "data.image_size")
    # the check changes nothing: weights, train flags, the global RNG
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert net.training and torch.equal(rng_state, torch.get_rng_state())


def test_loss_that_does_not_fit_the_output_is_named():
    data = DigitsData(batch_size=8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cfg = OmegaConf.create({"model": {"_target_": "x"}, "data": {"_target_": "y"}})
    check_fits(net, nn.NLLLoss(), data.split("train"), torch.device("cpu"), cfg)  # log-probs or not: it runs
    with pytest.raises(UserError) as info:
        check_fits(net, nn.MSELoss(), data.split("train"), torch.device("cpu"), cfg)
    assert_one_line(info.value, "loss MSELoss", "[2, 10]", "targets [2]", "loss=cross_entropy")


def test_small_cnn_on_digits_without_the_size_stops_before_the_run_folder(tmp_path):
    """As a user types it: small_cnn sized for 28x28 while the digits are 8x8: exit 2, one line."""
    result = run_script(
        "train.py", "experiment=digits_cnn", "model.image_size=28", "trainer.epochs=1", root=tmp_path, check=False
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit data=digits" in lines[0] and "data.image_size" in lines[0], lines
    assert "layer" in lines[0] and "[2, 1, 8, 8]" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written
