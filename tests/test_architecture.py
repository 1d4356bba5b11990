"""The layout the README's "Architecture" section promises, checked on the source.

Read with `ast`, not by importing: a module's imports are its arrows. The promises: no import
loop; no project import hidden inside a function (where it would dodge a loop); engine/ never
imports data/ or models/ (they plug into it); nothing test-only in the product; the README's
module table (the one map) lists every engine module with its line count. No per-module line
cap: it sliced code by who checks what (issue 19).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "data", "models", "hydra_plugins")
SCRIPTS = ("train", "evaluate", "predict")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = {name: REPO / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


SOURCES = _sources()


def _project(name: str) -> str | None:
    """The project module `name` refers to (a package's own name for `from pkg import mod`
    is resolved by the caller), or None for a third-party import."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(project module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            else:
                visit(child, nested)
                continue
            for name in names:
                target = _project(name)
                if target is not None:
                    found.append((target, child.lineno, in_function))

    visit(tree, False)
    return found


GRAPH = {name: _imports(path) for name, path in SOURCES.items()}


def _edges() -> dict[str, set[str]]:
    return {
        name: {t for t, _, _ in found if t != name and not name.startswith(t + ".")} for name, found in GRAPH.items()
    }


def test_no_import_loop():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import loop: " + " -> ".join(loop))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)


def test_no_project_import_inside_a_function():
    hidden = [
        f"{SOURCES[name].relative_to(REPO)}:{line} imports {target}"
        for name, found in GRAPH.items()
        for target, line, inside in found
        if inside
    ]
    assert not hidden, "imports hidden in functions:\n" + "\n".join(hidden)


def test_engine_does_not_import_data_or_models():
    wrong = [
        f"{name} imports {target}"
        for name, targets in _edges().items()
        if name.startswith("engine")
        for target in targets
        if target.split(".")[0] in ("data", "models") + SCRIPTS
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_scripts():
    wrong = [
        f"{name} imports {target}" for name, targets in _edges().items() for target in targets if target in SCRIPTS
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_test_only_in_the_product():
    """Faults are injected from tests/faults/ (armed by TEST_FAULTS), never by product code."""
    pattern = re.compile(r"TEST_FAULTS|step_faults|ENGINE_FAULT|^\s*(import|from) (pytest|tests)\b", re.M)
    wrong = [
        f"{SOURCES[name].relative_to(REPO)}: {found.group(0).strip()}"
        for name in SOURCES
        if (found := pattern.search(SOURCES[name].read_text()))
    ]
    assert not wrong, "\n".join(wrong)


def test_readme_map_lists_every_engine_module_with_its_lines():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Architecture") : readme.index("## Training")]
    rows = dict(re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", section, re.M))
    files = {
        str(p.relative_to(REPO / "engine")): len(p.read_text().splitlines())
        for p in sorted((REPO / "engine").rglob("*.py"))
    }
    assert sorted(rows) == sorted(files), f"README map vs engine/: {set(rows) ^ set(files)}"
    off = {name: (int(rows[name]), n) for name, n in files.items() if abs(int(rows[name]) - n) > max(5, n // 10)}
    assert not off, f"README map line counts (README, actual) off by more than 10%: {off}"
    total = re.search(r"\*\*(\d+) modules\*\* \| \*\*(\d+)\*\*", section)
    assert total and int(total.group(1)) == len(files), "README map: module count"
    assert abs(int(total.group(2)) - sum(files.values())) <= sum(files.values()) // 20
