"""python -m dpbp.launch: the trainer's command line, run directory, signal policy, requeue, exit status and
BLAS threads, with a stand-in launch command that records what it got (and, once, real ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dpbp import checkpoint as ckpt
from dpbp.errors import EXIT_PEER_LOST
from tests.conftest import REPO, clean_env, mpirun_exe
from tests.jobs import small

CONFIG = os.path.join(REPO, "configs/xor.toml")
THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# The launch command: records its pid, arguments and environment, then acts as MODE says:
# exit:N (exit N at once), kill (die by SIGKILL), checkpoint (on a stop signal, record it, exit 75),
# slow (record stop signals and keep running: a checkpoint that takes forever).
STAND_IN = """
import json, os, signal, sys, time
mode, record = sys.argv[1], sys.argv[2]
def note(**kw):
    with open(record, "a") as f:
        f.write(json.dumps(kw) + "\\n")
def stop(signum, frame):
    note(signal=signal.Signals(signum).name)
    if mode == "checkpoint":
        sys.exit(75)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, stop)
keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "DPBP_EXPECT_WORLD_SIZE")
note(ready=True, pid=os.getpid(), argv=sys.argv[3:], env={k: os.environ.get(k) for k in keys})
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    time.sleep(0.02)
"""


class Launch:
    """`python -m dpbp.launch OPTIONS -- stand-in MODE -- TRAIN` in the background, in its own session."""

    def __init__(self, tmp_path, mode, options=(), train=(CONFIG,), env=None, command=None):
        self.record = tmp_path / "record.jsonl"
        script = tmp_path / "stand_in.py"
        script.write_text(STAND_IN)
        command = command or [sys.executable, str(script), mode, str(self.record)]
        full_env = {k: v for k, v in clean_env().items() if k not in THREADS and not k.startswith("DPBP_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "dpbp.launch", *map(str, options), "--", *command,
                                      "--", *map(str, train)], cwd=tmp_path, env=full_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def notes(self):
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def wait_for(self, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [n for n in self.notes() if what in n]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"the launcher ended before {what!r}: {self.proc.stdout.read()}"
            time.sleep(0.02)
        raise AssertionError(f"no {what!r} from the stand-in after {timeout} s")

    def finish(self, timeout=60):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the launcher still runs after {timeout} s: {self.proc.communicate()[0]}")
        return self.proc.returncode, out


def alive(pid):
    """Running, not a zombie (an orphan whose parent has not reaped it yet is dead for this purpose)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("train, env, expected", [
    ([CONFIG, "--out", "mine", "--set", "train.steps=3"], {}, "mine"),
    ([CONFIG, "--set", "train.steps=3", "--out=mine"], {"DPBP_RUN_DIR": "other"}, "mine"),
    ([CONFIG, "--set", "train.steps=3"], {"DPBP_RUN_DIR": "other"}, "other"),
    ([CONFIG, "--set", "train.steps=3"], {"DPBP_RUNS": "all", "DPBP_RUN_NAME": "exp"}, "all/exp"),
    ([CONFIG, "--set", "train.steps=3"], {}, "runs/local-xor"),  # --run-name below, {config} = xor
])
def test_the_trainer_gets_the_config_the_run_dir_to_resume_and_the_options(tmp_path, train, env, expected):
    job = Launch(tmp_path, "exit:0", ["-n", "3", "--run-name", "local-{config}"], train, env)
    rc, out = job.finish()
    assert rc == 0 and "training finished" in out, out
    run_dir = str(tmp_path / expected)
    assert job.notes()[0]["argv"] == [sys.executable, "-m", "dpbp.train", "--config", CONFIG,
                                      "--resume-or-start", run_dir, "--set", "train.steps=3"]
    assert os.path.isdir(run_dir) and f"run dir {run_dir}: no checkpoint yet, fresh start" in out
    assert job.notes()[0]["env"]["DPBP_EXPECT_WORLD_SIZE"] == "3"


