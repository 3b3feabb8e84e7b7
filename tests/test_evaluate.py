"""Held-out evaluation during training, `python -m dpbp.evaluate` and `python -m dpbp.predict`.

Every figure is checked against a forward pass written here from the formulas (tanh hidden layer,
softmax output, mean cross-entropy + lambda/2 sum ||W||^2), run on the saved parameters.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import load_params, metrics

FEATURES, CLASSES, L2 = 4, 3, 1e-4


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    return rng.normal(0, 0.8, (n, FEATURES)) + np.eye(CLASSES, FEATURES)[y] * 2, y


def softmax_net(params, x):
    """tanh hidden layers, softmax output: out = softmax(W2 tanh(W1 x + b1) + b2)."""
    L = len(params) // 2
    a = x
    for k in range(L):
        z = a @ params[f"layers.{k}.weight"].T + params[f"layers.{k}.bias"]
        a = np.tanh(z) if k < L - 1 else np.exp(z - z.max(axis=1, keepdims=True))
    return a / a.sum(axis=1, keepdims=True)


def expected_figures(params, x, y):
    p = softmax_net(params, x)
    loss = -np.mean(np.log(p[np.arange(len(y)), y])) + 0.5 * L2 * sum(
        float(np.sum(v * v)) for k, v in params.items() if k.endswith("weight"))
    pred = p.argmax(axis=1)
    confusion = np.bincount(y * CLASSES + pred, minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES)
    return loss, np.mean(pred == y), confusion


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run on a train file, with a separate held-out file evaluated every 10 steps."""
    from tests.conftest import dpbp
    folder = tmp_path_factory.mktemp("evaluate")
    x, y = blobs(300, 0)
    np.savez(folder / "train.npz", x=x, y=y)
    tx, ty = blobs(101, 1)
    np.save(folder / "test_x.npy", tx)
    np.save(folder / "test_y.npy", ty)
    proc = dpbp("train", "--set", f"model.sizes=[{FEATURES},8,{CLASSES}]", "--set", f"loss.l2={L2}",
                "--set", f"data.path='{folder / 'train.npz'}'", "--set", f"data.val_path='{folder / 'test_x.npy'}'",
                "--set", f"data.val_targets='{folder / 'test_y.npy'}'", "--set", "train.steps=40",
                "--set", "train.eval_every=10", "--set", "data.batch_size=32", "--out", folder / "run",
                ranks=2, check=True, env={"DPBP_PROGRESS": "lines"})
    return folder, proc


def test_training_evaluates_the_held_out_set_every_eval_every_steps(run):
    folder, proc = run
    _, val = metrics(folder / "run")
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    assert proc.stdout.count("val_loss") >= 4, proc.stdout  # also in the log
    loss, accuracy, _ = expected_figures(load_params(folder / "run/final.npz"), np.load(folder / "test_x.npy"),
                                         np.load(folder / "test_y.npy"))
    assert val[-1]["loss"] == pytest.approx(loss, rel=1e-12)  # the last one is of the final parameters
    assert val[-1]["accuracy"] == pytest.approx(accuracy, abs=1e-15)


def parse_evaluate(stdout):
    loss = float(re.search(r"^loss (\S+)", stdout, re.M).group(1))
    accuracy, correct, count = re.search(r"^accuracy (\S+) \((\d+) of (\d+)\)", stdout, re.M).groups()
    table = stdout.split("columns: predicted class)\n", 1)[1].splitlines()[1:1 + CLASSES]
    confusion = np.array([[int(v) for v in line.split()[1:]] for line in table])
    return loss, float(accuracy), int(correct), int(count), confusion


@pytest.mark.parametrize("ranks", [None, 3])
def test_evaluate_prints_loss_accuracy_and_confusion_matrix(run, run_cli, ranks):
    folder, _ = run
    proc = run_cli("evaluate", "--params", folder / "run/final.npz", "--data", folder / "test_x.npy",
                   "--set", f"data.targets='{folder / 'test_y.npy'}'", ranks=ranks, check=True)
    loss, accuracy, confusion = expected_figures(load_params(folder / "run/final.npz"),
                                                 np.load(folder / "test_x.npy"), np.load(folder / "test_y.npy"))
    got = parse_evaluate(proc.stdout)
    assert got[0] == pytest.approx(loss, rel=1e-5)  # printed with 6 significant digits
    assert got[1] == pytest.approx(accuracy, abs=1e-4) and got[2:4] == (int(np.trace(confusion)), 101)
    np.testing.assert_array_equal(got[4], confusion)
    assert proc.stdout.count("confusion matrix") == 1  # printed once, by rank 0


def test_evaluate_defaults_to_the_runs_held_out_set_and_reads_checkpoints(run, run_cli):
    folder, _ = run
    ckpt = sorted((folder / "run").glob("ckpt-*.npz"))[-1]
    proc = run_cli("evaluate", "--params", ckpt, check=True)
    with np.load(ckpt) as f:
        params = {k: f[k] for k in f.files if k.startswith("layers.")}
    loss, _, confusion = expected_figures(params, np.load(folder / "test_x.npy"), np.load(folder / "test_y.npy"))
    got = parse_evaluate(proc.stdout)
    assert got[0] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_array_equal(got[4], confusion)


