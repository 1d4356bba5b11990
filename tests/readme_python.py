"""`python` for the README doctest: `python SCRIPT.py ARGS` runs in a child forked from a server
that imported torch, Hydra and matplotlib once, instead of paying seconds of imports per command
(the README has some 50 commands; their start-up was half of the doctest's time).

Client (this file run with no --serve): anything but `python SCRIPT.py ...` (-c, -m, no script)
becomes the real interpreter (exec). Otherwise it hands its argv, folder, environment and its
stdin/stdout/stderr (the descriptors themselves, SCM_RIGHTS) to the server, forwards the signals
it gets (`timeout -s INT 8 python ...`) to the child, and exits as the child did: a child killed
by a signal kills the client with the same signal, as bash would see from a real `python`.

Server (`--serve SOCKET`, started by tests/test_readme.py with the scratch copy as its folder):
forks one child per request. The child runs SCRIPT as `__main__` exactly as `python SCRIPT`
would: sys.path[0] is the script's folder (the project is imported from the scratch copy, never
by the server), its own argv, folder and environment. No torch op runs in the server.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import sys
import traceback

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _preload() -> None:
    import hydra  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import omegaconf  # noqa: F401
    import pandas  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (imported lazily by torch.optim, the slow part)

    assert "engine" not in sys.modules and "train" not in sys.modules


def _child(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        for fd, target in zip((0, 1, 2), fds, strict=True):
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int) and done.code is not None:
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter: the traceback, then die of SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - report like the interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    sys.path[0] = os.getcwd()
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> its client's connection
    listener.settimeout(0.05)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            conn = None
        if conn is not None:
            conn.settimeout(None)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _child(json.loads(message), fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with waiting.pop(pid) as finished:
                    finished.sendall(f"{code}\n".encode())


def client(argv: list[str]) -> None:
    address = os.environ.get("README_PYTHON_SERVER")
    if not address or not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        os.execv(sys.executable, [sys.executable, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    replies = conn.makefile("r")
    pid = int(replies.readline())
    for number in FORWARDED:
        signal.signal(number, lambda number, frame: os.kill(pid, number))
    code = int(replies.readline())
    if code < 0:  # killed by a signal: die of it too
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        client(sys.argv[1:])