def test_the_start_line_names_the_newest_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    for step in (20, 100, 40):
        (tmp_path / "run" / f"ckpt-{step:08d}.npz").write_bytes(b"")
    rc, out = Launch(tmp_path, "exit:0", ["-n", "1"], [CONFIG, "--out", "run"]).finish()
    assert rc == 0 and f"resuming (newest checkpoint file: {tmp_path}/run/ckpt-00000100.npz)" in out, out


@pytest.mark.parametrize("options, train, message", [
    (["-n", "2"], [CONFIG, "--resume", "x"], "do not pass --resume"),
    (["-n", "2"], [CONFIG, "--out"], "--out needs a directory"),
    (["-n", "2"], [CONFIG, "--set"], "--set needs key=value"),
    (["-n", "2"], ["missing.toml"], "config file 'missing.toml' not found"),
    (["-n", "2", "--usage", "usage: try harder"], [], "usage: try harder"),
    (["-n", "0"], [CONFIG], "number of ranks (-n P / DPBP_NP) must be a positive whole number, not '0'"),
    (["-n", "2", "--cores", "many"], [CONFIG], "--cores must be a positive whole number"),
    (["-n", "2", "--warn-after", "soon"], [CONFIG], "--warn-after needs whole seconds"),
])
def test_bad_input_is_one_message_and_status_2(tmp_path, options, train, message):
    job = Launch(tmp_path, "exit:0", options, train)
    rc, out = job.finish()
    assert rc == 2 and message in out and "Traceback" not in out, out
    assert not job.record.exists()  # nothing was started


def test_a_missing_launch_command_is_status_2(tmp_path):
    rc, out = Launch(tmp_path, "", ["-n", "2"], command=["no-such-mpirun", "-n", "2"]).finish()
    assert rc == 2 and "launch command 'no-such-mpirun' not found" in out, out


@pytest.mark.parametrize("mode, status, message", [
    ("exit:3", 3, "trainer failed with status 3"),
    ("exit:2", 2, "trainer failed with status 2"),
    ("kill", 128 + signal.SIGKILL, f"trainer failed with status {128 + signal.SIGKILL}"),
])
def test_the_exit_status_is_the_trainers_as_a_shell_reports_it(tmp_path, mode, status, message):
    rc, out = Launch(tmp_path, mode, ["-n", "2"]).finish()
    assert rc == status and message in out, out


REQUEUE = ["--requeue", 'echo "requeue run dir: $DPBP_RUN_DIR"; echo "$DPBP_RUN_DIR" > requeued']


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP])
def test_every_stop_signal_asks_the_ranks_to_checkpoint_and_only_the_warning_requeues(tmp_path, sig):
    job = Launch(tmp_path, "checkpoint", ["-n", "2", *REQUEUE], [CONFIG, "--out", "run"])
    job.wait_for("ready")
    os.kill(job.proc.pid, sig)
    rc, out = job.finish()
    assert rc == 75, out
    assert [n["signal"] for n in job.notes() if "signal" in n] == ["SIGUSR1"]  # what srun/mpirun pass on
    assert f"got {sig.name}: forwarding it to the ranks as SIGUSR1" in out, out
    requeued = tmp_path / "requeued"
    if sig == signal.SIGUSR1:  # the time-limit warning
        assert requeued.read_text().strip() == str(tmp_path / "run"), out
        assert f"requeue run dir: {tmp_path / 'run'}" in out  # the command's output is logged
    else:
        assert not requeued.exists() and f"stopped after writing a checkpoint (got {sig.name})" in out, out


def test_dpbp_requeue_0_only_stops(tmp_path):
    job = Launch(tmp_path, "checkpoint", ["-n", "2", *REQUEUE], env={"DPBP_REQUEUE": "0"})
    job.wait_for("ready")
    os.kill(job.proc.pid, signal.SIGUSR1)
    rc, out = job.finish()
    assert rc == 75 and not (tmp_path / "requeued").exists(), out


