"""A throw-away single-node Slurm cluster on localhost, for tests/slurm/.

The session-scoped ``slurm`` fixture

* skips (with the reason) only when not running as root or when Debian's
  ``slurmctld slurmd slurm-client munge`` packages are missing and cannot be
  installed with apt-get;
* writes a private configuration into a fresh temporary directory (own
  munged socket and key, own ports, state, spool and log dirs), so it never
  touches /etc/slurm, /run/munge or a cluster that might already be running;
* starts munged, slurmctld and slurmd in the foreground with ``subprocess``,
  keeps their PIDs, waits until the node is ``idle``;
* at the end cancels every job of this private cluster, waits for them to
  leave, then stops slurmd, slurmctld and munged -- by those PIDs only.

Clients find the private cluster through ``SLURM_CONF``, which the fixture
sets in ``os.environ`` for the session (and restores afterwards); sbatch's
default ``--export=ALL`` hands it to the jobs.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo",
            "scancel", "srun", "munged"]
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slurm: needs root; installs Debian's Slurm and runs a private "
        "single-node cluster on localhost (tests/slurm)")


# ---------------------------------------------------------------- helpers --

def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def _install_packages() -> str | None:
    """apt-get install the packages; return None on success or the reason."""
    if shutil.which("apt-get") is None:
        return "apt-get not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-q"],
             ["apt-get", "install", "-y", "-q", "--no-install-recommends",
              *PACKAGES]]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)}: {e}"
        if p.returncode != 0:
            return f"{' '.join(cmd)} exited {p.returncode}: {p.stdout[-1500:]}"
    missing = _missing_binaries()
    if missing:
        return f"installed {PACKAGES} but still missing {missing}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


class SlurmError(RuntimeError):
    pass


class Cluster:
    """Handle on the private cluster; the tests use its methods."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.log_dir = root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = _short_hostname()
        self.env = None  # environment for clients/jobs, set in start()

    # -- setup -------------------------------------------------------------
    def _write_config(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        for d in ["etc", "state", "spool", "log", "munge"]:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable dirs and wants its own dir.
        os.chmod(self.root, 0o755)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o755)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        self.munge_socket = mdir / "munge.socket"

        self.ctl_port, self.d_port = _free_port(), _free_port()
        while self.d_port == self.ctl_port:
            self.d_port = _free_port()
        r = self.root
        self.conf.write_text(f"""\
# private test cluster written by tests/slurm/conftest.py
ClusterName=dpbptest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctl_port}
SlurmdPort={self.d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 + sched_interval=1: a requeued job starts again after ~6 s, not 120 s
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=pmi2
EnforcePartLimits=ALL
ReturnToService=2
# this VM may have fewer cores than the 4 CPUs the tests ask for
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
# Job ids must not repeat across test sessions: MPICH names its shared-memory segment after
# the PMI job (srun --mpi=pmi2: the job and step id) and a stale /dev/shm/mpich_shm_* left by
# an earlier killed job with the same id makes the new ranks segfault or hang in MPI_Init.
FirstJobId={random.randrange(1_000_000, 60_000_000)}
KillWait=30
MinJobAge=600
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=self.env, **kw)
        log.close()

    def _wait_for(self, what: str, pred, timeout: float, proc: str | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc and self.procs[proc].poll() is not None:
                raise SlurmError(f"{proc} exited with {self.procs[proc].returncode}"
                                 f" while waiting for {what}\n{self.logs()}")
            try:
                if pred():
                    return
            except Exception:  # noqa: BLE001 - daemons still starting
                pass
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}\n"
                         f"{self.logs()}")

    def start(self) -> None:
        self._write_config()
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":" + SBIN_PATH
        self.env = env
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={mdir / 'munge.key'}", f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[], cwd=mdir)
        self._wait_for("munged socket", self.munge_socket.exists, 20, "munged")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i",
                                  "-f", str(self.conf)])
        self._wait_for("slurmctld", lambda: self.run(["scontrol", "ping"]).returncode == 0
                       and "UP" in self.run(["scontrol", "ping"]).stdout, 60, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf),
                               "-N", self.node])
        self._wait_for("node idle",
                       lambda: self.run(["sinfo", "-h", "-o", "%t"]).stdout.strip() == "idle",
                       90, "slurmd")

    # -- teardown ----------------------------------------------------------
    def stop(self) -> None:
        if self.env is not None and "slurmctld" in self.procs \
                and self.procs["slurmctld"].poll() is None:
            ids = self.job_ids()
            if ids:
                self.run(["scancel", *ids])
                deadline = time.monotonic() + 60
                while self.job_ids(states="PENDING,RUNNING,COMPLETING,CONFIGURING,"
                                   "REQUEUED,SUSPENDED,RESIZING,SIGNALING") \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ["slurmd", "slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    # -- client helpers ----------------------------------------------------
    def run(self, cmd: list[str], timeout: float = 30, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=kw.pop("env", self.env), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise SlurmError(f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def job_ids(self, states: str = "all") -> list[str]:
        p = self.run(["squeue", "-h", "-o", "%i", f"--states={states}"])
        return p.stdout.split()

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None,
               timeout: float = 90) -> str:
        """Submit; returns the job id (with --wait in args: after the job ended)."""
        e = dict(self.env, **(env or {}))
        p = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=e, check=True,
                     timeout=timeout)
        return p.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once the record is gone)."""
        p = self.run(["scontrol", "show", "job", "-o", job_id])
        if p.returncode != 0:
            return {}
        info = {}
        for m in re.finditer(r"(\w[\w/:]*)=(\S*)", p.stdout):
            info.setdefault(m.group(1), m.group(2))
        return info

    def state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "")

    def wait_state(self, job_id: str, pred, timeout: float, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if pred(info):
                return info
            time.sleep(0.25)
        raise SlurmError(f"job {job_id}: timed out after {timeout}s waiting for "
                         f"{what or pred}; last info {info}\n{self.logs()}")

    def wait_done(self, job_id: str, timeout: float) -> dict:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                 "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        return self.wait_state(job_id, lambda i: i.get("JobState") in final,
                               timeout, "job end")

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)


# --------------------------------------------------------------- fixtures --

@pytest.fixture(scope="session")
def slurm():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("slurm tests need root (they install Debian's Slurm packages "
                    "and run slurmctld/slurmd/munged)")
    try:
        pwd.getpwnam("munge")
        missing = _missing_binaries()
    except KeyError:
        missing = ["munge user"]
    if missing:
        reason = _install_packages()
        if reason:
            pytest.skip(f"cannot install Slurm packages {PACKAGES}: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dpbp-slurm-"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("DPBP_KEEP_SLURM_DIR"):
            print(f"slurm test cluster files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
