"""The run directory is safe to name: --resume never starts a run where a typo points, --out never writes
among a user's own files, --resume-or-start (the launch scripts') does either explicitly, and a run
directory works from any working directory (its data paths are stored absolute)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from dpbp import launch
from dpbp.config import load_config
from tests.conftest import REPO, dpbp, load_params

XOR = os.path.join(REPO, "configs", "xor.toml")
QUICK = ["--config", XOR, "--set", "train.steps=3", "--quiet"]


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs + [""])


def one_error(proc):
    """The one message line of a refused command (exit 2, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "no such directory; --resume continues a run"),
    (lambda p: os.mkdir(p), "holds no dpbp run"),
    (lambda p: open(p, "w").close(), "--resume takes a run directory, and"),
    (lambda p: os.symlink("/dev/null", p), "is not a directory"),
    (lambda p: (os.mkdir(p), open(os.path.join(p, "notes.txt"), "w").close()), "holds no dpbp run"),
])
def test_resume_refuses_a_directory_without_a_run_and_creates_nothing(tmp_path, make, expected):
    target = tmp_path / "runs" / "cls_sdt"
    target.parent.mkdir()
    make(str(target))
    before = listing(tmp_path)
    message = one_error(dpbp("train", "--resume", target, *QUICK, cwd=tmp_path))
    assert expected in message, message
    assert listing(tmp_path) == before  # no run directory, no runs/default-..., nothing


def test_resume_onto_a_parameters_file_names_its_run_directory(tmp_path):
    run = tmp_path / "run"
    dpbp("train", "--out", run, *QUICK, check=True)
    message = one_error(dpbp("train", "--resume", run / "final.npz", *QUICK))
    assert "--resume takes a run directory" in message and f"--resume {run} continues its run" in message, message


def test_resume_or_start_starts_then_continues(tmp_path):
    """The batch scripts' flag: a fresh start in a missing directory, a resume once it holds a run; the
    resumed run ends where one uninterrupted run of 6 steps does."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    dpbp("train", "--resume-or-start", run, *QUICK, check=True)
    assert (run / "ckpt-00000003.npz").exists()
    dpbp("train", "--resume-or-start", run, *QUICK, "--set", "train.steps=6", check=True)
    dpbp("train", "--out", whole, *QUICK, "--set", "train.steps=6", check=True)
    a, b = load_params(run / "final.npz"), load_params(whole / "final.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("name", [launch.ARGS_FILE, launch.LOG_FILE, launch.LOST_FILE])
def test_resume_or_start_takes_a_directory_holding_only_the_launchers_files(tmp_path, name):
    """Each file dpbp.launch writes into the run directory: an attempt lost before its first checkpoint
    leaves lost-requeues.jsonl there, and the requeued attempt must start afresh, not refuse."""
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("written by the launcher\n")
    dpbp("train", "--resume-or-start", run, *QUICK, check=True)
    assert (run / "final.npz").exists() and (run / name).read_text() == "written by the launcher\n"


@pytest.mark.parametrize("flag", ["--out", "--resume-or-start"])
def test_a_directory_of_the_users_own_files_is_refused(tmp_path, flag):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.toml").write_text("# my own settings\n")
    message = one_error(dpbp("train", flag, mine, *QUICK))
    assert "is not empty (config.toml) and holds no dpbp run" in message, message
    assert listing(mine) == [".", "config.toml"] and (mine / "config.toml").read_text() == "# my own settings\n"


def test_out_refuses_an_existing_run_even_before_its_first_checkpoint(tmp_path):
    """header.jsonl marks a run from its start (choose_run_dir creates it first)."""
    run = tmp_path / "run"
    dpbp("train", "--out", run, *QUICK, check=True)
    for name in os.listdir(run):
        if name != "header.jsonl":
            os.unlink(run / name)
    message = one_error(dpbp("train", "--out", run, *QUICK))
    assert "already holds a run; continue it with --resume" in message, message


def test_a_run_directory_works_from_another_directory(tmp_path):
    """Relative data paths are resolved at the start and stored absolute: --resume and dpbp.evaluate from
    elsewhere find the data, and train on the same bits."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    rows = [f"{a},{b},{c},{int(a + b > 0)}" for a, b, c in x]
    (project / "train.csv").write_text("a,b,c,label\n" + "\n".join(rows[:30]) + "\n")
    (project / "held.csv").write_text("a,b,c,label\n" + "\n".join(rows[30:]) + "\n")
    sets = ["--set", "data.path='train.csv'", "--set", "data.val_path='held.csv'", "--set",
            "data.target_column='label'", "--set", "model.sizes=[3,4,2]", "--set", "data.batch_size=10",
            "--set", "train.steps=3", "--quiet"]
    dpbp("train", "--out", "run", *sets, cwd=project, check=True)
    cfg = load_config(str(project / "run" / "config.toml"))
    assert cfg["data.path"] == str(project / "train.csv") and cfg["data.val_path"] == str(project / "held.csv")
    assert cfg["data.targets"] == "" and cfg["data.val_targets"] == ""  # empty stays empty
    moved = elsewhere / "run"
    shutil.move(str(project / "run"), moved)
    dpbp("train", "--resume", "run", "--set", "train.steps=6", "--quiet", cwd=elsewhere, check=True)
    dpbp("train", "--out", project / "whole", *sets, "--set", "train.steps=6", cwd=project, check=True)
    a, b = load_params(moved / "final.npz"), load_params(project / "whole" / "final.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b)
    for params in ("run/final.npz", "run"):  # a run directory stands for its final.npz
        proc = dpbp("evaluate", "--params", params, cwd=elsewhere, check=True)
        assert f"evaluated run/final.npz on held-out data file '{project / 'held.csv'}': 10 samples" in proc.stdout, proc.stdout
