"""The communicator: the only module that imports mpi4py.

``get_comm()`` returns an ``MPIComm`` (mpi4py's COMM_WORLD) or, where mpi4py cannot be imported and the
process was not started by an MPI launcher, a ``SerialComm`` of one rank with the same interface.
Every method is collective except ``abort``; callers issue them in the same order on every rank.
"""

from __future__ import annotations

import os
import sys
import time

from dpbp.errors import UserError

# Environment variables that MPI launchers (hydra, Open MPI, Slurm's PMI) set in the ranks they start.
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def rank_list(ranks, size):
    """Ranks in words for messages: "rank 3", "ranks 1, 2", "all ranks"."""
    if len(ranks) == size and size > 1:
        return "all ranks"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class Collectives:
    """Collectives built on allgather, the same for every communicator."""

    def agree(self, error: str | None):
        """Collective: raise the same UserError on every rank if any rank found one (lowest rank's wins)."""
        errors = self.allgather(error)
        for r, msg in enumerate(errors):
            if msg is not None:
                raise UserError(msg if r == 0 or self.size == 1 else f"(rank {r}) {msg}")

    def agreed(self, fn, *args):
        """Collective: fn(*args) on every rank; if it raised UserError on any rank, the same one on all."""
        error = result = None
        try:
            result = fn(*args)
        except UserError as e:
            error = str(e)
        self.agree(error)
        return result


class SerialComm(Collectives):
    """A world of one rank: every reduction is the identity."""

    rank = 0
    size = 1
    library = "serial (no MPI)"

    def allreduce_sum_(self, buf):
        return buf

    def allreduce_max_(self, buf):
        return buf

    def iallreduce_sum_(self, buf):
        return _DoneRequest()

    def reduce_scatter_sum_(self, buf, counts):
        return buf

    def allgather_(self, buf, counts):
        return buf

    def test_all(self, requests):
        return True

    def wait_all(self, requests):
        pass

    def bcast(self, obj):
        return obj

    def allgather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def ibarrier(self):
        return _DoneRequest()

    def failure_channel(self):
        return FailureChannel(None)

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _DoneRequest:
    def Wait(self):
        pass

    def Test(self):
        return True


class MPIComm(Collectives):
    """mpi4py's buffer interface: in-place, no pickling on the hot path."""

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.library = MPI.Get_library_version().strip().splitlines()[0]

    def allreduce_sum_(self, buf):
        """buf <- sum over ranks of buf, in place (one MPI_Allreduce on the contiguous buffer)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def allreduce_max_(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)
        return buf

    def reduce_scatter_sum_(self, buf, counts):
        """buf (sum(counts),): rank r's slice (counts[r] entries, slices in rank order) <- its sum over ranks,
        in place (one MPI_Reduce_scatter, MPI_IN_PLACE); the rest of buf is left undefined."""
        self.comm.Reduce_scatter(self.MPI.IN_PLACE, buf, recvcounts=list(counts), op=self.MPI.SUM)
        lo, n = sum(counts[:self.rank]), counts[self.rank]
        if lo and n:  # MPI leaves this rank's result at the start of buf
            buf[lo:lo + n] = buf[:n]  # NumPy copies overlapping slices through a temporary
        return buf

    def allgather_(self, buf, counts):
        """buf (sum(counts),): every rank's slice (counts[r] entries, in rank order) copied to all ranks, in
        place (one MPI_Allgatherv, MPI_IN_PLACE)."""
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, list(counts)])
        return buf

    def iallreduce_sum_(self, buf):
        """Start a non-blocking in-place sum; the caller Waits on the returned request."""
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def test_all(self, requests):
        """Let MPI progress the requests (MPICH advances non-blocking collectives inside MPI calls)."""
        return self.MPI.Request.Testall(requests)

    def wait_all(self, requests):
        self.MPI.Request.Waitall(requests)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def ibarrier(self):
        """A non-blocking barrier: poll its Test() with sleeps to wait without spinning a core."""
        return self.comm.Ibarrier()

    def failure_channel(self):
        """Collective (call once, at start): a private duplicate of the world for failing ranks."""
        return FailureChannel(self.comm.Dup() if self.size > 1 else None)

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class FailureChannel:
    """Where failing ranks find out whether every rank failed at the same point.

    It lives on a private duplicate of the world communicator, so it can never match a collective that
    healthy ranks are blocked in; the caller decides what to do when the others do not arrive.
    """

    def __init__(self, private):
        self.private = private

    def gather(self, item, grace_s):
        """Every rank's item if all ranks call this within grace_s seconds, else None."""
        if self.private is None:
            return [item]
        request = self.private.Ibarrier()
        deadline = time.monotonic() + grace_s
        while not request.Test():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)  # poll gently: the rank we wait for may need this core
        return self.private.allgather(item)


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def get_comm():
    """COMM_WORLD through mpi4py, or the serial stand-in where there is no MPI to be had."""
    if os.environ.get("DPBP_SERIAL") == "1":
        return SerialComm()
    try:
        import mpi4py
        mpi4py.rc.threads = False  # the trainer is single-threaded; MPI_THREAD_SINGLE is cheapest
        from mpi4py import MPI
    except ImportError as e:  # also raised when libmpi itself cannot be loaded
        if launched_by_mpi():
            raise UserError(f"started by an MPI launcher but mpi4py cannot be loaded ({e}); install it "
                            f"with `pip install mpi4py mpich`, or against your cluster's MPI") from None
        return SerialComm()
    return MPIComm(MPI, MPI.COMM_WORLD)
