"""The communicator: the only module that imports mpi4py.

``get_comm()`` returns an ``MPIComm`` (mpi4py's COMM_WORLD) or, where mpi4py cannot be imported and the
process was not started by an MPI launcher, a ``SerialComm`` of one rank with the same interface.
Every method is collective except ``abort``; callers issue them in the same order on every rank.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time

from dpbp import pmi_relay
from dpbp.errors import UserError

# Environment variables that MPI launchers (hydra, Open MPI, Slurm's PMI) set in the ranks they start.
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
# Where launchers put the rank before MPI is initialised (hydra and Slurm's PMI: PMI_RANK; srun: SLURM_PROCID).
_RANK_VARS = ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
START_TIMEOUT_S = 60.0  # MPI start-up's deadline unless DPBP_START_TIMEOUT says otherwise (0: none)


def rank_list(ranks, size):
    """Ranks in words for messages: "rank 3", "ranks 1, 2", "all ranks"."""
    if len(ranks) == size and size > 1:
        return "all ranks"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class Deadline:
    """What this rank's main thread is doing, for the watchdog thread (dpbp/watchdog.py) to read.

    Written by the main thread without locks or clock reads: ``calls`` counts entries into and exits from
    blocking MPI calls (odd while in one), ``what`` names the call, ``step`` is the step being computed
    (1-based; 0 during start-up) and ``phase`` None for ordinary work, or the words for a legitimately
    long one ("writing a checkpoint", ...). The watchdog times how long ``calls`` stays unchanged.
    """

    __slots__ = ("calls", "what", "step", "phase")

    def __init__(self):
        self.calls, self.what, self.step, self.phase = 0, "", 0, None


def armed(call, slot, what):
    """call, telling slot (a Deadline) while it blocks: two integer increments and one store (no clock
    read: on some VMs one costs 0.4 us)."""
    def call_armed(*args):
        slot.what = what
        slot.calls += 1
        try:
            return call(*args)
        finally:
            slot.calls += 1
    return call_armed


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

    def hosts(self, extra=None):
        """Collective: where every rank runs, one dict per rank (in rank order) for the run's header.

        Each holds the rank, its host name and IPv4 address, its local rank and the number of ranks on its
        node (as MPI sees locality), the number of this rank's established TCP connections to other hosts'
        addresses (read after an allgather that crossed hosts: evidence of the transport actually used),
        and `extra` (e.g. this rank's BLAS threads). A second allgather shares the counts.
        """
        local_rank, local_size = self.local_rank_size()
        me = {"host": socket.gethostname(), "address": host_address(), "local_rank": local_rank,
              "local_size": local_size, **(extra or {})}
        records = self.allgather(me)
        others = {r["address"] for r in records if r["host"] != me["host"] and r["address"]}
        tcp = self.allgather(tcp_connections_to(others) if others else 0)
        return [{"rank": r, **rec, "tcp_to_other_hosts": tcp[r]} for r, rec in enumerate(records)]

    def transport(self, records):
        """The MPI transport between the hosts of `records` (from hosts()), in words; not collective."""
        return transport(records, self.library_details)


class SerialComm(Collectives):
    """A world of one rank: every reduction is the identity."""

    rank = 0
    size = 1
    library = library_details = "serial (no MPI)"
    deadline = None  # no peers to wait for: nothing to watch

    def watch(self, slot):
        pass

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

    def local_rank_size(self):
        return 0, 1

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def finalize(self):
        pass


class _DoneRequest:
    def Wait(self):
        pass

    def Test(self):
        return True


class MPIComm(Collectives):
    """mpi4py's buffer interface: in-place, no pickling on the hot path.

    ``watch(slot)`` arms every blocking method (BLOCKING) for a watchdog (dpbp/watchdog.py); unwatched,
    they are the plain methods below.
    """

    BLOCKING = {"allreduce_sum_": "MPI_Allreduce", "allreduce_max_": "MPI_Allreduce",
                "reduce_scatter_sum_": "MPI_Reduce_scatter", "allgather_": "MPI_Allgatherv",
                "wait_all": "MPI_Waitall", "bcast": "MPI_Bcast", "allgather": "MPI_Allgather",
                "barrier": "MPI_Barrier", "failure_channel": "MPI_Comm_dup",
                "local_rank_size": "MPI_Comm_split_type", "finalize": "MPI_Finalize"}

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        self.deadline: Deadline | None = None
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.library = MPI.Get_library_version().strip().splitlines()[0]
        self.library_details = MPI.Get_library_version().strip()

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

    def local_rank_size(self):
        """Collective: (rank among the ranks sharing this node's memory, their number), as MPI sees it."""
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def watch(self, slot):
        """Arm every blocking method to tell slot (a Deadline) while it blocks; None: disarm."""
        self.deadline = slot
        for name, what in self.BLOCKING.items():
            if slot is None:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, armed(getattr(type(self), name).__get__(self), slot, what))

    def finalize(self):
        """MPI_Finalize now, while a watchdog can still see it (at interpreter exit no thread runs)."""
        if not self.MPI.Is_finalized():
            self.MPI.Finalize()


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


def host_address():
    """This host's IPv4 address as other hosts see it: what its name resolves to unless that is a loopback
    address (as on many single machines), else the first non-loopback interface's; None if it has none."""
    try:
        address = socket.gethostbyname(socket.gethostname())
        if not address.startswith("127."):
            return address
    except OSError:
        pass
    import fcntl
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address, bytes 20-24 of the returned ifreq
                ifreq = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            address = socket.inet_ntoa(ifreq[20:24])
            if not address.startswith("127."):
                return address
    return None


def tcp_connections_to(addresses):
    """How many of this process's established TCP connections go to one of `addresses` (IPv4 strings).

    Linux only (/proc/self/fd and /proc/self/net/tcp, tcp6 with IPv4-mapped addresses); 0 elsewhere.
    """
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        wanted = {socket.inet_aton(a)[::-1].hex().upper() for a in addresses}  # /proc's little-endian hex
        count = 0
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote, state, inode = fields[2].split(":")[0], fields[3], fields[9]
                    if state == "01" and inode in inodes and remote[-8:] in wanted:
                        count += 1
        return count
    except OSError:
        return 0


def transport(records, library):
    """The MPI transport between hosts, in words, from the library, its settings and `records` (hosts()).

    MPICH's ch4 picks its network module (MPIR_CVAR_CH4_NETMOD, else the first one it was built with)
    and that module its own transport (UCX_TLS, FI_PROVIDER; unset means the library chooses). Which
    it chose is not exposed through mpi4py, so the TCP connections the ranks hold to other hosts are
    reported too: none at all means the data went some other way (shared memory between "hosts" that
    are one machine, or RDMA).
    """
    hosts = {r["host"] for r in records}
    if len(hosts) == 1:
        return "shared memory (1 host)"
    words = []
    if library.startswith("MPICH"):
        built = next((line.split(":", 1)[1].split() for line in library.splitlines()
                      if line.startswith("MPICH Device:")), [])
        netmod = os.environ.get("MPIR_CVAR_CH4_NETMOD") or (built[0].split(":")[-1] if built else "?")
        words.append(f"MPICH netmod {netmod}")
        knob = {"ucx": "UCX_TLS", "ofi": "FI_PROVIDER"}.get(netmod)
        if knob:
            words.append(f"{knob}={os.environ.get(knob, 'auto')}")
    with_tcp = sum(1 for r in records if r["tcp_to_other_hosts"] > 0)
    if with_tcp:
        words.append(f"TCP between hosts (connections to other hosts on {with_tcp} of {len(records)} ranks)")
    else:
        words.append("no TCP connection between hosts (shared memory or RDMA)")
    return ", ".join(words)


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def get_comm():
    """COMM_WORLD through mpi4py, or the serial stand-in where there is no MPI to be had."""
    if os.environ.get("DPBP_SERIAL") == "1":
        return SerialComm()
    if pmi_relay.wanted():  # srun --mpi=pmi2: Slurm's PMI-1 reader takes at most 1,024 bytes a request
        pmi_relay.start()
    try:
        import mpi4py
        mpi4py.rc.threads = False  # the trainer is single-threaded; MPI_THREAD_SINGLE is cheapest
        with start_up_deadline(start_timeout()):
            from mpi4py import MPI  # MPI_Init: waits for every rank of the job
    except ImportError as e:  # also raised when libmpi itself cannot be loaded
        if launched_by_mpi():
            raise UserError(f"started by an MPI launcher but mpi4py cannot be loaded ({e}); install it "
                            f"with `pip install mpi4py mpich`, or against your cluster's MPI") from None
        return SerialComm()
    return MPIComm(MPI, MPI.COMM_WORLD)


def start_timeout() -> float:
    """Seconds MPI start-up may take: DPBP_START_TIMEOUT, else START_TIMEOUT_S; a bad value is a UserError."""
    text = os.environ.get("DPBP_START_TIMEOUT", "")
    try:
        seconds = float(text) if text else START_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"DPBP_START_TIMEOUT must be a number of seconds >= 0 (0: no deadline), not {text!r}")
    return seconds


