"""python -m dpbp.verify: the sum rule, checked on the product's own code path.

For the configured model, its starting parameters (or --init) and the first global batch, four gradients
of the regularised error E_total = E_data (/B for reduction "mean") + lambda/2 sum ||W||^2:

    1 allreduce   Trainer.gradient with the real communicator: shard (or chunk) gradients, the configured
                  reduction (fast or reproducible), the divisor and the l2 term: what training uses
    2 full        one process, one forward/backward over the whole batch, in float64
    3 per-sample  one backward pass per sample, summed, in float64
    4 fd          central differences of E_total computed from a forward pass alone (no backward),
                  in float64: every parameter of a small model, a seeded subset of a large one

1 = 2 proves that splitting the batch across ranks and adding the parts gives the full-batch gradient
(dE_total/dw = sum over shards), with the global divisor and l2 applied once; 2 = 3 that a batched
backward is the sum of per-sample gradients; 2 = 4 (and 1 = 4) that backprop computes dE_total/dw at all.
Every pair is compared per tensor: the max absolute difference, and that divided by the tensor's largest
|entry| in 2 (relative difference), held to a tolerance chosen by the pair and the model's dtype.
Rank 0 prints the table (or --json); the exit status is 0 only if every pair is within tolerance,
EXIT_FAULT otherwise, with the offending tensors named.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from dpbp.cli import ArgumentParser, config_arguments, parse_args, run
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.errors import EXIT_FAULT, UserError
from dpbp.layers import ACTIVATIONS
from dpbp.losses import batch_divisor, finish_gradient
from dpbp.model import count_params, param_names, param_shapes, views
from dpbp.partition import share
from dpbp.runs import model_of, starting_params
from dpbp.step import Trainer

GRADIENTS = ("allreduce", "full", "per-sample", "fd")
PAIRS = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))

# Tolerances on max|a - b| <= rtol * (largest |entry| of the tensor in gradient 2) + atol.
RTOL_FLOAT64 = 1e-10  # 1-2, 1-3, 2-3 in float64: the same sums in other orders (rounding ~1e-15)
RTOL_FLOAT32 = 1e-4  # a float32 model's gradient against the float64 reference (2^-24 per operation)
RTOL_FD = 1e-6  # central differences: truncation h^2 E'''/6 with h = 1e-6 relative
FD_ATOL = 1e-8  # ... and rounding ~eps |E| / h, so an absolute floor of 1e-8 * max(1, |E_total|)
FD_H = 1e-6  # step, relative to max(1, |w|)
FD_ALL_UP_TO = 5000  # models with at most this many parameters get every one checked
FD_SUBSET = 200  # otherwise a seeded random subset of at least this many


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.verify",
                       description="Check the training gradient against the full-batch gradient, the sum of "
                                   "per-sample gradients and central differences (alone or under mpirun).")
    config_arguments(p, "TOML file overriding the defaults", "override one key")
    p.add_argument("--init", metavar="PARAMS.npz", help="parameters to check at (default: the seeded start)")
    p.add_argument("--fd", type=int, default=None, metavar="N",
                   help=f"parameters checked by central differences (default: all up to {FD_ALL_UP_TO}, "
                        f"else {FD_SUBSET}; 0: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p


# ---------------------------------------------------------------- the four gradients


def reference_model(cfg, params):
    """A float64 MLP of the config holding params."""
    model = model_of(cfg, "float64")
    model.load(params)
    return model


def finish(model, cfg, batch_size):
    """Summed data gradient -> gradient of E_total: /B for mean, + lambda W."""
    finish_gradient(model.nabla_w, model.nabla_b, model.weights, cfg["loss.l2"],
                    batch_divisor(cfg["loss.reduction"], batch_size))
    return model.grad.copy()


def allreduce_gradient(cfg, comm, data, params, idx):
    """1: what a training step computes on every rank (Trainer.gradient, the configured reduction)."""
    trainer = Trainer(cfg, comm, data)
    trainer.model.load(params)
    trainer.gradient(idx)
    return trainer.grad.astype(np.float64)


def full_batch_gradient(cfg, params, x, t):
    """2: one forward/backward over the whole batch."""
    model = reference_model(cfg, params)
    model.forward(x)
    model.backward(t)
    return finish(model, cfg, len(x))


def per_sample_gradient(cfg, params, x, t):
    """3: sum over n of dE_n/dw, one backward pass per sample."""
    model = reference_model(cfg, params)
    total = np.zeros(model.n_params)
    for n in range(len(x)):
        model.forward(x[n:n + 1])
        model.backward(t[n:n + 1])
        total += model.grad
    model.grad[:] = total
    return finish(model, cfg, len(x))


def objective(cfg, theta, x, t):
    """E_total at the flat float64 parameters theta, from a forward pass written out here (independent of
    MLP and of backward). Also returns the hidden layers' relu masks, to spot steps across a kink."""
    sizes = cfg["model.sizes"]
    tensors = views(theta, param_shapes(sizes))
    out, masks = x, []
    for l, (W, b) in enumerate(zip(tensors[0::2], tensors[1::2])):
        net = out @ W.T + b
        last = l == len(sizes) - 2
        out = ACTIVATIONS[cfg["model.output"] if last else cfg["model.activation"]].f(net, np.empty_like(net))
        if not last and cfg["model.activation"] == "relu":
            masks.append(net > 0)
    o = np.maximum(out, 1e-300)
    if cfg["loss.kind"] == "squared_error":
        E = 0.5 * np.sum((t - out) ** 2)
    elif cfg["model.output"] == "softmax":
        E = -np.sum(t * np.log(o))
    else:
        E = -np.sum(t * np.log(o) + (1 - t) * np.log(np.maximum(1 - out, 1e-300)))
    if cfg["loss.reduction"] == "mean":
        E /= len(x)
    E += 0.5 * cfg["loss.l2"] * sum(np.sum(W ** 2) for W in tensors[0::2])
    return float(E), masks


