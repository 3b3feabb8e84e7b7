"""Fault tests' tools: a dpbp job in the background, its ranks' process ids, its progress, hard limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np

from tests.conftest import REPO, dpbp_command, load_params

SPIRALS = os.path.join(REPO, "configs/spirals.toml")


def small(steps, *extra):
    """A small, fast training job (2-32-32-2 tanh net on the spirals, batch 32) as command-line args."""
    return ["--config", SPIRALS, "--set", f"train.steps={steps}", "--set", "data.batch_size=32",
            "--set", "train.eval_every=0", "--quiet", *extra]


class Job:
    """`python -m dpbp.train args` started in the background (own session, so cleanup reaches all of it)."""

    def __init__(self, *args, ranks=None, env=None):
        cmd, full_env = dpbp_command("train", *args, ranks=ranks, env=env)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full_env, cwd=REPO, start_new_session=True)
        self.started = time.monotonic()

    def finish(self, timeout):
        """(exit status, stdout, stderr, seconds since start); the job is killed and the test fails if
        it has not ended within `timeout` seconds: a hang is a failure, never a stuck test run."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            raise AssertionError(f"{' '.join(self.cmd)} still running after {timeout} s: it hangs\n{out}\n{err}")
        return self.proc.returncode, out, err, time.monotonic() - self.started

    def rank_pids(self, ranks, timeout=30):
        """{rank: pid} of the python processes that mpirun started (found through /proc, by PMI_RANK)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for pid in descendants(self.proc.pid):
                rank = environ_of(pid).get("PMI_RANK")
                if rank is not None:
                    found[int(rank)] = pid
            if len(found) == ranks:
                return found
            time.sleep(0.05)
        raise AssertionError(f"could not find the {ranks} rank processes of {self.cmd}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def descendants(root):
    """Process ids below `root`, from the parent links in /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def environ_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def wait_for_step(run_dir, step, job, timeout=60):
    """Block until metrics.jsonl records `step` (needs train.log_every=1); fail if the job ends first.
    Returns the time (monotonic) at which the record was seen."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = job.proc.poll() is not None  # before reading: a record written before the end is seen
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if line.endswith("\n")]
            if steps and max(steps) >= step:
                return time.monotonic()
        if ended:
            raise AssertionError(f"the job ended before step {step}: {job.proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def assert_bitwise_equal(path_a, path_b):
    a, b = load_params(path_a), load_params(path_b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].tobytes() != b[k].tobytes():
            worst = float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
            raise AssertionError(f"{k} differs between {path_a} and {path_b} (max |diff| {worst:.3g})")


def error_lines(stderr):
    """stderr lines from dpbp itself (not MPI's own notices)."""
    return [line for line in stderr.splitlines() if line.startswith("dpbp")]
