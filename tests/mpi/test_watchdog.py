"""Under mpirun (any P): the communicator's arming for the watchdog, and a watchdog started and stopped.

While watched, every blocking call of the training step tells the slot (its counter odd inside the call,
even after; its MPI name); unwatched, the methods are the plain ones again. A Watchdog started on a
healthy world never ends it, and stop() returns the communicator to its callers unwatched.
"""

from __future__ import annotations

import numpy as np

from dpbp.comm import Deadline, get_comm
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.step import Trainer
from dpbp.watchdog import Watchdog


def test_watched_calls_count_in_and_out_and_unwatched_ones_do_not():
    comm = get_comm()
    slot = Deadline()
    comm.watch(slot)
    try:
        buf = np.ones(3)
        comm.allreduce_sum_(buf)
        assert (slot.calls, slot.what) == (2, "MPI_Allreduce")  # one call: in (+1), out (+1)
        assert (buf == comm.size).all()
        comm.barrier()
        assert (slot.calls, slot.what) == (4, "MPI_Barrier")
        assert comm.allgather(comm.rank) == list(range(comm.size))
        assert slot.calls == 6
    finally:
        comm.watch(None)
    comm.barrier()
    assert slot.calls == 6 and comm.deadline is None


def test_a_training_step_under_a_watchdog_counts_its_blocking_calls():
    comm = get_comm()
    cfg = load_config(None, ["data.name='random'", "model.sizes=[6,8,3]", "data.batch_size=16"])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, comm, data)
    dog = Watchdog.start(comm, 60, "test")
    if comm.size == 1:
        assert dog is None  # no peers: nothing to watch
        return
    try:
        before = dog.slot.calls
        trainer.step(np.arange(16))
        # fast mode without buckets: one Allreduce of [gradient | stats] per step
        assert dog.slot.calls - before == 2 and dog.slot.what == "MPI_Allreduce"
    finally:
        dog.stop()
    assert comm.deadline is None and not dog.thread.is_alive()
