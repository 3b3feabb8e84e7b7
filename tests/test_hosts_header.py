"""The header's account of where the ranks run: hosts, local ranks, the transport between hosts.

The real thing on 2 simulated hosts is in tests/cluster/test_training.py; here the formatting and the
transport wording from hand-written records, and the records of an ordinary mpirun on one machine.
"""

from __future__ import annotations

import json
import socket

import pytest

from dpbp.comm import tcp_connections_to, transport
from dpbp.progress import header_lines, host_summary, ranks_text
from tests.conftest import REPO

MPICH = "MPICH Version:      5.0.2\nMPICH Device:       ch4:ucx ofi\nMPICH configure:    --with-device=ch4:ucx,ofi"


def record(rank, host, address, tcp=0):
    return {"rank": rank, "host": host, "address": address, "local_rank": 0, "local_size": 1,
            "tcp_to_other_hosts": tcp}


@pytest.mark.parametrize("ranks, text", [([0], "0"), ([0, 1], "0-1"), ([0, 1, 2, 5], "0-2,5"),
                                         ([1, 3, 4], "1,3-4")])
def test_ranks_text(ranks, text):
    assert ranks_text(ranks) == text


def test_host_summary_lists_each_host_with_its_ranks():
    hosts = [record(0, "a", "10.0.0.1"), record(1, "b", "10.0.0.2"), record(2, "a", "10.0.0.1")]
    assert host_summary(hosts) == "a 10.0.0.1 ranks 0,2, b 10.0.0.2 rank 1"


def test_transport_names_the_netmod_its_setting_and_the_tcp_seen(monkeypatch):
    monkeypatch.delenv("MPIR_CVAR_CH4_NETMOD", raising=False)
    monkeypatch.delenv("UCX_TLS", raising=False)
    two = [record(0, "a", "10.0.0.1", tcp=1), record(1, "b", "10.0.0.2", tcp=0)]
    assert transport(two, MPICH) == ("MPICH netmod ucx, UCX_TLS=auto, TCP between hosts "
                                     "(connections to other hosts on 1 of 2 ranks)")
    monkeypatch.setenv("MPIR_CVAR_CH4_NETMOD", "ofi")
    monkeypatch.setenv("FI_PROVIDER", "tcp")
    assert transport(two, MPICH).startswith("MPICH netmod ofi, FI_PROVIDER=tcp, TCP between hosts")
    none = [record(0, "a", "10.0.0.1"), record(1, "b", "10.0.0.2")]
    assert transport(none, MPICH).endswith("no TCP connection between hosts (shared memory or RDMA)")
    assert transport([record(0, "a", "x"), record(1, "a", "x")], MPICH) == "shared memory (1 host)"


def test_header_names_the_hosts_only_when_there_are_several():
    info = {"dpbp": "0", "mpi": "M", "world_size": 3, "blas": "B", "sizes": [2, 2], "activation": "t/s",
            "dtype": "float64", "n_params": 6, "loss": "l", "data": "d", "n_train": 1, "n_val": 0,
            "batch": 3, "per_rank": [1, 1], "reduce": "fast", "steps": 1, "out": "o",
            "n_hosts": 2, "transport": "T",
            "hosts": [record(0, "a", "10.0.0.1"), record(1, "a", "10.0.0.1"), record(2, "b", "10.0.0.2")]}
    lines = header_lines(info)
    assert "| world size 3 (3 ranks on 2 hosts) |" in lines[0]
    assert lines[-1] == "hosts a 10.0.0.1 ranks 0-1, b 10.0.0.2 rank 2 | between hosts: T"
    one = header_lines({**info, "world_size": 1, "n_hosts": 1, "hosts": info["hosts"][:1]})
    assert "| world size 1 (1 rank on 1 host) |" in one[0] and len(one) == len(lines) - 1


def test_tcp_connections_to_counts_this_process_established_connections():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        try:
            assert tcp_connections_to({"127.0.0.1"}) == 2  # both ends are this process's
            assert tcp_connections_to({"127.0.0.2"}) == 0
        finally:
            client.close()
            peer.close()


def test_one_machine_records_every_rank_on_one_host(run_cli, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--config", f"{REPO}/configs/spirals.toml", "--set", "train.steps=2", "--out", out,
            "--quiet", ranks=2, check=True)
    header = json.loads((out / "header.jsonl").read_text())
    assert header["n_hosts"] == 1 and header["transport"] == "shared memory (1 host)"
    assert [(r["rank"], r["host"], r["local_rank"], r["local_size"]) for r in header["hosts"]] == [
        (0, socket.gethostname(), 0, 2), (1, socket.gethostname(), 1, 2)]
