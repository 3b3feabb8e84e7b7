"""The run directory: choosing and checking it, the starting parameters, checkpoints, resume, metrics trimming.

A run directory holds config.toml (the resolved config), header.jsonl, metrics.jsonl, ckpt-*.npz and, at
the end, final.npz. Only rank 0 writes; every rank learns rank 0's decisions by one broadcast, so a bad
directory or checkpoint fails on every rank alike.

What a checkpoint holds, so that resume is bitwise exact: the parameters, the optimizer's state, the step
and the sampler's position (the sampler is a pure function of (seed, epoch), so (epoch, position) is its
whole state), and the trajectory (the config keys and data that decide the numbers), checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np

from dpbp import __version__
from dpbp import checkpoint as ckpt
from dpbp.config import OPTIONS, PATH_KEYS, to_toml, trajectory_hash, trajectory_items
from dpbp.data import epoch_order, epoch_position
from dpbp.errors import UserError, warn
from dpbp.model import MLP, initial_params, param_names, param_shapes

DATA_KEY = "data (contents, sha256)"  # a trajectory key that no config option holds


# A dpbp run directory is one that holds header.jsonl (choose_run_dir creates it, empty, before anything
# else is written there; every start of the run then records its header in it), a checkpoint or final.npz.
# The launcher's own files (dpbp.launch --tee / --save-args, and its count of requeues after a lost host,
# which an attempt lost before the first checkpoint leaves behind) may be there before its run starts.
RUN_MARKS = ("header.jsonl", "final.npz")
LAUNCHER_FILES = ("launch.args", "launch.log", "lost-requeues.jsonl")


def is_run(path):
    """True if path is a dpbp run directory (see RUN_MARKS)."""
    return os.path.isdir(path) and (any(os.path.exists(os.path.join(path, m)) for m in RUN_MARKS)
                                    or bool(ckpt.list_checkpoints(path)))


@dataclass
class Place:
    """Where a run goes: run_dir (None: a new directory under runs/, named when it is made) and whether
    the run there is continued (resuming) or started."""

    run_dir: str | None
    resuming: bool


def place_of(args, comm):
    """Collective: the run's Place from --resume, --resume-or-start or --out; rank 0 looks at the disk and
    every rank learns its answer. Checked before any work, so that a mistyped directory creates nothing."""
    error = place = None
    if comm.rank == 0:
        try:
            place = _place(args.resume, getattr(args, "resume_or_start", None), args.out)
        except UserError as e:
            error = str(e)
    error, place = comm.bcast((error, place))
    if error:
        raise UserError(error)
    return place


def _place(resume, resume_or_start, out):
    if resume and resume_or_start:
        raise UserError("give --resume DIR or --resume-or-start DIR, not both")
    if resume:
        _check_resumable(resume)
        return Place(resume, True)
    if resume_or_start:
        if is_run(resume_or_start):
            return Place(resume_or_start, True)
        _check_new(resume_or_start, "--resume-or-start")
        return Place(resume_or_start, False)
    if out:
        _check_new(out, "--out")
        return Place(out, False)
    return Place(None, False)


def _check_resumable(path):
    """UserError unless path is a run directory: --resume never starts a new run where a typo points."""
    if os.path.exists(path) and not os.path.isdir(path):
        hint = ""
        if path.endswith(".npz"):
            hint = (f" ({path} is a parameters file: --resume {os.path.dirname(path) or '.'} continues its "
                    f"run; --init {path} starts a new run from it)")
        raise UserError(f"--resume takes a run directory, and {path!r} is not a directory{hint}")
    if not os.path.isdir(path):
        raise UserError(f"--resume {path!r}: no such directory; --resume continues a run (start one with "
                        f"--out {path}; in a batch script, --resume-or-start {path} does either)")
    if not is_run(path):
        raise UserError(f"--resume {path!r}: holds no dpbp run (no header.jsonl, checkpoint or final.npz); "
                        f"start one there with --out {path}")


def _check_new(path, flag):
    """UserError unless a new run may start in path: missing, empty, or holding only the launcher's files.
    A directory of the user's own files is refused, since the run writes config.toml, metrics.jsonl ... there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file, not a directory")
    if is_run(path):
        raise UserError(f"{flag} {path!r} already holds a run; continue it with --resume {path} or choose "
                        f"another directory")
    if os.path.isdir(path):
        try:
            others = sorted(set(os.listdir(path)) - set(LAUNCHER_FILES))
        except OSError as e:
            raise UserError(f"cannot use {path!r} as the output directory: {e.strerror or e}") from None
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UserError(f"{flag} {path!r} is not empty ({shown}) and holds no dpbp run: the run would write "
                            f"config.toml, metrics.jsonl and checkpoints among those files; choose a new or "
                            f"empty directory")


