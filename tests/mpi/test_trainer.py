"""Under mpirun (any P): the trainer's features keep dpbp's guarantees across rank counts. With dropout (its
mask a function of the sample's place in the GLOBAL batch, never of the rank), micro-batches, clipping of the
reduced gradient and a warmup + cosine schedule, every optimizer on P ranks trains bitwise like one process
in reproducible mode, and to rounding in fast mode; every rank holds the same parameters.
The expectation is the same Trainer on a one-process communicator (SerialComm), on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.comm import SerialComm, get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.model import initial_params

OPTIMS = {"sgd": ["optim.kind='sgd'", "optim.momentum=0.0"], "momentum": ["optim.kind='sgd'"],
          "nesterov": ["optim.kind='sgd'", "optim.nesterov=true"], "adam": ["optim.kind='adam'", "optim.lr=0.01"],
          "adamw": ["optim.kind='adamw'", "optim.lr=0.01", "optim.weight_decay=0.1"]}
FEATURES = ["model.dropout=0.2", "optim.clip_norm=0.3", "optim.schedule='cosine'",
            "optim.warmup_steps=2", "optim.min_lr=0.001", "train.steps=6"]


def train(comm, sets):
    from dpbp.step import Trainer
    cfg = load_config(None, ["data.name='random'", "model.sizes=[20,33,17,10]", *sets])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 5))
    rng = np.random.default_rng(2)
    lrs = [trainer.step(rng.choice(len(data), 29, replace=False), t=t).lr for t in range(6)]
    return trainer.model.params.copy(), lrs


@pytest.mark.mpi
@pytest.mark.parametrize("micro", [0, 3])
@pytest.mark.parametrize("optim", OPTIMS)
def test_features_on_p_ranks_are_bitwise_one_process_in_reproducible_mode(optim, micro):
    comm = get_comm()
    sets = [*FEATURES, *OPTIMS[optim], f"data.micro_batch={micro}", "comm.reduce='reproducible'", "comm.chunk=4"]
    got, lrs = train(comm, sets)
    expected, expected_lrs = train(SerialComm(), sets)
    assert got.tobytes() == expected.tobytes()
    assert lrs == expected_lrs
    assert comm.allgather(got.tobytes()) == [got.tobytes()] * comm.size


@pytest.mark.mpi
@pytest.mark.parametrize("micro", [0, 4])
@pytest.mark.parametrize("optim", ["momentum", "adam"])
def test_features_on_p_ranks_match_one_process_to_rounding_in_fast_mode(optim, micro):
    """Fast mode's pieces are the ranks' shares: here a sample's mask would change with P if it depended on
    its place in the share (or micro-batch) rather than in the global batch."""
    comm = get_comm()
    sets = [*FEATURES, *OPTIMS[optim], f"data.micro_batch={micro}", "comm.reduce='fast'"]
    got, _ = train(comm, sets)
    expected, _ = train(SerialComm(), sets)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert comm.allgather(got.tobytes()) == [got.tobytes()] * comm.size
