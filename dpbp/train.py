"""python -m dpbp.train: data-parallel training from a config, alone or under mpirun.

One step, on every rank:
    this rank's share of the global batch -> model.forward -> model.backward (sums of dE_n/dw)
    -> ONE in-place Allreduce of [gradient | loss | correct | stop flag]   (reduce.py)
    -> /global batch (mean) + lambda W, once                               (losses.finish_gradient)
    -> the identical SGD update                                            (optim.py)
Exact because E_total = sum_n E_n, so dE_total/dw = sum_n dE_n/dw: partial sums add up to the gradient.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import zlib

import numpy as np

from dpbp import __version__
from dpbp import checkpoint as ckpt
from dpbp.cli import ArgumentParser, agree, parse_args, run
from dpbp.config import load_config, to_toml, trajectory_items
from dpbp.data import batch_indices, batches_per_epoch, load_data
from dpbp.errors import EXIT_PREEMPTED, TrainingFault, UserError
from dpbp.losses import finish_gradient, l2_penalty
from dpbp.model import MLP, initial_params
from dpbp.optim import SGD
from dpbp.progress import Progress
from dpbp.reduce import make_reducer, share

LOSS, CORRECT, STOP = 0, 1, 2  # statistics that ride the gradient's Allreduce, after the gradient
N_STATS = 3
EVAL_CHUNK = 256


# ---------------------------------------------------------------- the training step


class Trainer:
    """Model + reducer + optimizer for one config; ``step`` is the code path every tool measures."""

    def __init__(self, cfg, comm, data):
        self.cfg, self.comm, self.data = cfg, comm, data
        sizes = cfg["model.sizes"]
        n = sum(int(np.prod(s)) for s in _shapes(sizes))
        bounds, offset = [], 0
        for s in _shapes(sizes):
            size = int(np.prod(s))
            bounds.append((offset, offset + size))
            offset += size
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

    def gradient(self, idx, stop=0.0):
        """All ranks: the full-batch gradient of the regularised error for global indices idx.

        Leaves it in model.grad (views nabla_w, nabla_b) and returns the reduced statistics
        (loss sum, correct count, stop flags summed over ranks).
        """
        model, data, reducer = self.model, self.data, self.reducer
        reducer.begin(len(idx))
        for i, (a, b) in enumerate(reducer.pieces(len(idx))):
            rows = idx[a:b]
            out = model.forward(data.x[rows])
            self.stats[LOSS] = model.backward(data.t[rows])
            self.stats[CORRECT] = (np.count_nonzero(out.argmax(axis=1) == data.labels[rows])
                                   if data.labels is not None else 0)
            reducer.add_piece(i)
        self.stats[STOP] = stop
        t0 = time.perf_counter()
        reducer.allreduce()
        self.comm_s += time.perf_counter() - t0
        divisor = len(idx) if self.divisor_mean else 1
        finish_gradient(model.nabla_w, model.nabla_b, model.weights, self.cfg["loss.l2"], divisor)
        return self.stats.astype(np.float64)

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


def _shapes(sizes):
    from dpbp.model import param_shapes
    return param_shapes(sizes)


def evaluate(model, data, comm):
    """(loss sum, correct, count) over data, split across ranks by fixed chunks and combined in chunk
    order, so the figures are the same bit for bit whatever the number of ranks."""
    n_chunks = -(-len(data) // EVAL_CHUNK)
    first, last = share(n_chunks, comm.rank, comm.size)
    mine = []
    delta = None
    for c in range(first, last):
        rows = slice(c * EVAL_CHUNK, min((c + 1) * EVAL_CHUNK, len(data)))
        out = model.forward(data.x[rows])
        if delta is None or len(delta) < len(out):
            delta = np.empty_like(out, shape=(EVAL_CHUNK, out.shape[1]))
        E = model.loss(out, data.t[rows], delta[:len(out)], model.output)
        correct = (int(np.count_nonzero(out.argmax(axis=1) == data.labels[rows]))
                   if data.labels is not None else 0)
        mine.append((E, correct))
    per_chunk = [item for part in comm.allgather(mine) for item in part]
    loss_sum = math.fsum(e for e, _ in per_chunk) if per_chunk else 0.0
    return loss_sum, sum(c for _, c in per_chunk), len(data)


# ---------------------------------------------------------------- signals and test hooks


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; ranks agree on it through the next step's Allreduce."""

    def __init__(self):
        self.flag = 0.0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # idempotent: a rank may get SIGTERM twice under mpirun
        self.flag = 1.0


