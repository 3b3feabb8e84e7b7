"""launch/local.sh: plain mpirun with a world-size check, SIGTERM -> checkpoint + 75, rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env
from tests.jobs import assert_bitwise_equal, small

SCRIPT = os.path.join(REPO, "launch/local.sh")


def local_env():
    env = {k: v for k, v in clean_env().items() if not k.startswith(("OMP_", "OPENBLAS_NUM"))}  # local.sh chooses
    env.update(DPBP_PYTHON=sys.executable, DPBP_MPIRUN=os.path.join(os.path.dirname(sys.executable), "mpirun"))
    return env


def launch(args, **env):
    full = local_env()
    full.update(env)
    return subprocess.Popen(["bash", SCRIPT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full, cwd=REPO, start_new_session=True)


@pytest.mark.timeout(180)
def test_sigterm_checkpoints_and_the_same_command_resumes_bitwise(tmp_path):
    config, *rest = small(60, "--set", "train.log_every=1", "--set", "comm.reduce='reproducible'",
                          "--set", "comm.chunk=8")[1:]
    args = ["-n", "2", config, *rest]
    reference = tmp_path / "reference"
    done = launch([*args, "--out", reference])
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0, out
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # local.sh: the cores (nproc) shared by the 2 ranks
    assert "2 ranks on" in out and f"{threads} BLAS thread(s) per rank" in out

    run = tmp_path / "run"
    job = launch([*args, "--out", run], DPBP_STEP_SLEEP="0.05")
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() or "step" not in (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and job.poll() is None, "the job never started training"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGTERM)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 75, out
    assert any(name.startswith("ckpt-") for name in os.listdir(run))

    again = launch([*args, "--out", run])
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert "resuming" in out
    assert_bitwise_equal(reference / "final.npz", run / "final.npz")
    log = (run / "launch.log").read_text()
    assert log.count("no checkpoint yet, fresh start") == 1  # appended across both runs, not overwritten
    assert log.count(": resuming (newest checkpoint file") == 1


@pytest.mark.timeout(60)
def test_a_missing_config_is_refused(tmp_path):
    proc = launch(["-n", "2", tmp_path / "nope.toml"])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "config file" in out and "not found" in out
