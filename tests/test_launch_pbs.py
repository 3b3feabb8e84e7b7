"""launch/pbs.sh with stand-in qstat and qsub on PATH (and, where no training is needed, a stand-in mpirun).

The script runs as PBS runs it: a copy in a spool directory, started in a work directory that holds no
dpbp checkout, so it must reach the installed package (python -m dpbp.launch) and nothing next to itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env
from tests.jobs import assert_bitwise_equal

JOB = "123.fake-server"
NEW_JOB = "124.fake-server"
THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SETS = ["--set", "train.steps=60", "--set", "data.batch_size=32", "--set", "train.eval_every=0",
        "--set", "train.log_every=1", "--set", "comm.reduce='reproducible'", "--set", "comm.chunk=8", "--quiet"]

QSTAT = """#!/bin/bash
# qstat -f JOBID: the job's attributes as the test wrote them (none: no walltime known)
[ "$1" = -f ] && [ -f "$FAKE_PBS/qstat-$2" ] && { echo "Job Id: $2"; cat "$FAKE_PBS/qstat-$2"; }
"""
QSUB = """#!/bin/bash
# records its arguments (NUL-separated, one file per call) and the submitted script's text; prints a job id
n=$(ls "$FAKE_PBS"/qsub-*.args 2>/dev/null | wc -l)
printf '%s\\0' "$@" > "$FAKE_PBS/qsub-$n.args"
cp "${@: -1}" "$FAKE_PBS/qsub-$n.script"
echo "$FAKE_NEW_JOB"
"""
MPIRUN = """#!/bin/bash
# stand-in for mpirun: records its arguments and thread environment, exits 75 on a stop signal like the ranks
trap 'echo "stand-in mpirun got SIGUSR1"; exit 75' USR1
trap 'echo "stand-in mpirun got SIGTERM"; exit 75' TERM
printf '%s\\0' "$@" > "$FAKE_PBS/mpirun.args"
env | grep -E '^(OMP_NUM_THREADS|OPENBLAS_NUM_THREADS|MKL_NUM_THREADS|DPBP_EXPECT_WORLD_SIZE)=' | sort \\
    > "$FAKE_PBS/mpirun.env"
touch "$FAKE_PBS/mpirun.ready"
while :; do sleep 0.05; done
"""


class Pbs:
    """A fake PBS: a spool dir holding the job script's copy, a work dir, a node file, stand-in commands."""

    def __init__(self, tmp_path, slots=2):
        self.root = tmp_path
        self.fake = tmp_path / "pbs"
        self.work = tmp_path / "work"
        for d in (self.fake, self.work, tmp_path / "spool", tmp_path / "bin"):
            d.mkdir()
        self.script = tmp_path / "spool" / f"{JOB}.SC"
        shutil.copy(os.path.join(REPO, "launch/pbs.sh"), self.script)
        self.nodefile = tmp_path / "nodefile"
        self.nodefile.write_text("localhost\n" * slots)
        for name, text in (("qstat", QSTAT), ("qsub", QSUB), ("mpirun", MPIRUN)):
            (tmp_path / "bin" / name).write_text(text)
            (tmp_path / "bin" / name).chmod(0o755)
        shutil.copy(os.path.join(REPO, "configs/spirals.toml"), self.work / "spirals.toml")

    def qstat(self, job, **attributes):
        (self.fake / f"qstat-{job}").write_text("".join(f"    {k} = {v}\n" for k, v in attributes.items()))

    def env(self, job=JOB, real_mpirun=True, **extra):
        env = {k: v for k, v in clean_env().items()
               if k not in THREADS and not k.startswith(("DPBP_", "PBS_", "NCPUS", "MPIPROCS"))}
        bin_dir = os.path.dirname(sys.executable)
        env.update(PATH=f"{self.root / 'bin'}:{bin_dir}:{env.get('PATH', '')}", FAKE_PBS=str(self.fake),
                   FAKE_NEW_JOB=NEW_JOB, PBS_JOBID=job, PBS_O_WORKDIR=str(self.work),
                   PBS_NODEFILE=str(self.nodefile), PBS_JOBNAME="dpbp", DPBP_PYTHON=sys.executable,
                   DPBP_MPIRUN=os.path.join(bin_dir, "mpirun") if real_mpirun else "mpirun")
        env.pop("PYTHONPATH", None)  # dpbp comes from the installed package, not from a checkout
        env.update(extra)
        return env

    def start(self, args, env):
        return subprocess.Popen(["bash", str(self.script), *map(str, args)], cwd=self.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def qsub_calls(self):
        calls = []
        for n in range(len(list(self.fake.glob("qsub-*.args")))):
            calls.append((self.fake / f"qsub-{n}.args").read_text().split("\0")[:-1])
        return calls

    def stand_in_args(self):
        return (self.fake / "mpirun.args").read_text().split("\0")[:-1]


def finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"pbs.sh still runs after {timeout} s: {proc.communicate()[0]}")
    return proc.returncode, out


