"""Slurm's pmi2 plugin and PMI-1 requests longer than its one read of 1,024 bytes, on the 2-host cluster.

A raw PMI-1 client on each of 2 hosts (srun --mpi=pmi2) does what MPICH does at start-up on several
nodes: asks for the maxima and puts one segment of vallen_max - 2 hex characters under MPICH's key,
then reads it back after the barrier. Without dpbp/pmi_relay.py the put line (~1,077 bytes) reaches
the plugin in two pieces: slurmstepd logs the start-up flake seen in CI ("value not properly
terminated") and the value read back is not the one put; with the relay, as dpbp's ranks start it under
srun, every segment fits and comes back whole.
"""

from __future__ import annotations

import sys

import pytest

from tests.cluster.test_training import PMI_FLAKE, REPO

pytestmark = pytest.mark.cluster

CLIENT = """
import os, random, socket, sys
sys.path.insert(0, {repo!r})
from dpbp import pmi_relay
if pmi_relay.wanted():
    pmi_relay.start()
s = socket.socket(fileno=int(os.environ["PMI_FD"]))
replies = s.makefile("rb")
def ask(line):
    s.sendall(line.encode() + b"\\n")
    return dict(kv.split("=", 1) for kv in replies.readline().decode().split())
ask("cmd=init pmi_version=1 pmi_subversion=1")
vallen = int(ask("cmd=get_maxes")["vallen_max"])
kvs = ask("cmd=get_my_kvsname")["kvsname"]
key = "-allgather-1-%s-seg-1/9" % os.environ["PMI_RANK"]
value = "".join(random.choice("0123456789ABCDEF") for _ in range(vallen - 2))  # MPICH's longest segment
ask("cmd=put kvsname=%s key=%s value=%s" % (kvs, key, value))
ask("cmd=barrier_in")
got = ask("cmd=get kvsname=%s key=%s" % (kvs, key)).get("value")
print("rank", os.environ["PMI_RANK"], "vallen_max", vallen, "whole" if got == value else "broken", flush=True)
ask("cmd=finalize")
"""


def put_long_segments(cluster, tmp_path, relay: str) -> str:
    client = tmp_path / "client.py"
    client.write_text(CLIENT.format(repo=str(REPO)))
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nDPBP_PMI_RELAY={relay} exec srun --mpi=pmi2 {sys.executable} {client}\n")
    out = tmp_path / "job.out"
    job = cluster.sbatch([f"--output={out}", "--time=2", "-N", "2", "--ntasks-per-node=1", script], cwd=tmp_path)
    cluster.wait_done(job, 60)
    return out.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_without_the_relay_slurm_takes_a_long_put_in_two_pieces(cluster, tmp_path):
    log = put_long_segments(cluster, tmp_path, relay="0")
    assert PMI_FLAKE in log and "vallen_max 1024 broken" in log, log


@pytest.mark.timeout(120)
def test_with_the_relay_every_segment_comes_back_whole(cluster, tmp_path):
    log = put_long_segments(cluster, tmp_path, relay="")  # as dpbp decides: srun --mpi=pmi2 wants it
    assert PMI_FLAKE not in log, log
    assert sorted(line.split()[1] for line in log.splitlines() if line.endswith(" whole")) == ["0", "1"], log
