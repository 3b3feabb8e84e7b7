"""What a user sees while training: the header, plain lines off a terminal, a bar on one, the summary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from dpbp.progress import rank_shares
from tests.conftest import REPO, clean_env, metrics, mpirun_exe

SIZES = [2, 16, 2]
SMALL = ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", f"model.sizes={SIZES}",
         "--set", "train.steps=20", "--set", "data.batch_size=9", "--set", "train.log_every=5",
         "--set", "train.eval_every=10"]
# The Allreduce's share of the time is shown when there are several ranks (group 6).
STEP_LINE = re.compile(r"^step (\d+) epoch (\d+) loss (\S+) accuracy (\S+) lr \S+ samples/s (\d+)"
                       r"(?: allreduce (\S+)%)?$")


def mpi_library():
    """The MPI library's own first line, asked independently of dpbp."""
    out = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return " ".join(out.strip().splitlines()[0].split())


def test_a_serial_run_reports_no_allreduce_share(run_cli, tmp_path):
    proc = run_cli("train", *SMALL, "--out", tmp_path / "run", check=True)
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 4 and not any("allreduce" in line for line in steps), proc.stdout


def test_plain_lines_off_a_terminal(run_cli, tmp_path):
    """Pipes (as in a batch job): a grep-able line every log_every steps, no carriage return, one header."""
    out = tmp_path / "run"
    proc = run_cli("train", *SMALL, "--out", out, ranks=2, check=True)
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert proc.stderr == ""  # rank 1 prints nothing, rank 0 has nothing to warn about
    lines = proc.stdout.splitlines()
    train, val = metrics(out)
    step_lines = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert all(step_lines) and [int(m.group(1)) for m in step_lines] == [5, 10, 15, 20]
    assert all(m.group(6) is not None for m in step_lines)  # 2 ranks: the Allreduce's share is shown
    assert [m.group(3) for m in step_lines] == [f"{r['loss']:.6g}" for r in train]
    assert [line for line in lines if line.startswith("eval step")] == [
        f"eval step {r['step']} epoch {r['epoch']} val_loss {r['loss']:.6g} accuracy {r['accuracy']:.4f}"
        for r in val]

    header = "\n".join(lines[:4])
    assert proc.stdout.count("world size") == 1 and "world size 2" in header
    assert "dpbp 0.1.0" in header and mpi_library() in header
    assert re.search(r"BLAS \S+.* (\d+ threads?|threads \S+)", header), header
    n_params = sum((a + 1) * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    assert f"model 2-16-2 relu/softmax float64, {n_params} parameters" in header  # configs/spirals.toml
    assert "global batch 9, per rank 4-5" in header and "reduce fast" in header
    assert f"output {out}" in header and "20 steps" in header

    summary = lines[-1]
    assert proc.stdout.count("done:") == 1 and summary.startswith("done: 20 steps in ")
    assert f"train loss {train[-1]['loss']:.6g} accuracy {train[-1]['accuracy']:.4f}" in summary
    assert f"val_accuracy {val[-1]['accuracy']:.4f}" in summary
    assert re.search(r" \d+ samples/s", summary) and summary.endswith(f"parameters in {out}/final.npz")
    info = json.loads((out / "header.jsonl").read_text())
    assert info["world_size"] == 2 and info["n_params"] == n_params and info["per_rank"] == [4, 5]


def test_quiet_prints_only_the_summary(run_cli, tmp_path):
    proc = run_cli("train", *SMALL, "--out", tmp_path / "q", "--quiet", ranks=2, check=True)
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith("done: 20 steps")


def test_verbose_adds_the_config_and_every_step(run_cli, tmp_path):
    proc = run_cli("train", *SMALL, "--out", tmp_path / "v", "--verbose", check=True)
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, proc.stdout.splitlines()) if m]
    assert steps == list(range(1, 21))
    assert "resolved config:" in proc.stdout and "batch_size = 9" in proc.stdout


# ---------------------------------------------------------------- on a terminal


def run_in_terminal(argv, env=None, timeout=180):
    """Run argv with stdin/stdout/stderr on a fresh pseudo-terminal (120 columns); return (status, text).

    Output post-processing (\\n -> \\r\\n) is switched off, so every \\r in the text was written by the program.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    full_env = clean_env(env)
    if "DPBP_PROGRESS" not in (env or {}):
        full_env.pop("DPBP_PROGRESS", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=full_env, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish in {timeout} s")
        status = proc.wait(timeout=30)
    finally:
        os.close(master)
    return status, b"".join(chunks).decode("utf-8", errors="replace")


def train_argv(tmp_path, name, ranks=None):
    argv = [sys.executable, "-m", "dpbp.train", *SMALL, "--out", str(tmp_path / name)]
    return [mpirun_exe(), "-n", str(ranks), *argv] if ranks else argv


@pytest.mark.parametrize("ranks", [None, 2])
def test_a_bar_on_a_terminal(tmp_path, ranks):
    """Alone, and under mpirun, where rank 0's stdout is a pipe but mpirun's is the terminal."""
    status, text = run_in_terminal(train_argv(tmp_path, "t", ranks))
    assert status == 0, text
    # tqdm redraws its line after a carriage return; the last drawing shows every figure.
    final = re.findall(r"\r(epoch 0: 100%\|.*? 20/20 \[.*?\])", text)
    share = r" allreduce \d+%" if ranks else ""  # one process has no Allreduce to report
    assert final and re.search(rf"loss \S+ acc \S+ lr \S+ val_acc \S+ \S+ samples/s{share}\]$", final[-1]), text
    assert not any(line.startswith("step ") for line in text.split("\n")), text  # the bar replaces them
    assert text.count("world size") == 1 and f"world size {ranks or 1} " in text
    assert text.count("done: 20 steps") == 1


def test_lines_forced_on_a_terminal(tmp_path):
    status, text = run_in_terminal(train_argv(tmp_path, "l"), env={"DPBP_PROGRESS": "lines"})
    assert status == 0, text
    assert "\r" not in text
    assert [int(m.group(1)) for m in map(STEP_LINE.match, text.split("\n")) if m] == [5, 10, 15, 20]


# ---------------------------------------------------------------- the per-rank batch in the header


@pytest.mark.parametrize("batch,size", [(64, 4), (9, 2), (10, 3), (3, 4)])
def test_fast_shares_are_contiguous_and_even(batch, size):
    shares = rank_shares(batch, size, "fast", 32)
    assert sum(shares) == batch and max(shares) - min(shares) <= 1 and len(shares) == size


def test_reproducible_shares_are_whole_chunks():
    # 100 samples in chunks of 32: chunks of 32, 32, 32, 4 dealt 2, 1, 1 to three ranks.
    assert rank_shares(100, 3, "reproducible", 32) == [64, 32, 4]
    assert rank_shares(100, 5, "reproducible", 32) == [32, 32, 32, 4, 0]


def test_blas_without_threadpoolctl(monkeypatch):
    """The header still names the BLAS and the thread setting when threadpoolctl is not installed."""
    import numpy as np

    from dpbp.progress import blas_info
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # `import threadpoolctl` now fails
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    name = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    assert blas_info().startswith(f"BLAS {name}") and blas_info().endswith("threads 3")
