"""Error functions: the summed error E over a batch and delta^(L) = dE/dnet^(L) at the output.

Shapes: out, y, delta are (B, n_out); y holds targets (one-hot rows for class labels).
Every function returns the SUM over the batch (the seed's E_total); dividing by the global batch for
reduction = "mean" happens once, after the Allreduce (see ``finish_gradient``).
"""

from __future__ import annotations

import numpy as np

from dpbp.layers import ACTIVATIONS

_TINY = 1e-300  # keeps log(0) finite; float32 outputs are upcast by the reduction below


def squared_error(out, y, delta, output, scratch=None):
    """E = sum 1/2 (y - out)^2;  delta^(L) = (out - y) * f'(net^(L))   (the seed's output rule).

    scratch: a buffer shaped like out for the activation's derivative (allocated if not given).
    """
    np.subtract(out, y, out=delta)
    E = 0.5 * float(np.vdot(delta, delta))
    # grad_out E (.) sigma'(net), or J^T grad_out E for softmax
    ACTIVATIONS[output].prime_times(delta, out, np.empty_like(out) if scratch is None else scratch)
    return E


def cross_entropy(out, y, delta, output, scratch=None):
    """softmax: E = -sum y log out;  sigmoid: E = -sum [y log out + (1 - y) log(1 - out)].

    With these outputs the activation's derivative cancels against dE/dout: delta^(L) = out - y.
    """
    if output == "softmax":
        E = -float(np.vdot(y, np.log(np.maximum(out, _TINY, dtype=np.float64))))
    elif output == "sigmoid":
        o = out.astype(np.float64)
        E = -float(np.vdot(y, np.log(np.maximum(o, _TINY))) + np.vdot(1.0 - y, np.log(np.maximum(1.0 - o, _TINY))))
    else:
        raise ValueError(f"cross_entropy needs a softmax or sigmoid output, not {output!r}")
    np.subtract(out, y, out=delta)
    return E


LOSSES = {"squared_error": squared_error, "cross_entropy": cross_entropy}


def batch_divisor(reduction, n):
    """What the summed error over n samples is divided by: n for reduction = "mean", 1 for "sum".

    n is always the GLOBAL count (the batch, or the whole evaluated set), never a rank's share.
    """
    return n if reduction == "mean" else 1


def l2_penalty(weights, l2):
    """lambda/2 * sum over layers of ||W||^2 (biases are not penalised)."""
    if l2 == 0.0:
        return 0.0
    return 0.5 * l2 * sum(float(np.vdot(W, W)) for W in weights)


def finish_gradient(nabla_w, nabla_b, weights, l2, divisor, scratch=None):
    """Turn the Allreduce-summed data gradient into dE/dw of the regularised error, in place.

    grad = (sum over the global batch of dE_n/dw) / divisor + lambda W
    divisor is ``batch_divisor(reduction, global batch)``, and the l2 term is added here, once per step,
    not once per rank. (The trainer passes divisor 1:
    it folds 1/B into delta^(L) instead, see ``MLP.backward``.)
    scratch: optional flat buffer with room for the largest W, so that lambda W needs no temporary.
    """
    if divisor != 1:
        scale = 1.0 / divisor
        for g in (*nabla_w, *nabla_b):
            g *= scale
    if l2 != 0.0:
        for g, W in zip(nabla_w, weights):
            if scratch is None:
                g += l2 * W
            else:
                l2_W = scratch[:W.size].reshape(W.shape)
                np.multiply(W, l2, out=l2_W)
                g += l2_W
