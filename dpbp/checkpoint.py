"""Atomic, checksummed .npz files for parameters and checkpoints. Imports only numpy and the stdlib.

A file holds named arrays (``layers.{k}.weight``/``.bias`` for parameters, ``optim.velocity`` ...) and
one JSON string ``__meta__`` with the progress counters, the config and a SHA-256 over every array, so a
truncated or altered file is detected on load. Nothing is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile

import numpy as np

from dpbp.errors import UserError

META = "__meta__"
CKPT_PATTERN = re.compile(r"ckpt-(\d{8})\.npz$")


def digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path, arrays, meta=None):
    """Write arrays (+ meta) to `path` atomically: temporary file, fsync, rename, fsync the folder."""
    meta = dict(meta or {})
    meta["sha256"] = digest(arrays)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{META: np.array(json.dumps(meta))})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path):
    """(arrays, meta) from a file written by ``save``; UserError naming the file if it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # BadZipFile, EOFError, ValueError (object arrays), zlib errors ...
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    meta = {}
    if META in arrays:
        try:
            meta = json.loads(str(arrays.pop(META)))
        except (ValueError, TypeError):
            raise UserError(f"{path}: its metadata is damaged") from None
        if meta.get("sha256") != digest(arrays):
            raise UserError(f"{path}: checksum mismatch (the file is truncated or was altered)")
    return arrays, meta


def load_params(path, names, shapes):
    """{name: float64 array} for a model, checked by name, shape and dtype (for --init and evaluate)."""
    arrays, _ = load(path)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{path}: no array named {missing[0]!r} (expected {', '.join(names)})")
    params = {}
    for name, shape in zip(names, shapes):
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise UserError(f"{path}: {name} has shape {tuple(a.shape)}, the model needs {tuple(shape)}")
        if a.dtype.kind not in "fiu":
            raise UserError(f"{path}: {name} has dtype {a.dtype}, expected floating point numbers")
        if not np.isfinite(a).all():
            raise UserError(f"{path}: {name} holds NaN or inf")
        params[name] = a.astype(np.float64)
    return params


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt-{step:08d}.npz")


def list_checkpoints(run_dir):
    """Checkpoint paths in run_dir, newest (highest step) first."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt-*.npz")):
        m = CKPT_PATTERN.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def prune(run_dir, keep):
    for p in list_checkpoints(run_dir)[keep:]:
        os.unlink(p)


def newest_valid(run_dir, warn):
    """(arrays, meta, path) of the newest checkpoint that loads and checks out, or None.

    A damaged newer file is reported through warn() and skipped, so the previous one is used.
    """
    for p in list_checkpoints(run_dir):
        try:
            arrays, meta = load(p)
        except UserError as e:
            warn(f"skipping damaged checkpoint: {e}")
            continue
        if "step" not in meta:
            warn(f"skipping {p}: not a dpbp checkpoint (no step recorded)")
            continue
        return arrays, meta, p
    return None
