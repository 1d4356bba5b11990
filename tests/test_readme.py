"""The README is a tested artifact (issue 9.11): its ```bash and ```python blocks run in order,
as a user would follow them, in a scratch copy of the repository.

Conventions for README.md:
- ```bash: commands a user runs, in order, from the repository root. Each line (with `\\`
  continuations) runs on its own with bash; `python` is this interpreter, `make train` is the
  command the Makefile runs, other make targets are skipped (`make test` is this suite).
- ```python: snippets a user copies; each runs as a script at its place in the order.
- ```text and unlabelled blocks are not run: output samples, and commands that cannot run here
  (a GPU, a cluster, the internet, a user's own paths).
- ```python title=PATH (any language): a file the reader saves at PATH; it is written there at
  its place in the order, not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

RUN = ("bash", "python")
SKIPPED_MAKE = {"test", "bench", "lint", "setup", "clean"}
COMMAND_TIMEOUT = 600


@dataclass
class Block:
    lang: str
    line: int  # line number of the opening fence
    lines: list[tuple[int, str]]  # (line number, text)
    title: str | None = None  # ```python title=models/my_net.py: a file the user saves


def readme_blocks(text: str) -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)(?:\s+title=(\S+))?", line)
        if current is None and fence:
            current = Block(fence.group(1).lower(), number, [], fence.group(2))
        elif current is not None and line.strip().startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append((number, line))
    assert current is None, f"README.md: the block opened at line {current.line} is not closed"
    return blocks


def bash_commands(block: Block) -> list[tuple[int, str]]:
    """One (first line number, command) per command: `\\` continuations joined, blank lines and
    whole-line comments dropped."""
    commands, pending, start = [], "", 0
    for number, line in block.lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((start, pending + line))
        pending = ""
    assert not pending, f"README.md line {start}: a `\\` continuation runs off the block"
    return commands


def runnable(command: str, python: str = shlex.quote(sys.executable)) -> str | None:
    """The command for this checkout's interpreter (`python`), or None for a make target to skip."""
    make = re.match(r"^\s*make\s+(\w+)(.*)$", command)
    if make:
        target, rest = make.groups()
        if target in SKIPPED_MAKE:
            return None
        assert target == "train", f"unknown make target in README: {command}"
        args = re.search(r"ARGS=(\"[^\"]*\"|'[^']*'|\S+)", rest)
        extra = shlex.split(args.group(1))[0] if args else ""
        return f"{python} train.py resume=auto {extra}"  # the Makefile's train recipe
    # `python`, `python3`, `.venv/bin/python` where a command starts (also after && ; | and
    # in $( ... ), and after `timeout [-s SIGNAL] SECONDS`).
    start = r"(^|[;&|(]\s*|\btimeout\s+(?:-s\s+\w+\s+)?\d+\s+)"
    return re.sub(start + r"(?:\.venv/bin/)?python3?(?=\s)", lambda m: m.group(1) + python, command)


def scratch_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def python_server(work: Path, address: Path, env: dict) -> subprocess.Popen:
    """tests/readme_python.py's server, ready, in the scratch copy; the test kills it at the end."""
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "readme_python.py"), "--serve", str(address)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert server.stdout.readline().strip() == "ready", "tests/readme_python.py --serve did not start"
    return server


def save_titled(block: Block, work: Path) -> Path:
    """A ```lang title=PATH block: the file the README asks the reader to save at PATH."""
    path = work / block.title
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text for _, text in block.lines) + "\n")
    return path


def _run(args: list[str], cwd: Path, env: dict, where: str, shown: str) -> None:
    """Run one README command; on failure say which line, the command and its output."""
    try:
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        pytest.fail(
            f"{where} did not finish in {COMMAND_TIMEOUT} s:\n    {shown}\n--- stdout (end)\n{out[-3000:]}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"{where} failed with exit code {result.returncode}:\n    {shown}\n"
            f"--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n"
            f"{result.stderr[-3000:]}",
            pytrace=False,
        )


