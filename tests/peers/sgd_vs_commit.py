"""SGD with momentum's training step here against another dpbp tree (e.g. a commit before a change), as two
processes alternated (a measurement, not a test).

    git worktree add --detach /tmp/dpbp-old ee33c48
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tests/peers/sgd_vs_commit.py /tmp/dpbp-old [--rounds 8]

Each round starts one process per tree, old first, for each BLAS thread count (OPENBLAS_NUM_THREADS 1, 2);
a process builds Trainer (dpbp.step's, or dpbp.train's in older trees) on the benchmark's 784-1024-1024-10
float32 spec with SGD momentum 0.9, takes 3 warm-up and --steps timed steps, and reports their median and
minimum. Printed: per thread count, the medians over rounds and the per-round ratios new/old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETS = ["model.sizes=[784,1024,1024,10]", "model.activation='relu'", "model.output='softmax'",
        "loss.kind='cross_entropy'", "model.dtype='float32'", "data.name='random'", "data.batch_size=256",
        "optim.lr=0.01", "optim.momentum=0.9", "data.val_fraction=0.0", "loss.l2=0.0", "train.steps=1"]


def child(steps):
    """In the tree on PYTHONPATH: '<median ms> <min ms>' of Trainer.step."""
    from dpbp.comm import SerialComm
    from dpbp.config import load_config
    from dpbp.data import batch_indices, load_data
    from dpbp.model import initial_params
    try:
        from dpbp.step import Trainer
    except ImportError:
        from dpbp.train import Trainer
    cfg = load_config(None, SETS)
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, SerialComm(), data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 0))
    batches = [batch_indices(len(data), 256, 0, s, True, False)[0] for s in range(steps)]
    for idx in batches[:3]:
        trainer.step(idx)
    times = []
    for idx in batches:
        t0 = time.perf_counter()
        trainer.step(idx)
        times.append(time.perf_counter() - t0)
    print(f"{statistics.median(times) * 1e3:.3f} {min(times) * 1e3:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the other dpbp tree (a git worktree)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.steps)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    trees = {"old": os.path.abspath(args.old), "new": here}
    for threads in (1, 2):
        got = {"old": [], "new": []}
        for _ in range(args.rounds):
            for side, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": tree, "OPENBLAS_NUM_THREADS": str(threads),
                       "OMP_NUM_THREADS": str(threads)}
                out = subprocess.run([sys.executable, os.path.abspath(__file__), args.old, "--child", "--steps",
                                      str(args.steps)], env=env, capture_output=True, text=True, check=True)
                got[side].append([float(v) for v in out.stdout.split()])
        for k, label in ((0, "medians"), (1, "minima")):
            old, new = [r[k] for r in got["old"]], [r[k] for r in got["new"]]
            ratios = [b / a for a, b in zip(old, new)]
            print(f"{threads} thread(s), step {label}: old {statistics.median(old):.2f} ms, new "
                  f"{statistics.median(new):.2f} ms; new/old per round median {statistics.median(ratios):.3f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
