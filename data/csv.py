"""Any CSV: `data=csv data.path=my.csv data.target=price` (features: every other column, or
`data.features=[...]`). Regression, or classification with `data.task=classification` (labels
may be text). Features, and a regression target, are standardised with the train split's mean
and std; these and the column and class names are the module's state, saved in checkpoints, so
evaluate.py and predict.py apply exactly what training did."""

from __future__ import annotations

from pathlib import Path

import torch

from data.base import DataModule, data_path, seeded_split
from data.tabular import read_table, to_numbers
from engine.batches import TensorSplit
from engine.errors import UserError, quote


class CSVData(DataModule):
    def __init__(
        self,
        path: str,
        target: str,
        features: list[str] | None = None,
        task: str = "regression",
        standardize: bool = True,
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        num_features: int | None = None,
        num_outputs: int | None = None,
        **loader: object,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, **loader)
        if task not in ("regression", "classification"):
            raise UserError(f"data.task={task!r}: expected regression or classification")
        if not 0 < train_fraction < 1 or not 0 < val_fraction < 1 or train_fraction + val_fraction >= 1:
            raise UserError(
                f"data.train_fraction={train_fraction}, data.val_fraction={val_fraction}: expected fractions "
                f"in (0, 1) whose sum is < 1 (the rest is the test split)"
            )
        self.path, self.target, self.task, self.standardize = Path(str(path)), str(target), task, standardize
        self.features = [str(f) for f in features] if features else None
        if self.features is not None and self.target in self.features:
            raise UserError(f"data.features: holds the target column {self.target!r}")
        self.fractions = [train_fraction, val_fraction, 1 - train_fraction - val_fraction]
        self.sizes = {"num_features": num_features, "num_outputs": num_outputs}
        self.classes: list[str] | None = None
        self.stats: dict[str, torch.Tensor] = {}

    # -- the state a checkpoint keeps (engine.checkpoint.PARTS["data"])
    def state_dict(self) -> dict:
        self.split("train")  # fitted at setup
        return {"features": list(self.features), "classes": self.classes, **self.stats}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's state, checked against itself: a crafted one fails here in one line."""
        features, classes = list(state["features"]), state["classes"]
        stats = {k: v for k, v in state.items() if k not in ("features", "classes")}
        sizes = {"mean": len(features), "std": len(features)} if self.standardize else {}
        if self.standardize and self.task == "regression":
            sizes.update(target_mean=1, target_std=1)
        if (
            not features
            or {k: len(v) for k, v in stats.items()} != sizes
            or (classes is None) != (self.task == "regression")
            or not all(bool(torch.isfinite(v).all()) for v in stats.values())
            or not all(bool((stats[k] > 0).all()) for k in ("std", "target_std") if k in stats)
        ):
            raise ValueError(
                f"expected finite stats {sizes} (std > 0) for {len(features)} feature(s), task {self.task}"
            )
        self.features, self.classes, self.stats = features, classes, stats
        self._splits = None  # set up again with these

    @property
    def num_features(self) -> int:
        return len(self.features) if self.features is not None else self.sizes["num_features"]

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def class_names(self) -> list[str] | None:
        return self.classes

    def setup(self) -> None:
        data_path(self.path, "data.path")
        frame = read_table(self.path, [self.target, *(self.features or [])])
        if self.features is None:
            self.features = [c for c in frame.columns if c != self.target]
            if not self.features:
                raise UserError(f"{self.path}: only the target column {self.target!r}; no feature columns")
        x = self._inputs(frame, self.path)
        if self.task == "regression":
            try:
                y = to_numbers(frame, self.target, self.path).unsqueeze(1)
            except UserError as err:
                raise UserError(f"{err}; for class labels set data.task=classification") from None
        else:
            y = self._labels(frame[self.target])
        parts = seeded_split(len(x), self.fractions, self.seed)  # disjoint; best.pt never sees test
        if not self.stats:
            self.stats = self._fit(x[parts[0]], y[parts[0]])
        x = self._scale(x)
        if self.task == "regression" and self.standardize:
            y = (y - self.stats["target_mean"]) / self.stats["target_std"]
        self._splits = {name: TensorSplit(x[i], y[i]) for name, i in zip(("train", "val", "test"), parts, strict=True)}

    def predict_inputs(self, path: Path) -> tuple[dict[str, list[str]], torch.Tensor]:
        """The input file's columns as they are (kept in the output) and the model inputs."""
        if self.features is None or (self.standardize and not self.stats):  # no checkpoint state
            self.setup()
        frame = read_table(path, self.features)
        return {c: frame[c].tolist() for c in frame.columns}, self._scale(self._inputs(frame, path))

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs in the target's units (a standardised regression target, inverted)."""
        if self.task == "regression" and self.standardize:
            return outputs * self.stats["target_std"] + self.stats["target_mean"]
        return outputs

    def _inputs(self, frame, path: Path) -> torch.Tensor:
        return torch.stack([to_numbers(frame, c, path) for c in self.features], dim=1)

    def _labels(self, column) -> torch.Tensor:
        """Text labels -> class indices; classes sorted (by value when all are numbers)."""
        if self.classes is None:
            names = sorted(set(column))
            try:
                names = sorted(names, key=float)
            except ValueError:
                pass
            self.classes = names
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [i for i, label in enumerate(column) if label not in index]
        if unknown:
            raise UserError(
                f"{self.path}: data row {unknown[0] + 1}, column {self.target!r}: label "
                f"{quote(column.iloc[unknown[0]])} is not one of the checkpoint's classes {self.classes[:10]}"
            )
        return torch.tensor([index[label] for label in column], dtype=torch.long)

    def _fit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean and std of the train split (std 0: 1, a constant column stays constant)."""
        stats = {"mean": x.mean(0), "std": _nonzero(x.std(0, unbiased=False))}
        if self.task == "regression":
            stats.update(target_mean=y.mean(0), target_std=_nonzero(y.std(0, unbiased=False)))
        return stats if self.standardize else {}

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.stats["mean"]) / self.stats["std"] if self.standardize else x


def _nonzero(std: torch.Tensor) -> torch.Tensor:
    return torch.where(std > 0, std, torch.ones_like(std))
