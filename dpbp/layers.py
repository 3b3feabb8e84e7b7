"""Activations and the dense layer, each forward beside its backward. Imports only numpy.

Shapes: B = samples in the batch (rows), n_in / n_out = units on either side of a layer.
The seed's w_ij joins unit j of the layer below to unit i of this one, so W has shape (n_out, n_in)
(the same as torch.nn.Linear.weight) and a batch is net = X W^T + b.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- activations
# Each activation has f(net) and its derivative written through out = f(net), as the seed does:
# sigma'(net) = out (1 - out). Writing f' through `out` means backward needs no copy of `net`.
# All of them work in place on `out=` buffers so a training step allocates nothing.


def sigmoid(net, out):
    """out = 1 / (1 + e^-net), computed without overflow for large |net|."""
    np.negative(net, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def sigmoid_prime_times(delta, out):
    """delta <- delta * sigma'(net) with sigma'(net) = out (1 - out)."""
    delta *= out
    delta *= 1.0 - out
    return delta


def tanh(net, out):
    return np.tanh(net, out=out)


def tanh_prime_times(delta, out):
    """tanh'(net) = 1 - out^2."""
    delta *= 1.0 - out * out
    return delta


def relu(net, out):
    return np.maximum(net, 0.0, out=out)


def relu_prime_times(delta, out):
    """relu'(net) = 1 where out > 0, else 0."""
    delta[out <= 0.0] = 0.0
    return delta


def identity(net, out):
    if out is not net:
        np.copyto(out, net)
    return out


def identity_prime_times(delta, out):
    return delta


def softmax(net, out):
    """out_i = e^(net_i - max net) / sum_k e^(net_k - max net), row by row (B, n)."""
    np.subtract(net, net.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def softmax_jacobian_times(delta, out):
    """delta <- J^T delta for softmax: J_ik = o_i (1[i=k] - o_k), so (J^T d)_k = o_k (d_k - sum_i d_i o_i)."""
    dot = np.einsum("bi,bi->b", delta, out)[:, None]
    delta -= dot
    delta *= out
    return delta


ACTIVATIONS = {
    "sigmoid": (sigmoid, sigmoid_prime_times),
    "tanh": (tanh, tanh_prime_times),
    "relu": (relu, relu_prime_times),
    "identity": (identity, identity_prime_times),
    "softmax": (softmax, softmax_jacobian_times),
}


# ---------------------------------------------------------------- dense layer


def dense_forward(x, W, b, net):
    """net = x W^T + b.

    x: (B, n_in) input (the layer below's out); W: (n_out, n_in); b: (n_out,);
    net: (B, n_out) buffer that receives the result. Returns (net, cache) with cache = (x, W).
    """
    np.matmul(x, W.T, out=net)
    net += b
    return net, (x, W)


def dense_backward(delta, cache, nabla_W, nabla_b, dx=None):
    """Given delta = dE/dnet (B, n_out), write the summed gradients and return dE/dx.

    nabla_W (n_out, n_in) <- delta^T x  : dE/dw_ij = sum over samples of out_j^(l-1) delta_i^(l)
    nabla_b (n_out,)      <- sum_rows delta
    dx (B, n_in)          <- delta W    : (W^T delta) per sample, the first half of the delta recursion
    dx is skipped when None (the input layer needs no dE/dx).
    """
    x, W = cache
    np.matmul(delta.T, x, out=nabla_W)
    np.sum(delta, axis=0, out=nabla_b)
    if dx is not None:
        np.matmul(delta, W, out=dx)
    return dx
