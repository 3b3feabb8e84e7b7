"""Dropout's keep-mask: the documented hash (recomputed here with Python integers, one sample at a time),
independent of how the global batch is split over ranks, dropping a fraction close to p, scaled by
1 / (1 - p); backward against finite differences of forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbp.layers import dropout_backward, dropout_bits, dropout_forward, dropout_workspace

G = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def splitmix(z):
    """SplitMix64's finalizer, written out."""
    z &= M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_u(seed, step, position, layer, unit):
    """u in [0, 1) for one unit of one sample, from the recipe in dpbp/layers.py's dropout comment."""
    key = splitmix(splitmix(splitmix(seed + G) + (step + 1) * G) + (layer + 1) * G)
    row = splitmix(key + (position + 1) * G)
    z = splitmix(row + (unit // 2 + 1) * G)
    return ((z >> (32 * (unit % 2))) & 0xFFFFFFFF) / 2.0 ** 32


def mask_of(B, n, p, seed=1, step=0, layer=0, positions=None, dtype=np.float64):
    out = np.ones((B, n), dtype)
    _, mask = dropout_forward(out, p, seed, step, np.arange(B) if positions is None else positions, layer)
    return mask


def test_mask_is_the_documented_hash_of_the_coordinates():
    rng = np.random.default_rng(0)
    B, n, p = 40, 37, 0.3  # odd n: the last pair's high half is unused
    seed, step, layer = 12345, 678, 2
    positions = rng.permutation(1000)[:B]
    mask = mask_of(B, n, p, seed, step, layer, positions)
    for i, j in zip(rng.integers(0, B, 300), rng.integers(0, n, 300)):
        kept = reference_u(seed, step, int(positions[i]), layer, int(j)) >= p
        assert mask[i, j] == (1.0 / (1.0 - p) if kept else 0.0)
    bits = dropout_bits(seed, step, positions, layer, n)
    for i, j in [(0, 0), (0, 1), (B - 1, n - 1), (7, 20)]:
        assert bits[i, j] / 2.0 ** 32 == reference_u(seed, step, int(positions[i]), layer, j)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), ranks=st.integers(1, 5), contiguous=st.booleans())
def test_mask_does_not_depend_on_how_the_global_batch_is_split(data, ranks, contiguous):
    B, n, p = 64, 50, 0.4
    whole = mask_of(B, n, p, seed=9, step=3, layer=1)
    if contiguous:  # shares as ranks get them: cut points anywhere
        cuts = sorted(data.draw(st.lists(st.integers(0, B), min_size=ranks - 1, max_size=ranks - 1)))
        pieces = [np.arange(a, b) for a, b in zip([0, *cuts], [*cuts, B])]
    else:  # any assignment of samples to ranks, each rank in its own order
        owner = np.array(data.draw(st.lists(st.integers(0, ranks - 1), min_size=B, max_size=B)))
        order = np.array(data.draw(st.permutations(range(B))))
        pieces = [order[owner[order] == r] for r in range(ranks)]
    got = np.full((B, n), np.nan)
    for pos in pieces:
        if len(pos):
            got[pos] = mask_of(len(pos), n, p, seed=9, step=3, layer=1, positions=pos)
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("rows", [1, 3, 32, 100])
def test_any_workspace_and_a_given_mask_buffer_give_the_same_mask(rows):
    B, n = 10, 33
    out = np.ones((B, n))
    mask = np.empty((B, n))
    dropout_forward(out, 0.5, 3, 4, np.arange(B), 0, mask=mask, work=dropout_workspace(n, rows))
    expected = dropout_bits(3, 4, np.arange(B), 0, n) / 2.0 ** 32 >= 0.5
    np.testing.assert_array_equal(mask, expected * 2.0)  # m / (1 - p)
    np.testing.assert_array_equal(out, mask)  # out was all ones
    with pytest.raises(ValueError, match="work must be dropout_workspace"):
        dropout_forward(out, 0.5, 3, 4, np.arange(B), 0, work=dropout_workspace(n + 2, rows))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropped_fraction_is_p_within_the_binomial_spread(p):
    B, n = 256, 1024
    N = B * n
    dropped = int((mask_of(B, n, p, seed=5, step=11, layer=1) == 0).sum())
    sigma = math.sqrt(N * p * (1 - p))
    assert abs(dropped - N * p) < 6 * sigma  # fails with probability < 2e-9 for a true Binomial(N, p)


@pytest.mark.parametrize("what", ["even/odd units", "next layer", "next step", "next seed", "next sample"])
def test_masks_of_different_coordinates_agree_only_by_chance(what):
    """Independent masks with keep-probability q agree on a fraction q^2 + (1 - q)^2 of units."""
    B, n, p = 256, 1024, 0.3
    a = mask_of(B, n, p, seed=5, step=2, layer=1)
    other = {"even/odd units": lambda: None,
             "next layer": lambda: mask_of(B, n, p, seed=5, step=2, layer=2),
             "next step": lambda: mask_of(B, n, p, seed=5, step=3, layer=1),
             "next seed": lambda: mask_of(B, n, p, seed=6, step=2, layer=1),
             "next sample": lambda: mask_of(B, n, p, seed=5, step=2, layer=1, positions=np.arange(1, B + 1))}[what]()
    x, y = (a[:, 0::2], a[:, 1::2]) if other is None else (a, other)
    N = x.size
    agree = int((x == y).sum())
    q = 1 - p
    expected = q * q + p * p
    assert abs(agree - N * expected) < 6 * math.sqrt(N * expected * (1 - expected))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kept_units_are_scaled_by_one_over_one_minus_p_and_dropped_ones_are_zero(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 40)).astype(dtype)
    out = x.copy()
    _, mask = dropout_forward(out, 0.25, 2, 0, np.arange(30), 0)
    assert mask.dtype == dtype and out.dtype == dtype
    assert set(np.unique(mask)) == {0.0, dtype(1 / 0.75)}
    kept = mask != 0.0
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert (out[~kept] == 0).all()
    # the single multiply by m / (1 - p) is bitwise the two steps x m, then / (1 - p) as a factor
    np.testing.assert_array_equal(out, (x * (mask != 0).astype(dtype)) * dtype(1 / 0.75))


def test_p_zero_is_the_identity():
    x = np.random.default_rng(2).normal(size=(8, 9))
    out = x.copy()
    _, mask = dropout_forward(out, 0.0, 1, 1, np.arange(8), 0)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(mask, np.ones_like(x))
    delta = x.copy()
    np.testing.assert_array_equal(dropout_backward(delta, mask), x)


def test_backward_equals_finite_differences_of_forward_with_the_mask_fixed():
    """E(x) = sum c (.) dropout(x): dE/dx by central differences (same seed, step, positions: same mask)."""
    rng = np.random.default_rng(3)
    B, n, p = 6, 7, 0.4
    x, c = rng.normal(size=(2, B, n))
    pos = np.arange(10, 10 + B)

    def E(x):
        out, _ = dropout_forward(x.copy(), p, 4, 5, pos, 1)
        return float(np.sum(c * out))
    _, mask = dropout_forward(x.copy(), p, 4, 5, pos, 1)
    assert 0 < np.count_nonzero(mask) < mask.size
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in range(B):
        for j in range(n):
            e = np.zeros_like(x)
            e[i, j] = h
            numeric[i, j] = (E(x + e) - E(x - e)) / (2 * h)
    np.testing.assert_allclose(dropout_backward(c.copy(), mask), numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_p_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
        dropout_forward(np.ones((2, 2)), p, 0, 0, np.arange(2), 0)
