"""Seeded fuzzing of the checkpoint loader, the export loader and the resume picker.

Every case must end in a valid load or a one-line UserError: no other exception, no hang
(each case runs under an alarm), no crash of the interpreter. A valid load must return the
original weights: a damaged file is never silently read as different numbers.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line, deadline, write_malicious

from engine.checkpoint import SCHEMA, load_checkpoint, load_export, load_file, load_model_state, verify
from engine.errors import UserError
from engine.export import export_checkpoint
from engine.run_dir import find_latest

SEED = 20240611
# Seeded cases each test runs at least (each test checks its own share): 550 in all.
CASES = {
    "truncation": 150,
    "byte flip": 300,
    "not a checkpoint": 59,
    "wrong key type": 80,
    "wrong tensor shape": 31,
    "find_latest scenario": 60,
    "export": 70,
}


@pytest.fixture(scope="module")
def original(trained_run) -> dict:
    return load_checkpoint(trained_run / "best.pt")


def outcome(load, path: Path, original: dict | None, label: str) -> str:
    """'ok' (and then the weights are the original ones) or 'error' (one line)."""
    with deadline():
        try:
            state = load(path)
        except UserError as err:
            assert_one_line(err, path.name)
            return "error"
        except Exception as err:  # noqa: BLE001 - any other exception is the failure
            pytest.fail(f"{label}: {type(err).__name__}: {err}")
    if original is not None:
        weights = state["model_state_dict"] if "model_state_dict" in state else state
        for key, value in original["model_state_dict"].items():
            assert torch.equal(weights[key], value), f"{label}: weights differ, no error"
    return "ok"


def count(kind: str, n: int) -> None:
    """A test ran `n` seeded cases of `kind`: at least its share of the module's total."""
    print(f"fuzz {kind}: {n} cases")
    assert n >= CASES[kind], f"{kind}: {n} cases, expected at least {CASES[kind]}"


def test_the_shares_add_up_to_at_least_500_seeded_cases():
    assert sum(CASES.values()) >= 500, CASES


