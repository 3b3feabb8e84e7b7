"""The parameters file: final.npz and best.npz hold only the layers' arrays (so np.load and PyTorch take them
as they are); their description (sizes, activations, dtype, classes, standardize statistics, step, checksum)
is final.json / best.json beside them, which every reader uses; files of dpbp 0.1 (with __meta__ and
standardize.* inside) still load."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import dpbp
from dpbp import checkpoint as ckpt
from tests.conftest import dpbp as run_dpbp, load_params

NAMES = ["bird", "cat", "dog"]


def write_csv(path, n, seed):
    """id, two unscaled features, a name label: the label is the feature sum's tercile."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(50, 10, n), rng.normal(-3, 0.1, n)
    score = (a - 50) / 10 + (b + 3) / 0.1
    label = np.digitize(score, [-0.6, 0.6])
    rows = [f"{1000 + i},{float(a[i])!r},{float(b[i])!r},{NAMES[label[i]]}" for i in range(n)]
    path.write_text("id,a,b,kind\n" + "\n".join(rows) + "\n")
    return np.stack([a, b], axis=1), label


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    x, _ = write_csv(root / "train.csv", 160, 0)
    write_csv(root / "val.csv", 60, 1)
    run_dpbp("train", "--set", "model.sizes=[2,6,3]", "--set", f"data.path='{root / 'train.csv'}'", "--set",
             f"data.val_path='{root / 'val.csv'}'", "--set", "data.target_column='kind'", "--set",
             "data.ignore_columns=['id']", "--set", "data.standardize=true", "--set", "train.steps=30",
             "--set", "train.eval_every=10", "--out", root / "run", "--quiet", check=True)
    return root, x


def test_final_and_best_hold_only_the_layers_and_their_json_the_rest(run):
    root, x = run
    for name in ("final", "best"):
        with np.load(root / f"run/{name}.npz", allow_pickle=False) as f:
            assert sorted(f.files) == ["layers.0.bias", "layers.0.weight", "layers.1.bias", "layers.1.weight"]
        meta = json.loads((root / f"run/{name}.json").read_text())
        assert (meta["sizes"], meta["activation"], meta["output"], meta["dtype"]) == ([2, 6, 3], "tanh", "softmax",
                                                                                      "float64")
        assert meta["classes"] == NAMES and meta["format"] == ckpt.PARAMS_FORMAT
        np.testing.assert_allclose(meta["standardize"]["mean"], x.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(meta["standardize"]["std"], x.std(axis=0), rtol=1e-12)
    assert json.loads((root / "run/final.json").read_text())["step"] == 30


def test_a_pair_that_does_not_belong_together_is_refused(run, tmp_path):
    root, _ = run
    bad = tmp_path / "run"
    bad.mkdir()
    for name in ("config.toml", "final.json"):
        (bad / name).write_text((root / "run" / name).read_text())
    params = load_params(root / "run/final.npz")
    params["layers.1.bias"] = params["layers.1.bias"] + 1e-9
    np.savez(bad / "final.npz", **params)
    with pytest.raises(dpbp.UserError, match="do not match the checksum in .*final.json"):
        dpbp.load(str(bad))
    proc = run_dpbp("evaluate", "--params", bad / "final.npz", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("do not match the checksum") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def old_format_copy(root, tmp_path):
    """The run's final.npz as dpbp 0.1 wrote it: __meta__ and the standardize arrays inside, no final.json."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_text((root / "run/config.toml").read_text())
    meta = json.loads((root / "run/final.json").read_text())
    arrays = {**load_params(root / "run/final.npz"),
              **{f"standardize.{k}": np.array(v) for k, v in meta["standardize"].items()}}
    ckpt.save(str(old / "final.npz"), arrays, {"step": meta["step"], "dpbp": "0.1.0"})
    return old


def test_files_of_dpbp_0_1_still_load_everywhere(run, tmp_path):
    root, _ = run
    old = old_format_copy(root, tmp_path)
    x_raw = np.loadtxt(root / "val.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_array_equal(dpbp.load(str(old)).predict(x_raw), dpbp.load(str(root / "run")).predict(x_raw))
    for params in (old / "final.npz", root / "run/final.npz"):  # evaluate and predict read both alike
        proc = run_dpbp("evaluate", "--params", params, "--data", root / "val.csv", check=True)
        assert re.search(r"^accuracy", proc.stdout, re.M)
        run_dpbp("predict", "--params", params, "--data", root / "val.csv", "--out", tmp_path / f"{params.parent.name}.csv",
                 check=True)
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "run.csv").read_text()
    evaluated = [run_dpbp("evaluate", "--params", p, check=True).stdout.splitlines()[1:]
                 for p in (old / "final.npz", root / "run/final.npz")]
    assert evaluated[0] == evaluated[1]


def test_init_and_verify_start_from_a_parameters_file(run, tmp_path):
    root, _ = run
    common = ["--set", "model.sizes=[2,6,3]", "--set", f"data.path='{root / 'train.csv'}'", "--set",
              "data.target_column='kind'", "--set", "data.ignore_columns=['id']", "--set", "data.standardize=true"]
    from dpbp.config import load_config
    from dpbp.runs import starting_params
    cfg = load_config(str(root / "run/config.toml"))
    for name, value in load_params(root / "run/final.npz").items():
        np.testing.assert_array_equal(starting_params(cfg, str(root / "run/final.npz"))[name], value)
    run_dpbp("train", *common, "--set", "train.steps=2", "--init", root / "run/final.npz", "--out", tmp_path / "again",
             "--quiet", check=True)
    run_dpbp("verify", *common, "--init", root / "run/final.npz", check=True)


def test_a_json_file_dpbp_did_not_write_is_not_taken_for_a_description(run, tmp_path):
    root, _ = run
    params = load_params(root / "run/final.npz")
    np.savez(tmp_path / "weights.npz", **params)
    (tmp_path / "weights.json").write_text('{"sizes": [9, 9], "standardize": {"mean": [0], "std": [1]}}')
    arrays, meta = ckpt.load(str(tmp_path / "weights.npz"))
    assert meta == {} and sorted(arrays) == sorted(params)
    (tmp_path / "weights.json").write_text(json.dumps({"format": ckpt.PARAMS_FORMAT, "sha256": "0" * 64}))
    with pytest.raises(dpbp.UserError, match="do not match the checksum"):
        ckpt.load(str(tmp_path / "weights.npz"))
