"""Crafted checkpoints: files that pass weights_only but say hostile things (issue 11).

A seeded generator replaces each field of a real checkpoint (and fields inside it) by wrong
types, huge and stride-0 tensors, deep, cyclic or shared-reference ("billion laughs")
containers. Every case must end, on the resume path and on the evaluate path, in a normal
result or a one-line UserError, under a hang guard; the slowest case is printed (-s).
Retention is checked with foreign names planted in saved_files.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose, run_script, train_run
from helpers import assert_one_line, deadline
from omegaconf import OmegaConf

from engine.checkpoint import load_checkpoint
from engine.errors import UserError

SEED = 20261125
TIMES: list[tuple[float, str]] = []


@pytest.fixture(scope="module")
def original(trained_run) -> dict:
    return load_checkpoint(trained_run / "best.pt")


# --------------------------------------------------------------------------- the generator


def billion_laughs(depth: int) -> list:
    node: list = ["lol"]
    for _ in range(depth):
        node = [node, node]
    return node


def deep(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def cycle() -> list:
    node: list = [1]
    node.append(node)
    return node


def stride0(rng: random.Random) -> torch.Tensor:
    dtype = rng.choice([torch.float32, torch.float64, torch.int64, torch.uint8])
    return torch.zeros(1, dtype=dtype).expand(rng.randrange(2_000_000, 200_000_000))


HOSTILE = ("stride0", "laughs", "deep", "cycle")


def bad_value(kind: str, rng: random.Random):
    if kind == "stride0":
        return stride0(rng)
    if kind == "laughs":
        return {"a": billion_laughs(rng.randrange(24, 40))}
    if kind == "deep":
        return deep(rng.randrange(80, 300))
    if kind == "cycle":
        return cycle()
    return rng.choice(
        [
            None,
            "text",
            -5,
            1.5,
            True,
            10**30,
            float("nan"),
            [1, "x"],
            {"a": 1},
            torch.zeros(0),
            torch.zeros(3, 2),
            [],
            {},
        ]
    )


def inner_paths(value, prefix=()):
    """Paths to every value inside dicts/lists (a few levels), to mutate one of them."""
    out = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))[:4]
    else:
        return out
    for key, child in items:
        out.append((*prefix, key))
        if len(prefix) < 3:
            out.extend(inner_paths(child, (*prefix, key)))
    return out


def replaced(state, path, new):
    """A shallow-copied state with the value at `path` replaced (the original untouched)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(state) if isinstance(state, dict) else list(state)
    copy[head] = replaced(state[head], rest, new)
    return copy


def crafted_cases(original: dict, n: int):
    """(label, state, must_fail) triples: every top-level field with each hostile kind, then
    `n` seeded mutations of a random field or inner value."""
    rng = random.Random(SEED)
    base = {**original, "world_size": 1, "rank_states": None}
    keys = list(base)
    for key in keys:
        for kind in HOSTILE:
            yield f"{key}={kind}", replaced(base, (key,), bad_value(kind, rng)), True
    paths = [(k,) for k in keys] + [p for k in keys for p in [(k, *q) for q in inner_paths(base[k])]]
    for index in range(n):
        path = rng.choice(paths)
        kind = rng.choice([*HOSTILE, "wrong", "wrong", "wrong"])
        yield (
            f"#{index} {'/'.join(map(str, path))}={kind}",
            replaced(base, path, bad_value(kind, rng)),
            kind in HOSTILE,
        )


# ------------------------------------------------------------------ the two ways in, timed

_BUILT: dict = {}


