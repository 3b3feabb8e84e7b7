"""Resume with the trainer's features on: Adam + warmup + cosine + dropout + early stopping, stopped mid-run
(a rank SIGKILLed under mpirun; SIGTERM inside dpbp.fit in this process, as a notebook user interrupted by
a scheduler would be), then resumed: final.npz, best.npz, the held-out records (best_step, best_loss) and
the step early stopping ends at are those of the uninterrupted run, bit for bit. The expectation is the
uninterrupted run itself.

The issue's "done when" job is the default digits job with its --set list, here at 2 ranks and fewer steps.
"""

from __future__ import annotations

import os
import shutil

import pytest

import dpbp
from dpbp.comm import SerialComm
from tests.conftest import metrics
from tests.jobs import Job, assert_bitwise_equal, small

FEATURES = ["--set", "optim.kind='adam'", "--set", "optim.lr=0.05", "--set", "optim.schedule='cosine'",
            "--set", "optim.warmup_steps=10", "--set", "model.dropout=0.1", "--set", "train.early_stop_patience=5",
            "--set", "train.eval_every=4", "--set", "train.checkpoint_every=10", "--set", "train.keep_checkpoints=2"]
STEPS, KILL_AT = 80, 37  # the newest checkpoint before the kill is step 30


def run(*args, ranks=None, env=None):
    rc, out, err, _ = Job(*args, ranks=ranks, env=env).finish(timeout=180)
    return rc, out, err


def same_run(a, b):
    """Both run directories hold the same parameters, best parameters and records (timings aside)."""
    assert_bitwise_equal(a / "final.npz", b / "final.npz")
    assert_bitwise_equal(a / "best.npz", b / "best.npz")
    keep = lambda records: [{k: v for k, v in r.items() if k not in ("samples_per_s", "comm_s", "step_s", "time")}
                            for r in records]  # noqa: E731
    (ta, va), (tb, vb) = metrics(a), metrics(b)
    assert keep(va) == keep(vb) and keep(ta) == keep(tb)
    return va


@pytest.mark.timeout(300)
def test_adam_cosine_dropout_early_stopping_killed_and_resumed_is_bitwise(tmp_path):
    job = small(STEPS, *FEATURES)
    rc, out, err = run(*job, "--out", tmp_path / "whole", ranks=2)
    assert rc == 0, err
    val = metrics(tmp_path / "whole")[1]
    best_step, last = val[-1]["best_step"], val[-1]["step"]
    # the case this test is for: the best is found before the checkpoint the resume starts from, and
    # early stopping ends the run after the kill, counting evaluations from both sides of it
    assert best_step <= 30 < KILL_AT < last < STEPS, (best_step, last)
    rc, out, err = run(*job, "--out", tmp_path / "cut", ranks=2, env={"DPBP_FAULT": f"kill:1:{KILL_AT}"})
    assert rc != 0 and not os.path.exists(tmp_path / "cut" / "final.npz"), err
    rc, out, err = run("--resume", tmp_path / "cut", "--quiet", ranks=2)
    assert rc == 0, err
    assert same_run(tmp_path / "cut", tmp_path / "whole")[-1]["best_step"] == best_step


DONE_WHEN = ["optim.kind=adam", "optim.lr=0.001", "optim.schedule=cosine", "optim.warmup_steps=50",
             "model.dropout=0.1", "train.early_stop_patience=5"]
SHORT = ["train.steps=150", "train.eval_every=25", "train.log_every=25", "train.checkpoint_every=50"]


@pytest.mark.timeout(300)
def test_the_issues_done_when_job_under_mpirun_and_from_dpbp_fit(tmp_path):
    sets = [a for s in DONE_WHEN + SHORT for a in ("--set", s)]
    rc, out, err = run(*sets, "--quiet", "--out", tmp_path / "whole", ranks=2)
    assert rc == 0 and os.path.exists(tmp_path / "whole" / "best.npz"), err
    rc, out, err = run(*sets, "--quiet", "--out", tmp_path / "cut", ranks=2, env={"DPBP_FAULT": "kill:1:120"})
    assert rc != 0 and not os.path.exists(tmp_path / "cut" / "final.npz"), err
    rc, out, err = run("--resume", tmp_path / "cut", "--quiet", ranks=2)
    assert rc == 0, err
    same_run(tmp_path / "cut", tmp_path / "whole")
    # the notebook: dpbp.fit in this process, the same keys; SIGTERM before step 124 stops it after that step
    # (status 75, a checkpoint at step 125, where an evaluation and a record are due: both must be made before
    # the stop, since the resumed run starts after them; a log boundary, as a record's averages are over the
    # steps since the last record, and those before a stop are not in the checkpoint), then fit(resume=...):
    # bitwise the command run alone
    rc, out, err = run(*sets, "--quiet", "--out", tmp_path / "alone")
    assert rc == 0, err
    os.environ["DPBP_FAULT"] = "term:0:124"
    try:
        stopped = dpbp.fit(overrides=DONE_WHEN + SHORT, out=str(tmp_path / "nb"), comm=SerialComm())
    finally:
        del os.environ["DPBP_FAULT"]
    assert stopped.status == 75 and not os.path.exists(tmp_path / "nb" / "final.npz")
    assert os.path.exists(tmp_path / "nb" / "ckpt-00000125.npz")
    resumed = dpbp.fit(resume=str(tmp_path / "nb"), comm=SerialComm())
    assert resumed.status == 0
    same_run(tmp_path / "nb", tmp_path / "alone")
    shutil.rmtree(tmp_path / "cut")
