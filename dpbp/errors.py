"""Error types, exit statuses and the one warning format shared by every command; imports nothing from dpbp."""

import sys


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, command line).

    Reported as one line by rank 0 with exit status ``EXIT_USAGE``; never a traceback.
    """


class TrainingFault(Exception):
    """The run cannot go on (a non-finite loss, diverged replicas); exit status ``EXIT_FAULT``."""


EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected exception on some rank: the job is aborted
EXIT_USAGE = 2  # bad config, data, checkpoint or command line
EXIT_FAULT = 3  # numerical or replica fault; the newest checkpoint is still the last good one
EXIT_PEER_LOST = 4  # a rank stopped answering (stalled, dead, cut off) for comm.timeout: dpbp/watchdog.py
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue me
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it; no checkpoint is written


def warn(text, write=None):
    """Print one warning as every command does ("dpbp: warning: ..." on stderr); callers print on rank 0 only.

    write(text, stream), if given, replaces print (the progress bar writes above itself).
    """
    line = f"dpbp: warning: {text}"
    if write is None:
        print(line, file=sys.stderr, flush=True)
    else:
        write(line, sys.stderr)
