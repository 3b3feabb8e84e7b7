"""The training step's fast path: no allocation proportional to the model after the first step, and the
in-place formulas it uses compute what the textbook ones do.

tracemalloc sees NumPy's array buffers. What a step may still allocate is small and independent of the
model: NumPy's ufunc iteration buffer (8192 elements, for the broadcast bias add), the loss's (B, n_out)
float64 temporaries and a few B-sized vectors. The bound is far below the smallest model-sized array.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.layers import ACTIVATIONS
from dpbp.model import initial_params
from dpbp.step import Trainer

BOUND = 128 * 1024  # bytes a step may allocate at its peak
BATCH, HIDDEN = 128, 1024


class RankZeroOfTwo(SerialComm):
    """Rank 0 of a pretend world of 2 whose reductions are identities: runs the multi-rank code path
    (half the batch, bucketed reduction) in one process."""

    size = 2


def make_trainer(*sets, comm=None):
    cfg = load_config(None, [f"model.sizes=[32,{HIDDEN},{HIDDEN},10]", "data.name='random'",
                             f"data.batch_size={BATCH}", "data.val_fraction=0.0", *sets])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, comm or SerialComm(), data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 0))
    return trainer, data


def peak_bytes(fn):
    """Peak of traced memory above the starting point while fn() runs."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


VARIANTS = [
    ["model.activation='relu'", "model.dtype='float32'", "loss.l2=0.0"],  # the benchmark's kind of net
    ["model.activation='tanh'", "model.dtype='float64'", "loss.l2=1e-3"],  # the defaults, with l2
    ["model.activation='sigmoid'", "model.output='sigmoid'", "loss.kind='squared_error'",
     "loss.reduction='sum'", "optim.momentum=0.0", "model.dtype='float32'"],
    ["model.activation='identity'", "model.output='softmax'", "loss.kind='squared_error'"],  # softmax J^T
    ["model.activation='relu'", "model.dtype='float32'", "comm.bucket_mb=0.5", "world=2"],  # buckets
]


@pytest.mark.parametrize("sets", VARIANTS, ids=lambda s: ",".join(x.split("=")[1].strip("'") for x in s))
def test_steps_after_the_first_allocate_less_than_a_small_bound(sets):
    two = "world=2" in sets
    trainer, data = make_trainer(*(s for s in sets if s != "world=2"), comm=RankZeroOfTwo() if two else None)
    assert bool(trainer.reducer.buckets) == two
    model = trainer.model
    smallest_model_array = min(BATCH * HIDDEN, HIDDEN * HIDDEN) * model.dtype.itemsize
    assert smallest_model_array >= 4 * BOUND  # so any activation- or gradient-sized temporary shows

    batches = [batch_indices(len(data), BATCH, 0, s, True, False)[0] for s in range(4)]
    batches.append(batches[0][:BATCH - 28])  # a smaller (last) batch reuses the same buffers
    trainer.step(batches[0])  # the first step allocates the workspace

    def steps():
        for idx in batches[1:]:
            trainer.step(idx)
    assert peak_bytes(steps) <= BOUND


def test_the_bound_catches_a_temporary_the_size_of_an_activation():
    """The measurement itself: a step that makes one activation-sized temporary exceeds the bound."""
    trainer, data = make_trainer("model.activation='relu'", "model.dtype='float32'")
    idx = batch_indices(len(data), BATCH, 0, 0, True, False)[0]
    trainer.step(idx)
    relu_prime = ACTIVATIONS["relu"].prime_times

    def masked_relu_prime(delta, out, scratch):  # the obvious version: allocates a (B, n) mask
        delta[out <= 0.0] = 0.0
        return delta
    trainer.model.f_prime_times = [masked_relu_prime] * (trainer.model.n_layers - 1)
    assert peak_bytes(lambda: trainer.step(idx)) > BOUND
    trainer.model.f_prime_times = [relu_prime] * (trainer.model.n_layers - 1)
    assert peak_bytes(lambda: trainer.step(idx)) <= BOUND



def test_bucketed_and_plain_steps_give_identical_parameters():
    """The buckets only cut the same reduction into slices; nothing numeric changes."""
    params = []
    for bucket in (0.0, 0.5):
        trainer, data = make_trainer("model.activation='relu'", "model.dtype='float32'",
                                     f"comm.bucket_mb={bucket}", comm=RankZeroOfTwo())
        assert bool(trainer.reducer.buckets) == (bucket > 0)
        for s in range(3):
            trainer.step(batch_indices(len(data), BATCH, 0, s, True, False)[0])
        params.append(trainer.model.params.copy())
    np.testing.assert_array_equal(params[0], params[1])
