"""A host that is cut off, killed or stopped mid-run: the attempt ends by itself, and the run finishes.

Every job is `sbatch -N 1-2 --ntasks-per-node=2 launch/slurm.sbatch` on the 2-host cluster, training
configs/digits.toml in reproducible mode with comm.timeout = TIMEOUT, so its final parameters must be
bitwise those of an uninterrupted `mpirun -n 2` on one host (the sum rule: the global batch and its
chunks do not depend on the rank count). At step >= FAULT_STEP (after the checkpoints of steps 50..150,
away from the first step's longer allowance) host 2 gets the fault. Then:

* every rank exits by itself within TIMEOUT + MARGIN: the ranks on host 1 and (cut off or not) those
  on host 2; a SIGSTOPped rank cannot, and srun --wait (DPBP_SRUN_WAIT = SRUN_WAIT) kills it;
* the surviving ranks exit with EXIT_PEER_LOST and one message names the culprit host's ranks;
* the job requeues itself and finishes, from its newest checkpoint, on the hosts Slurm gives it (for a
  cut link: host 1 alone, without anyone bringing host 2 back), with the uninterrupted run's bits.

MARGIN is a deadline, not a measurement: the watchdog decides between T and T + its period, then srun
waits DPBP_SRUN_WAIT and MPI tears down, on a loaded 2-core machine. A killed slurmd is not noticed by
MPI at all (the ranks keep talking): Slurm ends the attempt after SlurmdTimeout (hosts.sh: 30 s) with a
NODE_FAIL and requeues the job with its node count kept, so that test restarts slurmd (as an
administrator would) and the job finishes on both hosts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import process_alive
from tests.cluster.test_training import BIN, CONFIG, PMI_FLAKE, SBATCH, job_env
from tests.conftest import dpbp
from tests.jobs import assert_bitwise_equal

pytestmark = pytest.mark.cluster
TIMEOUT = 10  # comm.timeout in these jobs (s)
MARGIN = 25  # s past the timeout by which every rank must be gone (see the module docstring)
LOST_REQUEUES = 3  # DPBP_LOST_REQUEUES: slurm.sbatch's default; the fault needs one
FINISH_S = 240  # for the requeued run to finish
SRUN_WAIT = 20  # DPBP_SRUN_WAIT: above TIMEOUT, so that the watchdog, not srun, ends the survivors
SLURM_DEADLINE = 60  # s: the bound for an attempt whose host's slurmd died (NODE_FAIL at ~42 s)
STEPS, FAULT_STEP = 300, 140
SETS = ["--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=50", "--set", "comm.chunk=8",
        "--set", 'comm.reduce="reproducible"', "--set", f"comm.timeout={TIMEOUT}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    dpbp("train", "--config", CONFIG, *SETS, "--out", run, "--quiet", ranks=2, timeout=180, check=True)
    return run / "final.npz"


def host_processes(cluster, k: int) -> dict[int, int]:
    """{pid: rank} of the dpbp.train ranks running on host k (in its PID namespace), seen from here."""
    init = [pid for name, pid, _ in cluster.pids() if name == f"init.{k}"][-1]
    ns = os.readlink(f"/proc/{init}/ns/pid")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        rank = cmd[1:3] == [b"-m", b"dpbp.train"]  # not the launcher, nor srun, whose argv name it too
        if rank and process_alive(int(entry)) and b"SLURM_PROCID" in env:
            found[int(entry)] = int(env[b"SLURM_PROCID"])
    return found


def threads_of(left: dict) -> dict:
    """{pid: [(thread name, state, kernel wait channel)]}: where the ranks still running are stuck."""
    out = {}
    for pids in left.values():
        for pid in pids:
            rows = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                base = f"/proc/{pid}/task/{tid}"
                try:
                    rows.append((Path(f"{base}/comm").read_text().strip(),
                                 Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()[0],
                                 Path(f"{base}/wchan").read_text().strip()))
                except OSError:
                    pass
            out[pid] = rows
    return out


def heal(cluster, k: int) -> None:
    """Host k back as it was: link up, slurmd running (hosts.sh records the new one), node idle."""
    cluster.sh("link", k, "up")
    cluster.sh("slurmd", k, "start")  # a no-op if it runs
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = cluster.run(["sinfo", "-h", "-n", cluster.ns(k), "-o", "%T"], check=False).stdout.strip()
        if state == "idle":
            return
        if state.startswith(("down", "drain")):  # a DOWN node is not pinged: it stays down until resumed
            cluster.run(["scontrol", "update", f"NodeName={cluster.ns(k)}", "State=RESUME"], check=False)
        time.sleep(0.5)
    raise AssertionError(f"host {k} not idle again after 90 s\n{cluster.logs()}")


@pytest.fixture
def healed(cluster):
    """Each test breaks host 2; whatever happens, it is whole again for the next test (a job a failed test
    left running is cancelled first: its host would not be idle)."""
    yield cluster
    cluster.run(["scancel", "--user=root"], check=False)
    heal(cluster, 2)


class Run:
    """The job, submitted and trained up to FAULT_STEP, ready for a fault on host 2."""

    def __init__(self, cluster, tmp_path, step_sleep=0.05, srun_wait=SRUN_WAIT, fault_step=FAULT_STEP):
        self.cluster, self.dir, self.out = cluster, tmp_path / "run", tmp_path / "job.out"
        env = {**job_env(DPBP_SRUN_WAIT=str(srun_wait), DPBP_STEP_SLEEP=str(step_sleep),
                         DPBP_LOST_REQUEUES=str(LOST_REQUEUES)), "PATH": f"{BIN}:{cluster.env['PATH']}"}
        self.job = cluster.sbatch([f"--output={self.out}", "--time=10", "-N", "1-2", "--ntasks-per-node=2",
                                   SBATCH, CONFIG, *SETS, "--out", self.dir], cwd=tmp_path, env=env)
        deadline = time.monotonic() + 120
        while self.step() < fault_step:
            assert time.monotonic() < deadline, f"no step {fault_step} after 120 s\n{self.log()}"
            time.sleep(0.1)
        self.ranks = {k: host_processes(cluster, k) for k in (1, 2)}
        self.attempt = int(cluster.job_info(self.job).get("Restarts", 0))  # 0: no earlier attempt failed
        assert self.attempt == 0 and PMI_FLAKE not in self.log(), self.log()
        assert sorted(self.ranks[1].values()) == [0, 1] and sorted(self.ranks[2].values()) == [2, 3], self.ranks

    def step(self) -> int:
        try:
            lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return -1
        return max([json.loads(line)["step"] for line in lines if line.endswith("}")] or [-1])

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait_gone(self, pids, limit: float, t0: float) -> float:
        """Seconds from t0 until none of pids runs; fails past `limit` seconds."""
        while any(process_alive(p) for p in pids):
            left = {k: {p: r for p, r in self.ranks[k].items() if p in pids and process_alive(p)} for k in (1, 2)}
            assert time.monotonic() - t0 < limit, (f"ranks {left} still running {limit} s after the fault: "
                                                   f"{threads_of(left)}\n{self.log()}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def segment(self, attempt=None) -> str:
        """The log of one attempt (default: the faulted one): from its first line to the next's."""
        attempt = self.attempt if attempt is None else attempt
        log = self.log()
        start = log.find(f"restart {attempt}]")
        end = log.find(f"restart {attempt + 1}]")
        return log[max(start, 0):end if end >= 0 else len(log)]

    def finishes(self, uninterrupted: Path) -> dict:
        """The job completes by itself with the uninterrupted run's parameters."""
        info = self.cluster.wait_done(self.job, FINISH_S)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{self.log()}"
        assert int(info["Restarts"]) >= self.attempt + 1, info
        assert_bitwise_equal(self.dir / "final.npz", uninterrupted)
        return info


