"""A CSV of (x, y) points read with pandas; the model sees features [x^2, x]."""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataModule, data_path, seeded_split
from data.tabular import read_feature_csv, read_numeric_columns
from engine.batches import TensorSplit
from engine.errors import UserError


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x * x, x], dim=1)


class QuadraticCSVData(DataModule):
    task = "regression"

    def __init__(
        self,
        path: str = "data/quadratic.csv",
        x_column: str = "x",
        y_column: str = "y",
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        num_features: int = 2,
        **loader: object,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        if num_features != 2:
            raise UserError(
                f"data.num_features={num_features!r}: data=quadratic_csv has two "
                f"features (x^2, x); keep data.num_features=2"
            )
        self.path, self.x_column, self.y_column = Path(path), x_column, y_column
        if train_fraction + val_fraction >= 1:
            raise UserError(
                f"data.train_fraction={train_fraction} + data.val_fraction="
                f"{val_fraction} leaves no test data; expected a sum < 1"
            )
        self.train_fraction, self.val_fraction = train_fraction, val_fraction

    def setup(self) -> None:
        data_path(self.path, "data.path")
        cols = read_numeric_columns(self.path, [self.x_column, self.y_column])
        x, y = quadratic_features(cols[self.x_column]), cols[self.y_column].unsqueeze(1)
        _check_squares(x, self.path, self.x_column)
        test_fraction = 1 - self.train_fraction - self.val_fraction
        splits = seeded_split(
            len(x), [self.train_fraction, self.val_fraction, test_fraction], self.seed
        )  # three disjoint sets: best.pt is not picked on test
        self._splits = {
            name: TensorSplit(x[idx], y[idx]) for name, idx in zip(("train", "val", "test"), splits, strict=True)
        }

    def predict_inputs(self, path: Path) -> tuple[dict[str, list[str]], torch.Tensor]:
        columns, x = read_feature_csv(path, [self.x_column])
        features = quadratic_features(x[:, 0])
        _check_squares(features, path, self.x_column)
        return columns, features


def _check_squares(features: torch.Tensor, path: Path, column: str) -> None:
    """x fits float32 but x**2 may not (|x| > 1.8e19): refuse, naming the row."""
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise UserError(
            f"{path}: data row {row + 1}, column {column!r}: "
            f"{float(features[row, 1]):g} squared overflows float32; expected "
            f"|x| <= 1.8e19"
        )
