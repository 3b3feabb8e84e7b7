"""Fit the alpha-beta cost of MPI Allreduce on this machine and predict data-parallel scaling.

Usage:
    mpirun -n 4 python launch/alpha_beta.py [--compute SECONDS] [--max-bytes N] [--seconds-per-size S]
    python launch/alpha_beta.py --alpha 2e-6 --beta 10e9 --compute 0.05   # predict only, given figures

What it does
  1. Sweeps message sizes (powers of two, --min-bytes .. --max-bytes, float32 buffers) and times an
     in-place MPI Allreduce(SUM) -- the call the trainer makes once per step -- many times per size:
     each repetition starts after a barrier and its time is the slowest rank's. The fit uses the
     best (minimum) repetition, what the machine can do when nothing else runs; the median is
     printed beside it to show how much other load costs.
  2. Fits the ring model  T(n) = 2(P-1)/P * n/beta + 2(P-1) * alpha  (n = message bytes) as
     T = a + b n, minimising the summed absolute RELATIVE error (so small and large messages count
     alike and a few points disturbed by other load do not drag the line), and reads off
     alpha = a / (2(P-1)) and beta = 2(P-1) / (P b). Prints alpha, beta, every point against the
     fit, and the fit's median and worst relative error.
  3. Predicts, with those alpha and beta, the Allreduce time, step time, speed-up and parallel
     efficiency at 1, 8, 64 and 512 ranks for two gradient sizes: the 784-1024-1024-10 float32
     MLP (1,863,690 parameters = 7.45 MB) and a 100M-parameter float32 MLP (400 MB), given the
     compute time of one step (--compute, seconds, for the whole global batch on ONE rank, of the
     small model; the 100M model's is --compute-100m, by default --compute scaled by the
     parameter count):
        strong scaling (fixed global batch, the trainer's data.batch_size):
            step(P) = compute/P + T_allreduce(P),  efficiency = compute / (P * step(P))
        weak scaling (fixed per-rank batch):
            step(P) = compute + T_allreduce(P),    efficiency = compute / step(P)
     No overlap of communication with computation is assumed (the trainer reduces after backward).

Caveat: alpha and beta measured among the ranks of one machine (shared memory) say nothing about a
network; 64 or 512 ranks span nodes, so pass the interconnect's --alpha/--beta for those rows if
known (e.g. --alpha 2e-6 --beta 12e9 for ~100 Gb/s InfiniBand). Measured figures are printed on
stdout by rank 0 only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

MODELS = [
    ("784-1024-1024-10 MLP", 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10),  # 1,863,690
    ("100M-parameter MLP", 100_000_000),
]
RANKS = [1, 8, 64, 512]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compute", type=float, default=0.0234,
                   help="compute time of one training step of the 784-1024-1024-10 model on one rank, "
                        "seconds (default 0.0234: configs/bench_large.toml, batch 256, 1 thread, here)")
    p.add_argument("--compute-100m", type=float,
                   help="the same for the 100M-parameter MLP (default: --compute scaled by the parameter "
                        "count, since an MLP step's flops grow in proportion to it)")
    p.add_argument("--dtype-bytes", type=int, default=4, help="bytes per gradient element (default 4: float32)")
    p.add_argument("--min-bytes", type=int, default=8, help="smallest message of the sweep (default 8)")
    p.add_argument("--max-bytes", type=int, default=32 << 20, help="largest message of the sweep (default 32 MiB)")
    p.add_argument("--seconds-per-size", type=float, default=0.3,
                   help="time budget of the repetitions at one size (default 0.3)")
    p.add_argument("--min-reps", type=int, default=5, help="at least this many timed repetitions per size")
    p.add_argument("--alpha", type=float, help="skip the sweep: use this latency per message step (s)")
    p.add_argument("--beta", type=float, help="skip the sweep: use this bandwidth (bytes/s)")
    return p.parse_args(argv)


def ring_terms(P, n_bytes):
    """(latency coefficient, bandwidth coefficient) of the ring model: T = c_a*alpha + c_b/beta."""
    return 2 * (P - 1), 2 * (P - 1) / P * n_bytes


def predict(alpha, beta, P, n_bytes):
    ca, cb = ring_terms(P, n_bytes)
    return ca * alpha + cb / beta


def measure(comm, n_bytes, budget, min_reps):
    """(min, median, reps) over repetitions of the slowest rank's time for one in-place Allreduce."""
    from mpi4py import MPI
    buf = np.zeros(max(1, n_bytes // 4), np.float32)
    for _ in range(2):  # warm-up: first-touch pages, connection setup
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    comm.Barrier()
    t0 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    one = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    reps = int(max(min_reps, min(10_000, budget / max(one, 1e-7))))
    times = np.empty(reps)
    for i in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times[i] = time.perf_counter() - t0
    slowest = np.empty_like(times)
    comm.Allreduce(times, slowest, op=MPI.MAX)
    return float(slowest.min()), float(np.median(slowest)), reps


def _nonneg_lstsq(A, y):
    """Least squares for [a, b] >= 0 (two unknowns: try the free fit, else each one alone)."""
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a > 0 and b > 0:
        return a, b
    best = None
    for keep in (0, 1):
        coef = max(0.0, float(np.linalg.lstsq(A[:, keep:keep + 1], y, rcond=None)[0][0]))
        cand = (coef, 0.0) if keep == 0 else (0.0, coef)
        err = float(np.sum((A @ np.array(cand) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, cand)
    return best[1]


def fit(P, sizes, times):
    """T = a + b n minimising the summed |relative error| (iteratively reweighted least squares),
    so small and large messages count alike and a few disturbed points do not drag the line."""
    n = np.asarray(sizes, float)
    t = np.asarray(times, float)
    A = np.stack([np.ones_like(n), n], axis=1) / t[:, None]  # rows: (a + b n) / t  ~  1
    y = np.ones_like(t)
    w = np.ones_like(t)
    for _ in range(100):
        a, b = _nonneg_lstsq(A * w[:, None], y * w)
        r = np.abs(A @ np.array([a, b]) - y)
        w_new = 1 / np.sqrt(np.maximum(r, 1e-3))  # L1 via IRLS: weight^2 = 1/|residual|
        if np.allclose(w_new, w, rtol=1e-6):
            break
        w = w_new
    alpha = a / (2 * (P - 1))
    beta = (2 * (P - 1) / P) / b if b > 0 else math.inf
    pred = a + b * n
    rel = np.abs(pred - t) / t
    return alpha, beta, pred, float(np.median(rel))


def fit_two_part(P, sizes, times, small=4096, large=1 << 20):
    """(alpha, beta) from the two ends of the sweep separately: alpha from messages of at most `small`
    bytes (their median time / 2(P-1): the bandwidth term is negligible there), beta from an ordinary
    least-squares line T = a + b n over messages of at least `large` bytes (beta = 2(P-1)/P / b).

    Why: across a network one line rarely fits 8 B to 16 MiB (eager/rendezvous switch, a shaper's token
    bucket passing medium messages at full speed), and the two ends are what a step's one big Allreduce
    (beta) and a bucket's or a small model's many small ones (alpha) cost. None when an end has no points.
    """
    n = np.asarray(sizes, float)
    t = np.asarray(times, float)
    lo, hi = n <= small, n >= large
    if not lo.any() or hi.sum() < 2:
        return None
    alpha = float(np.median(t[lo])) / (2 * (P - 1))
    b = float(np.polyfit(n[hi], t[hi], 1)[0])
    beta = (2 * (P - 1) / P) / b if b > 0 else math.inf
    return alpha, beta


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    if s < 1:
        return f"{s * 1e3:8.2f} ms"
    return f"{s:8.3f} s "


def report_predictions(alpha, beta, compute, compute_100m, dtype_bytes, out):
    print(f"\nPredicted per-step cost, ring Allreduce with alpha = {alpha * 1e6:.2f} us, "
          f"beta = {beta / 1e9:.3f} GB/s (no overlap of communication and compute):", file=out)
    if compute_100m is None:
        compute_100m = compute * MODELS[1][1] / MODELS[0][1]
        how = "scaled from --compute by the parameter count"
    else:
        how = "given"
    for (name, n_params), t_compute, note in zip(MODELS, (compute, compute_100m), ("given", how)):
        n_bytes = n_params * dtype_bytes
        print(f"\n{name}: {n_params:,} parameters x {dtype_bytes} B = {n_bytes / 1e6:.2f} MB of gradient; "
              f"compute {t_compute:.4g} s per step on one rank ({note})", file=out)
        print(f"{'ranks':>6} {'allreduce':>11} | {'strong: step':>12} {'speed-up':>9} {'efficiency':>10} | "
              f"{'weak: step':>11} {'efficiency':>10}", file=out)
        for P in RANKS:
            comm_t = predict(alpha, beta, P, n_bytes)
            strong = t_compute / P + comm_t
            weak = t_compute + comm_t
            print(f"{P:>6} {fmt_time(comm_t):>11} | {fmt_time(strong):>12} {t_compute / strong:>9.2f} "
                  f"{t_compute / (P * strong):>10.1%} | {fmt_time(weak):>11} {t_compute / weak:>10.1%}", file=out)


def main(argv=None):
    args = parse_args(argv)
    out = sys.stdout
    if (args.alpha is None) != (args.beta is None):
        print("alpha_beta: give both --alpha and --beta, or neither", file=sys.stderr)
        return 2
    if args.alpha is not None:
        report_predictions(args.alpha, args.beta, args.compute, args.compute_100m, args.dtype_bytes, out)
        return 0

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    P, rank = comm.size, comm.rank
    if P < 2:
        if rank == 0:
            print("alpha_beta: the sweep needs at least 2 ranks: mpirun -n 2 python launch/alpha_beta.py "
                  "(or give --alpha and --beta to predict only)", file=sys.stderr)
        return 2
    sizes = []
    n = max(4, args.min_bytes)
    while n <= args.max_bytes:
        sizes.append(n)
        n *= 2
    if rank == 0:
        print(f"MPI Allreduce(SUM, in place, float32) sweep on {P} ranks | {MPI.Get_library_version().splitlines()[0]}"
              f" | {len(sizes)} sizes {fmt_bytes(sizes[0])} .. {fmt_bytes(sizes[-1])}", file=out, flush=True)
    times, medians, reps = [], [], []
    for n in sizes:
        t, med, r = measure(comm, n, args.seconds_per_size, args.min_reps)
        times.append(t)
        medians.append(med)
        reps.append(r)
    if rank != 0:
        return 0
    alpha, beta, pred, med_err = fit(P, sizes, times)
    print(f"\n{'bytes':>12} {'reps':>6} {'best':>11} {'median':>11} {'ring fit':>11} {'error':>7} "
          f"{'GB/s (alg)':>10}", file=out)
    for n, r, t, med, f in zip(sizes, reps, times, medians, pred):
        print(f"{fmt_bytes(n):>12} {r:>6} {fmt_time(t):>11} {fmt_time(med):>11} {fmt_time(f):>11} "
              f"{(f - t) / t:>+7.0%} {n / t / 1e9:>10.3f}", file=out)
    worst = max(abs(f - t) / t for t, f in zip(times, pred))
    print(f"\nfit: T(n) = 2(P-1)/P * n/beta + 2(P-1)*alpha with P = {P} "
          f"(least absolute relative error over {len(sizes)} sizes)", file=out)
    print(f"alpha = {alpha * 1e6:.3f} us   beta = {beta / 1e9:.3f} GB/s   "
          f"(median relative error {med_err:.0%}, worst {worst:.0%})", file=out)
    two = fit_two_part(P, sizes, times)
    if two is not None:
        print(f"two-part: alpha = {two[0] * 1e6:.3f} us (median of the messages <= 4 KiB)   "
              f"beta = {two[1] / 1e9:.3f} GB/s (line through the messages >= 1 MiB)", file=out)
    report_predictions(alpha, beta, args.compute, args.compute_100m, args.dtype_bytes, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
