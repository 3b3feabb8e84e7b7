"""python -m dpbp.train: data-parallel training from a config, alone or under mpirun.

The loop, on every rank (``train_loop``):
    the global batch of this step (sampler: a pure function of seed, epoch, position)
    -> Trainer.step: this rank's share -> forward -> backward -> ONE Allreduce -> the identical update
    -> finite check -> metrics record (rank 0) -> held-out evaluation -> checkpoint (rank 0)
Setting up (config, data, run directory, resume) is ``setup``; the step is dpbp/step.py, the run
directory dpbp/runs.py, the held-out figures dpbp/evaluate.py, rank 0's output dpbp/progress.py.
"""

from __future__ import annotations

import faulthandler
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from dpbp import runs
from dpbp.cli import ArgumentParser, config_arguments, parse_args, run
from dpbp.comm import forked_deadline
from dpbp.config import load_config, with_absolute_paths
from dpbp.data import batch_indices, batches_per_epoch, load_data
from dpbp.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainingFault, UserError
from dpbp.evaluate import held_out
from dpbp.faults import FaultInjector, StopRequest, replica_mismatch
from dpbp.progress import Meter, Progress
from dpbp.step import Trainer, check_memory
from dpbp.watchdog import Watchdog, long_phase


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.train",
                       description="Train an MLP with data-parallel backprop (alone or under mpirun).")
    config_arguments(p, "TOML file overriding the defaults (default job: digits)")
    p.add_argument("--out", help="output directory (default: runs/<config name>-<time>)")
    p.add_argument("--init", metavar="PARAMS.npz", help="initial parameters (layers.{k}.weight/bias)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its newest checkpoint (refused if RUN_DIR holds no run)")
    where.add_argument("--resume-or-start", metavar="RUN_DIR",
                       help="for batch scripts: continue the run in RUN_DIR if there is one, else start it there")
    p.add_argument("--force", action="store_true", help="resume even if the config changes the trajectory")
    p.add_argument("--quiet", action="store_true", help="print only the summary and errors")
    p.add_argument("--verbose", action="store_true",
                   help="also print the resolved config, and a line (and a metrics record) every step")
    return p


@dataclass
class Request:
    """What to train: the command line's options, or dpbp.fit's arguments (the same names)."""

    config: str | dict | None = None  # a TOML file or a dict of keys
    set: list = field(default_factory=list)  # KEY=VALUE overrides
    out: str | None = None
    init: str | dict | None = None  # a parameters file or {name: array}
    resume: str | None = None
    resume_or_start: str | None = None  # resume if RUN_DIR holds a run, else start there
    force: bool = False
    quiet: bool = False
    verbose: bool = False
    arrays: tuple | None = None  # (x, y, (x_val, y_val) or None) in memory instead of the config's data
    silent: bool = False  # not even the summary (dpbp.fit's quiet)


@dataclass
class Job:
    """One training run as set up on this rank."""

    cfg: dict
    trainer: Trainer
    val_data: object
    run_dir: str
    steps: int  # the step the run ends at
    start: int  # the step it starts from (0, or a checkpoint's)
    progress: Progress
    verbose: bool
    best: runs.Best  # early stopping's state
    val_rec: dict | None = None  # the newest held-out evaluation
    step: int = 0  # the step reached
    stopped_early: bool = False
    status: int = 0  # the exit status: 0, EXIT_PREEMPTED, or EXIT_INTERRUPTED (Ctrl-C, after a checkpoint)
    watch: object = None  # the watchdog's comm.Deadline (None: unwatched), for the step and the long phases


def total_steps(cfg, n_train):
    if cfg["train.steps"]:
        return cfg["train.steps"]
    return cfg["train.epochs"] * batches_per_epoch(n_train, cfg["data.batch_size"], cfg["data.drop_last"])


def check_world_size(comm):
    expected = os.environ.get("DPBP_EXPECT_WORLD_SIZE")
    if expected and expected.isdigit() and int(expected) != comm.size:
        raise UserError(f"MPI world size is {comm.size} but {expected} ranks were expected "
                        f"(DPBP_EXPECT_WORLD_SIZE); is the launcher using the right MPI?")


