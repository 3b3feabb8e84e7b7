"""tests/cluster/hosts.sh itself: separate hosts, their links, the client environment, up and down."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.cluster.conftest import N_HOSTS, SUBNET, new_cluster, process_alive, remove

pytestmark = pytest.mark.cluster
SLURMD_PORT = 6918  # hosts.sh's SlurmdPort: every host listens on it, on its own address
CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
           "    print('connected')\n"
           "except OSError as e:\n"
           "    print('failed', e)\n")


def address(k):
    return f"{SUBNET}{10 + k}"


def netns_names():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links():
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def root_addresses():
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return out


def connect(hosts, k, target, timeout=1.0):
    """From host k: can it open a TCP connection to target (address, port)?"""
    out = hosts.exec(k, "python3", "-c", CONNECT, target[0], str(target[1]), str(timeout))
    return out.strip() == "connected"


def test_every_host_is_its_own_machine(cluster):
    """Own network namespace (named by `ip netns identify`), host name and address; own IPC namespace."""
    assert {f"{cluster.prefix}-sw", *(cluster.ns(k) for k in range(1, N_HOSTS + 1))} <= netns_names()
    ipc = set()
    for k in range(1, N_HOSTS + 1):
        assert cluster.exec(k, "ip", "netns", "identify").strip() == cluster.ns(k)
        assert cluster.exec(k, "hostname").strip() == cluster.ns(k)
        addrs = re.findall(r"inet (\S+)", cluster.exec(k, "ip", "-4", "-o", "addr"))
        assert sorted(addrs) == sorted(["127.0.0.1/8", f"{address(k)}/24"])
        ipc.add(cluster.exec(k, "readlink", "/proc/self/ns/ipc").strip())
    assert len(ipc) == N_HOSTS and os.readlink("/proc/self/ns/ipc") not in ipc
    # the hosts reach each other over the switch
    assert connect(cluster, 1, (address(2), SLURMD_PORT)) and connect(cluster, 2, (address(1), SLURMD_PORT))
    # ... and nothing of the cluster is in the root namespace: no route there, no address, no link
    assert SUBNET not in root_addresses()
    assert not [name for name in root_links() if name.startswith(cluster.prefix)]
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert SUBNET not in routes


def test_jobs_see_private_dev_shm_and_host_names(cluster, tmp_path):
    """A 2-node step: each task runs on its own host and its /dev/shm holds only its own files."""
    script = ("touch /dev/shm/dpbp-probe-$SLURM_NODEID; sleep 1; "
              "echo $(hostname) $SLURMD_NODENAME $(ls /dev/shm | grep dpbp-probe | tr '\\n' ' ')")
    p = cluster.run(["srun", "-N", str(N_HOSTS), "--ntasks-per-node=1", "bash", "-c", script],
                    cwd=tmp_path, timeout=60)
    lines = sorted(p.stdout.split("\n")[:-1])
    assert lines == [f"{cluster.ns(k)} {cluster.ns(k)} dpbp-probe-{k - 1}" for k in range(1, N_HOSTS + 1)], p.stdout
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("dpbp-probe")]


def test_env_points_the_clients_at_this_cluster(cluster, tmp_path):
    """After `eval "$(hosts.sh env)"` in a shell: sinfo, sbatch, squeue, scontrol, scancel all work."""
    lines = cluster.sh("env").stdout.splitlines()
    assert lines and all(re.fullmatch(r"export [A-Z_]+=\S+", line) for line in lines), lines
    shell = ('eval "$(hosts env)"; sinfo -h -N -o "%N %T"; '
             'j=$(sbatch --parsable -N 1 -o /dev/null --wrap "sleep 300"); '
             'for i in $(seq 100); do [ "$(squeue -h -j $j -o %T)" = RUNNING ] && break; sleep 0.1; done; '
             'echo "state $(squeue -h -j $j -o %T) on $(squeue -h -j $j -o %N)"; scancel $j; '
             'for i in $(seq 100); do [ -z "$(squeue -h -j $j)" ] && break; sleep 0.1; done; '
             'echo "after scancel: $(scontrol show job -o $j | grep -o "JobState=[A-Z]*")"')
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env.update(DPBP_CLUSTER_DIR=str(cluster.root), DPBP_CLUSTER_PREFIX=cluster.prefix)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "hosts").symlink_to(os.path.join(os.path.dirname(__file__), "hosts.sh"))
    env["PATH"] = f"{bindir}:{env['PATH']}"
    p = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    out = p.stdout.splitlines()
    assert p.returncode == 0, p.stderr
    assert out[:N_HOSTS] == [f"{cluster.ns(k)} idle" for k in range(1, N_HOSTS + 1)], p.stdout
    assert re.fullmatch(rf"state RUNNING on {cluster.prefix}-h\d", out[N_HOSTS]), p.stdout
    assert out[N_HOSTS + 1] == "after scancel: JobState=CANCELLED", p.stdout


def test_link_down_cuts_the_host_off_and_up_restores_it(cluster):
    target = (address(2), SLURMD_PORT)
    assert connect(cluster, 1, target)
    cluster.sh("link", 2, "down")
    try:
        assert not connect(cluster, 1, target)
        assert not connect(cluster, 2, (address(1), SLURMD_PORT))
        assert connect(cluster, 1, (f"{SUBNET}1", 6917))  # host 1 still reaches the controller
    finally:
        cluster.sh("link", 2, "up")
    for _ in range(50):  # the switch port needs a moment to forward again
        if connect(cluster, 1, target):
            break
        time.sleep(0.1)
    assert connect(cluster, 1, target) and connect(cluster, 2, (address(1), SLURMD_PORT))


def test_up_again_is_a_no_op(cluster):
    before = cluster.pids()
    p = cluster.sh("up", N_HOSTS)
    assert "already up" in p.stderr
    assert cluster.pids() == before and all(process_alive(pid, st) for _, pid, st in before)
    p = cluster.sh("up", N_HOSTS + 1, check=False)
    assert p.returncode == 2 and "already up with 2 hosts" in p.stderr
    assert cluster.pids() == before


def test_bad_arguments_get_one_message(cluster):
    for args, text in [(["exec", 3, "true"], "not one of 1..2"), (["link", 1, "sideways"], "down|up"),
                       (["up", "x"], "usage"), (["frobnicate"], "usage")]:
        p = cluster.sh(*args, check=False)
        assert p.returncode == 2 and text in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)


def host_processes(hosts):
    """Global PIDs of every process in the cluster's network namespaces (daemons, job steps, tasks)."""
    pids = []
    for ns in [f"{hosts.prefix}-sw", *(hosts.ns(k) for k in (1, 2))]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


