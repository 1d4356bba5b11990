"""Loading never runs code; exports work without the training code's classes; weights of
another architecture are refused with the keys named (or loaded partly with strict=false)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import compose, run_script
from helpers import raises_user_error, snapshot, write_malicious

import evaluate as evaluate_script
import predict as predict_script
import train as train_script

# ------------------------------------------------------------------ malicious pickles


def test_malicious_pickle_is_refused_everywhere_and_never_runs(trained_run, tmp_path, points):
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "evil.pt", marker)
    legacy = write_malicious(tmp_path / "evil_legacy.pt", marker, legacy=True)
    shell = write_malicious(tmp_path / "evil_shell.pt", marker, shell=True)
    before = snapshot(trained_run)
    for path in (evil, legacy, shell):
        needles = (path.name, "refused")
        cfg = compose(
            "train", [f"checkpoint.root={tmp_path}", "run_name=resumed", f"resume={path}", "trainer.epochs=3"]
        )
        raises_user_error(train_script.train, cfg, needles=needles)
        cfg = compose("evaluate", [f"ckpt={path}"])
        raises_user_error(evaluate_script.evaluate, cfg, needles=needles)
        cfg = compose("evaluate", [f"weights={path}", "model=linear_regression", "data=linear"])
        raises_user_error(evaluate_script.evaluate, cfg, needles=needles)
        cfg = compose("predict", [f"ckpt={path}", f"input={points}", f"output={tmp_path / 'p.csv'}"])
        raises_user_error(predict_script.predict, cfg, needles=needles)
        cfg = compose(
            "predict",
            [
                f"weights={path}",
                "model=linear_regression",
                "data=linear",
                f"input={points}",
                f"output={tmp_path / 'p.csv'}",
            ],
        )
        raises_user_error(predict_script.predict, cfg, needles=needles)
    # Pretrained weights imported by a model config (VGG16's model.weights=PATH).
    cfg = compose(
        "train",
        [
            f"checkpoint.root={tmp_path}",
            "run_name=vgg",
            "model=vgg16",
            "data=digits",
            "loss=cross_entropy",
            f"model.weights={evil}",
        ],
    )
    raises_user_error(train_script.train, cfg, needles=(evil.name, "refused"))
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists()
    assert snapshot(trained_run) == before
    # The payload is live: plain pickle loading would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_file_in_a_run_is_set_aside_by_resume_auto(trained_run, tmp_path):
    root = tmp_path / "root"
    (root / "lin").mkdir(parents=True)
    for name in ("epoch_0001.pt", "epoch_0002.pt"):
        (root / "lin" / name).write_bytes((trained_run / name).read_bytes())
    marker = tmp_path / "MARKER"
    write_malicious(root / "lin" / "epoch_0009.pt", marker)
    cfg = compose(
        "train",
        [f"checkpoint.root={root}", "run_name=lin", "resume=auto", "trainer.epochs=3", "checkpoint.every_n_epochs=1"],
    )
    with pytest.warns(UserWarning, match="epoch_0009.pt"):
        train_script.train(cfg)
    assert not marker.exists()
    assert (root / "lin" / "epoch_0009.pt.corrupt").exists()
    assert (root / "lin" / "epoch_0003.pt").exists()  # resumed from epoch 2


def test_malicious_target_in_a_saved_config_is_refused(trained_run, tmp_path, points):
    """A weights-only file can still name `_target_: os.system` in its config; building
    the model from it must not call that."""
    marker = tmp_path / "MARKER"
    state = torch.load(trained_run / "best.pt", weights_only=True)
    bad_targets = [
        {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        {"_target_": "pathlib.Path.touch", "self": str(marker)},
        {"_target_": "engine.checkpoint.os.system", "command": f"touch {marker}"},
        {"_target_": "data.base.torch.save", "obj": 1, "f": str(marker)},
        {"_target_": "data.make_quadratic_csv.make_frame"},  # project code, not a module
    ]
    for index, target in enumerate(bad_targets):
        for section in ("model", "data", "loss"):
            tampered = json.loads(json.dumps(state["config"]))
            tampered[section] = target if section != "data" else {**tampered["data"], "nested": target}
            path = tmp_path / f"tampered_{index}_{section}.pt"
            torch.save({**state, "config": tampered}, path)
            cfg = compose("evaluate", [f"ckpt={path}"])
            raises_user_error(evaluate_script.evaluate, cfg, needles=(path.name, "refused"))
    # The same in an export's config.yaml.
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes((trained_run / "export" / "model.safetensors").read_bytes())
    saved = yaml.safe_load((trained_run / "export" / "config.yaml").read_text())
    (export / "config.yaml").write_text(yaml.safe_dump({**saved, "model": bad_targets[0]}))
    cfg = compose("predict", [f"ckpt={export}", f"input={points}", f"output={tmp_path / 'p.csv'}"])
    raises_user_error(predict_script.predict, cfg, needles=("export", "refused"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ export


def test_end_of_training_export_is_self_describing(trained_run):
    """model.safetensors + config.yaml: loadable with safetensors + yaml + instantiate, no
    torch.load and no class written by the user; the same weights as best.pt."""
    from hydra.utils import instantiate
    from safetensors import safe_open
    from safetensors.torch import load_file

    export = trained_run / "export"
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert {"model", "data"} <= set(config)
    model = instantiate(config["model"])
    model.load_state_dict(load_file(str(export / "model.safetensors")))
    best = torch.load(trained_run / "best.pt", weights_only=True)["model_state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key])
    with safe_open(str(export / "model.safetensors"), "pt") as weights:
        assert json.loads(weights.metadata()["config"]) == config


def test_evaluate_and_predict_accept_an_export(trained_run, tmp_path, points):
    from_ckpt = evaluate_script.evaluate(
        compose("evaluate", [f"ckpt={trained_run / 'best.pt'}", f"output={tmp_path / 'a.json'}"])
    )
    from_export = evaluate_script.evaluate(
        compose("evaluate", [f"ckpt={trained_run / 'export'}", f"output={tmp_path / 'b.json'}"])
    )
    assert from_ckpt["test_loss"] == from_export["test_loss"]
    outputs = []
    export = trained_run / "export"
    for source in (trained_run / "best.pt", export, export / "model.safetensors"):
        out = tmp_path / f"{source.name}.csv"
        predict_script.predict(compose("predict", [f"ckpt={source}", f"input={points}", f"output={out}"]))
        outputs.append([line.split(",")[1:] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0]) == 4  # header + 3 points


def test_export_of_any_checkpoint(trained_run, tmp_path):
    """`python -m engine.export CKPT [OUT]`'s function: default folder next to the file."""
    from engine.checkpoint import load_export
    from engine.export import export_checkpoint

    out = export_checkpoint(trained_run / "epoch_0001.pt")
    assert out == trained_run / "epoch_0001"
    config, state = load_export(out)
    saved = torch.load(trained_run / "epoch_0001.pt", weights_only=True)
    assert config["model"] == saved["config"]["model"]
    assert all(torch.equal(state[k], v) for k, v in saved["model_state_dict"].items())


