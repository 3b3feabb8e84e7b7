"""python -m dpbp.train: data-parallel training from a config, alone or under mpirun.

One step, on every rank:
    this rank's share of the global batch -> model.forward -> model.backward (sums of dE_n/dw)
    -> ONE in-place Allreduce of [gradient | loss | correct | stop flag]   (reduce.py)
    -> /global batch (mean) + lambda W, once                               (losses.finish_gradient)
    -> the identical SGD update                                            (optim.py)
Exact because E_total = sum_n E_n, so dE_total/dw = sum_n dE_n/dw: partial sums add up to the gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib

import numpy as np

from dpbp import __version__
from dpbp import checkpoint as ckpt
from dpbp.cli import ArgumentParser, parse_args, run
from dpbp.config import load_config, to_toml, trajectory_hash, trajectory_items
from dpbp.data import batch_indices, batches_per_epoch, epoch_order, epoch_position, load_data
from dpbp.errors import EXIT_PREEMPTED, TrainingFault, UserError
from dpbp.faults import FaultInjector, StopRequest, replica_mismatch
from dpbp.losses import finish_gradient, l2_penalty
from dpbp.model import MLP, count_params, initial_params, param_names, param_shapes
from dpbp.optim import SGD
from dpbp.progress import Progress
from dpbp.partition import chunk_pieces
from dpbp.reduce import make_reducer

LOSS, CORRECT, STOP = 0, 1, 2  # statistics that ride the gradient's Allreduce, after the gradient
N_STATS = 3
EVAL_CHUNK = 256


# ---------------------------------------------------------------- the training step


class Trainer:
    """Model + reducer + optimizer for one config; ``step`` is the code path every tool measures."""

    def __init__(self, cfg, comm, data):
        self.cfg, self.comm, self.data = cfg, comm, data
        sizes = cfg["model.sizes"]
        ends = np.cumsum([int(np.prod(s)) for s in param_shapes(sizes)]).tolist()
        n = ends[-1]
        bounds = list(zip([0] + ends[:-1], ends))  # each tensor's slice of the flat buffer, in model order
        bounds.append((n + LOSS, n + LOSS + 1))  # the loss needs a scale; counts and flags are exact
        self.reducer = make_reducer(cfg["comm.reduce"], comm, n + N_STATS, cfg["model.dtype"], bounds,
                                    cfg["comm.chunk"])
        self.buf = self.reducer.buf
        self.stats = self.buf[n:]
        self.model = MLP(sizes, cfg["model.activation"], cfg["model.output"], cfg["loss.kind"],
                         cfg["model.dtype"], grad=self.buf[:n])
        self.opt = SGD(self.model.params, cfg["optim.lr"], cfg["optim.momentum"])
        self.divisor_mean = cfg["loss.reduction"] == "mean"
        self.comm_s = 0.0  # seconds inside the gradient Allreduce, accumulated
        self._init_fast_path(cfg, bounds, n)

    def _init_fast_path(self, cfg, bounds, n):
        """Buffers and hooks that keep a step free of allocations proportional to the model."""
        model, x = self.model, self.data.x
        # Rows are gathered straight into the model's input buffer, or staged when the data's dtype differs.
        self._stage = None if x.dtype == model.dtype else np.empty((0, x.shape[1]), x.dtype)
        self._l2_scratch = np.empty(max(W.size for W in model.weights), model.dtype) if cfg["loss.l2"] else None
        self._ready = None
        if cfg["comm.bucket_mb"] and self.comm.size > 1 and hasattr(self.reducer, "use_buckets"):
            layer_starts = [lo for lo, _ in bounds[0:2 * model.n_layers:2]]
            self.reducer.use_buckets(layer_starts, n, cfg["comm.bucket_mb"] * 2**20)
            self._ready = lambda l: self.reducer.grad_ready(layer_starts[l])

    def _inputs(self, rows):
        """The model's input buffer holding data.x[rows], filled without temporaries."""
        x = self.model.input_buffer(len(rows))
        if self._stage is None:
            np.take(self.data.x, rows, axis=0, out=x, mode="clip")  # "clip": "raise" would buffer a copy
        else:
            if len(self._stage) < len(rows):
                self._stage = np.empty((len(rows), x.shape[1]), self._stage.dtype)
            stage = self._stage[:len(rows)]
            np.take(self.data.x, rows, axis=0, out=stage, mode="clip")
            np.copyto(x, stage)
        return x

    def gradient(self, idx, stop=0.0):
        """All ranks: the full-batch gradient of the regularised error for global indices idx.

        Leaves it in model.grad (views nabla_w, nabla_b) and returns the reduced statistics
        (loss sum, correct count, stop flags summed over ranks).
        """
        model, data, reducer, n = self.model, self.data, self.reducer, self.model.n_params
        B = len(idx)
        scale = 1.0 / B if self.divisor_mean else 1.0  # 1/(global B) rides delta^(L): see MLP.backward
        reducer.begin(B)
        for i, (a, b) in enumerate(reducer.pieces(B)):
            piece = reducer.piece_buffer(i)  # [gradient | statistics] of this piece
            if piece is not self.buf:
                model.bind_grad(piece[:n])
            rows = idx[a:b]
            out = model.forward(self._inputs(rows))
            t, labels = data.targets(rows)  # from a data file: reads only these rows
            piece[n + LOSS] = model.backward(t, scale, self._ready)
            piece[n + CORRECT] = np.count_nonzero(out.argmax(axis=1) == labels) if labels is not None else 0
            if piece is not self.buf:
                model.bind_grad(self.buf[:n])  # the reduced gradient ends up in self.buf
            reducer.add_piece(i)
        stats = self.stats
        stats[STOP] = stop
        t0 = time.perf_counter()
        reducer.allreduce()
        self.comm_s += time.perf_counter() - t0
        l2 = self.cfg["loss.l2"]
        if l2:
            finish_gradient(model.nabla_w, model.nabla_b, model.weights, l2, 1, self._l2_scratch)
        return stats.astype(np.float64)

    def loss_value(self, stats, batch_size):
        """E of the batch as reported: data term (/B for mean) + lambda/2 sum ||W||^2 (before the update)."""
        divisor = batch_size if self.divisor_mean else 1
        return stats[LOSS] / divisor + self._penalty

    def step(self, idx, stop=0.0):
        """One SGD step on global indices idx; returns the reduced statistics."""
        self._penalty = l2_penalty(self.model.weights, self.cfg["loss.l2"])
        stats = self.gradient(idx, stop)
        self.opt.step(self.model.grad)
        return stats

    def first_nonfinite(self):
        for name, g in self.model.tensors(self.model.grad).items():
            if not np.isfinite(g).all():
                return name
        return None


