"""Data sets as the trainer sees them, their checks, the held-out split and ``load_data``.

A ``Dataset`` holds inputs x (n, features) and targets t (n, outputs) as the network sees them, plus
the integer class labels (n,) when there are any (for accuracy; t is then their one-hot rows, built
per batch). x, t and labels are ndarrays or lazy row sources (rows.py): ``x[rows]`` reads only those
rows, so a rank never holds more than its share of a batch or of an evaluation chunk.

Checks come in two phases, both before training:
  headers  file formats, array names, shapes, feature count, target width, sample counts: every rank
           reads the same headers; ranks agree on the outcome (comm.agree), so a file that only some
           ranks can open fails everywhere instead of hanging the others in a collective
  values   NaN/inf in inputs or targets, labels outside [0, classes): each rank scans its contiguous
           share of the rows in chunks, and one allgather finds the first offending row in the file
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpbp.data.builtin import builtin
from dpbp.data.formats import read_file
from dpbp.data.rows import Column, OneHot, Scaled, chunks, take
from dpbp.errors import UserError
from dpbp.partition import share


@dataclass
class Dataset:
    x: object  # (n, features): ndarray or lazy rows
    t: object  # (n, outputs) targets for the loss, or None (inputs only, for predict)
    labels: object  # (n,) integer classes, or None for regression targets
    source: str  # names the inputs in messages, e.g. "data file 'train.npy'"
    targets_source: str = ""  # names the targets (the same file unless a separate targets file)

    def __len__(self):
        return len(self.x)

    def batch(self, rows):
        """(x[rows], t[rows], labels[rows] or None) as ndarrays."""
        return (self.x[rows], *self.targets(rows))

    def targets(self, rows):
        """(t[rows], labels[rows] or None), reading the labels once for both."""
        if self.labels is None:
            return None if self.t is None else self.t[rows], None
        labels = self.labels[rows]
        return self.t.encode(labels) if isinstance(self.t, OneHot) else self.t[rows], labels

    def update_hash(self, h):
        """Feed dtype, shape and contents of x, then t, to hashlib object h, a chunk of rows at a time
        (a file is never held whole); the same bytes as hashing the arrays in memory."""
        for a in (self.x, self.t):
            h.update(f"{a.dtype.str}{tuple(a.shape)}".encode())
            for lo, hi in chunks(len(a), a.dtype.itemsize * int(np.prod(a.shape[1:]))):
                h.update(np.ascontiguousarray(a[lo:hi]))

    def subset(self, index):
        labels = None if self.labels is None else take(self.labels, index)
        t = OneHot(labels, self.t.classes) if isinstance(self.t, OneHot) else (
            None if self.t is None else take(self.t, index))
        return Dataset(take(self.x, index), t, labels, self.source, self.targets_source)


# ---------------------------------------------------------------- headers: shapes and types


def make_dataset(x, y, n_in, n_out, source, targets_source=""):
    """Check shapes and types (values are checked by ``check_values``); y None means inputs only.

    1-D integer targets are class labels when the network has >= 2 outputs (t = one-hot), and the
    target value itself with 1 output (e.g. 0/1 for a sigmoid unit).
    """
    targets_source = targets_source or source
    if x.ndim != 2:
        raise UserError(f"{source}: inputs must be a 2-D array (samples, features), got shape {x.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: the data set is empty (0 samples)")
    if not _is_real(_stored_dtype(x)):
        raise UserError(f"{source}: inputs must be real numbers, got dtype {_stored_dtype(x)}")
    if x.shape[1] != n_in:
        raise UserError(f"{source}: inputs have {x.shape[1]} features but model.sizes starts with {n_in}")
    if y is None:
        return Dataset(x, None, None, source, targets_source)
    if len(y) != len(x):
        raise UserError(f"{targets_source}: {len(y)} targets for the {len(x)} inputs of {source}"
                        if targets_source != source else f"{source}: {len(x)} inputs but {len(y)} targets")
    if not _is_real(y.dtype):
        raise UserError(f"{targets_source}: targets must be numbers, got dtype {y.dtype}")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and n_out >= 2:
        return Dataset(x, OneHot(y, n_out), y, source, targets_source)
    if y.ndim == 1:
        y = y[:, None] if isinstance(y, np.ndarray) else Column(y)
    if y.ndim != 2:
        raise UserError(f"{targets_source}: targets must be integer labels (n,) or numbers (n, outputs), "
                        f"got shape {y.shape}")
    if y.shape[1] != n_out:
        hint = " (class labels must be whole numbers)" if y.shape[1] == 1 else ""
        raise UserError(f"{targets_source}: targets have width {y.shape[1]} but model.sizes ends with "
                        f"{n_out}{hint}")
    return Dataset(x, y, None, source, targets_source)


def _stored_dtype(a):
    return a.base.dtype if isinstance(a, Scaled) else a.dtype


def _is_real(dtype):
    return np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)


# ---------------------------------------------------------------- values, scanned across ranks


def first_problems(data, lo, hi):
    """Row numbers of the first NaN/inf input, bad label and NaN/inf target in rows [lo, hi), or None."""
    found = [None, None, None]
    x_float = np.issubdtype(_stored_dtype(data.x), np.floating)  # integers are always finite
    t = None if data.labels is not None else data.t
    t_float = t is not None and np.issubdtype(t.dtype, np.floating)
    row_bytes = data.x.shape[1] * data.x.dtype.itemsize
    for a, b in chunks(len(data), row_bytes, lo, hi):
        if x_float and found[0] is None:
            bad = ~np.isfinite(data.x[a:b]).all(axis=1)
            found[0] = a + int(np.argmax(bad)) if bad.any() else None
        if data.labels is not None and found[1] is None:
            labels = data.labels[a:b]
            bad = (labels < 0) | (labels >= data.t.classes)
            found[1] = a + int(np.argmax(bad)) if bad.any() else None
        if t_float and found[2] is None:
            bad = ~np.isfinite(t[a:b]).all(axis=1)
            found[2] = a + int(np.argmax(bad)) if bad.any() else None
    return found


def check_values(sets, comm):
    """Collective: the same UserError on every rank for the first bad value in any of the data sets.

    Each rank scans its contiguous share of each set (reading only those rows); the first offending
    row of a kind is the minimum over ranks, so the message does not depend on the number of ranks.
    """
    if comm is None:  # one process: the whole of each set
        everyone = [[first_problems(d, 0, len(d)) for d in sets]]
    else:
        everyone = comm.allgather([first_problems(d, *share(len(d), comm.rank, comm.size)) for d in sets])
    for i, d in enumerate(sets):
        first = [min((f[i][k] for f in everyone if f[i][k] is not None), default=None) for k in range(3)]
        if first[0] is not None:
            raise UserError(f"{d.source}: inputs hold NaN or inf, first in row {first[0]} (rows count from 0)")
        if first[1] is not None:
            label = int(d.labels[first[1]:first[1] + 1][0])
            raise UserError(f"{d.targets_source}: label {label} in row {first[1]} is outside "
                            f"[0, {d.t.classes}) (model.sizes ends with {d.t.classes})")
        if first[2] is not None:
            raise UserError(f"{d.targets_source}: targets hold NaN or inf, first in row {first[2]} "
                            f"(rows count from 0)")


# ---------------------------------------------------------------- putting it together


def open_file(path, targets_path, cfg, need_targets=True, role="data"):
    """A Dataset for one data file (+ its targets file), headers checked, values not yet."""
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    columns = [c.strip() for c in cfg["data.target_column"].split(",") if c.strip()]
    x, y, source, targets_source = read_file(path, targets_path, columns, need_targets, role)
    return make_dataset(x, y if need_targets else None, n_in, n_out, source, targets_source)


def open_sets(cfg, need_targets=True):
    """[train, held-out or None] with headers checked; the held-out set only from data.val_path."""
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    for key, needs in (("data.targets", "data.path"), ("data.val_targets", "data.val_path")):
        if cfg[key] and not cfg[needs]:
            raise UserError(f"{key} = {cfg[key]!r} is set but {needs} is empty")
    if cfg["data.path"]:
        train = open_file(cfg["data.path"], cfg["data.targets"], cfg, need_targets)
    else:
        name = cfg["data.name"]
        x, y = builtin(name, n_in, n_out, cfg["seed"])
        # In the model's dtype from the start: the model would round every batch to it anyway (the same
        # values), and a float32 model then gathers its batch with one copy and no cast.
        train = make_dataset(np.asarray(x, cfg["model.dtype"]), np.asarray(y) if need_targets else None, n_in, n_out,
                             f"built-in data {name!r}")
    val = None
    if cfg["data.val_path"] and need_targets:
        val = open_file(cfg["data.val_path"], cfg["data.val_targets"], cfg, role="held-out data")
    return [train, val]


def load_data(cfg, comm=None, need_targets=True):
    """(train, held-out or None) for the config, every value checked; collective when comm is given.

    The held-out set is data.val_path if set, else a data.val_fraction share of the training file
    picked by seed (the same on every rank). need_targets=False: inputs only (for predict), no split.
    """
    sets = open_sets(cfg, need_targets) if comm is None else comm.agreed(open_sets, cfg, need_targets)
    check_values([d for d in sets if d is not None], comm)
    train, val = sets
    if val is not None or not need_targets:
        return train, val
    return split(train, cfg["data.val_fraction"], cfg["seed"])


def split(data, fraction, seed):
    n_val = int(round(len(data) * fraction))
    if n_val == 0 or n_val >= len(data):
        return data, None
    order = np.random.default_rng([seed, 0x5A1]).permutation(len(data))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


# ---------------------------------------------------------------- the one-call forms (serial)


def load_npz(path):
    """(x, y) of an .npz data file with arrays x and y; x is read lazily if stored uncompressed."""
    x, y, _, _ = read_file(path, "", (), True)
    return x, y


def to_dataset(x, y, n_in, n_out, source):
    """make_dataset + check_values in one process: a Dataset whose shapes and values are sound."""
    data = make_dataset(x if hasattr(x, "ndim") else np.asarray(x), y if hasattr(y, "ndim") else np.asarray(y),
                        n_in, n_out, source)
    check_values([data], None)
    return data
