"""The tutorials' own files, used with the project (issue 9, items 1-7).

Each test writes its files the way a tutorial in ../shared/seeds does (their class names,
key names, file names, a tensor `loss`), then runs train.py / evaluate.py / predict.py on
them as a user would, in a subprocess."""

from __future__ import annotations

import copy
import csv
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the tutorial's spelling
import yaml
from conftest import compose, run_script
from helpers import raises_user_error
from omegaconf import OmegaConf
from torch import nn, optim

import evaluate as evaluate_script
import predict as predict_script
import train as train_script
from engine.config import build
from engine.metrics import load_for_inference

# ------------------------------------------------------------------ the tutorials' models


class Net(nn.Module):  # tutorial 000
    def __init__(self):
        super(Net, self).__init__()  # noqa: UP008 - the tutorial's code
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = self.fc(x)
        return x


class CustomModel(nn.Module):  # tutorial 002: Linear(2, 1) on [x^2, x]
    def __init__(self):
        super(CustomModel, self).__init__()  # noqa: UP008
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        x = self.layer(x)
        return x


class LinearRegressionModel(nn.Module):  # tutorial 003
    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, requires_grad=True, dtype=torch.float))
        self.bias = nn.Parameter(torch.randn(1, requires_grad=True, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x + self.bias


class TheModelClass(nn.Module):  # tutorial 004 (3x32x32 images, 10 classes)
    def __init__(self, in_channels=3, padding=0, side=5, classes=10):
        super(TheModelClass, self).__init__()  # noqa: UP008
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=padding)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)
        self.side = side

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * self.side * self.side)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def digits_model(classes: int) -> TheModelClass:
    """Tutorial 004's class for the 8x8 digits (1 channel, padding 2: 2x2 maps at fc1)."""
    return TheModelClass(in_channels=1, padding=2, side=2, classes=classes)