def evaluate(model, data, comm, confusion=None):
    """(loss sum, correct, count) over data, split across ranks by fixed chunks and combined in chunk
    order, so the figures are the same bit for bit whatever the number of ranks.

    confusion: an optional (classes, classes) int64 array; counts [true label, predicted class] are
    added to it, summed over ranks (exact, integers). Every rank must pass one or none.
    """
    mine = []
    delta = None
    for a, b in chunk_pieces(len(data), EVAL_CHUNK, comm.rank, comm.size):
        rows = slice(a, b)
        x, t, labels = data.batch(rows)
        out = model.forward(x)
        if delta is None or len(delta) < len(out):
            delta = np.empty_like(out, shape=(EVAL_CHUNK, out.shape[1]))
        E = model.loss(out, t, delta[:len(out)], model.output)
        predicted = out.argmax(axis=1)
        correct = int(np.count_nonzero(predicted == labels)) if labels is not None else 0
        if confusion is not None and labels is not None:
            np.add.at(confusion, (labels, predicted), 1)
        mine.append((E, correct))
    per_chunk = [item for part in comm.allgather(mine) for item in part]
    if confusion is not None:
        comm.allreduce_sum_(confusion)
    loss_sum = math.fsum(e for e, _ in per_chunk) if per_chunk else 0.0
    return loss_sum, sum(c for _, c in per_chunk), len(data)


