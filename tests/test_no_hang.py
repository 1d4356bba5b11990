"""Files are data, never code: nothing a path or a file holds makes a run hang or explode.

DataLoader workers never keep the program from exiting; image folders are read one level
deep (no walk through symlink loops or the whole disk); over-long CSV lines and images that
decode to gigabytes are refused before they are read; integer keys are bounded before they
reach torch; special files (/proc, /sys, /dev, pipes) are not data, and no error message
quotes more than a short snippet of a file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, run_script, train_run
from helpers import deadline, raises_user_error
from PIL import Image

import evaluate as evaluate_script
import predict as predict_script
from data.image_folder import ImageFolderData
from data.images import read_image
from data.quadratic_csv import QuadraticCSVData
from data.tabular import MAX_LINE_BYTES, read_numeric_columns
from data.torchvision_sets import TorchvisionData
from engine.cli import validate_train
from engine.config import TrainConfig


def _png(path: Path, rng: np.random.Generator) -> Path:
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _class_folders(root: Path, rng: np.random.Generator, per_class: int = 4) -> list[Path]:
    files = []
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        files += [_png(root / name / f"{i}.png", rng) for i in range(per_class)]
    return files


@pytest.fixture(scope="module")
def quad_run(tmp_path_factory) -> Path:
    """A finished quadratic_csv run (CSV inputs, data.path in its config)."""
    return train_run(tmp_path_factory.mktemp("root"), "experiment=quadratic_csv", name="q")


# ------------------------------------------------------------ 1. DataLoader worker errors


def test_a_worker_error_exits_promptly(tmp_path):
    """A truncated PNG seen by a DataLoader worker: one line and exit 2, not a hang (workers
    ignore SIGTERM, which is what Python's exit sends them)."""
    files = _class_folders(tmp_path / "images", np.random.default_rng(0), per_class=6)
    files[3].write_bytes(files[3].read_bytes()[:60])  # header intact, pixels cut off
    result = run_script(
        "train.py",
        "data=image_folder",
        f"data.root={tmp_path / 'images'}",
        "data.num_classes=2",
        "data.num_workers=2",
        "model=small_cnn",
        "loss=cross_entropy",
        "trainer.epochs=1",
        "trainer.model_summary=false",
        root=tmp_path / "ck",
        check=False,
        timeout=90,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(files[3]) in lines[0]


# ------------------------------------------------------------ 2. image folders


def test_image_folder_reads_one_level_whatever_the_links(tmp_path):
    """Random trees with subfolders, links back to ancestors and links to files: the data
    set is exactly the image files directly inside each class folder, found at once."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        root = tmp_path / f"tree{seed}"
        expected = set(map(str, _class_folders(root, rng, per_class=int(rng.integers(1, 4)))))
        folders = [root / "a", root / "b"]
        for i in range(int(rng.integers(2, 6))):
            parent = folders[int(rng.integers(len(folders)))]
            kind = rng.choice(["subfolder", "loop", "file_link"])
            if kind == "subfolder":
                (parent / f"sub{i}").mkdir()
                folders.append(parent / f"sub{i}")
                _png(parent / f"sub{i}" / "deep.png", rng)
            elif kind == "loop":  # a link to the parent itself or to the root
                (parent / f"loop{i}").symlink_to(parent if rng.random() < 0.5 else root)
            elif parent.parent == root:  # a link to an image: a regular image file
                (parent / f"link{i}.png").symlink_to(sorted(root.glob("a/*.png"))[0])
                expected.add(str(parent / f"link{i}.png"))
        data = ImageFolderData(root=str(root), num_workers=0, val_fraction=0.0, test_fraction=0.0, image_size=8)
        with deadline(10):
            train = data.split("train")
        assert {path for path, _ in train.dataset.samples} == expected


def test_a_looping_file_link_or_a_pipe_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    _class_folders(tmp_path, rng)
    (tmp_path / "b" / "x.png").symlink_to(tmp_path / "b" / "y.png")
    (tmp_path / "b" / "y.png").symlink_to(tmp_path / "b" / "x.png")
    with deadline(10):
        raises_user_error(
            ImageFolderData(root=str(tmp_path), num_workers=0).split,
            "train",
            needles=("x.png", "not a regular image file"),
        )
    for link in ("x.png", "y.png"):
        (tmp_path / "b" / link).unlink()
    os.mkfifo(tmp_path / "a" / "pipe.png")  # opening it would block forever
    with deadline(10):
        raises_user_error(ImageFolderData(root=str(tmp_path), num_workers=0).split, "train", needles=("pipe.png",))


def test_the_file_system_is_not_walked(tmp_path):
    """data.root=/, or a class folder that links to /: only the class folders' own entries
    are listed (there are no images directly in /), one line in a moment."""
    _class_folders(tmp_path, np.random.default_rng(6))
    (tmp_path / "c").symlink_to("/")
    for root in ("/", str(tmp_path)):
        with deadline(10):
            raises_user_error(
                ImageFolderData(root=root, num_workers=0).split, "train", needles=(f"data.root={root}", "no images")
            )


def test_images_that_decode_too_big_are_refused_from_the_header(tmp_path, monkeypatch):
    """Random modes and sizes around a (lowered) limit: refused, naming the file, exactly when
    the decoded pixels (numpy's own size of them) exceed it."""
    monkeypatch.setattr("data.images.MAX_DECODED_BYTES", 40_000)
    rng = np.random.default_rng(2)
    for i in range(24):
        mode, suffix = [
            ("L", ".png"),
            ("RGB", ".png"),
            ("RGBA", ".png"),
            ("I;16", ".png"),
            ("F", ".tif"),
            ("I", ".tif"),
            ("1", ".bmp"),
        ][i % 7]
        size = (int(rng.integers(20, 300)), int(rng.integers(20, 300)))
        path = tmp_path / f"{i}{suffix}"
        Image.new(mode, size).save(path)
        decoded = np.asarray(Image.open(path)).nbytes
        if decoded > 40_000:
            raises_user_error(read_image, path, needles=(str(path), "MiB"))
        else:
            assert read_image(path).size == size


# ------------------------------------------------------------ 3. long CSV lines


def test_a_huge_single_line_csv_is_refused_at_once(tmp_path):
    """1 GiB without a newline (sparse: no disk used) hung pandas; now refused after 2 MiB."""
    big = tmp_path / "big.csv"
    with open(big, "wb") as out:
        out.truncate(1 << 30)
    with deadline(10):
        raises_user_error(read_numeric_columns, big, ["x", "y"], needles=(str(big), "line 1 is longer than"))
        raises_user_error(QuadraticCSVData(path=str(big)).split, "train", needles=(str(big),))


def test_the_long_line_is_found_wherever_it_is(tmp_path):
    """Seeded: a too-long line after a random number of rows is named by its line number; a
    line of exactly the limit passes that check (and its bad value is quoted short)."""
    rng = np.random.default_rng(3)
    for seed in range(4):
        rows = int(rng.integers(0, 60_000))
        long = MAX_LINE_BYTES + (int(rng.integers(1, 3 * MAX_LINE_BYTES)) if seed else 0)
        path = tmp_path / f"{seed}.csv"
        path.write_bytes(b"x,y\n" + b"1,2\n" * rows + b"7" * long + b"\n1,2\n")
        message = raises_user_error(read_numeric_columns, path, ["x", "y"])
        if seed:
            assert f"line {rows + 2} is longer than" in message
        else:
            assert "longer than" not in message and len(message) < 300


def test_error_messages_quote_only_a_snippet_of_a_file(tmp_path):
    """A header or a cell that is a whole file's worth of text is never echoed."""
    rng = np.random.default_rng(4)
    secret = "".join(rng.choice(list("ABCDEFGHIJKLMNOP=\0"), 5000))
    cases = {
        "header": f"{secret},y\n1,2\n",
        "many_columns": ",".join(secret[:400]) + "\n1\n",
        "cell": f"x,y\n1,2\n{secret},2\n",
        "row": f"x,y\n1,2\n1,2,{secret}\n",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text.replace("\0", "\\0"))
        message = raises_user_error(read_numeric_columns, path, ["x", "y"], needles=(str(path),))
        assert len(message) < len(str(path)) + 250, (name, message)
        assert secret[20:60].replace("\0", "\\0") not in message


# ------------------------------------------------------------ 4. integer keys


def _int_keys(schema: type, prefix: str = "") -> list[str]:
    """The train schema's integer keys (the trainer's limits are typed Any: int or float);
    the top-level Any fields are the free-form `_target_` sections."""
    keys, hints = [], typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys += _int_keys(hint, f"{prefix}{field.name}.")
        elif hint is int or int in typing.get_args(hint) or hint is typing.Any and prefix:
            keys.append(prefix + field.name)
    return keys


def test_huge_integers_are_one_line_before_anything_runs(tmp_path):
    keys = _int_keys(TrainConfig) + ["data.batch_size", "scheduler.step_size", "scheduler.T_max"]
    assert {"trainer.global_batch_size", "trainer.epochs", "seed"} <= set(keys)
    rng = np.random.default_rng(5)
    for key in keys:
        value = int(rng.choice([2**31, 2**63, 10**20])) + int(rng.integers(0, 1000))
        extra = {"scheduler.step_size": ["scheduler=step"], "scheduler.T_max": ["scheduler=cosine"]}.get(key, [])
        cfg = compose("train", [f"checkpoint.root={tmp_path}", *extra, f"{key}={value}"])
        raises_user_error(validate_train, cfg, needles=(f"{key}={value}",))
    raises_user_error(ImageFolderData, root=str(tmp_path), image_size=10**20, needles=("data.image_size",))


# ------------------------------------------------------------ 5. special paths


def _special_paths(tmp_path: Path) -> list[Path]:
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "environ.csv").symlink_to("/proc/self/environ")
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    return [
        Path("/proc/self/environ"),
        Path("/sys/kernel"),
        Path("/dev/zero"),
        tmp_path / "fifo.csv",
        tmp_path / "environ.csv",
        tmp_path / "loop.csv",
    ]


def test_special_files_are_not_data(tmp_path):
    for path in _special_paths(tmp_path):
        with deadline(10):
            raises_user_error(QuadraticCSVData(path=str(path)).split, "train", needles=(f"data.path={path}",))
            raises_user_error(
                ImageFolderData(root=str(path), num_workers=0).split, "train", needles=(f"data.root={path}",)
            )
            raises_user_error(TorchvisionData(root=str(path)).split, "train", needles=(f"data.root={path}",))


def test_predict_and_a_stored_data_path_refuse_special_files(quad_run, tmp_path):
    """`input=` on the command line and `data.path` read from a checkpoint's config."""
    for path in _special_paths(tmp_path):
        cfg = compose("predict", [f"ckpt={quad_run / 'best.pt'}", f"input={path}", f"output={tmp_path / 'out.csv'}"])
        with deadline(10):
            raises_user_error(predict_script.predict, cfg, needles=(f"input={path}",))
    state = torch.load(quad_run / "best.pt", weights_only=True)
    state["config"]["data"]["path"] = "/proc/self/environ"
    torch.save(state, tmp_path / "crafted.pt")
    cfg = compose("evaluate", [f"ckpt={tmp_path / 'crafted.pt'}"])
    with deadline(10):
        raises_user_error(evaluate_script.evaluate, cfg, needles=("data.path=/proc/self/environ", "not data"))
