"""launch/slurm.sbatch on a real (private, single-node) Slurm cluster; see conftest.py.

Every job trains configs/xor.toml for 120 steps on 4 ranks in reproducible-reduce mode, so its
final parameters must be bitwise those of the same run under plain ``mpirun -n 4``, however
often the job was stopped, requeued or resubmitted on the way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpbp import checkpoint as ckpt
from tests.conftest import dpbp
from tests.jobs import assert_bitwise_equal

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm.sbatch"
CONFIG = REPO / "configs" / "xor.toml"
STEPS = 120  # 4 ranks on 2 cores: a step costs milliseconds idle, up to 0.3 s on a busy machine
BASE = ["--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=20",
        "--set", "train.log_every=20", "--set", "train.keep_checkpoints=100"]
# reproducible reduce with 1-sample chunks: every one of the 4 ranks computes a share of the batch
SETS = [*BASE, "--set", 'comm.reduce="reproducible"', "--set", "comm.chunk=1"]
SLOW = {"DPBP_STEP_SLEEP": "0.05"}  # >= 4 s left after step 40: time to preempt the job
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.slurm


def job_env(**extra) -> dict:
    """What a user sets before sbatch: the interpreter, the repo, the venv's mpirun on PATH."""
    env = {"DPBP_PYTHON": sys.executable, "DPBP_HOME": str(REPO),
           "PATH": BIN + os.pathsep + os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin",
           "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in run_dir.glob("ckpt-*.npz")
                  if (m := re.fullmatch(r"ckpt-(\d{8})\.npz", p.name)))


def wait_for_checkpoint(slurm, job: str, run_dir: Path, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = ckpt_steps(run_dir)
        if steps and steps[-1] >= at_least:
            assert slurm.state(job) == "RUNNING"
            return steps[-1]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint >= {at_least} in {run_dir} after {timeout}s; "
                         f"job {slurm.job_info(job)}\n{slurm.logs()}")


def submit(slurm, tmp_path: Path, *train_args, name: str = "job", env=None, ntasks: int = 4,
           sets=SETS) -> tuple[str, Path]:
    out = tmp_path / f"{name}.out"
    job = slurm.sbatch([f"--ntasks={ntasks}", f"--output={out}", "--time=5",
                        str(SBATCH), str(CONFIG), *sets, *train_args],
                       cwd=tmp_path, env=job_env(**(env or {})))
    return job, out


def no_ranks_left(run_dir: Path) -> bool:
    """No dpbp.train process of this run survives the job."""
    p = subprocess.run(["pgrep", "-f", f"dpbp.train .*{run_dir}"], capture_output=True, text=True)
    return p.stdout.strip() == ""


