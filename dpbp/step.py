"""The training step: model + reducer + optimizer for one config, the code path every tool measures.

One step, on every rank:
    this rank's share of the global batch -> model.forward -> model.backward into the reducer's pieces
        (sums of dE_n/dw: nothing is averaged per rank)
    -> ONE in-place Allreduce of [gradient | loss | correct | stop flag]   (reduce.py)
    -> 1/(global batch) for the mean (folded into delta^(L)) + lambda W, once  (losses.py)
    -> the identical update on every rank                                  (optim.py)
Exact because E_total = sum_n E_n, so dE_total/dw = sum_n dE_n/dw: partial sums add up to the gradient.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, NamedTuple

import numpy as np

from dpbp.errors import UserError
from dpbp.losses import batch_divisor, finish_gradient, l2_penalty
from dpbp.model import Dropout, count_params
from dpbp.optim import (BLOCK, block_square_sums, clip_by_norm, lr_at, make_optimizer, norm_of_block_sums,
                        scale_to_max_norm, shard_slices, weight_slices_of)
from dpbp.partition import shares
from dpbp.reduce import CORRECT, LOSS, STOP, Layout, make_reducer
from dpbp.runs import model_of
from dpbp.threads import element_wise_threads


class StepStats(NamedTuple):
    """What one step reports, the same on every rank."""

    loss: float  # E of the batch as reported: data term (/B for mean) + lambda/2 sum ||W||^2, before the update
    correct: float  # samples whose largest output is their label (0 without labels)
    stop: float  # how many ranks were asked to stop (by a signal) before this step
    samples: int  # the global batch
    lr: float  # the learning rate of this update


class Trainer:
    """Model + reducer + optimizer for one config.

    ``input_hook(x)``, if set, sees each piece's gathered inputs before forward (fault injection in
    tests); None costs nothing.
    """

    def __init__(self, cfg, comm, data, total_steps=None, threads=None):
        """threads: for the optimizer's element-wise update (default: as many as this rank's BLAS)."""
        self.cfg, self.comm, self.data = cfg, comm, data
        self.total_steps = total_steps or cfg["train.steps"] or None  # T of the cosine schedule
        self.model = model = model_of(cfg)
        # optim.shard (ZeRO-1): rank r updates and keeps the state of params[lo:hi], whole BLOCKs.
        self.shard = bool(cfg["optim.shard"]) and comm.size > 1
        n = model.n_params
        self.counts = shares(n, comm.size, BLOCK)  # every rank's slice: whole BLOCKs
        lo = sum(self.counts[:comm.rank])
        self.bounds = (lo, lo + self.counts[comm.rank]) if self.shard else (0, n)
        bucket_bytes = 0 if self.shard else cfg["comm.bucket_mb"] * 2**20
        self.reducer = make_reducer(cfg["comm.reduce"], comm, Layout(model.shapes), model.dtype,
                                    cfg["comm.chunk"], bucket_bytes)
        self.opt = build_optimizer(cfg, model.params, model.shapes, self.bounds, threads or element_wise_threads())
        self.comm_s = 0.0  # seconds inside the gradient Allreduce (sharded: reduce-scatter + allgather), accumulated
        self.input_hook: Callable[[np.ndarray], None] | None = None
        self._micro = None  # a gradient buffer for micro-batches after a piece's first
        self._t = 0  # the update being computed: picks the dropout masks and the learning rate
        self._clip_scratch = np.empty(min(BLOCK, model.n_params)) if cfg["optim.clip_norm"] else None
        # Rows are gathered straight into the model's input buffer, or staged when the data's dtype differs.
        x = data.x
        self._stage = None if x.dtype == model.dtype else np.empty((0, x.shape[1]), x.dtype)
        self._l2_scratch = np.empty(max(W.size for W in model.weights), model.dtype) if cfg["loss.l2"] else None

    @property
    def grads(self):
        """The reduced gradient's views (after ``gradient``): .flat, .nabla_w, .nabla_b."""
        return self.reducer.result.grads

    @property
    def grad(self):
        return self.reducer.result.grads.flat

    @property
    def stats(self):
        return self.reducer.result.stats

    def _inputs(self, rows):
        """The model's input buffer holding data.x[rows], filled without temporaries."""
        x = self.model.input_buffer(len(rows))
        if self._stage is None:
            np.take(self.data.x, rows, axis=0, out=x, mode="clip")  # "clip": "raise" would buffer a copy
        else:
            if len(self._stage) < len(rows):
                self._stage = np.empty((len(rows), x.shape[1]), self._stage.dtype)
            stage = self._stage[:len(rows)]
            np.take(self.data.x, rows, axis=0, out=stage, mode="clip")
            np.copyto(x, stage)
        if self.input_hook is not None:
            self.input_hook(x)
        return x

    def gradient(self, idx, stop=0.0):
        """All ranks: the full-batch gradient of the regularised error for global indices idx.

        Leaves it in self.grads and returns the reduced statistics (loss sum, correct count, stop flags
        summed over ranks) as float64.
        """
        model, reducer = self.model, self.reducer
        B = len(idx)
        scale = 1.0 / batch_divisor(self.cfg["loss.reduction"], B)  # rides delta^(L): see MLP.backward
        for a, b, piece in reducer.begin(B):
            piece.stats[LOSS], piece.stats[CORRECT] = self._piece(idx[a:b], a, piece.grads, scale)
            reducer.add_piece(piece)
        reducer.result.stats[STOP] = stop
        t0 = time.perf_counter()
        result = reducer.reduce_scatter(self.counts) if self.shard else reducer.allreduce()
        self.comm_s += time.perf_counter() - t0
        l2 = self.cfg["loss.l2"]
        if l2 and self.shard:
            self._add_l2_to_shard(result.grads.flat, l2)
        elif l2:
            grads = result.grads
            finish_gradient(grads.nabla_w, grads.nabla_b, model.weights, l2, 1, self._l2_scratch)
        if self._clip_scratch is not None and self.shard:
            self._clip_shard(result.grads.flat, self.cfg["optim.clip_norm"])
        elif self._clip_scratch is not None:  # the reduced gradient: the same norm, bit for bit, on every rank
            clip_by_norm(result.grads.flat, self.cfg["optim.clip_norm"], self._clip_scratch)
        return result.stats.astype(np.float64)

    def _add_l2_to_shard(self, g, l2):
        """g[lo:hi] += lambda W on the weights inside this rank's shard: finish_gradient's operations
        (W * lambda, then the add), element by element, so the same bits."""
        lo, hi = self.bounds
        params = self.model.params
        for a, b in weight_slices_of(self.model.shapes):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                l2_w = self._l2_scratch[:b - a]
                np.multiply(params[a:b], l2, out=l2_w)
                g[a:b] += l2_w

    def _clip_shard(self, g, max_norm):
        """clip_by_norm with the norm of the WHOLE gradient: each rank's block sums of squares (its shard is
        whole BLOCKs), allgathered, added in block order as grad_norm adds them; then its slice scaled."""
        lo, hi = self.bounds
        sums = np.zeros(-(-self.model.n_params // BLOCK))
        blocks = [-(-c // BLOCK) for c in self.counts]
        first = sum(blocks[:self.comm.rank])
        block_square_sums(g[lo:hi], sums[first:first + blocks[self.comm.rank]], self._clip_scratch)
        self.comm.allgather_(sums, blocks)
        scale_to_max_norm(g[lo:hi], max_norm, norm_of_block_sums(sums))

    def _piece(self, rows, first, grads, scale):
        """Forward/backward over rows (at global-batch positions first, first + 1, ...) into grads,
        data.micro_batch rows at a time (each micro-batch's gradient added into grads: the sum rule
        again); returns (summed E, correct count)."""
        micro = self.cfg["data.micro_batch"]
        if not micro or len(rows) <= micro:
            return self._forward_backward(rows, first, grads, scale, self.reducer.layer_ready)
        if self._micro is None:
            self._micro = self.model.grad_views(np.zeros(self.model.n_params, self.model.dtype))
        E = correct = 0
        for k, lo in enumerate(range(0, len(rows), micro)):
            # No layer is final before the last micro-batch: the reducer starts its buckets in allreduce.
            target = grads if k == 0 else self._micro
            e, c = self._forward_backward(rows[lo:lo + micro], first + lo, target, scale, None)
            if k:
                grads.flat += self._micro.flat
            E, correct = E + e, correct + c
        return E, correct

    def _forward_backward(self, rows, first, grads, scale, ready):
        model, p = self.model, self.cfg["model.dropout"]
        dropout = Dropout(p, self.cfg["seed"], self._t, np.arange(first, first + len(rows))) if p else None
        out = model.forward(self._inputs(rows), dropout)
        t, labels = self.data.targets(rows)  # from a data file: reads only these rows
        E = model.backward(t, grads, scale, ready)
        return E, (np.count_nonzero(out.argmax(axis=1) == labels) if labels is not None else 0)

    def lr(self, t):
        """The learning rate of update t (0-based): a pure function of t and the config."""
        cfg = self.cfg
        return lr_at(t, cfg["optim.lr"], cfg["optim.schedule"], cfg["optim.warmup_steps"], self.total_steps,
                     cfg["optim.min_lr"], cfg["optim.step_size"], cfg["optim.gamma"])

    def step(self, idx, stop=0.0, t=0) -> StepStats:
        """Update t (0-based; it picks the dropout masks and the learning rate) on global indices idx."""
        self._t = t
        penalty = l2_penalty(self.model.weights, self.cfg["loss.l2"])  # of the weights the loss is taken at
        stats = self.gradient(idx, stop)
        lr = self.lr(t)
        lo, hi = self.bounds
        self.opt.step(self.grad[lo:hi], lr)
        if self.shard:  # every rank's updated slice to every rank: the same parameters everywhere
            t0 = time.perf_counter()
            self.comm.allgather_(self.model.params, self.counts)
            self.comm_s += time.perf_counter() - t0  # the second half of the sharded reduction
        loss = stats[LOSS] / batch_divisor(self.cfg["loss.reduction"], len(idx)) + penalty
        return StepStats(loss, stats[CORRECT], stats[STOP], len(idx), lr)

    def optimizer_state(self):
        """Collective when sharded: {name: array} of the WHOLE optimizer state (copies), each rank's
        slice gathered in rank order, so a checkpoint resumes on any number of ranks, sharded or not."""
        out = {}
        for name, value in self.opt.state().items():
            if self.shard and value.ndim == 1:
                full = np.zeros(self.model.n_params, value.dtype)
                full[self.bounds[0]:self.bounds[1]] = value
                out[name] = self.comm.allgather_(full, self.counts)
            else:
                out[name] = value.copy()
        return out

    def optimizer_shapes(self):
        """{name: shape} of optimizer_state() (the whole buffer's, sharded or not)."""
        n = self.model.n_params
        return {k: (n,) if v.ndim == 1 else v.shape for k, v in self.opt.state().items()}

    def load_optimizer_state(self, state):
        """Continue from a whole optimizer state (optimizer_state()'s names and shapes): this rank's slice."""
        lo, hi = self.bounds
        self.opt.load_state({k: v[lo:hi] if np.ndim(v) == 1 else v for k, v in state.items()})

    def first_nonfinite(self):
        """The name of the first reduced gradient tensor holding NaN or inf, or None. Sharded: of the
        parameters (the same on every rank after the allgather; a non-finite gradient entry makes its
        parameter non-finite in every optimizer), since no rank holds the whole reduced gradient."""
        for name, g in self.model.tensors(self.model.params if self.shard else self.grad).items():
            if not np.isfinite(g).all():
                return name
        return None

    def gradient_finite(self):
        """Cheap test first (one BLAS dot, no temporary); the exact test only if it overflows."""
        g = self.model.params if self.shard else self.grad
        return math.isfinite(float(np.dot(g, g))) or bool(np.isfinite(g).all())


def build_optimizer(cfg, params, shapes, bounds=None, threads=1):
    """The configured optimizer over params[lo:hi] (bounds; default the whole flat buffer), its update on
    `threads` threads."""
    kind = cfg["optim.kind"]
    lo, hi = bounds or (0, params.size)
    return make_optimizer(kind, params[lo:hi], cfg["optim.lr"], momentum=cfg["optim.momentum"] if kind == "sgd" else 0.0,
                          nesterov=cfg["optim.nesterov"], betas=tuple(cfg["optim.betas"]), eps=cfg["optim.eps"],
                          weight_decay=cfg["optim.weight_decay"] if kind == "adamw" else 0.0,
                          weight_slices=shard_slices(weight_slices_of(shapes), lo, hi), threads=threads)


def memory_need(cfg, n_train, size):
    """{what: bytes} one rank holds at its peak (the data set not counted): the parameters and the model's
    gradient, the reducer's buffers, the optimizer's state (1/P of it with optim.shard), the activations of
    a piece, and the larger of two transients: the float64 starting parameters (setup) and rank 0's copies
    of parameters and state for a checkpoint."""
    sizes, s = cfg["model.sizes"], np.dtype(cfg["model.dtype"]).itemsize
    n = count_params(sizes)
    kind = cfg["optim.kind"]
    copies = 2 if kind in ("adam", "adamw") else (1 if cfg["optim.momentum"] else 0)  # m and v; momentum
    n_state = max(shares(n, size, BLOCK)) if cfg["optim.shard"] and size > 1 else n  # the largest shard: whole BLOCKs
    batch = min(cfg["data.batch_size"], n_train)
    rows = max(shares(batch, size))  # the largest rank's share of a batch
    reduce_copies = 1  # fast: one flat buffer
    if cfg["comm.reduce"] == "reproducible":  # buf, the integer sums, a buffer per local chunk but the last
        chunk = cfg["comm.chunk"]
        reduce_copies = 1 + max(shares(-(-batch // chunk), size))  # the most chunks any rank computes
        rows = min(rows, chunk)
    micro = cfg["data.micro_batch"]
    if micro and micro < rows:
        rows, reduce_copies = micro, reduce_copies + 1  # and the micro-batches' gradient buffer
    hidden = sum(sizes[1:-1]) if cfg["model.dropout"] else 0
    return {"parameters and gradient": 2 * n * s, "reduction buffers": reduce_copies * n * s,
            f"{kind} state": copies * n_state * s,
            "activations": (3 * sum(sizes) + 2 * hidden) * rows * s,
            "starting parameters or checkpoint copies": max(8 * n, (1 + copies) * n * s)}


def memory_limits():
    """(bytes available to new allocations on this node: MemAvailable, else physical memory or None;
    bytes of address space this process may still map under RLIMIT_AS (ulimit -v), or None)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return available, None
    if soft == resource.RLIM_INFINITY:
        return available, None
    used = 0
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return available, max(soft - used, 0)


def memory_problem(cfg, need, local_size, available, as_left):
    """Why the run cannot fit (one message), or None. need: memory_need's; local_size ranks share the
    node's `available` bytes; each process may map `as_left` more bytes (RLIMIT_AS is per process)."""
    total, gib = sum(need.values()), 2**30
    parts = ", ".join(f"{k} {v / gib:.3g}" for k, v in need.items() if v)
    what = (f"model.sizes = {cfg['model.sizes']} ({count_params(cfg['model.sizes']):,} parameters, "
            f"{cfg['model.dtype']}) with data.batch_size = {cfg['data.batch_size']} needs about "
            f"{total / gib:.3g} GiB per rank ({parts})")
    if as_left is not None and total > as_left:
        return (f"{what}; the address-space limit (ulimit -v, RLIMIT_AS) leaves each process "
                f"{as_left / gib:.3g} GiB: choose a smaller model or batch, or raise the limit")
    if available is not None and local_size * total > available:
        ranks = f"the {local_size} ranks on this node need {local_size * total / gib:.3g} GiB" if local_size > 1 \
            else "this node has"
        have = f"{available / gib:.3g} GiB available (MemAvailable)"
        return (f"{what}; {ranks} and it has {have}: use fewer ranks per node, a smaller model or batch"
                if local_size > 1 else f"{what}; {ranks} {have}: choose a smaller model or batch")
    return None


def check_memory(cfg, n_train, comm):
    """Collective: the same UserError on every rank if the ranks on some node cannot hold their buffers
    (a typo in model.sizes or data.batch_size), rather than a MemoryError halfway through setting up."""
    _, local_size = comm.local_rank_size()
    need = memory_need(cfg, n_train, comm.size)
    comm.agree(memory_problem(cfg, need, local_size, *memory_limits()))
