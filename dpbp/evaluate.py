"""python -m dpbp.evaluate: loss, accuracy and confusion matrix (class labels) or RMSE, MAE and R² (other
targets) of trained parameters on a data set.

    python -m dpbp.evaluate --params runs/digits-X/final.npz              # the run's held-out set
    mpirun -n 4 python -m dpbp.evaluate --params RUN/ckpt-00000200.npz --data t10k-images-idx3-ubyte.gz \\
        --set data.targets=t10k-labels-idx1-ubyte.gz

--config defaults to the config.toml that training wrote next to the parameters. --data evaluates a
whole file in any format dpbp reads (data.targets, data.val_* and data.val_fraction are cleared for it;
set them again with --set). Each rank evaluates its share of fixed chunks of the data set and the
figures are combined in chunk order (``evaluate``), so they do not depend on the number of ranks; training
reports its held-out figures with the same functions.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from dpbp.cli import ArgumentParser, config_arguments, parse_args, run, say
from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.data import standardize as stats
from dpbp.errors import UserError
from dpbp.losses import batch_divisor, l2_penalty
from dpbp.partition import chunk_pieces
from dpbp.runs import model_of, starting_params

EVAL_CHUNK = 256


def evaluate(model, data, comm, confusion=None):
    """Collective: (loss sum, correct, count, sums) over data, split across ranks by fixed chunks and
    combined in chunk order, so the figures are the same bit for bit whatever the number of ranks.

    sums: for regression targets (no class labels) a (4, outputs) array of Σ(y - o)², Σ|y - o|, Σy, Σy²
    over the samples, each entry summed exactly (math.fsum) over the chunks; None for class labels.
    confusion: an optional (classes, classes) int64 array; counts [true label, predicted class] are
    added to it, summed over ranks (exact, integers). Every rank must pass one or none.
    """
    mine = []
    delta = None
    for a, b in chunk_pieces(len(data), EVAL_CHUNK, comm.rank, comm.size):
        x, t, labels = data.batch(slice(a, b))
        out = model.forward(x)
        if delta is None or len(delta) < len(out):
            delta = np.empty_like(out, shape=(EVAL_CHUNK, out.shape[1]))
        E = model.loss(out, t, delta[:len(out)], model.output)
        predicted = out.argmax(axis=1)
        correct = int(np.count_nonzero(predicted == labels)) if labels is not None else 0
        if confusion is not None and labels is not None:
            np.add.at(confusion, (labels, predicted), 1)
        mine.append((E, correct, None if labels is not None else regression_sums(out, t)))
    per_chunk = [item for part in comm.allgather(mine) for item in part]
    if confusion is not None:
        comm.allreduce_sum_(confusion)
    loss_sum = math.fsum(e for e, _, _ in per_chunk) if per_chunk else 0.0
    sums = None
    if data.labels is None and per_chunk:
        table = np.stack([s for _, _, s in per_chunk])  # (chunks, 4, outputs)
        sums = np.array([[math.fsum(table[:, i, k]) for k in range(table.shape[2])] for i in range(4)])
    return loss_sum, sum(c for _, c, _ in per_chunk), len(data), sums


def regression_sums(out, t):
    """(4, outputs) float64 for one chunk: Σ(y - o)², Σ|y - o|, Σy, Σy² over its rows (y = t, o = out)."""
    y, o = np.asarray(t, np.float64), np.asarray(out, np.float64)
    e = y - o
    return np.stack([np.square(e).sum(axis=0), np.abs(e).sum(axis=0), y.sum(axis=0), np.square(y).sum(axis=0)])


def regression_metrics(sums, n):
    """{"rmse", "mae", "r2"} from the (4, K) sums over n samples, each the mean over the K outputs of
    the output's own figure (scikit-learn's multioutput="uniform_average"):
        rmse_k = sqrt(Σ(y - o)² / n),  mae_k = Σ|y - o| / n,  r2_k = 1 - Σ(y - o)² / (Σy² - (Σy)² / n).
    An output whose targets are constant has r2_k = 1 if it is fitted exactly, else 0 (as scikit-learn)."""
    sse, sae, sy, syy = sums
    sst = np.maximum(syy - sy * sy / n, 0.0)
    safe = np.where(sst > 0, sst, 1.0)
    r2 = np.where(sst > 0, 1.0 - sse / safe, np.where(sse == 0, 1.0, 0.0))
    return {"rmse": float(np.mean(np.sqrt(sse / n))), "mae": float(np.mean(sae / n)), "r2": float(np.mean(r2))}


def held_out(model, cfg, data, comm, confusion=None):
    """Collective: {"loss", "accuracy" for labels, "rmse", "mae", "r2" for regression targets} on data:
    the loss is the data term (/count for mean) + the l2 penalty, as the training loss is reported; the
    regression figures compare the outputs with the targets alone (no penalty)."""
    loss_sum, correct, count, sums = evaluate(model, data, comm, confusion)
    rec = {"loss": loss_sum / batch_divisor(cfg["loss.reduction"], count) + l2_penalty(model.weights, cfg["loss.l2"])}
    if data.labels is not None:
        rec["accuracy"] = correct / count
    elif sums is not None:
        rec.update(regression_metrics(sums, count))
    return rec


def add_run_arguments(p, data_help, data_required=False):
    """The arguments evaluate and predict share."""
    p.add_argument("--params", required=True, metavar="PARAMS.npz",
                   help="trained parameters: a run's final.npz or one of its checkpoints (a run directory: its final.npz)")
    config_arguments(p, "the run's config (default: config.toml next to --params)",
                     "override one config key, e.g. --set data.targets=labels.npy")
    p.add_argument("--data", metavar="FILE", required=data_required, help=data_help)


def data_overrides(path):
    """--data FILE: that file alone, whole, with no targets or held-out set inherited from training."""
    if not path:
        return []
    return [f"data.path={json.dumps(path)}", "data.targets=''", "data.val_path=''", "data.val_targets=''",
            "data.val_fraction=0.0"]


def params_file(path):
    """--params as given, or a run directory's final.npz."""
    return os.path.join(path, "final.npz") if os.path.isdir(path) else path


