"""Under mpirun (any P): the reducers inside Trainer.gradient, against a one-process Trainer on each rank.

reproducible: the P-rank gradient, loss and counts are bitwise those of the 1-process run.
fast: the same to rounding. Both: every rank holds the same bits, and stop flags add up once per rank.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from dpbp.comm import SerialComm, get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.model import initial_params
from dpbp.step import Trainer


def _trainer(comm, overrides):
    cfg = load_config(None, ["data.name='random'", "model.sizes=[12,24,16,5]", "loss.l2=0.01", *overrides])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 3))
    return trainer


def _step_gradients(trainer, batches, steps=3):
    """Gradients and statistics of a few SGD steps (so later steps start from reduced results)."""
    out = []
    rng = np.random.default_rng(5)
    for _ in range(steps):
        idx = rng.choice(len(trainer.data), batches, replace=False)
        trainer.step(idx)
        out.append((trainer.grad.copy(), trainer.stats[:2].astype(np.float64)))
    return out


def _same_on_every_rank(comm, array):
    return len(set(comm.allgather(zlib.crc32(array.tobytes())))) == 1


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch,chunk", [(37, 5), (16, 16), (9, 4), (64, 7)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reproducible_gradient_is_bitwise_the_one_process_gradient(dtype, batch, chunk, reduction):
    """(16, 16): one chunk, every rank but one idle; (9, 4): 3 chunks, idle ranks at P = 4."""
    comm = get_comm()
    overrides = ["comm.reduce='reproducible'", f"comm.chunk={chunk}", f"model.dtype='{dtype}'",
                 f"loss.reduction='{reduction}'"]
    got = _step_gradients(_trainer(comm, overrides), batch)
    expected = _step_gradients(_trainer(SerialComm(), overrides), batch)
    for (g, stats), (g1, stats1) in zip(got, expected):
        assert g.dtype == np.dtype(dtype)
        assert g.tobytes() == g1.tobytes()
        assert stats.tobytes() == stats1.tobytes()  # loss sum and correct count
        assert _same_on_every_rank(comm, g)


@pytest.mark.mpi
@pytest.mark.parametrize("batch", [7, 10, 64])
def test_fast_gradient_matches_the_one_process_gradient(batch):
    comm = get_comm()
    got = _step_gradients(_trainer(comm, ["comm.reduce='fast'"]), batch)
    expected = _step_gradients(_trainer(SerialComm(), ["comm.reduce='fast'"]), batch)
    for (g, stats), (g1, stats1) in zip(got, expected):
        np.testing.assert_allclose(g, g1, rtol=0, atol=1e-12 * np.max(np.abs(g1)))
        np.testing.assert_allclose(stats, stats1, rtol=1e-12)
        assert _same_on_every_rank(comm, g)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["fast", "reproducible"])
def test_stop_flags_arrive_once_per_rank(mode):
    """A flag raised on one rank or on all of them, with a batch too small to give every rank work."""
    comm = get_comm()
    trainer = _trainer(comm, [f"comm.reduce='{mode}'", "comm.chunk=2"])
    idx = np.arange(3)  # 2 chunks (reproducible) / 3 one-sample shares (fast): idle ranks from P = 3 or 4
    assert trainer.gradient(idx, stop=0.0)[2] == 0
    assert trainer.gradient(idx, stop=1.0 if comm.rank == comm.size - 1 else 0.0)[2] == 1
    assert trainer.gradient(idx, stop=1.0)[2] == comm.size