def choose_run_dir(place, args, comm):
    """Rank 0 makes the directory (named now if the Place has none) and marks it as a run; every rank
    learns the answer."""
    error, run_dir = None, place.run_dir
    if comm.rank == 0:
        if run_dir is None:
            named = isinstance(args.config, str) and args.config
            stem = os.path.splitext(os.path.basename(args.config))[0] if named else "default"
            base = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir, k = base, 1
            while os.path.exists(run_dir):
                run_dir, k = f"{base}-{k}", k + 1
        error = _make_writable(run_dir)
        if error is None:
            open(os.path.join(run_dir, "header.jsonl"), "a").close()  # the mark of a run (RUN_MARKS)
    error, run_dir = comm.bcast((error, run_dir))
    if error:
        raise UserError(error)
    return run_dir


def _make_writable(run_dir):
    """None, or why run_dir cannot be the output directory; here, so that an unusable directory is one
    clear message rather than a crash later."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        return f"cannot use {run_dir!r} as the output directory: {e.strerror or e}"
    if not os.access(run_dir, os.W_OK):
        return f"output directory {run_dir!r} is not writable"
    return None


def init_kind(cfg):
    """model.init resolved: "auto" is the tutorial's weights for its 2-2-2 example on the built-in seed
    data, and "uniform" (He for relu, Glorot otherwise) for everything else."""
    if cfg["model.init"] != "auto":
        return cfg["model.init"]
    seed_example = cfg["data.name"] == "seed" and cfg["model.sizes"] == [2, 2, 2] and not cfg["data.path"]
    return "seed_example" if seed_example else "uniform"


def starting_params(cfg, init=None):
    """{name: float64 array}: the --init (or --params) file's, or a dict of arrays (dpbp.fit's init),
    else model.init's."""
    names, shapes = param_names(len(cfg["model.sizes"]) - 1), param_shapes(cfg["model.sizes"])
    if isinstance(init, dict):
        return ckpt.checked_params(init, names, shapes, "init")
    if init:
        return ckpt.load_params(init, names, shapes)
    return initial_params(cfg["model.sizes"], cfg["model.activation"], cfg["seed"], init_kind(cfg))


def model_of(cfg, dtype=None):
    """The config's MLP (parameters zero), in model.dtype unless dtype is given."""
    return MLP(cfg["model.sizes"], cfg["model.activation"], cfg["model.output"], cfg["loss.kind"],
               dtype or cfg["model.dtype"])


def params_dict(model):
    return {name: v.copy() for name, v in model.tensors().items()}


def write_config(run_dir, cfg):
    """Rank 0: the resolved config, which --resume and the evaluation commands read back."""
    with open(os.path.join(run_dir, "config.toml"), "w") as f:
        f.write(to_toml(cfg))


def standardize_arrays(data):
    """{"standardize.mean", "standardize.std"} of a data.standardize run, saved beside its parameters."""
    return {} if data.standardize is None else data.standardize.to_arrays()


def save_final(run_dir, model, step, data, name="final.npz"):
    """Rank 0: final.npz (or best.npz) holding only the layers' arrays, and its description final.json
    (best.json), each atomically (checkpoint.save_parameters)."""
    path = os.path.join(run_dir, name)
    ckpt.save_parameters(path, params_dict(model), parameters_meta(model, step, data))
    return path


def parameters_meta(model, step, data):
    """What a parameters file needs beside its arrays to be used alone (export, PyTorch): the network's
    shape and activations, the class names, the standardize statistics (mean, std: (features,) as
    lists of floats, which JSON keeps exactly), the step."""
    standardize = None if data.standardize is None else data.standardize.to_json()
    return {"dpbp": __version__, "step": step, "sizes": list(model.sizes), "activation": model.activation,
            "output": model.output, "loss": model.loss_kind, "dtype": model.dtype.name, "classes": list(data.classes or []) or None,
            "standardize": standardize,
            "layers": "layers.{k}.weight (out, in) and layers.{k}.bias (out,): out = f(x @ weight.T + bias)"}


@dataclass
class Best:
    """Early stopping's state: the best held-out loss so far, its step, and evaluations since. It rides in
    every checkpoint (``as_meta``), so a resumed run stops where the uninterrupted one would."""

    loss: float = math.inf
    step: int = -1
    since: int = 0

    def update(self, loss, step):
        """Note one held-out evaluation; True if it is a new best (strictly lower loss)."""
        if loss < self.loss:
            self.loss, self.step, self.since = loss, step, 0
            return True
        self.since += 1
        return False

    def exhausted(self, patience):
        return bool(patience) and self.since >= patience

    def as_meta(self):
        return {"loss": self.loss if math.isfinite(self.loss) else None, "step": self.step, "since": self.since}

    @classmethod
    def from_meta(cls, meta):
        if not meta:
            return cls()
        return cls(math.inf if meta.get("loss") is None else meta["loss"], meta.get("step", -1), meta.get("since", 0))


# ---------------------------------------------------------------- checkpoints and resume


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


