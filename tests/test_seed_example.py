"""The seed tutorial's 2-2-2 example, with expectations written from its formulas by hand.

Network: net_h = W1 x + b1, out_h = sigma(net_h), net_o = W2 out_h + b2, out_o = sigma(net_o),
E_total = sum 1/2 (y - out_o)^2. Output weight w5 (out_h1 -> o1):
dE/dw5 = (out_o1 - y1) out_o1 (1 - out_o1) out_h1. Hidden weight w1 (x1 -> h1):
dE/dw1 = [w5 (out_o1 - y1) out_o1 (1 - out_o1) + w7 (out_o2 - y2) out_o2 (1 - out_o2)] out_h1 (1 - out_h1) x1.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from dpbp.model import MLP, initial_params
from tests.conftest import REPO, load_params


def s(z):
    return 1.0 / (1.0 + math.exp(-z))


x1, x2, y1, y2 = 0.05, 0.10, 0.01, 0.99
w1, w2, w3, w4, b1 = 0.15, 0.20, 0.25, 0.30, 0.35
w5, w6, w7, w8, b2 = 0.40, 0.45, 0.50, 0.55, 0.60
eta = 0.5

out_h1 = s(w1 * x1 + w2 * x2 + b1)
out_h2 = s(w3 * x1 + w4 * x2 + b1)
out_o1 = s(w5 * out_h1 + w6 * out_h2 + b2)
out_o2 = s(w7 * out_h1 + w8 * out_h2 + b2)
E_total = 0.5 * (y1 - out_o1) ** 2 + 0.5 * (y2 - out_o2) ** 2
d_o1 = (out_o1 - y1) * out_o1 * (1 - out_o1)
d_o2 = (out_o2 - y2) * out_o2 * (1 - out_o2)
dE_dw5 = d_o1 * out_h1
dE_db2_o1 = d_o1
dE_dw1 = (w5 * d_o1 + w7 * d_o2) * out_h1 * (1 - out_h1) * x1
dE_dw4 = (w6 * d_o1 + w8 * d_o2) * out_h2 * (1 - out_h2) * x2


def seed_model():
    model = MLP([2, 2, 2], "sigmoid", "sigmoid", "squared_error")
    model.load(initial_params([2, 2, 2], "sigmoid", 0, init="seed_example"))
    return model


def test_forward_values_follow_the_seed():
    out = seed_model().forward(np.array([[x1, x2]]))
    np.testing.assert_allclose(out[0], [out_o1, out_o2], rtol=1e-15)
    # The tutorial's printed figure, as a sanity anchor for the formulas above.
    assert E_total == pytest.approx(0.298371109, abs=1e-9)


def test_gradients_follow_the_chain_rule():
    model = seed_model()
    model.forward(np.array([[x1, x2]]))
    E = model.backward(np.array([[y1, y2]]))
    assert E == pytest.approx(E_total, rel=1e-14)
    assert model.nabla_w[1][0, 0] == pytest.approx(dE_dw5, rel=1e-13)
    assert model.nabla_b[1][0] == pytest.approx(dE_db2_o1, rel=1e-13)
    assert model.nabla_w[0][0, 0] == pytest.approx(dE_dw1, rel=1e-13)
    assert model.nabla_w[0][1, 1] == pytest.approx(dE_dw4, rel=1e-13)


def test_first_update_of_the_trainer(run_cli, tmp_path):
    """One step of `dpbp.train` on configs/seed.toml: w_new = w_old - eta dE/dw."""
    out = tmp_path / "run"
    run_cli("train", "--config", os.path.join(REPO, "configs/seed.toml"), "--set", "train.steps=1",
            "--out", out, "--quiet", check=True)
    p = load_params(out / "final.npz")
    assert p["layers.1.weight"][0, 0] == pytest.approx(w5 - eta * dE_dw5, rel=1e-14)
    assert p["layers.0.weight"][0, 0] == pytest.approx(w1 - eta * dE_dw1, rel=1e-14)
    assert p["layers.0.weight"][1, 1] == pytest.approx(w4 - eta * dE_dw4, rel=1e-14)
    # The tutorial's printed w5+ = 0.35891648.
    assert p["layers.1.weight"][0, 0] == pytest.approx(0.35891648, abs=1e-8)
