"""dpbp.optim against torch.optim: 20 updates in float64 on random data, max |difference| per optimizer.

Not a pytest module (torch is no dependency of dpbp). Run it with a Python that has torch and numpy:
    PYTHONPATH=<worktree> /tmp/torchvenv/bin/python tests/peers/torch_optim_check.py

The parameters are a small MLP's tensors (weights and biases) laid out in one flat buffer, as dpbp holds
them; torch gets the same tensors as separate parameters in one group (AdamW decays the weights only, via
a second group with weight_decay 0 for the biases). Each update uses a fresh random gradient and the
learning rate of a warmup + cosine schedule (dpbp.optim.lr_at, set on torch's param groups), and the
whole gradient is first clipped (dpbp.optim.clip_by_norm against torch.nn.utils.clip_grad_norm_).
Prints one line per optimizer and exits 1 if any difference exceeds TOLERANCE.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from dpbp.model import param_shapes
from dpbp.optim import clip_by_norm, lr_at, make_optimizer, weight_slices_of

STEPS, TOLERANCE = 20, 1e-12
SIZES = [13, 17, 11, 5]
CASES = {
    "sgd": (dict(kind="sgd", lr=0.1), lambda w, b: torch.optim.SGD([*w, *b], lr=0.1)),
    "sgd momentum 0.9": (dict(kind="sgd", lr=0.1, momentum=0.9),
                         lambda w, b: torch.optim.SGD([*w, *b], lr=0.1, momentum=0.9)),
    "sgd nesterov 0.9": (dict(kind="sgd", lr=0.1, momentum=0.9, nesterov=True),
                         lambda w, b: torch.optim.SGD([*w, *b], lr=0.1, momentum=0.9, nesterov=True)),
    "adam": (dict(kind="adam", lr=0.01, betas=(0.9, 0.99), eps=1e-8),
             lambda w, b: torch.optim.Adam([*w, *b], lr=0.01, betas=(0.9, 0.99), eps=1e-8, foreach=False)),
    "adamw 0.1": (dict(kind="adamw", lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
                  lambda w, b: torch.optim.AdamW([{"params": w}, {"params": b, "weight_decay": 0.0}], lr=0.01,
                                                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)),
}


def schedule(t, base):
    return lr_at(t, base, "cosine", warmup_steps=3, total_steps=STEPS, min_lr=base / 10)


def run_case(ours_kw, make_torch, seed=0):
    shapes = param_shapes(SIZES)
    n = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(seed)
    flat = rng.normal(size=n)
    tensors, offset = [], 0
    for s in shapes:
        k = int(np.prod(s))
        tensors.append(torch.tensor(flat[offset:offset + k].reshape(s), dtype=torch.float64, requires_grad=True))
        offset += k
    kw = dict(ours_kw)
    kind, base = kw.pop("kind"), kw["lr"]
    opt = make_optimizer(kind, flat, weight_slices=weight_slices_of(shapes), **kw)
    topt = make_torch(tensors[0::2], tensors[1::2])
    worst_norm = 0.0
    for t in range(STEPS):
        g = rng.normal(size=n) * (3.0 if t % 2 else 0.1)  # clipping acts on every other update
        offset = 0
        for p, s in zip(tensors, shapes):
            k = int(np.prod(s))
            p.grad = torch.tensor(g[offset:offset + k].reshape(s), dtype=torch.float64)
            offset += k
        norm = clip_by_norm(g, 5.0)
        tnorm = float(torch.nn.utils.clip_grad_norm_(tensors, 5.0))
        worst_norm = max(worst_norm, abs(norm - tnorm))
        lr = schedule(t, base)
        for group in topt.param_groups:
            group["lr"] = lr
        opt.step(g, lr)
        topt.step()
    theirs = np.concatenate([p.detach().numpy().ravel() for p in tensors])
    return float(np.max(np.abs(flat - theirs))), float(np.max(np.abs(theirs))), worst_norm


def main():
    torch.set_default_dtype(torch.float64)
    print(f"torch {torch.__version__}, numpy {np.__version__}; {STEPS} updates, float64, sizes {SIZES}, "
          f"warmup 3 + cosine lr, clip_by_norm 5.0")
    bad = False
    for name, (ours, theirs) in CASES.items():
        diff, scale, norm_diff = run_case(ours, theirs)
        bad |= diff > TOLERANCE
        print(f"{name:18s} max |w_dpbp - w_torch| = {diff:.3e}   (max |w| {scale:.3f}; "
              f"max |norm difference| {norm_diff:.3e})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
