"""data=digits at the size a model wants: data.image_size (resized once at setup) and
data.in_channels (the grey channel repeated); the default 1x8x8 is the images as they are."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from PIL import Image

from data.digits import DigitsData
from engine.batches import Batches
from engine.config import check_config
from engine.errors import UserError


def test_default_is_the_original_pixels():
    from sklearn.datasets import load_digits

    data = DigitsData(seed=0)
    x = torch.cat([data.split(s).x for s in ("train", "val", "test")])
    original = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    assert x.shape[1:] == (1, 8, 8)
    # The same pixel values, bit for bit (sorted: the splits reorder the samples).
    assert torch.equal(x.flatten().sort().values, original.flatten().sort().values)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (8, 3), (16, 1)])
def test_image_size_and_channels(size, channels):
    plain, sized = DigitsData(seed=3), DigitsData(seed=3, image_size=size, in_channels=channels)
    for name in ("train", "val", "test"):
        a, b = plain.split(name), sized.split(name)
        assert b.x.shape == (len(a), channels, size, size) and torch.equal(a.y, b.y)  # same split
        assert -1.0 <= b.x.min() and b.x.max() <= 1.0
        assert torch.equal(b.x[:, :1].expand_as(b.x), b.x)  # grey repeated
    if size == 8:
        assert torch.equal(plain.split("train").x.expand(-1, channels, -1, -1), sized.split("train").x)


@pytest.mark.parametrize(
    "key,value",
    [
        ("image_size", 4),
        ("image_size", 257),
        ("image_size", 0),
        ("image_size", True),
        ("image_size", "28"),
        ("image_size", 28.0),
        ("in_channels", 2),
        ("in_channels", 0),
        ("num_classes", 5),
    ],
)
def test_bad_values_are_one_line_naming_the_key(key, value):
    with pytest.raises(UserError) as err:
        DigitsData(**{key: value})
    message = str(err.value)
    assert "\n" not in message and f"data.{key}={value!r}" in message and "expected" in message, message


def test_digits_cnn_at_mnist_size_builds_and_steps():
    """experiment=digits_cnn data.image_size=28: the small CNN follows the data's shape."""
    cfg = compose("train", ["experiment=digits_cnn", "data.image_size=28", "data.in_channels=3"])
    check_config(cfg, "train")
    assert (cfg.model.image_size, cfg.model.in_channels) == (28, 3)
    data, model, loss = instantiate(cfg.data), instantiate(cfg.model), instantiate(cfg.loss)
    x, y = next(iter(Batches(data.split("train"), 4, torch.device("cpu"))))
    assert x.shape == (4, 3, 28, 28)
    value = loss(model(x), y)
    value.backward()
    assert torch.isfinite(value)


def test_predict_inputs_at_the_training_size(tmp_path):
    Image.new("L", (40, 30), 20).save(tmp_path / "a.png")
    for size, channels in ((8, 1), (28, 3)):
        _, x = DigitsData(image_size=size, in_channels=channels).predict_inputs(tmp_path)
        assert x.shape == (1, channels, size, size)
