"""The training command end to end: outputs, and agreement of 1..4 ranks with the 1-process run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import REPO, load_params, metrics

SPIRALS = ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", "train.steps=100",
           "--set", "data.batch_size=10", "--set", "train.log_every=25", "--set", "train.eval_every=50",
           "--quiet"]


def test_outputs_of_a_run(run_cli, tmp_path):
    out = tmp_path / "run"
    run_cli("train", *SPIRALS, "--out", out, check=True)
    names = sorted(os.listdir(out))
    assert {"config.toml", "metrics.jsonl", "final.npz"} <= set(names)
    train, val = metrics(out)
    assert [r["step"] for r in train] == [25, 50, 75, 100]
    assert all({"step", "epoch", "loss", "samples_per_s", "comm_s", "accuracy"} <= set(r) for r in train)
    assert [r["step"] for r in val] == [50, 100] and all(0 <= r["accuracy"] <= 1 for r in val)
    p = load_params(out / "final.npz")
    assert sorted(p) == [f"layers.{k}.{w}" for k in range(3) for w in ("bias", "weight")]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_ranks_agree_with_one_process(run_cli, tmp_path, ranks):
    """float64: relative difference <= 1e-10 after 100 steps, batch 10 (3 and 4 ranks get uneven shares)."""
    run_cli("train", *SPIRALS, "--out", tmp_path / "alone", check=True, env={"DPBP_SERIAL": "1"})
    run_cli("train", *SPIRALS, "--out", tmp_path / "mpi", ranks=ranks, check=True)
    a, b = load_params(tmp_path / "alone/final.npz"), load_params(tmp_path / "mpi/final.npz")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_default_job_learns_digits(run_cli, tmp_path):
    proc = run_cli("train", "--out", tmp_path / "d", "--quiet", check=True)
    _, val = metrics(tmp_path / "d")
    assert val[-1]["accuracy"] >= 0.95, proc.stdout


def test_float32_end_to_end(run_cli, tmp_path):
    run_cli("train", *SPIRALS, "--set", "model.dtype='float32'", "--out", tmp_path / "f", check=True)
    assert all(v.dtype == np.float32 for v in load_params(tmp_path / "f/final.npz").values())