@pytest.mark.parametrize("ranks", [None, 2])
def test_predict_writes_every_row_in_order(run, run_cli, tmp_path, ranks):
    """9000 rows: under 2 ranks that is two gathered blocks (8192 + 808), with uneven shares."""
    folder, _ = run
    x, _ = blobs(9000, 5)
    np.save(tmp_path / "new.npy", x)
    run_cli("predict", "--params", folder / "run/final.npz", "--data", tmp_path / "new.npy",
            "--out", tmp_path / "p.csv", ranks=ranks, check=True)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "row,predicted,p0,p1,p2"
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    p = softmax_net(load_params(folder / "run/final.npz"), x)
    np.testing.assert_array_equal(table[:, 0], np.arange(9000))
    np.testing.assert_array_equal(table[:, 1], p.argmax(axis=1))
    np.testing.assert_allclose(table[:, 2:], p, rtol=1e-12, atol=1e-15)


def test_bad_input_to_evaluate_and_predict_is_one_clear_message(run, run_cli, tmp_path):
    folder, _ = run
    (tmp_path / "lonely.npz").write_bytes((folder / "run/final.npz").read_bytes())
    cases = [
        (("evaluate", "--params", tmp_path / "lonely.npz"), "no --config given and no config.toml next to"),
        (("evaluate", "--params", folder / "run/final.npz", "--data", folder / "test_x.npy"),
         "holds only inputs; name the file with their targets in data.targets"),
        (("predict", "--params", folder / "run/final.npz", "--data", folder / "test_x.npy", "--out",
          tmp_path / "no/such/dir/p.csv"), "cannot write there"),
        (("predict", "--params", folder / "run/final.npz", "--data", tmp_path / "wide.npy", "--out",
          tmp_path / "p.csv"), "inputs have 5 features but model.sizes starts with 4"),
    ]
    np.save(tmp_path / "wide.npy", np.zeros((10, 5)))
    for args, needle in cases:
        proc = run_cli(*args, ranks=2, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count(needle) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_predict_never_overwrites_an_input_nor_writes_into_a_directory(run, run_cli, tmp_path):
    folder, _ = run
    params, data, config = folder / "run/final.npz", tmp_path / "new.npy", folder / "run/config.toml"
    np.save(data, blobs(20, 6)[0])
    before = {p: p.read_bytes() for p in (params, data, config)}
    (tmp_path / "outdir").mkdir()
    cases = [(data, "is --data"), (params, "is --params"), (config, "is the run's config"),
             (tmp_path / "outdir", "is a directory; name the CSV file to write")]
    for out, needle in cases:
        proc = run_cli("predict", "--params", params, "--data", data, "--out", out, ranks=2, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count(needle) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npy", "outdir"]  # no outdir.tmp left behind
    assert not list((tmp_path / "outdir").iterdir())


def test_predict_help_shows_data_as_required(run_cli):
    proc = run_cli("predict", "--help", check=True)
    usage = " ".join(proc.stdout.split("\n\n")[0].split())
    assert "--data FILE" in usage and "[--data" not in usage, usage
    proc = run_cli("predict", "--params", "x.npz", "--out", "p.csv", timeout=60)
    assert proc.returncode == 2 and "the following arguments are required: --data" in proc.stderr, proc.stderr


def test_evaluate_names_a_missing_params_file_first(run_cli, tmp_path):
    proc = run_cli("evaluate", "--params", tmp_path / "missing.npz", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(f"--params '{tmp_path / 'missing.npz'}': no such file") == 1, proc.stderr
    assert "config.toml" not in proc.stderr


NAMES = ["dog", "cat", "bird"]  # label k is NAMES[k]; deliberately not sorted


def write_named_csv(path, x, y):
    with open(path, "w") as f:
        f.write("id,a,b,c,d,kind\n")
        for i, (row, label) in enumerate(zip(x.tolist(), y.tolist())):
            f.write(",".join([f"id{i}", *map(repr, row), NAMES[label]]) + "\n")


def test_class_names_reach_evaluate_and_predict(run_cli, tmp_path):
    x, y = blobs(200, 2)
    write_named_csv(tmp_path / "train.csv", x, y)
    tx, ty = blobs(50, 3)
    write_named_csv(tmp_path / "test.csv", tx, ty)
    run_cli("train", "--set", f"model.sizes=[{FEATURES},8,{CLASSES}]", "--set", f"loss.l2={L2}",
            "--set", f"data.path='{tmp_path / 'train.csv'}'", "--set", "data.target_column='kind'",
            "--set", "data.ignore_columns=['id']", "--set", f"data.classes={NAMES}", "--set", "train.steps=20",
            "--out", tmp_path / "run", "--quiet", check=True, env={"DPBP_SERIAL": "1"})
    assert f"classes = {NAMES}".replace("'", '"') in (tmp_path / "run/config.toml").read_text()
    params = load_params(tmp_path / "run/final.npz")
    proc = run_cli("evaluate", "--params", tmp_path / "run/final.npz", "--data", tmp_path / "test.csv",
                   ranks=2, check=True)
    loss, accuracy, confusion = expected_figures(params, tx, ty)
    lines = proc.stdout.split("columns: predicted class)\n", 1)[1].splitlines()
    assert lines[0].split() == ["true\\pred", *NAMES]
    for k, name in enumerate(NAMES):
        assert lines[1 + k].split() == [name, *map(str, confusion[k])]
    assert float(re.search(r"^accuracy (\S+)", proc.stdout, re.M).group(1)) == pytest.approx(accuracy, abs=1e-4)
    run_cli("predict", "--params", tmp_path / "run/final.npz", "--data", tmp_path / "test.csv",
            "--out", tmp_path / "p.csv", ranks=2, check=True)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "row,predicted,p0,p1,p2"
    p = softmax_net(params, tx)
    assert [line.split(",")[1] for line in lines[1:]] == [NAMES[k] for k in p.argmax(axis=1)]
    table = np.array([[float(v) for v in line.split(",")[2:]] for line in lines[1:]])
    np.testing.assert_allclose(table, p, rtol=1e-12, atol=1e-15)


def test_standardized_runs_predict_with_the_saved_statistics(run_cli, tmp_path):
    from dpbp import checkpoint
    x, y = blobs(200, 4)
    x = x * [1.0, 100.0, 0.01, 5.0] + [0.0, 1e3, -7.0, 2.0]
    np.savez(tmp_path / "train.npz", x=x, y=y)
    common = ["--set", f"model.sizes=[{FEATURES},8,{CLASSES}]", "--set", f"loss.l2={L2}", "--set",
              "data.standardize=true", "--set", "train.steps=20", "--set", "data.val_fraction=0.25",
              "--set", "data.shuffle=false", "--quiet"]  # unshuffled: the first 150 rows train
    run_cli("train", *common, "--set", f"data.path='{tmp_path / 'train.npz'}'", "--out", tmp_path / "run",
            ranks=2, check=True)
    with open(tmp_path / "run/final.json") as f:  # the parameters file's description holds them
        saved = {f"standardize.{k}": np.array(v) for k, v in json.load(f)["standardize"].items()}
    mean, std = x[:150].mean(axis=0), x[:150].std(axis=0)
    np.testing.assert_allclose(saved["standardize.mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(saved["standardize.std"], std, rtol=1e-12)
    # The run's own held-out set: the statistics of its training rows are computed again, the same bits.
    _, val = metrics(tmp_path / "run")
    proc = run_cli("evaluate", "--params", tmp_path / "run/final.npz", ranks=3, check=True)
    assert float(re.search(r"^loss (\S+)", proc.stdout, re.M).group(1)) == pytest.approx(val[-1]["loss"], rel=1e-5)
    # Another file gets the statistics saved with the parameters.
    np.save(tmp_path / "new.npy", x[150:])
    run_cli("predict", "--params", tmp_path / "run/final.npz", "--data", tmp_path / "new.npy", "--out",
            tmp_path / "p.csv", ranks=2, check=True)
    params = load_params(tmp_path / "run/final.npz")
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 2:], softmax_net(params, (x[150:] - mean) / std), rtol=1e-10, atol=1e-14)
    checkpoint.save(str(tmp_path / "run/bare.npz"), params)  # parameters without their statistics
    proc = run_cli("predict", "--params", tmp_path / "run/bare.npz", "--data", tmp_path / "new.npy", "--out",
                   tmp_path / "q.csv", ranks=2, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("holds no standardize statistics") == 1, proc.stderr
    proc = run_cli("evaluate", "--params", tmp_path / "run/bare.npz", "--data", tmp_path / "train.npz", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("holds no standardize statistics") == 1, proc.stderr


def test_a_run_keeps_the_class_names_of_its_file_and_warns_once_about_unused_outputs(run_cli, tmp_path):
    x, y = blobs(200, 2)
    write_named_csv(tmp_path / "train.csv", x, y)
    proc = run_cli("train", "--set", f"model.sizes=[{FEATURES},8,4]", "--set", f"data.path='{tmp_path / 'train.csv'}'",
                   "--set", "data.target_column='kind'", "--set", "data.ignore_columns=['id']", "--set",
                   "train.steps=10", "--out", tmp_path / "run", "--quiet", ranks=2, check=True)
    assert 'classes = ["bird", "cat", "dog"]' in (tmp_path / "run/config.toml").read_text()  # sorted names
    assert proc.stderr.count("model.sizes ends with 4 outputs but the labels use only 3 classes (no label 3)") == 1
    tx, _ = blobs(20, 3)
    write_named_csv(tmp_path / "new.csv", tx, np.zeros(20, int))
    run_cli("predict", "--params", tmp_path / "run/final.npz", "--data", tmp_path / "new.csv", "--out",
            tmp_path / "p.csv", check=True)
    p = softmax_net(load_params(tmp_path / "run/final.npz"), tx)
    predicted = [line.split(",")[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert predicted == [(["bird", "cat", "dog"] + ["3"])[k] for k in p.argmax(axis=1)]
