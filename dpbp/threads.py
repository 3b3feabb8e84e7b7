"""BLAS threads per rank when the user chose none: the cores this rank may use, shared by the ranks on its node.

OpenBLAS starts one thread per core in every process. With several ranks on a node that oversubscribes the
cores, and its spinning threads then crowd each other out: the benchmark model under ``mpirun -n 2`` ran many
times slower until each rank used one thread (docs/performance.md has the
figures). BLAS libraries read their thread count once, when they load, so this runs on ``import dpbp``
(before dpbp imports numpy) and only sets environment variables (or, if numpy was imported first, sets the
BLAS pool with threadpoolctl when that is installed). Standard library only otherwise. dpbp.launch applies
the same rule for a whole node before it starts the ranks (threads_per_rank is the one place it lives).
"""

from __future__ import annotations

import os
import re
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# How launchers tell a process how many ranks share its node: MPICH's Hydra and Intel MPI, Open MPI
# (and Slurm's srun, through SLURM_STEP_TASKS_PER_NODE: slurm_local_tasks).
LOCAL_RANKS_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def user_chose(environ):
    """True when any thread variable is set: then dpbp leaves all of them alone, whatever their values."""
    return any(environ.get(k) for k in THREAD_VARIABLES)


def threads_per_rank(cores, ranks):
    """The rule: `cores` shared evenly by the `ranks` that run on them, at least one thread each.

    Rounded down, so ranks x threads never exceeds the cores; more ranks than cores get one thread each.
    dpbp.launch applies it for a whole node before starting the ranks, default_blas_threads in each rank.
    """
    return max(1, cores // ranks)


def affinity_cores():
    """The cores this process may run on (its CPU affinity: a cgroup, a taskset, a scheduler's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_blas_threads(environ, usable_cores):
    """Threads per rank to set, or None to leave the environment alone.

    None when the user set any thread variable, or when no launcher says how many ranks share the node
    (a single process keeps the BLAS default: all cores). Otherwise the cores this rank may run on, split
    evenly among the node's ranks. That never oversubscribes: if the ranks were bound to separate cores it
    can leave some idle (set OMP_NUM_THREADS then), but bound to a socket or restricted by a container, the
    ranks share the cores they see, and giving each all of them would start ranks x cores threads.
    """
    if user_chose(environ):
        return None
    local = next((environ[k] for k in LOCAL_RANKS_VARIABLES if environ.get(k)), None)
    try:
        local = int(local) if local is not None else slurm_local_tasks(environ)
    except ValueError:
        return None
    if not local or local < 1:
        return None
    return threads_per_rank(usable_cores, local)


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


def element_wise_threads(environ=os.environ, usable_cores=None):
    """Threads for the element-wise passes of a step (dpbp.workers): as many as this rank's BLAS runs.

    The first thread variable set, in OpenBLAS's order of precedence (apply_default sets them all), else
    every core this rank may use (BLAS's own default); never more than those cores, at least one."""
    cores = affinity_cores() if usable_cores is None else usable_cores
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = (environ.get(k) or "").strip()
        if value:
            return max(1, min(int(value), cores)) if value.isdigit() else 1
    return max(1, cores)


def apply_default(environ=os.environ):
    threads = default_blas_threads(environ, affinity_cores())
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
