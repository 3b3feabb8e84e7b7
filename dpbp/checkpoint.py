"""Atomic, checksummed .npz files for parameters and checkpoints. Imports only numpy and the stdlib.

A checkpoint holds named arrays (``layers.{k}.weight``/``.bias``, ``optim.velocity`` ...) and one JSON
string ``__meta__`` with the progress counters, the config and a SHA-256 over every array, so a truncated
or altered file is detected on load.

A parameters file (final.npz, best.npz: ``save_parameters``) holds only the ``layers.{k}.weight`` (out ×
in) and ``layers.{k}.bias`` arrays, so that ``np.load`` and PyTorch's ``load_state_dict`` (after renaming
the keys) take it as it is; its description (sizes, activations, dtype, classes, the standardize
statistics, the step and the SHA-256 of the arrays) is the companion JSON file of the same stem
(final.json, best.json: ``companion_path``), which ``load`` reads and checks. Files of dpbp 0.1, with
``__meta__`` (and ``standardize.*`` arrays) inside, still load.

Reading never trusts the file: every member's .npy header is read and checked (no object dtype, so
nothing is ever unpickled; the declared size must fit in the member and under a limit; the shape must be
the expected one when the caller knows it) before any array data is read. Every problem is a UserError
naming the file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import tempfile
import zipfile

import numpy as np

from dpbp.errors import UserError

META = "__meta__"
PARAMS_FORMAT = "dpbp parameters 2"  # the companion JSON's "format"
CKPT_PATTERN = re.compile(r"ckpt-(\d{8})\.npz$")
TMP_PREFIX = ".tmp-"
MAX_META_BYTES = 1 << 24  # the JSON metadata (config, counters) is a few kB


class Refused(UserError):
    """A sound file that does not fit the caller (shape, size): not a sign of damage."""


def digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path, arrays, meta=None):
    """Write arrays + meta (with the arrays' SHA-256) as `path` atomically, meta as the ``__meta__``
    member: the checkpoint format."""
    meta = dict(meta or {})
    meta["sha256"] = digest(arrays)
    atomic_write(path, lambda f: np.savez(f, **arrays, **{META: np.array(json.dumps(meta))}))


def companion_path(path):
    """final.npz -> final.json: where a parameters file's description lives."""
    return os.path.splitext(path)[0] + ".json"


def save_parameters(path, arrays, meta):
    """A parameters file: `path` holds the arrays alone (no ``__meta__``), and its companion JSON holds
    meta, the format and the arrays' SHA-256 (so a pair that does not belong together is detected).
    Each is written atomically, the arrays first."""
    meta = {"format": PARAMS_FORMAT, **meta, "sha256": digest(arrays)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    atomic_write(companion_path(path), lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))


def atomic_write(path, write):
    """write(binary file) into a temporary file beside `path`, fsync, rename, fsync the folder.

    A crash at any moment leaves either the old file or the new one at `path`, never a partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def read_companion(path):
    """The companion JSON of the parameters file `path` as a dict, or None if there is none (or it is a
    JSON file that dpbp did not write: no "format" of PARAMS_FORMAT)."""
    where = companion_path(path)
    if where == path or not os.path.isfile(where):
        return None
    try:
        if os.path.getsize(where) > MAX_META_BYTES:
            raise ValueError(f"larger than {MAX_META_BYTES} bytes")
        with open(where) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{where}: cannot read the description of {path} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != PARAMS_FORMAT:
        return None  # some other JSON file of the same name (the user's own): not a description
    return meta


# ---------------------------------------------------------------- reading untrusted files


def _header(member):
    """(shape, dtype) declared by an .npy member, read without touching its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return shape, dtype


def _check_member(path, name, info, shape, dtype, expected, budget):
    """Refuse before reading data: objects (pickles), sizes the member cannot hold, unexpected shapes."""
    if dtype.hasobject:
        raise UserError(f"{path}: {name} holds Python objects; refusing to unpickle it "
                        f"(only plain numeric arrays are read)")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for absurd shapes
    if nbytes > info.file_size:
        raise UserError(f"{path}: {name} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                        f"only {info.file_size} bytes (the file is truncated or damaged)")
    if expected is not None and name in expected and tuple(shape) != tuple(expected[name]):
        raise Refused(f"{path}: {name} has shape {tuple(shape)}, the model needs {tuple(expected[name])}")
    if budget is not None and nbytes > budget:
        raise Refused(f"{path}: {name} declares {nbytes} bytes, more than the {budget} bytes "
                      f"that are plausible here")
    return nbytes


def _read_zip(path, expected, max_bytes):
    with zipfile.ZipFile(path) as zf:
        members = []
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise UserError(f"{path}: unexpected member {info.filename!r}; not an .npz of arrays")
            name = info.filename[:-4]
            with zf.open(info) as member:
                shape, dtype = _header(member)
            budget = MAX_META_BYTES if name == META else max_bytes
            members.append((info, name, shape, dtype))
            spent = _check_member(path, name, info, shape, dtype, expected, budget)
            if max_bytes is not None and name != META:
                max_bytes -= spent
        arrays = {}
        for info, name, _, _ in members:
            with zf.open(info) as member:
                arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
        return arrays


def load(path, expected=None, max_bytes=None):
    """(arrays, meta) from a file written by ``save``; UserError naming the file if it is damaged.

    expected: {name: shape} to check before reading data (other names may be present too);
    max_bytes: refuse files whose arrays (besides the metadata) declare more than this in total.
    """
    try:
        arrays = _read_zip(path, expected, max_bytes)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an .npz file") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a readable .npz file, or a truncated one ({e})") from None
    except Exception as e:  # noqa: BLE001 - EOFError, ValueError, zlib.error, MemoryError, ...
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if META not in arrays:  # a parameters file: its description is the companion JSON, if any
        meta = read_companion(path)
        if meta is not None and "sha256" in meta and meta["sha256"] != digest(arrays):
            raise UserError(f"{path}: its arrays do not match the checksum in {companion_path(path)} (one of "
                            f"them was altered, or they are not from the same save)")
        return arrays, meta or {}
    try:
        meta = json.loads(str(arrays.pop(META)))
    except (ValueError, TypeError, RecursionError):
        raise UserError(f"{path}: its metadata is damaged") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its metadata is damaged")
    if meta.get("sha256") != digest(arrays):
        raise UserError(f"{path}: checksum mismatch (the file is truncated or was altered)")
    return arrays, meta


def load_params(path, names, shapes):
    """{name: float64 array} for a model, checked by name, shape and dtype (for --init and evaluate)."""
    expected = dict(zip(names, shapes))
    need = sum(math.prod(s) for s in shapes) * 8
    arrays, _ = load(path, expected, max_bytes=4 * need + (1 << 20))
    return checked_params(arrays, names, shapes, path)


def checked_params(arrays, names, shapes, where):
    """{name: float64 array} from {name: array} (a file's, or a caller's in memory), checked by name,
    shape, dtype and value; `where` names them in messages."""
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{where}: no array named {missing[0]!r} (expected {', '.join(names)})")
    params = {}
    for name, shape in zip(names, shapes):
        a = np.asarray(arrays[name])
        if a.shape != tuple(shape):
            raise UserError(f"{where}: {name} has shape {a.shape}, the model needs {tuple(shape)}")
        if a.dtype.kind not in "fiu":
            raise UserError(f"{where}: {name} has dtype {a.dtype}, expected floating point numbers")
        if not np.isfinite(a).all():
            raise UserError(f"{where}: {name} holds NaN or inf")
        params[name] = a.astype(np.float64)
    return params


# ---------------------------------------------------------------- a run directory's checkpoints


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt-{step:08d}.npz")


def list_checkpoints(run_dir):
    """Checkpoint paths in run_dir, newest (highest step) first."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt-*.npz")):
        m = CKPT_PATTERN.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def prune(run_dir, keep):
    """Keep the `keep` newest checkpoints; drop temporary files a killed writer left behind."""
    for p in list_checkpoints(run_dir)[keep:]:
        os.unlink(p)
    leftovers = [p for ext in (".npz", ".json") for p in glob.glob(os.path.join(glob.escape(run_dir), TMP_PREFIX + "*" + ext))]
    for p in leftovers:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def newest_valid(run_dir, warn, max_bytes=None):
    """(arrays, meta, path) of the newest checkpoint that loads and checks out, or None.

    A damaged newer file is reported through warn(), renamed to ``<name>.damaged`` (kept for a post
    mortem; never chosen again, nor counted among the kept ones) and skipped, so the previous one is
    used. A sound file that is too large for max_bytes is refused (Refused), not skipped.
    """
    for p in list_checkpoints(run_dir):
        try:
            arrays, meta = load(p, max_bytes=max_bytes)
            if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
                raise UserError(f"{p}: not a dpbp checkpoint (no step recorded)")
        except Refused:
            raise
        except UserError as e:
            warn(f"skipping damaged checkpoint: {e}; using the previous one")
            try:
                os.replace(p, p + ".damaged")
            except OSError:
                pass
            continue
        return arrays, meta, p
    return None
