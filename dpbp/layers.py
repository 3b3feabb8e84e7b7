"""Activations, the dense layer and dropout, each forward beside its backward. Imports only numpy.

Shapes: B = samples in the batch (rows), n_in / n_out = units on either side of a layer.
The seed's w_ij joins unit j of the layer below to unit i of this one, so W has shape (n_out, n_in)
(the same as torch.nn.Linear.weight) and a batch is net = X W^T + b.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import numpy as np

# ---------------------------------------------------------------- activations
# Each activation has f(net) and its derivative written through out = f(net), as the seed does:
# sigma'(net) = out (1 - out). Writing f' through `out` means backward needs no copy of `net`.
# All of them work in place on `out=` buffers, and the derivatives get a `scratch` buffer shaped like
# `out`, so a training step allocates nothing proportional to the model.


# For net below about -88 (float32) / -709 (float64) e^-net overflows to inf and 1 / (1 + inf) = 0 is the
# right limit, so NumPy's overflow warning from this module's exp says nothing wrong (real divergence is
# caught by the trainer's non-finite check, which names the tensor). A filter costs nothing per step,
# unlike np.errstate around every call.
warnings.filterwarnings("ignore", message="overflow encountered in exp", category=RuntimeWarning,
                        module=r"dpbp\.layers$")


def sigmoid(net, out):
    """out = 1 / (1 + e^-net); 0 where e^-net overflows (see above)."""
    np.negative(net, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def sigmoid_prime_times(delta, out, scratch):
    """delta <- delta * sigma'(net) with sigma'(net) = out (1 - out)."""
    np.subtract(1.0, out, out=scratch)
    scratch *= out
    delta *= scratch
    return delta


def tanh(net, out):
    return np.tanh(net, out=out)


def tanh_prime_times(delta, out, scratch):
    """tanh'(net) = 1 - out^2."""
    np.square(out, out=scratch)  # out out, bitwise; NumPy's one-input loop is faster
    np.subtract(1.0, scratch, out=scratch)
    delta *= scratch
    return delta


def relu(net, out):
    """out = max(net, 0), against a row of zeros: NumPy's maximum is faster with an array operand than
    with the scalar 0 (its scalar path does not vectorise as well), and the result is the same."""
    return np.maximum(net, _zero_row(net.shape[-1], net.dtype), out=out)


@functools.lru_cache(maxsize=None)
def _zero_row(n, dtype):
    row = np.zeros((1, n), dtype)
    row.flags.writeable = False
    return row


def relu_prime_times(delta, out, scratch):
    """relu'(net) = 1 where out > 0, else 0.

    Multiplying by the 0/1 mask is much faster than masked assignment (delta[out <= 0] = 0), whose
    data-dependent branches defeat vectorisation and which allocates a mask.
    """
    np.greater(out, 0.0, out=scratch)
    delta *= scratch
    return delta


def identity(net, out):
    if out is not net:
        np.copyto(out, net)
    return out


def identity_prime_times(delta, out, scratch):
    return delta