def test_folder_that_is_not_an_export(tmp_path):
    cfg = compose("evaluate", [f"ckpt={tmp_path}"])
    raises_user_error(evaluate_script.evaluate, cfg, needles=(str(tmp_path), "model.safetensors"))


# ---------------------------------------------------------------- architecture mismatch


def test_weights_of_another_architecture(trained_run, tmp_path):
    """linear_regression's keys (weights, bias) into quadratic (layer.weight, layer.bias):
    every key is named; small_cnn with other num_classes: the shapes are named."""
    weights = tmp_path / "model_weights.pth"
    torch.save(torch.load(trained_run / "best.pt", weights_only=True)["model_state_dict"], weights)
    cfg = compose("evaluate", [f"weights={weights}", "model=quadratic", "data=quadratic_csv"])
    message = raises_user_error(
        evaluate_script.evaluate,
        cfg,
        needles=(
            weights.name,
            "missing keys",
            "layer.weight",
            "layer.bias",
            "unexpected keys",
            "[weights, bias]",
            "strict=false",
        ),
    )
    assert "shape" not in message

    from models.small_cnn import SmallCNN

    cnn = tmp_path / "cnn.pth"
    torch.save(SmallCNN(1, 8, 5).state_dict(), cnn)
    cfg = compose("evaluate", [f"weights={cnn}", "model=small_cnn", "data=digits"])
    raises_user_error(
        evaluate_script.evaluate,
        cfg,
        needles=("shape mismatch", "fc3.weight (5, 84) vs model (10, 84)", "fc3.bias (5,) vs model (10,)"),
    )


def test_strict_false_loads_what_matches_and_reports_the_rest(tmp_path, capsys):
    from models.small_cnn import SmallCNN

    source = SmallCNN(1, 8, 5)
    cnn = tmp_path / "cnn.pth"
    torch.save(source.state_dict(), cnn)
    metrics = evaluate_script.evaluate(
        compose(
            "evaluate",
            [f"weights={cnn}", "model=small_cnn", "data=digits", "strict=false", f"output={tmp_path / 'm.json'}"],
        )
    )
    assert 0 <= metrics["test_acc"] <= 1
    err = capsys.readouterr().err
    assert "strict=false loaded 8 of 10 tensors" in err and "fc3.weight" in err

    from engine.checkpoint import load_state_dict_file

    target = SmallCNN(1, 8, 10)
    problems = load_state_dict_file(target, cnn, strict=False)
    assert problems == ["shape mismatch [fc3.weight (5, 84) vs model (10, 84), fc3.bias (5,) vs model (10,)]"]
    for key in ("conv1.weight", "conv2.bias", "fc1.weight", "fc2.bias"):
        assert torch.equal(target.state_dict()[key], source.state_dict()[key])


# ---------------------------------------------------------------------- subprocess


def test_cli_refuses_malicious_checkpoint_with_exit_2(tmp_path):
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "evil.pt", marker)
    result = run_script("evaluate.py", f"ckpt={evil}", check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "evil.pt" in lines[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
