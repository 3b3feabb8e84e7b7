"""Reading data files: .npz, .npy, IDX (MNIST's own format, raw or .gz) and CSV with a header.

The format is recognised by content (magic bytes), CSV also by its extension. Readers look only at
headers and sizes; the values stay on disk behind a ``FileRows`` (rows.py) wherever the layout allows:
  .npy, .npz member stored uncompressed, raw IDX   read rows on demand (rank-local)
  .npz member compressed, IDX .gz                  decompressed in full into memory (no random access)
  CSV                                              parsed in full into memory (text has no row offsets)
  .npy in Fortran order                            read in full (its rows are not contiguous on disk)
Every problem is a UserError naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np

from dpbp.data.rows import FileRows, Scaled
from dpbp.errors import UserError

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FORMATS = ".npz (x, y), .npy (+ data.targets), IDX such as MNIST's *-idx3-ubyte (raw or .gz), CSV with a header"


# ---------------------------------------------------------------- recognising a file


def sniff(path, where):
    """'npz', 'npy', 'idx', 'idx.gz' or 'csv' for the file at path; `where` names it in errors."""
    if not os.path.exists(path):
        raise UserError(f"{where} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{where} is a directory, not a file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise UserError(f"{where} is empty (0 bytes)")
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path) as g:
                inner = g.read(4)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{where} is a truncated or damaged gzip file ({e})") from None
        if is_idx(inner):
            return "idx.gz"
        raise UserError(f"{where} is gzip-compressed but does not hold IDX data; .gz is read only for IDX "
                        f"files such as MNIST's (gunzip other files first)")
    if is_idx(head):
        return "idx"
    if path.lower().endswith((".csv", ".txt")) or _is_text(head):
        return "csv"
    raise UserError(f"{where} is not in a format dpbp reads (first bytes {head[:8]!r}); "
                    f"expected {FORMATS}")


def is_idx(head):
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in IDX_TYPES and 1 <= head[3] <= 8


def _is_text(head):
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\x00" not in text and "," in text.partition("\n")[0]


# ---------------------------------------------------------------- one array per file: .npy and IDX


def read_array(path, kind, where):
    """The array in a .npy or IDX file: a FileRows (or an ndarray in memory) of shape (n, ...)."""
    if kind == "npy":
        with open(path, "rb") as f:
            return _npy_member(f, path, where, 0, os.path.getsize(path))
    if kind == "idx":
        with open(path, "rb") as f:
            head = f.read(4)
            head += f.read(4 * head[3])
        dtype, dims, offset = _idx_header(head, where)
        _check_size(where, dims, dtype, os.path.getsize(path) - offset)
        return _rows(path, offset, dtype, dims)
    if kind == "idx.gz":
        try:
            with gzip.open(path) as g:
                data = g.read()
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{where} is a truncated or damaged gzip file ({e})") from None
        dtype, dims, offset = _idx_header(data[:4 + 4 * data[3]], where)
        _check_size(where, dims, dtype, len(data) - offset, "decompressed ")
        a = np.frombuffer(data, dtype, math.prod(dims), offset).reshape(dims)
        return a.astype(a.dtype.newbyteorder("="), copy=False)
    raise UserError(f"{where} must be a .npy or IDX file (it is {kind})")


def _idx_header(head, where):
    """(dtype, dims, header bytes): magic 0 0 type ndim, then ndim big-endian uint32 sizes."""
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise UserError(f"{where} is truncated: its IDX header is cut short")
    dims = struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim])
    return np.dtype(IDX_TYPES[head[2]]), tuple(dims), 4 + 4 * ndim


def _check_size(where, dims, dtype, available, what=""):
    need = math.prod(dims) * dtype.itemsize
    shape = " x ".join(map(str, dims))
    if available < need:
        raise UserError(f"{where} is truncated: its header describes {shape} values ({need} bytes of data) "
                        f"but the {what}file holds only {available}")
    if available > need:
        raise UserError(f"{where} has {available - need} bytes more than its header describes "
                        f"({shape} values); is it the right file?")


def _rows(path, offset, dtype, shape):
    width = math.prod(shape[1:]) if len(shape) > 1 else None
    return FileRows(path, offset, dtype, shape[0], width)


def _npy_member(f, path, where, start, available):
    """The .npy array whose header begins at byte `start` of open file f, `available` bytes long."""
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 exists only for structured types with non-Latin-1 field names: never numbers
            raise ValueError(f".npy format {version[0]}.{version[1]} holds structured data, not numbers")
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise UserError(f"{where} is not a readable .npy array ({e})") from None
    offset = f.tell()
    if dtype.hasobject:
        raise UserError(f"{where} holds Python objects; dpbp reads numbers only and never unpickles")
    if len(shape) == 0:
        raise UserError(f"{where} holds a single number, not an array with one row per sample")
    _check_size(where, shape, dtype, available - (offset - start))
    if fortran and len(shape) > 1:  # rare: its rows are strided on disk, so read it whole
        f.seek(start)
        return np.lib.format.read_array(f, allow_pickle=False)
    return _rows(path, offset, dtype, shape)


# ---------------------------------------------------------------- several arrays per file: .npz


def read_npz(path, where, names):
    """{name: array} for the arrays in `names` that the .npz holds; missing names are left out."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{where} is not a readable .npz file: {e}") from None
    with zf:
        members = {m[:-4] if m.endswith(".npy") else m: m for m in zf.namelist()}
        found = {}
        for name in names:
            if name in members:
                found[name] = _npz_array(zf, path, f"{where}, array {name!r},", zf.getinfo(members[name]))
        return found, sorted(members)


