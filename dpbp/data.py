"""Data sets and the exact distributed sampler. Imports only numpy (scikit-learn lazily, for digits).

A ``Dataset`` holds inputs x (n, features) and targets as the network sees them, t (n, outputs):
one-hot rows when the file gives integer class labels (kept too, in ``labels``, for accuracy).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from dpbp.errors import UserError


@dataclass
class Dataset:
    x: np.ndarray  # (n, features)
    t: np.ndarray  # (n, outputs) targets for the loss
    labels: np.ndarray | None  # (n,) integer classes, or None for regression targets
    source: str

    def __len__(self):
        return len(self.x)

    def subset(self, index):
        return Dataset(self.x[index], self.t[index], None if self.labels is None else self.labels[index],
                       self.source)


# ---------------------------------------------------------------- built-in data


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


# ---------------------------------------------------------------- files


def load_npz(path):
    """x (n, features) and y: integer labels (n,) or float targets (n, outputs). Never unpickles."""
    if not os.path.exists(path):
        raise UserError(f"data file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise UserError(f"data file {path!r} has no array named {missing[0]!r} "
                                f"(it has: {', '.join(f.files) or 'none'}); expected x and y")
            return f["x"], f["y"]
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"data file {path!r} cannot be read without unpickling objects: {e}") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError ...
        raise UserError(f"data file {path!r} is not a readable .npz file: {e}") from None


def to_dataset(x, y, n_in, n_out, source):
    """Check shapes and values, and turn labels into one-hot targets."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise UserError(f"{source}: inputs must be a 2-D array (samples, features), got shape {x.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: the data set is empty")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{source}: inputs must be real numbers, got dtype {x.dtype}")
    if x.shape[1] != n_in:
        raise UserError(f"{source}: inputs have {x.shape[1]} features but model.sizes starts with {n_in}")
    if len(y) != len(x):
        raise UserError(f"{source}: {len(x)} inputs but {len(y)} targets")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UserError(f"{source}: inputs hold NaN or inf, first in row {int(np.argmax(bad))}")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        if y.min() < 0 or y.max() >= n_out:
            row = int(np.argmax((y < 0) | (y >= n_out)))
            raise UserError(f"{source}: label {int(y[row])} in row {row} is outside [0, {n_out}) "
                            f"(model.sizes ends with {n_out})")
        t = np.zeros((len(y), n_out))
        t[np.arange(len(y)), y] = 1.0
        return Dataset(x, t, y.astype(np.int64), source)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or not np.issubdtype(y.dtype, np.number):
        raise UserError(f"{source}: targets must be integer labels (n,) or numbers (n, outputs), "
                        f"got shape {y.shape} dtype {y.dtype}")
    if y.shape[1] != n_out:
        raise UserError(f"{source}: targets have width {y.shape[1]} but model.sizes ends with {n_out}")
    bad = ~np.isfinite(y).all(axis=1)
    if bad.any():
        raise UserError(f"{source}: targets hold NaN or inf, first in row {int(np.argmax(bad))}")
    return Dataset(x, y.astype(np.float64), None, source)


def load_data(cfg):
    """(train, validation or None) for the config; the split is a pure function of the seed."""
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    if cfg["data.path"]:
        x, y = load_npz(cfg["data.path"])
        source = f"data file {cfg['data.path']!r}"
    else:
        name = cfg["data.name"]
        x, y = builtin(name, n_in, n_out, cfg["seed"])
        source = f"built-in data {name!r}"
    data = to_dataset(x, y, n_in, n_out, source)
    return split(data, cfg["data.val_fraction"], cfg["seed"])


def split(data, fraction, seed):
    n_val = int(round(len(data) * fraction))
    if n_val == 0 or n_val >= len(data):
        return data, None
    order = np.random.default_rng([seed, 0x5A1]).permutation(len(data))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


# ---------------------------------------------------------------- the sampler


def batches_per_epoch(n, batch_size, drop_last):
    return n // batch_size if drop_last else -(-n // batch_size)


@functools.lru_cache(maxsize=2)  # every step of an epoch reuses it; read-only
def epoch_order(n, seed, epoch, shuffle):
    """One permutation per (seed, epoch), identical on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0xE90C]).permutation(n)


def batch_indices(n, batch_size, seed, step, shuffle, drop_last):
    """Global sample indices of global step `step` (counting from 0), with its epoch.

    Steps walk through epochs in order; every sample is used exactly once per epoch, the last partial
    batch included unless drop_last. A pure function, so resuming at any step needs no saved state.
    """
    per_epoch = batches_per_epoch(n, batch_size, drop_last)
    if per_epoch == 0:
        raise UserError(f"data.batch_size = {batch_size} is larger than the {n} training samples "
                        f"and data.drop_last = true leaves no batch")
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch, shuffle)
    return order[i * batch_size:(i + 1) * batch_size], epoch