def resume_path(path: Path, root: Path) -> None:
    """What train.py does with a checkpoint: load it, restore model/optimizer/RNG/progress,
    rewrite metrics.csv from its history."""
    from engine.checkpoint import restore_checkpoint
    from engine.config import build
    from engine.metrics import write_csv

    if not _BUILT:  # the config and data once; a fresh model and optimizer per case
        _BUILT["cfg"] = cfg = compose("train", [f"checkpoint.root={root}", "run_name=base"])
        _BUILT["data"] = build(cfg.data, "data")
    cfg, data = _BUILT["cfg"], _BUILT["data"]
    model = build(cfg.model, "model")
    optimizer = build(cfg.optimizer, "optimizer")(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = load_checkpoint(path)
    progress = restore_checkpoint(
        state, {"model": model, "optimizer": optimizer, "scheduler": None, "scaler": scaler}, cfg, data
    )
    write_csv(path.with_name("metrics.csv"), progress.history)


def evaluate_path(path: Path, root: Path) -> None:
    from engine.metrics import load_for_inference

    cfg = OmegaConf.create({"ckpt": str(path), "weights": None, "device": "cpu"})
    load_for_inference(cfg)


def outcome(way, path: Path, root: Path, label: str) -> str:
    start = time.perf_counter()
    try:
        with deadline(20), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            way(path, root)
        result = "ok"
    except UserError as err:
        assert_one_line(err)
        result = "error"
    except Exception as err:  # noqa: BLE001 - anything else is the failure
        pytest.fail(f"{label} ({way.__name__}): {type(err).__name__}: {str(err)[:300]}")
    TIMES.append((time.perf_counter() - start, f"{label} ({way.__name__})"))
    return result


def test_seeded_crafted_checkpoints_end_in_one_line(original, tmp_path):
    path = tmp_path / "crafted.pt"
    errors = total = 0
    for label, state, must_fail in crafted_cases(original, n=120):
        torch.save(state, path)
        for way in (resume_path, evaluate_path):
            result = outcome(way, path, tmp_path, label)
            if must_fail:
                assert result == "error", f"{label} ({way.__name__}) was accepted"
            errors += result == "error"
            total += 1
    slowest = max(TIMES)
    print(f"\ncrafted checkpoints: {total} cases, {errors} refused, slowest {slowest[0]:.3f}s ({slowest[1]})")
    assert total >= 300 and errors >= 150


# -------------------------------------------------------------- item 4: malformed fields

MALFORMED = {
    "best value text": ("best", {"monitor": "val_loss", "value": "low", "epoch": 1}),
    "history ints": ("history", [1, 2]),
    "history strings": ("history", ["epoch 1"]),
    "empty rng": ("rng_state", {}),
    "short torch rng": ("rng_state", "short"),
    "bad rank_states": ("rank_states", [{"rng_state": 5}]),
    "world_size text": ("world_size", "abc"),
    "integer saved_files": ("saved_files", 5),
    "negative epoch": ("epoch", -5),
    "losses of another length": ("epoch_step_losses", torch.zeros(7)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_fields_are_one_line(original, tmp_path, case):
    key, value = MALFORMED[case]
    if value == "short":
        value = {**original["rng_state"], "torch": original["rng_state"]["torch"][:100]}
    path = tmp_path / "bad.pt"
    torch.save({**original, key: value}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert_one_line(info.value, path.name, key)


def test_mid_epoch_position_beyond_the_epoch_is_refused_once_data_is_known(original, tmp_path):
    """1000 losses for 1000 batches pass the file check; this data has 4 batches an epoch
    (32 training samples, batch 8)."""
    path = tmp_path / "far.pt"
    torch.save({**original, "step_in_epoch": 1000, "epoch_step_losses": torch.zeros(1000)}, path)
    load_checkpoint(path)
    with pytest.raises(UserError) as info:
        resume_path(path, tmp_path)
    assert_one_line(info.value, "step_in_epoch=1000", "4 batches")


def test_tutorial_checkpoint_with_tensor_loss_still_loads(original, tmp_path):
    """Every key but the tutorial's four is optional; `loss` may be a 0-dim tensor."""
    path = tmp_path / "tutorial.pt"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": original["model_state_dict"],
            "optimizer_state_dict": original["optimizer_state_dict"],
            "loss": torch.tensor(0.25),
            "note": "extra key",
        },
        path,
    )
    assert load_checkpoint(path)["epoch"] == 3


def test_negative_epoch_resume_exits_2(trained_run, tmp_path):
    state = load_checkpoint(trained_run / "best.pt")
    crafted = tmp_path / "neg.pt"
    torch.save({**state, "epoch": -5}, crafted)
    result = run_script(
        "train.py",
        f"resume={crafted}",
        f"checkpoint.root={tmp_path}",
        "run_name=neg",
        "trainer.epochs=3",
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "'epoch'" in result.stderr
    assert not (tmp_path / "neg").exists()


# ---------------------------------------------------- item 3: small files, huge contents


def _one_line_exit_2(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_stride0_losses_and_rng_are_refused_by_train(trained_run, tmp_path):
    state = load_checkpoint(trained_run / "best.pt")
    huge = torch.zeros(1).expand(3_000_000)
    py = state["rng_state"]["python"]
    for name, crafted in (
        ("losses", {**state, "step_in_epoch": 1, "epoch_step_losses": huge}),
        (
            "rng",
            {
                **state,
                "rng_state": {
                    **state["rng_state"],
                    "python": {**py, "state": torch.zeros(1, dtype=torch.int64).expand(100_000_000)},
                },
            },
        ),
    ):
        path = tmp_path / f"{name}.pt"
        torch.save(crafted, path)
        assert path.stat().st_size < 100_000  # a small file
        start = time.perf_counter()
        result = run_script(
            "train.py", f"resume={path}", f"checkpoint.root={tmp_path}", f"run_name={name}", check=False, timeout=120
        )
        print(f"\n{name}: exit {result.returncode} in {time.perf_counter() - start:.2f}s (interpreter start included)")
        _one_line_exit_2(result, path.name)


def test_billion_laughs_config_is_refused_by_evaluate(trained_run, tmp_path):
    state = load_checkpoint(trained_run / "best.pt")
    path = tmp_path / "laughs.pt"
    torch.save({**state, "config": {**state["config"], "extra": billion_laughs(30)}}, path)
    result = run_script("evaluate.py", f"ckpt={path}", check=False, timeout=120)
    _one_line_exit_2(result, path.name, "config")


def test_yaml_alias_bomb_in_export_is_refused(trained_run, tmp_path):
    from engine.export import export_checkpoint

    out = export_checkpoint(trained_run / "best.pt", tmp_path / "export")
    text = (out / "config.yaml").read_text()
    bomb = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (out / "config.yaml").write_text(text + "\n".join(bomb) + "\n")
    result = run_script("evaluate.py", f"ckpt={out}", check=False, timeout=120)
    _one_line_exit_2(result, "config.yaml")


def test_abstract_data_module_in_export_config_is_refused(trained_run, tmp_path):
    import yaml

    from engine.export import export_checkpoint

    for key in ("data", "model"):
        out = export_checkpoint(trained_run / "best.pt", tmp_path / key)
        config = yaml.safe_load((out / "config.yaml").read_text())
        config[key] = {"_target_": "data.base.DataModule", "batch_size": 8}
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        cfg = OmegaConf.create({"ckpt": str(out), "weights": None, "device": "cpu"})
        from engine.metrics import load_for_inference

        with pytest.raises(UserError) as info:
            load_for_inference(cfg)
        assert_one_line(info.value, f"{key}._target_")


# ------------------------------------------------------------------ item 1: retention


def test_retention_never_deletes_foreign_names(tmp_path, capsys):
    """saved_files naming absolute paths, ../, other names and links: after a resume with
    keep_last=1 every file outside the project's patterns is still there, unchanged."""
    import train

    root = tmp_path / "ck"
    run = train_run(root, "checkpoint.keep_last=1", name="run")
    outside = tmp_path / "victim.txt"
    outside.write_text("precious")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "important.pt").write_text("precious too")
    (root / "run2").mkdir()
    torch.save({"x": 1}, root / "run2" / "epoch_0001.pt")
    (run / "notes.txt").write_text("mine")
    (run / "sub").mkdir()
    (run / "sub" / "epoch_0002.pt").write_text("nested")
    linked = tmp_path / "linked_target.pt"
    linked.write_text("a link's target")
    os.symlink(linked, run / "step_00000099.pt")
    foreign = [
        str(outside),
        "../../other/important.pt",
        "../run2/epoch_0001.pt",
        "notes.txt",
        "sub/epoch_0002.pt",
        "step_00000099.pt",
        str(run / "epoch_0002.pt"),
        "config.yaml",
        "metrics.csv",
    ]
    state = load_checkpoint(run / "epoch_0002.pt")
    for name in ("last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"):
        (run / name).unlink(missing_ok=True)
    torch.save({**state, "saved_files": foreign + ["epoch_0002.pt"]}, run / "epoch_0002.pt")
    protected = {
        p: p.read_bytes()
        for p in [
            outside,
            tmp_path / "other" / "important.pt",
            root / "run2" / "epoch_0001.pt",
            run / "notes.txt",
            run / "sub" / "epoch_0002.pt",
            linked,
        ]
    }
    capsys.readouterr()
    cfg = compose(
        "train",
        [
            f"checkpoint.root={root}",
            "run_name=run",
            "trainer.epochs=4",
            "checkpoint.every_n_epochs=1",
            "checkpoint.keep_last=1",
            "resume=auto",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.train(cfg)
    err = capsys.readouterr().err
    for path, content in protected.items():
        assert path.exists() and path.read_bytes() == content, f"{path} was touched"
    assert (run / "step_00000099.pt").is_symlink() or any(
        p.name.startswith("step_00000099.pt.corrupt") for p in run.iterdir()
    )
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    warning = [line for line in err.splitlines() if "saved_files" in line]
    assert len(warning) == 1, err
    # Retention itself still works on the files this run wrote and lists.
    assert not (run / "epoch_0003.pt").exists() and (run / "epoch_0004.pt").exists()
