"""BLAS threads per rank when the user chose none: the cores this rank may use, shared by the ranks on its node.

OpenBLAS starts one thread per core in every process. With several ranks on a node that oversubscribes the
cores, and its spinning threads then crowd each other out: the benchmark model at ``mpirun -n 2`` on 2 cores
ran 12x slower (1,320 against 15,900 samples/s) until each rank used one thread. BLAS libraries read their
thread count once, when they load, so this runs on ``import dpbp`` (before dpbp imports numpy) and only sets
environment variables (or, if numpy was imported first, sets the BLAS pool with threadpoolctl when that
is installed). Standard library only otherwise.
"""

from __future__ import annotations

import os
import re
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# How launchers tell a process how many ranks share its node: MPICH's Hydra and Intel MPI, Open MPI
# (and Slurm's srun, through SLURM_STEP_TASKS_PER_NODE: slurm_local_tasks).
LOCAL_RANKS_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def default_blas_threads(environ, usable_cores):
    """Threads per rank to set, or None to leave the environment alone.

    None when the user set any thread variable, or when no launcher says how many ranks share the node
    (a single process keeps the BLAS default: all cores). Otherwise the cores this rank may run on, split
    evenly among the node's ranks. That never oversubscribes: if the ranks were bound to separate cores it
    can leave some idle (set OMP_NUM_THREADS then), but bound to a socket or restricted by a container, the
    ranks share the cores they see, and giving each all of them would start ranks x cores threads.
    """
    if any(environ.get(k) for k in THREAD_VARIABLES):
        return None
    local = next((environ[k] for k in LOCAL_RANKS_VARIABLES if environ.get(k)), None)
    try:
        local = int(local) if local is not None else slurm_local_tasks(environ)
    except ValueError:
        return None
    if not local or local < 1:
        return None
    return max(1, usable_cores // local)


def slurm_local_tasks(environ):
    """Tasks of this Slurm step on this node (srun starts the ranks itself and sets no MPI_LOCALNRANKS).

    SLURM_STEP_TASKS_PER_NODE lists the step's tasks per node in node order, runs compressed as
    "2(x3),1"; SLURM_NODEID is this node's index in it. None outside a step. ValueError if malformed.
    """
    per_node, node = environ.get("SLURM_STEP_TASKS_PER_NODE"), environ.get("SLURM_NODEID")
    if not per_node or node is None:
        return None
    counts = []
    for part in per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m is None:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE {per_node} is not like 2(x3),1")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(node)
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM_NODEID {node} outside SLURM_STEP_TASKS_PER_NODE {per_node}")
    return counts[node]


def apply_default(environ=os.environ):
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    threads = default_blas_threads(environ, usable)
    if threads is None:
        return None
    for k in THREAD_VARIABLES:
        environ[k] = str(threads)
    if "numpy" in sys.modules:  # too late for the variables (a script imported numpy first): set the pool itself
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return threads
        threadpool_limits(limits=threads, user_api="blas")
    return threads