def train_split(experiment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's own training split, so a tutorial loop sees the same data."""
    split = build(compose("train", [f"experiment={experiment}"]).data, "data").split("train")
    return split.x, split.y


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------- item 1: resume a general checkpoint


@pytest.mark.parametrize("style", ["recipe", "tutorial_002"])
@pytest.mark.slow
def test_resume_from_a_tutorial_general_checkpoint(tmp_path, style):
    """The tutorial trains, saves its general checkpoint, and continues one more epoch
    itself; train.py resumed from the file must reach the same weights (model and momentum
    restored), number the epoch right and say what it started fresh."""
    experiment, Model = (
        ("linear_regression", LinearRegressionModel) if style == "recipe" else ("quadratic_csv", CustomModel)
    )
    X_train, y_train = train_split(experiment)
    torch.manual_seed(3)
    model = Model()
    loss_fn = nn.L1Loss() if style == "recipe" else nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(5):  # noqa: B007 - saved below, as the tutorial does
        model.train()
        loss = loss_fn(model(X_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / ("g.pt" if style == "recipe" else "checkpoint-1.pt")
    if style == "recipe":
        torch.save(
            {
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": loss,
            },
            path,
        )
    else:
        torch.save(
            {
                "model": "CustomModel",
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "cost": loss,
                "description": "CustomModel 체크포인트-1",
            },
            path,
        )
    loss = loss_fn(model(X_train), y_train)  # the tutorial's own epoch 6 (index 5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    result = run_script(
        "train.py",
        f"experiment={experiment}",
        f"resume={path}",
        "run_name=tut",
        f"data.batch_size={len(X_train)}",
        "optimizer.lr=0.01",
        "optimizer.momentum=0.9",
        "trainer.epochs=6",
        "checkpoint.export=false",
        root=tmp_path / "ck",
    )
    assert (
        "its epoch 4 is read as the tutorials' 0-based loop index, so 5 epoch(s) are "
        "done and training goes on at epoch 6" in result.stdout
    )
    assert "not in the file, started fresh: global_step, rng_state, history, best, config" in result.stdout
    assert "differs" not in result.stderr and "applied config changes" not in result.stdout
    run = tmp_path / "ck" / "tut"
    assert [int(r["epoch"]) for r in read_csv(run / "metrics.csv")] == [6]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 6 and isinstance(last["loss"], float)
    theirs = [p.detach() for p in model.parameters()]
    ours = list(last["model_state_dict"].values())
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a.reshape(b.shape), b, atol=1e-6), (a, b)
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.01


@pytest.mark.slow
def test_failed_resume_of_a_tutorial_file_leaves_no_config(tmp_path):
    net = Net()  # tutorial 000's model: not the quadratic model's weights
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    torch.save(
        {
            "epoch": 9,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": torch.tensor(0.5),
        },
        tmp_path / "g.pt",
    )
    result = run_script(
        "train.py",
        "experiment=quadratic_csv",
        f"resume={tmp_path / 'g.pt'}",
        "run_name=x",
        root=tmp_path / "ck",
        check=False,
    )
    assert "layer.weight" in error_line(result)
    assert not (tmp_path / "ck" / "x" / "config.yaml").exists()


# ----------------------------------------------- item 2: the tutorials' parameter names


def test_tutorial_002_files_load_into_the_quadratic_model(tmp_path, points):
    model = CustomModel()
    torch.save(model.state_dict(), tmp_path / "model_state_dict.pt")
    torch.save(
        {
            "model": "CustomModel",
            "epoch": 999,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optim.SGD(model.parameters(), lr=1e-4).state_dict(),
            "cost": torch.tensor(0.08),
            "description": "CustomModel 체크포인트-1",
        },
        tmp_path / "checkpoint-1.pt",
    )
    x = torch.tensor([0.1, 0.5, 0.9]).unsqueeze(1)
    expected = model(torch.cat([x**2, x], 1)).squeeze(1)
    for name in ("model_state_dict.pt", "checkpoint-1.pt"):
        out = tmp_path / f"{name}.csv"
        args = [
            f"weights={tmp_path / name}",
            "model=quadratic",
            "data=quadratic_csv",
            f"input={points}",
            f"output={out}",
        ]
        if name == "checkpoint-1.pt":
            run_script("predict.py", *args)
        else:  # the same script in-process (saves a subprocess)
            predict_script.predict(compose("predict", args))
        got = torch.tensor([float(r["prediction"]) for r in read_csv(out)])
        assert torch.allclose(got, expected, atol=1e-5), (name, got, expected)


def test_tutorial_003_state_dict_loads_into_linear_regression(tmp_path, points):
    torch.manual_seed(42)
    model_0 = LinearRegressionModel()
    torch.save(obj=model_0.state_dict(), f=tmp_path / "01_pytorch_workflow_model_0.pth")
    out = tmp_path / "preds.csv"
    run_script(
        "predict.py",
        f"weights={tmp_path / '01_pytorch_workflow_model_0.pth'}",
        "model=linear_regression",
        "data=linear",
        f"input={points}",
        f"output={out}",
    )
    got = torch.tensor([float(r["prediction"]) for r in read_csv(out)])
    expected = model_0(torch.tensor([0.1, 0.5, 0.9])).detach()
    assert torch.allclose(got, expected, atol=1e-5)


def test_tutorial_004_the_model_class_loads_into_small_cnn(tmp_path):
    from models.small_cnn import SmallCNN

    model = TheModelClass()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    ours = SmallCNN(in_channels=3, image_size=32, num_classes=10)
    from engine.checkpoint import load_state_dict_file

    assert load_state_dict_file(ours, tmp_path / "model.pth") == []  # strict: every key
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(images), model(images), atol=1e-6)
    # and the project's scripts read it as it is (CIFAR-10 sizes; no dataset files needed)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    run_script(
        "predict.py",
        f"weights={tmp_path / 'model.pth'}",
        "model=small_cnn",
        "data=cifar10",
        f"input={tmp_path / 'red.png'}",
        f"output={tmp_path / 'p.csv'}",
    )
    assert len(read_csv(tmp_path / "p.csv")) == 1


