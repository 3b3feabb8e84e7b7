"""The built-in data sets: pure functions of their arguments, returning (x, y) arrays in memory."""

from __future__ import annotations

import numpy as np

from dpbp.errors import UserError


def seed_example():
    """The tutorial's one sample for the 2-2-2 network: x = (0.05, 0.10), y = (0.01, 0.99)."""
    return np.array([[0.05, 0.10]]), np.array([[0.01, 0.99]])


def xor():
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    return x, np.array([0, 1, 1, 0])


def spirals(n_per_class=200, classes=2, seed=0):
    """Interleaved 2-D spirals, one arm per class, with a little noise (a pure function of seed)."""
    rng = np.random.default_rng([seed, 0x5B1])
    r = np.linspace(0.05, 1.0, n_per_class)
    xs, ys = [], []
    for c in range(classes):
        theta = np.linspace(0, 3.5 * np.pi, n_per_class) + 2 * np.pi * c / classes
        theta = theta + rng.normal(0, 0.15, n_per_class)
        xs.append(np.column_stack([r * np.sin(theta), r * np.cos(theta)]))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs), np.concatenate(ys)


def digits():
    """The 8x8 handwritten digits scikit-learn ships (1797 samples), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("data.name = 'digits' needs scikit-learn (it ships the data): "
                        "pip install 'dpbp[digits]'") from None
    d = load_digits()
    return d.data / 16.0, d.target


def random_classes(n_in, n_out, n=8192, seed=0):
    """Uniform inputs with uniform random labels: a stand-in for timing runs, nothing to learn."""
    rng = np.random.default_rng([seed, 0xBE7C])
    return rng.random((n, n_in)), rng.integers(0, n_out, n)


def builtin(name, n_in, n_out, seed):
    if name == "spirals":
        return spirals(classes=n_out, seed=seed)
    if name == "random":
        return random_classes(n_in, n_out, seed=seed)
    return {"seed": seed_example, "xor": xor, "digits": digits}[name]()