def plain_mpirun(sets, out: Path) -> Path:
    """final.npz of the uninterrupted run under plain `mpirun -n 4` (no Slurm involved)."""
    dpbp("train", "--config", CONFIG, *sets, "--out", out, "--quiet", ranks=4, timeout=120, check=True,
         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return out / "final.npz"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return plain_mpirun(SETS, tmp_path_factory.mktemp("plain") / "run")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_matches_plain_mpirun(slurm, tmp_path, reference, launcher):
    """4 tasks through launch/slurm.sbatch == plain mpirun -n 4, bitwise; run dir runs/$JOBID."""
    env = job_env(DPBP_LAUNCHER=launcher)
    del env["DPBP_HOME"]  # the script finds the repository from the submitted script's path
    job = slurm.sbatch(["--ntasks=4", "--time=5", str(SBATCH), str(CONFIG), *SETS],
                       cwd=tmp_path, env=env)
    info = slurm.wait_done(job, 150)
    log = (tmp_path / f"slurm-{job}.out").read_text()  # sbatch's default output name
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "world size 4" in log and f"launcher {launcher}" in log, log
    assert f"repository {REPO}" in log, log
    run_dir = tmp_path / "runs" / job
    assert (run_dir / "config.toml").exists() and (run_dir / "metrics.jsonl").exists()
    assert ckpt_steps(run_dir)[0] == 20 and ckpt_steps(run_dir)[-1] == STEPS
    assert_bitwise_equal(run_dir / "final.npz", reference)


@pytest.mark.timeout(240)
def test_wrong_world_size_fails_loudly(slurm, tmp_path):
    """srun without PMI starts 4 single-rank programs: the job must fail, not train 4 copies."""
    job, out = submit(slurm, tmp_path, "--out", str(tmp_path / "run"), env={"DPBP_SRUN_MPI": "none"})
    info = slurm.wait_done(job, 150)
    log = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert "MPI world size is 1 but 4 ranks were expected" in log, log
    assert not (tmp_path / "run" / "final.npz").exists()


@pytest.mark.timeout(240)
def test_requeue_resumes_bitwise(slurm, tmp_path, reference):
    """`scontrol requeue` (preemption): the ranks checkpoint, the job restarts by itself,
    resumes from that checkpoint, and ends with the uninterrupted run's parameters."""
    run_dir = tmp_path / "run"
    job, out = submit(slurm, tmp_path, "--out", str(run_dir), env=SLOW)
    wait_for_checkpoint(slurm, job, run_dir, 40, 120)
    slurm.run(["scontrol", "requeue", job], check=True)
    info = slurm.wait_state(job, lambda i: i.get("JobState") == "COMPLETED"
                            or (i.get("JobState") in {"FAILED", "CANCELLED"}), 180, "completion")
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", info
    stopped = re.findall(r"stop requested by a signal: checkpoint at step (\d+)", log)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert len(stopped) == 1 and resumed == stopped, log
    assert 40 <= int(stopped[0]) < STEPS
    # the output of both runs is in the one file, in order (--open-mode=append)
    assert log.index("restart 0]") < log.index("stop requested") < log.index("restart 1]"), log
    # metrics.jsonl holds the first run's records and the resumed run's (appended)
    records = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if r.get("split") != "val"]
    assert logged[0] == 20 and logged[-1] == STEPS and logged == sorted(logged), logged
    assert len((run_dir / "header.jsonl").read_text().splitlines()) == 2  # one line per start
    assert_bitwise_equal(run_dir / "final.npz", reference)


@pytest.mark.timeout(240)
def test_a_restart_after_the_pmi2_flake_starts_the_ranks_with_mpirun(slurm, tmp_path, reference):
    """An attempt whose output shows Slurm's pmi2 plugin rejecting MPICH's start-up (written into the job's
    output here, as slurmstepd writes it) makes the restart use mpirun, and the run still ends bitwise."""
    run_dir = tmp_path / "run"
    job, out = submit(slurm, tmp_path, "--out", str(run_dir), env=SLOW)
    wait_for_checkpoint(slurm, job, run_dir, 40, 120)
    with open(out, "a") as f:
        f.write("slurmstepd: error: mpi/pmi2: value not properly terminated in client request\n")
    slurm.run(["scontrol", "requeue", job], check=True)
    info = slurm.wait_state(job, lambda i: i.get("JobState") == "COMPLETED"
                            or (i.get("JobState") in {"FAILED", "CANCELLED"}), 180, "completion")
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    first, second = log.split("restart 1]", 1)
    assert "launcher srun" in first and "launcher mpirun" in second, log
    assert "failed in Slurm's pmi2 plugin" in second and "starts the ranks with mpirun" in second, log
    assert_bitwise_equal(run_dir / "final.npz", reference)


@pytest.mark.timeout(240)
def test_time_limit_warning_checkpoints_and_requeues(slurm, tmp_path, reference):
    """The time-limit warning (--signal=B:USR1@120 goes to the batch shell alone; sent here by
    hand): the script forwards it, the ranks checkpoint and exit 75, the script requeues the
    job, which resumes and matches the uninterrupted run bitwise."""
    run_dir = tmp_path / "run"
    job, out = submit(slurm, tmp_path, "--out", str(run_dir), env=SLOW)
    wait_for_checkpoint(slurm, job, run_dir, 40, 120)
    slurm.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = slurm.wait_state(job, lambda i: i.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED"}
                            and i.get("Restarts") == "1", 180, "requeue and completion")
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "got SIGUSR1: forwarding it to the ranks" in log and "requeueing job" in log, log
    stopped = re.findall(r"checkpoint at step (\d+)", log)
    assert len(stopped) == 1 and re.search(rf"resumed from \S+ at step {stopped[0]}\b", log), log
    assert_bitwise_equal(run_dir / "final.npz", reference)


