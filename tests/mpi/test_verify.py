"""Under mpirun (any P): dpbp.verify in-process, with one rank's contribution corrupted before the reduction."""

from __future__ import annotations

import numpy as np
import pytest

from dpbp import verify
from dpbp.comm import get_comm
from dpbp.errors import EXIT_FAULT
from dpbp.model import param_shapes
from dpbp.reduce import FastReducer, ReproducibleReducer

ARGS = ["--set", "data.name='random'", "--set", "model.sizes=[6,8,3]", "--set", "loss.l2=0.01",
        "--set", "data.batch_size=23", "--set", "comm.chunk=3"]


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["fast", "reproducible"])
def test_verify_passes_in_process(mode, capsys):
    comm = get_comm()
    assert verify.main([*ARGS, "--set", f"comm.reduce='{mode}'"], comm) == 0
    out = capsys.readouterr().out
    assert ("within tolerance" in out) == (comm.rank == 0)  # only rank 0 prints


@pytest.mark.mpi
@pytest.mark.parametrize("reducer", [FastReducer, ReproducibleReducer])
def test_a_corrupted_shard_on_the_last_rank_fails_on_every_rank(reducer, monkeypatch, capsys):
    """The last rank's part of layers.1.bias is off by 1e-3 of its scale before the Allreduce: every rank
    returns the failure status and rank 0 names that tensor, and only it."""
    comm = get_comm()
    original = reducer.allreduce
    start = sum(int(np.prod(s)) for s in param_shapes([6, 8, 3])[:3])  # where layers.1.bias begins

    def corrupted(self):
        if self.comm.rank == self.comm.size - 1:
            self.buf[start + 1] += 1e-3 * np.max(np.abs(self.buf[start:start + 3]))
        return original(self)

    monkeypatch.setattr(reducer, "allreduce", corrupted)
    assert verify.main([*ARGS, "--set", f"comm.reduce='{reducer.mode}'"], comm) == EXIT_FAULT
    captured = capsys.readouterr()
    if comm.rank == 0:
        assert "FAILED in layers.1.bias (" in captured.err
        failing = [line for line in captured.out.splitlines() if line.rstrip().endswith("FAIL")]
        assert len(failing) == 3 and failing[0].startswith("layers.1.bias")  # 1-2, 1-3, 1-4
    else:
        assert captured.out == captured.err == ""
