"""Data: built-in sets, file formats read rank-locally, checks, and the exact distributed sampler.

    builtin.py   seed, xor, spirals, digits, random (in memory)
    formats.py   .npz, .npy (+ targets file), IDX (MNIST, raw or .gz), CSV with a header
    rows.py      lazy row sources: a rank reads only the rows it uses
    dataset.py   Dataset, shape/type checks, value scans split across ranks, class names, the held-out split
    standardize.py  per-feature mean/std of the training rows, the same bits on any number of ranks
    sampler.py   one permutation per (seed, epoch); every sample exactly once per epoch

Imports only numpy and the stdlib (digits are read from scikit-learn's bundled file, without importing it).
"""

from dpbp.data.builtin import builtin
from dpbp.data.dataset import (Dataset, check_values, load_data, load_npz, make_dataset, split, to_dataset,
                               val_fraction)
from dpbp.data.standardize import Standardize
from dpbp.data.sampler import batch_indices, batches_per_epoch, epoch_order, epoch_position

__all__ = ["Dataset", "Standardize", "batch_indices", "batches_per_epoch", "builtin", "check_values", "epoch_order",
           "epoch_position", "load_data", "load_npz", "make_dataset", "split", "to_dataset", "val_fraction"]
