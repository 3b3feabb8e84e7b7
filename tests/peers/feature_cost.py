"""What Adam and dropout add to the benchmark's 784-1024-1024-10 float32 step at batch 256 (a measurement, not
a test), one step at a time so that a noisy machine slows all rows alike.

    PYTHONPATH=<worktree> OPENBLAS_NUM_THREADS=1 python tests/peers/feature_cost.py [--repeats 60]

Rows, each timed once per repeat, the repeats interleaved (row 1, row 2, ..., then again):
  step sgd+momentum   dpbp.step.Trainer.step on the bench's spec (dpbp.bench.SPECS), SGD with momentum 0.9
  step adam           the same with optim.kind = 'adam' (lr 0.001)
  step dropout 0.1    the same as the first with model.dropout = 0.1
  sgd update          SGD-with-momentum's step(grad, lr) alone on a buffer of the model's 1,863,690 values,
                      on the BLAS thread count's threads as in the Trainer (dpbp.workers)
  adam update         Adam's step(grad, lr) alone on the same
  dropout fwd         dropout_forward on one (256, 1024) float32 layer, p = 0.1, into a preallocated buffer
  dropout bwd         dropout_backward on the same layer
Prints each row's median and minimum (the least disturbed repeat: on a shared machine the medians of a
13-ms step are inflated by whatever else runs) and the ratios of the steps, from medians and from minima,
with the same ratios estimated from the parts (update and dropout costs added to the SGD step).
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
from dpbp.optim import make_optimizer
from dpbp.step import Trainer
from dpbp.threads import element_wise_threads

B, N, P = 256, 1024, 0.1


def trainer_step(*extra):
    sets, _ = SPECS[LARGE]
    cfg = load_config(None, [*sets, "data.val_fraction=0.0", "loss.l2=0.0", "train.steps=1000", *extra])
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, SerialComm(), data)
    trainer.model.load(initial_params(cfg["model.sizes"], cfg["model.activation"], 0))
    batches = [batch_indices(len(data), B, 0, s, True, False)[0] for s in range(4)]
    state = {"i": 0}

    def step():
        trainer.step(batches[state["i"] % 4], t=state["i"])
        state["i"] += 1
    return step, trainer.model.n_params


def update(kind, n, **kw):
    rng = np.random.default_rng(0)
    params, grad = rng.normal(size=(2, n)).astype(np.float32)
    opt = make_optimizer(kind, params, **kw, threads=element_wise_threads())  # as the Trainer builds it
    return lambda: opt.step(grad, kw["lr"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((B, N), dtype=np.float32)
    out, delta = np.empty((B, N), np.float32), x.copy()
    mask, work, positions = np.empty((B, N), np.float32), dropout_workspace(N), np.arange(B)
    counter = {"step": 0}

    def forward():
        counter["step"] += 1  # a new mask every time, as in training
        dropout_forward(out, P, 1, counter["step"], positions, 1, mask, work, x=x)

    sgd, n = trainer_step()
    rows = {"step sgd+momentum": sgd, "step adam": trainer_step("optim.kind='adam'", "optim.lr=0.001")[0],
            "step dropout 0.1": trainer_step("model.dropout=0.1")[0],
            "sgd update": update("sgd", n, lr=0.01, momentum=0.9), "adam update": update("adam", n, lr=0.001),
            "dropout fwd": forward, "dropout bwd": lambda: dropout_backward(delta, mask)}
    times = {k: [] for k in rows}
    for f in rows.values():
        f()  # warm up
    for _ in range(args.repeats):
        for name, f in rows.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    for label, pick in (("median", statistics.median), ("minimum", min)):
        ms = {k: pick(v) * 1e3 for k, v in times.items()}
        print(f"-- {label}s over {args.repeats} repeats")
        for name, value in ms.items():
            print(f"{name:18s} {value:8.3f} ms")
        base = ms["step sgd+momentum"]
        parts_adam = (base + ms["adam update"] - ms["sgd update"]) / base
        parts_drop = (base + 2 * (ms["dropout fwd"] + ms["dropout bwd"])) / base
        print(f"adam / sgd+momentum step: {ms['step adam'] / base:.3f} (from the parts {parts_adam:.3f}); "
              f"dropout 0.1 / no dropout: {ms['step dropout 0.1'] / base:.3f} (from the parts {parts_drop:.3f})")


if __name__ == "__main__":
    main()
