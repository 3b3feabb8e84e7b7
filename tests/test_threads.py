"""BLAS threads per rank: chosen from the launcher's local rank count unless the user chose."""

import os
import subprocess
import sys

import pytest

from dpbp.threads import THREAD_VARIABLES, default_blas_threads
from tests.conftest import mpirun_exe

PROBE = ("import dpbp, os, numpy; from threadpoolctl import threadpool_info; "
         "blas = [p for p in threadpool_info() if p['user_api'] == 'blas' and 'numpy' in p['filepath']]; "
         "os.write(1, f\"{os.environ.get('OPENBLAS_NUM_THREADS')} {blas[0]['num_threads']}\\n\".encode())")
# one write(2) per rank: lines from two ranks cannot interleave


@pytest.mark.parametrize("local, usable, expected", [
    ("2", 2, 1), ("4", 2, 1), ("2", 8, 4), ("3", 8, 2),
    ("2", 4, 2),  # 4 of 8 cores to run on (a socket, a container): shared with the other rank
    ("8", 16, 2),  # bound to one socket of two: never 16 threads for each of 8 ranks
    ("1", 8, 8),
])
def test_ranks_share_the_cores(local, usable, expected):
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        assert default_blas_threads({var: local}, usable) == expected


@pytest.mark.parametrize("per_node, node, usable, expected", [
    ("2(x3),1", "0", 4, 2), ("2(x3),1", "2", 4, 2), ("2(x3),1", "3", 4, 4),  # 3 nodes with 2, then 1
    ("3,1", "0", 2, 1), ("3,1", "1", 2, 2), ("4", "0", 8, 2),
])
def test_srun_steps_share_the_cores_of_each_node(per_node, node, usable, expected):
    """srun starts the ranks itself: the node's share of the step's tasks comes from Slurm's variables."""
    environ = {"SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_NODEID": node}
    assert default_blas_threads(environ, usable) == expected
    assert default_blas_threads({**environ, "MPI_LOCALNRANKS": "1"}, usable) == usable  # mpirun's wins


@pytest.mark.parametrize("environ", [
    {"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "2"},  # no such node: leave it alone
    {"SLURM_STEP_TASKS_PER_NODE": "2(x", "SLURM_NODEID": "0"},
    {"SLURM_NODEID": "0"},  # the batch script, outside any step
    {},  # a single process, no launcher: the BLAS default (all cores)
    {"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "2"},  # the user chose
    {"MPI_LOCALNRANKS": "2", "OPENBLAS_NUM_THREADS": "3"},
    {"MPI_LOCALNRANKS": "2", "MKL_NUM_THREADS": "1"},
    {"MPI_LOCALNRANKS": "many"},  # not a count: leave it alone rather than guess
])
def test_left_alone(environ):
    assert default_blas_threads(environ, 8) is None


def _probe(env, ranks):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES} | env
    proc = subprocess.run([mpirun_exe(), "-n", str(ranks), sys.executable, "-c", PROBE],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_under_mpirun_numpy_uses_the_chosen_threads():
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert _probe({}, 2) == [f"{expected} {expected}"] * 2
    assert _probe({"OPENBLAS_NUM_THREADS": "2"}, 2) == ["2 2"] * 2


def test_numpy_imported_before_dpbp_gets_the_threads_too():
    """Then the variables come too late for OpenBLAS; dpbp sets the loaded pool through threadpoolctl."""
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    numpy_first = PROBE.replace("import dpbp, os, numpy;", "import numpy, os, dpbp;")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    proc = subprocess.run([mpirun_exe(), "-n", "2", sys.executable, "-c", numpy_first],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{expected} {expected}"] * 2
