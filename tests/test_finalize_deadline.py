"""train.finalize_within: an MPI_Finalize that never returns ends the rank, with one line and no stacks.

MPI_Finalize holds the GIL; a stand-in communicator blocks in finalize() the same way (time.sleep in C
would release it, so it spins in a C call that does not: a huge integer power). The process must end
about comm.timeout later with status 1, rank 0 printing the one message and no traceback, other ranks
silent; a finalize that returns must end normally, with no watcher left.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dpbp.errors import EXIT_CRASH
from tests.conftest import REPO

SCRIPT = """
import time
from dpbp.train import finalize_within

class Comm:
    rank, size = {rank}, 2
    def barrier(self):
        pass
    def finalize(self):
        if {hang}:
            10 ** (10 ** 9)  # minutes of C code holding the GIL, as mpi4py's MPI_Finalize
finalize_within(Comm(), {timeout})
print("returned")
"""


def run(rank, hang, timeout=1.0):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(rank=rank, hang=hang, timeout=timeout)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - t0


@pytest.mark.parametrize("rank", [0, 1])
def test_a_hung_finalize_ends_the_rank_with_one_line_and_no_stacks(rank):
    p, seconds = run(rank, hang=True)
    print(f"rank {rank}: ended after {seconds:.1f} s, status {p.returncode}")
    assert p.returncode == EXIT_CRASH and seconds < 20, (p.returncode, seconds, p.stderr)
    assert "returned" not in p.stdout
    lines = p.stderr.splitlines()
    if rank == 0:
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith("dpbp.train: MPI_Finalize did not return within comm.timeout = 1 s"), lines
        assert f"exit status {EXIT_CRASH}" in lines[0]
    else:
        assert lines == [], p.stderr  # rank 0 speaks for the job
    assert "Thread" not in p.stderr and "File " not in p.stderr


def test_a_finalize_that_returns_leaves_nothing_behind():
    p, _ = run(0, hang=False, timeout=5.0)
    assert p.returncode == 0 and p.stdout.strip() == "returned" and p.stderr == "", p.stderr
