"""comm.start_up_deadline: MPI_Init that waits for a rank which never comes ends by itself, with one message.

MPI_Init cannot be made to wait here without a launcher that leaves a dead rank's peers alone (srun
--kill-on-bad-exit=0: tests/cluster/test_startup.py does that across hosts), so these tests put a sleep
in the block instead and set the launcher's variables by hand.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dpbp.comm import start_timeout, start_up_deadline
from dpbp.errors import UserError

BLOCK = ("import time; from dpbp.comm import start_up_deadline\n"
         "with start_up_deadline({deadline}):\n    time.sleep({sleep})\nprint('after the block')\n")


def run(deadline, sleep, env):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", BLOCK.format(deadline=deadline, sleep=sleep)], env=env,
                       capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - t0


def launcher_env(rank):
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "OMPI_", "PMIX_"))}
    return {**env, "PMI_RANK": str(rank), "PMI_SIZE": "2"}


def test_a_block_past_its_deadline_is_killed_and_rank_0_says_why():
    p, took = run(0.5, 30, launcher_env(0))
    assert p.returncode == -9 and took < 15, (p.returncode, took)
    assert "after the block" not in p.stdout
    assert p.stderr.count("MPI start-up did not finish within 0.5 s") == 1, p.stderr


def test_other_ranks_are_killed_silently():
    p, _ = run(0.5, 30, launcher_env(1))
    assert p.returncode == -9 and p.stderr == "", p.stderr


def test_a_block_within_its_deadline_runs_on_and_leaves_no_watcher(monkeypatch):
    p, _ = run(5, 0.2, launcher_env(0))
    assert p.returncode == 0 and "after the block" in p.stdout and p.stderr == "", p.stderr
    import os
    children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    before = set(open(children).read().split())  # other tests may have left children of their own
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with start_up_deadline(5):  # in this process too: a watcher runs during the block, is reaped after it
        during = set(open(children).read().split())
    assert len(during - before) == 1, (before, during)
    assert set(open(children).read().split()) <= before


def test_no_watcher_without_a_launcher():
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "OMPI_", "PMIX_", "MPI_"))}
    p, _ = run(0.2, 1.0, env)  # a singleton has no fence to wait in: nothing is killed
    assert p.returncode == 0 and "after the block" in p.stdout


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_start_timeout_is_named(monkeypatch, value):
    monkeypatch.setenv("DPBP_START_TIMEOUT", value)
    with pytest.raises(UserError, match=f"DPBP_START_TIMEOUT must be a number of seconds >= 0.*{value}"):
        start_timeout()


def test_start_timeout_default_and_override(monkeypatch):
    monkeypatch.delenv("DPBP_START_TIMEOUT", raising=False)
    assert start_timeout() == 60.0
    monkeypatch.setenv("DPBP_START_TIMEOUT", "2.5")
    assert start_timeout() == 2.5
