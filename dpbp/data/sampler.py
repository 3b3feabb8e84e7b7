"""The exact distributed sampler: which samples each step uses, as a pure function of its arguments.

Per epoch one permutation from (seed, epoch), the same on every rank; the global batches are
consecutive slices of it, so over an epoch every sample is used exactly once (the last partial batch
too, unless drop_last). Each global batch is then cut into contiguous per-rank shares by the reducer
(``dpbp.reduce``: ``share`` in fast mode, whole chunks in reproducible mode); no sample is repeated
to pad a share, so shares differ by at most one sample (one chunk).
"""

from __future__ import annotations

import functools

import numpy as np

from dpbp.errors import UserError


def batches_per_epoch(n, batch_size, drop_last):
    return n // batch_size if drop_last else -(-n // batch_size)


@functools.lru_cache(maxsize=2)  # every step of an epoch reuses it; read-only
def epoch_order(n, seed, epoch, shuffle):
    """One permutation per (seed, epoch), identical on every rank."""
    order = np.arange(n) if not shuffle else np.random.default_rng([seed, epoch, 0xE90C]).permutation(n)
    order.flags.writeable = False  # cached and shared by every step of the epoch
    return order


def epoch_position(n, batch_size, step, drop_last):
    """(epoch, batch within the epoch) of global step `step`."""
    per_epoch = batches_per_epoch(n, batch_size, drop_last)
    if per_epoch == 0:
        raise UserError(f"data.batch_size = {batch_size} is larger than the {n} training samples "
                        f"and data.drop_last = true leaves no batch")
    return divmod(step, per_epoch)


def batch_indices(n, batch_size, seed, step, shuffle, drop_last):
    """Global sample indices of global step `step` (counting from 0), with its epoch.

    Steps walk through epochs in order; every sample is used exactly once per epoch, the last partial
    batch included unless drop_last. A pure function, so resuming at any step needs no saved state.
    """
    epoch, i = epoch_position(n, batch_size, step, drop_last)
    order = epoch_order(n, seed, epoch, shuffle)
    return order[i * batch_size:(i + 1) * batch_size], epoch
