"""No hang, ever (dpbp/watchdog.py): a rank that stops answering, dies or stops coming ends the attempt.

Jobs run `mpirun -n 2|3 python -m dpbp.train` with comm.timeout = 3 s; a rank is SIGSTOPped (the test
cleans it up by PID), SIGKILLed or stalled mid-run. Each must end within the hard limit of Job.finish
(a hang fails the test), with EXIT_PEER_LOST and one message naming the rank, its host and the step,
and leave the newest checkpoint loadable. Legitimately long waits (rank 0's checkpoint write, a first
step) longer than the timeout must not end the run. Times go to the test output, not assertions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import numpy as np
import pytest

from dpbp.checkpoint import list_checkpoints, load
from dpbp.config import load_config
from dpbp.errors import EXIT_OK, EXIT_PEER_LOST, UserError
from dpbp.watchdog import LONG, Watchdog
from tests.conftest import dpbp
from tests.jobs import Job, error_lines, small, wait_for_step

T = 3  # comm.timeout in these tests
# mpirun (hydra) ORs the wait statuses of the ranks: the survivors' exit(4), and the stopped rank it kills
# at clean-up counts as 0 or, depending on which of its paths killed it first, as signal 9.
HYDRA_PEER_LOST = (EXIT_PEER_LOST, 9)
LIMIT_S = 40  # hard limit for a job to end after the fault: T plus start-up, teardown, a loaded machine


def watched(steps, *extra):
    return small(steps, "--set", f"comm.timeout={T}", "--set", "train.log_every=1",
                 "--set", "train.checkpoint_every=5", *extra)


def last_logged_step(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return max(json.loads(line)["step"] for line in f if line.endswith("\n") and '"split"' not in line)


def gone(pid):
    """The process has exited (or is a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_if_ours(pid, marker):
    """SIGKILL pid if it is still a process of this test (its command line names the run directory)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = marker.encode() in f.read()
    except OSError:
        return
    if ours:
        os.kill(pid, signal.SIGKILL)


def interrupted(tmp_path, ranks, victim, how, at=20):
    """A job of `ranks` ranks, rank `victim` hit by `how` ("stop" or "kill") after step `at`;
    (status, stderr, seconds from the signal to the end, run dir, {rank: pid}, last logged step)."""
    out_dir = tmp_path / "r"
    job = Job(*watched(100000), "--out", out_dir, ranks=ranks)
    pids = {}
    try:
        wait_for_step(out_dir, at, job)
        pids = job.rank_pids(ranks)
        os.kill(pids[victim], signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        hit = time.monotonic()
        rc, out, err, _ = job.finish(timeout=LIMIT_S)
        seconds = time.monotonic() - hit
        print(f"{ranks} ranks, {how} rank {victim}: ended {seconds:.1f} s after the signal, status {rc}")
        return rc, err, seconds, out_dir, pids, last_logged_step(out_dir)
    finally:
        for pid in pids.values():
            kill_if_ours(pid, str(out_dir))
        job.kill()


def the_message(err):
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks, victim", [(2, 1), (3, 1), (2, 0), (3, 0)])
def test_a_stopped_rank_ends_the_attempt_with_one_message_naming_it(tmp_path, ranks, victim):
    rc, err, seconds, out_dir, pids, logged = interrupted(tmp_path, ranks, victim, "stop")
    assert rc in HYDRA_PEER_LOST, (rc, err)
    line = the_message(err)
    host = socket.gethostname()
    assert line.startswith(f"dpbp.train: stopped: rank {victim} (host {host}, "), line
    assert "never answered" not in line  # its watchdog answered start's hello: no firewall hint
    step = int(re.search(r"stopped answering at step (\d+):", line).group(1))
    # The survivors wait in the gradient's Allreduce of the step after the last one rank 0 logged, or in
    # the Allgather of the replica check after the logged step (before a checkpoint); a stopped rank 0
    # may have been stopped between a step's collectives and its metrics line: one step further.
    base = logged if "in MPI_Allgather" in line else logged + 1
    assert step == base if victim != 0 else step in (base, base + 1), (line, logged)
    waiter = int(re.search(r"rank (\d+) waited [\d.]+ s in MPI_", line).group(1))  # whichever decided first
    assert waiter != victim and waiter < ranks, line
    assert all(gone(pid) for r, pid in pids.items() if r != victim)  # every survivor left by itself
    assert gone(pids[victim])  # and the stopped rank was ended (by a survivor on its host, or by mpirun)
    arrays, meta = load(list_checkpoints(out_dir)[0])  # the newest checkpoint is intact
    assert meta["step"] <= logged + 1 and all(np.isfinite(a).all() for a in arrays.values())


@pytest.mark.timeout(150)
def test_the_newest_checkpoint_after_a_stall_resumes(tmp_path):
    rc, err, _, out_dir, _, logged = interrupted(tmp_path, 2, 1, "stop")
    assert rc in HYDRA_PEER_LOST, (rc, err)
    newest = load(list_checkpoints(out_dir)[0])[1]["step"]
    proc = dpbp("train", "--resume", out_dir, "--set", f"train.steps={newest + 3}", "--quiet", ranks=2, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert os.path.exists(out_dir / "final.npz")


@pytest.mark.timeout(120)
def test_a_killed_rank_ends_the_attempt(tmp_path):
    """mpirun (hydra) tears the job down itself when a rank dies (status 9); under a launcher that does
    not, the watchdog does (status 4, naming the rank). Either way: no hang."""
    rc, err, _, _, pids, _ = interrupted(tmp_path, 3, 2, "kill")
    assert rc in (9, EXIT_PEER_LOST), (rc, err)
    if rc == EXIT_PEER_LOST:
        assert "rank 2 (host" in the_message(err)
    assert all(gone(pid) for pid in pids.values())


@pytest.mark.timeout(120)
def test_a_rank_that_answers_but_never_comes_ends_the_attempt(tmp_path):
    """A hung file system: the rank's watchdog answers, its main thread does not reach the collective."""
    out_dir = tmp_path / "r"
    job = Job(*watched(100000), "--out", out_dir, ranks=3, env={"DPBP_FAULT": "stall:2:20", "DPBP_STALL_S": "600"})
    try:
        rc, out, err, _ = job.finish(timeout=LIMIT_S + 20)
    finally:
        job.kill()
    assert rc == EXIT_PEER_LOST, (rc, err)
    line = the_message(err)
    assert re.search(r"rank 2 \(host .*\) answers but has been busy outside MPI for [\d.]+ s at step 21 ", line), line


@pytest.mark.timeout(180)
@pytest.mark.parametrize("env, what", [
    ({"DPBP_SAVE_SLEEP": str(T + 2)}, "rank 0 writes each checkpoint for longer than comm.timeout"),
    ({"DPBP_FAULT": "stall:1:0", "DPBP_STALL_S": str(T + 2)}, "rank 1's first step takes longer than comm.timeout"),
])
def test_legitimately_long_waits_do_not_end_the_run(tmp_path, env, what):
    assert T + 2 < LONG * T  # inside the allowance of a long phase
    job = Job(*watched(12), "--out", tmp_path / "r", ranks=3, env=env)
    rc, out, err, seconds = job.finish(timeout=120)
    assert rc == EXIT_OK, (what, rc, err)
    assert not error_lines(err), err
    assert os.path.exists(tmp_path / "r" / "final.npz")


@pytest.mark.parametrize("value, needle", [("-1", ">= 0"), ("'soon'", "comm.timeout"), ("inf", "comm.timeout")])
def test_a_bad_timeout_is_a_config_error(value, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        load_config(None, [f"comm.timeout={value}"])
    assert "comm.timeout" in str(e.value)


def test_timeout_zero_or_one_rank_starts_no_watchdog():
    from dpbp.comm import SerialComm
    assert Watchdog.start(SerialComm(), 60, "dpbp.train") is None
    assert load_config(None, ["comm.timeout=0"])["comm.timeout"] == 0


class FakeComm:
    rank, size, deadline = 0, 4, None


def test_the_verdict_names_silent_ranks_by_host_and_picks_the_lowest_answering_printer():
    """Rank 1 asks; rank 0 answered (waiting too), ranks 2 and 3, all of host b, are silent."""
    from dpbp.comm import Deadline
    comm = FakeComm()
    comm.rank = 1
    dog = Watchdog(comm, 3.0, "dpbp.train", sock=None, slot=Deadline())
    dog.peers = {0: ("a", "10.0.0.1", 5000), 2: ("b", "10.0.0.2", 5001), 3: ("b", "10.0.0.2", 5002)}
    dog.slot.step, dog.slot.what = 7, "MPI_Allreduce"
    now = 100.0
    dog.heard = {0: (now - 0.1, {"in": "MPI_Allreduce", "for": 2.0, "step": 7, "phase": None})}
    text, printer, silent = dog._verdict(now, 3.2)
    assert printer == 0 and silent == [2, 3]
    assert "ranks 2, 3 never answered since the start" in text and "UDP" in text  # no hello came back
    dog.ever = {0, 2, 3}  # they did answer once: a real stop, no hint
    assert "never answered" not in dog._verdict(now, 3.2)[0]
    assert text.startswith("ranks 2, 3 (all of host b, 10.0.0.2) stopped answering at step 7: rank 1 waited 3.2 s "
                           "in MPI_Allreduce for them"), text


def test_the_verdict_waits_while_a_busy_rank_is_in_a_long_phase_and_not_beyond():
    from dpbp.comm import Deadline
    comm = FakeComm()
    comm.size = 2
    dog = Watchdog(comm, 3.0, "dpbp.train", sock=None, slot=Deadline())
    dog.peers = {1: ("a", "10.0.0.1", 5000)}
    dog.slot.step, dog.slot.what = 9, "MPI_Allreduce"
    now = 100.0

    def busy_for(seconds, phase):
        dog.heard = {1: (now, {"in": None, "for": seconds, "step": 9, "phase": phase})}
        return dog._verdict(now, seconds)

    assert busy_for(2.9, None) is None  # within T
    assert "busy outside MPI for 3.1 s" in busy_for(3.1, None)[0]
    assert busy_for(LONG * 3.0 - 0.1, "writing a checkpoint") is None
    assert "busy (writing a checkpoint)" in busy_for(LONG * 3.0 + 0.1, "writing a checkpoint")[0]