# ------------------------------------------------------ items 3 and 4: warm start in train.py


def _perfect_line_model() -> LinearRegressionModel:
    model = LinearRegressionModel()
    with torch.no_grad():
        model.weights.fill_(0.7)
        model.bias.fill_(0.3)
    return model


@pytest.mark.parametrize(
    "kind", ["state_dict", *(pytest.param(kind, marks=pytest.mark.slow) for kind in ("general", "export", "multi"))]
)
def test_warm_start_from_initial_weights(tmp_path, kind):
    """weights=FILE starts a NEW run from the file's weights: with a near-zero lr the first
    epoch's loss is that of y = 0.7x + 0.3 exactly, not of a random model."""
    model = _perfect_line_model()
    args = []
    if kind == "state_dict":
        path = tmp_path / "model_weights.pth"
        torch.save(model.state_dict(), path)
    elif kind == "general":
        path = tmp_path / "g.pt"
        torch.save(
            {
                "epoch": 99,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optim.SGD(model.parameters(), lr=0.01).state_dict(),
                "loss": torch.tensor(0.0),
            },
            path,
        )
    elif kind == "export":
        from engine.export import export_checkpoint

        cfg = compose("train", [])
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        torch.save({"model_state_dict": model.state_dict(), "config": config}, tmp_path / "c.pt")
        path = export_checkpoint(tmp_path / "c.pt", tmp_path / "export")
    else:
        other = CustomModel()
        path = tmp_path / "multi.pt"
        torch.save(
            {
                "modelA_state_dict": model.state_dict(),
                "modelB_state_dict": other.state_dict(),
                "optimizerA_state_dict": optim.SGD(model.parameters(), lr=0.1).state_dict(),
                "optimizerB_state_dict": optim.SGD(other.parameters(), lr=0.1).state_dict(),
            },
            path,
        )
        args = ["weights_key=modelA_state_dict"]
    result = run_script(
        "train.py",
        f"weights={path}",
        *args,
        "run_name=warm",
        "trainer.epochs=1",
        "optimizer.lr=1e-9",
        "checkpoint.export=false",
        root=tmp_path / "ck",
    )
    assert f"initial weights from {path}" in result.stdout
    row = read_csv(tmp_path / "ck" / "warm" / "metrics.csv")
    assert [int(r["epoch"]) for r in row] == [1]
    assert float(row[0]["train_loss"]) < 1e-5 and float(row[0]["val_loss"]) < 1e-5
    best = torch.load(tmp_path / "ck" / "warm" / "best.pt", weights_only=True)
    assert torch.allclose(best["model_state_dict"]["weights"], torch.tensor([0.7]))


@pytest.mark.slow
def test_warm_start_strict_false_skips_a_new_head(tmp_path):
    """The tutorial's warm start: a 5-class model's weights into the 10-class digits CNN."""
    model_a = digits_model(classes=5)
    torch.save(model_a.state_dict(), tmp_path / "modelA.pt")
    weights = f"weights={tmp_path / 'modelA.pt'}"
    strict = run_script("train.py", "experiment=digits_cnn", weights, "run_name=s", root=tmp_path / "ck", check=False)
    assert "fc3.weight (5, 84) vs model (10, 84)" in error_line(strict)
    assert not (tmp_path / "ck" / "s").exists()

    result = run_script(
        "train.py",
        "experiment=digits_cnn",
        weights,
        "strict=false",
        "run_name=warm",
        "trainer.epochs=1",
        "optimizer.lr=1e-9",
        "checkpoint.export=false",
        root=tmp_path / "ck",
    )
    assert "strict=false loaded 8 of 10 tensors" in result.stderr
    assert "shape mismatch [fc3.weight (5, 84) vs model (10, 84)" in result.stderr
    best = torch.load(tmp_path / "ck" / "warm" / "best.pt", weights_only=True)
    for key in ("conv1.weight", "conv2.bias", "fc1.weight", "fc2.weight"):
        assert torch.allclose(best["model_state_dict"][key], model_a.state_dict()[key], atol=1e-6), key