def inject_fault(rank, step):
    """Test hook: DPBP_FAULT="raise:RANK:STEP" or "kill:RANK:STEP"; DPBP_STEP_SLEEP=seconds."""
    spec = os.environ.get("DPBP_FAULT")
    if spec:
        what, r, s = spec.split(":")
        if int(r) == rank and int(s) == step:
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "nan":
                raise FloatingPointError("injected")
            raise RuntimeError(f"injected fault at step {step}")
    sleep = os.environ.get("DPBP_STEP_SLEEP")
    if sleep:
        time.sleep(float(sleep))


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
    error, run_dir = comm.bcast((error, run_dir))
    if error:
        raise UserError(error)
    return run_dir


def total_steps(cfg, n_train):
    if cfg["train.steps"]:
        return cfg["train.steps"]
    return cfg["train.epochs"] * batches_per_epoch(n_train, cfg["data.batch_size"], cfg["data.drop_last"])


def params_checksum(params):
    return zlib.crc32(params.tobytes())


def starting_params(cfg, init_path=None):
    """{name: float64 array}: the --init file's, else the seeded initialisation (the tutorial's weights
    for its 2-2-2 example). Shared with dpbp.verify."""
    if init_path:
        from dpbp.model import param_names, param_shapes
        return ckpt.load_params(init_path, param_names(len(cfg["model.sizes"]) - 1),
                                param_shapes(cfg["model.sizes"]))
    seed_example = cfg["data.name"] == "seed" and cfg["model.sizes"] == [2, 2, 2] and not cfg["data.path"]
    return initial_params(cfg["model.sizes"], cfg["model.activation"], cfg["seed"],
                          "seed_example" if seed_example else "auto")


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
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
    train_data, val_data = load_data(cfg)
    idle_ranks = len(train_data) < comm.size
    if idle_ranks and cfg["data.path"]:
        raise UserError(f"{train_data.source}: {len(train_data)} training samples for {comm.size} ranks; "
                        f"every rank needs at least one")
    init = starting_params(cfg, args.init)

    run_dir = choose_run_dir(args, comm)  # the first collective: everything above fails alike everywhere
    trainer = Trainer(cfg, comm, train_data)
    model = trainer.model
    model.load(init)

    start = 0
    resumed_from = None
    if args.resume:
        start, resumed_from = resume(args, cfg, comm, trainer)
    progress = Progress(comm, run_dir, quiet=args.quiet, verbose=args.verbose, resume=resumed_from is not None)
    if comm.rank == 0:
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
    if not same_params(comm, model):
        raise TrainingFault("ranks start from different parameters")

    steps = total_steps(cfg, len(train_data))
    B, P = cfg["data.batch_size"], comm.size
    progress.start(cfg, model, train_data, val_data, steps, start, resumed_from)
    if idle_ranks:  # harmless (an empty share adds zeros) and how the one-sample seed demo runs on 4 ranks
        progress.warn(f"{len(train_data)} training samples for {comm.size} ranks: some ranks stay idle")
    stop = StopRequest()
    t_start = time.perf_counter()
    t_last, comm_last, samples_last = t_start, 0.0, 0
    loss_acc = correct_acc = seen_acc = 0.0
    step = start
    n = len(train_data)
    try:
        while step < steps:
            idx, epoch = batch_indices(n, B, cfg["seed"], step, cfg["data.shuffle"], cfg["data.drop_last"])
            inject_fault(comm.rank, step)
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
            every = cfg["train.check_replicas_every"]
            if every and step % every == 0 and not same_params(comm, model):
                raise TrainingFault(f"step {step}: ranks hold different parameters: {differing_ranks(comm, model)}")
            if stats[STOP] > 0:
                save_checkpoint(comm, trainer, cfg, run_dir, step, n)
                progress.say(f"stop requested by a signal: checkpoint at step {step} written to {run_dir}; "
                             f"exiting with status {EXIT_PREEMPTED} so the job can be requeued", always=True)
                progress.close()
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
                progress.record(eval_record(trainer, val_data, comm, step, epoch))
            ce = cfg["train.checkpoint_every"]
            if (ce and step % ce == 0) or step == steps:
                save_checkpoint(comm, trainer, cfg, run_dir, step, n)
    finally:
        progress.close()
    wall = time.perf_counter() - t_start
    final = os.path.join(run_dir, "final.npz")
    if comm.rank == 0:
        ckpt.save(final, params_dict(model), {"step": step, "dpbp": __version__})
    val_rec = eval_record(trainer, val_data, comm, step, None) if val_data is not None else None
    progress.summary(step - start, step, wall, val_rec, final)
    return 0


