"""dpbp/pmi_relay.py against a stand-in PMI-1 server (a socketpair): whole lines both ways, vallen_max lowered
so that a put of MPICH's longest segment fits Slurm's one read of 1,024 bytes, the relay gone with the rank.
Against Slurm's real pmi2 plugin: tests/cluster/test_pmi.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dpbp import pmi_relay

SLURM_MAXES = b"cmd=maxes rc=0 kvsname_max=256 keylen_max=64 vallen_max=1024\n"  # pmi1.c, _handle_get_maxes


class Pair:
    """A server socket and a client socket with the relay (a thread, as in the relay process) between."""

    def __init__(self):
        self.server, server_end = socket.socketpair()
        self.client, client_end = socket.socketpair()
        self.thread = threading.Thread(target=pmi_relay.relay, args=(server_end, client_end), daemon=True)
        self.thread.start()
        self.ends = (server_end, client_end)

    def close(self):
        self.client.close()  # the relay sees end-of-file and returns before its sockets go
        self.thread.join(5)
        for s in (self.server, *self.ends):
            s.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def read_line(sock: socket.socket, timeout=5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(4096)
    return data


def test_the_maxes_reply_leaves_room_for_a_put_of_mpichs_longest_segment(pair):
    pair.client.sendall(b"cmd=get_maxes\n")
    assert read_line(pair.server) == b"cmd=get_maxes\n"
    pair.server.sendall(SLURM_MAXES)
    reply = read_line(pair.client)
    fields = dict(kv.split(b"=") for kv in reply.split())
    assert fields[b"cmd"] == b"maxes" and fields[b"keylen_max"] == b"64" and fields[b"kvsname_max"] == b"256"
    vallen = int(fields[b"vallen_max"])
    # MPICH's segment: the hex of (vallen_max - 2) // 2 bytes; the longest kvsname Slurm makes is
    # "jobid.stepid" of two 32-bit numbers, the longest key keylen_max characters
    put = b"cmd=put kvsname=%s key=%s value=%s\n" % (b"4294967295.4294967295", b"k" * 64, b"F" * (vallen - 2))
    assert len(put) <= 1024 < len(put.replace(b"F" * (vallen - 2), b"F" * 1022))


def test_a_smaller_vallen_max_and_every_other_line_pass_unchanged(pair):
    for line in (b"cmd=maxes rc=0 kvsname_max=256 keylen_max=64 vallen_max=256\n",
                 b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n",
                 b"cmd=get_result rc=0 value=vallen_max=5000\n"):
        pair.server.sendall(line)
        assert read_line(pair.client) == line


def test_a_request_written_in_pieces_reaches_the_server_in_one_read(pair):
    line = b"cmd=put kvsname=7.0 key=-allgather-1-0-seg-1/9 value=" + b"A[3]0F" * 140 + b"\n"
    for k in range(0, len(line), 100):
        pair.client.sendall(line[k:k + 100])
        time.sleep(0.01)
    pair.server.settimeout(5)
    assert pair.server.recv(4096) == line  # Slurm's reader: one read() of the request


def test_the_relay_ends_when_the_rank_closes_its_end(pair):
    pair.client.close()
    pair.thread.join(5)
    assert not pair.thread.is_alive()


def test_start_swaps_the_pmi_fd_for_the_relay_which_ignores_signals_and_leaves_with_the_rank(tmp_path):
    """In a child standing in for a rank: PMI_FD keeps its number but reaches the relay process."""
    server, rank_end = socket.socketpair()
    script = ("import os, socket, sys\n"
              "from dpbp import pmi_relay\n"
              "relay = pmi_relay.start()\n"
              "print(relay.pid, flush=True)\n"
              "s = socket.socket(fileno=int(os.environ['PMI_FD']))\n"
              "s.sendall(b'cmd=get_maxes\\n')\n"
              "print(s.recv(4096).decode().strip(), flush=True)\n"
              "sys.stdin.readline()\n")
    env = {**os.environ, "PMI_FD": str(rank_end.fileno())}
    rank = subprocess.Popen([sys.executable, "-c", script], env=env, pass_fds=(rank_end.fileno(),),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rank_end.close()
    try:
        relay_pid = int(rank.stdout.readline())
        assert read_line(server) == b"cmd=get_maxes\n"
        server.sendall(SLURM_MAXES)
        assert rank.stdout.readline().strip().endswith(f"vallen_max={pmi_relay.VALLEN_MAX}")
        os.kill(relay_pid, signal.SIGTERM)  # Slurm signals every process of the step: the rank acts on it
        os.kill(relay_pid, signal.SIGUSR1)
        time.sleep(0.3)
        assert os.path.exists(f"/proc/{relay_pid}") and _state(relay_pid) != "Z"
        rank.kill()  # even SIGKILL: its end closes, the relay sees end-of-file
        rank.wait(5)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{relay_pid}") and _state(relay_pid) != "Z":
            assert time.monotonic() < deadline, "the relay outlived its rank"
            time.sleep(0.05)
    finally:
        rank.kill()
        server.close()


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("env, expected", [
    ({"PMI_FD": "5", "SLURM_STEP_ID": "0"}, True),  # srun --mpi=pmi2
    ({"PMI_FD": "5", "SLURM_STEP_ID": "0", "PMI_HOSTNAME": "h1"}, False),  # hydra's proxy inside an allocation
    ({"PMI_FD": "5"}, False),  # mpirun on a workstation
    ({"SLURM_STEP_ID": "0"}, False),  # no PMI-1 socket (a singleton, PMIx)
    ({"PMI_FD": "5", "DPBP_PMI_RELAY": "1"}, True),
    ({"PMI_FD": "5", "SLURM_STEP_ID": "0", "DPBP_PMI_RELAY": "0"}, False)])
def test_the_relay_is_wanted_only_between_mpich_and_slurms_plugin(env, expected):
    assert pmi_relay.wanted(env) is expected