def softmax(net, out):
    """out_i = e^(net_i - max net) / sum_k e^(net_k - max net), row by row (B, n)."""
    np.subtract(net, net.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def softmax_jacobian_times(delta, out, scratch):
    """delta <- J^T delta for softmax: J_ik = o_i (1[i=k] - o_k), so (J^T d)_k = o_k (d_k - sum_i d_i o_i)."""
    np.multiply(delta, out, out=scratch)
    delta -= scratch.sum(axis=1, keepdims=True)  # (B, 1): one number per sample
    delta *= out
    return delta


class Activation(NamedTuple):
    f: Callable  # f(net, out) -> out = f(net)
    prime_times: Callable  # prime_times(delta, out, scratch) -> delta (.) f'(net), f' written through out


ACTIVATIONS = {
    "sigmoid": Activation(sigmoid, sigmoid_prime_times),
    "tanh": Activation(tanh, tanh_prime_times),
    "relu": Activation(relu, relu_prime_times),
    "identity": Activation(identity, identity_prime_times),
    "softmax": Activation(softmax, softmax_jacobian_times),
}


# ---------------------------------------------------------------- dense layer


def dense_forward(x, W, b, net):
    """net = x W^T + b.

    x: (B, n_in) input (the layer below's out); W: (n_out, n_in); b: (n_out,);
    net: (B, n_out) buffer that receives the result. x W^T is one GEMM with W read transposed (no copy).
    """
    np.matmul(x, W.T, out=net)
    net += b
    return net


def dense_backward(delta, x, W, nabla_W, nabla_b, dx=None):
    """Given delta = dE/dnet (B, n_out) and the forward's input x (B, n_in), write the summed gradients
    and return dE/dx.

    nabla_W (n_out, n_in) <- delta^T x  : dE/dw_ij = sum over samples of out_j^(l-1) delta_i^(l)
    nabla_b (n_out,)      <- sum_rows delta
    dx (B, n_in)          <- delta W    : (W^T delta) per sample, the first half of the delta recursion
    dx is skipped when None (the input layer needs no dE/dx).
    """
    np.matmul(delta.T, x, out=nabla_W)
    np.add.reduce(delta, axis=0, out=nabla_b)
    if dx is not None:
        np.matmul(delta, W, out=dx)
    return dx


# ---------------------------------------------------------------- dropout
# Inverted dropout whose keep-mask is a pure function of (seed, step, position of the sample in the GLOBAL
# batch, layer, unit), never of the rank or of how the batch is split: every rank draws, for the rows it
# holds, exactly the bits a single process would draw for them. The bits come from a counter-based hash
# (SplitMix64's finalizer, the "mix" below), not from a stateful generator:
#
#   key    = mix(mix(mix(seed + G) + (step + 1) G) + (layer + 1) G)          one integer per (seed, step, layer)
#   row_n  = mix(key + (position_n + 1) G)                                   one per sample
#   z_nk   = mix(row_n + (k + 1) G)                                          64 bits per pair of units 2k, 2k+1
#   u_nj   = (the low 32 bits of z_n,j//2 for even j, the high 32 for odd j) / 2^32, uniform in [0, 1)
#   keep_nj = u_nj >= p
#
# all in uint64 arithmetic mod 2^64, G = 0x9E3779B97F4A7C15 (SplitMix64's increment). Each 64-bit hash
# serves two units, which halves the work; the low/high split reads the uint64 array as uint32 pairs,
# which is the order above on little-endian hosts (x86-64, ARM64).

_G = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _mix_int(z):
    """SplitMix64's finalizer on a Python int (mod 2^64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix_array(z, tmp):
    """The same finalizer in place on a uint64 array z, with tmp a buffer of z's shape."""
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= np.uint64(_M1)
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= np.uint64(_M2)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


DROPOUT_ROWS = 64  # rows hashed together: their two uint64 buffers (2 x 256 KB at 1024 units) stay in L2 through the 8 passes of mix


def dropout_workspace(n, rows=DROPOUT_ROWS):
    """The uint64 buffer (2, rows, ceil(n / 2)) the hash works in, `rows` samples at a time, for a layer of
    n units: allocate it once per layer width and pass it as `work`, so that a step allocates nothing the
    size of a layer. Any rows >= 1 gives the same bits."""
    return np.empty((2, rows, (n + 1) // 2), np.uint64)


@functools.lru_cache(maxsize=None)
def _pair_offsets(rows, pairs):
    """(k + 1) G for k < pairs, repeated on `rows` rows (rows, pairs), read-only (shared by every call): adding
    a column of row hashes to a whole array is a faster NumPy loop than broadcasting two vectors."""
    offsets = np.arange(1, pairs + 1, dtype=np.uint64) * np.uint64(_G)
    tile = np.repeat(offsets[None, :], rows, axis=0)
    tile.flags.writeable = False
    return tile


def _dropout_chunks(seed, step, positions, layer, n, work):
    """Yield (a, bits, spare) for consecutive row chunks: bits (c, n) uint32 = 2^32 u for positions[a:a + c];
    spare: the workspace's other (c, n)-or-larger byte buffer, free until the next chunk."""
    if work is None:
        work = dropout_workspace(n)
    if work.dtype != np.uint64 or work.ndim != 3 or work.shape[0] != 2 or work.shape[2] != (n + 1) // 2:
        raise ValueError(f"work must be dropout_workspace({n}, rows), not {work.dtype} {work.shape}")
    key = _mix_int(_mix_int(_mix_int(seed + _G) + (step + 1) * _G) + (layer + 1) * _G)
    chunk = work.shape[1]
    offsets = _pair_offsets(chunk, (n + 1) // 2)
    rows = np.asarray(positions, np.int64).astype(np.uint64)  # (B,): small next to the layer
    rows += np.uint64(1)  # uint64 array arithmetic wraps mod 2^64 (silently, as the hash needs)
    rows *= np.uint64(_G)
    rows += np.uint64(key)
    rows = _mix_array(rows, np.empty_like(rows))
    for a in range(0, len(rows), chunk):
        c = min(chunk, len(rows) - a)
        z, tmp = work[0, :c], work[1, :c]
        np.add(offsets[:c], rows[a:a + c, None], out=z)
        _mix_array(z, tmp)
        yield a, z.view(np.uint32)[:, :n], tmp.view(np.uint8)[:, :n].view(bool)


def dropout_bits(seed, step, positions, layer, n):
    """(B, n) uint32 2^32 u_nj of the hash above for the samples at global-batch `positions` (B,): to inspect
    the stream (dropout_forward thresholds it chunk by chunk without materialising it)."""
    bits = np.empty((len(positions), n), np.uint32)
    for a, chunk, _ in _dropout_chunks(seed, step, positions, layer, n, None):
        bits[a:a + len(chunk)] = chunk
    return bits


def dropout_forward(out, p, seed, step, positions, layer, mask=None, work=None, x=None):
    """Inverted dropout: out <- x (.) s, s_nj = m_nj / (1 - p), m_nj = 1 if u_nj >= p else 0 (see above).

    out: (B, n) activations of `layer` for the samples at global-batch `positions` (B,), or, when x (B, n) is
    given, the buffer that receives x's dropped-out copy; p in [0, 1).
    mask: (B, n) buffer in out's dtype that receives s, each unit's factor: 0 or 1 / (1 - p) (allocated if
    None); work: dropout_workspace(n). Returns (out, mask). p = 0 copies x (mask all ones), hashing nothing.
    x (.) s is bitwise (x (.) m) / (1 - p), since m is 0 or 1, in one pass. Dividing by 1 - p keeps each
    unit's expected output, so evaluation runs without dropout.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), not {p}")
    x = out if x is None else x
    if mask is None:
        mask = np.empty_like(out)
    if p == 0.0:
        mask[...] = 1.0
        np.copyto(out, x)
        return out, mask
    # u >= p  <=>  bits >= p 2^32 (exact: a power-of-two scaling)  <=>  bits >= ceil(p 2^32)
    threshold = np.uint32(min(math.ceil(p * 2.0**32), 2**32 - 1))
    scale = 1.0 / (1.0 - p)
    for a, bits, keep in _dropout_chunks(seed, step, positions, layer, out.shape[1], work):
        rows = slice(a, a + len(bits))  # chunk by chunk, while the chunk is in cache
        np.greater_equal(bits, threshold, out=keep)
        s = mask[rows]
        np.multiply(keep, scale, out=s, dtype=s.dtype)  # s = m / (1 - p): m (0 or 1) times scale in out's dtype
        np.multiply(x[rows], s, out=out[rows])
    return out, mask


def dropout_backward(delta, mask):
    """delta <- delta (.) s: dE/d(out before dropout), given dE/d(out after) and forward's mask s = m / (1 - p)."""
    delta *= mask
    return delta
