"""model.py: backprop against central finite differences of E (every activation x output x loss x reduction x
l2), the scale folded into delta^(L), the layer-ready hook, and backward writing into the views it is given."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpbp.losses import finish_gradient
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


def test_backward_scale_gives_the_gradient_of_the_scaled_error_and_the_unscaled_error():
    sizes = [3, 5, 4]
    x = np.random.default_rng(3).normal(size=(6, 3))
    t = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    plain, scaled = (MLP(sizes, "tanh", "softmax", "cross_entropy") for _ in range(2))
    for m in (plain, scaled):
        m.load(initial_params(sizes, "tanh", 0))
        m.forward(x)
    E = plain.backward(t)
    assert scaled.backward(t, scale=1 / 6) == pytest.approx(E, rel=1e-15)
    np.testing.assert_allclose(scaled.grad, plain.grad / 6, rtol=1e-13, atol=1e-16)


def test_backward_reports_each_layer_once_last_first_with_its_gradient_final():
    sizes = [3, 5, 4, 2]
    m = MLP(sizes, "tanh", "softmax", "cross_entropy")
    m.load(initial_params(sizes, "tanh", 0))
    x, t = np.ones((2, 3)), np.eye(2)
    m.forward(x)
    m.backward(t)
    final = m.grad.copy()
    m.grad[:] = np.nan
    seen = []

    def ready(l):
        seen.append(l)
        np.testing.assert_array_equal(m.nabla_w[l], final_views[2 * l])
        np.testing.assert_array_equal(m.nabla_b[l], final_views[2 * l + 1])
    final_views = list(m.tensors(final).values())
    m.forward(x)
    m.backward(t, ready=ready)
    assert seen == [2, 1, 0]


def test_backward_writes_into_the_grads_it_is_given_and_nowhere_else():
    """A caller's buffer (e.g. a slice of the reducer's) receives exactly the default buffer's gradient."""
    sizes = [3, 4, 2]
    m = MLP(sizes, "tanh", "softmax", "cross_entropy")
    m.load(initial_params(sizes, "tanh", 0))
    x, t = np.random.default_rng(7).normal(size=(5, 3)), np.eye(2)[[0, 1, 1, 0, 1]]
    m.forward(x)
    E_default = m.backward(t)
    expected = m.grad.copy()
    m.grad[:] = 0.0
    outer = np.full(m.n_params + 3, -1.0)  # room for three statistics after the gradient, as the reducer has
    grads = m.grad_views(outer[:m.n_params])
    m.forward(x)
    assert m.backward(t, grads) == E_default
    np.testing.assert_array_equal(outer[:m.n_params], expected)
    assert (outer[m.n_params:] == -1.0).all() and (m.grad == 0.0).all()
