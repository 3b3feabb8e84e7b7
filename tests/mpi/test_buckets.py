"""Under mpirun (any P): the bucketed, overlapped reduction (comm.bucket_mb > 0) gives the full-batch
gradient, like the single Allreduce, including for ranks that hold no samples of a small batch.

Expectations are computed from comm.size and a serial model, so the same test passes at P = 2, 3, 4.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.comm import get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.model import MLP, initial_params
from dpbp.step import Trainer

SIZES = [64, 32, 24, 10]


@pytest.mark.mpi
@pytest.mark.parametrize("batch", [1, 3, 64])  # 1 and 3: some ranks are idle at P = 2..4
# Layers hold 16,640 / 6,336 / 2,000 bytes: 0.001 MB gives a bucket per layer, 0.007 MB merges the last two,
# and 1 MB would make one bucket, which is no overlap at all: then it is one Allreduce, as with 0.
@pytest.mark.parametrize("bucket_mb,n_buckets", [(0.001, 3), (0.007, 2), (1.0, 0)])
def test_bucketed_reduction_gives_the_full_batch_gradient(batch, bucket_mb, n_buckets):
    comm = get_comm()
    cfg = load_config(None, [f"model.sizes={SIZES}", "loss.reduction='mean'", "loss.l2=0.01",
                             f"data.batch_size={batch}", f"comm.bucket_mb={bucket_mb}"])
    train, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, train)
    trainer.model.load(initial_params(SIZES, "tanh", 0))
    idx = np.arange(batch) * 5
    stats = trainer.gradient(idx, stop=1.0)

    full = MLP(SIZES, "tanh", "softmax", "cross_entropy")
    full.load(initial_params(SIZES, "tanh", 0))
    x, (t, labels) = train.x[idx], train.targets(idx)
    out = full.forward(x)
    E = full.backward(t)
    for g, g_full, W in zip(trainer.grads.nabla_w, full.nabla_w, full.weights):
        np.testing.assert_allclose(g, g_full / batch + 0.01 * W, rtol=1e-12, atol=1e-14)
    for g, g_full in zip(trainer.grads.nabla_b, full.nabla_b):
        np.testing.assert_allclose(g, g_full / batch, rtol=1e-12, atol=1e-14)
    assert stats[0] == pytest.approx(E, rel=1e-12)
    assert stats[1] == np.count_nonzero(out.argmax(axis=1) == labels)
    assert stats[2] == comm.size  # the stop flag of every rank, summed
    assert len(trainer.reducer.buckets) == (n_buckets if comm.size > 1 else 0)