@pytest.mark.slow
def test_several_models_in_one_file(tmp_path, points):
    """Tutorial 004's multi-model file: refused without weights_key (naming the models),
    each model picked by weights_key in all three scripts."""
    model_a, model_b = LinearRegressionModel(), CustomModel()
    optimizer_a = optim.SGD(model_a.parameters(), lr=0.01)
    optimizer_b = optim.SGD(model_b.parameters(), lr=0.01)
    path = tmp_path / "models.tar"
    torch.save(
        {
            "modelA_state_dict": model_a.state_dict(),
            "modelB_state_dict": model_b.state_dict(),
            "optimizerA_state_dict": optimizer_a.state_dict(),
            "optimizerB_state_dict": optimizer_b.state_dict(),
        },
        path,
    )
    listed = "['modelA_state_dict', 'modelB_state_dict']"
    line = error_line(run_script("train.py", f"weights={path}", "run_name=m", root=tmp_path / "ck", check=False))
    assert listed in line and "weights_key=" in line, line
    assert not (tmp_path / "ck" / "m").exists()
    for script, extra in ((evaluate_script.evaluate, []), (predict_script.predict, [f"input={points}"])):
        name = script.__module__
        raises_user_error(
            script,
            compose(name, [f"weights={path}", "model=linear_regression", "data=linear", *extra]),
            needles=(listed, "weights_key="),
        )

    out = tmp_path / "a.csv"
    run_script(
        "predict.py",
        f"weights={path}",
        "weights_key=modelA_state_dict",
        "model=linear_regression",
        "data=linear",
        f"input={points}",
        f"output={out}",
    )
    got = torch.tensor([float(r["prediction"]) for r in read_csv(out)])
    assert torch.allclose(got, model_a(torch.tensor([0.1, 0.5, 0.9])).detach(), atol=1e-5)
    metrics = evaluate_script.evaluate(
        compose(
            "evaluate",
            [
                f"weights={path}",
                "weights_key=modelB_state_dict",
                "model=quadratic",
                "data=quadratic_csv",
                f"output={tmp_path / 'b.json'}",
            ],
        )
    )
    assert metrics["samples"] > 0
    raises_user_error(
        evaluate_script.evaluate,
        compose(
            "evaluate", [f"weights={path}", "weights_key=modelC_state_dict", "model=quadratic", "data=quadratic_csv"]
        ),
        needles=("modelC_state_dict", listed),
    )


# ------------------------------------------------ item 5: strict=false that loads too little


def test_strict_false_loading_too_little_is_an_error(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "model_weights.pth")  # tutorial 000
    weights = f"weights={tmp_path / 'model_weights.pth'}"
    needles = ("only 0 of 2 tensors", "[layer.weight, layer.bias]", "[fc.weight, fc.bias]")
    line = error_line(
        run_script("evaluate.py", weights, "strict=false", "model=quadratic", "data=quadratic_csv", check=False)
    )
    assert all(n in line for n in needles), line
    raises_user_error(
        train_script.train,
        compose(
            "train",
            [weights, "strict=false", "experiment=quadratic_csv", "run_name=z", f"checkpoint.root={tmp_path / 'ck'}"],
        ),
        needles=needles,
    )
    assert not (tmp_path / "ck" / "z").exists()
    # 2 of the CNN's 10 tensors (conv1 only) fit: fewer than half, refused too
    conv1 = {k: v for k, v in digits_model(10).state_dict().items() if k.startswith("conv1")}
    torch.save(conv1, tmp_path / "conv1.pth")
    raises_user_error(
        evaluate_script.evaluate,
        compose("evaluate", [f"weights={tmp_path / 'conv1.pth'}", "strict=false", "model=small_cnn", "data=digits"]),
        needles=("only 2 of 10 tensors", "conv2.weight", "found [conv1.weight"),
    )