def test_down_leaves_nothing_behind(cluster, tmp_path):
    """A second cluster of its own with a job running: down stops every process it started (and the job's),
    removes the namespaces and links, and a second down is harmless."""
    other = new_cluster("d")
    try:
        p = other.up(2)
        assert p.returncode == 0, p.stderr
        job = other.sbatch(["-N", "2", "--ntasks-per-node=1", "-o", "/dev/null", "--wrap", "srun sleep 300"],
                           cwd=tmp_path)
        for _ in range(200):
            running = [pid for pid in host_processes(other) if _comm(pid) == "sleep"]
            if len(running) == 2:
                break
            time.sleep(0.1)
        assert len(running) == 2, (job, other.job_info(job))
        everything = host_processes(other) + [pid for _, pid, _ in other.pids()]
        started = other.pids()
        assert {name for name, _, _ in started} >= {"munged", "slurmctld", "init.1", "slurmd.1", "init.2",
                                                     "slurmd.2"}
        other.down()
        assert not [pid for pid in set(everything) if process_alive(pid)]
        assert not [n for n in netns_names() if n.startswith(other.prefix)]
        assert not [name for name in root_links() if name.startswith(other.prefix)]
        assert not [pid for pid in _all_pids() if str(other.root) in _cmdline(pid)]
        other.down()  # again: nothing to do, no error
    finally:
        remove(other)


def test_root_namespace_never_got_an_address_or_link(cluster, root_monitor):
    """`ip monitor` in the root namespace, since before bring-up: nothing of any cluster of this session."""
    lines, running = root_monitor()
    assert running, lines  # the monitor watched all along
    events = [line for line in lines if SUBNET in line or re.search(r"\bdpbp[0-9a-f]{4}-", line)]
    assert events == []


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and process_alive(int(p))]


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