def test_readme_blocks_are_parsed():
    """The parser itself: fences, continuations, comments, make and python rewriting."""
    text = (
        "x\n```bash\n# note\nmake train\nmake test\npython a.py \\\n  b=1 && python3 c.py\n"
        "```\n```text\npython nope.py\n```\n```python\nprint(1)\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("text", 9), ("python", 12)]
    commands = bash_commands(blocks[0])
    assert [n for n, _ in commands] == [4, 5, 6]
    assert runnable(commands[1][1]) is None
    python = shlex.quote(sys.executable)
    assert runnable(commands[0][1]) == f"{python} train.py resume=auto "
    assert runnable(commands[2][1]) == f"{python} a.py    b=1 && {python} c.py"
    assert runnable("timeout -s INT 8 python t.py || echo x") == f"timeout -s INT 8 {python} t.py || echo x"


@pytest.mark.slow
def test_readme_runs_in_order(tmp_path):
    readme = (REPO / "README.md").read_text()
    work = scratch_copy(tmp_path / "repo")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("HYDRA_FULL_ERROR", "PYTHONPATH", "TEST_FAULTS"):
        env.pop(key, None)
    python = shlex.quote(sys.executable)
    if not sys.platform.startswith("linux"):  # no fork server: every command starts Python
        timings = run_in_order(readme, work, tmp_path, env, python)
    else:  # `python X.py` forked from a server that imported torch once
        server = python_server(work, tmp_path / "python.sock", env)
        env["README_PYTHON_SERVER"] = str(tmp_path / "python.sock")
        try:
            timings = run_in_order(
                readme, work, tmp_path, env, f"{python} {shlex.quote(str(REPO / 'tests' / 'readme_python.py'))}"
            )
        finally:
            server.kill()
    print("README commands, slowest first (pytest -s shows this):")
    for seconds, what in sorted(timings, reverse=True):
        print(f"  {seconds:6.1f} s  {what}")
    assert len(timings) >= 10, f"only {len(timings)} README commands ran: are the blocks still labelled ```bash?"


def run_in_order(readme: str, work: Path, scratch: Path, env: dict, python: str) -> list[tuple[float, str]]:
    """Every runnable block of `readme` in order, in `work`; (seconds, what) per command run."""
    timings = []
    for block in readme_blocks(readme):
        if block.title:  # a file the reader saves (e.g. their model), then uses
            save_titled(block, work)
            continue
        if block.lang not in RUN:
            continue
        if block.lang == "python":
            script = scratch / f"readme_line_{block.line}.py"
            script.write_text("\n".join(text for _, text in block.lines) + "\n")
            where = f"README.md ```python block at line {block.line}"
            started = time.perf_counter()
            _run([sys.executable, str(script)], work, env, where, script.read_text())
            timings.append((time.perf_counter() - started, f"python block at line {block.line}"))
            continue
        for number, command in bash_commands(block):
            line = runnable(command, python)
            if line is None:
                continue
            where = f"README.md line {number} (```bash block at line {block.line})"
            started = time.perf_counter()
            _run(["bash", "-c", f"set -o pipefail\n{line}"], work, env, where, command)
            timings.append((time.perf_counter() - started, f"line {number}: {command[:70]}"))
    return timings


def test_a_failing_command_is_reported_with_its_line_and_output(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failed:
        _run(
            ["bash", "-c", "echo progress; echo boom >&2; exit 3"],
            tmp_path,
            dict(os.environ),
            "README.md line 7 (```bash block at line 5)",
            "python train.py x=1",
        )
    message = str(failed.value)
    assert message.startswith("README.md line 7 (```bash block at line 5) failed with exit code 3")
    assert "python train.py x=1" in message and "progress" in message and "boom" in message


SCRIPTS = {  # what a user's `python X.py` may do: output, input, exit codes, signals, its argv
    "ok.py": "import sys\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\n",
    "code.py": "import sys\nsys.exit(int(input()))\n",
    "boom.py": "raise ValueError('boom')\n",
    "message.py": "raise SystemExit('bad input')\n",
    "ctrl_c.py": "import time\nprint('waiting', flush=True)\ntime.sleep(30)\n",
    "handled.py": "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, lambda *a: sys.exit(3))\nprint('waiting', flush=True)\ntime.sleep(30)\n",
    "sub/where.py": "import os, sys\nprint(os.getcwd(), sys.path[0], os.environ.get('MARK'))\n",
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")
def test_readme_python_runs_a_script_as_python_does(tmp_path):
    """The doctest's `python` (tests/readme_python.py) is indistinguishable from the interpreter:
    the same output, exit code, stdin, folder, sys.path[0] and environment, and the same result
    for Ctrl-C (`timeout -s INT`) with and without a handler."""
    work = tmp_path / "work"
    work.mkdir()
    for name, text in SCRIPTS.items():
        (work / name).parent.mkdir(exist_ok=True)
        (work / name).write_text(text)
    env = {**os.environ, "MARK": "m1"}
    server = python_server(work, tmp_path / "s.sock", env)
    client = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'readme_python.py'))}"
    commands = [
        "python ok.py a 'b c'",
        "echo 4 | python code.py",
        "python boom.py",
        "python message.py",
        "timeout -s INT 1 python ctrl_c.py",
        "timeout -s INT 1 python handled.py",
        "MARK=m2 python sub/where.py",
        "python -c 'print(7)'",
    ]
    try:
        for command in commands:
            results = []
            for python, extra in (
                (shlex.quote(sys.executable), {}),
                (client, {"README_PYTHON_SERVER": str(tmp_path / "s.sock")}),
            ):
                line = command.replace("python", python, 1)
                done = subprocess.run(
                    ["bash", "-c", line], cwd=work, env={**env, **extra}, capture_output=True, text=True, timeout=60
                )
                results.append(
                    (done.returncode, done.stdout, done.stderr.replace(str(REPO / "tests" / "readme_python.py"), ""))
                )
            assert results[0][:2] == results[1][:2], command
            assert results[0][2].splitlines()[-1:] == results[1][2].splitlines()[-1:], command
    finally:
        server.kill()
