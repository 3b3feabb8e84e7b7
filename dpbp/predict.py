"""python -m dpbp.predict: the network's outputs for every row of a data file, written as CSV.

    python -m dpbp.predict --params runs/digits-X/final.npz --data new.npy --out predictions.csv
    mpirun -n 4 python -m dpbp.predict --params RUN/final.npz --data t10k-images-idx3-ubyte.gz --out p.csv

Columns: row (in the file, from 0), then for a softmax or sigmoid output with 2+ units the predicted
class (argmax; its name when the run has class names, data.classes in its config.toml) and
p0..p{K-1}; otherwise the outputs y0..y{K-1}. Targets are not needed and not read. --out may not be
one of the inputs (data file, parameters, config) nor a directory: checked before any work.
Each rank computes its share of every block of rows; rank 0 gathers the block and writes it, so memory
stays bounded by the block size whatever the size of the file. Same arguments as dpbp.evaluate.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from dpbp.cli import ArgumentParser, parse_args, run, say
from dpbp.data import load_data
from dpbp.data import standardize as stats
from dpbp.errors import UserError
from dpbp.evaluate import add_run_arguments, load_run, params_file, run_config_path
from dpbp.partition import share

BLOCK = 4096  # rows per rank per gathered block


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.predict",
                       description="Write the network's predictions for a data file as CSV "
                                   "(alone or under mpirun).")
    add_run_arguments(p, "the data file to predict for, in any format dpbp reads", data_required=True)
    p.add_argument("--out", required=True, metavar="FILE.csv", help="where rank 0 writes the predictions")
    return p


def header(model):
    k = model.sizes[-1]
    if model.output in ("softmax", "sigmoid") and k >= 2:
        return ["row", "predicted"] + [f"p{c}" for c in range(k)]
    return ["row"] + [f"y{c}" for c in range(k)]


def predict_blocks(model, data, comm, emit):
    """Collective: outputs for all rows, block by block; rank 0 gets emit(first row, (rows, K) outputs)."""
    n, P = len(data), comm.size
    for start in range(0, n, BLOCK * P):
        stop = min(start + BLOCK * P, n)
        a, b = share(stop - start, comm.rank, P)
        out = (model.forward(data.x[start + a:start + b]).copy() if b > a
               else np.empty((0, model.sizes[-1]), model.dtype))
        parts = comm.allgather(out)
        if comm.rank == 0:
            emit(start, np.concatenate(parts))


def output_problem(args):
    """Why --out cannot be written (rank 0, before any work), or None: a directory, or one of the inputs."""
    out = args.out
    if os.path.isdir(out):
        return f"--out {out!r} is a directory; name the CSV file to write, e.g. {os.path.join(out, 'predictions.csv')}"
    for what, path in (("--data", args.data), ("--params", args.params), ("the run's config", run_config_path(args))):
        if path and (os.path.realpath(out) == os.path.realpath(path)
                     or (os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path))):
            return f"--out {out!r} is {what} ({path}); predictions never overwrite an input: choose another file"
    return None


def open_output(path, comm):
    """Rank 0 opens a temporary file beside `path`; every rank learns whether that worked."""
    f, error = None, None
    if comm.rank == 0:
        try:
            f = open(path + ".tmp", "w", newline="")
        except OSError as e:
            error = f"--out {path!r}: cannot write there ({e.strerror})"
    comm.agree(error)
    return f


def csv_names(names):
    """Class names as CSV fields: quoted (with "" for ") when they hold a comma, quote or line break."""
    return [f'"{n.replace(chr(34), chr(34) * 2)}"' if any(c in n for c in ',"\r\n') else n for n in names]


def row_writer(f, model, names):
    """emit(start, (rows, K) outputs): writes the rows' CSV lines to f (rank 0)."""
    k = model.sizes[-1]
    digits = 9 if model.dtype == np.float32 else 17  # enough to read every output back exactly
    classify = model.output in ("softmax", "sigmoid") and k >= 2
    labels = np.array(csv_names(list(names)) + [str(c) for c in range(len(names), k)], dtype=object)

    def emit(start, out):
        rows = np.arange(start, start + len(out))[:, None]
        if not classify or not names:
            lead = [rows, out.argmax(axis=1)[:, None]] if classify else [rows]
            fmt = ["%d"] * len(lead) + [f"%.{digits}g"] * k
            np.savetxt(f, np.hstack(lead + [out.astype(np.float64)]), fmt=fmt, delimiter=",")
            return
        values = np.char.mod(f"%.{digits}g", out.astype(np.float64))
        table = np.hstack([rows.astype(str), labels[out.argmax(axis=1)][:, None].astype(str), values])
        np.savetxt(f, table, fmt="%s", delimiter=",")

    return emit


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    args.params = params_file(args.params)
    comm.agree(output_problem(args) if comm.rank == 0 else None)
    cfg, model = load_run(args, comm)
    standardize = None
    if cfg["data.standardize"]:
        standardize = comm.agreed(stats.saved, args.params, model.sizes[0])
        if standardize is None:
            raise UserError(f"data.standardize = true but {args.params} holds no standardize statistics "
                            f"(in its companion .json, or standardize.* arrays) to apply to {args.data}")
    data, _ = load_data(cfg, comm, need_targets=False, standardize=standardize)
    f = open_output(args.out, comm)
    emit = row_writer(f, model, cfg["data.classes"])
    try:
        if f is not None:
            f.write(",".join(header(model)) + "\n")
        predict_blocks(model, data, comm, emit)
    finally:
        if f is not None:
            f.close()
    if comm.rank == 0:
        os.replace(args.out + ".tmp", args.out)
    say(comm, f"wrote predictions for {len(data)} rows of {data.source} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.predict"))