def _npz_array(zf, path, where, info):
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        with open(path, "rb") as f:  # the member's bytes start after its local header (name + extra)
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise UserError(f"{where} cannot be located in the zip file (damaged .npz)")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            return _npy_member(f, path, where, info.header_offset + 30 + name_len + extra_len, info.file_size)
    try:  # np.savez_compressed: inflate it, there is no other way to reach the rows
        with zf.open(info) as m:
            return np.lib.format.read_array(m, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{where} cannot be read without unpickling objects: {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{where} is damaged: {e}") from None


# ---------------------------------------------------------------- CSV


def read_csv(path, where, target_columns, need_targets, ignore_columns=()):
    """(x, y): float64 arrays in memory; y is None when the target columns are absent and not needed.

    One target column holding whole numbers only becomes int64 labels (n,), one holding names (no
    numbers) a str array (n,) of class names; several give numbers (n, k). ignore_columns are
    skipped: neither features nor targets, and not parsed (they may hold text, such as an id).
    """
    names = _csv_header(path, where)
    header = ", ".join(names)
    for c in ignore_columns:
        if c not in names:
            raise UserError(f"{where}: data.ignore_columns names {c!r}, which is not one of its columns "
                            f"(its header: {header})")
        if c in target_columns:
            raise UserError(f"{where}: column {c!r} is both a target (data.target_column) and ignored "
                            f"(data.ignore_columns)")
    missing = [c for c in target_columns if c not in names]
    if need_targets and (missing or not target_columns):
        what = f"has no column {missing[0]!r}" if missing else "needs data.target_column to name its target column(s)"
        raise UserError(f"{where} {what} (its header: {header})")
    targets = [names.index(c) for c in target_columns if c in names]
    numeric = [i for i, c in enumerate(names) if c not in ignore_columns]
    if len(numeric) == len(targets):
        raise UserError(f"{where}: no feature columns are left once the target and ignored columns are "
                        f"taken out (its header: {header})")
    table, labels = _read_table(path, where, names, numeric, targets[0] if len(targets) == 1 else None)
    if labels is not None:
        numeric.remove(targets[0])
    x = table[:, [k for k, i in enumerate(numeric) if i not in targets]]
    if not targets:
        return x, None
    if labels is not None:
        return x, labels
    y = table[:, [numeric.index(i) for i in targets]]
    if len(targets) == 1:
        y = y[:, 0]
        if np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
    return x, y


def _csv_header(path, where):
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    names = [s.strip() for s in next(csv.reader([header]), [])]
    if not any(names):
        raise UserError(f"{where} has an empty first line; a CSV file needs a header naming its columns")
    if all(_is_number(s) for s in names):
        raise UserError(f"{where}: the first line must be a header naming the columns, found numbers")
    return names


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_table(path, where, names, numeric, target):
    """(float64 table of the `numeric` columns, None), or (table without column `target`, its names as
    a str array (n,)) when that one target column holds class names instead of numbers."""
    try:
        return _parse_csv(path, where, names, numeric), None
    except ValueError as e:
        problem = e
    labels = None if target is None else _class_names(path, where, names, target)
    if labels is not None:
        try:
            table = _parse_csv(path, where, names, [i for i in numeric if i != target])
            if len(table) != len(labels):
                raise UserError(f"{where}: {len(labels)} class names for {len(table)} rows")
            return table, labels
        except ValueError as e:
            problem = e
    numbers = [names[i] for i in numeric if not (labels is not None and i == target)]
    raise UserError(f"{where}: {_csv_problem(path, names, numbers) or problem}") from None


def _class_names(path, where, names, target):
    """The target column as stripped strings if it holds class names (None if it holds only numbers or
    cannot be read: then the numeric parse's problem is the one to report)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            column = np.loadtxt(f, delimiter=",", skiprows=1, dtype=str, usecols=[target], ndmin=1,
                                comments=None, quotechar='"')
    except ValueError:
        return None
    column = np.char.strip(column).tolist()
    is_number = np.array([_is_number(s) for s in column], bool)
    if is_number.all():
        return None
    if is_number.any():
        first_number, first_name = int(np.argmax(is_number)), int(np.argmax(~is_number))
        raise UserError(f"{where}: target column {names[target]!r} holds both numbers and class names "
                        f"(row {first_number}: {column[first_number]!r}, row {first_name}: "
                        f"{column[first_name]!r}; rows count from 0); class labels are all numbers or all names")
    if "" in column:
        raise UserError(f"{where}: target column {names[target]!r} is empty in row {column.index('')} "
                        f"(rows count from 0)")
    return np.array(column, dtype=str)


def _parse_csv(path, where, names, columns):
    """The float64 table (n, len(columns)) of those columns; ValueError if numpy cannot parse them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input contained no data": reported below
        with open(path, encoding="utf-8-sig") as f:  # a file object: numpy would gunzip a *.gz path
            table = np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2, comments=None,
                               quotechar='"', usecols=None if len(columns) == len(names) else columns)
    if table.size == 0:
        raise UserError(f"{where} is empty: it has a header but no data rows")
    if len(columns) == len(names) and table.shape[1] != len(names):
        raise UserError(f"{where}: its rows have {table.shape[1]} fields but the header has {len(names)}")
    if len(columns) < len(names):  # numpy reads the columns asked for and lets a longer row pass
        ragged = _csv_problem(path, names, ())
        if ragged:
            raise UserError(f"{where}: {ragged}")
    return table


def _csv_problem(path, names, numbers):
    """The first ragged row, or non-number in one of the columns named in `numbers`, as 'line N ...'."""
    numbers = set(numbers)
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(names):
                return (f"line {reader.line_num} has {len(fields)} fields but the header has {len(names)} "
                        f"(a ragged row)")
            for name, s in zip(names, fields):
                if name in numbers and not _is_number(s):
                    return f"line {reader.line_num}, column {name!r}: {s!r} is not a number"
    return None


# ---------------------------------------------------------------- inputs and targets together


def read_file(path, targets_path, target_columns, need_targets, role="data", ignore_columns=()):
    """(x, y, x_where, y_where) for data file `path` (+ its targets file for .npy/IDX inputs).

    x: (n, features) rows, trailing axes flattened; IDX bytes scaled to [0, 1].
    y: (n,) or (n, k), or None when need_targets is false (predict) and the file has none; CSV class
       names are a str array (n,).
    """
    where = f"{role} file {path!r}"
    kind = sniff(path, where)
    if ignore_columns and kind != "csv":
        raise UserError(f"data.ignore_columns = {list(ignore_columns)} names CSV columns, but {where} is "
                        f"{kind}, not CSV")
    y = None
    if kind == "npz":
        wanted = ("x", "y") if need_targets else ("x",)
        arrays, names = read_npz(path, where, wanted)
        missing = [k for k in wanted if k not in arrays]
        if missing:
            raise UserError(f"{where} has no array named {missing[0]!r} (it has: {', '.join(names) or 'none'}); "
                            f"expected x and y")
        x, y = arrays["x"], arrays.get("y")
    elif kind == "csv":
        x, y = read_csv(path, where, target_columns, need_targets, ignore_columns)
    else:
        x = read_array(path, kind, where)
    x = _flatten(x, where)
    if kind.startswith("idx") and x.dtype == np.uint8:
        x = Scaled(x, 255.0)
    y_where = where
    if targets_path and need_targets:
        if kind in ("npz", "csv"):
            raise UserError(f"{where} holds its own targets; data.targets pairs only with .npy or IDX inputs")
        y_where = f"targets file {targets_path!r}"
        y = read_array(targets_path, sniff(targets_path, y_where), y_where)
    elif need_targets and y is None:
        raise UserError(f"{where} holds only inputs; name the file with their targets in data.targets "
                        f"(.npy or IDX: labels (n,) or targets (n, outputs))")
    return x, y, where, y_where


def _flatten(x, where):
    if x.ndim < 2:
        raise UserError(f"{where}: inputs must be an array of shape (samples, features...), got shape {x.shape}")
    if isinstance(x, np.ndarray) and x.ndim > 2:
        return x.reshape(len(x), -1)
    return x