def fd_indices(cfg, n_params, wanted):
    """Sorted flat indices checked by central differences: all, or per tensor a seeded random share
    (at least FD_SUBSET in all, at least 8 per tensor) so that every tensor is represented."""
    if wanted == 0 or (wanted is None and n_params <= FD_ALL_UP_TO) or (wanted or 0) >= n_params:
        return np.arange(n_params)
    wanted = wanted or FD_SUBSET
    rng = np.random.default_rng([cfg["seed"], 0xFD])
    chosen, offset = [], 0
    for shape in param_shapes(cfg["model.sizes"]):
        size = int(np.prod(shape))
        k = min(size, max(8, math.ceil(wanted * size / n_params)))
        chosen.append(offset + np.sort(rng.choice(size, k, replace=False)))
        offset += size
    return np.concatenate(chosen)


def flat(cfg, params):
    """{name: array} -> one float64 vector in the model's buffer order."""
    names = param_names(len(cfg["model.sizes"]) - 1)
    return np.concatenate([np.asarray(params[n], np.float64).ravel() for n in names])


def fd_gradient(cfg, comm, params, x, t, indices):
    """4: (E(w + h e_i) - E(w - h e_i)) / 2h for the given flat indices, shared out over the ranks.

    Returns (values, skipped): skipped marks parameters whose step moved some relu across its kink,
    where E is not differentiable at the scale of h (they are left out of the comparison)."""
    theta = flat(cfg, params)
    _, masks0 = objective(cfg, theta, x, t)
    lo, hi = share(len(indices), comm.rank, comm.size)
    mine = []
    for i in indices[lo:hi]:
        w = theta[i]
        h = FD_H * max(1.0, abs(w))
        theta[i] = w + h
        e_plus, masks_plus = objective(cfg, theta, x, t)
        plus = theta[i]
        theta[i] = w - h
        e_minus, masks_minus = objective(cfg, theta, x, t)
        minus = theta[i]
        theta[i] = w
        kink = any(not (np.array_equal(a, m) and np.array_equal(b, m))
                   for a, b, m in zip(masks_plus, masks_minus, masks0))
        mine.append(((e_plus - e_minus) / (plus - minus), kink))
    found = [item for part in comm.allgather(mine) for item in part]
    return np.array([v for v, _ in found], np.float64), np.array([k for _, k in found], bool)


# ---------------------------------------------------------------- comparing them


def tolerance(pair, dtype, E_total):
    """(rtol, atol) for a pair of gradient numbers."""
    a, b = pair
    rtol = RTOL_FLOAT32 if (a == 0 and dtype == "float32") else RTOL_FLOAT64
    if b == 3:
        return max(rtol, RTOL_FD), FD_ATOL * max(1.0, abs(E_total))
    return rtol, 0.0


def compare(grads, fd_at, fd_skip, names, shapes, dtype, E_total):
    """Rows {tensor, pair, max_abs, max_rel, rtol, atol, ok}: one per tensor and pair."""
    rows, offset = [], 0
    checked = np.zeros(len(grads[1]), bool)
    checked[fd_at[~fd_skip]] = True
    fd_full = np.full(len(grads[1]), np.nan)
    fd_full[fd_at] = grads[3]
    for name, shape in zip(names, shapes):
        part = slice(offset, offset + int(np.prod(shape)))
        offset = part.stop
        scale = float(np.max(np.abs(grads[1][part])))
        for pair in PAIRS:
            a, b = (grads[k] if k < 3 else fd_full for k in pair)
            where = checked[part] if 3 in pair else np.ones(part.stop - part.start, bool)
            diff = np.abs(a[part] - b[part])[where]
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
            rtol, atol = tolerance(pair, dtype, E_total)
            rows.append({"tensor": name, "pair": f"{pair[0] + 1}-{pair[1] + 1}",
                         "a": GRADIENTS[pair[0]], "b": GRADIENTS[pair[1]], "max_abs": max_abs, "max_rel": max_rel,
                         "rtol": rtol, "atol": atol, "compared": int(diff.size),
                         "ok": bool(max_abs <= rtol * scale + atol)})  # False for NaN too
    return rows


