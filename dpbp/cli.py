"""What every command shares: argument parsing that reports once, and the error -> exit-status policy.

- UserError (bad config, data, checkpoint, command line): every rank meets it at the same point, so
  each exits with EXIT_USAGE and only rank 0 prints the one-line message.
- TrainingFault (non-finite values, diverged replicas): same, with EXIT_FAULT.
- Anything else happened on ONE rank while the others may be waiting in a collective: that rank prints
  the error once, prefixed with its rank, and aborts the whole MPI job so no rank hangs.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dpbp.comm import get_comm
from dpbp.errors import EXIT_CRASH, EXIT_FAULT, EXIT_USAGE, TrainingFault, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage on every rank and exiting."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


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


def run(main, argv=None, prog="dpbp"):
    """Run main(argv, comm) and turn its outcome into an exit status (see the module doc)."""
    try:
        comm = get_comm()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        return main(sys.argv[1:] if argv is None else argv, comm) or 0
    except UserError as e:
        say(comm, f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingFault as e:
        say(comm, f"{prog}: stopped: {e}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a crash on one rank must take the whole job down
        if isinstance(e, SystemExit):
            raise
        where = f"rank {comm.rank}: " if comm.size > 1 else ""
        print(f"{prog}: {where}error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("DPBP_TRACEBACK") == "1":
            traceback.print_exc()
        comm.abort(EXIT_CRASH)
        return EXIT_CRASH


def agree(comm, error: str | None):
    """Collective: raise the same UserError on every rank if any rank found one (lowest rank's wins)."""
    errors = comm.allgather(error)
    for r, msg in enumerate(errors):
        if msg is not None:
            raise UserError(msg if r == 0 or comm.size == 1 else f"(rank {r}) {msg}")
