"""Data sets as the trainer sees them, their checks, the held-out split and ``load_data``.

A ``Dataset`` holds inputs x (n, features) and targets t (n, outputs) as the network sees them, plus
the integer class labels (n,) when there are any (for accuracy; t is then their one-hot rows, built
per batch). x, t and labels are ndarrays or lazy row sources (rows.py): ``x[rows]`` reads only those
rows, so a rank never holds more than its share of a batch or of an evaluation chunk.

Checks come in two phases, both before training:
  headers  file formats, array names, shapes, feature count, target width, sample counts: every rank
           reads the same headers; ranks agree on the outcome (comm.agree), so a file that only some
           ranks can open fails everywhere instead of hanging the others in a collective
  values   NaN/inf in inputs or targets, labels outside [0, classes), targets outside [0, 1] for a
           sigmoid output with cross-entropy: each rank scans its contiguous share of the rows in
           chunks, and one allgather finds the first offending row in the file (and which classes
           the labels use, for the warning when the network has more outputs than that)

Class names: a CSV target column of names (cat, dog, ...) becomes integer labels, class k being the
k-th of the sorted distinct names of the training file (or of data.classes when given); a held-out
name outside them is an error. ``Dataset.classes`` carries the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from dpbp.data import standardize as stats
from dpbp.data.builtin import VAL_FRACTION, builtin
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
    classes: list | None = None  # class names, label k = classes[k] (CSV names or data.classes), or None
    standardize: stats.Standardize | None = None  # applied to x already, when data.standardize
    warnings: list = field(default_factory=list)  # for rank 0 to print once, e.g. outputs no label uses

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
        return replace(self, x=take(self.x, index), t=t, labels=labels, warnings=[])

    def standardized(self, standardize):
        """This data set with inputs (x[rows] - mean) / std, computed per read (standardize.py)."""
        return replace(self, x=standardize.apply(self.x), standardize=standardize)


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


def first_problems(data, lo, hi, unit=False):
    """What rows [lo, hi) hold, for ``check_values``: {"rows": row numbers of the first NaN/inf input,
    label outside [0, classes), NaN/inf target and (unit) target outside [0, 1], each None if none;
    "low", "high": the smallest and largest label; "used": (classes,) bool, the labels in range}."""
    found, low, high = [None] * 4, None, None
    x_float = np.issubdtype(_stored_dtype(data.x), np.floating)  # integers are always finite
    t = None if data.labels is not None else data.t
    t_float = t is not None and np.issubdtype(t.dtype, np.floating)
    used = None if data.labels is None else np.zeros(data.t.classes, bool)
    row_bytes = data.x.shape[1] * data.x.dtype.itemsize
    for a, b in chunks(len(data), row_bytes, lo, hi):
        if x_float and found[0] is None:
            found[0] = _first(~np.isfinite(data.x[a:b]).all(axis=1), a)
        if used is not None:
            labels = data.labels[a:b]
            bad = (labels < 0) | (labels >= data.t.classes)
            found[1] = _first(bad, a) if found[1] is None else found[1]
            used[labels[~bad]] = True
            least, most = int(labels.min()), int(labels.max())
            low, high = (least, most) if low is None else (min(low, least), max(high, most))
        if t is not None and (t_float or unit) and (found[2] is None or found[3] is None):
            values = t[a:b]
            if t_float and found[2] is None:
                found[2] = _first(~np.isfinite(values).all(axis=1), a)
            if unit and found[3] is None:
                found[3] = _first(((values < 0) | (values > 1)).any(axis=1), a)
    return {"rows": found, "low": low, "high": high, "used": used}


def _first(bad, offset):
    return offset + int(np.argmax(bad)) if bad.any() else None


def check_values(sets, comm, unit=False):
    """Collective: the same UserError on every rank for the first bad value in any of the data sets;
    else the warnings about the first set (the training set) for rank 0 to print once.

    Each rank scans its contiguous share of each set (reading only those rows); the first offending
    row of a kind is the minimum over ranks, so the message does not depend on the number of ranks.
    unit: targets must lie in [0, 1] (a sigmoid output with cross-entropy).
    """
    if comm is None:  # one process: the whole of each set
        everyone = [[first_problems(d, 0, len(d), unit) for d in sets]]
    else:
        everyone = comm.allgather([first_problems(d, *share(len(d), comm.rank, comm.size), unit) for d in sets])
    warnings = []
    for i, d in enumerate(sets):
        found = [f[i] for f in everyone]
        first = [min((f["rows"][k] for f in found if f["rows"][k] is not None), default=None) for k in range(4)]
        if first[0] is not None:
            raise UserError(f"{d.source}: inputs hold NaN or inf, first in row {first[0]} (rows count from 0)")
        if first[1] is not None:
            raise UserError(_label_message(d, first[1], found))
        if first[2] is not None:
            raise UserError(f"{d.targets_source}: targets hold NaN or inf, first in row {first[2]} "
                            f"(rows count from 0)")
        if first[3] is not None:
            row = np.asarray(d.t[first[3]:first[3] + 1])[0]
            value = row[np.argmax((row < 0) | (row > 1))].item()
            raise UserError(f"{d.targets_source}: target {value!r} in row {first[3]} is outside [0, 1], which "
                            f"a sigmoid output with loss.kind = 'cross_entropy' needs (rows count from 0)")
        if i == 0 and d.labels is not None:
            warnings += _unused_outputs(d, np.logical_or.reduce([f["used"] for f in found]))
    return warnings


def _label_message(d, row, found):
    label, k = int(d.labels[row:row + 1][0]), d.t.classes
    low = min(f["low"] for f in found if f["low"] is not None)
    high = max(f["high"] for f in found if f["high"] is not None)
    hint = (f"; the labels run 1..{k}: shift them to 0..{k - 1} (subtract 1)" if (low, high) == (1, k) else "")
    return (f"{d.targets_source}: label {label} in row {row} is outside [0, {k}) (model.sizes ends with "
            f"{k}){hint}")


def _unused_outputs(d, used):
    """[warning] when the network has outputs that no training label asks for, else []."""
    if used.all():
        return []
    k, names = len(used), d.classes or [str(c) for c in range(len(used))]
    unused = [names[c] if c < len(names) else str(c) for c in np.flatnonzero(~used)]
    shown = ", ".join(unused[:10]) + (", ..." if len(unused) > 10 else "")
    return [f"{d.targets_source}: model.sizes ends with {k} outputs but the labels use only {int(used.sum())} "
            f"classes (no label {shown}): is the last entry of model.sizes right?"]


# ---------------------------------------------------------------- putting it together


def open_file(path, targets_path, cfg, need_targets=True, role="data", classes=None):
    """A Dataset for one data file (+ its targets file), headers checked, values not yet.

    classes: the class names a file of names must use (the training set's, for a held-out file);
    None: data.classes if given, else the file's own sorted distinct names."""
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    columns = [c.strip() for c in cfg["data.target_column"].split(",") if c.strip()]
    x, y, source, targets_source = read_file(path, targets_path, columns, need_targets, role,
                                             cfg["data.ignore_columns"])
    classes = classes or cfg["data.classes"] or None
    if need_targets and y is not None and y.dtype.kind == "U":  # predict ignores a column of names
        y, classes = encode_names(y, classes, targets_source)
    if classes is not None and len(classes) > max(n_out, 2):
        raise UserError(f"{targets_source}: {len(classes)} classes ({_listed(classes)}) but model.sizes ends "
                        f"with {n_out} outputs")
    data = make_dataset(x, y if need_targets else None, n_in, n_out, source, targets_source)
    return replace(data, classes=classes)


def encode_names(names, classes, where):
    """(labels (n,) int64, classes): class k is classes[k]; classes None: the sorted distinct names."""
    if classes is None:
        classes = sorted(set(names.tolist()))
    order = np.argsort(classes)
    sorted_classes = np.asarray(classes)[order]
    at = np.clip(np.searchsorted(sorted_classes, names), 0, len(classes) - 1)
    unknown = np.flatnonzero(sorted_classes[at] != names)
    if len(unknown):
        raise UserError(f"{where}: class {str(names[unknown[0]])!r} in row {unknown[0]} is not one of the "
                        f"training set's classes ({_listed(classes)}; rows count from 0)")
    return order[at].astype(np.int64), list(classes)


def _listed(names, most=10):
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def array_sets(cfg, arrays):
    """[train, held-out or None] from arrays in memory: (x, y, (x_val, y_val) or None), headers checked."""
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    x, y, val = arrays
    train = make_dataset(np.asarray(x), np.asarray(y), n_in, n_out, "the arrays x, y")
    train = replace(train, classes=cfg["data.classes"] or None)
    if val is None:
        return [train, None]
    if not (isinstance(val, (tuple, list)) and len(val) == 2):
        raise UserError("val must be a pair (x_val, y_val)")
    held = make_dataset(np.asarray(val[0]), np.asarray(val[1]), n_in, n_out, "the held-out arrays val")
    return [train, replace(held, classes=train.classes)]


def open_sets(cfg, need_targets=True, arrays=None):
    """[train, held-out or None] with headers checked; the held-out set only from data.val_path (or
    arrays, when the data are in memory: see array_sets)."""
    if arrays is not None:
        return array_sets(cfg, arrays)
    n_in, n_out = cfg["model.sizes"][0], cfg["model.sizes"][-1]
    for key, needs in (("data.targets", "data.path"), ("data.val_targets", "data.val_path")):
        if cfg[key] and not cfg[needs]:
            raise UserError(f"{key} = {cfg[key]!r} is set but {needs} is empty")
    if cfg["data.path"]:
        train = open_file(cfg["data.path"], cfg["data.targets"], cfg, need_targets)
    else:
        name = cfg["data.name"]
        if cfg["data.ignore_columns"]:
            raise UserError(f"data.ignore_columns names CSV columns, but there is no data.path (built-in data "
                            f"{name!r})")
        x, y = builtin(name, n_in, n_out, cfg["seed"])
        # In the model's dtype from the start: the model would round every batch to it anyway (the same
        # values), and a float32 model then gathers its batch with one copy and no cast.
        train = make_dataset(np.asarray(x, cfg["model.dtype"]), np.asarray(y) if need_targets else None, n_in, n_out,
                             f"built-in data {name!r}")
        train = replace(train, classes=cfg["data.classes"] or None)
    val = None
    if cfg["data.val_path"] and need_targets:
        val = open_file(cfg["data.val_path"], cfg["data.val_targets"], cfg, role="held-out data",
                        classes=train.classes)
    return [train, val]


def val_fraction(cfg):
    """data.val_fraction, or when it is not given (-1) the data set's own: 0 for a data file."""
    if cfg["data.val_fraction"] >= 0:
        return cfg["data.val_fraction"]
    return 0.0 if cfg["data.path"] else VAL_FRACTION[cfg["data.name"]]


def load_data(cfg, comm=None, need_targets=True, standardize=None, arrays=None):
    """(train, held-out or None) for the config, every value checked; collective when comm is given.

    The held-out set is data.val_path if set, else a ``val_fraction`` share of the training file (see
    ``split``). need_targets=False: inputs only (for predict), no split. data.standardize: the inputs
    of both are standardized with `standardize` (a run's saved statistics) or, when it is None, with
    the statistics of the training rows, computed by the ranks together.
    ``train.warnings``: for rank 0 to print once. arrays: (x, y, (x_val, y_val) or None) in memory
    instead of the config's data (every rank passes the same).
    """
    sets = open_sets(cfg, need_targets, arrays) if comm is None else comm.agreed(open_sets, cfg, need_targets,
                                                                                 arrays)
    unit = cfg["model.output"] == "sigmoid" and cfg["loss.kind"] == "cross_entropy"
    warnings = check_values([d for d in sets if d is not None], comm, unit and need_targets)
    train, val = sets
    if comm is not None:
        everyone = comm.allgather(train.classes)
        if any(c != train.classes for c in everyone):
            raise UserError(f"{train.targets_source}: the ranks found different class names (did the file "
                            f"change while it was read?)")
    if val is None and need_targets:
        fraction = val_fraction(cfg) if arrays is None else max(cfg["data.val_fraction"], 0.0)  # arrays: as a file
        train, val = split(train, fraction, cfg["seed"], cfg["data.shuffle"])
    if cfg["data.standardize"]:
        if standardize is None:
            standardize = stats.compute(train.x, comm)
        train = train.standardized(standardize)
        val = None if val is None else val.standardized(standardize)
    return replace(train, warnings=warnings), val


def split(data, fraction, seed, shuffle=True):
    """(train, held-out or None): round(n * fraction) rows held out, picked by seed (the same on every
    rank), or with shuffle false the last rows (file order, as Keras' validation_split)."""
    n_val = int(round(len(data) * fraction))
    if n_val == 0 or n_val >= len(data):
        return data, None
    if not shuffle:
        cut = len(data) - n_val
        return data.subset(np.arange(cut)), data.subset(np.arange(cut, len(data)))
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