@contextlib.contextmanager
def start_up_deadline(seconds: float):
    """Kill this process if the block (MPI_Init) has not finished within `seconds`, with one message.

    MPI_Init waits in a fence for every rank of the job. A rank that dies before it arrives (a crash at
    start, a lost host) leaves the others there forever when the launcher does not kill them (srun with
    --kill-on-bad-exit=0), and mpi4py holds the GIL during MPI_Init, so no thread of this process can
    run: a forked watcher (``forked_deadline``) ends it. Only where an MPI launcher started us (a
    singleton has no fence); the fork happens before MPI exists.
    """
    if not seconds or not launched_by_mpi():
        yield
        return
    message = (f"dpbp: MPI start-up did not finish within {seconds:g} s: a rank of this job did not start or "
               f"died while starting (the launcher's messages name it); ending this attempt "
               f"(DPBP_START_TIMEOUT sets the limit)")
    with forked_deadline(seconds, message if launcher_rank() in (0, None) else None, kill=True):
        yield


@contextlib.contextmanager
def forked_deadline(seconds: float, message: str | None, kill: bool):
    """If the block has not ended within `seconds`, a forked watcher writes `message` (if any) to stderr
    and, with kill, SIGKILLs this process.

    For blocking calls that hold the GIL (mpi4py's MPI_Init and MPI_Finalize), where no thread of this
    process can run. The watcher waits for the end of the block (the pipe closing), does nothing else
    (no Python-level cleanup, no MPI, no BLAS) and is reaped when the block ends."""
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher
        os.close(done_w)
        ended, _, _ = select.select([done_r], [], [], seconds)
        if not ended:
            if message:
                os.write(2, (message + "\n").encode())
            if kill:
                os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)
    os.close(done_r)
    try:
        yield
    finally:
        os.close(done_w)  # the watcher sees end-of-file and leaves
        os.waitpid(pid, 0)


def launcher_rank() -> int | None:
    """This process's rank as its launcher set it in the environment, before MPI_Init; None if unknown."""
    for name in _RANK_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None
