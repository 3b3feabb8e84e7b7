"""layers.py: each activation's derivative against finite differences or its explicit Jacobian, the dense
layer against the seed's sums written out, and sigmoid's quiet saturation."""

from __future__ import annotations

import numpy as np
import pytest

from dpbp.layers import ACTIVATIONS, dense_backward, dense_forward


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "identity"])
def test_activation_derivative_times_delta_matches_finite_differences(name):
    f, f_prime_times = ACTIVATIONS[name]
    rng = np.random.default_rng(1)
    net = rng.normal(size=(5, 7))
    net[np.abs(net) < 1e-3] = 0.5  # keep relu's kink away from the finite difference
    delta = rng.normal(size=(5, 7))
    out = f(net, np.empty_like(net))
    h = 1e-6
    numeric = (f(net + h, np.empty_like(net)) - f(net - h, np.empty_like(net))) / (2 * h)
    got = f_prime_times(delta.copy(), out, np.empty_like(net))
    np.testing.assert_allclose(got, delta * numeric, rtol=1e-6, atol=1e-9)


def test_softmax_jacobian_times_delta_matches_the_explicit_jacobian():
    f, jacobian_times = ACTIVATIONS["softmax"]
    rng = np.random.default_rng(2)
    net, delta = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    out = f(net, np.empty_like(net))
    expected = np.stack([(np.diag(o) - np.outer(o, o)).T @ d for o, d in zip(out, delta)])
    np.testing.assert_allclose(jacobian_times(delta.copy(), out, np.empty_like(net)), expected, rtol=1e-12,
                               atol=1e-15)


def test_dense_layer_is_the_seeds_sums_written_out():
    """net_i = sum_j w_ij x_j + b_i; dE/dw_ij = sum_n out_j^(l-1) delta_i; dE/db_i = sum_n delta_i;
    dE/dx_j = sum_i w_ij delta_i, with loops over samples and units (no matrix products)."""
    rng = np.random.default_rng(8)
    B, n_in, n_out = 4, 3, 2
    x, W, b, delta = rng.normal(size=(B, n_in)), rng.normal(size=(n_out, n_in)), rng.normal(size=n_out), \
        rng.normal(size=(B, n_out))
    net = dense_forward(x, W, b, np.empty((B, n_out)))
    nabla_W, nabla_b, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    dense_backward(delta, x, W, nabla_W, nabla_b, dx)
    for n in range(B):
        for i in range(n_out):
            assert net[n, i] == pytest.approx(sum(W[i, j] * x[n, j] for j in range(n_in)) + b[i], rel=1e-14)
    for i in range(n_out):
        assert nabla_b[i] == pytest.approx(sum(delta[n, i] for n in range(B)), rel=1e-14)
        for j in range(n_in):
            assert nabla_W[i, j] == pytest.approx(sum(x[n, j] * delta[n, i] for n in range(B)), rel=1e-14)
    for n in range(B):
        for j in range(n_in):
            assert dx[n, j] == pytest.approx(sum(W[i, j] * delta[n, i] for i in range(n_out)), rel=1e-14)


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