def save_checkpoint(comm, trainer, run_dir, step, best=None):
    """Rank 0: parameters, optimizer state, counters and early stopping's state (a Best), atomically; the
    random state is (seed, epoch, position) because the sampler and the dropout masks are pure functions
    of them and of the seed."""
    state = trainer.optimizer_state()  # collective when optim.shard: the slices gathered in rank order
    if comm.rank != 0:
        return
    cfg, n = trainer.cfg, len(trainer.data)
    epoch, position = epoch_position(n, cfg["data.batch_size"], step, cfg["data.drop_last"])
    arrays = {**params_dict(trainer.model), **standardize_arrays(trainer.data)}
    for name, value in state.items():
        arrays[f"optim.{name}"] = value
    meta = {"step": step, "epoch": epoch, "position_in_epoch": position,
            "rng": {"sampler": "permutation of the epoch from default_rng([seed, epoch])", "seed": cfg["seed"],
                    "epoch_order_crc32": sampler_check(cfg, n, epoch)},
            "trajectory": run_trajectory(cfg, trainer.data), "trajectory_hash": trajectory_hash(cfg),
            "config": to_toml(cfg), "world_size": comm.size, "comm.reduce": cfg["comm.reduce"],
            "dpbp": __version__, "numpy": np.__version__, "best": (best or Best()).as_meta(),
            "total_steps": trainer.total_steps}
    ckpt.save(ckpt.checkpoint_path(run_dir, step), arrays, meta)
    ckpt.prune(run_dir, cfg["train.keep_checkpoints"])


def resume(run_dir, force, comm, trainer):
    """Continue from the newest valid checkpoint in run_dir; returns (step, path, Best), or (0, None, Best())
    when there is none yet (a fresh start there). Rank 0 reads and checks; every rank gets the result."""
    found = error = None
    if comm.rank == 0:
        try:
            found = ckpt.newest_valid(run_dir, warn, max_bytes=16 * trainer.model.params.nbytes + (64 << 20))
            if found is not None:
                error = resume_problem(found, force, comm.size, trainer)
        except UserError as e:
            error = str(e)
    found, error = comm.bcast((None if error else found, error))
    if error:
        raise UserError(error)
    if found is None:
        return 0, None, Best()
    arrays, meta, path = found
    trainer.model.load({k: arrays[k] for k in trainer.model.names})
    trainer.load_optimizer_state({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
    return meta["step"], path, Best.from_meta(meta.get("best"))


def trajectory_changes(saved, now):
    """Sorted keys whose values differ; a key that a checkpoint of an older dpbp lacks counts as its
    default (the value that older dpbp computed with). Paths compare absolute: a run that stored a relative
    one (an older dpbp) resumes from the directory it was started in."""
    def value(items, k):
        v = items[k] if k in items else (OPTIONS[k].default if k in OPTIONS else None)
        return os.path.abspath(v) if k in PATH_KEYS and v else v
    return sorted(k for k in set(saved) | set(now) if value(saved, k) != value(now, k))


def resume_problem(found, force, world_size, trainer):
    """Rank 0: why this checkpoint cannot continue this run (None if it can); warns about the rest."""
    arrays, meta, path = found
    cfg, model = trainer.cfg, trainer.model
    saved, now = meta.get("trajectory", {}), run_trajectory(cfg, trainer.data)
    differing = trajectory_changes(saved, now)
    if not differing and meta.get("rng", {}).get("epoch_order_crc32") != sampler_check(
            cfg, len(trainer.data), meta.get("epoch", 0)):
        differing = ["sampler (the epoch's permutation; another numpy version?)"]
    if differing:
        detail = "; ".join(f"{k}: {saved.get(k, '?')!r} -> {now.get(k, '?')!r}" for k in differing)
        if not force:
            return (f"cannot resume from {path}: the config changes the trajectory ({detail}); "
                    f"pass --force to resume anyway")
        warn(f"--force: resuming from {path} although the trajectory changes ({detail})")
    _schedule_warning(meta, trainer)
    return _shape_problem(arrays, path, model) or _state_problem(arrays, path, force, trainer) or \
        _reduction_warning(meta, cfg, world_size)


def _schedule_warning(meta, trainer):
    """The cosine schedule depends on the total steps T: a resume that changes train.steps changes it."""
    saved, now = meta.get("total_steps"), trainer.total_steps
    if trainer.cfg["optim.schedule"] == "cosine" and saved is not None and saved != now:
        warn(f"train.steps changes from {saved} to {now}: the cosine learning-rate schedule changes from "
             f"step {meta['step']} on (it is a function of the total steps)")


def _shape_problem(arrays, path, model):
    for name, shape in zip(model.names, model.shapes):
        if name not in arrays or arrays[name].shape != tuple(shape):
            got = arrays[name].shape if name in arrays else "nothing"
            return f"{path}: does not fit this model: {name} is {got}, the model needs {tuple(shape)}"
    return None


def _state_problem(arrays, path, force, trainer):
    """None if the checkpoint holds the optimizer's state (filled in with zeros under --force)."""
    for name, shape in trainer.optimizer_shapes().items():
        key = f"optim.{name}"
        if arrays.get(key, np.empty((0, 0))).shape != shape:
            if not force:
                what = "momentum" if name == "velocity" else f"the {trainer.cfg['optim.kind']} state"
                return f"{path}: holds no {what} for this model ({key}); pass --force to start it at zero"
            arrays[key] = np.zeros(shape, trainer.model.dtype)
    return None


def _reduction_warning(meta, cfg, world_size):
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
