"""Arrays that are read row by row on demand, so a rank holds only the rows it asks for.

Every source here answers ``a[rows]`` (rows: a slice or an integer array of row numbers) with an
ordinary ndarray of shape (len(rows), *a.shape[1:]), and has ``len``, ``shape`` and ``dtype``.
A plain ndarray fits the same interface, so in-memory data (built-ins, CSV, .gz) needs no wrapper.

FileRows reads with ``os.preadv`` instead of memory-mapping the file: pages of a memory map that a
rank has touched count in its RSS until the mapping goes away, and a shuffled epoch touches rows all
over the file, so a long run would end up "holding" the whole file. With explicit reads a rank holds
the rows of its current batch and nothing else; the shared page cache keeps repeated reads cheap.
"""

from __future__ import annotations

import os

import numpy as np

_GAP_BYTES = 64 * 1024  # read across a gap this small rather than issue another system call


def as_rows(rows, n):
    """A slice with step 1 stays a (start, stop) pair; anything else becomes an int64 index array."""
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step == 1:
            return max(start, 0), max(stop, start)
        return np.arange(start, stop, step)
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise IndexError(f"rows must be a slice or a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row numbers must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    return rows


class Rows:
    """What every lazy source shares: len, ndim, and enough of ndarray's interface for numpy calls."""

    shape: tuple
    dtype: np.dtype

    def __len__(self):
        return self.shape[0]

    @property
    def ndim(self):
        return len(self.shape)

    def take(self, indices, axis=None, out=None, mode="raise"):
        """np.take(a, rows, axis=0, out=...) on a lazy source: reads just those rows."""
        if axis != 0:
            raise ValueError("lazy data supports take along axis 0 (rows) only")
        rows = np.asarray(indices)
        if mode == "clip":
            rows = np.clip(rows, 0, len(self) - 1)
        got = self[rows]
        if out is None:
            return got
        np.copyto(out, got)
        return out

    def __array__(self, dtype=None, copy=None):
        """Every row in memory at once: only for small data (prefer a[rows] or chunks)."""
        a = self[0:len(self)]
        return a if dtype is None else a.astype(dtype, copy=False)


class FileRows(Rows):
    """Rows of a C-ordered array of `dtype` stored at byte `offset` of the file at `path`.

    shape = (n,) or (n, width): trailing axes of the stored array are flattened into width.
    """

    def __init__(self, path, offset, dtype, n, width=None):
        self.path, self.offset = path, int(offset)
        self.file_dtype = np.dtype(dtype)
        self.dtype = self.file_dtype.newbyteorder("=")  # what __getitem__ returns
        self.shape = (int(n),) if width is None else (int(n), int(width))
        self.row_bytes = self.file_dtype.itemsize * (1 if width is None else int(width))
        self._fd = None

    def __getitem__(self, rows):
        rows = as_rows(rows, len(self))
        if isinstance(rows, tuple):
            return self.read_range(*rows)
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        if not len(rows):
            return out
        # Sorted runs of nearby rows are read with one call each, then scattered back into order.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        gap = max(1, _GAP_BYTES // self.row_bytes)
        breaks = np.flatnonzero(np.diff(sorted_rows) > gap) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            lo, hi = int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1
            block = self.read_range(lo, hi)
            out[order[a:b]] = block[sorted_rows[a:b] - lo]
        return out

    def read_range(self, start, stop):
        """Rows [start, stop) with one positioned read (no seek, no shared file position)."""
        stop = min(stop, len(self))
        count = max(stop - start, 0)
        raw = np.empty(count * self.row_bytes, np.uint8)
        self._read_into(raw, self.offset + start * self.row_bytes)
        a = raw.view(self.file_dtype).reshape((count,) + self.shape[1:])
        return a if a.dtype == self.dtype else a.astype(self.dtype)

    def _read_into(self, raw, position):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        view, done = memoryview(raw), 0
        while done < len(raw):  # a single read may return less (e.g. beyond 2 GiB on Linux)
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [view[done:]], position + done)
            else:
                chunk = os.pread(self._fd, len(raw) - done, position + done)
                got = len(chunk)
                view[done:done + got] = chunk
            if got == 0:
                raise OSError(f"{self.path}: the file ended early (it changed after it was checked)")
            done += got

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Take(Rows):
    """base[index[rows]]: a subset of another source (the train or held-out part of a split)."""

    def __init__(self, base, index):
        self.base, self.index = base, np.asarray(index, np.int64)
        self.shape = (len(self.index),) + tuple(base.shape[1:])
        self.dtype = base.dtype

    def __getitem__(self, rows):
        rows = as_rows(rows, len(self))
        return self.base[self.index[slice(*rows) if isinstance(rows, tuple) else rows]]


class Scaled(Rows):
    """(base[rows] - shift) / divisor as float64, computed per read: IDX images stored as bytes 0..255
    become [0, 1] (divisor 255); standardized features use the training rows' per-feature mean as
    shift and standard deviation as divisor (arrays of shape (features,))."""

    def __init__(self, base, divisor, shift=0.0):
        self.base = base
        self.divisor = divisor if isinstance(divisor, np.ndarray) else float(divisor)
        self.shift = shift if isinstance(shift, np.ndarray) else float(shift)
        self.shape, self.dtype = tuple(base.shape), np.dtype(np.float64)

    def __getitem__(self, rows):
        a = self.base[rows]
        if not (isinstance(self.shift, float) and self.shift == 0.0):
            a = np.subtract(a, self.shift, dtype=np.float64)
        return np.divide(a, self.divisor, dtype=np.float64)


class OneHot(Rows):
    """Targets t (n, classes) for integer labels, built per batch: t[rows] = one-hot(labels[rows])."""

    def __init__(self, labels, classes):
        self.labels, self.classes = labels, int(classes)
        self.shape, self.dtype = (len(labels), self.classes), np.dtype(np.float64)

    def __getitem__(self, rows):
        return self.encode(self.labels[rows])

    def encode(self, labels):
        t = np.zeros((len(labels), self.classes))
        t[np.arange(len(labels)), labels] = 1.0
        return t


class Column(Rows):
    """(n,) targets seen as (n, 1): one output unit."""

    def __init__(self, base):
        self.base, self.shape, self.dtype = base, (len(base), 1), base.dtype

    def __getitem__(self, rows):
        return self.base[rows][:, None]


def take(a, index):
    """a restricted to rows `index`: copied if a is in memory, a lazy view if it is read from a file."""
    return a[index] if isinstance(a, np.ndarray) else Take(a, index)


def chunks(n, row_bytes, lo=0, hi=None, budget=8 << 20):
    """[start, stop) ranges that cover rows lo..hi in pieces of about `budget` bytes."""
    hi = n if hi is None else hi
    step = max(1, budget // max(row_bytes, 1))
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]
