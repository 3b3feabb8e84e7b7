"""Under mpirun (any P): the sampler property with the real communicator.

Each rank takes the rows its own reducer cuts from every global batch of an epoch (what
Trainer.gradient computes on); one allgather collects them, and every rank checks the same union.
Hypothesis is derandomized (and never shrinks) so that every rank runs the same examples in the same
order and issues the same collectives; the assertions use gathered data only, so all ranks agree.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dpbp.comm import get_comm
from dpbp.data import batch_indices, batches_per_epoch
from dpbp.reduce import Layout, make_reducer

SAME_ON_EVERY_RANK = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


@pytest.mark.mpi
@SAME_ON_EVERY_RANK
@given(n=st.integers(1, 200), B=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 2),
       drop_last=st.booleans(), mode=st.sampled_from(["fast", "reproducible"]), chunk=st.integers(1, 8))
def test_ranks_together_use_every_sample_once_per_epoch(n, B, seed, epoch, drop_last, mode, chunk):
    comm = get_comm()
    per_epoch = batches_per_epoch(n, B, drop_last)
    reducer = make_reducer(mode, comm, Layout([(1,)]), "float64", chunk)
    mine, batches = [], []
    for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
        idx, _ = batch_indices(n, B, seed, step, True, drop_last)
        mine.append([int(i) for a, b in reducer.pieces(len(idx)) for i in idx[a:b]])
        batches.append([int(i) for i in idx])
    everyone = comm.allgather((mine, batches))
    assert all(b == everyone[0][1] for _, b in everyone)  # the same global batches on every rank
    for step_shares in zip(*(m for m, _ in everyone)):
        sizes = [len(s) for s in step_shares]
        units = sizes if mode == "fast" else [-(-s // chunk) for s in sizes]
        assert max(units) - min(units) <= 1
    used = Counter(i for m, _ in everyone for share in m for i in share)
    assert all(c == 1 for c in used.values())
    expected = n - n % B if drop_last else n
    assert len(used) == expected and set(used) <= set(range(n))
