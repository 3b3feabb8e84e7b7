"""Exact resume: SIGKILL a job mid-training, `--resume RUN_DIR`, and get the uninterrupted run's bytes.

fast reduce: bitwise with the same number of ranks, rounding-level with another number.
reproducible reduce: bitwise whatever the number of ranks, before and after the kill.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from dpbp.checkpoint import list_checkpoints
from dpbp.errors import EXIT_USAGE
from tests.conftest import load_params, metrics
from tests.jobs import Job, assert_bitwise_equal, error_lines, small

STEPS = 60
KILL_AT = 37  # rank 1 is SIGKILLed before step 37 (0-based); the newest checkpoint is step 30
CKPT = ["--set", "train.checkpoint_every=10", "--set", "train.log_every=5", "--set", "train.keep_checkpoints=2"]
REPRO = ["--set", "comm.reduce='reproducible'", "--set", "comm.chunk=8"]


def run(*args, ranks=None, env=None, expect=0):
    rc, out, err, _ = Job(*args, ranks=ranks, env=env).finish(timeout=120)
    assert rc == expect, (rc, out, err)
    return out, err


def killed_run(tmp_path, name, ranks, *extra):
    """A job whose rank 1 is SIGKILLed at step KILL_AT: it must end (not hang) and leave checkpoints."""
    out_dir = tmp_path / name
    rc, out, err, _ = Job(*small(STEPS, *CKPT, *extra), "--out", out_dir, ranks=ranks,
                          env={"DPBP_FAULT": f"kill:1:{KILL_AT}"}).finish(timeout=120)
    assert rc != 0 and not os.path.exists(out_dir / "final.npz"), (rc, err)
    assert [os.path.basename(p) for p in list_checkpoints(out_dir)] == ["ckpt-00000030.npz", "ckpt-00000020.npz"]
    return out_dir


@pytest.fixture(scope="module")
def fast4(tmp_path_factory):
    """(uninterrupted 4-rank run, 4-rank run killed at step KILL_AT), shared; tests resume copies."""
    base = tmp_path_factory.mktemp("fast4")
    run(*small(STEPS, *CKPT), "--out", base / "whole", ranks=4)
    return base / "whole", killed_run(base, "cut", 4)


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "resumed")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks", [2, 4])
def test_fast_kill_and_resume_on_the_same_ranks_is_bitwise(tmp_path, fast4, ranks):
    if ranks == 4:
        whole, out_dir = fast4[0], copy_of(fast4[1], tmp_path)
    else:
        run(*small(STEPS, *CKPT), "--out", tmp_path / "whole", ranks=ranks)
        whole, out_dir = tmp_path / "whole", killed_run(tmp_path, "cut", ranks)
    out, err = run("--resume", out_dir, ranks=ranks)
    assert "resum" in out and "warning" not in err, (out, err)
    assert_bitwise_equal(out_dir / "final.npz", whole / "final.npz")
    # metrics.jsonl reads as one run: the records after step 30 that the killed job wrote are replaced
    train, _ = metrics(out_dir)
    assert [r["step"] for r in train] == list(range(5, STEPS + 1, 5)), train


@pytest.mark.timeout(240)
def test_reproducible_kill_on_4_ranks_resume_on_2_is_bitwise_the_3_rank_and_serial_runs(tmp_path):
    run(*small(STEPS, *CKPT, *REPRO), "--out", tmp_path / "p3", ranks=3)
    run(*small(STEPS, *CKPT, *REPRO), "--out", tmp_path / "p1", env={"DPBP_SERIAL": "1"})
    out_dir = killed_run(tmp_path, "cut", 4, *REPRO)
    run("--resume", out_dir, ranks=2)
    assert_bitwise_equal(out_dir / "final.npz", tmp_path / "p3/final.npz")
    assert_bitwise_equal(out_dir / "final.npz", tmp_path / "p1/final.npz")


@pytest.mark.timeout(240)
def test_fast_resume_on_other_ranks_differs_only_by_rounding(tmp_path, fast4):
    out_dir = copy_of(fast4[1], tmp_path)
    out, err = run("--resume", out_dir, ranks=2)
    assert "rounding" in err and "'reproducible'" in err, err  # the user is told what to expect
    a, b = load_params(out_dir / "final.npz"), load_params(fast4[0] / "final.npz")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.timeout(180)
def test_resume_with_a_trajectory_change_is_refused_naming_the_keys_unless_forced(tmp_path):
    out_dir = tmp_path / "r"
    run(*small(20, "--set", "train.checkpoint_every=10"), "--out", out_dir, ranks=2)
    change = ["--set", "optim.lr=0.05", "--set", "model.activation='tanh'", "--set", "train.steps=30"]
    out, err = run("--resume", out_dir, *change, ranks=2, expect=EXIT_USAGE)
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "optim.lr: 0.1 -> 0.05" in lines[0] and "model.activation: 'relu' -> 'tanh'" in lines[0], err
    assert "train.steps" not in lines[0] and "--force" in lines[0]
    assert not os.path.exists(out_dir / "ckpt-00000030.npz")
    out, err = run("--resume", out_dir, *change, "--force", ranks=2)
    assert "--force" in err and os.path.exists(out_dir / "ckpt-00000030.npz")
    # extending a run is not a trajectory change: train.steps may grow without --force
    run("--resume", out_dir, "--set", "train.steps=40", ranks=2)
    assert os.path.exists(out_dir / "ckpt-00000040.npz")


@pytest.mark.timeout(120)
def test_resume_refuses_changed_data_contents(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((50, 2)), y=rng.integers(0, 2, 50))
    args = small(10, "--set", f"data.path='{data}'")
    run(*args, "--out", tmp_path / "r", ranks=2)
    np.savez(data, x=rng.random((50, 2)), y=rng.integers(0, 2, 50))  # same path and shape, new numbers
    out, err = run("--resume", tmp_path / "r", "--set", "train.steps=20", ranks=2, expect=EXIT_USAGE)
    assert "data (contents" in err, err


@pytest.mark.timeout(120)
def test_resume_or_start_of_a_directory_without_a_run_starts_fresh_there(tmp_path):
    """What a requeued batch script relies on: the first attempt and every later one run the same command
    (--resume-or-start; plain --resume refuses a directory without a run: tests/test_run_dir.py)."""
    run(*small(20), "--out", tmp_path / "ref", ranks=2)
    out_dir = tmp_path / "new" / "run"
    run(*small(20), "--resume-or-start", out_dir, ranks=2)
    assert_bitwise_equal(out_dir / "final.npz", tmp_path / "ref/final.npz")
