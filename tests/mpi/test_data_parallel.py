"""Under mpirun (any P): the Allreduce of shard gradients equals the full-batch gradient.

Every expectation is computed from comm.size, so the same test passes at P = 2, 3, 4.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.comm import get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.model import MLP, initial_params
from dpbp.partition import share
from dpbp.step import Trainer


@pytest.mark.mpi
@pytest.mark.parametrize("batch", [7, 10, 64])
@pytest.mark.parametrize("reduction,l2", [("sum", 0.0), ("mean", 0.01)])
def test_allreduced_gradient_is_the_full_batch_gradient(batch, reduction, l2):
    comm = get_comm()
    cfg = load_config(None, ["model.sizes=[64,16,10]", f"loss.reduction='{reduction}'", f"loss.l2={l2}",
                             f"data.batch_size={batch}"])
    train, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, train)
    trainer.model.load(initial_params(cfg["model.sizes"], "tanh", 0))
    idx = np.arange(batch) * 3
    trainer.gradient(idx)

    full = MLP(cfg["model.sizes"], "tanh", "softmax", "cross_entropy")
    full.load(initial_params(cfg["model.sizes"], "tanh", 0))
    full.forward(train.x[idx])
    full.backward(train.t[idx])
    expected = full.grad / (batch if reduction == "mean" else 1)
    for W, g in zip(full.weights, full.nabla_w):
        pass
    expected_w = [g / (batch if reduction == "mean" else 1) + l2 * W for W, g in zip(full.weights, full.nabla_w)]
    for k, g in enumerate(trainer.grads.nabla_w):
        np.testing.assert_allclose(g, expected_w[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(trainer.grads.nabla_b[0], full.nabla_b[0] / (batch if reduction == "mean" else 1),
                               rtol=1e-12, atol=1e-14)
    del expected


@pytest.mark.mpi
def test_shares_cover_the_batch_and_differ_by_at_most_one():
    comm = get_comm()
    for n in range(0, 20):
        bounds = comm.allgather(share(n, comm.rank, comm.size))
        sizes = [b - a for a, b in bounds]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(comm.size - 1))