def wait_for(path, proc, text=None, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists() or (text is not None and text not in path.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, f"no {path}: {proc.communicate()[0]}"
        time.sleep(0.05)


def resubmitted_env(call):
    """The environment qsub -v VAR=value,... gives the resubmitted job."""
    pairs = call[call.index("-v") + 1].split(",")
    return dict(p.split("=", 1) for p in pairs)


@pytest.mark.timeout(300)
def test_the_warning_checkpoints_resubmits_and_the_new_job_resumes_bitwise(tmp_path):
    pbs = Pbs(tmp_path)
    pbs.qstat(JOB, **{"Resource_List.walltime": "01:00:00", "Resource_List.nodes": "1:ppn=2",
                      "resources_used.walltime": "00:00:01"})
    ref_env = pbs.env(job="99.fake-server")
    rc, out = finish(pbs.start(["spirals.toml", *SETS, "--out", tmp_path / "reference"], ref_env))
    assert rc == 0 and "no walltime found with qstat" in out, out

    job = pbs.start(["spirals.toml", *SETS], pbs.env(DPBP_STEP_SLEEP="0.05"))
    run = pbs.work / "runs" / "123"  # the job number, under PBS_O_WORKDIR
    wait_for(run / "metrics.jsonl", job, '"step"')
    os.kill(job.pid, signal.SIGUSR1)  # what the walltime timer sends (its own test is below)
    rc, out = finish(job)
    assert rc == 75 and any(p.name.startswith("ckpt-") for p in run.iterdir()), out
    assert f"resubmitted as job {NEW_JOB}, which resumes from {run}" in out, out
    [call] = pbs.qsub_calls()
    assert call[-1] == str(pbs.script)  # the script as PBS ran it ...
    assert (pbs.fake / "qsub-0.script").read_bytes() == pbs.script.read_bytes()  # ... still there to submit
    flags = list(zip(call[:-1:2], call[1:-1:2]))
    for flag in [("-N", "dpbp"), ("-l", "walltime=01:00:00"), ("-l", "nodes=1:ppn=2"),
                 ("-W", f"depend=afterany:{JOB}")]:
        assert flag in flags, call
    new_env = resubmitted_env(call)
    assert new_env["DPBP_RUN_DIR"] == str(run) and new_env["DPBP_PYTHON"] == sys.executable, call

    # the resubmitted job: no arguments, only what qsub -v passes; it takes them from RUN_DIR/launch.args
    again = pbs.start([], pbs.env(job=NEW_JOB, **new_env))
    rc, out = finish(again)
    assert rc == 0 and f"arguments from {run}/launch.args" in out and ": resuming (newest" in out, out
    assert_bitwise_equal(tmp_path / "reference" / "final.npz", run / "final.npz")
    log = (run / "launch.log").read_text()  # both jobs, appended
    assert log.count("no checkpoint yet, fresh start") == 1 and log.count(": resuming (newest") == 1, log
    assert len(pbs.qsub_calls()) == 1  # a finished run resubmits nothing


def test_the_walltime_timer_sends_the_warning_before_the_limit(tmp_path):
    """qstat's walltime minus the time used minus DPBP_WARN_SECONDS: then SIGUSR1, 75 and a resubmission
    with the same resources; the node file gives the ranks, NCPUS / MPIPROCS the BLAS threads."""
    pbs = Pbs(tmp_path, slots=3)
    pbs.qstat(JOB, **{"Resource_List.walltime": "00:10:00", "resources_used.walltime": "00:00:30",
                      "Resource_List.select": "1:ncpus=8:mpiprocs=3", "Resource_List.place": "scatter"})
    env = pbs.env(real_mpirun=False, DPBP_WARN_SECONDS="568", NCPUS="8", MPIPROCS="3", PBS_QUEUE="short",
                  DPBP_ARGS="spirals.toml --set \"data.note='a b'\" --out=here")
    rc, out = finish(pbs.start([], env))
    assert rc == 75 and "stand-in mpirun got SIGUSR1" in out, out
    left = 600 - 30 - 568
    assert f"time-limit warning (SIGUSR1 to this process) in {left} s" in out, out
    here = pbs.work / "here"
    assert pbs.stand_in_args() == ["-n", "3", "-machinefile", str(pbs.nodefile), sys.executable, "-m",
                                   "dpbp.train", "--config", "spirals.toml", "--resume-or-start", str(here),
                                   "--set", "data.note='a b'"]
    threads = max(1, 8 // 3)
    assert (pbs.fake / "mpirun.env").read_text().split() == [
        "DPBP_EXPECT_WORLD_SIZE=3", f"MKL_NUM_THREADS={threads}", f"OMP_NUM_THREADS={threads}",
        f"OPENBLAS_NUM_THREADS={threads}"]
    [call] = pbs.qsub_calls()
    flags = list(zip(call[:-1:2], call[1:-1:2]))
    for flag in [("-l", "walltime=00:10:00"), ("-l", "select=1:ncpus=8:mpiprocs=3"), ("-l", "place=scatter"),
                 ("-q", "short"), ("-W", f"depend=afterany:{JOB}")]:
        assert flag in flags, call
    assert resubmitted_env(call)["DPBP_RUN_DIR"] == str(here)
    saved = (here / "launch.args").read_text().split("\0")[:-1]
    assert saved == [str(pbs.work / "spirals.toml"), "--set", "data.note='a b'"]


@pytest.mark.parametrize("sig, env", [(signal.SIGTERM, {}), (signal.SIGUSR1, {"DPBP_REQUEUE": "0"}),
                                      (signal.SIGINT, {})])
def test_other_stops_checkpoint_without_resubmitting(tmp_path, sig, env):
    """qdel / preemption (SIGTERM), the warning with DPBP_REQUEUE=0, a Ctrl-C: 75 and no new job."""
    pbs = Pbs(tmp_path)
    pbs.qstat(JOB, **{"Resource_List.walltime": "01:00:00"})
    job = pbs.start(["spirals.toml"], pbs.env(real_mpirun=False, **env))
    wait_for(pbs.fake / "mpirun.ready", job)
    os.kill(job.pid, sig)
    rc, out = finish(job)
    assert rc == 75 and "stand-in mpirun got SIGUSR1" in out and "stopped after writing a checkpoint" in out, out
    assert pbs.qsub_calls() == []
    assert ["-n", "2"] == pbs.stand_in_args()[:2]  # one rank per node-file line
    assert "OMP_NUM_THREADS=1" in (pbs.fake / "mpirun.env").read_text()  # Torque: no NCPUS, one thread


@pytest.mark.parametrize("args, env, message", [
    (["spirals.toml"], {"PBS_JOBID": ""}, "not inside a PBS job"),
    ([], {}, 'no CONFIG given: qsub -F "CONFIG [options]"'),
    (["missing.toml"], {}, "config file 'missing.toml' not found"),
    (["spirals.toml", "--resume", "x"], {}, "do not pass --resume"),
])
def test_bad_input_is_status_2(tmp_path, args, env, message):
    pbs = Pbs(tmp_path)
    rc, out = finish(pbs.start(args, pbs.env(real_mpirun=False, **env)))
    assert rc == 2 and message in out and "Traceback" not in out, out
    assert not (pbs.fake / "mpirun.args").exists()
