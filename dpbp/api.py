"""The Python API: ``dpbp.fit`` trains exactly as ``python -m dpbp.train`` does (the command is a thin layer
over the same ``train.train``), from a notebook (one process, no MPI needed) or a script under mpirun;
``dpbp.load`` gives a trained network back for prediction.

    run = dpbp.fit({"model": {"sizes": [64, 32, 10]}}, x=x, y=y, out="runs/nb")
    model = dpbp.load(run.run_dir)
    outputs = model.predict(x_new)

Errors raise ``dpbp.UserError`` with the messages the command prints (the command turns them into exit 2).
Under mpirun every rank calls fit with the same arguments (the same arrays): it is collective.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from dpbp.checkpoint import companion_path, read_companion
from dpbp.comm import get_comm
from dpbp.config import defaults, load_config
from dpbp.data import standardize as stats
from dpbp.errors import UserError
from dpbp.runs import model_of, starting_params
from dpbp.train import Request, train


@dataclass
class Run:
    """What fit returns: the trained parameters, the metrics records, where the run lives."""

    params: dict  # {"layers.{k}.weight": (n_out, n_in), "layers.{k}.bias": (n_out,)} float64 copies
    metrics: list  # the records of metrics.jsonl (training lines, and "split": "val" evaluations)
    run_dir: str
    status: int = 0  # 0; after a checkpoint, 75 when a signal stopped the run, 130 after Ctrl-C (resume= it)


def fit(config=None, *, x=None, y=None, val=None, init=None, out=None, overrides=None, comm=None, quiet=True,
        resume=None, force=False, verbose=False) -> Run:
    """Train; see the module doc. config: a TOML path or a dict of keys (defaults: the digits job);
    x, y: training arrays in memory instead of the config's data (val=(x_val, y_val) likewise, else
    data.val_fraction of x); init: a parameters file or {name: array}; overrides: ["key=value", ...];
    quiet=True prints nothing but warnings and errors; resume/force as the command's --resume/--force."""
    if (x is None) != (y is None):
        raise UserError("fit needs both x and y (or neither, to train on the config's data)")
    comm = get_comm() if comm is None else comm
    arrays = None if x is None else (x, y, val)
    request = Request(config=config, set=list(overrides or []), out=out, init=init, resume=resume, force=force,
                      quiet=quiet, verbose=verbose, arrays=arrays, silent=quiet)
    job = train(request, comm)
    params = {name: v.astype(np.float64) for name, v in job.trainer.model.tensors().items()}
    return Run(params, comm.bcast(_metrics(job.run_dir) if comm.rank == 0 else None), job.run_dir, job.status)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Model:
    """A trained network for prediction: ``predict(x)`` applies the run's standardization (if any) to raw
    features, then the forward pass; never dropout."""

    def __init__(self, cfg, params, standardize=None):
        self.cfg = cfg
        self.network = model_of(cfg)
        self.network.load(params)
        self.params = {name: v.copy() for name, v in self.network.tensors().items()}
        self.standardize = standardize
        self.classes = cfg["data.classes"] or None  # names of the outputs' classes, when the run had them

    def predict(self, x):
        """x: (n, features) raw inputs -> (n, outputs) in the model's dtype."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.network.sizes[0]:
            raise UserError(f"predict needs x of shape (n, {self.network.sizes[0]}), got {x.shape}")
        if self.standardize is not None:
            x = (x - self.standardize.mean) / self.standardize.std
        return self.network.forward(x).copy()


def load(run_dir_or_params) -> Model:
    """A run directory (its final.npz) or a parameters file with config.toml beside it, or with only its
    description (final.json: a parameters file copied on its own with it)."""
    path = run_dir_or_params
    if os.path.isdir(path):
        path = os.path.join(path, "final.npz")
    if not os.path.exists(path):
        raise UserError(f"{run_dir_or_params}: no such run directory or parameters file")
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.toml")
    if os.path.exists(config):
        cfg = load_config(config)
    else:
        cfg = described_config(path)
    saved = stats.saved(path, cfg["model.sizes"][0]) if cfg["data.standardize"] else None
    return Model(cfg, starting_params(cfg, path), saved)


def described_config(path):
    """The config of the network that a parameters file's description (final.json) names."""
    meta = read_companion(path) or {}
    if "sizes" not in meta:
        raise UserError(f"{path}: no config.toml beside it and no {os.path.basename(companion_path(path))} "
                        f"describing it, so the network's shape is unknown")
    # Only what the description holds: the schema's defaults fill in the rest (one place for them).
    model = {"sizes": meta["sizes"], **{k: meta[k] for k in ("activation", "output", "dtype") if k in meta}}
    output = model.get("output", defaults()["model.output"])
    loss = meta.get("loss", "cross_entropy" if output in ("softmax", "sigmoid") else "squared_error")
    return load_config({"model": model,
                        "loss": {"kind": loss},
                        "data": {"standardize": meta.get("standardize") is not None,
                                 "classes": meta.get("classes") or []}})