def assert_culprit_named(run: Run, culprit: str, host: str = "") -> None:
    """Once srun has returned (the launcher's requeue line): one message naming the culprit, and the
    survivors' exit status 4. (After a split the far side names the near side in a message of its own,
    which reaches the log only if the link comes back.)"""
    deadline = time.monotonic() + 60
    while "requeueing job" not in run.segment():
        assert time.monotonic() < deadline, f"the launcher did not requeue\n{run.log()}"
        time.sleep(0.1)
    log = run.segment()
    lines = [line for line in log.splitlines()
             if "stopped answering" in line and culprit in line and host in line]
    assert len(lines) == 1 and "exit status 4" in lines[0], log
    # the survivors exit 4; one of them may instead crash inside MPI when its peer's host dies (UCX:
    # SIGSEGV seen under load; the message then names it too, and the launcher requeues all the same)
    assert re.search(r"srun: error: \S+: tasks? (0-1|0|1): Exited with exit code 4", log), log


@pytest.mark.timeout(420)
def test_a_cut_link_ends_the_attempt_and_the_run_finishes_on_the_host_left(healed, tmp_path, uninterrupted):
    # both sides end by themselves at TIMEOUT; srun then waits its --wait and KillWait for the unreachable
    # host: kept short so that the launcher requeues before Slurm's NODE_FAIL (SlurmdTimeout 30 s), which
    # would requeue the job with its 2 nodes kept (on a real cluster SlurmdTimeout is 300 s)
    run = Run(healed, tmp_path, srun_wait=5)
    t0 = time.monotonic()
    healed.sh("link", 2, "down")
    run.wait_gone([*run.ranks[1], *run.ranks[2]], TIMEOUT + MARGIN, t0)  # both sides, by themselves
    assert_culprit_named(run, f"ranks 2, 3 (all of host {healed.ns(2)}")
    assert "a rank or host was lost (status 4): requeueing job" in run.segment()
    # nobody brings host 2 back: the requeued job asks for 1-2 nodes and runs on host 1 alone
    run.finishes(uninterrupted)
    second = run.segment(run.attempt + 1)
    assert "2 ranks on" in second and "resuming (newest checkpoint file:" in second, second


