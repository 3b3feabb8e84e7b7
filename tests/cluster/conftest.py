"""A Slurm cluster of 2 simulated hosts on this machine, for tests/cluster/ (see hosts.sh).

The session-scoped ``cluster`` fixture

* skips (with the reason) only when not running as root, or when hosts.sh cannot install the Debian
  packages it needs (its exit status 3);
* watches the root network namespace (``ip monitor``) from before bring-up, so a test can check that no
  address or link of the cluster ever appeared there;
* brings the cluster up with ``hosts.sh up 2`` in a fresh state directory, under a name prefix of its
  own (``dpbp`` + 4 hex digits: test sessions running side by side on one machine do not collide);
* always calls ``hosts.sh down`` at the end: after failures, on Ctrl-C, and on SIGTERM/SIGHUP (turned
  into KeyboardInterrupt so that pytest unwinds the fixtures). A session killed outright (SIGKILL) leaves
  an ``owner`` file naming its dead process: the next session finds it and takes that cluster down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HOSTS_SH = Path(__file__).resolve().parent / "hosts.sh"
N_HOSTS = 2
SUBNET = "10.211.7."  # hosts.sh's addresses: the controller .1, host K .(10+K)
STATE_GLOB = "dpbp-cluster-test-*"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs root; runs a Slurm cluster of simulated hosts (tests/cluster/hosts.sh)")


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """pid runs (not a zombie) and, if start is given, is still the process that started then."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start is None or fields[19] == start)


class Hosts:
    """Handle on one cluster brought up by hosts.sh (state directory `root`, name prefix `prefix`)."""

    def __init__(self, root: Path, prefix: str):
        self.root, self.prefix = root, prefix
        self.env = None  # what `hosts.sh env` exports, applied to this environment (after up)

    def sh(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        """hosts.sh args, for this cluster."""
        env = dict(os.environ, DPBP_CLUSTER_DIR=str(self.root), DPBP_CLUSTER_PREFIX=self.prefix)
        p = subprocess.run([str(HOSTS_SH), *map(str, args)], env=env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"hosts.sh {' '.join(map(str, args))} exited {p.returncode}\n"
                                 f"{p.stdout}\n{p.stderr}\n{self.logs()}")
        return p

    def up(self, n=N_HOSTS) -> subprocess.CompletedProcess:
        p = self.sh("up", n, check=False, timeout=900)  # may apt-get install first
        if p.returncode == 0:
            self.env = self.client_env()
        return p

    def down(self) -> None:
        self.sh("down", timeout=120)

    def client_env(self) -> dict:
        """os.environ after the `export NAME=value` lines of `hosts.sh env` (as `eval` would do)."""
        env = dict(os.environ)
        for line in self.sh("env").stdout.splitlines():
            m = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
            assert m, f"not an export line: {line!r}"
            env[m.group(1)] = m.group(2).replace("$PATH", env.get("PATH", ""))
        return env

    def ns(self, k: int) -> str:
        return f"{self.prefix}-h{k}"

    def run(self, cmd, env=None, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, ...) as a user would run it after eval "$(hosts.sh env)"."""
        p = subprocess.run(list(map(str, cmd)), env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}\n{self.logs()}")
        return p

    def exec(self, k: int, *cmd, check=True) -> str:
        return self.sh("exec", k, *cmd, check=check).stdout

    def tx_bytes(self, k: int) -> int:
        """Bytes host k sent on its link, from its own namespace's sysfs (`ip netns exec` mounts that)."""
        out = subprocess.run(["ip", "netns", "exec", self.ns(k), "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out)

    def pids(self) -> list[tuple[str, int, str]]:
        """(name, pid, start time) of every process hosts.sh recorded as started."""
        path = self.root / "run" / "pids"
        if not path.exists():
            return []
        return [(n, int(p), s) for n, p, s in (line.split() for line in path.read_text().splitlines())]

    def sbatch(self, args, cwd, env=None) -> str:
        p = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return p.stdout.strip().split(";")[0]

    def job_info(self, job: str) -> dict:
        p = self.run(["scontrol", "show", "job", "-o", job], check=False)
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", p.stdout)) if p.returncode == 0 else {}

    def wait_done(self, job: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job_info(job)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(0.1)
        self.run(["scancel", job], check=False)
        raise AssertionError(f"job {job} not done after {timeout} s: {info}\n{self.logs()}")

    def logs(self, tail=20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def new_cluster(tag: str) -> Hosts:
    """A fresh state directory under the temp dir, with an owner file naming this process."""
    root = Path(tempfile.mkdtemp(prefix=f"dpbp-cluster-test-{tag}-"))
    prefix = f"dpbp{os.urandom(2).hex()}"  # hosts.sh refuses to reuse names that exist
    (root / "owner").write_text(json.dumps({"pid": os.getpid(), "start": _starttime(os.getpid()),
                                            "prefix": prefix}))
    return Hosts(root, prefix)


def remove_orphans() -> None:
    """Take down clusters whose test session died without cleaning up (killed with SIGKILL)."""
    for root in Path(tempfile.gettempdir()).glob(STATE_GLOB):
        try:
            owner = json.loads((root / "owner").read_text())
        except (OSError, ValueError):
            continue
        if process_alive(owner["pid"], owner["start"]):
            continue  # a session running now
        Hosts(root, owner["prefix"]).sh("down", check=False)
        shutil.rmtree(root, ignore_errors=True)


def remove(hosts: Hosts) -> None:
    hosts.sh("down", check=False)
    if os.environ.get("DPBP_KEEP_CLUSTER_DIR"):
        print(f"cluster files kept in {hosts.root}", file=sys.stderr)
    else:
        shutil.rmtree(hosts.root, ignore_errors=True)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this session dies, even by SIGKILL (Linux prctl)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ensure_ip() -> None:
    """iproute2 for the monitor below, before hosts.sh (which would install it too) runs."""
    if shutil.which("ip") or os.path.exists("/usr/sbin/ip"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("cluster tests need root and iproute2 (ip), or apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "iproute2"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            pytest.skip(f"cluster tests: {' '.join(cmd)} failed")


@pytest.fixture(scope="session")
def root_monitor():
    """A callable: (lines `ip monitor` printed about the root namespace's addresses and links so far,
    whether it still runs)."""
    _ensure_ip()
    log = tempfile.NamedTemporaryFile(prefix="dpbp-ipmon-", suffix=".log", delete=False)
    mon = subprocess.Popen(["ip", "-o", "monitor", "address", "link"], stdout=log,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    time.sleep(0.2)  # let it subscribe before anything happens
    try:
        yield lambda: (Path(log.name).read_text(errors="replace").splitlines(), mon.poll() is None)
    finally:
        mon.terminate()
        mon.wait(timeout=10)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def cluster(root_monitor):
    """The 2-host cluster (a Hosts), up for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("cluster tests need root (network namespaces, slurmctld/slurmd/munged)")
    remove_orphans()
    hosts = new_cluster("s")
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        p = hosts.up()
        if p.returncode == 3:
            pytest.skip(f"cluster tests: {p.stderr.strip()}")
        assert p.returncode == 0, f"hosts.sh up {N_HOSTS} failed\n{p.stdout}\n{p.stderr}\n{hosts.logs()}"
        yield hosts
    finally:
        remove(hosts)
        for s, h in previous.items():
            signal.signal(s, h)
