"""python -m dpbp.bench: how fast dpbp's training step is, against the GEMM bound and PyTorch.

A benchmark, not a test: it prints a table (and, with --json, one JSON object per row) and asserts
nothing. Everything it reports comes from ONE run, with the repeats of every measurement interleaved
(repeat 1 of every row, then repeat 2, ...) so that a noisy machine slows all rows alike; each row
shows the median over repeats and the min-max.

Rows, per model spec and ranks x BLAS threads:
  dpbp          ``dpbp.train.Trainer.step``, the step ``python -m dpbp.train`` runs, built from a config
                (--set overrides on the defaults, data from the built-in 'random' set)
  GEMM bound    the same step's matrix products alone (x W^T, delta^T x, delta W per layer, on the
                model's own buffers, same shapes and dtype); "of GEMM" = GEMM-bound time / step time
                (for comm.reduce = 'reproducible', the bound of its chunk-by-chunk products)
  torch         the same model, batch, dtype, threads and SGD in PyTorch (--vs-torch; DDP over gloo
                under mpirun); "vs torch" = torch step time / dpbp step time
Under ``mpirun -n P`` also, per dpbp row: the time per step spent inside the gradient reduction's MPI
calls during training (exposed, i.e. not overlapped with compute; it includes waiting for the slowest
rank), the reducer's Allreduce (with optim.shard: its reduce-scatter and the parameters' allgather) timed
alone between barriers, and a raw in-place MPI Allreduce of a
buffer of the same size and dtype; a "dpbp, watchdog on" row for the 2-2-2 and the large spec: the same
steps in PAIRS of blocks, one unwatched and one with dpbp/watchdog.py's thread running and every MPI call
armed (comm.timeout = 60 s), in alternating order; its "watchdog cost" is the median over repeats of
(watched - unwatched) per step over all pairs, which a noisy machine disturbs far less than the
difference of two rows' medians (under `mpirun -n 1` too: the same arming, no peers to wait for); plus a "rank 0 alone" row (the other ranks sleep) with as many
threads as the machine has cores, the single-process alternative to compare P ranks x 1 thread with.

Usage:
  python -m dpbp.bench [--vs-torch] [--json] [--spec NAME ...] [--config FILE ...] [--set KEY=VALUE ...]
  mpirun -n 2 python -m dpbp.bench --vs-torch
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from dpbp.cli import ArgumentParser, config_arguments, parse_args, run
from dpbp.comm import Deadline, SerialComm, armed
from dpbp.config import load_config
from dpbp.data import batch_indices, load_data
from dpbp.errors import UserError
from dpbp.progress import numpy_blas_pool
from dpbp.runs import starting_params
from dpbp.step import Trainer
from dpbp.watchdog import Watchdog

_COMMON = ["data.val_fraction=0.0", "loss.l2=0.0", "train.steps=1"]
SPECS = {  # name -> --set overrides on the defaults, and steps per timed block
    "2-2-2": (["model.sizes=[2,2,2]", "model.activation='sigmoid'", "model.output='sigmoid'",
               "loss.kind='squared_error'", "loss.reduction='sum'", "optim.lr=0.5", "optim.momentum=0.0",
               "data.name='seed'", "data.batch_size=1"], 2000),
    "64-128-64-10": (["model.sizes=[64,128,64,10]", "model.activation='sigmoid'", "model.output='sigmoid'",
                      "loss.kind='squared_error'", "model.dtype='float64'", "data.name='random'",
                      "data.batch_size=64", "optim.lr=0.1", "optim.momentum=0.9"], 300),
    "784-1024-1024-10": (["model.sizes=[784,1024,1024,10]", "model.activation='relu'", "model.output='softmax'",
                          "loss.kind='cross_entropy'", "model.dtype='float32'", "data.name='random'",
                          "data.batch_size=256", "optim.lr=0.01", "optim.momentum=0.9"], 20),
}
LARGE = "784-1024-1024-10"
WATCHED = ("2-2-2", LARGE)  # under mpirun: the step with the watchdog on, beside the "dpbp" row
WATCHED_VARIANT = "dpbp, watchdog on"
SPIN_DOWN_S = 0.5


# ---------------------------------------------------------------- rows


class Row:
    """One line of the table: a callable timed once per repeat, giving seconds per step."""

    def __init__(self, spec, ranks, threads, variant, batch, steps):
        self.spec, self.ranks, self.threads, self.variant = spec, ranks, threads, variant
        self.batch, self.steps = batch, steps
        self.step_s, self.extra = [], {}  # per repeat

    def note(self, key, value):
        self.extra.setdefault(key, []).append(value)

    def summary(self):
        med = statistics.median(self.step_s)
        out = {"spec": self.spec, "ranks": self.ranks, "threads": self.threads, "variant": self.variant,
               "batch": self.batch, "repeats": len(self.step_s),
               "step_s": {"median": med, "min": min(self.step_s), "max": max(self.step_s)},
               "samples_per_s": {"median": self.batch / med, "min": self.batch / max(self.step_s),
                                 "max": self.batch / min(self.step_s)}}
        for key, values in self.extra.items():
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        return out


class DpbpRow(Row):
    """Trainer.step on a fixed sequence of batches, from the same parameters every repeat."""

    def __init__(self, spec, cfg, comm, threads, variant, steps, data, watch_s=0.0):
        super().__init__(spec, comm.size, threads, variant, cfg["data.batch_size"], steps)
        self.comm, self.cfg = comm, cfg
        self.watch_s = watch_s  # WatchRow: the comm.timeout of its watched blocks
        self.trainer = Trainer(cfg, comm, data, threads=threads)  # the update on the row's BLAS threads too
        self.initial = starting_params(cfg)
        self.batches = [batch_indices(len(data), self.batch, cfg["seed"], s, True, False)[0]
                        for s in range(steps)]
        self.exposed = 0.0
        reducer = self.trainer.reducer
        if reducer.layer_ready is not None:  # count the bucket starts inside backward as communication too
            self._time_layer_ready(reducer)
        self.raw = np.zeros_like(reducer.result.buf) if comm.size > 1 else None

    def _time_layer_ready(self, reducer):
        inner = reducer.layer_ready

        def timed(l):
            t0 = time.perf_counter()
            inner(l)
            self.exposed += time.perf_counter() - t0
        reducer.layer_ready = timed

    def run(self, record=True):
        trainer = self.trainer
        trainer.model.load(self.initial)
        for state in trainer.opt.state().values():
            state[...] = 0
        self.comm.barrier()
        comm0, self.exposed = trainer.comm_s, 0.0
        t0 = time.perf_counter()
        for idx in self.batches:
            trainer.step(idx)
        elapsed = time.perf_counter() - t0
        if not record:
            return
        self.step_s.append(elapsed / self.steps)
        if self.raw is not None:
            self.note("exposed_comm_s", (trainer.comm_s - comm0 + self.exposed) / self.steps)
            reducer_s, raw_s = self._alone(self._reduction(), lambda: self.comm.allreduce_sum_(self.raw))
            self.note("reducer_alone_s", reducer_s)
            self.note("raw_allreduce_s", raw_s)

    def _reduction(self):
        """The step's own reduction, to time alone: the reducer's Allreduce, or with optim.shard what a sharded
        step moves instead, the gradient reduce-scattered and the updated parameters allgathered."""
        trainer = self.trainer
        if not trainer.shard:
            return trainer.reducer.allreduce

        def reduce_scatter_allgather():
            trainer.reducer.reduce_scatter(trainer.counts)
            self.comm.allgather_(trainer.model.params, trainer.counts)  # every rank's slice: the same values
        return reduce_scatter_allgather

    def _alone(self, *reductions, n=5):
        """Median seconds per call of each reduction, the calls alternating (so both see the same machine)
        and each started together on all ranks (barrier), so no rank waits for a slower one's compute."""
        times = [[] for _ in reductions]
        for _ in range(n):
            for reduce, t in zip(reductions, times):
                self.comm.barrier()
                t0 = time.perf_counter()
                reduce()
                t.append(time.perf_counter() - t0)
        return [statistics.median(t) for t in times]