def test_a_failing_requeue_command_says_how_to_resume(tmp_path):
    job = Launch(tmp_path, "checkpoint", ["-n", "2", "--requeue", "exit 4"], [CONFIG, "--out", "run"])
    job.wait_for("ready")
    os.kill(job.proc.pid, signal.SIGUSR1)
    rc, out = job.finish()
    assert rc == 75 and "requeue command failed with status 4" in out and f"--out {tmp_path / 'run'}" in out


def test_the_warning_timer_sends_the_time_limit_warning(tmp_path):
    """--warn-after (pbs.sh's stand-in for Slurm's --signal): nobody signals the launcher, yet it stops the
    ranks as on SIGUSR1 and requeues."""
    job = Launch(tmp_path, "checkpoint", ["-n", "2", "--warn-after", "3", *REQUEUE], [CONFIG, "--out", "run"])
    rc, out = job.finish()
    assert rc == 75 and "got SIGUSR1: forwarding" in out, out
    assert [n["signal"] for n in job.notes() if "signal" in n] == ["SIGUSR1"]
    assert (tmp_path / "requeued").exists(), out


@pytest.mark.parametrize("new_session", [False, True])
def test_a_second_sigint_stops_at_once(tmp_path, new_session):
    """The ranks never finish their checkpoint: the first Ctrl-C asks them, the second kills the launch command."""
    job = Launch(tmp_path, "slow", ["-n", "2", *REQUEUE, *(["--new-session"] if new_session else [])])
    pid = job.wait_for("ready")["pid"]
    os.kill(job.proc.pid, signal.SIGINT)
    job.wait_for("signal")
    os.kill(job.proc.pid, signal.SIGTERM)  # later TERM/USR1/HUP change nothing
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.proc.poll() is None and alive(pid)  # still waiting for the checkpoint
    os.kill(job.proc.pid, signal.SIGINT)
    rc, out = job.finish()
    assert rc == 130, out
    assert "stopping the ranks at once" in out and not (tmp_path / "requeued").exists(), out
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the launch command survived the second SIGINT"
        time.sleep(0.02)