def run_config(args, place):
    """The config: --config, else the resumed run's config.toml (if it has one), then --set."""
    config_path = args.config
    if place.resuming and not config_path:
        config_path = os.path.join(place.run_dir, "config.toml")
        if not os.path.exists(config_path):
            config_path = None  # a run that stopped before writing its config: the defaults
    return load_config(config_path, args.set)


def setup(args, comm, watch=None):
    """Everything before the first step; every failure here is the same on every rank. watch: a
    Watchdog to start once the config (comm.timeout) is known, as watch(cfg)."""
    check_world_size(comm)
    place = runs.place_of(args, comm)  # collective: a bad --resume/--out fails here, before any work
    cfg = with_absolute_paths(run_config(args, place))  # stored so: the run directory works from anywhere
    if watch is not None:
        watch(cfg)
    # collective: ranks agree on bad data, scan it in shares
    train_data, val_data = load_data(cfg, comm, arrays=args.arrays)
    if train_data.classes:  # the run keeps its class names: evaluate and predict read them from config.toml
        cfg["data.classes"] = list(train_data.classes)
    if len(train_data) < comm.size and cfg["data.path"]:
        raise UserError(f"{train_data.source}: {len(train_data)} training samples for {comm.size} ranks; "
                        f"every rank needs at least one")
    check_memory(cfg, len(train_data), comm)  # collective
    init = runs.starting_params(cfg, args.init)
    run_dir = runs.choose_run_dir(place, args, comm)  # everything above fails alike everywhere
    steps = total_steps(cfg, len(train_data))
    trainer = Trainer(cfg, comm, train_data, steps)
    trainer.model.load(init)
    start, resumed_from, best = runs.resume(run_dir, args.force, comm, trainer) if place.resuming else \
        (0, None, runs.Best())
    if comm.rank == 0:
        if place.resuming:
            runs.trim_metrics(run_dir, start)
        runs.write_config(run_dir, cfg)
    progress = Progress(comm, run_dir, quiet=args.quiet or args.silent, verbose=args.verbose,
                        resume=resumed_from is not None, silent=args.silent)
    mismatch = replica_mismatch(comm, trainer.model.params)
    if mismatch:
        raise TrainingFault(f"ranks start from different parameters: {mismatch}")
    progress.start(cfg, trainer.model, train_data, val_data, steps, start, resumed_from)
    for text in train_data.warnings:
        progress.warn(text)
    warn_idle_ranks(cfg, len(train_data), comm.size, progress)
    return Job(cfg, trainer, val_data, run_dir, steps, start, progress, args.verbose, best, step=start,
               watch=comm.deadline)


