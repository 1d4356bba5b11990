"""Choosing data=/model= without experiment= gives settings and a run name from what was
chosen; the default experiment's settings apply only when nothing was chosen."""

from __future__ import annotations

import pytest
from conftest import compose, run_script


@pytest.mark.parametrize(
    "data,model,name,epochs,lr,loss",
    [
        ("mnist", "small_cnn", "mnist_small_cnn", 15, 0.05, "torch.nn.CrossEntropyLoss"),
        ("fashion_mnist", "small_cnn", "fashion_mnist_small_cnn", 15, 0.05, "torch.nn.CrossEntropyLoss"),
        ("quadratic_csv", "quadratic", "quadratic_csv_quadratic", 40, 0.1, "torch.nn.MSELoss"),
        (
            "image_folder",
            "small_cnn",
            "image_folder_small_cnn",
            100,
            0.01,
            "torch.nn.CrossEntropyLoss",
        ),  # no preset for the pair: train.yaml's own settings
    ],
)
def test_chosen_data_and_model_set_the_name_loss_and_settings(data, model, name, epochs, lr, loss):
    cfg = compose("train", [f"data={data}", f"model={model}"])
    assert (cfg.name, cfg.trainer.epochs, cfg.optimizer.lr, cfg.loss._target_) == (name, epochs, lr, loss)
    assert cfg.name != "linear_regression" and cfg.trainer.epochs != 300


def test_explicit_choices_win_over_presets():
    cfg = compose(
        "train", ["data=mnist", "model=small_cnn", "loss=mse", "trainer.epochs=3", "optimizer.lr=0.2", "name=mine"]
    )
    assert (cfg.name, cfg.trainer.epochs, cfg.optimizer.lr, cfg.loss._target_) == ("mine", 3, 0.2, "torch.nn.MSELoss")
    cfg = compose("train", ["experiment=digits_cnn", "model=small_cnn"])
    assert cfg.name == "digits_cnn"  # an experiment names its runs
    default = compose("train", ["loss=mse"])  # nothing else chosen: still the tutorial's run
    assert (default.name, default.trainer.epochs, default.loss._target_) == (
        "linear_regression",
        300,
        "torch.nn.MSELoss",
    )


def test_a_run_from_choices_alone_trains_under_their_name(tmp_path):
    result = run_script(
        "train.py", "model=small_cnn", "data=digits", "trainer.epochs=1", "trainer.device=cpu", root=tmp_path
    )
    run = tmp_path / "digits_small_cnn"
    assert (run / "epoch_0001.pt").is_file() and "val_acc" in result.stdout
    assert not (tmp_path / "linear_regression").exists()
    assert "lr: 0.05" in (run / "config.yaml").read_text()
