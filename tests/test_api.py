"""dpbp.fit and dpbp.load: the same training as the command, arrays in memory, prediction, errors.

The second method each time is the command line (python -m dpbp.train on the same data saved to a file)
or the forward pass written out here; the README's Python examples (```py blocks) run as they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import dpbp
from dpbp.comm import SerialComm
from tests.conftest import REPO, clean_env, dpbp as run_dpbp, load_params

SIZES = [4, 8, 3]
CONFIG = {"model": {"sizes": SIZES}, "train": {"steps": 30, "eval_every": 10}, "data": {"batch_size": 16}}


def arrays(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)


def test_fit_on_arrays_equals_the_command_on_the_same_file(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run = dpbp.fit(CONFIG, x=x, y=y, out=str(tmp_path / "api"), comm=SerialComm())
    run_dpbp("train", "--set", f"model.sizes={SIZES}", "--set", "train.steps=30", "--set", "train.eval_every=10",
             "--set", "data.batch_size=16", "--set", f"data.path='{tmp_path / 'd.npz'}'", "--out",
             tmp_path / "cli", "--quiet", check=True)
    cli = load_params(tmp_path / "cli" / "final.npz")
    assert set(run.params) == set(cli)
    for name, value in cli.items():
        np.testing.assert_array_equal(run.params[name], value)
    steps = [r["step"] for r in run.metrics if "split" not in r]
    assert steps[-1] == 30 and run.status == 0 and run.run_dir == str(tmp_path / "api")


def test_a_held_out_pair_is_evaluated_and_kept_best(tmp_path):
    x, y = arrays()
    xv, yv = arrays(40, seed=1)
    run = dpbp.fit(CONFIG, x=x, y=y, val=(xv, yv), out=str(tmp_path / "r"), comm=SerialComm(), quiet=True)
    val = [r for r in run.metrics if r.get("split") == "val"]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert os.path.exists(tmp_path / "r" / "best.npz")
    best = min(val, key=lambda r: r["loss"])
    assert val[-1]["best_step"] == best["step"]


def test_load_predicts_the_forward_pass_written_out(tmp_path):
    x, y = arrays()
    run = dpbp.fit(CONFIG, x=x, y=y, out=str(tmp_path / "r"), comm=SerialComm())
    model = dpbp.load(run.run_dir)
    p = run.params
    hidden = np.tanh(x @ p["layers.0.weight"].T + p["layers.0.bias"])  # the default: tanh, then softmax
    net = hidden @ p["layers.1.weight"].T + p["layers.1.bias"]
    expected = np.exp(net - net.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-12, atol=1e-15)
    assert model.params.keys() == p.keys()


def test_load_applies_the_runs_standardization_to_raw_features(tmp_path):
    x, y = arrays()
    x = x * [100.0, 1.0, 1.0, 1.0] + [0.0, 50.0, 0.0, 0.0]
    run = dpbp.fit({**CONFIG, "data": {"batch_size": 16, "standardize": True}}, x=x, y=y,
                   out=str(tmp_path / "r"), comm=SerialComm())
    p, z = run.params, (x - x.mean(axis=0)) / x.std(axis=0)  # numpy's population std, as StandardScaler
    net = np.tanh(z @ p["layers.0.weight"].T + p["layers.0.bias"]) @ p["layers.1.weight"].T + p["layers.1.bias"]
    np.testing.assert_allclose(np.log(dpbp.load(run.run_dir).predict(x)),
                               net - np.log(np.exp(net).sum(axis=1, keepdims=True)), rtol=1e-9, atol=1e-9)


def test_errors_raise_user_error_with_the_commands_message(tmp_path):
    with pytest.raises(dpbp.UserError) as e:
        dpbp.fit({"optim": {"kind": "lion"}}, out=str(tmp_path / "r"), comm=SerialComm())
    proc = run_dpbp("train", "--set", "optim.kind='lion'", "--out", tmp_path / "c")
    assert proc.returncode == 2
    assert str(e.value).split(": ", 1)[1] in proc.stderr
    with pytest.raises(dpbp.UserError, match="both x and y"):
        dpbp.fit(CONFIG, x=np.zeros((3, 4)))
    with pytest.raises(dpbp.UserError, match="5 features but model.sizes starts with 4"):
        dpbp.fit(CONFIG, x=np.zeros((30, 5)), y=np.zeros(30, int), out=str(tmp_path / "s"), comm=SerialComm())
    with pytest.raises(dpbp.UserError, match="no such run"):
        dpbp.load(str(tmp_path / "missing"))


def test_init_takes_a_dict_of_arrays_as_the_command_takes_a_file(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rng = np.random.default_rng(3)
    start = {"layers.0.weight": rng.normal(size=(8, 4)), "layers.0.bias": rng.normal(size=8),
             "layers.1.weight": rng.normal(size=(3, 8)), "layers.1.bias": rng.normal(size=3)}
    np.savez(tmp_path / "init.npz", **start)
    run = dpbp.fit(CONFIG, x=x, y=y, init=start, out=str(tmp_path / "r"), comm=SerialComm())
    run_dpbp("train", "--set", f"model.sizes={SIZES}", "--set", "train.steps=30", "--set", "train.eval_every=10",
             "--set", "data.batch_size=16", "--set", f"data.path='{tmp_path / 'd.npz'}'", "--init",
             tmp_path / "init.npz", "--out", tmp_path / "cli", "--quiet", check=True)
    for name, value in load_params(tmp_path / "cli" / "final.npz").items():
        np.testing.assert_array_equal(run.params[name], value)
    with pytest.raises(dpbp.UserError, match="layers.1.weight has shape"):
        dpbp.fit(CONFIG, x=x, y=y, init={**start, "layers.1.weight": np.zeros((2, 8))},
                 out=str(tmp_path / "s"), comm=SerialComm())


def readme_examples():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```py\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_examples():
    assert readme_examples(), "README shows dpbp.fit and dpbp.load in ```py blocks"


@pytest.mark.parametrize("k", range(len(readme_examples())))
def test_readme_python_examples_run(tmp_path, k):
    code = readme_examples()[k]
    assert "dpbp.fit" in code or "dpbp.load" in code
    if re.search(r"^import torch$", code, re.M):
        pytest.importorskip("torch", reason="README's PyTorch lines need torch (pip install torch)")
    env = clean_env({"PYTHONPATH": REPO, "DPBP_SERIAL": "1"})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr


def test_fit_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """fit runs inside someone's Python: its Ctrl-C/SIGTERM handling ends with the run."""
    import signal

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in watched}
    dpbp.fit({"data": {"name": "xor"}, "model": {"sizes": [2, 4, 2]}, "train": {"steps": 2}}, out=str(tmp_path / "r"))
    assert {s: signal.getsignal(s) for s in watched} == before
