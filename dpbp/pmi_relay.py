"""A PMI-1 relay between MPICH and Slurm's pmi2 plugin that keeps every request under 1,024 bytes.

Why: Slurm's pmi2 plugin reads a PMI-1 request with one read() of at most 1,024 bytes
(src/plugins/mpi/pmi2/pmi1.c, handle_pmi1_cmd: "TODO: read until newline"). The PyPI wheel's MPICH
speaks only PMI-1, and at start-up on several nodes it puts each node's UCX address as segments of up
to vallen_max - 2 hex characters, run-length compressed; with the key and kvsname a line can reach
~1,076 bytes. Slurm then takes it in two pieces ("mpi/pmi2: value not properly terminated in client
request", "request not begin with 'cmd='") and MPI_Init fails or hangs. How long the lines are depends
on the heap bytes MPICH sends after the address (it sends MPID_MAX_BC_SIZE = 4,096 bytes of it), so
some jobs always fail and others never do.

What: the rank's PMI socket is swapped for one end of a socketpair (``start``); this process sits
between it and Slurm's socket, forwards every line unchanged, and lowers the ``vallen_max`` of the
``cmd=maxes`` reply to VALLEN_MAX. MPICH then cuts its values into shorter segments, so no request it
sends exceeds Slurm's read. It ends when either side closes (the rank exiting, even by SIGKILL),
ignores the job's signals (they are the rank's to act on) and uses the standard library only.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys

# Slurm reads at most 1,024 bytes of one request. A put is "cmd=put kvsname=J.S key=K value=V\n": 29
# characters, a kvsname of at most 21 (two 32-bit ids), a key of at most 64 (keylen_max) and MPICH's V of
# at most vallen_max - 2, so with 900 the longest put is 29 + 21 + 64 + 898 = 1,012 bytes.
VALLEN_MAX = 900
_MAXES = re.compile(rb"^(cmd=maxes\b.*\bvallen_max=)(\d+)")


def wanted(environ=os.environ) -> bool:
    """Whether this rank talks PMI-1 to Slurm's pmi2 plugin (srun --mpi=pmi2): a PMI_FD from a Slurm step
    that hydra (mpirun, which sets PMI_HOSTNAME and serves long lines) did not hand out. DPBP_PMI_RELAY=1
    or 0 decides instead."""
    choice = environ.get("DPBP_PMI_RELAY", "")
    if choice in ("0", "1"):
        return choice == "1"
    return "PMI_FD" in environ and "SLURM_STEP_ID" in environ and "PMI_HOSTNAME" not in environ


def start(environ=os.environ) -> subprocess.Popen:
    """Put the relay between this process and the PMI server at PMI_FD: the fd keeps its number (MPICH
    finds it there) but now reaches the relay, which alone holds the server's socket."""
    fd = int(environ["PMI_FD"])
    mine, theirs = socket.socketpair()
    relay = subprocess.Popen([sys.executable, "-m", "dpbp.pmi_relay", str(fd), str(theirs.fileno())],
                             pass_fds=(fd, theirs.fileno()), stdin=subprocess.DEVNULL)
    theirs.close()
    os.dup2(mine.fileno(), fd)
    mine.close()
    return relay


def lowered(line: bytes) -> bytes:
    """The server's line, with a maxes reply's vallen_max lowered to VALLEN_MAX."""
    m = _MAXES.match(line)
    if m and int(m.group(2)) > VALLEN_MAX:
        return line[:m.start(2)] + str(VALLEN_MAX).encode() + line[m.end(2):]
    return line


def relay(server: socket.socket, client: socket.socket) -> None:
    """Forward whole lines both ways until either side closes; each line goes out in one send, so the
    server's single read takes it whole (PMI-1 is one request, one reply: no two lines are in flight)."""
    pending = {server: b"", client: b""}
    peer = {server: client, client: server}
    while True:
        readable, _, _ = select.select([server, client], [], [])
        for side in readable:
            data = side.recv(65536)
            if not data:
                return
            pending[side] += data
            *lines, pending[side] = pending[side].split(b"\n")
            for line in lines:
                out = lowered(line) if side is server else line
                peer[side].sendall(out + b"\n")


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    server = socket.socket(fileno=int(argv[0]))
    client = socket.socket(fileno=int(argv[1]))
    try:
        relay(server, client)
    except OSError:  # a side went away mid-line: the rank is gone or the step is ending
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
