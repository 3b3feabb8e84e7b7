"""Regression targets: the held-out RMSE, MAE and R² in metrics.jsonl, the progress line, the summary and
`python -m dpbp.evaluate`, against scikit-learn's metrics on a forward pass written out here."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import load_params, metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")

SIZES, L2 = [3, 8, 2], 1e-3


def regression_data(n, seed):
    """Two smooth targets of three features, with noise: y (n, 2) floats."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = np.stack([np.sin(x[:, 0]) + 0.5 * x[:, 1], x[:, 2] * x[:, 0]], axis=1) + 0.05 * rng.normal(size=(n, 2))
    return x, y


def forward(params, x):
    """tanh hidden layer, identity output: out = W2 tanh(W1 x + b1) + b2."""
    h = np.tanh(x @ params["layers.0.weight"].T + params["layers.0.bias"])
    return h @ params["layers.1.weight"].T + params["layers.1.bias"]


def expected(y, out):
    """scikit-learn's figures (multioutput uniform average) and the numpy formulas written out."""
    rmse = np.mean(np.sqrt(np.mean((y - out) ** 2, axis=0)))
    mae = np.mean(np.mean(np.abs(y - out), axis=0))
    r2 = np.mean(1 - ((y - out) ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0))
    assert rmse == pytest.approx(sklearn_metrics.root_mean_squared_error(y, out), rel=1e-12)
    assert mae == pytest.approx(sklearn_metrics.mean_absolute_error(y, out), rel=1e-12)
    assert r2 == pytest.approx(sklearn_metrics.r2_score(y, out), rel=1e-12)
    return {"rmse": rmse, "mae": mae, "r2": r2}


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    from tests.conftest import dpbp
    root = tmp_path_factory.mktemp("regression")
    x, y = regression_data(300, 1)
    xv, yv = regression_data(90, 2)
    np.savez(root / "train.npz", x=x, y=y)
    np.savez(root / "val.npz", x=xv, y=yv)
    proc = dpbp("train", "--set", f"model.sizes={SIZES}", "--set", "model.output='identity'", "--set",
                "loss.kind='squared_error'", "--set", f"loss.l2={L2}", "--set", f"data.path='{root / 'train.npz'}'",
                "--set", f"data.val_path='{root / 'val.npz'}'", "--set", "train.steps=60", "--set",
                "train.eval_every=20", "--set", "optim.lr=0.05", "--out", root / "run", ranks=2, check=True)
    return root, proc, (xv, yv)


def test_held_out_records_and_lines_hold_rmse_mae_r2(regression_run):
    root, proc, (xv, yv) = regression_run
    _, val = metrics(root / "run")
    want = expected(yv, forward(load_params(root / "run/final.npz"), xv))
    last = val[-1]
    for key in ("rmse", "mae", "r2"):
        assert last[key] == pytest.approx(want[key], rel=1e-10), key
    assert "accuracy" not in last
    # The loss still includes the l2 penalty; the regression figures do not.
    params = load_params(root / "run/final.npz")
    penalty = L2 / 2 * sum((params[f"layers.{k}.weight"] ** 2).sum() for k in range(2))
    out = forward(params, xv)
    assert last["loss"] == pytest.approx(0.5 * ((yv - out) ** 2).sum() / len(yv) + penalty, rel=1e-10)
    lines = re.findall(r"^eval step (\d+) .* rmse (\S+) mae (\S+) r2 (\S+)$", proc.stdout, re.M)
    assert [int(s) for s, *_ in lines] == [r["step"] for r in val]
    assert float(lines[-1][1]) == pytest.approx(want["rmse"], rel=1e-5)
    assert re.search(r"val_rmse \S+ val_mae \S+ val_r2 \S+", proc.stdout.splitlines()[-1]), proc.stdout


@pytest.mark.parametrize("ranks", [None, 3])
def test_evaluate_reports_rmse_mae_r2_the_same_on_any_number_of_ranks(regression_run, ranks):
    from tests.conftest import dpbp
    root, _, (xv, yv) = regression_run
    proc = dpbp("evaluate", "--params", root / "run/final.npz", ranks=ranks, check=True)
    got = re.search(r"^rmse (\S+) mae (\S+) r2 (\S+)", proc.stdout, re.M)
    assert got, proc.stdout
    want = expected(yv, forward(load_params(root / "run/final.npz"), xv))
    assert [float(v) for v in got.groups()] == pytest.approx([want["rmse"], want["mae"], want["r2"]], rel=1e-5)
    assert "confusion" not in proc.stdout


def test_regression_metrics_of_constant_targets_follow_scikit_learn():
    from dpbp.evaluate import regression_metrics, regression_sums
    y = np.array([[2.0, 1.0], [2.0, 3.0], [2.0, 0.5]])
    for out in (np.array([[2.0, 1.5], [2.0, 2.0], [2.0, 1.0]]), np.array([[1.0, 1.5], [2.5, 2.0], [2.0, 1.0]])):
        got = regression_metrics(regression_sums(out, y), len(y))
        assert got["r2"] == pytest.approx(sklearn_metrics.r2_score(y, out), rel=1e-12)
        assert got["rmse"] == pytest.approx(sklearn_metrics.root_mean_squared_error(y, out), rel=1e-12)
