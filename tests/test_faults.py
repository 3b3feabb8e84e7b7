"""No hangs, one message: faults injected on one rank of `mpirun -n 4` (DPBP_FAULT), signals, bad input.

Every job runs under a hard limit (Job.finish kills it and fails the test); pytest-timeout guards the
test itself. Exit statuses checked here are what mpich's mpirun (hydra) returns: the ranks' common
status when they all exit alike, the MPI_Abort code after an abort, and 9 when a rank was SIGKILLed.
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest

from dpbp.checkpoint import list_checkpoints, load
from dpbp.errors import EXIT_CRASH, EXIT_FAULT, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE
from tests.jobs import Job, assert_bitwise_equal, error_lines, small, wait_for_step

P = 4
LIMIT_S = 30  # the bound for the whole job to end after a fault


def faulted(tmp_path, fault):
    """Run a 4-rank job with DPBP_FAULT=fault (at step 5); (status, stderr, seconds from step 5 to the end)."""
    out_dir = tmp_path / "r"
    job = Job(*small(40, "--set", "train.log_every=1"), "--out", out_dir, ranks=P, env={"DPBP_FAULT": fault})
    try:
        at_fault = wait_for_step(out_dir, 5, job)  # rank 0 logs step 5 just before the faulty step 6
        rc, out, err, _ = job.finish(timeout=LIMIT_S + 30)
    finally:
        job.kill()
    return rc, err, time.monotonic() - at_fault


@pytest.mark.timeout(90)
def test_exception_on_one_rank_ends_the_job_with_one_message(tmp_path):
    rc, err, seconds = faulted(tmp_path, "raise:2:5")
    assert rc == EXIT_CRASH, (rc, err)
    assert seconds < LIMIT_S, seconds
    assert error_lines(err) == ["dpbp.train: rank 2: error: RuntimeError: injected fault at step 5"], err
    assert "Traceback" not in err


@pytest.mark.timeout(90)
def test_error_meant_to_be_uniform_on_one_rank_alone_still_ends_the_job(tmp_path):
    """A UserError is expected on every rank at once; if only rank 3 meets it, the others are waiting in a
    collective: rank 3 gives up waiting for them, says so with its rank, and aborts the job."""
    rc, err, seconds = faulted(tmp_path, "usererror:3:5")
    assert rc == EXIT_USAGE, (rc, err)
    assert seconds < LIMIT_S, seconds
    assert error_lines(err) == ["dpbp.train: rank 3: error: injected error at step 5"], err


@pytest.mark.timeout(90)
def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    rc, err, seconds = faulted(tmp_path, "kill:1:5")
    assert rc == 9, (rc, err)  # hydra reports the signal number of the killed rank
    assert seconds < LIMIT_S, seconds


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad, named", [
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "data.path='/nonexistent/train.npz'"], "/nonexistent/train.npz"),
    (["--set", "model.sizez=[2,3]"], "model.sizez"),
    (["--set", "model.sizes=[2,100000000000,2]"], "GiB"),
    (["--resume", "/dev/null"], "--resume takes a run directory, and '/dev/null' is not a directory"),
])
def test_config_and_data_errors_are_printed_once(tmp_path, bad, named):
    job = Job(*small(10), *bad, "--out", tmp_path / "r", ranks=P)
    rc, out, err, seconds = job.finish(timeout=60)
    assert rc == EXIT_USAGE, (rc, err)
    lines = error_lines(err)
    assert len(lines) == 1 and named in lines[0] and not re.search(r"ranks? \d", lines[0]), err
    assert "Traceback" not in err and "Abort" not in err
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")  # found before training started


@pytest.mark.timeout(90)
def test_pickled_init_file_is_refused_once_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", **{"layers.0.weight": np.array([Boom(str(marker))], dtype=object)})
    job = Job(*small(10), "--init", tmp_path / "evil.npz", "--out", tmp_path / "r", ranks=P)
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == EXIT_USAGE
    lines = error_lines(err)
    assert len(lines) == 1 and "refusing to unpickle" in lines[0], err
    assert not marker.exists()


class Boom:
    """Unpickling this would create a file: proof that nothing was unpickled if the file is absent."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(90)
