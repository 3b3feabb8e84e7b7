"""python -m dpbp.report: a figure that shows the runs, a Markdown summary that matches metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpbp.report import load_run, step_times
from tests.conftest import REPO, dpbp, metrics

SMALL = ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", "train.steps=60",
         "--set", "data.batch_size=16", "--set", "train.log_every=10", "--set", "train.eval_every=20",
         "--set", "comm.reduce='reproducible'", "--quiet"]
C0 = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first colour: the first run's lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job alone and on two ranks."""
    root = tmp_path_factory.mktemp("report")
    dpbp("train", *SMALL, "--out", root / "one", check=True, env={"DPBP_SERIAL": "1"})
    dpbp("train", *SMALL, "--out", root / "two", ranks=2, check=True)
    return root / "one", root / "two"


def picture(path):
    import matplotlib.image
    return matplotlib.image.imread(path)[..., :3]  # RGB floats in [0, 1]


def pixels_near(img, rgb, tol=0.08):
    return int(np.count_nonzero(np.all(np.abs(img - rgb) < tol, axis=-1)))


def test_report_of_one_run(runs):
    one, _ = runs
    proc = dpbp("report", one, timeout=120)
    assert proc.returncode == 0, proc.stderr
    img = picture(one / "report.png")
    assert img.shape[:2] == (440, 1500)
    not_white = np.count_nonzero(np.any(img < 0.9, axis=-1)) / img[..., 0].size
    assert not_white > 0.05, f"only {not_white:.1%} of the figure is drawn on"
    # Three C0 lines (training loss, held-out loss, accuracy), each hundreds of pixels long; axes,
    # text and legend swatches alone stay far below this.
    assert pixels_near(img, C0) > 1500, pixels_near(img, C0)

    md = (one / "report.md").read_text()
    train, val = metrics(one)
    assert "![loss, held-out accuracy and time per step](report.png)" in md
    assert "| ranks (world size) | 1 |" in md and "| steps | 60 |" in md
    assert f"| final training loss | {train[-1]['loss']:.6g} |" in md
    assert f"| final held-out accuracy | {val[-1]['accuracy']:.4f} |" in md
    best = max(val, key=lambda r: r["accuracy"])
    assert f"| best held-out accuracy | {best['accuracy']:.4f} (step {best['step']}) |" in md
    assert "| `comm.reduce` | `\"fast\"` | `\"reproducible\"` |" in md  # a key changed from its default


def test_report_overlays_several_runs(runs):
    one, two = runs
    proc = dpbp("report", one, two, timeout=120)
    assert proc.returncode == 0, proc.stderr
    img = picture(one / "compare.png")
    C1 = np.array([0xFF, 0x7F, 0x0E]) / 255
    # The reproducible reduction trains both runs to the same numbers, so run two's lines cover run
    # one's loss and accuracy lines; its time lines (its own timing) and legend still show in C1.
    assert pixels_near(img, C1) > 300 and pixels_near(img, C0) > 100
    md = (one / "compare.md").read_text()
    assert "![loss, held-out accuracy and time per step](compare.png)" in md
    assert f"| | `{one}` | `{two}` |" in md
    assert "| ranks (world size) | 1 | 2 |" in md


def test_a_missing_matplotlib_is_one_clear_message(runs, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
            "from dpbp.cli import run; from dpbp.report import main\n"
            f"sys.exit(run(main, [{str(runs[0])!r}], prog='dpbp.report'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.count("pip install 'dpbp[report]'") == 1 and "Traceback" not in proc.stderr


def test_not_a_run_directory(tmp_path):
    proc = dpbp("report", tmp_path / "nope", timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = dpbp("report", tmp_path, timeout=60)
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr


def test_a_requeued_run_keeps_the_newest_figures(tmp_path):
    """Steps after the last checkpoint are logged twice; a killed job may leave half a line."""
    rec = {"epoch": 0, "samples_per_s": 100.0, "comm_s": 0.1, "step_s": 1.0, "time": 1.0}
    lines = [{"step": 10, "loss": 1.0, **rec}, {"step": 20, "loss": 0.9, **rec},
             {"step": 20, "split": "val", "loss": 0.95, "accuracy": 0.5, "epoch": 0},
             {"step": 30, "loss": 0.8, **rec},  # then preempted; resumed from the checkpoint at step 20
             {"step": 30, "loss": 0.7, **rec}, {"step": 40, "loss": 0.6, **rec}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 50, "lo')
    run = load_run(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in run.train] == [(10, 1.0), (20, 0.9), (30, 0.7), (40, 0.6)]
    assert [r["step"] for r in run.val] == [20] and run.skipped == 1


def test_step_time_split():
    # 1000 samples/s at batch 50: 50 ms a step; a quarter of the interval in the Allreduce.
    compute, comm = step_times({"batch": 50, "samples_per_s": 1000.0, "comm_s": 0.5, "step_s": 2.0})
    assert compute == pytest.approx(0.0375) and comm == pytest.approx(0.0125)