class WatchRow(DpbpRow):
    """DpbpRow's steps in PAIRS of blocks, unwatched and watched (alternating which goes first); step_s is
    the watched blocks' time per step, and every repeat notes watched - unwatched per step."""

    PAIRS = 8

    def run(self, record=True):
        trainer, n = self.trainer, self.steps
        trainer.model.load(self.initial)
        cuts = [n * k // self.PAIRS for k in range(self.PAIRS + 1)]
        total, steps = {0.0: 0.0, self.watch_s: 0.0}, 0
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            half = self.batches[a:a + max(1, (b - a) // 2)]  # each half of the pair computes these steps
            times = {t: self._block(half, t) for t in ((0.0, self.watch_s) if k % 2 == 0 else (self.watch_s, 0.0))}
            for t, seconds in times.items():
                total[t] += seconds
            steps += len(half)  # at least one per pair, so not n / 2 when n < 2 PAIRS (--scale-steps)
            if record:
                self.note("watchdog_cost_s", (times[self.watch_s] - times[0.0]) / len(half))
        if record:
            self.step_s.append(total[self.watch_s] / steps)

    def _block(self, batches, timeout):
        """Seconds for the batches' steps, watched (a Watchdog with this comm.timeout; on one MPI rank
        too, where it has no peers to ask but arms the same calls) or not (timeout 0)."""
        dog = Watchdog.start(self.comm, timeout, "dpbp.bench", alone=True) if timeout else None
        self.comm.barrier()
        t0 = time.perf_counter()
        for idx in batches:
            self.trainer.step(idx)
        elapsed = time.perf_counter() - t0
        if dog is not None:
            dog.stop()
        return elapsed


class GemmRow(Row):
    """The matrix products of a DpbpRow's step, alone, on that model's buffers."""

    def __init__(self, of, variant="GEMM bound"):
        super().__init__(of.spec, of.ranks, of.threads, variant, of.batch, of.steps)
        model, pieces = of.trainer.model, of.trainer.reducer.pieces(of.batch)
        self.products = []
        for a, b in pieces:
            outs, deltas = model.buffers(b - a)
            for l in range(model.n_layers):  # forward: net = x W^T
                self.products.append((outs[l], model.weights[l].T, outs[l + 1]))
            for l in range(model.n_layers - 1, -1, -1):  # backward: delta^T x and delta W
                self.products.append((deltas[l + 1].T, outs[l], of.trainer.grads.nabla_w[l]))
                if l > 0:
                    self.products.append((deltas[l + 1], model.weights[l], deltas[l]))

    def run(self, record=True):
        products, matmul = self.products, np.matmul
        t0 = time.perf_counter()
        for _ in range(self.steps):
            for a, b, out in products:
                matmul(a, b, out=out)
        if record:
            self.step_s.append((time.perf_counter() - t0) / self.steps)


class SoloRow(Row):
    """Under mpirun: rank 0 alone runs a one-process Trainer with `threads` BLAS threads while the other
    ranks sleep (polling a non-blocking barrier every millisecond, so they leave the cores free)."""

    def __init__(self, spec, cfg, comm, threads, steps, data):
        super().__init__(spec, 1, threads, "dpbp, rank 0 alone", cfg["data.batch_size"], steps)
        self.comm = comm
        self.inner = DpbpRow(spec, cfg, SerialComm(), threads, "", steps, data) if comm.rank == 0 else None

    def run(self, record=True):
        self.comm.barrier()
        if self.inner is not None:
            self.inner.run(record)
            if record:
                self.step_s.append(self.inner.step_s[-1])
        request = self.comm.ibarrier()
        while not request.Test():
            time.sleep(0.001)


class TorchRow(Row):
    """The same model in PyTorch: Linear layers, the same activations, loss, batches and SGD."""

    def __init__(self, of, torch):
        super().__init__(of.spec, of.ranks, of.threads, "torch", of.batch, of.steps)
        self.torch, self.comm = torch, of.comm
        cfg, nn = of.cfg, torch.nn
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["model.dtype"]]
        act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "identity": nn.Identity}
        sizes = cfg["model.sizes"]
        layers = []
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, dtype=self.dtype))
            if k < len(sizes) - 2:
                layers.append(act[cfg["model.activation"]]())
        net = nn.Sequential(*layers)
        with torch.no_grad():
            for k, linear in enumerate(layers[0::2]):
                linear.weight.copy_(torch.from_numpy(of.initial[f"layers.{k}.weight"]))
                linear.bias.copy_(torch.from_numpy(of.initial[f"layers.{k}.bias"]))
        self.initial = {k: v.clone() for k, v in net.state_dict().items()}
        if of.comm.size > 1:
            net = torch.nn.parallel.DistributedDataParallel(net)
        self.net = net
        self.opt = torch.optim.SGD(net.parameters(), lr=cfg["optim.lr"], momentum=cfg["optim.momentum"])
        data = of.trainer.data
        self.x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=cfg["model.dtype"]))
        self.kind, self.output = cfg["loss.kind"], cfg["model.output"]
        self.mean = cfg["loss.reduction"] == "mean"
        if self.kind == "cross_entropy" and self.output == "softmax":
            self.y = torch.from_numpy(data.labels)
        else:
            self.y = torch.from_numpy(np.ascontiguousarray(data.t, dtype=cfg["model.dtype"]))
        pieces = [of.trainer.reducer.pieces(len(idx)) for idx in of.batches]
        self.batches = [torch.from_numpy(idx[p[0][0]:p[0][1]].copy()) for idx, p in zip(of.batches, pieces) if p]

    def loss(self, z, y):
        F = self.torch.nn.functional
        reduction = "mean" if self.mean else "sum"
        if self.kind == "cross_entropy":
            if self.output == "softmax":
                return F.cross_entropy(z, y, reduction=reduction)
            return F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
        out = {"sigmoid": self.torch.sigmoid, "identity": lambda a: a,
               "softmax": lambda a: self.torch.softmax(a, dim=1)}[self.output](z)
        E = 0.5 * ((out - y) ** 2).sum()
        return E / len(y) if self.mean else E

    def run(self, record=True):
        torch = self.torch
        torch.set_num_threads(self.threads)
        module = getattr(self.net, "module", self.net)
        module.load_state_dict(self.initial)
        self.opt.state.clear()
        self.comm.barrier()
        t0 = time.perf_counter()
        for rows in self.batches:
            self.opt.zero_grad(set_to_none=False)
            self.loss(self.net(self.x[rows]), self.y[rows]).backward()
            self.opt.step()
        if record:
            self.step_s.append((time.perf_counter() - t0) / self.steps)