def test_nan_gradient_stops_naming_step_and_tensor_and_keeps_last_good_checkpoint(tmp_path):
    out_dir = tmp_path / "r"
    job = Job(*small(40, "--set", "train.checkpoint_every=5"), "--out", out_dir, ranks=P,
              env={"DPBP_FAULT": "nan:1:12"})  # rank 1's sample in (0-based) step 12 becomes NaN
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == EXIT_FAULT, (rc, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "non-finite" in lines[0] and "step 13" in lines[0], err
    assert "layers.0.weight" in lines[0]  # the first parameter tensor, in buffer order
    newest = list_checkpoints(out_dir)[0]
    assert newest.endswith("ckpt-00000010.npz")
    arrays, meta = load(newest)
    assert meta["step"] == 10 and all(np.isfinite(a).all() for a in arrays.values())
    assert not os.path.exists(out_dir / "final.npz")


@pytest.mark.timeout(90)
def test_divergence_without_injection_is_a_fault(tmp_path):
    """A linear model with a huge learning rate overflows for real: the run stops with EXIT_FAULT."""
    job = Job(*small(200, "--set", "model.activation='identity'", "--set", "model.output='identity'",
                     "--set", "loss.kind='squared_error'", "--set", "optim.lr=50.0"),
              "--out", tmp_path / "r", ranks=2)
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == EXIT_FAULT, (rc, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "non-finite values at step" in lines[0], err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("odd_rank, check_every, checkpoint_every", [
    (3, 5, 0),  # found by the periodic check
    (0, 100, 5),  # found by the check before each checkpoint
])
def test_replica_divergence_names_the_rank(tmp_path, odd_rank, check_every, checkpoint_every):
    out_dir = tmp_path / "r"
    job = Job(*small(40, "--set", f"train.check_replicas_every={check_every}",
                     "--set", f"train.checkpoint_every={checkpoint_every}"),
              "--out", out_dir, ranks=P, env={"DPBP_FAULT": f"perturb:{odd_rank}:7"})
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == EXIT_FAULT, (rc, err)
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "replica check at step 10" in lines[0] and f"rank {odd_rank} differs" in lines[0], err
    assert [os.path.basename(p) for p in list_checkpoints(out_dir)] == (
        ["ckpt-00000005.npz"] if checkpoint_every else [])  # no checkpoint of the diverged state


STEPS = 120
SLOW = {"DPBP_STEP_SLEEP": "0.03"}  # ~4 s of training: a window to aim a signal at
REPRO = ["--set", "comm.reduce='reproducible'", "--set", "comm.chunk=16"]  # 2 chunks: ranks 2, 3 idle


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs that preempted-and-resumed runs must match bit for bit: fast mode on 4 ranks,
    and reproducible mode in one process (it is the same on any number of ranks)."""
    runs = {}
    for mode, extra, ranks, env in [("fast", [], P, None), ("reproducible", REPRO, None, {"DPBP_SERIAL": "1"})]:
        out_dir = tmp_path_factory.mktemp(mode)
        rc, out, err, _ = Job(*small(STEPS, *extra), "--out", out_dir, ranks=ranks, env=env).finish(timeout=120)
        assert rc == 0, err
        runs[mode] = out_dir / "final.npz"
    return runs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig, rank, twice, mode, resume_ranks", [
    (signal.SIGTERM, 2, True, "fast", P),
    (signal.SIGUSR1, 0, False, "fast", P),
    (signal.SIGTERM, 3, False, "reproducible", 2),  # rank 3 computes no chunk, yet its flag counts
])
def test_signal_to_one_rank_checkpoints_exits_75_and_resumes_bitwise(tmp_path, reference, sig, rank, twice,
                                                                     mode, resume_ranks):
    out_dir = tmp_path / "r"
    extra = REPRO if mode == "reproducible" else []
    job = Job(*small(STEPS, "--set", "train.log_every=1", *extra), "--out", out_dir, ranks=P, env=SLOW)
    try:
        pids = job.rank_pids(P)
        wait_for_step(out_dir, 10, job)
        os.kill(pids[rank], sig)
        if twice:  # what a rank sees when both Slurm and mpirun forward the signal
            os.kill(pids[rank], sig)
        rc, out, err, _ = job.finish(timeout=60)
    finally:
        job.kill()
    assert rc == EXIT_PREEMPTED, (rc, out, err)
    assert out.count("stop requested by a signal") == 1, out
    ckpts = list_checkpoints(out_dir)
    assert ckpts and not os.path.exists(out_dir / "final.npz")
    stopped_at = load(ckpts[0])[1]["step"]
    assert 10 <= stopped_at < STEPS
    rc, out, err, _ = Job("--resume", out_dir, "--quiet", ranks=resume_ranks).finish(timeout=120)
    assert rc == 0, err
    assert_bitwise_equal(out_dir / "final.npz", reference[mode])


def signal_mpirun_at_step_5(out_dir, sig):
    """A P-rank job whose mpirun gets `sig` once step 5 is logged; (rc, stdout, stderr, seconds)."""
    job = Job(*small(STEPS, "--set", "train.log_every=1"), "--out", out_dir, ranks=P, env=SLOW)
    try:
        job.rank_pids(P)
        wait_for_step(out_dir, 5, job)
        job.proc.send_signal(sig)
        return job.finish(timeout=60)
    finally:
        job.kill()


@pytest.mark.timeout(120)
def test_sigterm_to_mpirun_reaches_every_rank_and_exits_75(tmp_path):
    out_dir = tmp_path / "r"
    rc, out, err, _ = signal_mpirun_at_step_5(out_dir, signal.SIGTERM)
    assert rc == EXIT_PREEMPTED, (rc, out, err)
    assert list_checkpoints(out_dir)


@pytest.mark.timeout(90)
def test_stop_flag_rides_the_bucketed_allreduce_too(tmp_path):
    """comm.bucket_mb overlaps the gradient's Allreduce with backward: the flag must still reach all."""
    out_dir = tmp_path / "r"
    job = Job(*small(40, "--set", "comm.bucket_mb=0.001"), "--out", out_dir, ranks=P,
              env={"DPBP_FAULT": "term:3:20"})
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == EXIT_PREEMPTED, (rc, out, err)
    assert [os.path.basename(p) for p in list_checkpoints(out_dir)] == ["ckpt-00000021.npz"]


def ctrl_c_at_step_5(out_dir, ranks):
    """Ctrl-C once step 5 is logged: to the process alone (ranks None), else to mpirun, which forwards
    it to every rank; (rc, stdout, stderr, seconds)."""
    job = Job(*small(STEPS, "--set", "train.log_every=1"), "--out", out_dir, ranks=ranks,
              env={**SLOW, **({} if ranks else {"DPBP_SERIAL": "1"})})
    try:
        if ranks:
            job.rank_pids(ranks)
        wait_for_step(out_dir, 5, job)
        job.proc.send_signal(signal.SIGINT)
        return job.finish(timeout=60)
    finally:
        job.kill()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ranks", [None, 2])
def test_first_ctrl_c_writes_a_checkpoint_and_stops(tmp_path, ranks):
    """Alone and under `mpirun -n 2`: a checkpoint at a step boundary, exit 130 (interrupted; not 75, so
    nothing requeues it), and --resume ends where the uninterrupted run does, bit for bit."""
    out_dir, ref = tmp_path / "r", tmp_path / "ref"
    rc, out, err, _ = ctrl_c_at_step_5(out_dir, ranks)
    assert rc == EXIT_INTERRUPTED, (rc, out, err)
    steps = [int(os.path.basename(p)[5:13]) for p in list_checkpoints(out_dir)]
    assert steps and 5 <= steps[0] < STEPS and not (out_dir / "final.npz").exists(), (steps, err)
    assert f"interrupted (Ctrl-C): checkpoint at step {steps[0]} written to {out_dir}" in out, out
    assert "Traceback" not in err and err.count("\n") <= 1, err
    env = {} if ranks else {"DPBP_SERIAL": "1"}
    for args in (("--resume", out_dir), (*small(STEPS), "--out", ref)):
        rc, _, err, _ = Job(*args, "--quiet", ranks=ranks, env=env).finish(timeout=120)
        assert rc == 0, err
    assert_bitwise_equal(out_dir / "final.npz", ref / "final.npz")


@pytest.mark.timeout(90)
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Each step sleeps 2 s first (DPBP_STEP_SLEEP), so the first Ctrl-C's checkpoint is still ahead when
    the second comes: that one ends the run at once, without a checkpoint, with one message and 130."""
    out_dir = tmp_path / "r"
    job = Job(*small(STEPS, "--set", "train.log_every=1"), "--out", out_dir,
              env={"DPBP_SERIAL": "1", "DPBP_STEP_SLEEP": "2"})
    try:
        wait_for_step(out_dir, 1, job)
        job.proc.send_signal(signal.SIGINT)  # during step 2's sleep: the stop would come after it
        time.sleep(0.3)
        job.proc.send_signal(signal.SIGINT)
        rc, out, err, seconds = job.finish(timeout=60)
    finally:
        job.kill()
    assert rc == EXIT_INTERRUPTED, (rc, out, err)
    assert error_lines(err) == ["dpbp.train: stopped: interrupted"], err
    assert list_checkpoints(out_dir) == [] and "checkpoint at step" not in out, out


@pytest.mark.timeout(60)
def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path):
    out_dir = tmp_path / "r"
    job = Job(*small(20), "--out", out_dir, env={"DPBP_SERIAL": "1", "DPBP_FAULT": "term:0:19"})
    rc, out, err, _ = job.finish(timeout=60)
    assert rc == 0, (rc, err)
    assert os.path.exists(out_dir / "final.npz") and "stop requested" not in out