@pytest.mark.parametrize("cores, ranks", [(8, 3), (6, 4), (2, 2), (1, 4), (16, 1)])
def test_blas_threads_follow_the_cores_per_rank_rule(tmp_path, cores, ranks):
    job = Launch(tmp_path, "exit:0", ["-n", "7", "--cores", cores, "--ranks-per-node", ranks])
    rc, out = job.finish()
    expected = str(max(1, cores // ranks))  # the cores shared evenly, rounded down, at least one
    assert rc == 0 and f"{expected} BLAS thread(s) per rank" in out, out
    assert job.notes()[0]["env"] == {**{k: expected for k in THREADS}, "DPBP_EXPECT_WORLD_SIZE": "7"}


def test_blas_threads_default_to_this_process_cores_shared_by_all_ranks(tmp_path):
    job = Launch(tmp_path, "exit:0", ["-n", "2"])
    assert job.finish()[0] == 0
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [job.notes()[0]["env"][k] for k in THREADS] == [expected] * 3


def test_a_thread_count_the_user_set_is_left_alone_with_the_others(tmp_path):
    job = Launch(tmp_path, "exit:0", ["-n", "2", "--cores", "8"], env={"OPENBLAS_NUM_THREADS": "3"})
    rc, out = job.finish()
    assert rc == 0 and "BLAS threads as set: OPENBLAS_NUM_THREADS=3" in out, out
    env = job.notes()[0]["env"]
    assert (env["OMP_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (None, "3", None)


def test_the_scripts_leave_the_thread_rule_to_dpbp_threads():
    """One rule, in dpbp/threads.py: no launch script sets a thread variable or divides cores itself."""
    for name in ("local.sh", "slurm.sbatch", "pbs.sh"):
        with open(os.path.join(REPO, "launch", name)) as f:
            text = f.read()
        assert "exec " in text and "-m dpbp.launch" in text, name
        assert not any(f"export {k}" in text or f"{k}=$" in text for k in THREADS), name


@pytest.mark.timeout(180)
def test_sigint_to_real_ranks_writes_a_checkpoint_and_exits_75(tmp_path):
    """Ctrl-C with mpirun's ranks: they stop at a step boundary, rank 0 writes a valid checkpoint, 75."""
    run = tmp_path / "run"
    config, *rest = small(400, "--set", "train.log_every=1")[1:]
    env = {"DPBP_STEP_SLEEP": "0.05", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    job = Launch(tmp_path, "", ["-n", "2", "--new-session"], [config, *rest, "--out", run], env,
                 command=[mpirun_exe(), "-n", "2"])
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() or '"step"' not in (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and job.proc.poll() is None, "the ranks never started training"
        time.sleep(0.05)
    os.kill(job.proc.pid, signal.SIGINT)
    rc, out = job.finish(120)
    assert rc == 75, out
    steps = sorted(int(p.name[5:13]) for p in run.glob("ckpt-*.npz"))
    assert steps and f"stop requested by a signal: checkpoint at step {steps[-1]}" in out, out
    arrays, meta = ckpt.load(run / f"ckpt-{steps[-1]:08d}.npz")  # its checksum is verified
    assert meta["step"] == steps[-1] < 400 and meta["world_size"] == 2
    assert not (run / "final.npz").exists()


LOST_REQUEUE = ["--requeue", 'echo "$DPBP_REQUEUE_REASON" >> requeued']


@pytest.mark.parametrize("mode, status", [(f"exit:{EXIT_PEER_LOST}", EXIT_PEER_LOST),
                                          ("kill", 128 + signal.SIGKILL),
                                          # a survivor crashed in MPI (UCX) when its peer's host died
                                          (f"exit:{128 + signal.SIGSEGV}", 128 + signal.SIGSEGV)])
def test_a_lost_rank_or_host_requeues_at_most_the_bound(tmp_path, mode, status):
    """Status EXIT_PEER_LOST (a watchdog gave up on a peer) or a SIGKILLed rank: the requeue command runs
    with DPBP_REQUEUE_REASON=lost, once per attempt, and no more than --lost-requeues times for one run
    directory; the status is passed on either way."""
    bound = 2
    for attempt in range(bound + 1):
        rc, out = Launch(tmp_path, mode, ["-n", "2", "--lost-requeues", bound, *LOST_REQUEUE],
                         [CONFIG, "--out", "run"]).finish()
        assert rc == status, out
        if attempt < bound:
            assert f"requeueing job, {attempt + 1} of at most {bound}" in out, out
    assert (tmp_path / "requeued").read_text().split() == ["lost"] * bound
    assert f"not requeueing: {bound} requeue(s) after lost ranks already" in out, out
    lines = (tmp_path / "run" / "lost-requeues.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [status] * bound


@pytest.mark.parametrize("mode, options", [("exit:3", ["--lost-requeues", "3"]),  # a fault: not lost
                                           ("exit:1", ["--lost-requeues", "3"]),  # a crash: would repeat
                                           (f"exit:{EXIT_PEER_LOST}", [])])      # the bound defaults to 0
def test_other_failures_and_no_bound_do_not_requeue(tmp_path, mode, options):
    rc, out = Launch(tmp_path, mode, ["-n", "2", *options, *LOST_REQUEUE], [CONFIG, "--out", "run"]).finish()
    assert rc == int(mode[5:]) and not (tmp_path / "requeued").exists(), out


def test_dpbp_requeue_0_also_stops_the_lost_requeue(tmp_path):
    rc, out = Launch(tmp_path, f"exit:{EXIT_PEER_LOST}", ["-n", "2", "--lost-requeues", "3", *LOST_REQUEUE],
                     [CONFIG, "--out", "run"], env={"DPBP_REQUEUE": "0"}).finish()
    assert rc == EXIT_PEER_LOST and not (tmp_path / "requeued").exists(), out
