"""Under mpirun (any P): data files are read rank-locally and checked in shares.

I/O is measured by the kernel (/proc/self/io rchar: bytes this process read through system calls),
not by dpbp, and compared with the rows each rank is entitled to: its share of the value scan, then
its share of each global batch. Expectations are computed from comm.size.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpbp.comm import get_comm
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.errors import UserError
from dpbp.model import initial_params
from dpbp.partition import share
from dpbp.step import Trainer
from tests.conftest import rchar

N, WIDTH = 256, 8192  # 64 KiB rows: no two rows of a batch are close enough to be read together


def shared_dir(comm, tmp_path):
    """Rank 0's temporary directory, for files every rank reads."""
    return comm.bcast(str(tmp_path))


def write_files(comm, folder, x, y):
    if comm.rank == 0:
        np.save(os.path.join(folder, "x.npy"), x)
        np.save(os.path.join(folder, "y.npy"), y)
    comm.barrier()
    return [f"data.path={json.dumps(os.path.join(folder, 'x.npy'))}",
            f"data.targets={json.dumps(os.path.join(folder, 'y.npy'))}"]


@pytest.mark.mpi
def test_each_rank_reads_its_share_of_the_scan_and_of_every_batch(tmp_path):
    comm = get_comm()
    folder = shared_dir(comm, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.random((N, WIDTH))
    y = rng.integers(0, 2, N)
    paths = write_files(comm, folder, x, y)
    row_bytes = WIDTH * 8
    cfg = load_config(None, paths + [f"model.sizes=[{WIDTH},4,2]", "data.val_fraction=0", "data.batch_size=32"])

    before = rchar()
    train, _ = load_data(cfg, comm)
    scan = rchar() - before
    lo, hi = share(N, comm.rank, comm.size)
    # Its share of the NaN scan plus headers and the labels file (2 KiB) - and not one row more.
    assert (hi - lo) * row_bytes <= scan <= (hi - lo) * row_bytes + 32 * 1024, (comm.rank, scan)

    trainer = Trainer(cfg, comm, train)
    trainer.model.load(initial_params(cfg["model.sizes"], "tanh", 0))
    mine = 0
    before = rchar()
    for step in range(4):
        idx, _ = batch_indices(N, 32, 0, step, True, False)
        a, b = share(len(idx), comm.rank, comm.size)
        mine += b - a
        trainer.step(idx)
    steps = rchar() - before
    labels_bytes = os.path.getsize(os.path.join(folder, "y.npy"))
    assert mine * row_bytes <= steps <= mine * row_bytes + 4 * labels_bytes, (comm.rank, steps)
    assert sum(comm.allgather(mine)) == 4 * 32  # together the ranks read each batch once


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_bad_value_in_any_ranks_share_stops_every_rank_alike(tmp_path, where):
    comm = get_comm()
    folder = shared_dir(comm, tmp_path)
    n = 10 * comm.size + 3
    x = np.random.default_rng(1).random((n, 4))
    y = np.zeros(n, np.int64)
    bad_row = 1 if where == "first" else n - 2  # in rank 0's share, or in the last rank's
    x[bad_row, 3] = np.inf
    y[bad_row - 1] = 5  # a bad label too: inputs are reported first, whatever the ranks saw
    paths = write_files(comm, folder, x, y)
    cfg = load_config(None, paths + ["model.sizes=[4,3]"])
    with pytest.raises(UserError) as e:
        load_data(cfg, comm)
    message = str(e.value)
    assert f"inputs hold NaN or inf, first in row {bad_row}" in message
    assert all(m == message for m in comm.allgather(message))


@pytest.mark.mpi
def test_standardize_statistics_are_the_serial_bits_on_every_rank(tmp_path, monkeypatch):
    """Each rank sums its own fixed chunks of the training rows; the result equals, bit for bit, the
    statistics one process computes alone, on every rank, whatever comm.size is."""
    from dpbp.data import standardize as stats
    monkeypatch.setattr(stats, "_CHUNK_BYTES", 5 * 8 * 6)  # 5 rows per chunk: many chunks per rank
    comm = get_comm()
    folder = shared_dir(comm, tmp_path)
    rng = np.random.default_rng(3)
    n = 97
    x = rng.normal(0, 1, (n, 6)) * 10.0 ** rng.integers(-6, 6, 6) + 10.0 ** rng.integers(0, 8, 6)
    x[:, 4] = -2.5  # constant: divisor 1
    paths = write_files(comm, folder, x, rng.integers(0, 3, n))
    cfg = load_config(None, paths + ["model.sizes=[6,3]", "data.val_fraction=0.2", "data.standardize=true"])
    train, val = load_data(cfg, comm)
    alone, _ = load_data(cfg)  # this rank on its own: every chunk
    s, t = train.standardize, alone.standardize
    assert s.mean.tobytes() == t.mean.tobytes() and s.std.tobytes() == t.std.tobytes()
    assert len(set(comm.allgather(s.mean.tobytes() + s.std.tobytes()))) == 1
    assert s.std[4] == 1.0
    rows = np.asarray(alone.x.base)  # the training part of the split, before standardizing
    np.testing.assert_allclose(s.mean, rows.mean(axis=0), rtol=1e-13)
    np.testing.assert_array_equal(train.x[0:len(train)], (rows - s.mean) / s.std)


@pytest.mark.mpi
def test_class_names_warnings_and_target_range_agree_on_every_rank(tmp_path):
    comm = get_comm()
    folder = shared_dir(comm, tmp_path)
    n = 7 * comm.size + 5
    x = np.random.default_rng(2).random((n, 2))
    names = ["owl", "cat"] * (n // 2) + ["cat"] * (n % 2)
    if comm.rank == 0:
        with open(os.path.join(folder, "d.csv"), "w") as f:
            f.write("x1,name,x2\n" + "".join(f"{a!r},{c},{b!r}\n" for (a, b), c in zip(x.tolist(), names)))
        np.savez(os.path.join(folder, "t.npz"), x=x, y=np.r_[np.zeros(n - 1), [1.25]])
    comm.barrier()
    csv_path = f"data.path={json.dumps(os.path.join(folder, 'd.csv'))}"
    train, _ = load_data(load_config(None, [csv_path, "data.target_column='name'", "model.sizes=[2,3]"]), comm)
    assert train.classes == ["cat", "owl"]
    np.testing.assert_array_equal(train.labels, [["cat", "owl"].index(c) for c in names])
    assert len(train.warnings) == 1 and "model.sizes ends with 3 outputs but the labels use only 2" in train.warnings[0]
    assert comm.allgather(train.warnings) == [train.warnings] * comm.size
    cfg = load_config(None, [f"data.path={json.dumps(os.path.join(folder, 't.npz'))}", "model.sizes=[2,1]",
                             "model.output='sigmoid'"])
    with pytest.raises(UserError) as e:  # the bad target is in the last rank's share
        load_data(cfg, comm)
    assert f"target 1.25 in row {n - 1} is outside [0, 1]" in str(e.value)
    assert comm.allgather(str(e.value)) == [str(e.value)] * comm.size
