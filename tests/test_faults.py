"""The fault injection of the resume tests (tests/faults/sitecustomize.py) itself: its kill
points land where the tests assume, counted in the run's global steps across a resume."""

from __future__ import annotations

import signal

import pytest

from tests.faults import fault_env
from tests.faults import sitecustomize as faults
from tests.resume_helpers import assert_all_complete, fork_server, newest

server = fork_server()
RUN = (
    "experiment=quadratic_csv",
    "trainer.device=cpu",
    "trainer.epochs=3",
    "checkpoint.every_n_steps=3",
    "run_name=f",
)  # 10 steps per epoch


def test_kill_at_a_saving_step_lands_after_its_save_counting_resumed_steps(server, tmp_path):
    result = server.run(*RUN, root=tmp_path, env=fault_env("kill_at_step=6"), check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert newest(tmp_path / "f") == (6, 0)  # step 6's save is done, nothing after it
    result = server.run(*RUN, "resume=auto", root=tmp_path, env=fault_env("kill_at_step=12"), check=False)
    assert "(resumed at epoch 0, step 6)" in result.stdout
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert newest(tmp_path / "f") == (12, 1)  # the 6th step of this process: global step 12
    assert_all_complete(tmp_path / "f")


def test_an_unknown_fault_name_is_refused():
    with pytest.raises(ValueError, match="unknown fault 'kill_at_stp'"):
        faults.parse("kill_at_stp=3")
    assert faults.parse(" kill_in_write=2, term_at_step=37") == {"kill_in_write": 2, "term_at_step": 37}
