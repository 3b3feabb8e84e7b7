"""Shared helpers: run a dpbp command as a user would (alone or under mpirun), with a hard time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun_exe():
    """The mpirun next to this interpreter (the mpich wheel's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else "mpirun"


def clean_env(env=None):
    """This environment for a dpbp command under test: no fault-injection hooks or world-size check left
    over from the caller, 1 BLAS thread unless set, then `env` on top."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DPBP_FAULT", "DPBP_STEP_SLEEP", "DPBP_SAVE_SLEEP", "DPBP_STALL_S",
                              "DPBP_EXPECT_WORLD_SIZE")}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return full_env


def dpbp_command(module, *args, ranks=None, env=None):
    """(argv, environment) that run `python -m dpbp.<module> args`, under `mpirun -n ranks` if given."""
    cmd = [sys.executable, "-m", f"dpbp.{module}", *map(str, args)]
    if ranks is not None:
        cmd = [mpirun_exe(), "-n", str(ranks), *cmd]
    return cmd, clean_env(env)


def dpbp(module, *args, ranks=None, timeout=180, env=None, check=False, cwd=REPO):
    """Run `python -m dpbp.<module> args` (under `mpirun -n ranks` if given); returns CompletedProcess."""
    cmd, full_env = dpbp_command(module, *args, ranks=ranks, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run_dir):
    """(training records, held-out records) of a run's metrics.jsonl, in file order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "val"]


def rchar():
    """Bytes this process has read through system calls (Linux /proc/self/io), page cache or not."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def load_params(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k.startswith("layers.")}


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun with --with-mpi; the serial run leaves it out (no skips)."""
    if collection_path.name == "mpi" and not config.getoption("with_mpi", default=False):
        return True
    return None


@pytest.fixture
def run_cli():
    return dpbp
