"""Backprop against central finite differences of E, for every activation x output x loss x reduction x l2."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpbp.losses import finish_gradient, l2_penalty
from dpbp.model import MLP, initial_params

HIDDEN = ["sigmoid", "tanh", "relu", "identity"]
OUTPUT = ["sigmoid", "identity", "softmax"]
LOSS = ["squared_error", "cross_entropy"]
CASES = [c for c in itertools.product(HIDDEN, OUTPUT, LOSS, ["sum", "mean"], [0.0, 0.3])
         if not (c[2] == "cross_entropy" and c[1] == "identity")]


def objective(model, x, t, reduction, l2):
    """E of the batch computed from a forward pass only (independent of backward)."""
    out = model.forward(x).copy()
    if model.loss_kind == "squared_error":
        E = 0.5 * np.sum((t - out) ** 2)
    elif model.output == "softmax":
        E = -np.sum(t * np.log(out))
    else:
        E = -np.sum(t * np.log(out) + (1 - t) * np.log(1 - out))
    if reduction == "mean":
        E /= len(x)
    return E + 0.5 * l2 * sum(np.sum(W ** 2) for W in model.weights)


@pytest.mark.parametrize("activation,output,loss,reduction,l2", CASES)
def test_backprop_matches_finite_differences(activation, output, loss, reduction, l2):
    rng = np.random.default_rng(7)
    sizes = [3, 5, 4, 3]
    model = MLP(sizes, activation, output, loss)
    model.load(initial_params(sizes, activation, seed=3))
    model.params += rng.normal(0, 0.1, model.n_params)  # non-zero biases, no relu kinks at 0
    x = rng.normal(size=(6, 3))
    if loss == "cross_entropy" and output == "softmax":
        t = np.eye(3)[rng.integers(0, 3, 6)]
    else:
        t = rng.uniform(0.1, 0.9, size=(6, 3))
    model.forward(x)
    model.backward(t)
    finish_gradient(model.nabla_w, model.nabla_b, model.weights, l2, len(x) if reduction == "mean" else 1)
    analytic = model.grad.copy()
    numeric = np.empty_like(analytic)
    h = 1e-6
    for i in range(model.n_params):
        saved = model.params[i]
        model.params[i] = saved + h
        e_plus = objective(model, x, t, reduction, l2)
        model.params[i] = saved - h
        e_minus = objective(model, x, t, reduction, l2)
        model.params[i] = saved
        numeric[i] = (e_plus - e_minus) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_l2_penalty_skips_biases():
    model = MLP([2, 2], "tanh", "identity", "squared_error")
    model.params[:] = 1.0
    assert l2_penalty(model.weights, 2.0) == pytest.approx(0.5 * 2.0 * 4)  # 4 weights, 2 biases left out



SATURATE = """
import numpy as np
from dpbp.layers import sigmoid
for dtype, big in (("float32", 200.0), ("float64", 1000.0)):
    net = np.array([[-big, 0.0, big]], dtype)
    print(sigmoid(net.copy(), np.empty_like(net)).tolist())
np.exp(np.float64(1000.0))  # elsewhere the overflow warning still applies: an error under -W error
"""


def test_sigmoid_saturates_quietly_at_the_overflow_limit():
    """e^-net overflows for very negative net: the output is the limit 0, without the warning that every
    rank would print, while overflow outside dpbp.layers still warns."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", SATURATE],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["[[0.0,", "0.5,", "1.0]]"] * 2, proc.stderr
    assert proc.returncode != 0 and "overflow encountered in exp" in proc.stderr
    assert proc.stderr.count("overflow") == 1 and "<string>" in proc.stderr  # only the __main__ one