# ---------------------------------------------------------------- the command


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.train",
                       description="Train an MLP with data-parallel backprop (alone or under mpirun).")
    p.add_argument("--config", help="TOML file overriding the defaults (default job: digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, value in TOML syntax, e.g. --set model.sizes=[64,32,10]")
    p.add_argument("--out", help="output directory (default: runs/<config name>-<time>)")
    p.add_argument("--init", metavar="PARAMS.npz", help="initial parameters (layers.{k}.weight/bias)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--force", action="store_true", help="resume even if the config changes the trajectory")
    p.add_argument("--quiet", action="store_true", help="print only the summary and errors")
    p.add_argument("--verbose", action="store_true",
                   help="also print the resolved config, and a line (and a metrics record) every step")
    return p


def choose_run_dir(args, comm):
    """Rank 0 picks the directory (and checks it); every rank learns the answer."""
    error, run_dir = None, None
    if comm.rank == 0:
        if args.resume:
            run_dir = args.resume
        elif args.out:
            run_dir = args.out
            if ckpt.list_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, "final.npz")):
                error = (f"--out {run_dir!r} already holds a run; continue it with --resume {run_dir} "
                         f"or choose another directory")
        else:
            stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
            base = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir, k = base, 1
            while os.path.exists(run_dir):
                run_dir, k = f"{base}-{k}", k + 1
        if error is None:
            try:  # here, so that an unusable directory is one clear message rather than a crash later
                os.makedirs(run_dir, exist_ok=True)
                if not os.access(run_dir, os.W_OK):
                    error = f"output directory {run_dir!r} is not writable"
            except OSError as e:
                error = f"cannot use {run_dir!r} as the output directory: {e.strerror or e}"
    error, run_dir = comm.bcast((error, run_dir))
    if error:
        raise UserError(error)
    return run_dir


def total_steps(cfg, n_train):
    if cfg["train.steps"]:
        return cfg["train.steps"]
    return cfg["train.epochs"] * batches_per_epoch(n_train, cfg["data.batch_size"], cfg["data.drop_last"])


def starting_params(cfg, init_path=None):
    """{name: float64 array}: the --init file's, else the seeded initialisation (the tutorial's weights
    for its 2-2-2 example). Shared with dpbp.verify."""
    if init_path:
        return ckpt.load_params(init_path, param_names(len(cfg["model.sizes"]) - 1),
                                param_shapes(cfg["model.sizes"]))
    seed_example = cfg["data.name"] == "seed" and cfg["model.sizes"] == [2, 2, 2] and not cfg["data.path"]
    return initial_params(cfg["model.sizes"], cfg["model.activation"], cfg["seed"],
                          "seed_example" if seed_example else "auto")


