"""Data modules: splits, seeding, and the real torchvision loaders on files in official format."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from helpers import write_cifar
from PIL import Image

from data.digits import DigitsData
from data.image_folder import ImageFolderData
from data.linear import LinearData
from data.quadratic_csv import QuadraticCSVData
from data.torchvision_sets import TorchvisionData
from engine.batches import Batches, TensorSplit, epoch_order
from engine.errors import UserError


def test_linear_matches_the_tutorial():
    data = LinearData()
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    assert (len(train) + len(val), len(test)) == (40, 10)  # arange(0, 1, 0.02) split 80/20
    assert torch.allclose(train.y, 0.7 * train.x + 0.3)
    assert torch.equal(test.x[0], torch.tensor([0.8]))


def test_linear_noise_is_seeded():
    a = LinearData(noise_std=0.1, seed=1).split("train").y
    b = LinearData(noise_std=0.1, seed=1).split("train").y
    c = LinearData(noise_std=0.1, seed=2).split("train").y
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_quadratic_csv_features(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("a,b\n1,3\n2,9\n-1,1\n0.5,0\n3,1\n")
    data = QuadraticCSVData(path=str(path), x_column="a", y_column="b", train_fraction=0.6)
    train, test = data.split("train"), data.split("test")
    assert len(train) + len(test) == 5
    x = torch.cat([train.x, test.x])
    assert torch.allclose(x[:, 0], x[:, 1] ** 2)  # features [x^2, x]


def test_shipped_quadratic_csv_is_reproducible(tmp_path):
    from data.make_quadratic_csv import make_frame

    shipped = QuadraticCSVData(path="data/quadratic.csv").split("train")
    path = tmp_path / "q.csv"
    make_frame().to_csv(path, index=False)
    again = QuadraticCSVData(path=str(path)).split("train")
    assert torch.equal(shipped.x, again.x) and torch.equal(shipped.y, again.y)


def test_digits_split_is_stratified_and_seeded():
    data = DigitsData(seed=0)
    sizes = [len(data.split(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797
    test_y = data.split("test").y
    counts = torch.bincount(test_y, minlength=10)
    assert counts.min() >= 25  # every class in the test split (~27 each)
    again = DigitsData(seed=0).split("test").y
    assert torch.equal(test_y, again)
    assert data.split("train").x.shape[1:] == (1, 8, 8)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(100, 1, 3), epoch_order(100, 1, 3))
    assert not torch.equal(epoch_order(100, 1, 3), epoch_order(100, 1, 4))
    torch.manual_seed(0)
    a = epoch_order(100, 1, 3)
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(a, epoch_order(100, 1, 3))


def test_batches_index_in_memory_and_skip_consumed_batches():
    split = TensorSplit(torch.arange(10.0).unsqueeze(1), torch.arange(10.0).unsqueeze(1))
    batches = Batches(split, 3, torch.device("cpu"), shuffle=True, seed=5)
    full = list(batches(epoch=2))
    assert [len(x) for x, _ in full] == [3, 3, 3, 1] == batches.batch_sizes().tolist()
    assert sorted(torch.cat([x for x, _ in full]).flatten().tolist()) == list(range(10))
    resumed = list(batches(epoch=2, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed, strict=True))


def _write_mnist(root, folder="MNIST", n_train=8, n_test=4):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    # torchvision reads the unpacked files; write those too, as its downloader does.
    for gz in raw.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))


def test_cifar10_reads_the_official_format(tmp_path):
    write_cifar(tmp_path)
    data = TorchvisionData("CIFAR10", root=str(tmp_path), val_fraction=0.2, check_integrity=False, num_workers=0)
    assert len(data.split("train")) + len(data.split("val")) == 30
    x, y = data.split("test")[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


@pytest.mark.parametrize("name,folder", [("MNIST", "MNIST"), ("FashionMNIST", "FashionMNIST")])
def test_mnist_family_reads_the_official_format(tmp_path, name, folder):
    _write_mnist(tmp_path, folder)
    data = TorchvisionData(name, root=str(tmp_path), val_fraction=0.25, num_workers=0)
    batches = Batches(data.split("train"), 4, torch.device("cpu"), shuffle=True, seed=0)
    sizes = [len(x) for x, _ in batches(epoch=1)]
    x, y = next(iter(batches(epoch=1)))
    assert sizes == [4, 2] and x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    assert len(data.split("test")) == 4


def test_missing_dataset_root_says_where_files_go(tmp_path):
    data = TorchvisionData("CIFAR10", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere.*cifar-10-batches-py.*download=true"):
        data.split("train")


def test_image_folder_resizes_and_converts(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (40 + i, 30), color).save(tmp_path / cls / f"{i}.png")
    data = ImageFolderData(
        root=str(tmp_path),
        image_size=16,
        in_channels=1,
        num_classes=2,
        val_fraction=0.2,
        test_fraction=0.2,
        num_workers=0,
    )
    x, y = data.split("train")[0]
    assert data.classes == ["cat", "dog"]
    assert x.shape == (1, 16, 16)
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 10


def test_image_folder_class_names_are_predicted_without_the_training_folder(tmp_path):
    """The class folders' names travel in the checkpoint (the data part's state): predict.py
    writes `cat`/`dog`, not 0/1, even once data.root is gone."""
    import csv
    import shutil

    from conftest import compose

    from predict import predict
    from train import train

    root = tmp_path / "images"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 20), tuple(max(0, c - 9 * i) for c in color)).save(root / cls / f"{i}.png")
    train(
        compose(
            "train",
            [
                "data=image_folder",
                f"data.root={root}",
                "data.num_classes=2",
                "data.image_size=8",
                "data.num_workers=0",
                "model=small_cnn",
                "trainer.epochs=2",
                f"checkpoint.root={tmp_path}",
                "run_name=pets",
            ],
        )
    )
    (tmp_path / "new").mkdir()
    shutil.copy(root / "dog" / "0.png", tmp_path / "new" / "a.png")
    shutil.rmtree(root)
    out = predict(
        compose(
            "predict",
            [f"ckpt={tmp_path / 'pets' / 'best.pt'}", f"input={tmp_path / 'new'}", f"output={tmp_path / 'p.csv'}"],
        )
    )
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["input", "class", "probability"] and rows[0]["class"] in ("cat", "dog")
