"""Activations and the dense layer, each forward beside its backward. Imports only numpy.

Shapes: B = samples in the batch (rows), n_in / n_out = units on either side of a layer.
The seed's w_ij joins unit j of the layer below to unit i of this one, so W has shape (n_out, n_in)
(the same as torch.nn.Linear.weight) and a batch is net = X W^T + b.
"""

from __future__ import annotations

import functools
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
    np.multiply(out, out, out=scratch)
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