# ---------------------------------------------------------------- output


def table(r):
    """The report as text: a header, one line per tensor and pair, the verdict."""
    plural = "s" if r["batch"] > 1 else ""
    skipped = f", {r['fd_skipped_at_kinks']} skipped at relu kinks" if r["fd_skipped_at_kinks"] else ""
    lines = [f"dpbp verify | {r['ranks']} rank{'s' if r['ranks'] > 1 else ''} | reduce {r['reduce']} | model "
             f"{'-'.join(map(str, r['sizes']))} {r['activation']} {r['dtype']}, {r['n_params']} parameters",
             f"loss {r['loss']} | first global batch: {r['batch']} sample{plural} | E_total {r['E_total']:.10g}",
             f"gradients: 1 allreduce (Trainer.gradient, {r['dtype']}), 2 full batch, 3 per-sample sum "
             f"({r['batch']} pass{'es' if plural else ''}), 4 central differences (h = {FD_H:g} max(1,|w|), "
             f"{r['fd_checked']} of {r['n_params']} parameters{skipped})",
             "2-4 in float64; relative = max abs diff / largest |entry| of the tensor in 2", "",
             f"{'tensor':<18} {'pair':<25} {'max abs diff':>12} {'max rel diff':>12}  {'tolerance':<24} ok"]
    last = None
    for row in r["rows"]:
        tol = f"{row['rtol']:.0e} rel" + (f" + {row['atol']:.1e} abs" if row["atol"] else "")
        pair = f"{row['pair']} {row['a']}/{row['b']}"
        lines.append(f"{row['tensor'] if row['tensor'] != last else '':<18} {pair:<25} {row['max_abs']:>12.3e} "
                     f"{row['max_rel']:>12.3e}  {tol:<24} {'ok' if row['ok'] else 'FAIL'}")
        last = row["tensor"]
    return "\n".join([*lines, "", r["verdict"]])


def verdict(rows):
    bad = [r for r in rows if not r["ok"]]
    if not bad:
        return f"verify: all {len(rows)} comparisons within tolerance", []
    tensors = list(dict.fromkeys(r["tensor"] for r in bad))
    detail = "; ".join(f"{r['tensor']} {r['a']} vs {r['b']}: max rel diff {r['max_rel']:.3g} > {r['rtol']:.0e}"
                       for r in bad[:6])
    return f"verify: FAILED in {', '.join(tensors)} ({detail})", tensors


# ---------------------------------------------------------------- the command


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    if args.fd is not None and args.fd < 0:
        raise UserError("--fd must be >= 0")
    cfg = load_config(args.config, args.set)
    data, _ = load_data(cfg)
    params = starting_params(cfg, args.init)
    idx, _ = batch_indices(len(data), cfg["data.batch_size"], cfg["seed"], 0, cfg["data.shuffle"],
                           cfg["data.drop_last"])
    x, t = data.x[idx].astype(np.float64), data.t[idx]
    sizes = cfg["model.sizes"]
    n_params = count_params(sizes)

    g1 = allreduce_gradient(cfg, comm, data, params, idx)
    at = fd_indices(cfg, n_params, args.fd)
    g4, skipped = fd_gradient(cfg, comm, params, x, t, at)
    report = None
    if comm.rank == 0:
        g2 = full_batch_gradient(cfg, params, x, t)
        g3 = per_sample_gradient(cfg, params, x, t)
        E_total, _ = objective(cfg, flat(cfg, params), x, t)
        rows = compare([g1, g2, g3, g4], at, skipped, param_names(len(sizes) - 1), param_shapes(sizes),
                       cfg["model.dtype"], E_total)
        text, failed = verdict(rows)
        report = {"ranks": comm.size, "reduce": cfg["comm.reduce"], "sizes": sizes, "n_params": n_params,
                  "activation": f"{cfg['model.activation']}/{cfg['model.output']}", "dtype": cfg["model.dtype"],
                  "loss": f"{cfg['loss.kind']} ({cfg['loss.reduction']}, l2 {cfg['loss.l2']})",
                  "batch": len(idx), "E_total": E_total, "fd_checked": int(len(at) - skipped.sum()),
                  "fd_skipped_at_kinks": int(skipped.sum()), "rows": rows, "ok": not failed, "failed": failed,
                  "verdict": text}
        print(json.dumps(report, indent=1) if args.json else table(report), flush=True)
        if failed:
            print(text, file=sys.stderr, flush=True)
    ok = comm.bcast(report["ok"] if report else None)
    return 0 if ok else EXIT_FAULT


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.verify"))
