"""How far optim.shard's fast mode is from the unsharded update at P >= 3 (a measurement, not a test).

    mpirun -n 3 python tests/peers/shard_fast_rounding.py [--kind sgd] [--steps 3]

Builds the model of tests/mpi/test_shard.py (100-1000-1000-10 float64, 1,112,010 parameters, data 'random',
loss.l2 0.01), trains it for --steps steps of 24 samples twice on the same ranks, once with optim.shard
(MPI_Reduce_scatter of the gradient) and once without (MPI_Allreduce), and prints on rank 0 how many
parameters differ and by how much. At P = 2 both are bitwise equal (a two-term sum is the same in either
order); at P >= 3 MPI may add the ranks' partial sums in another order in each call.
"""

from __future__ import annotations

import argparse

import numpy as np

from dpbp.comm import get_comm
from tests.mpi.test_shard import _run, _trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="sgd", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    comm = get_comm()
    extra = ["comm.reduce='fast'", f"optim.kind='{args.kind}'"]
    sharded = _run(_trainer(comm, True, extra), args.steps)
    whole = _run(_trainer(comm, False, extra), args.steps)
    diff = np.abs(sharded - whole)
    if comm.rank == 0:
        print(f"P = {comm.size}, {args.kind}, {args.steps} steps, {whole.size:,} parameters: "
              f"{int(np.count_nonzero(diff)):,} differ, max |difference| {diff.max():.3g} "
              f"(max |w| {np.abs(whole).max():.3g})")


if __name__ == "__main__":
    main()
