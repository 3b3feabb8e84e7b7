"""Rank 0's side effects while training: the header, progress, metrics.jsonl, the summary.

Every method is a no-op on other ranks, so the training loop calls them unconditionally; other ranks
print only their own errors (cli.py).

What is printed (stdout, rank 0):
  --quiet    the summary line at the end (plus warnings and errors, on stderr)
  default    the header; then, on a terminal, one tqdm bar (step, epoch, loss, accuracy, samples/s and
             the share of step time spent in the Allreduce) and a line per evaluation; off a terminal
             (a batch job, CI, `| tee`), one plain grep-able line every train.log_every steps and one
             per evaluation, never a carriage return; then the summary
  --verbose  also the resolved config after the header, and a line for every step
DPBP_PROGRESS=bar or =lines overrides the terminal detection; without tqdm installed it is always lines.

metrics.jsonl gets every record passed to ``record`` (train lines and "split": "val" lines), and
header.jsonl one line per start of the run (fresh or resumed) with what the header shows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from dpbp import __version__
from dpbp.errors import warn
from dpbp.partition import shares

# Processes that copy a rank's stdout to their own: under them a rank's stdout is a pipe even when the
# user watches a terminal, so we look at the outermost launcher's stdout instead.
_LAUNCHERS = ("hydra_pmi_prox", "mpiexec", "mpirun", "orted", "prted", "prterun")


class Progress:
    def __init__(self, comm, run_dir, quiet=False, verbose=False, resume=False, silent=False):
        self.comm, self.run_dir = comm, run_dir
        self.active = comm.rank == 0
        self.quiet, self.verbose = quiet or silent, verbose
        self.silent = silent  # not even the summary: dpbp.fit's quiet (warnings still go to stderr)
        self.metrics = None
        self.bar = None
        self.last_train = self.last_val = None  # the newest records, for the bar and the summary
        self.samples = 0  # trained on in this session, for the summary's samples/s
        if self.active:  # run_dir exists: train.choose_run_dir made and checked it
            # Appending keeps the history of a resumed or requeued run in one file.
            self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a" if resume else "w")
            self._resume = resume

    # ------------------------------------------------------------ plain output

    def say(self, text, always=False):
        if self.active and ((always and not self.silent) or not self.quiet):
            self._write(text, sys.stdout)

    def warn(self, text):
        if self.active:
            warn(text, self._write)

    def _write(self, text, stream):
        if self.bar is not None:
            self.bar.write(text, file=stream)  # above the bar, which is redrawn below it
        else:
            print(text, file=stream, flush=True)

    # ------------------------------------------------------------ start

    def start(self, cfg, model, train_data, val_data, steps, start=0, resumed_from=None):
        """Print the header, record it in header.jsonl, and open the bar on a terminal.

        Collective (every rank reports its host for the header), so every rank calls it."""
        hosts = self.comm.hosts({"blas_threads": blas_threads()})
        if not self.active:
            return
        info = header_info(cfg, self.comm, model, train_data, val_data, self.run_dir, steps, hosts)
        with open(os.path.join(self.run_dir, "header.jsonl"), "a" if self._resume else "w") as f:
            f.write(json.dumps({**info, "start_step": start, "resumed_from": resumed_from,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        if self.quiet:
            return
        for line in header_lines(info):
            self.say(line)
        if resumed_from:
            self.say(f"resumed from {resumed_from} at step {start}")
        if self.verbose:
            from dpbp.config import to_toml
            self.say("resolved config:\n  " + to_toml(cfg).strip().replace("\n", "\n  "))
        terminal = bar_terminal()
        if terminal:
            from tqdm import tqdm
            # No step/s rate: samples/s in the postfix says more, and the line must fit a terminal.
            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stdout,
                            ncols=terminal_width(terminal), leave=True, smoothing=0.1,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}{postfix}]")

    # ------------------------------------------------------------ during the run

    def tick(self, step, n_samples):
        """Called after every step (n_samples in its global batch); moves the bar."""
        self.samples += n_samples
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def record(self, rec):
        """One metrics.jsonl line; a progress line, or the bar's figures on a terminal."""
        if not self.active:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if rec.get("split") == "val":
            self.last_val = rec
            self.say(format_eval(rec))
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix(), refresh=False)
            return
        self.last_train = rec
        if self.bar is None or self.verbose:
            self.say(format_step(rec, self.comm.size > 1))
        if self.bar is not None:
            self.bar.set_description_str(f"epoch {rec['epoch']}", refresh=False)
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self):
        parts = []
        rec = self.last_train
        if rec is not None:
            parts.append(f"loss {rec['loss']:.4g}")
            if "accuracy" in rec:
                parts.append(f"acc {rec['accuracy']:.3f}")
            parts.append(f"lr {rec['lr']:.3g}")
        val = self.last_val
        if val is not None and "accuracy" in val:
            parts.append(f"val_acc {val['accuracy']:.3f}")
        if val is not None and "rmse" in val:
            parts.append(f"val_rmse {val['rmse']:.4g} val_r2 {val['r2']:.3f}")
        if rec is not None:
            rate = rec["samples_per_s"]
            rate = f"{rate / 1000:.0f}k" if rate >= 10000 else f"{rate:.0f}"
            share = f" allreduce {100 * comm_share(rec):.0f}%" if self.comm.size > 1 else ""  # alone: no Allreduce
            parts.append(f"{rate} samples/s{share}")
        return " ".join(parts)

    # ------------------------------------------------------------ the end

    def summary(self, steps_done, step, wall, val_rec, final):
        """The last line: final loss/accuracy, wall time, samples/s, where final.npz is."""
        if not self.active:
            return
        self.close()
        rate = self.samples / wall if wall > 0 else 0.0
        resumed = f" (to step {step}, after resuming)" if steps_done != step else ""
        text = f"done: {steps_done} steps{resumed} in {wall:.1f} s, {rate:.0f} samples/s"
        rec = self.last_train
        if rec is not None:
            text += f" | train loss {rec['loss']:.6g}" + (f" accuracy {rec['accuracy']:.4f}"
                                                          if "accuracy" in rec else "")
        if val_rec is not None:
            text += f" | val_loss {val_rec['loss']:.6g}" + (f" val_accuracy {val_rec['accuracy']:.4f}"
                                                            if "accuracy" in val_rec else "")
            text += regression_text(val_rec, "val_")
        if val_rec is not None and val_rec.get("best_step", -1) >= 0:
            text += f" | best val_loss {val_rec['best_loss']:.6g} at step {val_rec['best_step']} (best.npz)"
        self.say(f"{text} | parameters in {final}", always=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


# ---------------------------------------------------------------- accumulating the figures


class Meter:
    """Training figures summed between two metrics records (train.log_every steps), and their rates."""

    def __init__(self, labels):
        self.labels = labels  # does the training data have class labels (then accuracy is recorded)
        self.t_start = self.t_last = time.perf_counter()
        self.comm_last = 0.0
        self._reset()

    def _reset(self):
        self.loss = self.correct = self.seen = 0.0
        self.samples = 0

    def add(self, loss, correct, samples, lr):
        """One step's batch-mean loss, correct count, global batch size and learning rate."""
        self.lr = lr
        self.loss += loss * samples
        self.correct += correct
        self.seen += samples
        self.samples += samples

    def record(self, step, epoch, comm_s):
        """The metrics.jsonl record of the steps since the last one; comm_s: Allreduce seconds so far."""
        now = time.perf_counter()
        rec = {"step": step, "epoch": epoch, "loss": self.loss / self.seen, "lr": self.lr,
               "samples_per_s": self.samples / (now - self.t_last),
               "comm_s": comm_s - self.comm_last, "step_s": now - self.t_last, "time": now - self.t_start}
        if self.labels:
            rec["accuracy"] = self.correct / self.seen
        self.t_last, self.comm_last = now, comm_s
        self._reset()
        return rec


# ---------------------------------------------------------------- formatting


def comm_share(rec):
    """Share of the wall time since the previous record spent inside the gradient Allreduce."""
    return rec["comm_s"] / rec["step_s"] if rec.get("step_s") else 0.0


def format_step(rec, reduced=True):
    """One plain progress line; reduced: several ranks, so the Allreduce's share of the time is shown."""
    acc = f" accuracy {rec['accuracy']:.4f}" if "accuracy" in rec else ""
    share = f" allreduce {100 * comm_share(rec):.1f}%" if reduced else ""
    return (f"step {rec['step']} epoch {rec['epoch']} loss {rec['loss']:.6g}{acc} lr {rec['lr']:.4g} "
            f"samples/s {rec['samples_per_s']:.0f}{share}")


def format_eval(rec):
    """One held-out line: the loss (with the l2 penalty), then accuracy or RMSE, MAE and R² (without it)."""
    acc = f" accuracy {rec['accuracy']:.4f}" if "accuracy" in rec else ""
    return f"eval step {rec['step']} epoch {rec['epoch']} val_loss {rec['loss']:.6g}{acc}{regression_text(rec)}"


def regression_text(rec, prefix=""):
    """" rmse R mae M r2 Q" of a held-out record with regression figures, else ""."""
    if "rmse" not in rec:
        return ""
    return f" {prefix}rmse {rec['rmse']:.6g} {prefix}mae {rec['mae']:.6g} {prefix}r2 {rec['r2']:.4f}"


# ---------------------------------------------------------------- the header


def header_info(cfg, comm, model, train_data, val_data, run_dir, steps, hosts):
    """What the header shows, as a dict (also written to header.jsonl for dpbp.report).

    hosts: comm.hosts()'s record of every rank (host, address, local rank, BLAS threads).
    """
    B, P = cfg["data.batch_size"], comm.size
    per_rank = rank_shares(B, P, cfg["comm.reduce"], cfg["comm.chunk"])
    return {"dpbp": __version__, "mpi": " ".join(comm.library.split()), "world_size": P, "blas": blas_info(),
            "n_hosts": len({r["host"] for r in hosts}), "hosts": hosts,
            "transport": comm.transport(hosts),
            "sizes": list(model.sizes), "n_params": int(model.n_params),
            "activation": f"{cfg['model.activation']}/{cfg['model.output']}", "dtype": cfg["model.dtype"],
            "loss": f"{cfg['loss.kind']} ({cfg['loss.reduction']}, l2 {cfg['loss.l2']})",
            "data": train_data.source, "n_train": len(train_data),
            "n_val": len(val_data) if val_data is not None else 0,
            "batch": B, "per_rank": [min(per_rank), max(per_rank)], "reduce": cfg["comm.reduce"],
            "steps": steps, "out": run_dir}


def header_lines(info):
    lo, hi = info["per_rank"]
    per_rank = f"{lo}" if lo == hi else f"{lo}-{hi}"
    n, h = info["world_size"], info["n_hosts"]
    where = f"world size {n} ({n} rank{'s' if n != 1 else ''} on {h} host{'s' if h != 1 else ''})"
    lines = [f"dpbp {info['dpbp']} | {info['mpi']} | {where} | {info['blas']}",
            f"model {'-'.join(map(str, info['sizes']))} {info['activation']} {info['dtype']}, "
            f"{info['n_params']} parameters | loss {info['loss']}",
            f"data {info['data']}: {info['n_train']} train, {info['n_val']} held out | global batch "
            f"{info['batch']}, per rank {per_rank} | reduce {info['reduce']}",
            f"{info['steps']} steps | output {info['out']}"]
    if h > 1:
        lines.append(f"hosts {host_summary(info['hosts'])} | between hosts: {info['transport']}")
    return lines


def host_summary(hosts):
    """"h1 10.0.0.1 ranks 0-1, h2 10.0.0.2 ranks 2-3": each host (first seen first) and its ranks."""
    by_host = {}
    for r in hosts:
        by_host.setdefault((r["host"], r["address"]), []).append(r["rank"])
    return ", ".join(f"{name} {address} rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)}"
                     for (name, address), ranks in by_host.items())


def ranks_text(ranks):
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            runs.append(f"{start}-{r}" if r > start else f"{r}")
            start = None
    return ",".join(runs)


def rank_shares(batch, size, mode, chunk):
    """Samples each rank computes per step: contiguous shares (fast) or whole chunks (reproducible)."""
    return shares(batch, size, chunk if mode == "reproducible" else None)


def numpy_blas_pool():
    """threadpoolctl's record of the BLAS numpy calls, or None (threadpoolctl missing or no BLAS found).

    scipy (pulled in by scikit-learn) may load a second BLAS; numpy's is the one training uses.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return min(pools, key=lambda p: "numpy" not in p.get("filepath", ""), default=None)


def blas_threads():
    """This process's BLAS thread count (threadpoolctl's, else the environment's), None if unknown."""
    pool = numpy_blas_pool()
    if pool is not None:
        return pool.get("num_threads")
    value = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() else None


def blas_info():
    """The BLAS numpy calls and its thread count (threadpoolctl if installed, else numpy's config)."""
    pool = numpy_blas_pool()
    if pool is not None:
        n = pool.get("num_threads")
        return f"BLAS {pool.get('internal_api')} {pool.get('version')} {n} thread{'s' if n != 1 else ''}"
    name = "unknown"
    try:
        import numpy as np
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        name = f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy has no mode="dicts"; the header just says less
        pass
    threads = (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
               or f"default ({os.cpu_count()} cores)")
    return f"BLAS {name} threads {threads}"


# ---------------------------------------------------------------- bar or lines


def bar_terminal():
    """The terminal to draw a tqdm bar for (a device path, or "forced"), or None for plain lines.

    A bar when the user watches a terminal and tqdm is installed; DPBP_PROGRESS=bar/lines overrides.
    """
    choice = os.environ.get("DPBP_PROGRESS", "auto")
    if choice == "lines":
        return None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return None
    return stdout_terminal() or ("forced" if choice == "bar" else None)


def terminal_width(terminal):
    try:
        fd = os.open(terminal, os.O_RDONLY | os.O_NOCTTY)
        try:
            return os.get_terminal_size(fd).columns
        finally:
            os.close(fd)
    except (OSError, TypeError):
        return shutil.get_terminal_size((100, 24)).columns


def stdout_terminal():
    """The terminal stdout shows up on: stdout's own, or that of the MPI launcher whose pipe it is."""
    if sys.stdout.isatty():
        try:
            return os.ttyname(sys.stdout.fileno())
        except OSError:
            return "/dev/tty"
    pid = os.getppid()
    for _ in range(6):  # rank <- proxy <- mpiexec: a few levels at most
        name, ppid = _proc_name_and_parent(pid)
        if name is None or not name.startswith(_LAUNCHERS):
            return None
        try:
            target = os.readlink(f"/proc/{pid}/fd/1")
        except OSError:
            return None
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return target
        if not target.startswith(("pipe:", "socket:")):
            return None  # a file: the launcher's output is being logged
        pid = ppid
    return None


def _proc_name_and_parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None, None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ')'.
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    return name, int(stat[stat.rindex(")") + 2:].split()[1])