def warn_idle_ranks(cfg, n_train, P, progress):
    if n_train < P:  # harmless (an empty share adds zeros) and how the one-sample seed demo runs on 4 ranks
        progress.warn(f"{n_train} training samples for {P} ranks: some ranks stay idle")
        return
    B, chunk = cfg["data.batch_size"], cfg["comm.chunk"]
    n_chunks = -(-min(B, n_train) // chunk)
    if cfg["comm.reduce"] == "reproducible" and n_chunks < P:
        progress.warn(f"comm.reduce = 'reproducible' cuts each batch into {n_chunks} chunk(s) of comm.chunk = "
                      f"{chunk} samples and never splits a chunk: {P - n_chunks} of {P} ranks stay idle"
                      + (f" (comm.chunk <= {B // P} would use them all)" if B >= P else ""))


def due(every, step):
    return bool(every) and step % every == 0


def train_loop(job, stop, faults):
    """Steps from job.start to job.steps (or an early stop); returns the exit status if a signal asked to
    stop (after the checkpoint: see preempt), else None."""
    cfg, trainer, comm, progress = job.cfg, job.trainer, job.trainer.comm, job.progress
    n, B = len(trainer.data), cfg["data.batch_size"]
    meter = Meter(trainer.data.labels is not None)
    step, patience = job.start, cfg["train.early_stop_patience"]
    watch = job.watch
    if watch is not None:
        watch.phase = "the first step"  # page faults, connections, cold caches: legitimately long
    while step < job.steps and not job.best.exhausted(patience):
        idx, epoch = batch_indices(n, B, cfg["seed"], step, cfg["data.shuffle"], cfg["data.drop_last"])
        if watch is not None:
            watch.step = step + 1
        if faults is not None:
            faults.before_step(step, trainer)
        stats = trainer.step(idx, stop.flag, step)
        if watch is not None:
            watch.phase = None
        check_finite(trainer, stats.loss, step, job.run_dir)
        step = job.step = step + 1
        meter.add(stats.loss, stats.correct, stats.samples, stats.lr)
        progress.tick(step, stats.samples)
        last = step == job.steps
        if due(cfg["train.log_every"], step) or last or job.verbose:
            progress.record(meter.record(step, epoch, trainer.comm_s))
        if job.val_data is not None and (due(cfg["train.eval_every"], step) or last):
            with long_phase(watch, "a held-out evaluation"):
                evaluate_and_keep_best(job, step, epoch)  # before a preemption too: the resumed run will not redo it
        if stats.stop > 0 and not last:  # at the last step, finishing is quicker than a requeue
            check_replicas(comm, trainer.model, step, cfg)
            return preempt(job, step, stop)
        stopping = last or job.best.exhausted(patience)
        if due(cfg["train.checkpoint_every"], step) or stopping:
            check_replicas(comm, trainer.model, step, cfg)  # so no checkpoint holds a diverged replica
            with long_phase(watch, "writing a checkpoint"):
                if faults is not None:
                    faults.before_save()
                runs.save_checkpoint(comm, trainer, job.run_dir, step, job.best)
        elif due(cfg["train.check_replicas_every"], step):
            check_replicas(comm, trainer.model, step, cfg)
    job.stopped_early = job.best.exhausted(patience)
    return None


def evaluate_and_keep_best(job, step, epoch):
    """The held-out figures, recorded; a new best loss goes to best.npz (rank 0) and every record says
    which step holds the best so far."""
    rec = eval_record(job, step, epoch)
    if job.best.update(rec["loss"], step) and job.trainer.comm.rank == 0:
        runs.save_final(job.run_dir, job.trainer.model, step, job.trainer.data, "best.npz")
    rec.update(best_step=job.best.step, best_loss=job.best.loss)
    job.val_rec = rec
    job.progress.record(rec)


def preempt(job, step, stop):
    """A signal asked some rank to stop: checkpoint, then every rank exits; EXIT_INTERRUPTED if some rank
    got a Ctrl-C (the user stopped it: not for a requeue), else EXIT_PREEMPTED (run me again)."""
    comm = job.trainer.comm
    with long_phase(job.watch, "writing a checkpoint"):
        runs.save_checkpoint(comm, job.trainer, job.run_dir, step, job.best)
    # No rank exits before rank 0's checkpoint is on disk: a launcher that kills the job on the first
    # non-zero exit (Slurm's KillOnBadExit) must not cut the write short. The max is that barrier too.
    interrupted = np.array([float(stop.interrupted)])
    comm.allreduce_max_(interrupted)
    if interrupted[0]:
        job.progress.say(f"interrupted (Ctrl-C): checkpoint at step {step} written to {job.run_dir}; continue "
                         f"with --resume {job.run_dir}", always=True)
        return EXIT_INTERRUPTED
    job.progress.say(f"stop requested by a signal: checkpoint at step {step} written to {job.run_dir}; "
                     f"exiting with status {EXIT_PREEMPTED} so the job can be requeued", always=True)
    return EXIT_PREEMPTED


def finish(job, wall):
    """final.npz (rank 0), a held-out evaluation at the last step if there was none, the summary."""
    step, comm = job.step, job.trainer.comm
    final = os.path.join(job.run_dir, "final.npz")
    with long_phase(job.watch, "writing final.npz"):
        if comm.rank == 0:
            runs.save_final(job.run_dir, job.trainer.model, step, job.trainer.data)
        if job.val_data is not None and (job.val_rec is None or job.val_rec["step"] != step):  # e.g. resumed at the end
            job.val_rec = eval_record(job, step, None)
            job.val_rec.update(best_step=job.best.step, best_loss=job.best.loss)
    if job.stopped_early:
        job.progress.say(f"early stop at step {step}: {job.cfg['train.early_stop_patience']} held-out "
                         f"evaluations without a new best loss")
    job.progress.summary(step - job.start, step, wall, job.val_rec, final)


def finalize_within(comm, timeout):
    """MPI_Finalize, the process ended (status 1, one message from rank 0) after `timeout` s (0: never)
    if it does not return by then.

    mpi4py holds the GIL in MPI_Finalize, so no Python thread (the watchdog neither) runs while it waits;
    and it can wait for ever: MPICH's PMI barrier there needs the launcher, which Slurm may have killed
    (a host whose slurmd died: after the NODE_FAIL the other host's srun is gone, and this host's ranks
    sat in a read of the PMI socket). Two things that need no GIL end it: a forked watcher
    (comm.forked_deadline) prints the message, and a second later faulthandler's C timer _exit(1)s, its
    dump of every thread's stack sent to /dev/null (the message says what happened; the stacks would be
    a wall of text on every rank). The watched barrier first lets the watchdog judge the waits that are
    legitimately long (rank 0 writing the last checkpoint), so the ranks enter MPI_Finalize together."""
    comm.barrier()
    if not timeout > 0 or comm.size == 1:  # one rank waits for nobody
        comm.finalize()
        return
    message = (f"dpbp.train: MPI_Finalize did not return within comm.timeout = {timeout:g} s (the launcher or "
               f"a peer is gone); the run's files are written; ending with exit status {EXIT_CRASH}")
    with open(os.devnull, "w") as devnull, forked_deadline(timeout, message if comm.rank == 0 else None, kill=False):
        faulthandler.dump_traceback_later(timeout + 1.0, exit=True, file=devnull)
        try:
            comm.finalize()
        finally:
            faulthandler.cancel_dump_traceback_later()


def train(request, comm, finalize=False):
    """Train as the request says (collective); returns the Job, its status 0, EXIT_PREEMPTED or
    EXIT_INTERRUPTED.

    A watchdog (dpbp/watchdog.py) watches every collective from the config on; finalize (the command):
    MPI_Finalize while it still watches, since a lost rank would hold MPI_Finalize at exit for ever."""
    stop = StopRequest()  # from the start: a signal during setup still ends in a checkpoint, not a kill
    started = []  # the watchdog that setup starts once comm.timeout is known (None: unwatched)
    try:
        faults = FaultInjector.from_env(comm.rank)
        job = setup(request, comm, lambda cfg: started.append(Watchdog.start(comm, cfg["comm.timeout"], "dpbp.train")))
        job.status = run_job(job, stop, faults)
        if finalize:
            finalize_within(comm, job.cfg["comm.timeout"])
        return job
    finally:
        for dog in filter(None, started):
            dog.stop()
        stop.restore()


def run_job(job, stop, faults):
    """The loop and the end of the run; returns the exit status (0, EXIT_PREEMPTED or EXIT_INTERRUPTED)."""
    t0 = time.perf_counter()
    try:
        status = train_loop(job, stop, faults)
    finally:
        job.progress.close()
    if status is not None:
        return status
    finish(job, time.perf_counter() - t0)
    return 0


def main(argv, comm):
    """The command: its options are a Request (dpbp.fit builds the same from its arguments)."""
    args = parse_args(build_parser(), argv, comm)
    return train(Request(**vars(args)), comm, finalize=True).status


def eval_record(job, step, epoch):
    rec = held_out(job.trainer.model, job.cfg, job.val_data, job.trainer.comm)
    return {"step": step, "epoch": epoch, "split": "val", **rec}


def check_finite(trainer, loss, step, run_dir):
    if not math.isfinite(loss) or not trainer.gradient_finite():
        where = trainer.first_nonfinite() or "the loss"
        raise TrainingFault(f"non-finite values at step {step + 1}: first in {where}; the newest "
                            f"checkpoint in {run_dir} is the last good one")


def check_replicas(comm, model, step, cfg):
    if not cfg["train.check_replicas_every"]:
        return
    mismatch = replica_mismatch(comm, model.params)
    if mismatch:
        raise TrainingFault(f"replica check at step {step}: ranks hold different parameters: {mismatch}")


if __name__ == "__main__":
    sys.exit(run(main, prog="dpbp.train"))