@pytest.mark.timeout(420)
def test_a_host_whose_ranks_are_killed_ends_the_attempt_and_the_run_finishes(healed, tmp_path, uninterrupted):
    run = Run(healed, tmp_path)
    t0 = time.monotonic()
    for pid in run.ranks[2]:
        os.kill(pid, signal.SIGKILL)
    run.wait_gone(list(run.ranks[1]), TIMEOUT + MARGIN, t0)
    assert_culprit_named(run, f"ranks 2, 3 (all of host {healed.ns(2)}")
    run.finishes(uninterrupted)


@pytest.mark.timeout(420)
def test_a_stopped_rank_ends_the_attempt_and_the_run_finishes(healed, tmp_path, uninterrupted):
    run = Run(healed, tmp_path)
    stopped = max(run.ranks[2], key=run.ranks[2].get)  # rank 3
    t0 = time.monotonic()
    os.kill(stopped, signal.SIGSTOP)
    try:
        run.wait_gone([p for k in (1, 2) for p in run.ranks[k] if p != stopped], TIMEOUT + MARGIN, t0)
        run.wait_gone([stopped], TIMEOUT + SRUN_WAIT + MARGIN, t0)  # killed by srun --wait
    finally:
        if process_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    assert_culprit_named(run, "rank 3 (", healed.ns(2))
    run.finishes(uninterrupted)


@pytest.mark.timeout(480)
def test_a_host_whose_slurmd_dies_ends_the_attempt_and_the_run_finishes(healed, tmp_path, uninterrupted):
    run = Run(healed, tmp_path, step_sleep=0.25, fault_step=60)  # the steps left outlast SlurmdTimeout
    t0 = time.monotonic()
    healed.sh("slurmd", 2, "kill")
    # MPI does not notice: the ranks train on until Slurm gives up on host 2 (NODE_FAIL) and ends the
    # attempt; host 2's ranks, whose srun is gone, end by themselves
    run.wait_gone([*run.ranks[1], *run.ranks[2]], SLURM_DEADLINE + MARGIN, t0)
    deadline = time.monotonic() + 60
    while int(healed.job_info(run.job).get("Restarts", 0)) < run.attempt + 1:
        assert time.monotonic() < deadline, f"not requeued\n{healed.job_info(run.job)}\n{run.log()}"
        time.sleep(0.2)
    heal(healed, 2)  # the administrator starts slurmd again; the requeued job waits for 2 nodes
    run.finishes(uninterrupted)
