"""data.standardize: per-feature mean and standard deviation of the training rows, the same bits on
any number of ranks, applied lazily to every row read.

How the figures stay independent of the number of ranks P: the rows are cut into fixed chunks by
position (the chunk length depends only on the row width), each rank sums its whole chunks
(``partition.chunk_pieces``: a chunk's sum is the same computation whichever rank does it), the
ranks allgather the per-chunk sums and every rank combines them feature by feature with math.fsum,
which is exactly rounded and so does not depend on how the chunks were grouped. Two passes (the
mean, then the sum of squared deviations from it) keep the variance accurate when the mean is large
compared with the spread; the standard deviation is the population one (divide by n), as in
scikit-learn's StandardScaler.

A feature with standard deviation 0 (a constant column) gets divisor 1: it becomes 0 everywhere
instead of NaN.

The statistics travel with a run as two arrays (``to_arrays``/``from_arrays``) inside its checkpoints
(and inside the parameters files of dpbp 0.1):
    standardize.mean  (features,) float64   subtracted from every input row
    standardize.std   (features,) float64   then divided by: the standard deviation, 1 where it is 0
and in a parameters file's companion JSON (final.json) as "standardize": {"mean": [...], "std": [...]}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpbp.checkpoint import read_companion
from dpbp.data.rows import Scaled
from dpbp.errors import UserError
from dpbp.partition import chunk_pieces

MEAN_KEY, STD_KEY = "standardize.mean", "standardize.std"
_CHUNK_BYTES = 4 << 20  # float64 bytes per chunk: bounds what a rank holds while summing


@dataclass(frozen=True)
class Standardize:
    mean: np.ndarray  # (features,) float64
    std: np.ndarray  # (features,) float64, > 0: the divisor actually applied

    def apply(self, x):
        """x (n, features) seen standardized: (x[rows] - mean) / std, computed per read."""
        return Scaled(x, self.std, self.mean)

    def to_arrays(self):
        """{"standardize.mean": (F,), "standardize.std": (F,)}: to save beside the parameters."""
        return {MEAN_KEY: self.mean.copy(), STD_KEY: self.std.copy()}

    def to_json(self):
        """{"mean": [...], "std": [...]}: the description's form (final.json beside final.npz), read by ``saved``."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_arrays(cls, arrays, where, features):
        """The statistics saved by ``to_arrays`` in `arrays` (e.g. a run's final.npz), checked; None if
        neither key is there. `where` names the file in messages."""
        if MEAN_KEY not in arrays and STD_KEY not in arrays:
            return None
        try:
            mean, std = (np.asarray(arrays[k], np.float64) for k in (MEAN_KEY, STD_KEY))
        except KeyError as e:
            raise UserError(f"{where}: has {MEAN_KEY} or {STD_KEY} but not both (missing {e})") from None
        except (TypeError, ValueError):
            raise UserError(f"{where}: {MEAN_KEY} and {STD_KEY} must be numbers") from None
        if mean.shape != (features,) or std.shape != (features,):
            raise UserError(f"{where}: {MEAN_KEY} and {STD_KEY} have shapes {mean.shape} and {std.shape}; "
                            f"the model has {features} input features")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise UserError(f"{where}: {STD_KEY} must be finite and positive and {MEAN_KEY} finite")
        return cls(mean, std)


def chunk_rows(features):
    """Rows per fixed chunk: a function of the row width only, never of the number of ranks."""
    return max(1, _CHUNK_BYTES // (8 * max(int(features), 1)))


def chunk_sums(x, rank, size, center=None):
    """[(features,) float64] for each fixed chunk this rank owns, in chunk order: the sum over the
    chunk's rows of x, or of (x - center)^2 when center (features,) is given."""
    sums = []
    for a, b in chunk_pieces(len(x), chunk_rows(x.shape[1]), rank, size):
        rows = np.asarray(x[a:b], np.float64)
        if center is not None:
            rows = np.square(rows - center)
        sums.append(rows.sum(axis=0))
    return sums


def combine(per_chunk, features):
    """(features,): each feature's exactly rounded sum (math.fsum) over the chunks' sums, so grouping
    the chunks differently (another number of ranks) cannot change a bit."""
    if not per_chunk:
        return np.zeros(features)
    table = np.stack(per_chunk)
    return np.array([math.fsum(table[:, j]) for j in range(features)])


def compute(x, comm=None):
    """Collective (when comm is given): Standardize of the rows of x (n, features), the same bits on
    every rank and for any number of ranks; comm None: one process, every chunk."""
    n, features = len(x), x.shape[1]
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)

    def everyone(mine):
        return mine if comm is None else [s for part in comm.allgather(mine) for s in part]

    mean = combine(everyone(chunk_sums(x, rank, size)), features) / n
    var = combine(everyone(chunk_sums(x, rank, size, mean)), features) / n
    std = np.sqrt(var)
    return Standardize(mean, np.where(std > 0, std, 1.0))


def saved(path, features):
    """The Standardize saved with the parameters at `path`, or None if there is none: the arrays in a
    checkpoint (or a dpbp 0.1 final.npz), else the companion JSON of a parameters file (whose checksum
    the parameters' loader has verified)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in (MEAN_KEY, STD_KEY) if k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read its standardize statistics ({e})") from None
    if not arrays:
        described = (read_companion(path) or {}).get("standardize")
        if isinstance(described, dict):  # to_json's form
            arrays = {MEAN_KEY: described.get("mean"), STD_KEY: described.get("std")}
        elif described is not None:
            raise UserError(f"{path}: the standardize statistics in its description are damaged")
    return Standardize.from_arrays(arrays, path, features)