# ---------------------------------------------------------------- building the run


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", action="append", default=[], choices=sorted(SPECS),
                   help="built-in model spec to run (default: all three)")
    config_arguments(p, "also benchmark the model of this config (data.name 'random' is used if it names a file)",
                     "override for every spec", many=True)
    p.add_argument("--threads", default=None,
                   help="BLAS threads per rank, comma-separated (default: 1,2 alone; cores/P under mpirun)")
    p.add_argument("--repeats", type=int, default=6, help="interleaved repeats (default 6)")
    p.add_argument("--scale-steps", type=float, default=1.0, help="multiply the steps per timed block")
    p.add_argument("--bucket-mb", type=float, default=4.0,
                   help="under mpirun, also time comm.bucket_mb=this overlap (0: skip; default 4)")
    p.add_argument("--no-reproducible", action="store_true", help="skip the comm.reduce='reproducible' row")
    p.add_argument("--features", action="store_true",
                   help="large spec: also Adam, AdamW, dropout 0.1, micro-batch 64 and (under mpirun) optim.shard rows")
    p.add_argument("--vs-torch", action="store_true", help="add PyTorch rows if torch is importable")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    return p


def specs_to_run(args):
    """[(name, make_cfg, steps)]: make_cfg(extra --set list) -> the spec's config with them applied."""
    names = args.spec or ([] if args.config else list(SPECS))
    out = []
    for name in names:
        sets, steps = SPECS[name]
        out.append((name, lambda extra, sets=sets: load_config(None, _COMMON + sets + args.set + extra), steps))
    for path in args.config:
        cfg = load_config(path, _COMMON + args.set)
        sets = _COMMON + args.set + (["data.path=''", "data.name='random'"] if cfg["data.path"] else [])
        sizes = cfg["model.sizes"]
        flops = sum(a * b for a, b in zip(sizes, sizes[1:])) * cfg["data.batch_size"]
        out.append(("-".join(map(str, sizes)), lambda extra, path=path, sets=sets: load_config(path, sets + extra),
                    max(5, min(2000, int(2e8 / max(flops, 1))))))
    return [(n, make, max(1, int(s * args.scale_steps))) for n, make, s in out]


