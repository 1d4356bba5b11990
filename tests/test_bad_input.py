"""Every bad input of issues 2 and 4: one line naming the file/key/value and what is expected,
exit code 2, no traceback, nothing overwritten.

Most cases run in-process (train()/evaluate()/predict() on a composed config, and the
command-line check on an argv list); a few subprocesses prove the real exit codes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, run_script
from helpers import assert_one_line, raises_user_error, snapshot

import evaluate as evaluate_script
import predict as predict_script
import train as train_script
from engine.cli import check_command_line, compose_checked
from engine.errors import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, UserError, cli_errors


@pytest.fixture(scope="module")
def root(trained_run) -> Path:
    """The checkpoint root holding the finished run `lin` that no bad input may touch."""
    return trained_run.parent


# ----------------------------------------------------------------- train config values

TRAIN_CASES = [
    (["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
    (["trainer.epochs=-3"], ["trainer.epochs=-3"]),
    (["trainer.epochs=2.5"], ["trainer.epochs=2.5", "integer"]),
    (["trainer.epochs=abc"], ["trainer.epochs='abc'", "integer"]),
    (["trainer.epochs=null"], ["trainer.epochs=None"]),
    (["checkpoint.every_n_epochs=0"], ["checkpoint.every_n_epochs=0", ">= 1"]),
    (["checkpoint.every_n_steps=0"], ["checkpoint.every_n_steps=0"]),
    (["checkpoint.keep_last=0"], ["checkpoint.keep_last=0", ">= 1"]),
    (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps=0"]),
    (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    (["data.batch_size=abc"], ["data.batch_size='abc'"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "> 0"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1"]),
    (["optimizer.lr=abc"], ["optimizer.lr='abc'", "number"]),
    (["optimizer.momentum=-1"], ["optimizer.momentum=-1"]),
    (["optimizer.nesterov=true"], ["optimizer.nesterov", "momentum"]),
    (["optimizer.nesterov=1"], ["optimizer.nesterov=1", "true or false"]),
    (["trainer.device=gpu"], ["trainer.device='gpu'", "auto, cpu, cuda"]),
    (["trainer.device=cuda:7"], ["trainer.device=cuda:7"]),
    (["trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16-mixed"]),
    (["trainer.compile=maybe"], ["trainer.compile='maybe'", "true or false"]),
    (["trainer.max_time=-1"], ["trainer.max_time=-1"]),
    (["checkpoint.mode=up"], ["checkpoint.mode='up'", "min or max"]),
    (["checkpoint.monitor=accuracy"], ["checkpoint.monitor='accuracy'", "val_loss"]),
    (["checkpoint.monitor=val_acc", "run_name=mon"], ["checkpoint.monitor='val_acc'", "regression"]),
    (["checkpoint.root=[1,2]"], ["checkpoint.root=[1, 2]", "text"]),
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["debug=maybe"], ["debug='maybe'", "true or false"]),
    (["trainer=3"], ["trainer=3", "expected a section", "epochs"]),
    (["+trainer.epoch=5"], ["trainer.epoch", "unknown key", "valid keys: epochs"]),
    (["+checkpoint.evry_n_epochs=5"], ["checkpoint.evry_n_epochs", "every_n_epochs"]),
    (["+foo=1"], ["foo", "unknown key"]),
    (["+data.foo=1"], ["data.foo", "unknown key", "LinearData", "batch_size"]),
    (["+loss.foo=1"], ["loss.foo", "L1Loss"]),
    (["data.train_fraction=1.5"], ["data.train_fraction=1.5", "fraction"]),
    (["data.train_fraction=abc"], ["data.train_fraction='abc'", "number"]),
    (["data.noise_std=[1]"], ["data.noise_std=[1]", "number"]),
    (["run_name=../../x"], ["run_name='../../x'", "inside checkpoint.root"]),
    (["run_name=/tmp/elsewhere"], ["run_name='/tmp/elsewhere'"]),
    (["run_name=null", "name=../up"], ["name='../up'"]),
    (["model=small_cnn"], ["model.in_channels", "data.in_channels", "does not fit"]),
    (["data=image_folder", "model=small_cnn"], ["data.root", "required", "data.root=VALUE"]),
    # Found when the data module is built (after the run folder is opened): a new run name.
    (
        ["experiment=digits_cnn", "run_name=digits4", "data.image_size=4"],
        ["data=digits", "data.image_size=4", "8 to 256"],
    ),
    (["data.num_features=2", "run_name=linear2"], ["data.num_features=2", "one feature"]),
    (["experiment=digits_cnn", "model.padding=abc"], ["model.padding='abc'", "integer or null"]),
    (
        ["experiment=digits_cnn", "data.val_fraction=0.5", "data.test_fraction=0.5"],
        ["val_fraction + test_fraction", "no training data"],
    ),
    (["scheduler=step", "scheduler.step_size=abc"], ["scheduler.step_size='abc'", "integer"]),
    (["resume=missing.pt"], ["missing.pt", "not found"]),
    ([], ["already has checkpoints", "resume=auto", "run_name=NEW_NAME"]),
]


@pytest.mark.parametrize("overrides,needles", TRAIN_CASES, ids=[" ".join(o) or "existing-run" for o, _ in TRAIN_CASES])
def test_bad_train_config(root, overrides, needles):
    before = snapshot(root / "lin")

    def compose_and_train():  # a wrong type or unknown key: refused by Hydra while composing
        train_script.train(
            compose_checked("train", [f"checkpoint.root={root}", "run_name=lin", "trainer.epochs=3", *overrides])
        )

    raises_user_error(compose_and_train, needles=tuple(needles))
    assert snapshot(root / "lin") == before  # the existing run is byte-for-byte the same
    assert all(p.parent.name == "lin" for p in root.rglob("*.pt"))  # and no new checkpoint


def test_checkpoint_root_that_is_a_file(root, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    cfg = compose("train", [f"checkpoint.root={file}"])
    raises_user_error(train_script.train, cfg, needles=(f"checkpoint.root={file}", "folder"))


def test_resume_from_a_checkpoint_of_another_architecture(root):
    before = snapshot(root / "lin")
    cfg = compose(
        "train",
        [
            f"checkpoint.root={root}",
            "run_name=other_arch",
            "experiment=quadratic_csv",
            f"resume={root / 'lin' / 'best.pt'}",
        ],
    )
    raises_user_error(
        train_script.train,
        cfg,
        needles=("weights do not fit", "missing keys [layer.weight, layer.bias]", "unexpected keys [weights, bias]"),
    )
    assert snapshot(root / "lin") == before
    assert not list((root / "other_arch").glob("*.pt"))


# ------------------------------------------------------- overrides that do not compose

COMPOSE_CASES = [
    ("train", ["trainer.epoch=5"], ["trainer.epoch=5", "did you mean 'epochs'", "valid keys: epochs, device"]),
    ("train", ["checkpoint.evry_n_epochs=2"], ["every_n_epochs"]),
    # the options on disk: a user's own model YAML is one of them
    (
        "train",
        ["model=foo"],
        [
            "model=foo",
            "valid options: " + ", ".join(sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))),
        ],
    ),
    ("train", ["model=smal_cnn"], ["did you mean 'small_cnn'"]),
    ("train", ["data=nope"], ["data=nope", "digits", "quadratic_csv"]),
    ("train", ["experiment=nope"], ["experiment=nope", "digits_cnn", "vgg16_cifar10"]),
    ("train", ["optimizer=adagrad"], ["optimizer=adagrad", "sgd", "adamw"]),
    ("train", ["loss=hinge"], ["loss=hinge", "cross_entropy"]),
    ("train", ["scheduler=fancy"], ["scheduler=fancy", "cosine"]),
    ("train", ["model=small_cnn", "model.channels=3"], ["model.channels=3", "in_channels"]),
    ("train", ["trainer.epochs=["], ["trainer.epochs=[", "cannot parse"]),
    ("train", ["optimizer.lr=0.1,0.2"], ["optimizer.lr=0.1,0.2", "-m"]),
    ("train", ["+trainer.epochs=3"], ["trainer.epochs", "+"]),
    ("train", ["~trainer.nothing"], ["trainer.nothing"]),
    ("train", ["foo=1"], ["foo=1", "valid keys: name"]),
    ("evaluate", ["split2=val"], ["split2=val", "did you mean 'split'"]),
    ("evaluate", ["data.batch_size=3"], ["data.batch_size=3", "data=NAME"]),
    ("evaluate", ["model=resnet"], ["model=resnet", "small_cnn"]),
    ("predict", ["inptu=x.csv"], ["did you mean 'input'"]),
]


@pytest.mark.parametrize(
    "config,overrides,needles", COMPOSE_CASES, ids=[f"{c} {' '.join(o)}" for c, o, _ in COMPOSE_CASES]
)
def test_override_that_does_not_compose(config, overrides, needles):
    with pytest.raises(UserError) as info:
        compose_checked(config, overrides)
    assert_one_line(info.value, *needles)


CLI_CASES = [
    ["trainer.epoch=5"],
    ["model=foo"],
    ["trainer.epochs=0"],
    ["-m", "optimizer.lr=0.1,abc"],
    ["-m", "model=small_cnn,nope"],
]


def test_command_line_check_prints_one_line_and_exits_2(capsys):
    """The entry point's check, in-process: one stderr line, exit 2; good ones pass."""
    for argv in CLI_CASES:
        with pytest.raises(SystemExit) as info:
            check_command_line("train", argv)
        assert info.value.code == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    check_command_line("train", ["trainer.epochs=3", "-m", "optimizer.lr=0.1,0.01"])
    check_command_line("train", ["--help"])  # flags are Hydra's business
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------- evaluate / predict config


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Bare state_dicts (tutorial style) for the weights= route."""
    from models.linear_regression import LinearRegressionModel
    from models.quadratic import QuadraticModel
    from models.small_cnn import SmallCNN

    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for name, model in (
        ("linear", LinearRegressionModel(1)),
        ("quadratic", QuadraticModel(2)),
        ("cnn", SmallCNN(1, 8, 10)),
    ):
        torch.save(model.state_dict(), folder / f"{name}.pth")
        out[name] = folder / f"{name}.pth"
    return out


def _evaluate_cases(root: Path, tmp: Path) -> list[tuple[list[str], list[str]]]:
    best = root / "lin" / "best.pt"
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    return [
        ([f"ckpt={best}", "split=bogus"], ["split='bogus'", "train, val or test"]),
        ([f"ckpt={best}", "batch_size=0"], ["batch_size=0", ">= 1"]),
        ([f"ckpt={best}", "device=gpu"], ["device='gpu'"]),
        ([f"ckpt={best}", "strict=maybe"], ["strict='maybe'", "true or false"]),
        ([f"ckpt={best}", f"output={tmp}"], [f"output={tmp}", "folder"]),
        ([], ["exactly one of ckpt=PATH"]),
        ([f"ckpt={best}", f"weights={best}"], ["exactly one of"]),
        ([f"weights={best}"], ["model=", "data="]),
        ([f"ckpt={tmp / 'missing.pt'}"], ["missing.pt", "not found"]),
        ([f"ckpt={garbage}"], ["garbage.pt", "not a readable checkpoint"]),
        ([f"ckpt={tmp}"], [str(tmp), "export folder"]),
        ([f"ckpt={best}", "data=quadratic_csv", f"data.path={tmp / 'none.csv'}"], ["none.csv", "not found"]),
        (
            [f"ckpt={best}", "data=mnist", f"data.root={tmp / 'nowhere'}"],
            ["data.root=", "nowhere", "MNIST", "data.download=true"],
        ),
    ]


def test_bad_evaluate_config(root, tmp_path):
    before = snapshot(root)
    for overrides, needles in _evaluate_cases(root, tmp_path):
        raises_user_error(
            lambda o=overrides: evaluate_script.evaluate(compose_checked("evaluate", o)), needles=tuple(needles)
        )  # types: while composing
    assert snapshot(root) == before


def _predict_cases(best: Path, tmp: Path) -> list[tuple[list[str], list[str]]]:
    points = tmp / "points.csv"
    points.write_text("x\n1\n")
    out = tmp / "out.csv"
    return [
        ([f"ckpt={best}"], ["input", "required"]),
        ([f"ckpt={best}", f"input={tmp / 'none.csv'}", f"output={out}"], ["none.csv", "no such file"]),
        ([f"ckpt={best}", f"input={points}", f"output={tmp / 'out.txt'}"], ["out.txt", ".csv"]),
        ([f"ckpt={best}", f"input={points}", f"output={tmp}"], ["folder"]),
        ([f"ckpt={best}", f"input={points}", f"output={out}", "batch_size=0"], ["batch_size=0"]),
        ([f"ckpt={best}", f"input={points}", f"output={out}", "batch_size=null"], ["batch_size=None"]),
    ]


def test_bad_predict_config(root, tmp_path):
    out = tmp_path / "out.csv"
    for overrides, needles in _predict_cases(root / "lin" / "best.pt", tmp_path):
        raises_user_error(
            lambda o=overrides: predict_script.predict(compose_checked("predict", o)), needles=tuple(needles)
        )  # types: while composing
    assert not out.exists()


# ------------------------------------------------------------------------------ CSV data

CSV_CASES = {
    "empty": ("", ["empty"]),
    "blank_lines": ("\n\n\n", ["empty"]),
    "header_only": ("x,y\n", ["header but no data rows"]),
    "missing_column": ("x,z\n1,2\n", ["missing column(s) ['y']", "found ['x', 'z']"]),
    "text_value": ("x,y\n1,2\n3,abc\n", ["data row 2 (line 3)", "column 'y'", "'abc'"]),
    "nan_value": ("x,y\n1,2\nnan,3\n", ["data row 2 (line 3)", "column 'x'", "'nan'"]),
    "empty_cell": ("x,y\n1,2\n,3\n", ["data row 2", "column 'x'", "empty cell"]),
    "inf_value": ("x,y\n1,inf\n", ["data row 1", "column 'y'", "'inf'", "finite"]),
    "short_row": ("x,y\n1,2\n3\n", ["data row 2", "column 'y'", "short row"]),
    "long_row": ("x,y\n1,2\n3,4,5\n", ["not a well-formed CSV", "line 3"]),
    "blank_line_inside": ("x,y\n1,2\n\n3,4\nq,5\n", ["data row 3 (line 5)", "'q'"]),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00", ["not a text CSV"]),
    "folder": (None, ["is not a file"]),
    "missing": (False, ["CSV file not found", "['x', 'y']"]),
}


@pytest.mark.parametrize("name", sorted(CSV_CASES))
def test_bad_csv_for_training(root, tmp_path, name):
    content, needles = CSV_CASES[name]
    path = tmp_path / f"{name}.csv"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not False:
        path.write_text(content)
    cfg = compose(
        "train",
        [
            f"checkpoint.root={root}",
            f"run_name=csv_{name}",
            "experiment=quadratic_csv",
            f"data.path={path}",
            "trainer.epochs=1",
        ],
    )
    raises_user_error(train_script.train, cfg, needles=(str(path), *needles))
    assert not list((root / f"csv_{name}").glob("*.pt"))


PREDICT_CSV_CASES = {
    "x1,x2\n1,2\n": ["missing column(s) ['x']", "found ['x1', 'x2']"],
    "x\n1\n2\nabc\n": ["data row 3", "column 'x'", "'abc'"],
    "x\n": ["header but no data rows"],
}


def test_predict_csv_inputs(tmp_path, weights):
    """Missing feature column, bad value, wrong feature count: error naming the file;
    an existing output is left as it was (never a partial CSV)."""
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")
    base = [f"weights={weights['linear']}", "model=linear_regression", "data=linear", f"output={out}"]
    for index, (text, needles) in enumerate(PREDICT_CSV_CASES.items()):
        path = tmp_path / f"in{index}.csv"
        path.write_text(text)
        cfg = compose("predict", [*base, f"input={path}"])
        raises_user_error(predict_script.predict, cfg, needles=(path.name, *needles))
    # Model with 2 inputs, data giving 1 feature per row.
    path = tmp_path / "one_feature.csv"
    path.write_text("x\n1\n2\n")
    cfg = compose(
        "predict",
        [
            f"weights={weights['quadratic']}",
            "model=quadratic",
            "data=linear",
            "model.in_features=2",
            f"input={path}",
            f"output={out}",
        ],
    )
    raises_user_error(predict_script.predict, cfg, needles=(f"input={path}", "1 feature(s)", "expects 2"))
    assert out.read_text() == "previous results\n"
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- images


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = {
        "RGB": (200, 10, 10),
        "RGBA": (0, 0, 200, 128),
        "L": 128,
        "I;16": 30000,
        "P": 3,
        "1": 1,
        "CMYK": (0, 50, 50, 0),
    }[mode]
    suffix = ".tif" if mode in ("I;16", "CMYK") else ".png"
    path = path.with_suffix(suffix)
    Image.new(mode, size, color).save(path)
    return path


def _noise_png(path: Path, cut: float) -> Path:
    """A 64x64 noise PNG (a large compressed body) cut to `cut` of its bytes."""
    from PIL import Image

    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    return path


def _image_folder(root: Path, per_class: int = 4) -> Path:
    for label in ("cat", "dog"):
        for index in range(per_class):
            _image(root / label / f"{index}.png")
    return root


def _image_cfg(root: Path, data_root: Path, *extra: str):
    return compose(
        "train",
        [
            f"checkpoint.root={root}",
            f"run_name=img_{data_root.name}",
            "data=image_folder",
            "model=small_cnn",
            "loss=cross_entropy",
            f"data.root={data_root}",
            "data.num_classes=2",
            "data.image_size=8",
            "data.num_workers=0",
            "trainer.epochs=1",
            "data.batch_size=2",
            *extra,
        ],
    )


def _image_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str], list[str]]]:
    """Broken image-folder data sets: name -> (data.root, extra overrides, needles)."""
    cases = {}
    folder = _image_folder(tmp_path / "empty_class")
    (folder / "zebra").mkdir()
    cases["empty_class"] = (folder, [], ["class folder(s) ['zebra'] have no images"])
    folder = _image_folder(tmp_path / "text_as_png")
    (folder / "dog" / "notes.png").write_text("not an image")
    cases["text_as_png"] = (folder, [], ["notes.png", "not a readable image"])
    folder = _image_folder(tmp_path / "empty_file")
    (folder / "cat" / "zero.jpg").write_bytes(b"")
    cases["empty_file"] = (folder, [], ["zero.jpg", "not a readable image"])
    folder = tmp_path / "no_classes"
    _image(folder / "a.png")
    cases["no_classes"] = (folder, [], ["no class folders"])
    cases["missing_root"] = (tmp_path / "nowhere", [], ["data.root=", "folder not found"])
    folder = _image_folder(tmp_path / "channels")
    cases["four_channels"] = (folder, ["data.in_channels=4"], ["data.in_channels=4", "1 (grayscale) or 3 (RGB)"])
    cases["mean_length"] = (folder, ["data.mean=[0.5]"], ["data.mean=[0.5]", "3 value(s)"])
    cases["class_count"] = (folder, ["data.num_classes=3"], ["data.num_classes=3", "2 class folders"])
    folder = _image_folder(tmp_path / "truncated")
    _noise_png(folder / "dog" / "cut.png", cut=0.6)  # header fine, pixel data cut
    cases["truncated"] = (folder, [], ["cut.png", "corrupt or unreadable image"])
    return cases


def test_image_folder_errors(root, tmp_path):
    for name, (data_root, extra, needles) in _image_cases(tmp_path).items():
        cfg = _image_cfg(root, data_root, *extra)
        raises_user_error(train_script.train, cfg, needles=tuple(needles))
        assert not list((root / f"img_{data_root.name}").glob("*.pt")), name


def test_images_of_other_channel_counts_and_sizes_are_converted(root, tmp_path):
    """Grayscale, RGBA, palette, 16-bit, CMYK and odd sizes train a 3-channel 8x8 model."""
    folder = tmp_path / "mixed"
    for label, modes in (("a", ["L", "RGBA", "P", "RGB"]), ("b", ["I;16", "1", "CMYK", "RGB"])):
        for index, mode in enumerate(modes):
            _image(folder / label / f"{index}", mode, size=(5 + index * 7, 9 + index))
    final = train_script.train(_image_cfg(root, folder))
    assert final["epoch"] == 1


def test_dataloader_worker_errors_stay_one_line():
    """With num_workers > 0 torch re-raises a worker's UserError with the whole traceback
    as its message; the CLI prints only the original line."""
    from torch.utils.data import DataLoader, Dataset

    from engine.errors import one_line

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise UserError("data/cat/bad.png: corrupt or unreadable image (OSError)")

    with pytest.raises(UserError) as info:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "\n" in str(info.value)  # what torch does
    assert one_line(info.value) == "data/cat/bad.png: corrupt or unreadable image (OSError)"


def _predict_image_cases(folder: Path, tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """Inputs that stop a prediction: name -> (input, needles); the first adds a corrupt
    image to `folder`."""
    cases = {}
    corrupt = _noise_png(folder / "zz_corrupt.png", cut=0.6)
    cases["corrupt"] = (folder, [corrupt.name, "corrupt or unreadable"])
    other = tmp_path / "dangling"
    other.mkdir()
    _image(other / "fine")
    (other / "link.png").symlink_to(tmp_path / "does_not_exist.png")
    cases["dangling_link"] = (other, ["link.png", "not a readable image file"])
    csv_input = tmp_path / "points.csv"
    csv_input.write_text("x\n1\n")
    cases["csv_to_image_model"] = (csv_input, ["points.csv", "not an image"])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty_folder"] = (empty, [str(empty), "no image files"])
    return cases


def test_predict_images(tmp_path, weights, capsys):
    """Other sizes and channel counts are converted (all predicted); a bad file stops the
    whole batch with its name and the existing output is untouched."""
    folder = tmp_path / "inputs"
    files = [
        _image(folder / "big_rgb", "RGB", (30, 20)),
        _image(folder / "rgba", "RGBA"),
        _image(folder / "gray", "L", (8, 8)),
        _image(folder / "deep", "I;16", (5, 5)),
        _image(folder / "palette", "P", (64, 64)),
    ]
    (folder / "README.txt").write_text("my digits")
    out = tmp_path / "preds.csv"
    base = [f"weights={weights['cnn']}", "model=small_cnn", "data=digits", f"output={out}"]
    predict_script.predict(compose("predict", [*base, f"input={folder}"]))
    rows = out.read_text().splitlines()
    assert rows[0] == "input,class,probability" and len(rows) == 1 + len(files)
    assert "README.txt" in capsys.readouterr().err  # said, not silently dropped
    before = out.read_bytes()
    for name, (source, needles) in _predict_image_cases(folder, tmp_path).items():
        cfg = compose("predict", [*base, f"input={source}"])
        raises_user_error(predict_script.predict, cfg, needles=tuple(needles))
        assert out.read_bytes() == before, name


# ------------------------------------------------------------------- exit codes


def test_exit_codes_in_process(root, tmp_path, capsys, monkeypatch):
    """cli_errors: 2 for bad input (one line), 3 for a stop with a checkpoint, 130 for
    Ctrl-C outside the loop; debug=true adds the traceback; other errors propagate."""
    cfg = compose("train", [f"checkpoint.root={root}", "run_name=lin", "trainer.epochs=0"])
    with pytest.raises(SystemExit) as info:
        cli_errors(train_script.train)(cfg)
    assert info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == "error: trainer.epochs=0: expected an integer >= 1\n"

    cfg = compose("train", [f"checkpoint.root={root}", "run_name=lin", "trainer.epochs=0", "debug=true"])
    with pytest.raises(SystemExit) as info:
        cli_errors(train_script.train)(cfg)
    assert info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("expected an integer >= 1")

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    cfg = compose("train", [f"checkpoint.root={root}", "run_name=lin", "trainer.epochs=0"])
    with pytest.raises(SystemExit) as info:
        cli_errors(train_script.train)(cfg)
    assert info.value.code == EXIT_BAD_INPUT and "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("HYDRA_FULL_ERROR")

    cfg = compose(
        "train", [f"checkpoint.root={tmp_path}", "run_name=stopped", "trainer.max_time=0.000001", "trainer.epochs=3"]
    )
    with pytest.raises(SystemExit) as info:
        cli_errors(train_script.train)(cfg)
    assert info.value.code == EXIT_INTERRUPTED
    assert "resume=auto" in capsys.readouterr().err
    assert list((tmp_path / "stopped").glob("step_*.pt"))

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        cli_errors(ctrl_c)(cfg)
    assert info.value.code == EXIT_ABORTED

    def bug(cfg):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # Hydra prints it with a traceback, exit 1
        cli_errors(bug)(cfg)


def test_cli_bad_inputs_subprocess(root):
    """The real scripts: exit 2, exactly one line on stderr, no traceback, files intact."""
    before = snapshot(root)
    for script, args, needles in (
        ("train.py", ["trainer.epoch=5", f"checkpoint.root={root}"], ["trainer.epoch=5", "valid keys: epochs"]),
        (
            "train.py",
            ["run_name=lin", f"checkpoint.root={root}"],  # found inside train()
            ["already has checkpoints", "resume=auto"],
        ),
        ("predict.py", [f"ckpt={root / 'lin' / 'best.pt'}", "inptu=x.csv"], ["inptu=x.csv", "did you mean 'input'"]),
    ):
        result = run_script(script, *args, check=False)
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        for needle in needles:
            assert needle in lines[0]
        assert "Traceback" not in result.stderr
    assert snapshot(root) == before


def test_cli_internal_error_subprocess(root):
    """A bug (not bad input): Hydra prints the traceback and the exit code is 1. (debug=true
    on bad input is tested in-process above: traceback, then the line, exit 2.)"""
    code = (
        "import runpy, sys, engine.config;"
        "engine.config.build = lambda *a, **k: 1 / 0;"  # a bug inside train()
        f"sys.argv = ['train.py', 'checkpoint.root={root}', 'run_name=bug'];"
        "runpy.run_path('train.py', run_name='__main__')"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr


# --------------------------------------------------------------------------- the tally


def test_at_least_100_distinct_bad_inputs_are_checked(tmp_path):
    """Counted from the case tables the tests above run (no test needs another's result)."""
    (tmp_path / "inputs").mkdir()
    counts = {
        "train config": len({tuple(o) for o, _ in TRAIN_CASES}) + 2,  # + root=FILE, other arch
        "override": len({(c, *o) for c, o, _ in COMPOSE_CASES}),
        "command line": len({tuple(a) for a in CLI_CASES}),
        "evaluate": len(_evaluate_cases(tmp_path / "root", tmp_path)),
        "predict": len(_predict_cases(tmp_path / "best.pt", tmp_path)),
        "csv": len(CSV_CASES),
        "predict csv": len(PREDICT_CSV_CASES) + 1,  # + the feature count
        "images": len(_image_cases(tmp_path / "images")),
        "predict images": len(_predict_image_cases(tmp_path / "inputs", tmp_path)),
    }
    print(f"bad-input cases: {sum(counts.values())} {counts}")
    assert sum(counts.values()) >= 100, counts
