#!/usr/bin/python3
"""PID 1 of one simulated host's PID namespace (started by tests/cluster/hosts.sh).

Why an init at all: slurmd as PID 1 would not reap orphaned job processes (slurmstepd zombies pile up),
and the whole namespace dies the moment PID 1 exits. This init starts CMD (slurmd -D ...), reaps every
child, forwards SIGTERM/SIGINT/SIGHUP to CMD, starts CMD again on SIGUSR1 if it is not running, and exits
only when CMD is gone and nothing else is left in the namespace -- so stopping slurmd leaves running job
steps alone, as on a real node. SIGKILL to this process from outside is a host crash: the kernel kills
everything in the PID namespace at once. Standard library only.
"""

import os
import signal
import subprocess
import sys
import time

cmd = sys.argv[1:]
child = subprocess.Popen(cmd)


def forward(sig, _frame):
    if child.poll() is None:
        os.kill(child.pid, sig)


def respawn(_sig, _frame):
    global child
    if child.poll() is not None:
        child = subprocess.Popen(cmd)


def others():
    """Processes in this PID namespace other than this one (/proc is this namespace's own)."""
    return [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
signal.signal(signal.SIGUSR1, respawn)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        if child.poll() is not None and not others():
            break
        time.sleep(0.5)
    except InterruptedError:
        pass