def thread_counts(args, comm):
    if args.threads:
        try:
            counts = [int(t) for t in args.threads.split(",")]
        except ValueError:
            raise UserError(f"--threads {args.threads!r}: expected numbers like 1,2") from None
        if not counts or min(counts) < 1:
            raise UserError(f"--threads {args.threads!r}: every count must be >= 1")
        return counts
    cores = os.cpu_count() or 1
    return sorted({1, cores}) if comm.size == 1 else [max(1, cores // comm.size)]


def build_rows(args, comm, torch):
    rows = []
    cores = os.cpu_count() or 1
    for name, make_cfg, steps in specs_to_run(args):
        cfg = make_cfg([])
        data, _ = load_data(cfg)
        variants = [("dpbp", [])]
        if comm.size > 1 and args.bucket_mb > 0:
            variants.append((f"dpbp, buckets {args.bucket_mb:g} MB", [f"comm.bucket_mb={args.bucket_mb}"]))
        if name == LARGE and not args.no_reproducible:
            chunk = cfg["comm.chunk"]
            variants.append((f"dpbp, reproducible, chunk {chunk}", ["comm.reduce='reproducible'"]))
            variants.append(("dpbp, reproducible, chunk 128", ["comm.reduce='reproducible'", "comm.chunk=128"]))
        if name == LARGE and args.features:
            variants += feature_variants(comm)
        if not isinstance(comm, SerialComm) and name in WATCHED:
            variants.append((WATCHED_VARIANT, []))
        for threads in thread_counts(args, comm):
            for variant, sets in variants:
                row_cfg = make_cfg(sets)
                if variant == WATCHED_VARIANT:
                    rows.append(WatchRow(name, row_cfg, comm, threads, variant, steps, data, row_cfg["comm.timeout"]))
                    continue
                row = DpbpRow(name, row_cfg, comm, threads, variant, steps, data)
                rows.append(row)
                if "reproducible" in variant:  # its own bound: the same products, chunk by chunk
                    rows.append(GemmRow(row, "GEMM bound, " + variant.split(", ")[-1]))
                if variant == "dpbp":
                    rows.append(GemmRow(row))
                    if torch is not None and cfg["data.batch_size"] >= comm.size:  # DDP needs rows on every rank
                        rows.append(TorchRow(row, torch))
        if comm.size > 1:
            rows.append(SoloRow(name, cfg, comm, cores, steps, data))
    return rows


def feature_variants(comm):
    """The trainer features on the large spec (its "dpbp" row is SGD with momentum 0.9)."""
    adam = ["optim.kind='adam'", "optim.lr=0.001"]
    out = [("dpbp, adam", adam), ("dpbp, adamw", ["optim.kind='adamw'", "optim.lr=0.001"]),
           ("dpbp, dropout 0.1", ["model.dropout=0.1"]), ("dpbp, micro-batch 64", ["data.micro_batch=64"])]
    if comm.size > 1:
        out += [("dpbp, sgd+momentum, shard", ["optim.shard=true"]), ("dpbp, adam, shard", adam + ["optim.shard=true"])]
    return out


def import_torch(comm):
    try:
        import torch
    except ImportError:
        return None
    if comm.size > 1:
        import socket
        import torch.distributed as dist
        port = None
        if comm.rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        port = comm.bcast(port)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                                world_size=comm.size)
    return torch


def arming_ns(n=200_000, repeats=7):
    """Nanoseconds per call, medians of interleaved repeats: (a method that does nothing, the same armed
    as comm.MPIComm.watch arms a blocking MPI call): what the watchdog adds per call, without MPI's noise."""
    def nothing(*args):
        pass
    calls = {"bare": nothing, "armed": armed(nothing, Deadline(), "MPI_Nothing")}
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for kind, f in calls.items():
            t0 = time.perf_counter_ns()
            for _ in range(n):
                f()
            times[kind].append((time.perf_counter_ns() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- output


def machine_lines(comm, torch):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    pool = numpy_blas_pool()
    blas = "BLAS unknown (threadpoolctl missing)" if pool is None else (
        f"{pool.get('internal_api')} {pool.get('version')} kernel {pool.get('architecture')} "
        f"({pool.get('threading_layer')})")
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ)
    load = "load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return [f"machine: {cpu}, {os.cpu_count()} cores, {load} | python {platform.python_version()}, "
            f"numpy {np.__version__}, "
            f"{blas}{' | ' + env if env else ''}",
            f"MPI: {comm.library}, {comm.size} rank(s)"
            + (f" | torch {torch.__version__}" if torch is not None else " | torch: not importable")]


def fmt_rate(s):
    m = s["samples_per_s"]
    return f"{m['median']:,.0f} ({m['min']:,.0f}-{m['max']:,.0f})"


def fmt_time(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def relate(summaries):
    """Add 'of_gemm' and 'vs_torch' to the dpbp rows (ratios of medians within spec, ranks, threads)."""
    by = {}
    for s in summaries:
        by.setdefault((s["spec"], s["ranks"], s["threads"]), {})[s["variant"]] = s["step_s"]["median"]
    for s in summaries:
        group = by[(s["spec"], s["ranks"], s["threads"])]
        if s["variant"].startswith("dpbp"):
            bound = group.get("GEMM bound, " + s["variant"].split(", ")[-1], group.get("GEMM bound"))
            if bound:
                s["of_gemm"] = bound / s["step_s"]["median"]
            if "torch" in group:
                s["vs_torch"] = group["torch"] / s["step_s"]["median"]
        if s["variant"] == WATCHED_VARIANT:
            unwatched = s["step_s"]["median"] - s["watchdog_cost_s"]["median"]
            s["watchdog_cost"] = s["watchdog_cost_s"]["median"] / unwatched
        if s["variant"] == "dpbp" and s["ranks"] > 1:
            solo = by.get((s["spec"], 1, os.cpu_count() or 1), {}).get("dpbp, rank 0 alone")
            if solo:
                s["vs_rank0_alone"] = solo / s["step_s"]["median"]
    return summaries


def table(summaries):
    head = ["spec", "PxT", "variant", "samples/s median (min-max)", "step", "of GEMM", "vs torch",
            "vs 1 proc", "exposed comm", "reducer alone", "raw Allreduce", "watchdog cost"]
    lines = []
    for s in summaries:
        ms = lambda key: fmt_time(s[key]["median"]) if key in s else ""  # noqa: E731
        lines.append([s["spec"], f"{s['ranks']}x{s['threads']}", s["variant"], fmt_rate(s),
                      fmt_time(s["step_s"]["median"]),
                      f"{100 * s['of_gemm']:.0f}%" if "of_gemm" in s else "",
                      f"{s['vs_torch']:.2f}x" if "vs_torch" in s else "",
                      f"{100 * s['vs_rank0_alone']:.0f}%" if "vs_rank0_alone" in s else "",
                      ms("exposed_comm_s"), ms("reducer_alone_s"), ms("raw_allreduce_s"),
                      f"{s['watchdog_cost_s']['median'] * 1e6:+.2f} us ({100 * s['watchdog_cost']:+.2f}%)"
                      if "watchdog_cost" in s else ""])
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines]


# ---------------------------------------------------------------- main


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise UserError("the benchmark needs threadpoolctl to set BLAS threads: pip install threadpoolctl") from None
    torch = import_torch(comm) if args.vs_torch else None
    rows = build_rows(args, comm, torch)
    say = (lambda *a: print(*a, flush=True)) if comm.rank == 0 else (lambda *a: None)
    if not args.json:
        for line in machine_lines(comm, torch):
            say(line)
        if args.vs_torch and torch is None:
            say("(--vs-torch: torch is not importable; its rows are left out)")
        say(f"{len(rows)} rows x {args.repeats} interleaved repeats ...")
    threads_before = None
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (buffers, BLAS threads, caches)
        for row in rows:
            if threads_before is not None and row.threads < threads_before:
                # OpenBLAS's workers spin for a while after their last parallel call: without a pause they
                # would take a core from the next row's ranks (the first row after the 2-thread "rank 0
                # alone" row measured 20-25% slower than the same config in a later row).
                time.sleep(SPIN_DOWN_S)
            threads_before = row.threads
            with threadpool_limits(limits=row.threads, user_api="blas"):
                row.run(record=repeat > 0)
    summaries = relate([row.summary() for row in rows if row.step_s])
    rss = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.json:
        for s in summaries:
            say(json.dumps(s))
        say(json.dumps({"peak_rss_mb_per_rank": rss}))
    else:
        for line in table(summaries):
            say(line)
        ns = arming_ns()
        say(f"watchdog: arming adds {ns['armed'] - ns['bare']:.0f} ns to each blocking MPI call (median, a call "
            f"doing nothing: {ns['bare']:.0f} ns bare); a fast-mode step makes one, unwatched ones none")
        if hasattr(os, "getloadavg"):
            say("load average at the end: %.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg())
        say("peak RSS of this benchmark process per rank (all rows together): "
            + ", ".join(f"{r:.0f} MB" for r in rss))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.bench"))