def check_memory(cfg, n_train, size):
    """UserError if one rank's buffers cannot fit in this machine's memory (a typo in model.sizes or
    data.batch_size), rather than a MemoryError halfway through setting up."""
    sizes, itemsize = cfg["model.sizes"], np.dtype(cfg["model.dtype"]).itemsize
    n_params = count_params(sizes)
    rows = -(-min(cfg["data.batch_size"], n_train) // size)
    if cfg["comm.reduce"] == "reproducible":
        rows = min(rows, cfg["comm.chunk"])
    need = 4 * n_params * 8 + 2 * rows * sum(sizes) * itemsize  # params, gradient, momentum, reduce buffers
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise UserError(f"model.sizes = {sizes} with data.batch_size = {cfg['data.batch_size']} needs about "
                        f"{need / 2**30:.3g} GiB per rank; this machine has {have / 2**30:.3g} GiB")


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    stop = StopRequest()  # from the start: a signal during setup still ends in a checkpoint, not a kill
    faults = FaultInjector(comm.rank)
    expected = os.environ.get("DPBP_EXPECT_WORLD_SIZE")
    if expected and expected.isdigit() and int(expected) != comm.size:
        raise UserError(f"MPI world size is {comm.size} but {expected} ranks were expected "
                        f"(DPBP_EXPECT_WORLD_SIZE); is the launcher using the right MPI?")
    config_path = args.config
    if args.resume and not config_path:
        config_path = os.path.join(args.resume, "config.toml")
        if not os.path.exists(config_path):
            config_path = None  # an empty run directory: start fresh there with the defaults
    cfg = load_config(config_path, args.set)
    train_data, val_data = load_data(cfg, comm)  # collective: ranks agree on bad data, scan it in shares
    if train_data.classes:  # the run keeps its class names: evaluate and predict read them from config.toml
        cfg["data.classes"] = list(train_data.classes)
    idle_ranks = len(train_data) < comm.size
    if idle_ranks and cfg["data.path"]:
        raise UserError(f"{train_data.source}: {len(train_data)} training samples for {comm.size} ranks; "
                        f"every rank needs at least one")
    check_memory(cfg, len(train_data), comm.size)
    init = starting_params(cfg, args.init)

    run_dir = choose_run_dir(args, comm)  # the first collective: everything above fails alike everywhere
    trainer = Trainer(cfg, comm, train_data)
    model = trainer.model
    model.load(init)

    start = 0
    resumed_from = None
    if args.resume:
        start, resumed_from = resume(args, cfg, comm, trainer)
        if comm.rank == 0:
            trim_metrics(run_dir, start)
    progress = Progress(comm, run_dir, quiet=args.quiet, verbose=args.verbose, resume=resumed_from is not None)
    if comm.rank == 0:
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
    mismatch = replica_mismatch(comm, model.params)
    if mismatch:
        raise TrainingFault(f"ranks start from different parameters: {mismatch}")

    steps = total_steps(cfg, len(train_data))
    B, P = cfg["data.batch_size"], comm.size
    progress.start(cfg, model, train_data, val_data, steps, start, resumed_from)
    for text in train_data.warnings:
        progress.warn(text)
    if idle_ranks:  # harmless (an empty share adds zeros) and how the one-sample seed demo runs on 4 ranks
        progress.warn(f"{len(train_data)} training samples for {comm.size} ranks: some ranks stay idle")
    n_chunks = -(-min(B, len(train_data)) // cfg["comm.chunk"])
    if cfg["comm.reduce"] == "reproducible" and n_chunks < P and not idle_ranks:
        progress.warn(f"comm.reduce = 'reproducible' cuts each batch into {n_chunks} chunk(s) of comm.chunk = "
                      f"{cfg['comm.chunk']} samples and never splits a chunk: {P - n_chunks} of {P} ranks stay idle"
                      + (f" (comm.chunk <= {B // P} would use them all)" if B >= P else ""))
    t_start = time.perf_counter()
    t_last, comm_last, samples_last = t_start, 0.0, 0
    loss_acc = correct_acc = seen_acc = 0.0
    step = start
    n = len(train_data)
    val_rec = None  # the newest held-out evaluation
    try:
        while step < steps:
            idx, epoch = batch_indices(n, B, cfg["seed"], step, cfg["data.shuffle"], cfg["data.drop_last"])
            faults.before_step(step, trainer)
            stats = trainer.step(idx, stop.flag)
            loss = trainer.loss_value(stats, len(idx))
            if not math.isfinite(loss) or not all_finite(model.grad):
                where = trainer.first_nonfinite() or "the loss"
                raise TrainingFault(f"non-finite values at step {step + 1}: first in {where}; the newest "
                                    f"checkpoint in {run_dir} is the last good one")
            step += 1
            loss_acc += loss * len(idx)
            correct_acc += stats[CORRECT]
            seen_acc += len(idx)
            samples_last += len(idx)
            progress.tick(step, len(idx))
            ce, every = cfg["train.checkpoint_every"], cfg["train.check_replicas_every"]
            checkpoint_due = (ce and step % ce == 0) or step == steps or stats[STOP] > 0
            if every and (step % every == 0 or checkpoint_due):  # so no checkpoint holds a diverged replica
                check_replicas(comm, model, step)
            if stats[STOP] > 0 and step < steps:  # at the last step, finishing is quicker than a requeue
                save_checkpoint(comm, trainer, run_dir, step)
                # No rank exits before rank 0's checkpoint is on disk: a launcher that kills the job on
                # the first non-zero exit (Slurm's KillOnBadExit) must not cut the write short.
                comm.barrier()
                progress.say(f"stop requested by a signal: checkpoint at step {step} written to {run_dir}; "
                             f"exiting with status {EXIT_PREEMPTED} so the job can be requeued", always=True)
                return EXIT_PREEMPTED
            if step % cfg["train.log_every"] == 0 or step == steps or args.verbose:
                now = time.perf_counter()
                rec = {"step": step, "epoch": epoch, "loss": loss_acc / seen_acc,
                       "samples_per_s": samples_last / (now - t_last),
                       "comm_s": trainer.comm_s - comm_last, "step_s": now - t_last,
                       "time": now - t_start}
                if train_data.labels is not None:
                    rec["accuracy"] = correct_acc / seen_acc
                progress.record(rec)
                t_last, comm_last, samples_last = now, trainer.comm_s, 0
                loss_acc = correct_acc = seen_acc = 0.0
            if val_data is not None and ((cfg["train.eval_every"] and step % cfg["train.eval_every"] == 0)
                                         or step == steps):
                val_rec = eval_record(trainer, val_data, comm, step, epoch)
                progress.record(val_rec)
            if checkpoint_due:
                save_checkpoint(comm, trainer, run_dir, step)
    finally:
        progress.close()
    wall = time.perf_counter() - t_start
    final = os.path.join(run_dir, "final.npz")
    if comm.rank == 0:
        ckpt.save(final, {**params_dict(model), **standardize_arrays(train_data)},
                  {"step": step, "dpbp": __version__})
    if val_data is not None and (val_rec is None or val_rec["step"] != step):  # e.g. resumed at the end
        val_rec = eval_record(trainer, val_data, comm, step, None)
    progress.summary(step - start, step, wall, val_rec, final)
    return 0


def eval_record(trainer, data, comm, step, epoch):
    return {"step": step, "epoch": epoch, "split": "val", **held_out(trainer.model, trainer.cfg, data, comm)}


def held_out(model, cfg, data, comm, confusion=None):
    """{"loss", "accuracy" for labels} on data: the data term (/count for mean) + the l2 penalty, as
    the training loss is reported. Collective (see evaluate); dpbp.evaluate prints the same figures."""
    loss_sum, correct, count = evaluate(model, data, comm, confusion)
    rec = {"loss": (loss_sum / count if cfg["loss.reduction"] == "mean" else loss_sum)
           + l2_penalty(model.weights, cfg["loss.l2"])}
    if data.labels is not None:
        rec["accuracy"] = correct / count
    return rec


def all_finite(a):
    """Cheap test first (one BLAS dot, no temporary); the exact test only if it overflows."""
    return math.isfinite(float(np.dot(a, a))) or bool(np.isfinite(a).all())


def check_replicas(comm, model, step):
    mismatch = replica_mismatch(comm, model.params)
    if mismatch:
        raise TrainingFault(f"replica check at step {step}: ranks hold different parameters: {mismatch}")


def params_dict(model):
    return {name: v.copy() for name, v in model.tensors().items()}


def standardize_arrays(data):
    """{"standardize.mean", "standardize.std"} of a data.standardize run, saved beside its parameters."""
    return {} if data.standardize is None else data.standardize.to_arrays()


# ---------------------------------------------------------------- checkpoints and resume

DATA_KEY = "data (contents, sha256)"  # a trajectory key that no config option holds


def data_digest(data):
    """SHA-256 (16 hex digits) of the training inputs and targets, computed once per run."""
    if getattr(data, "_digest", None) is None:
        h = hashlib.sha256()
        data.update_hash(h)  # chunk by chunk: a data file is never held whole
        data._digest = h.hexdigest()[:16]
    return data._digest


def run_trajectory(cfg, data):
    """Everything that decides the numbers a run computes: trajectory config keys and the data."""
    return {**trajectory_items(cfg), DATA_KEY: data_digest(data)}


def sampler_check(cfg, n, epoch):
    """CRC-32 of the epoch's permutation: proves on resume that the sampler still draws the same order."""
    return zlib.crc32(epoch_order(n, cfg["seed"], epoch, cfg["data.shuffle"]).astype(np.int64))


def save_checkpoint(comm, trainer, run_dir, step):
    """Rank 0: parameters, momentum and counters, atomically; the random state is (seed, epoch, position)
    because the sampler is a pure function of them and there is no other randomness after step 0."""
    if comm.rank != 0:
        return
    cfg, n = trainer.cfg, len(trainer.data)
    epoch, position = epoch_position(n, cfg["data.batch_size"], step, cfg["data.drop_last"])
    arrays = {**params_dict(trainer.model), **standardize_arrays(trainer.data)}
    for name, value in trainer.opt.state().items():
        arrays[f"optim.{name}"] = value.copy()
    meta = {"step": step, "epoch": epoch, "position_in_epoch": position,
            "rng": {"sampler": "permutation of the epoch from default_rng([seed, epoch])", "seed": cfg["seed"],
                    "epoch_order_crc32": sampler_check(cfg, n, epoch)},
            "trajectory": run_trajectory(cfg, trainer.data), "trajectory_hash": trajectory_hash(cfg),
            "config": to_toml(cfg), "world_size": comm.size, "comm.reduce": cfg["comm.reduce"],
            "dpbp": __version__, "numpy": np.__version__}
    ckpt.save(ckpt.checkpoint_path(run_dir, step), arrays, meta)
    ckpt.prune(run_dir, cfg["train.keep_checkpoints"])


def warn(text):
    print(f"dpbp.train: warning: {text}", file=sys.stderr, flush=True)


def resume(args, cfg, comm, trainer):
    """Continue from the newest valid checkpoint in args.resume; returns (step, path), or (0, None)
    when there is none yet (a fresh start there). Rank 0 reads and checks; every rank gets the result."""
    found = error = None
    if comm.rank == 0:
        try:
            found = ckpt.newest_valid(args.resume, warn, max_bytes=16 * trainer.model.params.nbytes + (64 << 20))
            if found is not None:
                error = resume_problem(found, args.force, comm.size, trainer)
        except UserError as e:
            error = str(e)
    found, error = comm.bcast((None if error else found, error))
    if error:
        raise UserError(error)
    if found is None:
        return 0, None
    arrays, meta, path = found
    trainer.model.load({k: arrays[k] for k in trainer.model.names})
    trainer.opt.load_state({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
    return meta["step"], path


def resume_problem(found, force, world_size, trainer):
    """Rank 0: why this checkpoint cannot continue this run (None if it can); warns about the rest."""
    arrays, meta, path = found
    cfg, model = trainer.cfg, trainer.model
    saved, now = meta.get("trajectory", {}), run_trajectory(cfg, trainer.data)
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if not differing and meta.get("rng", {}).get("epoch_order_crc32") != sampler_check(
            cfg, len(trainer.data), meta.get("epoch", 0)):
        differing = ["sampler (the epoch's permutation; another numpy version?)"]
    if differing:
        detail = "; ".join(f"{k}: {saved.get(k, '?')!r} -> {now.get(k, '?')!r}" for k in differing)
        if not force:
            return (f"cannot resume from {path}: the config changes the trajectory ({detail}); "
                    f"pass --force to resume anyway")
        warn(f"--force: resuming from {path} although the trajectory changes ({detail})")
    for name, shape in zip(model.names, model.shapes):
        if name not in arrays or arrays[name].shape != tuple(shape):
            got = arrays[name].shape if name in arrays else "nothing"
            return f"{path}: does not fit this model: {name} is {got}, the model needs {tuple(shape)}"
    velocity = trainer.opt.state().get("velocity")
    if velocity is not None and arrays.get("optim.velocity", np.empty(0)).shape != velocity.shape:
        if not force:
            return f"{path}: holds no momentum for this model (optim.velocity); pass --force to start it at zero"
        arrays["optim.velocity"] = np.zeros_like(velocity)
    if meta.get("world_size") != world_size and cfg["comm.reduce"] == "fast":
        warn(f"resuming a {meta.get('world_size')}-rank run on {world_size} ranks with comm.reduce = 'fast': "
             f"results differ from an uninterrupted run by rounding; 'reproducible' makes them bitwise equal")
    elif meta.get("comm.reduce", cfg["comm.reduce"]) != cfg["comm.reduce"]:
        warn(f"comm.reduce was {meta.get('comm.reduce')!r} and is now {cfg['comm.reduce']!r}: results differ "
             f"from an uninterrupted run by rounding")
    return None


def trim_metrics(run_dir, step):
    """Rank 0: drop metrics.jsonl records past `step` (written after the checkpoint the run resumes from,
    or cut short by a kill), so the file reads as one run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.train"))
