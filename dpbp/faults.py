"""What keeps a long data-parallel run safe: stop requests from signals, replica checks, test hooks.

Signals (what Slurm sends before a time limit or a preemption): SIGTERM or SIGUSR1 to ANY rank sets a
flag; the flag rides the next step's gradient Allreduce as a summed statistic, so every rank learns at
the same step boundary that some rank was asked to stop, with no extra collective. Rank 0 then writes a
checkpoint and every rank exits with EXIT_PREEMPTED.

Replica check: every ``train.check_replicas_every`` steps, and before every checkpoint, the ranks
allgather a CRC-32 of their flat parameter buffer (one pass over the parameters, at memory speed, plus
one allgather of an int) and a mismatch names the ranks that differ from
the majority.

Fault injection, for tests only: DPBP_FAULT="WHAT:RANK:STEP[,WHAT:RANK:STEP...]" acts on rank RANK just
before global step STEP (counting from 0) is computed:
    raise    raise RuntimeError (a bug, bad data on one shard ...)
    usererror  raise UserError on this rank alone (an "expected" error that is not the same everywhere)
    kill     SIGKILL this process (out-of-memory killer, node failure)
    nan      put NaN into this rank's first input of the step (no effect on a rank with no samples in
             it), so the reduced gradient is NaN
    perturb  add 1e-3 to this rank's first parameter (a silent replica divergence)
    term     send SIGTERM to this process (as a scheduler would)
    stall    sleep DPBP_STALL_S seconds (default 3600): alive and answering, but not coming (a hung
             file system); the watchdog (dpbp/watchdog.py) must end the attempt
DPBP_STEP_SLEEP=SECONDS sleeps before every step (widens the windows that tests aim signals at).
DPBP_SAVE_SLEEP=SECONDS makes rank 0 sleep before every checkpoint write (a slow file system: the other
ranks wait for it in their next collective, a legitimately long wait the watchdog must not end).
"""

from __future__ import annotations

import os
import signal
import time
import zlib

from dpbp.comm import rank_list
from dpbp.errors import UserError

FAULTS = ("raise", "usererror", "kill", "nan", "perturb", "term", "stall")


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag (1.0 once set, however many signals arrive)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.flag = 0.0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # idempotent: mpirun forwards a signal to every rank it starts
        self.flag = 1.0


# ---------------------------------------------------------------- replica check


def params_checksum(params):
    """CRC-32 of the flat parameter buffer (no copy: crc32 reads the buffer directly)."""
    return zlib.crc32(params)


def replica_mismatch(comm, params):
    """Collective. None if every rank holds bitwise the same parameters, else who differs, in words."""
    sums = comm.allgather(params_checksum(params))
    groups = {}
    for r, s in enumerate(sums):
        groups.setdefault(s, []).append(r)
    if len(groups) == 1:
        return None
    ordered = sorted(groups.values(), key=lambda ranks: (-len(ranks), ranks[0]))
    if len(ordered[0]) > len(ordered[1]):
        odd = sorted(r for ranks in ordered[1:] for r in ranks)
        return f"{rank_list(odd, comm.size)} differ{'s' if len(odd) == 1 else ''} from the other {len(ordered[0])} rank(s)"
    return "no majority: " + "; ".join(f"{rank_list(ranks, comm.size)} agree" for ranks in ordered)


# ---------------------------------------------------------------- fault injection (tests)


def seconds(environ, name, default):
    """A number of seconds from the environment variable `name` (unset or empty: default)."""
    value = environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise UserError(f"{name}={value!r} is not a number of seconds") from None


def parse_faults(spec):
    """[(what, rank, step)] from a DPBP_FAULT value; UserError if malformed."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in FAULTS or not parts[1].isdigit() or not parts[2].isdigit():
            raise UserError(f"DPBP_FAULT={spec!r}: expected WHAT:RANK:STEP with WHAT one of "
                            f"{', '.join(FAULTS)}, e.g. raise:2:5")
        faults.append((parts[0], int(parts[1]), int(parts[2])))
    return faults


class FaultInjector:
    """Carries out DPBP_FAULT on this rank. ``from_env`` gives None when it (and DPBP_STEP_SLEEP) is unset,
    so the training loop pays one test of None per step and nothing else."""

    def __init__(self, faults, sleep, save_sleep=0.0, stall=3600.0):
        self.faults, self.sleep = faults, sleep  # {(step, what)} for this rank; seconds before each step
        self.save_sleep, self.stall = save_sleep, stall  # seconds before a checkpoint write; of a stall

    @classmethod
    def from_env(cls, rank, environ=os.environ):
        faults = {(s, w) for w, r, s in parse_faults(environ.get("DPBP_FAULT", "")) if r == rank}
        sleep, save_sleep, stall = (seconds(environ, name, default) for name, default in
                                    (("DPBP_STEP_SLEEP", 0.0), ("DPBP_SAVE_SLEEP", 0.0), ("DPBP_STALL_S", 3600.0)))
        save_sleep = save_sleep if rank == 0 else 0.0
        return cls(faults, sleep, save_sleep, stall) if faults or sleep or save_sleep else None

    def before_save(self):
        if self.save_sleep:
            time.sleep(self.save_sleep)

    def before_step(self, step, trainer):
        if self.sleep:
            time.sleep(self.sleep)
        for what in FAULTS:
            if (step, what) in self.faults:
                self._do(what, step, trainer)

    def _do(self, what, step, trainer):
        if what == "stall":
            time.sleep(self.stall)
        elif what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif what == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif what == "raise":
            raise RuntimeError(f"injected fault at step {step}")
        elif what == "usererror":
            raise UserError(f"injected error at step {step}")
        elif what == "nan":
            def poison(x):  # this step's first piece only
                x[0, 0] = float("nan")
                trainer.input_hook = None
            trainer.input_hook = poison
        elif what == "perturb":
            trainer.model.params[0] += 1e-3
