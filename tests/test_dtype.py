"""float32 runs stay float32 end to end, and the gradient is reduced as ONE flat buffer, in place.

A spy communicator (one rank) records every reduction call: its dtype, and where its buffer lives.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.data.dataset import make_dataset
from dpbp.step import Trainer


class SpyComm(SerialComm):
    """SerialComm that records (kind, dtype, address, size) of every reduction."""

    def __init__(self, size=1):
        self.calls = []
        self.size = size  # > 1: rank 0 of a pretend world (multi-rank code path, identity reductions)

    def _record(self, kind, buf):
        self.calls.append((kind, buf.dtype, buf.__array_interface__["data"][0], buf.size))

    def allreduce_sum_(self, buf):
        self._record("allreduce", buf)
        return buf

    def iallreduce_sum_(self, buf):
        self._record("iallreduce", buf)
        return super().iallreduce_sum_(buf)


def make(*sets, batch=32, size=1, x_dtype=None):
    """x_dtype: store the inputs in this dtype instead (as a data file of another dtype would)."""
    cfg = load_config(None, ["model.sizes=[20,64,48,10]", "data.name='random'", f"data.batch_size={batch}",
                             "data.val_fraction=0.0", *sets])
    data, _ = load_data(cfg)
    if x_dtype is not None:
        data = make_dataset(data.x.astype(x_dtype), data.labels, 20, 10, "float64 copy")
    comm = SpyComm(size)
    return Trainer(cfg, comm, data), data, comm


def batches(data, batch, n):
    return [batch_indices(len(data), batch, 0, s, True, False)[0] for s in range(n)]


@pytest.mark.parametrize("activation,output,loss", [("relu", "softmax", "cross_entropy"),
                                                    ("sigmoid", "sigmoid", "squared_error"),
                                                    ("tanh", "softmax", "squared_error")])
@pytest.mark.parametrize("bucket_mb", [0.0, 0.004])
@pytest.mark.parametrize("x_dtype", [None, np.float64])  # built-in data come in the model's dtype; a file may not
def test_float32_model_keeps_every_array_float32(activation, output, loss, bucket_mb, x_dtype):
    trainer, data, comm = make("model.dtype='float32'", f"model.activation='{activation}'",
                               f"model.output='{output}'", f"loss.kind='{loss}'", "loss.l2=1e-3",
                               f"comm.bucket_mb={bucket_mb}", size=2, x_dtype=x_dtype)
    assert bool(trainer.reducer.buckets) == (bucket_mb > 0)
    # float64 inputs stay as loaded; the model casts each batch on the way in
    assert data.x.dtype == (np.float32 if x_dtype is None else np.float64)
    for idx in batches(data, 32, 3):
        trainer.step(idx)
    model = trainer.model
    arrays = {"params": model.params, "grad": model.grad, "reducer.buf": trainer.reducer.buf,
              "velocity": trainer.opt.velocity}
    arrays.update({f"update scratch {k}": u for k, u in enumerate(trainer.opt._split.scratch)})
    arrays.update({f"param {k}": v for k, v in model.tensors().items()})
    arrays.update({f"grad {k}": v for k, v in model.tensors(model.grad).items()})
    outs, deltas = model.buffers(32)
    arrays.update({f"out^({l})": o for l, o in enumerate(outs)})
    arrays.update({f"delta^({l})": d for l, d in enumerate(deltas)})
    arrays.update({f"scratch {l}": s for l, s in enumerate(model._scratches)})
    arrays["forward output"] = model.forward(data.x[:5])
    not32 = {name: a.dtype for name, a in arrays.items() if a.dtype != np.float32}
    assert not not32
    assert comm.calls and all(dtype == np.float32 for _, dtype, _, _ in comm.calls)


@pytest.mark.parametrize("sets,size", [([], 1), (["comm.bucket_mb=0"], 2)])  # default alone; buckets off
def test_fast_reduction_is_one_in_place_allreduce_of_the_whole_buffer_per_step(sets, size):
    trainer, data, comm = make("model.dtype='float32'", *sets, size=size)
    buf = trainer.reducer.buf
    for idx in batches(data, 32, 4):
        before = len(comm.calls)
        trainer.step(idx)
        assert comm.calls[before:] == [("allreduce", np.float32, buf.__array_interface__["data"][0], buf.size)]
    # the gradient and the statistics are views into that one buffer: no copy on the way to MPI
    assert np.shares_memory(trainer.grad, buf) and np.shares_memory(trainer.stats, buf)
    assert trainer.grad.size + trainer.stats.size == buf.size


def test_buckets_cover_the_buffer_exactly_once_last_layer_first():
    trainer, data, comm = make("model.dtype='float64'", "comm.bucket_mb=0.01", size=2)
    buf = trainer.reducer.buf
    start = buf.__array_interface__["data"][0]
    trainer.step(batches(data, 32, 1)[0])
    spans = [((addr - start) // 8, (addr - start) // 8 + size) for _, _, addr, size in comm.calls]
    assert len(spans) >= 3  # several gradient buckets and the statistics
    covered = np.zeros(buf.size, int)
    for lo, hi in spans:
        assert 0 <= lo < hi <= buf.size  # in place: views into the one buffer
        covered[lo:hi] += 1
    assert (covered == 1).all()
    grad_spans = spans[:-1]  # the statistics (the buffer's end) go last, after backward
    assert spans[-1] == (trainer.grad.size, buf.size)
    assert grad_spans == sorted(grad_spans, reverse=True)  # from the end of the buffer: last layer first
    kinds = [k for k, *_ in comm.calls]
    assert kinds[:len(grad_spans)] == ["iallreduce"] * len(grad_spans)
