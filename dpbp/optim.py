"""Optimizers over the flat parameter buffer, the learning-rate schedule and gradient clipping.

Imports only numpy. Conventions are torch.optim's (dampening 0, no amsgrad), step by step:

  SGD       v <- mu v + g ;  w <- w - lr v                 (mu = 0: the seed's w <- w - lr dE/dw)
  Nesterov  v <- mu v + g ;  w <- w - lr (g + mu v)
  Adam      m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  t counts updates from 1
            w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  AdamW     w <- w - lr lambda w on the weights (not the biases), then the Adam update

The optimizers see only the reduced gradient, so every rank applies the identical update. Every
update is element-wise: element i of the result depends only on element i of params, grad and the
state, with the same operations in the same order whatever array it sits in. So an optimizer built on
a slice params[lo:hi] (with ``shard_slices`` for AdamW's weight slices) computes bitwise what the
whole-buffer optimizer computes there, and a ZeRO-1 run (each rank updates its slice and keeps only
that slice's state, then the parameters are allgathered) matches the unsharded run bit for bit.

Every optimizer's ``step(grad, lr)`` takes the learning rate of this update (``lr_at``), so the
schedule is a pure function of the update index and a resumed run continues bitwise. ``state()`` holds
everything else the next update needs (moments, Adam's update count), for checkpoints.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from dpbp.workers import pool, run_parts, split

BLOCK = 1 << 17  # values updated together: the block's w, state, g and update stay in cache between passes
KINDS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm


class Optimizer(Protocol):
    """What the training step needs from an optimizer; make_optimizer returns one.

    params: the 1-D buffer (n,) the optimizer updates in place (the model's flat buffer, or a slice).
    step(grad, lr): one update from grad (n,), same dtype as params, with learning rate lr.
    state(): {name: array}, the live state arrays (copy them to keep them); the same names and shapes
    are what load_state expects. load_state(state): continue from a state() taken earlier.
    """

    params: np.ndarray

    def step(self, grad: np.ndarray, lr: float | None = None) -> None: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


def _blocks(n):
    return [slice(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]


class _Split:
    """An update's blocks shared out among `threads` threads (dpbp.workers), each with its own scratch:
    every element gets the same operations in the same order, so any thread count gives the same bits."""

    def __init__(self, items, n, dtype, threads):
        """items: one per block of a buffer of n values (its slice, or a tuple starting with it)."""
        self.parts = split(items, threads)
        self.scratch = [np.empty(min(BLOCK, n), dtype) for _ in self.parts]  # one block's update each
        self.workers = pool(len(self.parts))

    def run(self, fn):
        """fn(part, scratch) for every part, on the pool's threads; returns when all are done."""
        run_parts(lambda k, part: fn(part, self.scratch[k]), self.parts, self.workers)


def _check_params(params):
    if not (isinstance(params, np.ndarray) and params.ndim == 1 and params.dtype.kind == "f"):
        raise ValueError("params must be a 1-D floating-point array (the flat parameter buffer or a slice of it)")


def _load(target, state, name):
    """target[...] = state[name], with a message naming the entry when it is missing or misshapen."""
    if name not in state:
        raise ValueError(f"optimizer state has no {name!r}")
    value = np.asarray(state[name])
    if value.shape != target.shape:
        raise ValueError(f"optimizer state {name!r} has shape {value.shape}, expected {target.shape}")
    target[...] = value


class SGD:
    """v <- mu v + g ;  w <- w - lr v   (momentum);  w <- w - lr (g + mu v)   (nesterov);  w <- w - lr g (mu = 0).

    params: (n,) updated in place; velocity v: (n,) in params' dtype, zero at the start, so the first
    update sets v = g as torch does. lr given here is the default for step(grad) without a rate.
    """

    def __init__(self, params, lr, momentum=0.0, nesterov=False, threads=1):
        _check_params(params)
        if nesterov and not momentum:
            raise ValueError("nesterov needs a momentum > 0")
        self.params, self.lr, self.momentum, self.nesterov = params, lr, momentum, nesterov
        self.velocity = np.zeros_like(params) if momentum else None
        self._split = _Split(_blocks(params.size), params.size, params.dtype, threads)  # lr v (or lr (g + mu v)) per block

    def step(self, grad, lr=None):
        """Update params in place from grad (n,) (same dtype as params) with rate lr (default: self.lr).

        NumPy cannot fuse v *= mu, v += g, lr v, w -= lr v into one pass, so they run block by block:
        each block's arrays are read from memory once and stay in cache for the other passes, and no
        parameter-sized temporary is needed. The blocks are shared out among the threads (_Split).
        """
        lr = self.lr if lr is None else lr
        self._split.run(lambda blocks, update: self._update_blocks(blocks, update, grad, lr))

    def _update_blocks(self, blocks, update, grad, lr):
        params, v, mu, nesterov = self.params, self.velocity, self.momentum, self.nesterov
        for b in blocks:
            u = update[:b.stop - b.start]
            if v is None:
                np.multiply(grad[b], lr, out=u)
            else:
                vb = v[b]
                vb *= mu
                vb += grad[b]
                if nesterov:  # g + mu v, with the new v
                    np.multiply(vb, mu, out=u)
                    u += grad[b]
                    u *= lr
                else:
                    np.multiply(vb, lr, out=u)
            params[b] -= u

    def state(self):
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state):
        if self.velocity is not None:
            _load(self.velocity, state, "velocity")


