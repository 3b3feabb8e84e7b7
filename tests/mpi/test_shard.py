"""Under mpirun (any P): optim.shard (ZeRO-1) against the unsharded run, bitwise, and its state sizes.

The model has 8 whole BLOCKs plus a part (n_params = 1,112,010), so shards are uneven at P = 3 and 4.
The expectation is an unsharded Trainer (the whole-buffer optimizer) on the same ranks.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.comm import get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.model import initial_params
from dpbp.optim import BLOCK

SIZES = "[100,1000,1000,10]"


def _trainer(comm, shard, extra):
    from dpbp.step import Trainer
    cfg = load_config(None, ["data.name='random'", f"model.sizes={SIZES}", "loss.l2=0.01", "train.steps=4",
                             f"optim.shard={'true' if shard else 'false'}", *extra])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 3))
    return trainer


def _run(trainer, steps=3):
    rng = np.random.default_rng(1)
    for t in range(steps):
        trainer.step(rng.choice(len(trainer.data), 24, replace=False), t=t)
    return trainer.model.params.copy()


OPTIMS = [["optim.kind='sgd'", "optim.momentum=0.9"], ["optim.kind='adam'", "optim.lr=0.001"],
          ["optim.kind='adamw'", "optim.lr=0.001"]]


@pytest.mark.mpi
@pytest.mark.parametrize("optim", OPTIMS)
def test_sharded_update_is_bitwise_the_unsharded_one_reproducible(optim):
    comm = get_comm()
    extra = ["comm.reduce='reproducible'", "comm.chunk=8", "optim.clip_norm=0.5", *optim]
    got = _run(_trainer(comm, True, extra))
    expected = _run(_trainer(comm, False, extra))
    assert got.tobytes() == expected.tobytes()


@pytest.mark.mpi
def test_sharded_fast_mode_equals_unsharded_at_two_ranks():
    """P = 2: the two-term sum is the same in either order, so Reduce_scatter equals Allreduce."""
    comm = get_comm()
    extra = ["comm.reduce='fast'", "optim.kind='adam'", "optim.lr=0.001", "optim.clip_norm=0.5"]
    got = _run(_trainer(comm, True, extra))
    expected = _run(_trainer(comm, False, extra))
    if comm.size <= 2:
        assert got.tobytes() == expected.tobytes()
    else:  # P >= 3: MPI may add the partial sums in another order; rounding only
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.mpi
def test_each_rank_keeps_its_share_of_the_adam_state():
    comm = get_comm()
    trainer = _trainer(comm, True, ["optim.kind='adam'"])
    n = trainer.model.n_params
    n_blocks = -(-n // BLOCK)
    local = trainer.opt.state()["exp_avg"].size
    sizes = comm.allgather(local)
    assert sum(sizes) == n
    if comm.size == 1:
        assert local == n
    else:  # whole blocks, shares of the block count differing by at most one
        assert max(sizes) <= -(-n_blocks // comm.size) * BLOCK
        assert max(sizes) < n
    full = trainer.optimizer_state()
    assert full["exp_avg"].shape == (n,)
