"""Under mpirun (any P, 1 included): dpbp.fit on arrays in memory, every rank passing the same arrays, trains
bitwise like one process (reproducible reduction), with Adam, a cosine schedule and dropout, and every rank
gets the same parameters and metrics."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import dpbp
from dpbp.comm import SerialComm, get_comm

CONFIG = {"model": {"sizes": [5, 12, 3], "dropout": 0.2}, "train": {"steps": 25, "eval_every": 5},
          "data": {"batch_size": 20}, "comm": {"reduce": "reproducible", "chunk": 4},
          "optim": {"kind": "adam", "lr": 0.01, "schedule": "cosine", "warmup_steps": 5}}


@pytest.mark.mpi
def test_fit_under_mpirun_equals_one_process_bitwise():
    comm = get_comm()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(90, 5))
    y = np.argmax(x[:, :3], axis=1)
    out = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    run = dpbp.fit(CONFIG, x=x, y=y, val=(x[:30], y[:30]), out=os.path.join(out, "mpi"), comm=comm)
    alone = dpbp.fit(CONFIG, x=x, y=y, val=(x[:30], y[:30]), out=os.path.join(out, f"serial-{comm.rank}"),
                     comm=SerialComm())
    for name, value in alone.params.items():
        np.testing.assert_array_equal(run.params[name], value)
    assert run.metrics == comm.bcast(run.metrics)  # every rank returns rank 0's records
    drop = lambda records: [{k: v for k, v in r.items() if k not in ("samples_per_s", "comm_s", "step_s", "time")}
                            for r in records]  # noqa: E731
    assert drop(run.metrics) == drop(alone.metrics)