# -------------------------------------------------- item 6: whole models, and a safe one


def test_entire_model_pickle_is_refused_with_advice(tmp_path):
    model = Net()
    torch.save(model, tmp_path / "model.pth")  # tutorial 000's "save the entire model"
    path = tmp_path / "model.pth"
    needles = (
        "Net",
        "refused",
        "save model.state_dict() instead",
        "torch.save(torch.load(PATH, weights_only=False).state_dict()",
    )
    line = error_line(
        run_script("evaluate.py", f"weights={path}", "model=quadratic", "data=quadratic_csv", check=False)
    )
    assert all(n in line for n in needles), line
    for arg in (f"weights={path}", f"resume={path}"):
        raises_user_error(
            train_script.train,
            compose("train", [arg, "run_name=w", f"checkpoint.root={tmp_path / 'ck'}"]),
            needles=needles,
        )
    assert not (tmp_path / "ck" / "w").exists()


@pytest.fixture(scope="module")
def pt2_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pt2")
    run_script("train.py", "trainer.epochs=3", "checkpoint.export_pt2=true", "run_name=lin", root=root)
    return root / "lin"


def test_pt2_export_loads_with_torch_and_predicts_what_the_checkpoint_predicts(pt2_run):
    """checkpoint.export_pt2=true writes a deployment artifact: plain torch.export.load (of a file
    you trust) gives the checkpoint's predictions, the data config inside."""
    extra = {"config.json": ""}
    program = torch.export.load(pt2_run / "export" / "model.pt2", extra_files=extra)
    assert set(json.loads(extra["config.json"])) >= {"data", "loss"}
    cfg = OmegaConf.create({"ckpt": str(pt2_run / "best.pt"), "weights": None, "device": "cpu"})
    x = torch.rand(5, 1)  # any batch size
    with torch.no_grad():
        assert torch.allclose(program.module()(x), load_for_inference(cfg).model(x))


def _tampered(source: Path, out: Path, edit) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))
    return out


@pytest.mark.slow
def test_pt2_is_refused_without_being_read(pt2_run, tmp_path, points):
    """torch.export.load is not weights-only (it hands shape formulas to sympy, which calls eval,
    unpickles records and loads AOTInductor libraries): evaluate.py and predict.py (ckpt=, weights=)
    and train.py (weights=, resume=) refuse a .pt2 in one line, exit 2, never reading it; this
    one's formula would run code."""
    marker = tmp_path / "MARKER"

    def formula(name, data):
        if name.endswith("models/model.json"):
            code = f"__import__('os').system('touch {marker}') or Symbol("
            return data.replace(b'"expr_str": "Symbol(', f'"expr_str": "{code}'.encode())
        return data

    bad = _tampered(pt2_run / "export" / "model.pt2", tmp_path / "model.pt2", formula)
    with zipfile.ZipFile(bad) as archive:  # the payload is there: loading it would run it
        assert any(f"touch {marker}".encode() in archive.read(name) for name in archive.namelist())
    output = f"output={tmp_path / 'p.csv'}"
    for script, args in (
        ("predict.py", [f"ckpt={bad}", f"input={points}", output]),
        ("evaluate.py", [f"ckpt={bad}"]),
        ("predict.py", [f"weights={bad}", "model=linear_regression", "data=linear", f"input={points}", output]),
        ("train.py", [f"weights={bad}", "experiment=linear_regression", f"checkpoint.root={tmp_path}"]),
        ("train.py", [f"resume={bad}", "experiment=linear_regression", f"checkpoint.root={tmp_path}"]),
    ):
        line = error_line(run_script(script, *args, check=False))
        assert f"{bad}: a .pt2 program is not loaded here" in line and "torch.export.load" in line, line
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    cfg = OmegaConf.create({"ckpt": str(pt2_run / "export" / "model.pt2"), "weights": None, "device": "cpu"})
    raises_user_error(load_for_inference, cfg, needles=(f"its export folder ({pt2_run / 'export'})",))