class Adam:
    """torch.optim.Adam (no weight decay, no amsgrad) over a flat buffer:

    t <- t + 1
    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    params, m, v: (n,), m and v in params' dtype (as torch keeps them), zero at the start; t = 0.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, threads=1):
        _check_params(params)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or eps < 0.0:
            raise ValueError(f"Adam needs 0 <= beta < 1 and eps >= 0, not betas={betas}, eps={eps}")
        self.params, self.lr, self.betas, self.eps = params, lr, (float(b1), float(b2)), float(eps)
        self.exp_avg = np.zeros_like(params)
        self.exp_avg_sq = np.zeros_like(params)
        self.t = 0
        self.weight_decay = 0.0
        self.threads = threads
        self._plan(())

    def _plan(self, weight_slices):
        """Blocks, each with the weight slices inside it to decay (AdamW), shared out among the threads."""
        plan = [(b, tuple(slice(max(b.start, a), min(b.stop, c)) for a, c in weight_slices
                          if a < b.stop and c > b.start)) for b in _blocks(self.params.size)]
        self._split = _Split(plan, self.params.size, self.params.dtype, self.threads)

    def step(self, grad, lr=None):
        """Update params in place from grad (n,) with rate lr (default: self.lr), block by block as SGD.

        The scalars (lr / (1 - b1^t), sqrt(1 - b2^t)) are computed once per update in Python floats as
        torch computes them; each block then makes one pass per array operation on cached data.
        """
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        step_size = lr / (1.0 - b1 ** self.t)
        bc2_sqrt = (1.0 - b2 ** self.t) ** 0.5  # torch writes ** 0.5, not math.sqrt
        keep = 1.0 - lr * self.weight_decay
        self._split.run(lambda plan, update: self._update_blocks(plan, update, grad, step_size, bc2_sqrt, keep))

    def _update_blocks(self, plan, update, grad, step_size, bc2_sqrt, keep):
        params, m, v, eps, (b1, b2) = self.params, self.exp_avg, self.exp_avg_sq, self.eps, self.betas
        for b, decay in plan:
            for d in decay:  # AdamW: w <- w (1 - lr lambda), before the Adam update, as torch does
                params[d] *= keep
            u, gb, mb, vb = update[:b.stop - b.start], grad[b], m[b], v[b]
            mb *= b1  # m <- b1 m + (1 - b1) g
            np.multiply(gb, 1.0 - b1, out=u)
            mb += u
            vb *= b2  # v <- b2 v + (1 - b2) g^2
            np.square(gb, out=u)  # g g exactly, as multiply(g, g), at the cost of a one-input pass
            u *= 1.0 - b2
            vb += u
            np.sqrt(vb, out=u)  # denom = sqrt(v) / sqrt(1 - b2^t) + eps
            u /= bc2_sqrt
            u += eps
            np.divide(mb, u, out=u)  # w <- w - lr / (1 - b1^t) * m / denom
            u *= step_size
            params[b] -= u

    def state(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": np.array(self.t, np.int64)}

    def load_state(self, state):
        _load(self.exp_avg, state, "exp_avg")
        _load(self.exp_avg_sq, state, "exp_avg_sq")
        if "step" not in state:
            raise ValueError("optimizer state has no 'step'")
        self.t = int(state["step"])


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay on the weights, then the Adam update.

    w <- w - lr lambda w   for w in weight_slices (computed as w (1 - lr lambda), as torch does);
    biases (everything outside weight_slices) are not decayed. Then Adam's m, v, t and w updates.
    weight_slices: sorted, non-overlapping (start, stop) ranges of params' indices (see
    ``weight_slices_of`` and, for an optimizer on a slice of the buffer, ``shard_slices``).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, weight_slices=(), threads=1):
        super().__init__(params, lr, betas, eps, threads)
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, not {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.weight_slices = _checked_slices(weight_slices, params.size)
        if self.weight_decay:
            self._plan(self.weight_slices)


def _checked_slices(slices, n):
    out, end = [], 0
    for a, c in slices:
        a, c = int(a), int(c)
        if not (end <= a < c <= n):
            raise ValueError(f"weight slices must be sorted, non-overlapping, non-empty ranges inside [0, {n}): "
                             f"got {list(slices)}")
        out.append((a, c))
        end = c
    return out


def weight_slices_of(shapes):
    """(start, stop) of every tensor with 2 or more dimensions (the weights W, not the biases b) in a flat
    buffer holding tensors of these shapes in order, e.g. ``model.shapes``."""
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        if len(shape) >= 2 and n:
            out.append((offset, offset + n))
        offset += n
    return out


def shard_slices(weight_slices, lo, hi):
    """The parts of the full buffer's weight_slices inside [lo, hi), relative to lo: the weight_slices
    for an optimizer built on params[lo:hi] (a ZeRO-1 shard)."""
    return [(max(a, lo) - lo, min(c, hi) - lo) for a, c in weight_slices if a < hi and c > lo]


def make_optimizer(kind, params, lr, momentum=0.0, nesterov=False, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.0, weight_slices=(), threads=1) -> Optimizer:
    """The optimizer `kind` ("sgd", "adam" or "adamw") over params (n,), its update run on `threads` threads.

    sgd uses momentum and nesterov; adam and adamw use betas and eps; adamw alone uses weight_decay
    (decoupled, on weight_slices). torch's coupled weight_decay for SGD and Adam (g + lambda w) is the
    loss's l2 term (losses.finish_gradient), so it is refused here rather than applied twice.
    Raises ValueError for an unknown kind or a setting the kind does not use.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(KINDS)}")
    if weight_decay and kind != "adamw":
        raise ValueError(f"weight_decay is for adamw; for {kind}, l2 in the loss is torch's weight_decay")
    if nesterov and kind != "sgd":
        raise ValueError(f"nesterov is for sgd, not {kind}")
    if kind == "sgd":
        return SGD(params, lr, momentum, nesterov, threads)
    if kind == "adam":
        return Adam(params, lr, betas, eps, threads)
    return AdamW(params, lr, betas, eps, weight_decay, weight_slices, threads)