def test_truncations_always_fail_cleanly(trained_run, original, tmp_path):
    data = (trained_run / "best.pt").read_bytes()
    rng = random.Random(SEED)
    offsets = sorted(
        {
            0,
            1,
            2,
            4,
            8,
            30,
            64,
            *range(len(data) - 30, len(data)),
            *range(0, len(data), max(1, len(data) // 100)),
            *(rng.randrange(len(data)) for _ in range(40)),
        }
    )
    target = tmp_path / "truncated.pt"
    for offset in offsets:
        target.write_bytes(data[:offset])
        assert outcome(load_checkpoint, target, original, f"truncated at {offset}") == "error"
    count("truncation", len(offsets))
    assert len(offsets) >= 150


def _payload_position(data: bytes, rng: random.Random) -> tuple[int, str]:
    """A random byte inside some zip record's stored data (what the CRC-32 covers), not in
    the headers or the alignment padding, whose place moves with the checkpoint's keys; and
    that record's name."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = rng.choice([i for i in archive.infolist() if i.compress_size])
    header = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return start + rng.randrange(info.compress_size), info.filename


def test_flipped_bits_fail_cleanly_or_load_the_same_weights(trained_run, original, tmp_path):
    """The flipped-bit test. Seeded flips of 1-3 bytes anywhere: a one-line error or the
    original weights, never other numbers. One bit flipped in a record's stored data (what
    the zip CRC-32 covers) is always caught: `verify` (which also checks the saver's writes)
    names the record, and the loader refuses the file as corrupted."""
    data = (trained_run / "best.pt").read_bytes()
    rng = random.Random(SEED + 1)
    target = tmp_path / "flipped.pt"
    results = {"ok": 0, "error": 0}
    for case in range(250):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] ^= rng.randint(1, 255)
        target.write_bytes(bytes(damaged))
        results[outcome(load_checkpoint, target, original, f"flip case {case}")] += 1
    assert results["error"] > 200  # most flips land in checksummed data
    for _ in range(50):
        damaged = bytearray(data)
        position, record = _payload_position(data, rng)
        damaged[position] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(damaged))
        with pytest.raises(UserError, match=re.escape(f"checksum mismatch in record {record}")):
            verify(target)
        with pytest.raises(UserError) as info:
            load_checkpoint(target)
        assert_one_line(info.value, target.name, "corrupted checkpoint (checksum mismatch")
    count("byte flip", 250 + 50)


def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def test_files_that_are_not_checkpoints(trained_run, original, tmp_path):
    """Empty, a folder, a PNG, zips of other things, random bytes, text, pickles of code."""
    rng = random.Random(SEED + 2)
    cases: dict[str, bytes | None] = {
        "empty.pt": b"",
        "folder.pt": None,
        "image.png": _png_bytes(),
        "text.pt": b"epoch,loss\n1,0.5\n",
        "zip_text.pt": _zip_with({"readme.txt": b"hello"}),
        "zip_fake_pickle.pt": _zip_with({"archive/data.pkl": b"not a pickle", "archive/version": b"3\n"}),
        "zip_empty.pt": _zip_with({}),
        "zip_of_checkpoint.zip": _zip_with({"best.pt": (trained_run / "best.pt").read_bytes()}),
    }
    for size in range(40):
        cases[f"random_{size}.pt"] = rng.randbytes(rng.choice([1, 7, 64, 512, 4096]))
    expected_refusals = 0
    for name, payload in cases.items():
        path = tmp_path / name
        if payload is None:
            path.mkdir()
        else:
            path.write_bytes(payload)
        assert outcome(load_checkpoint, path, None, name) == "error"
        expected_refusals += 1
    # Pickles that would run code: refused, in both torch formats.
    marker = tmp_path / "MARKER"
    for legacy in (False, True):
        evil = write_malicious(tmp_path / f"evil_{legacy}.pt", marker, legacy=legacy)
        assert outcome(load_checkpoint, evil, None, evil.name) == "error"
        assert outcome(load_file, evil, None, evil.name) == "error"
    assert not marker.exists()
    # Valid files that are not training checkpoints: a tensor, a list, a bare state_dict.
    for name, obj in (
        ("tensor.pt", torch.zeros(3)),
        ("list.pt", [1, 2]),
        ("state_dict.pt", original["model_state_dict"]),
    ):
        torch.save(obj, tmp_path / name)
        assert outcome(load_checkpoint, tmp_path / name, None, name) == "error"
        assert outcome(load_file, tmp_path / name, None, name) == "ok"
    # The legacy (non-zip) torch.save format of a real checkpoint still loads.
    torch.save(original, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert outcome(load_checkpoint, tmp_path / "legacy.pt", original, "legacy") == "ok"
    count("not a checkpoint", len(cases) + 4 + 6 + 1)


WRONG_VALUES = [None, "text", 1.5, 3, True, [1, 2], {"a": 1}, torch.zeros(2)]


def _allowed(key: str, value) -> bool:
    kinds = SCHEMA[key][0]
    return isinstance(value, kinds) and not isinstance(value, bool)


def test_checkpoint_keys_of_the_wrong_type(original, tmp_path):
    path = tmp_path / "typed.pt"
    cases = 0
    for key in SCHEMA:
        for value in WRONG_VALUES:
            if key != "model_state_dict" and _allowed(key, value):
                continue
            state = dict(original)
            state[key] = value
            torch.save(state, path)
            with pytest.raises(UserError) as info:
                load_checkpoint(path)
            assert_one_line(info.value, path.name, key)
            cases += 1
    # Entries of model_state_dict that are not name -> tensor.
    for bad in ({"weights": [1.0]}, {1: torch.zeros(1)}, {"bias": "x"}, {"bias": None}):
        state = dict(original)
        state["model_state_dict"] = {**original["model_state_dict"], **bad}
        torch.save(state, path)
        with pytest.raises(UserError) as info:
            load_checkpoint(path)
        assert_one_line(info.value, path.name, "model_state_dict")
        cases += 1
    count("wrong key type", cases)
    assert cases >= 80


def test_tensors_of_the_wrong_shape_or_dtype(original, tmp_path):
    """Into the model they were trained for: one line naming the key and both shapes;
    strict=False loads the rest."""
    from models.linear_regression import LinearRegressionModel

    rng = random.Random(SEED + 3)
    cases = 0
    for case in range(30):
        state = {k: v.clone() for k, v in original["model_state_dict"].items()}
        key = rng.choice(sorted(state))
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
        if shape == tuple(state[key].shape):
            shape = (*shape, 2)
        state[key] = torch.zeros(shape)
        model = LinearRegressionModel(1)
        with pytest.raises(UserError) as info:
            load_model_state(model, state, f"case{case}.pt")
        assert_one_line(info.value, key, "shape mismatch", str(tuple(shape)))
        other = next(k for k in state if k != key)
        problems = load_model_state(model, state, f"case{case}.pt", strict=False)
        assert problems and torch.equal(model.state_dict()[other], state[other])
        cases += 1
    # A dtype torch cannot copy into a float parameter.
    state = {k: v.clone() for k, v in original["model_state_dict"].items()}
    state["bias"] = torch.zeros(1, dtype=torch.complex64)
    with pytest.raises(UserError) as info:
        load_model_state(LinearRegressionModel(1), state, "complex.pt")
    assert_one_line(info.value, "complex.pt")
    count("wrong tensor shape", cases + 1)


def _save_step(original: dict, path: Path, step: int) -> None:
    state = dict(original)
    state["global_step"], state["epoch"] = step, step
    torch.save(state, path)


def test_find_latest_picks_the_newest_readable_and_sets_the_rest_aside(original, tmp_path):
    rng = random.Random(SEED + 4)
    damages = ["truncate", "flip", "empty", "png", "text", "folder", "zip"]
    for case in range(60):
        folder = tmp_path / f"run{case}"
        folder.mkdir()
        steps = rng.sample(range(1, 50), rng.randint(0, 3))
        for step in steps:
            _save_step(original, folder / f"epoch_{step:04d}.pt", step)
        newest_good = max(steps, default=None)
        bad = {}
        for index in range(rng.randint(1, 3)):
            step = 50 + rng.randint(0, 40) + index * 100
            path = folder / f"epoch_{step:04d}.pt"
            kind = rng.choice(damages)
            _save_step(original, path, step)  # newer than every good file, then damaged
            data = path.read_bytes()
            if kind == "truncate":
                path.write_bytes(data[: rng.randrange(len(data))])
            elif kind == "flip":
                damaged = bytearray(data)
                position, _ = _payload_position(data, rng)  # payload, not padding
                damaged[position] ^= 0xFF
                path.write_bytes(bytes(damaged))
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "png":
                path.write_bytes(_png_bytes())
            elif kind == "text":
                path.write_text("not a checkpoint\n")
            elif kind == "folder":
                path.unlink()
                path.mkdir()
            else:
                path.write_bytes(_zip_with({"x.txt": b"x"}))
            bad[path] = kind
        names_before = {p.name for p in folder.iterdir()}
        with deadline(), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            found = find_latest(folder, load_checkpoint)
        label = f"case {case}: good {steps}, bad {sorted((p.name, k) for p, k in bad.items())}"
        if newest_good is None:
            assert found is None, label
        else:
            assert found is not None, label
            assert found[0].name == f"epoch_{newest_good:04d}.pt", label
            assert found[1]["global_step"] == newest_good
        for path, kind in bad.items():
            if kind == "folder":
                assert path.is_dir(), f"{label}: a folder was moved"
            elif kind == "flip" and path.exists():
                # A flip can land where nothing checks it; then the file is still valid.
                assert load_checkpoint(path)["global_step"] > 0
            else:
                assert not path.exists(), label
                assert path.with_name(path.name + ".corrupt").exists(), label
        # Nothing deleted: every file is still there, under its name or as NAME.corrupt.
        names_after = {p.name.removesuffix(".corrupt") for p in folder.iterdir()}
        assert names_after == names_before, label
        shutil.rmtree(folder)
    count("find_latest scenario", 60)


def test_export_loader(trained_run, original, tmp_path):
    """Truncated and flipped model.safetensors, broken config.yaml: one line each."""
    export = export_checkpoint(trained_run / "best.pt", tmp_path / "export")
    weights = (export / "model.safetensors").read_bytes()
    rng = random.Random(SEED + 5)

    def load(path: Path):
        return {"model_state_dict": load_export(path.parent)[1]}

    target = tmp_path / "export" / "model.safetensors"
    cases = 0
    for offset in sorted({0, 1, 7, 8, 9, *(rng.randrange(len(weights)) for _ in range(30))}):
        target.write_bytes(weights[:offset])
        assert outcome(load, target, original, f"safetensors truncated at {offset}") == "error"
        cases += 1
    for _ in range(40):
        damaged = bytearray(weights)
        damaged[rng.randrange(len(damaged))] ^= rng.randint(1, 255)
        target.write_bytes(bytes(damaged))
        try:
            with deadline():
                load(target)
        except UserError as err:
            assert_one_line(err, "model.safetensors")
        cases += 1  # a flip in tensor data is not detectable (safetensors has no checksum)
    target.write_bytes(weights)
    config = tmp_path / "export" / "config.yaml"
    for text in ("model: [unclosed", "just text", "", "model: {}\n", "\x00\x01"):
        config.write_text(text)
        with pytest.raises(UserError) as info:
            load_export(tmp_path / "export")
        assert_one_line(info.value, "config.yaml")
        cases += 1
    count("export", cases)
