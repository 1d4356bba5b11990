"""A multilayer perceptron for tabular data, sized from the data (configs/model/mlp.yaml)."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """in_features -> hidden[0] -> ... -> out_features, ReLU (and optional dropout) between."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int] = (64, 64), dropout: float = 0.0) -> None:
        layers, width = [nn.Flatten()], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = size
        super().__init__(*layers, nn.Linear(width, out_features))