def eval_record(trainer, data, comm, step, epoch):
    loss_sum, correct, count = evaluate(trainer.model, data, comm)
    cfg = trainer.cfg
    rec = {"step": step, "epoch": epoch, "split": "val",
           "loss": (loss_sum / count if cfg["loss.reduction"] == "mean" else loss_sum)
           + l2_penalty(trainer.model.weights, cfg["loss.l2"])}
    if data.labels is not None:
        rec["accuracy"] = correct / count
    return rec


def all_finite(a):
    """Cheap test first (one BLAS dot, no temporary); the exact test only if it overflows."""
    return math.isfinite(float(np.dot(a, a))) or bool(np.isfinite(a).all())


def params_dict(model):
    return {name: v.copy() for name, v in model.tensors().items()}


def same_params(comm, model):
    return len(set(comm.allgather(params_checksum(model.params)))) == 1


def differing_ranks(comm, model):
    sums = comm.allgather(params_checksum(model.params))
    return ", ".join(f"rank {r} differs from rank 0" for r, s in enumerate(sums) if s != sums[0])


def save_checkpoint(comm, trainer, cfg, run_dir, step, n):
    if comm.rank != 0:
        return
    per_epoch = batches_per_epoch(n, cfg["data.batch_size"], cfg["data.drop_last"])
    arrays = params_dict(trainer.model)
    for name, value in trainer.opt.state().items():
        arrays[f"optim.{name}"] = value.copy()
    meta = {"step": step, "epoch": step // per_epoch, "position_in_epoch": step % per_epoch,
            "rng": {"sampler": "stateless: permutation from (seed, epoch)", "seed": cfg["seed"]},
            "trajectory": trajectory_items(cfg), "config": to_toml(cfg), "world_size": comm.size,
            "dpbp": __version__}
    ckpt.save(ckpt.checkpoint_path(run_dir, step), arrays, meta)
    ckpt.prune(run_dir, cfg["train.keep_checkpoints"])


def resume(args, cfg, comm, trainer):
    """Rank 0 reads the newest valid checkpoint and broadcasts it; returns (step, path)."""
    found, warnings = None, []
    if comm.rank == 0:
        found = ckpt.newest_valid(args.resume, warnings.append)
        for w in warnings:
            print(f"dpbp: warning: {w}", file=sys.stderr, flush=True)
    found = comm.bcast(found)
    if found is None:
        return 0, None
    arrays, meta, path = found
    saved = meta.get("trajectory", {})
    now = trajectory_items(cfg)
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differing and not args.force:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise UserError(f"cannot resume {path}: the config changes the trajectory ({detail}); "
                        f"pass --force to resume anyway")
    model = trainer.model
    try:
        model.load({k: arrays[k] for k in model.names})
        trainer.opt.load_state({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: does not fit this model ({e})") from None
    return int(meta["step"]), path


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.train"))