def test_a_model_torch_export_cannot_trace_keeps_the_safetensors(pt2_run, tmp_path, capsys):
    from engine.export import export_checkpoint
    from models.linear_regression import LinearRegressionModel as Ours

    class Branchy(Ours):  # data-dependent control flow: torch.export refuses it
        def forward(self, x):
            return super().forward(x) if bool(x.sum() > 0) else -x

    out = export_checkpoint(pt2_run / "best.pt", tmp_path / "export", Branchy(), torch.rand(2, 1))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "torch.export failed" in warnings[0]
    assert (out / "model.safetensors").is_file() and not (out / "model.pt2").exists()


# -------------------------------------------- item 7: optimizer/scheduler overrides on resume


@pytest.mark.slow
def test_optimizer_override_on_resume_is_applied_and_recorded(tmp_path):
    common = [
        "run_name=o",
        "scheduler=step",
        "scheduler.step_size=2",
        "scheduler.gamma=0.5",
        "checkpoint.every_n_epochs=2",
        "checkpoint.export=false",
    ]
    run_script("train.py", *common, "trainer.epochs=4", root=tmp_path)
    result = run_script(
        "train.py",
        *common[:3],
        *common[4:],
        "resume=auto",
        "trainer.epochs=7",
        "optimizer.lr=0.04",
        "scheduler.gamma=0.1",
        "optimizer.momentum=0.5",
        root=tmp_path,
    )
    changed = [line for line in result.stdout.splitlines() if "applied config changes" in line]
    assert len(changed) == 1, result.stdout
    for part in ("optimizer.lr 0.01 -> 0.04", "optimizer.momentum 0.0 -> 0.5", "scheduler.gamma 0.5 -> 0.1"):
        assert part in changed[0]
    assert "differs" not in result.stderr
    run = tmp_path / "o"
    lrs = {int(r["epoch"]): float(r["lr"]) for r in read_csv(run / "metrics.csv")}
    # 4 epochs of StepLR(2, 0.5) scaled 0.01 to 0.0025; the new lr keeps that phase: 0.01,
    # then the new gamma 0.1 at the next step boundary
    assert lrs[4] == pytest.approx(0.005) and lrs[5] == pytest.approx(0.01)
    assert lrs[6] == pytest.approx(0.01) and lrs[7] == pytest.approx(0.001)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.04 and saved["scheduler"]["gamma"] == 0.1
    last = torch.load(run / "last.pt", weights_only=True)
    group = last["optimizer_state_dict"]["param_groups"][0]
    assert group["initial_lr"] == 0.04 and group["momentum"] == 0.5
    assert last["config"]["optimizer"]["lr"] == 0.04


@pytest.mark.slow
def test_lower_lr_and_continue(tmp_path):
    """The issue's case: `resume=auto optimizer.lr=0.04` after a run at 0.05."""
    run_script(
        "train.py", "run_name=l", "optimizer.lr=0.05", "trainer.epochs=2", "checkpoint.export=false", root=tmp_path
    )
    result = run_script(
        "train.py",
        "run_name=l",
        "resume=auto",
        "optimizer.lr=0.04",
        "trainer.epochs=3",
        "checkpoint.export=false",
        root=tmp_path,
    )
    assert "optimizer.lr 0.05 -> 0.04" in result.stdout
    rows = read_csv(tmp_path / "l" / "metrics.csv")
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05, 0.04]


def test_copy_of_tutorial_model_is_unchanged():
    """The tutorial classes above are the tutorials' (guards against editing them to fit)."""
    assert list(CustomModel().state_dict()) == ["layer.weight", "layer.bias"]
    assert list(LinearRegressionModel().state_dict()) == ["weights", "bias"]
    assert [tuple(v.shape) for v in TheModelClass().state_dict().values()][4] == (120, 400)
    assert copy.deepcopy(Net()).fc.out_features == 5