# ---------------------------------------------------------------- learning-rate schedule


def lr_at(t, base_lr, schedule="constant", warmup_steps=0, total_steps=None, min_lr=0.0, step_size=1, gamma=1.0):
    """The learning rate of update t (0-based), a pure function of its arguments. W = warmup_steps,
    T = total_steps, lr = base_lr:

      t < W      lr (t + 1) / W                       (linear warmup; update W - 1 reaches lr)
      constant   lr
      step       lr gamma^floor((t - W) / step_size)
      cosine     min_lr + (lr - min_lr) (1 + cos(pi (t - W) / (T - W))) / 2,   t clamped to T (min_lr from T on)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if t < warmup_steps:
        return base_lr * (t + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        if step_size < 1:
            raise ValueError(f"the step schedule needs step_size >= 1, not {step_size}")
        return base_lr * gamma ** ((t - warmup_steps) // step_size)
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"the cosine schedule needs total_steps > warmup_steps, not {total_steps} <= {warmup_steps}")
    progress = (min(t, total_steps) - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


# ---------------------------------------------------------------- gradient clipping


def grad_norm(grad, scratch=None):
    """||g||_2 of the flat gradient (n,), accumulated in float64.

    The same bits on every rank for the same gradient: each block's squares are formed exactly in
    float64 and summed by NumPy's pairwise reduction (single-threaded, its order fixed by the length),
    then the block sums are added in block order. np.dot would hand the sum to BLAS, whose order can
    depend on its thread count. scratch: optional float64 buffer (allocated if None; at most BLOCK
    values of it are used) so that a training step need not allocate.
    """
    n = grad.size
    if scratch is None:
        scratch = np.empty(min(BLOCK, max(n, 1)), np.float64)
    k = min(scratch.size, BLOCK)
    return norm_of_block_sums(block_square_sums(grad, np.empty(-(-n // k)), scratch, k))


def block_square_sums(grad, out, scratch, k=BLOCK):
    """out[j] <- the float64 sum of squares of grad's block j (k values, the last shorter; scratch holds
    k or more values). grad_norm(g) is the square root of these sums added in block order, so a ZeRO-1
    shard of whole blocks contributes bitwise its part."""
    for j, a in enumerate(range(0, grad.size, k)):
        s = scratch[:min(k, grad.size - a)]
        gb = grad[a:a + k]
        np.square(gb, out=s, dtype=np.float64)  # exact in float64, as multiply(gb, gb) but faster
        out[j] = float(np.add.reduce(s))
    return out


def norm_of_block_sums(sums):
    """||g||_2 from block_square_sums, added in block order (the order fixes the bits)."""
    total = 0.0
    for s in sums.tolist():
        total += s
    return math.sqrt(total)


def scale_to_max_norm(grad, max_norm, norm):
    """grad <- grad min(1, c / (norm + 1e-6)) in place, given its norm; a non-finite norm leaves it alone."""
    coef = max_norm / (norm + CLIP_EPS)
    if math.isfinite(norm) and coef < 1.0:
        grad *= coef


def clip_by_norm(grad, max_norm, scratch=None):
    """torch.nn.utils.clip_grad_norm_ over the whole flat gradient, in place; returns ||g||_2 before.

    g <- g min(1, c / (||g||_2 + 1e-6)). A non-finite norm leaves g alone, so the trainer's non-finite
    check still names the tensor (torch would scale it by 0 or nan). scratch: see grad_norm.
    """
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, not {max_norm}")
    norm = grad_norm(grad, scratch)
    scale_to_max_norm(grad, max_norm, norm)
    return norm
