"""`python -m dpbp.train` works where mpi4py cannot be imported, through the serial communicator."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, load_params

ARGS = ["--config", os.path.join(REPO, "configs/xor.toml"), "--set", "train.steps=60", "--quiet"]


def run_without_mpi4py(args, env=None):
    """The trainer in a process where `import mpi4py` raises ImportError."""
    code = ("import sys, runpy; sys.modules['mpi4py'] = None; sys.argv = ['dpbp.train'] + sys.argv[1:]; "
            "runpy.run_module('dpbp.train', run_name='__main__')")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=full_env, cwd=REPO)


def test_trains_without_mpi4py_and_matches_the_mpi_run(run_cli, tmp_path):
    proc = run_without_mpi4py([*ARGS[:-1], "--out", tmp_path / "serial"])
    assert proc.returncode == 0, proc.stderr
    assert "serial (no MPI)" in proc.stdout  # the header names the stand-in communicator
    run_cli("train", *ARGS, "--out", tmp_path / "mpi", ranks=1, check=True)
    a, b = load_params(tmp_path / "serial/final.npz"), load_params(tmp_path / "mpi/final.npz")
    assert sorted(a) == sorted(b)
    for k in a:  # a 1-rank Allreduce adds nothing, so the bits agree
        assert np.array_equal(a[k], b[k]), k


def test_under_a_launcher_without_mpi4py_is_a_clear_error(tmp_path):
    proc = run_without_mpi4py([*ARGS, "--out", tmp_path / "x"], env={"PMI_SIZE": "4", "PMI_RANK": "0"})
    assert proc.returncode == 2
    assert "started by an MPI launcher but mpi4py cannot be loaded" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