def load_run(args, comm):
    """(cfg, model with the parameters loaded); the same UserError on every rank if anything is wrong."""
    return comm.agreed(_load_run, args)


def run_config_path(args):
    """--config, else the config.toml that training wrote next to --params."""
    return args.config or os.path.join(os.path.dirname(os.path.abspath(args.params)), "config.toml")


def _load_run(args):
    if not os.path.exists(args.params):
        raise UserError(f"--params {args.params!r}: no such file")
    config = run_config_path(args)
    if not args.config and not os.path.exists(config):
        raise UserError(f"no --config given and no config.toml next to {args.params}; pass the run's config "
                        f"with --config")
    cfg = load_config(config, data_overrides(args.data) + args.set)
    model = model_of(cfg)
    model.load(starting_params(cfg, args.params))
    return cfg, model


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.evaluate",
                       description="Loss, accuracy and confusion matrix of trained parameters on a data set "
                                   "(alone or under mpirun).")
    add_run_arguments(p, "a data file in any format dpbp reads (default: the run's held-out set)")
    return p


def confusion_lines(confusion, names=()):
    """Rows: true class; columns: predicted class; each named by names[c] (data.classes) if it has one."""
    k = len(confusion)
    labels = [names[c] if c < len(names) else str(c) for c in range(k)]
    width = max(5, len(str(int(confusion.max(initial=0)))) + 1, max(map(len, labels)) + 1)
    corner = "true\\pred"
    first = max(len(corner), max(map(len, labels)))
    lines = ["confusion matrix (rows: true class, columns: predicted class)",
             f"{corner:<{first}}" + "".join(f"{c:>{width}}" for c in labels)]
    for c in range(k):
        lines.append(f"{labels[c]:>{first}}" + "".join(f"{v:>{width}}" for v in confusion[c]))
    return lines


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    args.params = params_file(args.params)
    cfg, model = load_run(args, comm)
    # The run's own held-out set recomputes the statistics of its training rows (the same bits);
    # another file needs the ones saved with the parameters.
    saved = stats.saved(args.params, cfg["model.sizes"][0]) if cfg["data.standardize"] else None
    if cfg["data.standardize"] and args.data and saved is None:
        raise UserError(f"data.standardize = true but {args.params} holds no standardize statistics to "
                        f"apply to {args.data}")
    train, val = load_data(cfg, comm, standardize=saved)
    data = train if args.data else val
    if data is None:
        raise UserError("the run has no held-out set (no data.val_path, and data.val_fraction is 0 or, for a "
                        "data file, not given); name a data file with --data")
    confusion = None if data.labels is None else np.zeros((cfg["model.sizes"][-1],) * 2, np.int64)
    rec = held_out(model, cfg, data, comm, confusion)
    part = "" if args.data or cfg["data.val_path"] else "the held-out part of "
    lines = [f"evaluated {args.params} on {part}{data.source}: {len(data)} samples",
             f"loss {rec['loss']:.6g} ({cfg['loss.kind']}, {cfg['loss.reduction']} over samples, plus the l2 "
             f"penalty: the figure training logs as val_loss)"]
    if confusion is not None:
        lines.append(f"accuracy {rec['accuracy']:.4f} ({int(np.trace(confusion))} of {len(data)})")
        lines += confusion_lines(confusion, data.classes or ())
    if "rmse" in rec:
        lines.append(f"rmse {rec['rmse']:.6g} mae {rec['mae']:.6g} r2 {rec['r2']:.6g} (the outputs against the "
                     f"targets, no penalty; the mean over the {model.sizes[-1]} output(s))")
    say(comm, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.evaluate"))