@pytest.mark.timeout(240)
def test_scancel_term_checkpoints_and_exits_cleanly(slurm, tmp_path, reference):
    """`scancel --signal=TERM`: every rank stops at a step boundary, rank 0 writes a valid
    checkpoint, all exit 75 and the job ends with exit code 75:0 (no kill, no requeue, no
    traceback). Resubmitting with the same --out then resumes and finishes bitwise."""
    run_dir = tmp_path / "run"
    job, out = submit(slurm, tmp_path, "--out", str(run_dir), env=SLOW)
    wait_for_checkpoint(slurm, job, run_dir, 40, 120)
    slurm.run(["scancel", "--signal=TERM", job], check=True)
    info = slurm.wait_done(job, 150)
    log = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log)
    assert info["Restarts"] == "0", info
    m = re.findall(r"stop requested by a signal: checkpoint at step (\d+)", log)
    assert len(m) == 1, log
    step = int(m[0])
    assert 40 <= step < STEPS and ckpt_steps(run_dir)[-1] == step
    arrays, meta = ckpt.load(run_dir / f"ckpt-{step:08d}.npz")  # checksum verified
    assert meta["step"] == step and meta["world_size"] == 4
    assert "tasks 0-3: Exited with exit code 75" in log, log
    assert "Traceback" not in log and "Killed" not in log and "error: rank" not in log, log
    assert not (run_dir / "final.npz").exists()
    assert no_ranks_left(run_dir)

    # a new job (new id) given the same run directory picks up from that checkpoint
    job2, out2 = submit(slurm, tmp_path, "--out", str(run_dir), name="again")
    info2 = slurm.wait_done(job2, 150)
    log2 = out2.read_text()
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", log2
    assert re.search(rf"resumed from \S+ at step {step}\b", log2), log2
    assert_bitwise_equal(run_dir / "final.npz", reference)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cpus_per_task", [1, 2])  # 1: not the BLAS default (all cores); 2: not always 1
def test_blas_threads_are_the_cpus_of_a_task(slurm, tmp_path, cpus_per_task):
    """No thread count set: each rank gets --cpus-per-task BLAS threads (the task's CPUs shared by no other
    rank), and numpy in the ranks really runs that many."""
    # empty is unset for dpbp, and it overrides whatever this process's environment would pass on
    env = job_env(OMP_NUM_THREADS="", OPENBLAS_NUM_THREADS="", MKL_NUM_THREADS="")
    out = tmp_path / "threads.out"
    tasks = 2
    job = slurm.sbatch([f"--ntasks={tasks}", f"--cpus-per-task={cpus_per_task}", f"--output={out}", "--time=5",
                        str(SBATCH), str(CONFIG), *BASE, "--out", str(tmp_path / "run")], cwd=tmp_path, env=env)
    info = slurm.wait_done(job, 150)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log
    threads = (cpus_per_task * tasks) // tasks  # the job's CPUs on the node, shared by its tasks there
    assert f"{threads} BLAS thread(s) per rank" in log, log
    assert re.search(rf"\| BLAS \S+ \S+ {threads} threads?$", log, re.M), log  # what numpy's BLAS runs with


@pytest.mark.timeout(240)
def test_a_copied_job_script_uses_the_installed_dpbp(slurm, tmp_path, reference):
    """The job script copied away from any checkout (and spooled by Slurm): nothing next to it, no DPBP_HOME,
    no checkout in the submit directory; `python -m dpbp.launch` comes from the installed package."""
    script = tmp_path / "my-job.sbatch"
    script.write_bytes(SBATCH.read_bytes())
    env = job_env()
    del env["DPBP_HOME"]
    job = slurm.sbatch(["--ntasks=4", "--time=5", str(script), str(CONFIG), *SETS], cwd=tmp_path, env=env)
    info = slurm.wait_done(job, 150)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "repository" not in log, log  # no checkout was found, none was used
    assert_bitwise_equal(tmp_path / "runs" / job / "final.npz", reference)
