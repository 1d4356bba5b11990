"""The two workloads of `make bench` items 9-10 in plain PyTorch, for the hand-written loop
(hand_loop.py) and the PyTorch Lightning version (lightning_loop.py).

Each is what `python train.py experiment=NAME` trains, written out without the template:
the same data and splits (configs/data/*.yaml, data/*.py), the same model (models/*.py),
loss, optimizer, learning rate, batch size and seed (configs/experiment/*.yaml).

    digits: scikit-learn's 8x8 digits, stratified 70/15/15 split, the save/load tutorial's
            CNN, cross-entropy, SGD(lr=0.05, momentum=0.9), batch 32
    linear: y = 0.7 x + 0.3 on arange(0, 1, 0.02), the first 80% for training (a seeded 20%
            of it for validation), the rest for testing; Linear regression, L1 loss,
            SGD(lr=0.01), batch 8
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the tutorial's spelling
from torch import nn
from torch.utils.data import TensorDataset

SEED = 42  # configs/train.yaml


@dataclass
class Workload:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    model: nn.Module
    loss_fn: nn.Module
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch_size: int
    classification: bool


class DigitsCNN(nn.Module):
    """models/small_cnn.py for 1x8x8 images (padding 2 so two conv+pool stages fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LinearRegressionModel(nn.Module):
    """The PyTorch workflow tutorial's model (models/linear_regression.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1))
        self.bias = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weights.unsqueeze(1) + self.bias


def digits() -> Workload:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(SEED)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # to [-1, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, rest = train_test_split(
        list(range(len(y))), test_size=0.15 + 0.15, stratify=data.target, random_state=SEED
    )
    val_idx, test_idx = train_test_split(
        rest, test_size=0.15 / (0.15 + 0.15), stratify=data.target[rest], random_state=SEED
    )
    return Workload(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[val_idx], y[val_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
        DigitsCNN(),
        nn.CrossEntropyLoss(),
        lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        batch_size=32,
        classification=True,
    )


def linear() -> Workload:
    torch.manual_seed(SEED)
    x = torch.arange(0.0, 1.0, 0.02).unsqueeze(1)
    y = 0.7 * x + 0.3
    cut = int(0.8 * len(x))  # the tutorial's ordered split: the first 80% for training
    perm = torch.randperm(cut, generator=torch.Generator().manual_seed(SEED))
    n_val = round(0.2 * cut)  # a seeded 20% of the training part for validation
    train_idx, val_idx = perm[: cut - n_val], perm[cut - n_val :]
    return Workload(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[val_idx], y[val_idx]),
        TensorDataset(x[cut:], y[cut:]),
        LinearRegressionModel(),
        nn.L1Loss(),
        lambda model: torch.optim.SGD(model.parameters(), lr=0.01),
        batch_size=8,
        classification=False,
    )


WORKLOADS = {"digits": digits, "linear": linear}
