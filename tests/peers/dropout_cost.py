"""What dropout would add to the benchmark's 784-1024-1024-10 float32 step at batch 256 (a measurement, not a test).

    PYTHONPATH=<worktree> OPENBLAS_NUM_THREADS=1 python tests/peers/dropout_cost.py [--repeats 30]

Times, as medians over repeats, interleaved so that a noisy machine slows all rows alike:
  step          dpbp.train.Trainer.step on the bench's 784-1024-1024-10 spec (dpbp.bench.SPECS), no dropout
  GEMM          one (256, 1024) x (1024, 1024)^T float32 product, the hidden layer's forward GEMM
  dropout fwd   dropout_forward on one (256, 1024) float32 layer, p = 0.1, preallocated mask and workspace
  dropout bwd   dropout_backward on the same layer
and the estimated cost of dropout on both hidden layers (2 x (fwd + bwd)) as a fraction of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dpbp.bench import LARGE, SPECS
from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.layers import dropout_backward, dropout_forward, dropout_workspace
from dpbp.model import initial_params
from dpbp.train import Trainer

B, N, P = 256, 1024, 0.1


def trainer_step():
    sets, _ = SPECS[LARGE]
    cfg = load_config(None, [*sets, "data.val_fraction=0.0", "loss.l2=0.0"])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, SerialComm(), data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 0))
    batches = [batch_indices(len(data), B, 0, s, True, False)[0] for s in range(4)]
    state = {"i": 0}

    def step():
        trainer.step(batches[state["i"] % 4])
        state["i"] += 1
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((B, N), dtype=np.float32)
    W = rng.random((N, N), dtype=np.float32)
    net, out, delta = np.empty((B, N), np.float32), x.copy(), x.copy()
    mask, work, positions = np.empty((B, N), np.float32), dropout_workspace(N), np.arange(B)
    counter = {"step": 0}

    def forward():
        counter["step"] += 1  # a new mask every time, as in training
        dropout_forward(out, P, 1, counter["step"], positions, 1, mask, work, x=x)

    rows = {"step": trainer_step(), "GEMM": lambda: np.matmul(x, W.T, out=net),
            "dropout fwd": forward, "dropout bwd": lambda: dropout_backward(delta, mask)}
    times = {k: [] for k in rows}
    for f in rows.values():
        f()  # warm up
    for _ in range(args.repeats):
        for name, f in rows.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:12s} {ms:8.3f} ms   (min {min(times[name]) * 1e3:.3f}, max {max(times[name]) * 1e3:.3f})")
    layer = med["dropout fwd"] + med["dropout bwd"]
    print(f"dropout p={P} on one (256, 1024) layer, fwd + bwd: {layer:.3f} ms = {layer / med['GEMM']:.1%} of its GEMM")
    print(f"on both hidden layers: {2 * layer:.3f} ms = {2 * layer / med['step']:.1%} of the step")
    low = {k: min(v) * 1e3 for k, v in times.items()}  # the least disturbed repeat of each: on a shared machine
    pair = low["dropout fwd"] + low["dropout bwd"]
    print(f"from the minima: one layer {pair:.3f} ms = {pair / low['GEMM']:.1%} of its GEMM, both hidden layers "
          f"{2 * pair:.3f} ms = {2 * pair / low['step']:.1%} of the step")


if __name__ == "__main__":
    main()
