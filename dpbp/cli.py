"""What every command shares: argument parsing that reports once, and the error -> exit-status policy.

- UserError (bad config, data, checkpoint, command line): every rank meets it at the same point, so
  each exits with EXIT_USAGE and only rank 0 prints the one-line message.
- TrainingFault (non-finite values, diverged replicas): same, with EXIT_FAULT.
- KeyboardInterrupt (a second Ctrl-C while training; mpirun forwards it to every rank): same, with
  EXIT_INTERRUPTED. The first Ctrl-C of a training run writes a checkpoint first (dpbp/faults.py).
- Anything else happened on ONE rank while the others may be waiting in a collective: that rank prints
  the error once, prefixed with its rank, and aborts the whole MPI job so no rank hangs.

How a failing rank tells "everyone failed here" from "I alone failed": it enters a non-blocking barrier
on a private duplicate of the world communicator (so it can never match a collective that healthy ranks
are blocked in). If every rank arrives within a grace period, the messages are gathered and rank 0 prints
each distinct one once; otherwise this rank prints its own message with its rank and calls MPI_Abort.
So even an error that was meant to be uniform but is not cannot leave a rank waiting forever.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dpbp.comm import get_comm, launcher_rank, rank_list
from dpbp.errors import (EXIT_CRASH, EXIT_FAULT, EXIT_INTERRUPTED, EXIT_USAGE, TrainingFault,
                         UserError)

# Seconds a failing rank waits for the others to fail too before aborting the job on its own.
# Expected errors happen at the same point on every rank; a crash on one rank usually does not.
GRACE_EXPECTED_S = 10.0
GRACE_CRASH_S = 3.0


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage on every rank and exiting."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def config_arguments(parser, config_help, set_help="override one key, value in TOML syntax, e.g. "
                     "--set model.sizes=[64,32,10]", many=False):
    """--config and --set, as every command declares them (many: --config may repeat, for the bench)."""
    if many:
        parser.add_argument("--config", action="append", default=[], metavar="FILE", help=config_help)
    else:
        parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def parse_args(parser, argv, comm):
    """Only rank 0 prints --help; --help exits 0 on every rank."""
    if comm.rank == 0:
        return parser.parse_args(argv)
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        return parser.parse_args(argv)
    finally:
        sys.stdout.close()
        sys.stdout = saved


def say(comm, *lines, file=None):
    """Print on rank 0 only."""
    if comm.rank == 0:
        print(*lines, file=file or sys.stdout, flush=True)


def fail(comm, agreement, prog, kind, text, code, grace_s):
    """Report a failure once and return the exit status, or abort the job if other ranks are still busy.

    kind is "error" or "stopped"; text the message without a rank. A message every rank shares is
    printed once without a rank, unless it is a crash; otherwise each distinct one once, with its ranks.
    """
    outcomes = agreement.gather((code, kind, text), grace_s)
    if outcomes is None:  # the others are busy (likely blocked in a collective): take the job down
        where = f"rank {comm.rank}: " if comm.size > 1 else ""
        print(f"{prog}: {where}{kind}: {text}", file=sys.stderr, flush=True)
        comm.abort(code)
        return code
    if comm.rank == 0:
        by_message = {}
        for r, (c, k, t) in enumerate(outcomes):
            by_message.setdefault((c, k, t), []).append(r)
        for (c, k, t), ranks in by_message.items():
            named = comm.size > 1 and (c == EXIT_CRASH or len(by_message) > 1)
            where = f"{rank_list(ranks, comm.size)}: " if named else ""
            print(f"{prog}: {where}{k}: {t}", file=sys.stderr, flush=True)
    return min(c for c, _, _ in outcomes)  # EXIT_CRASH (1) outranks the expected failures


# MPICH switches its shared-memory Allreduce to another algorithm (another summation order) once a
# communicator has seen this many collectives; a resumed run has seen fewer than the uninterrupted one at
# the same step, so its first steps would round differently. Never switching keeps one algorithm from the
# first call; it also keeps ranks from busy-waiting in the shared-memory algorithm when they outnumber the
# cores (the seed config at -n 4 on 2 cores runs about ten times faster: docs/performance.md), and large Allreduces
# cost the same. Read by MPICH when MPI starts; other MPI libraries ignore it; a value the user set wins.
MPI_SETTINGS = {"MPIR_CVAR_POSIX_NUM_COLLS_THRESHOLD": "2147483647"}


def run(main, argv=None, prog="dpbp"):
    """Run main(argv, comm) and turn its outcome into an exit status (see the module doc)."""
    for name, value in MPI_SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        comm = get_comm()
    except UserError as e:  # no communicator yet: the launcher's rank 0 speaks for all
        if launcher_rank() in (0, None):
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    agreement = comm.failure_channel()
    try:
        return main(sys.argv[1:] if argv is None else argv, comm) or 0
    except UserError as e:
        return fail(comm, agreement, prog, "error", str(e), EXIT_USAGE, GRACE_EXPECTED_S)
    except TrainingFault as e:
        return fail(comm, agreement, prog, "stopped", str(e), EXIT_FAULT, GRACE_EXPECTED_S)
    except KeyboardInterrupt:
        return fail(comm, agreement, prog, "stopped", "interrupted", EXIT_INTERRUPTED, GRACE_EXPECTED_S)
    except SystemExit:
        raise
    except BrokenPipeError:  # e.g. `python -m dpbp.train | head`: stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return fail(comm, agreement, prog, "stopped", "output pipe closed", EXIT_CRASH, GRACE_CRASH_S)
    except BaseException as e:  # noqa: BLE001 - a crash on one rank must take the whole job down
        if os.environ.get("DPBP_TRACEBACK") == "1":
            traceback.print_exc()
        return fail(comm, agreement, prog, "error", f"{type(e).__name__}: {e}", EXIT_CRASH, GRACE_CRASH_S)
