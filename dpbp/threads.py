"""BLAS threads per rank when the user chose none: the cores this rank may use, shared by the ranks on its node.

OpenBLAS starts one thread per core in every process. With several ranks on a node that oversubscribes the
cores, and its spinning threads then crowd each other out: the benchmark model at ``mpirun -n 2`` on 2 cores
ran an order of magnitude slower until each rank used one thread (docs/performance.md). BLAS libraries read their
thread count once, when they load, so this runs on ``import dpbp`` (before dpbp imports numpy) and only sets
environment variables (or, if numpy was imported first, sets the BLAS pool with threadpoolctl when that
is installed). Standard library only otherwise.
"""

from __future__ import annotations

import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# How launchers tell a process how many ranks share its node: MPICH's Hydra and Intel MPI, Open MPI.
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
        local = int(local) if local is not None else None
    except ValueError:
        return None
    if not local or local < 1:
        return None
    return max(1, usable_cores // local)


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
