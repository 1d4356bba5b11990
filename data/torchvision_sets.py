"""CIFAR-10, MNIST and Fashion-MNIST from torchvision, read from a local root."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset

from data.base import DataModule, data_path, seeded_split
from data.images import image_transform, load_images
from engine.errors import UserError

# name -> (native channels, native size, mean, std, files that must exist under root)
DATASETS = {
    "CIFAR10": (
        3,
        32,
        [0.4914, 0.4822, 0.4465],
        [0.2470, 0.2435, 0.2616],
        "cifar-10-batches-py/data_batch_1 ... test_batch",
    ),
    "MNIST": (1, 28, [0.1307], [0.3081], "MNIST/raw/train-images-idx3-ubyte ..."),
    "FashionMNIST": (1, 28, [0.2860], [0.3530], "FashionMNIST/raw/train-images-idx3-ubyte ..."),
}


class TorchvisionData(DataModule):
    task = "classification"
    num_classes = 10

    def __init__(
        self,
        dataset: str = "CIFAR10",
        root: str = "data/raw/cifar10",
        download: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        in_channels: int | None = None,
        image_size: int | None = None,
        num_classes: int = 10,
        check_integrity: bool = True,
        augment: list | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed, augment=augment
        )
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r}: expected one of {sorted(DATASETS)}")
        channels, size, mean, std, _ = DATASETS[dataset]
        self.dataset, self.root, self.download = dataset, Path(root), download
        self.val_fraction = val_fraction
        self.check_integrity = check_integrity
        self.in_channels = in_channels or channels
        self.image_size = image_size or size
        if self.in_channels != channels:  # converted images: plain 0.5/0.5 normalisation
            mean, std = None, None
        self.transform = image_transform(self.image_size, self.in_channels, mean, std)

    def _load(self, train: bool):
        from torchvision import datasets

        data_path(self.root, "data.root")
        cls = getattr(datasets, self.dataset)
        if not self.check_integrity and hasattr(cls, "_check_integrity"):
            # CIFAR's md5 check of the official files; off only for hand-made files in tests.
            cls = type(cls.__name__, (cls,), {"_check_integrity": _files_exist, "_load_meta": _load_meta_unchecked})
        try:
            return cls(str(self.root), train=train, download=self.download, transform=self.transform)
        except RuntimeError as err:
            if "not found" not in str(err).lower() and "corrupted" not in str(err).lower():
                raise
            expected = DATASETS[self.dataset][4]
            raise UserError(
                f"data.root={self.root}: {self.dataset} files not found or corrupted; put the "
                f"official files there ({self.root}/{expected}) or set data.download=true on a "
                f"machine with internet access"
            ) from None

    def setup(self) -> None:
        full_train = self._load(train=True)
        test = self._load(train=False)
        train_idx, val_idx = seeded_split(len(full_train), [1 - self.val_fraction, self.val_fraction], self.seed)
        self._splits = {
            "train": Subset(full_train, train_idx.tolist()),
            "val": Subset(full_train, val_idx.tolist()),
            "test": test,
        }

    def predict_inputs(self, path: Path, invert: bool = False) -> tuple[list[str], torch.Tensor]:
        return load_images(
            path, self.transform, invert=invert, dark_background=self.dataset in ("MNIST", "FashionMNIST")
        )


def _files_exist(dataset) -> bool:
    base = Path(dataset.root) / dataset.base_folder
    return all((base / name).is_file() for name, _ in dataset.train_list + dataset.test_list)


def _load_meta_unchecked(dataset) -> None:
    import pickle  # the official CIFAR format is a pickle; only with check_integrity=false

    path = Path(dataset.root) / dataset.base_folder / dataset.meta["filename"]
    if not path.is_file():
        raise RuntimeError(f"Dataset metadata file {path} not found")
    with open(path, "rb") as infile:
        dataset.classes = pickle.load(infile, encoding="latin1")[dataset.meta["key"]]
    dataset.class_to_idx = {name: i for i, name in enumerate(dataset.classes)}
