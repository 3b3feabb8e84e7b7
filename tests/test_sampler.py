"""The exact distributed sampler, as a property over many (n, batch size, P, seed).

What each rank computes in a step is exactly what the trainer feeds forward: rows idx[a:b] for the
pieces (a, b) its reducer cuts from the global batch (reduce.py), here asked of the reducer for every
rank r of a world of P ranks. Over one epoch the union must be range(n): nothing duplicated, nothing
dropped (but the last partial batch with drop_last), and no sample repeated to pad a share.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbp.data import batch_indices, batches_per_epoch
from dpbp.reduce import Layout, make_reducer


class Rank:
    """Just enough of a communicator for a reducer to cut the batch as rank `rank` of `size`."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def rank_rows(n, B, P, seed, step, shuffle, drop_last, mode, chunk):
    """[rows of rank r for r in range(P)] in global step `step`, as Trainer.gradient takes them."""
    idx, epoch = batch_indices(n, B, seed, step, shuffle, drop_last)
    out = []
    for r in range(P):
        reducer = make_reducer(mode, Rank(r, P), Layout([(1,)]), "float64", chunk)
        out.append([int(i) for a, b in reducer.pieces(len(idx)) for i in idx[a:b]])
    return out, epoch


cases = dict(n=st.integers(1, 300), B=st.integers(1, 70), P=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
             epoch=st.integers(0, 3), shuffle=st.booleans(), drop_last=st.booleans(),
             mode=st.sampled_from(["fast", "reproducible"]), chunk=st.integers(1, 16))


@settings(max_examples=300, deadline=None)
@given(**cases)
def test_every_sample_exactly_once_per_epoch(n, B, P, seed, epoch, shuffle, drop_last, mode, chunk):
    per_epoch = batches_per_epoch(n, B, drop_last)
    if per_epoch == 0:  # drop_last with B > n: no batch at all (train refuses this config)
        return
    used = Counter()
    for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
        shares, step_epoch = rank_rows(n, B, P, seed, step, shuffle, drop_last, mode, chunk)
        assert step_epoch == epoch
        sizes = [len(s) for s in shares]
        in_batch = n - (step - epoch * per_epoch) * B
        assert sum(sizes) == min(B, in_batch)  # full batches, then the partial one (never padded)
        # Shares differ by at most one sample (fast) or one whole chunk (reproducible).
        units = sizes if mode == "fast" else [-(-s // chunk) for s in sizes]
        assert max(units) - min(units) <= 1
        used.update(i for s in shares for i in s)
    assert all(c == 1 for c in used.values())  # none duplicated
    if drop_last:
        assert len(used) == n - n % B and set(used) <= set(range(n))
    else:
        assert sorted(used) == list(range(n))  # none dropped


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 200), B=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_shares_are_contiguous_slices_of_the_batch(n, B, seed):
    """Rank r's rows are one run of the global batch, in rank order (what 'contiguous shares' means)."""
    for P in (1, 2, 3, 4, 7):
        idx, _ = batch_indices(n, B, seed, 0, True, False)
        shares, _ = rank_rows(n, B, P, seed, 0, True, False, "fast", 1)
        assert [i for s in shares for i in s] == [int(i) for i in idx]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(5, 300), seed=st.integers(0, 2**32 - 1))
def test_epochs_are_permutations_from_seed_and_epoch(n, seed):
    """Shuffled epochs: each a permutation of range(n), a pure function of (seed, epoch)."""
    first = np.concatenate([batch_indices(n, 7, seed, s, True, False)[0] for s in range(batches_per_epoch(n, 7, False))])
    assert sorted(first) == list(range(n))
    again = np.concatenate([batch_indices(n, 7, seed, s, True, False)[0] for s in range(batches_per_epoch(n, 7, False))])
    np.testing.assert_array_equal(first, again)
    unshuffled = np.concatenate([batch_indices(n, 7, seed, s, False, False)[0]
                                 for s in range(batches_per_epoch(n, 7, False))])
    np.testing.assert_array_equal(unshuffled, np.arange(n))


def test_drop_last_drops_exactly_the_tail_of_the_permutation():
    n, B = 23, 5
    kept = [int(i) for s in range(batches_per_epoch(n, B, True)) for i in batch_indices(n, B, 9, s, True, True)[0]]
    everything = [int(i) for s in range(batches_per_epoch(n, B, False)) for i in batch_indices(n, B, 9, s, True, False)[0]]
    assert len(kept) == 20 and kept == everything[:20]  # the same permutation, its last 3 left out
