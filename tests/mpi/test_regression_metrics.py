"""Under mpirun (any P, 1 included): the held-out RMSE, MAE and R² are computed by the ranks together and
are the same bits as one process's, and equal the formulas written out here."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import dpbp
from dpbp.comm import SerialComm, get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.evaluate import held_out

CONFIG = {"model": {"sizes": [4, 6, 3], "output": "identity"}, "loss": {"kind": "squared_error", "l2": 0.01},
          "train": {"steps": 12, "eval_every": 6}, "data": {"batch_size": 16}}


@pytest.mark.mpi
def test_regression_figures_are_collective_and_rank_independent():
    comm = get_comm()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 4))
    y = x[:, :3] * [1.0, -2.0, 0.5] + 3.0 + 0.1 * rng.normal(size=(120, 3))
    xv, yv = np.concatenate([x[:100]] * 6), np.concatenate([y[:100]] * 6)  # 600 rows: 3 evaluation chunks
    out = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    run = dpbp.fit(CONFIG, x=x, y=y, val=(xv, yv), out=os.path.join(out, "mpi"), comm=comm)
    model = dpbp.load(run.run_dir)
    o = model.predict(xv)
    sse, sst = ((yv - o) ** 2).sum(axis=0), ((yv - yv.mean(axis=0)) ** 2).sum(axis=0)
    want = {"rmse": np.mean(np.sqrt(sse / len(yv))), "mae": np.mean(np.abs(yv - o).mean(axis=0)),
            "r2": np.mean(1 - sse / sst)}
    last = run.metrics[-1]
    for key, value in want.items():
        assert last[key] == pytest.approx(value, rel=1e-10), key
    cfg = load_config(os.path.join(run.run_dir, "config.toml"))
    _, val = load_data(cfg, comm, arrays=(x, y, (xv, yv)))
    together = held_out(model.network, cfg, val, comm)
    alone = held_out(model.network, cfg, val, SerialComm())
    assert together == alone  # the same bits on P ranks as in one process
    assert comm.allgather(together) == [together] * comm.size
