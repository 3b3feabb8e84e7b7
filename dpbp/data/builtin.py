"""The built-in data sets: pure functions of their arguments, returning (x, y) arrays in memory."""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib

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
    """The 8x8 handwritten digits scikit-learn ships (1797 samples), pixels scaled to [0, 1].

    Read from the file inside the installed scikit-learn (sklearn/datasets/data/digits.csv.gz: no
    header, 64 pixel counts 0..16 then the label per line) without importing scikit-learn, whose
    import costs the default job more than its training does.
    """
    path = digits_file()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise UserError(f"the digits data {path!r} inside scikit-learn cannot be read ({e})") from None
    if table.shape != (1797, 65):
        raise UserError(f"the digits data {path!r} inside scikit-learn has shape {table.shape}, expected "
                        f"1797 rows of 64 pixels and a label")
    return table[:, :64] / 16.0, table[:, 64].astype(np.int64)


def digits_file():
    """Where the installed scikit-learn keeps digits.csv.gz; find_spec locates it without importing it."""
    need = 'data.name = \'digits\' needs scikit-learn (it ships the data): pip install "dpbp[digits]"'
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(need)
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if not os.path.isfile(path):
        raise UserError(f"{need} (the installed scikit-learn has no {path})")
    return path


def random_classes(n_in, n_out, n=8192, seed=0):
    """Uniform inputs with uniform random labels: a stand-in for timing runs, nothing to learn."""
    rng = np.random.default_rng([seed, 0xBE7C])
    return rng.random((n, n_in)), rng.integers(0, n_out, n)


# The share of each built-in set held out when data.val_fraction is not given (-1). A data file's is 0:
# it trains on all its rows unless a held-out set is asked for.
VAL_FRACTION = {"seed": 0.2, "xor": 0.2, "spirals": 0.2, "digits": 0.2, "random": 0.2}


def builtin(name, n_in, n_out, seed):
    if name == "spirals":
        return spirals(classes=n_out, seed=seed)
    if name == "random":
        return random_classes(n_in, n_out, seed=seed)
    return {"seed": seed_example, "xor": xor, "digits": digits}[name]()
