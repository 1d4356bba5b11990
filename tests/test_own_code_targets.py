"""A file's config may name classes of the project's own code anywhere in the project (a user's
package outside models/ and data/), never the engine, the scripts, tests, installed packages or
functions outside models/. The refusal says what to do."""

from __future__ import annotations

import sys

import pytest

import engine.config
from engine.config import build, project_module, saved_sections
from engine.errors import UserError
from tests.helpers import assert_one_line

USER_CODE = """
import os
import torch

from data.base import DataModule


class Points(DataModule):  # the user's own data module, outside data/
    def setup(self):
        pass


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.layer = torch.nn.Linear(1, width)

    def forward(self, x):
        return self.layer(x)


def wipe(path: str = "."):  # a user's function: never callable from a file
    raise AssertionError("called")


system = os.system  # re-exported: still os.system
"""


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A project root holding the user's own package `mylib` (outside models/ and data/)."""
    (tmp_path / "mylib").mkdir()
    (tmp_path / "mylib" / "__init__.py").write_text("")
    (tmp_path / "mylib" / "nets.py").write_text(USER_CODE)
    (tmp_path / "loose.py").write_text("from mylib.nets import Tiny\n")  # a top-level module
    monkeypatch.setattr(engine.config, "PROJECT", tmp_path.resolve())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("mylib", "loose")]:
        del sys.modules[name]


def file_config(target: str) -> dict:
    return {"data": {"_target_": "mylib.nets.Points", "batch_size": 4}, "model": {"_target_": target}}


@pytest.mark.parametrize("target", ["mylib.nets.Tiny", "loose.Tiny", "torch.nn.Linear"])
def test_own_classes_anywhere_in_the_project_build_from_a_file(user_project, target):
    config = file_config(target)
    if target == "torch.nn.Linear":
        config["model"].update(in_features=1, out_features=1)
    sections = saved_sections(config, user_project / "best.pt")
    model = build(sections.model, "model", user_project / "best.pt")
    assert model(__import__("torch").zeros(2, 1)).shape[0] == 2


@pytest.mark.parametrize(
    "target",
    [
        "mylib.nets.wipe",  # a function outside models/
        "mylib.nets.system",  # os.system re-exported by user code
        "engine.run_dir.CheckpointSaver",  # the engine
        "train.train",  # a script
        "tests.helpers.snapshot",  # the tests
        "torchvision.models.vgg16",  # an installed package's builder
        "sklearn.linear_model.LinearRegression",  # an installed package's class
        "os.system",
        "builtins.eval",
        "mylib..nets.Tiny",
    ],
)
def test_anything_else_is_refused_with_what_to_do(user_project, target):
    with pytest.raises(UserError) as info:
        saved_sections(file_config(target), user_project / "best.pt")
    assert_one_line(info.value, "best.pt", "refused", "your project's own modules", "wrap it in a module")


def test_project_module_looks_on_disk_without_importing(user_project):
    assert project_module("mylib.nets") and project_module("loose")
    assert "mylib" not in sys.modules  # found, not imported
    assert not project_module("torch") and not project_module("engine.config") and not project_module("train")
