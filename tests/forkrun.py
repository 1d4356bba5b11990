"""Fork server for the resume tests: `python train.py ...` without paying its imports each time.

The kill harness starts train.py a few dozen times, and a cold start spends seconds importing
torch (and torch._dynamo, which the optimizer imports) before training for milliseconds. This
server imports those libraries once, then forks a fresh child per request; the child runs
train.py as `__main__` exactly as `python train.py ARGS` would (own pid, own signal handlers,
the test faults in its environment armed, as tests/faults/sitecustomize.py would at start-up),
and can be SIGKILLed like any process. No torch op runs in the server, so the children do not
inherit thread pools.

Protocol: one JSON object per line on stdin {"args": [...], "env": {...}, "stdout": PATH,
"stderr": PATH}; one JSON line back {"returncode": N} (negative: killed by signal -N, as in
subprocess). With "spawn": true the child gets its own process group and a {"pid": N} line
comes first, so the caller can signal it while it runs; "module": NAME runs `python -m NAME
ARGS` (torchrun) instead of train.py.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")


def _preload() -> None:
    import hydra  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import pandas  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (imported lazily by torch.optim, the slow part)

    import tests.faults.sitecustomize  # noqa: F401  (its env is clean here: nothing armed)

    assert torch.get_num_threads() >= 1


def _child(request: dict) -> None:
    code = 1
    try:
        os.environ.update(request.get("env") or {})
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        from tests.faults import sitecustomize  # imported by the server: not again

        sitecustomize.install_from_env()  # a forked child does not run it again at start-up
        if request.get("spawn"):
            os.setpgid(0, 0)  # its own process group, as a shell job: `kill -TERM -PGID`
        if request.get("module"):  # e.g. torch.distributed.run (torchrun)
            sys.argv = [request["module"], *request["args"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [TRAIN, *request["args"]]
            runpy.run_path(TRAIN, run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like the interpreter would
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    sys.path[0] = str(REPO)  # as `python train.py` would have it
    os.chdir(REPO)
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        if request.get("spawn"):  # the caller signals it while it runs: tell it the pid
            try:
                os.setpgid(pid, pid)  # also here, so the group exists before the reply
            except OSError:  # the child already did it, or has already exited
                pass
            print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(
            json.dumps({"returncode": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}),
            flush=True,
        )
    os._exit(0)  # skip interpreter teardown (seconds with torch loaded); nothing to flush


# ------------------------------------------------------------------------------ test side


class ForkServer:
    """Client of the server above: `run(*overrides)` returns a CompletedProcess like
    conftest.run_script, with the same environment. Off Linux (where fork after importing
    system frameworks is unsafe) each run is a plain `python train.py` instead."""

    def __init__(self, scratch: Path, timeout: float = 120) -> None:
        import subprocess

        self.scratch, self.timeout, self.count = scratch, timeout, 0
        self.proc = None
        if not sys.platform.startswith("linux"):
            return
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        for name in ("HYDRA_FULL_ERROR", "TEST_FAULTS", "WRITE_FAULT_EROFS", "WRITE_FAULT_ENOSPC"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.ready = False  # checked on first use: the server imports while the caller works

    def _reply(self) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"train.py did not finish within {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, *overrides: str, root: Path, env: dict | None = None, check: bool = True):
        import subprocess

        if self.proc is None:
            from tests.conftest import run_script

            return run_script("train.py", *overrides, root=root, env=env, check=check, timeout=self.timeout)
        if not self.ready:
            self.ready = self._reply().get("ready", False)
            assert self.ready, "fork server did not start"
        self.count += 1
        out, err = (self.scratch / f"{self.count}.{name}" for name in ("out", "err"))
        args = [*overrides, f"checkpoint.root={root}"]
        self.proc.stdin.write(
            json.dumps({"args": args, "env": env or {}, "stdout": str(out), "stderr": str(err)}) + "\n"
        )
        self.proc.stdin.flush()
        code = self._reply()["returncode"]
        result = subprocess.CompletedProcess(["train.py", *args], code, out.read_text(), err.read_text())
        if check and code != 0:
            raise AssertionError(
                f"train.py {' '.join(args)} exited {code}\n--- stdout\n"
                f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
            )
        return result

    def start(self, *args: str, env: dict | None = None, module: str | None = None) -> tuple[int, Path, Path]:
        """Start train.py ARGS (or `python -m MODULE ARGS`) in its own process group without
        waiting: (pid, stdout path, stderr path). `finish()` waits for it. Linux only."""
        assert self.proc is not None, "start() needs the fork server (Linux)"
        if not self.ready:
            self.ready = self._reply().get("ready", False)
        self.count += 1
        out, err = (self.scratch / f"{self.count}.{name}" for name in ("out", "err"))
        self.proc.stdin.write(
            json.dumps(
                {
                    "args": list(args),
                    "env": env or {},
                    "spawn": True,
                    "module": module,
                    "stdout": str(out),
                    "stderr": str(err),
                }
            )
            + "\n"
        )
        self.proc.stdin.flush()
        return self._reply()["pid"], out, err

    def finish(self) -> int:
        """The return code of the process `start()` started (negative: killed by signal)."""
        return self._reply()["returncode"]

    def close(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a hung child: end the group this test started
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


if __name__ == "__main__":
    main()
