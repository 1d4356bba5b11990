"""data.augment (issue 13): train split only, per-sample seeds from (seed, epoch, index), so
batches are the same across runs, workers and a mid-epoch resume."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, run_script
from helpers import write_cifar
from omegaconf import OmegaConf

from data.augment import AugmentedSplit, augmented_train_split, check_augment
from data.augment import compose as compose_transforms
from engine.batches import Batches
from engine.config import build, check_loaded_targets
from engine.errors import UserError
from train import train

CPU = torch.device("cpu")


@pytest.fixture
def digits():
    def _data(*overrides: str):
        cfg = compose("train", ["data=digits", "model=small_cnn", *overrides])
        check_augment(cfg.data)
        return build(cfg.data, "data")

    return _data


def _epoch(split, epoch: int, start: int = 0, **kw) -> list[torch.Tensor]:
    batches = Batches(split, 32, CPU, shuffle=True, seed=7, **kw)
    return [x for x, _ in batches(epoch, start=start)]


def test_augmentation_changes_train_batches_not_val(digits):
    plain, aug = digits(), digits("data/augment=digits")
    assert aug.augment and not plain.augment
    plain_train = _epoch(augmented_train_split(plain, 7), 1)
    aug_train = _epoch(augmented_train_split(aug, 7), 1)
    assert isinstance(augmented_train_split(aug, 7), AugmentedSplit)
    assert len(aug_train) == len(plain_train)
    changed = [not torch.equal(a, p) for a, p in zip(aug_train, plain_train, strict=True)]
    assert all(changed)
    assert all(a.shape == p.shape for a, p in zip(aug_train, plain_train, strict=True))
    for name in ("val", "test"):  # the other splits are the data module's own, untouched
        assert torch.equal(aug.split(name).x, plain.split(name).x)
        assert not isinstance(aug.split(name), AugmentedSplit)
    assert torch.equal(aug.split("train").x, plain.split("train").x)  # fingerprint sees these


def test_same_seed_and_epoch_same_batches_across_runs_workers_and_resume(digits):
    first = _epoch(augmented_train_split(digits("data/augment=digits"), 7), 3)
    state = torch.get_rng_state()
    again = _epoch(augmented_train_split(digits("data/augment=digits"), 7), 3)  # a new run
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    split = augmented_train_split(digits("data/augment=digits"), 7)
    torch.rand(5)  # a dropout draw between runs changes nothing
    for k in (1, 17, len(first) - 1):  # a resume at batch k sees the tail of the epoch
        tail = _epoch(split, 3, start=k)
        assert all(torch.equal(a, b) for a, b in zip(first[k:], tail, strict=True))
    workers = _epoch(split, 3, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first, workers, strict=True))
    other_epoch = _epoch(split, 4)
    assert not torch.equal(torch.cat(first).sort(0).values, torch.cat(other_epoch).sort(0).values)
    reseeded = _epoch(augmented_train_split(digits("data/augment=digits"), 8), 3)
    assert not all(torch.equal(a, b) for a, b in zip(first, reseeded, strict=True))


def test_cifar_preset_on_a_dataset_split_with_workers(tmp_path):
    write_cifar(tmp_path, n_train=8)  # 40 train images (36 after val_fraction), 32x32

    def data(*overrides: str):
        cfg = compose(
            "train",
            ["data=cifar10", f"data.root={tmp_path}", "model=small_cnn", "data.check_integrity=false", *overrides],
        )
        check_augment(cfg.data)
        return build(cfg.data, "data")

    aug = augmented_train_split(data("data/augment=cifar"), 7)
    plain = _epoch(augmented_train_split(data(), 7), 2)
    first = _epoch(aug, 2)
    assert [x.shape for x in first] == [x.shape for x in plain]
    assert first[0].shape[1:] == (3, 32, 32)
    assert not any(torch.equal(a, p) for a, p in zip(first, plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(aug, 2, num_workers=2), strict=True))
    assert torch.equal(first[1], _epoch(aug, 2, start=1)[0])


def test_a_sample_gets_its_own_draw_wherever_it_sits_in_the_epoch():
    x = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 1, 8, 8)
    from engine.batches import TensorSplit

    split = AugmentedSplit(
        TensorSplit(x, torch.arange(4)),
        compose_transforms([OmegaConf.create({"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"})]),
        seed=3,
    )
    split.set_epoch(5)
    views = [split[i][0] for i in (2, 0, 3, 2)]
    assert torch.equal(views[0], views[3])  # same (seed, epoch, index): same flip
    flips = {bool(torch.equal(split[i][0], x[i].flip(-1))) for i in range(4) for split.epoch in range(1, 9)}
    assert flips == {True, False}  # and the flip really is random across epochs/samples


@pytest.mark.parametrize(
    "entry,needles",
    [
        ("[{_target_:torchvision.transforms.v2.RandomFlipp}]", ["data.augment[0]", "cannot be"]),
        ("[{_target_:torch.nn.ReLU}]", ["data.augment[0]", "torchvision.transforms.v2"]),
        ("[{_target_:torchvision.transforms.v2.RandomCrop,sizee:4}]", ["data.augment[0]", "sizee"]),
        ("[{_target_:torchvision.transforms.v2.RandomCrop,size:[1,2,3]}]", ["data.augment[0]", "RandomCrop"]),
        ("[3]", ["data.augment[0]=3", "_target_"]),
        ("{a:1}", ["data.augment=", "list"]),
    ],
)
def test_bad_augment_entries_are_one_line_naming_data_augment(entry, needles):
    cfg = compose("train", ["data=digits", "model=small_cnn", "data/augment=none", f"data.augment={entry}"])
    with pytest.raises(UserError) as info:
        check_augment(cfg.data)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_transforms_that_cannot_take_the_images_fail_before_the_run(digits):
    data = digits("data/augment=none", "data.augment=[{_target_:torchvision.transforms.v2.RandomCrop,size:16}]")
    with pytest.raises(UserError, match=r"data.augment: .* shape \[1, 8, 8\]"):
        augmented_train_split(data, 7)


def test_bad_transform_name_on_the_command_line_exits_2_with_one_line(tmp_path):
    result = run_script(
        "train.py",
        "data=digits",
        "model=small_cnn",
        "data/augment=none",
        "data.augment=[{_target_:torchvision.transforms.v2.NoSuchFlip}]",
        root=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.augment[0]._target_" in lines[0] and "NoSuchFlip" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_augment_on_non_image_data_is_refused():
    cfg = compose(
        "train", ["data/augment=none", "data.augment=[{_target_:torchvision.transforms.v2.RandomHorizontalFlip}]"]
    )  # default: data=linear
    check_augment(cfg.data)
    with pytest.raises(
        UserError,
        match=r"data.augment: LinearData's train samples have "
        r"shape \[1\], not images",
    ):
        augmented_train_split(build(cfg.data, "data"), 7)


def test_saved_configs_may_name_v2_transforms_only():
    entry = {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 0.5}
    check_loaded_targets({"data": {"_target_": "data.digits.DigitsData", "augment": [entry]}}, "x.pt")
    for target in ("torchvision.transforms.v2.functional.hflip", "torchvision.io.read_file"):
        with pytest.raises(UserError, match="refused"):
            check_loaded_targets({"data": {"augment": [{"_target_": target}]}}, "x.pt")


def _state(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def test_digits_preset_trains_and_resumes_mid_epoch_bitwise(tmp_path, capsys):
    """40 steps an epoch: the step-50 checkpoint is mid epoch 2; resuming from it in a new
    folder must end bitwise equal to the uninterrupted run (same augmented batches)."""
    common = [
        "data=digits",
        "model=small_cnn",
        "data/augment=digits",
        "trainer.epochs=3",
        "checkpoint.every_n_steps=50",
        "checkpoint.keep_last=20",
        "trainer.device=cpu",
        f"checkpoint.root={tmp_path}",
    ]
    whole = train(compose("train", [*common, "run_name=whole"]))
    assert whole["val_acc"] > 0.5  # it learns with the preset on (chance: 0.1)
    mid = tmp_path / "whole/step_00000050.pt"
    assert torch.load(mid, weights_only=True)["step_in_epoch"] == 10
    train(compose("train", [*common, "run_name=split", f"resume={mid}"]))
    a, b = _state(tmp_path / "whole/last.pt"), _state(tmp_path / "split/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from evaluate import evaluate  # the saved config names v2 transforms: still loadable

    assert evaluate(compose("evaluate", [f"ckpt={tmp_path / 'whole/best.pt'}"]))["test_acc"] > 0.5
