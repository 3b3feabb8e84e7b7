"""losses.py: E and delta^(L) against the seed's formulas written out, the divisor, and the l2 term."""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.layers import ACTIVATIONS
from dpbp.losses import batch_divisor, cross_entropy, finish_gradient, l2_penalty, squared_error
from dpbp.model import MLP


def test_squared_error_is_the_seeds_output_rule():
    """E = sum 1/2 (y - out)^2 and delta^(L) = (out - y) out (1 - out) for sigmoid outputs."""
    rng = np.random.default_rng(9)
    out = ACTIVATIONS["sigmoid"].f(rng.normal(size=(3, 2)), np.empty((3, 2)))
    y = rng.uniform(size=(3, 2))
    delta = np.empty_like(out)
    E = squared_error(out, y, delta, "sigmoid")
    assert E == pytest.approx(sum(0.5 * (y[n, k] - out[n, k]) ** 2 for n in range(3) for k in range(2)), rel=1e-14)
    np.testing.assert_allclose(delta, (out - y) * out * (1 - out), rtol=1e-14)


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_cross_entropy_delta_is_out_minus_y(output):
    """With a softmax (or sigmoid) output the activation's derivative cancels: delta^(L) = out - y."""
    rng = np.random.default_rng(10)
    out = ACTIVATIONS[output].f(rng.normal(size=(4, 3)), np.empty((4, 3)))
    y = np.eye(3)[[0, 2, 1, 2]]
    delta = np.empty_like(out)
    E = cross_entropy(out, y, delta, output)
    if output == "softmax":
        expected = -sum(np.log(out[n, np.argmax(y[n])]) for n in range(4))
    else:
        expected = -np.sum(y * np.log(out) + (1 - y) * np.log(1 - out))
    assert E == pytest.approx(expected, rel=1e-13)
    np.testing.assert_array_equal(delta, out - y)


def test_the_divisor_is_the_global_count_for_mean_and_one_for_sum():
    assert batch_divisor("mean", 96) == 96 and batch_divisor("sum", 96) == 1


def test_finish_gradient_divides_once_and_adds_lambda_w_to_weights_only():
    rng = np.random.default_rng(11)
    W, b = rng.normal(size=(2, 3)), rng.normal(size=2)
    gW, gb = rng.normal(size=(2, 3)), rng.normal(size=2)
    got_W, got_b = gW.copy(), gb.copy()
    finish_gradient([got_W], [got_b], [W], 0.5, 4)
    np.testing.assert_allclose(got_W, gW / 4 + 0.5 * W, rtol=1e-15)
    np.testing.assert_allclose(got_b, gb / 4, rtol=1e-15)


def test_l2_with_a_scratch_buffer_equals_the_plain_formula():
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(4, 3)), rng.normal(size=(2, 4))]
    grads = [rng.normal(size=w.shape) for w in weights]
    biases = [np.zeros(4), np.zeros(2)]
    got = [g.copy() for g in grads]
    finish_gradient(got, [b.copy() for b in biases], weights, 0.01, 1, np.empty(12))
    for g_got, g, W in zip(got, grads, weights):
        np.testing.assert_array_equal(g_got, g + 0.01 * W)


def test_l2_penalty_skips_biases():
    model = MLP([2, 2], "tanh", "identity", "squared_error")
    model.params[:] = 1.0
    assert l2_penalty(model.weights, 2.0) == pytest.approx(0.5 * 2.0 * 4)  # 4 weights, 2 biases left out
