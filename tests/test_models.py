"""Model zoo: shapes, tutorial compatibility, torchvision key compatibility."""

from __future__ import annotations

import pytest
import torch

from models.linear_regression import LinearRegressionModel
from models.quadratic import QuadraticModel
from models.small_cnn import SmallCNN
from models.vgg16 import build_vgg16


def test_linear_regression_loads_a_tutorial_state_dict():
    class TutorialModel(torch.nn.Module):  # the workflow tutorial's class, verbatim shapes
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.Parameter(torch.randn(1))
            self.bias = torch.nn.Parameter(torch.randn(1))

        def forward(self, x):
            return self.weights * x + self.bias

    tutorial = TutorialModel()
    ours = LinearRegressionModel()
    ours.load_state_dict(tutorial.state_dict())
    x = torch.rand(7, 1)
    assert torch.allclose(ours(x), tutorial(x))


def test_linear_regression_many_features():
    model = LinearRegressionModel(in_features=3)
    assert model(torch.rand(5, 3)).shape == (5, 1)


def test_quadratic_is_linear_on_two_features():
    model = QuadraticModel()
    assert list(model.state_dict()) == ["layer.weight", "layer.bias"]
    assert model(torch.rand(4, 2)).shape == (4, 1)


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_fits_each_image_size(channels, size):
    model = SmallCNN(in_channels=channels, image_size=size, num_classes=10)
    assert model(torch.rand(2, channels, size, size)).shape == (2, 10)


def test_small_cnn_at_32px_is_the_tutorial_network():
    model = SmallCNN(in_channels=3, image_size=32)
    assert model.fc1.in_features == 16 * 5 * 5 and model.conv1.padding == (0, 0)


def test_vgg16_keys_match_torchvision_and_local_weights_load(tmp_path):
    from torchvision.models import vgg16

    reference = vgg16(weights=None, num_classes=10)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = build_vgg16(num_classes=10, weights=str(path))
    assert list(model.state_dict()) == list(reference.state_dict())
    assert torch.equal(model.classifier[6].weight, reference.classifier[6].weight)
    model.eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
