"""python -m dpbp.launch: start the ranks of a training run, pass the scheduler's signals on, requeue.

    python -m dpbp.launch [OPTIONS] -- LAUNCH COMMAND... -- CONFIG [dpbp.train options...]

runs  LAUNCH COMMAND... PYTHON -m dpbp.train --config CONFIG --resume-or-start RUN_DIR [options...]
(PYTHON is $DPBP_PYTHON, else the interpreter running this) and ends with the trainer's exit status.

launch/local.sh, launch/slurm.sbatch and launch/pbs.sh keep what only their scheduler knows (directives,
rank count, launch command, how to requeue) and end in `exec python -m dpbp.launch ...`. The rest lives
here, in the installed package, because a scheduler may run a copy of the job script from a spool
directory (Slurm does), where nothing next to the script can be found; and `exec` makes this process the
job's shell, so the scheduler's signals reach it directly.

Run directory: `--out DIR` among the options, else $DPBP_RUN_DIR, else ${DPBP_RUNS:-runs}/NAME with
NAME = $DPBP_RUN_NAME or --run-name. The trainer always gets `--resume-or-start RUN_DIR`: it starts fresh
when RUN_DIR holds no run yet and otherwise continues from the newest valid checkpoint, so running the same
command again, a requeued job or a resubmitted one continues the run (pass --resume yourself: refused).

Signals: the first SIGTERM, SIGUSR1, SIGINT or SIGHUP asks the ranks to checkpoint: the launch command
gets SIGUSR1, which srun and mpirun (MPICH's hydra, Open MPI) pass on to every rank as it is; every rank
stops at the next step boundary, rank 0 writes a checkpoint and all exit 75 (EX_TEMPFAIL: run me again).
SIGUSR1 rather than SIGTERM because srun answers SIGTERM by killing its tasks, Open MPI's mpirun kills
the job shortly after it, and hydra dies on SIGHUP: any of these can cut the checkpoint short. Later
SIGTERM/SIGUSR1/SIGHUP change nothing (a scheduler's SIGTERM at the limit follows its warning); a SIGINT
once a stop is under way (Ctrl-C twice) kills the launch command at once, without a checkpoint: 130.

Requeue: when the ranks exit 75 and the first signal was SIGUSR1 (the time-limit warning: Slurm's
--signal=B:USR1@120, pbs.sh's --warn-after timer), the --requeue command runs (bash -c, with
DPBP_RUN_DIR set to the absolute run directory and DPBP_REQUEUE_REASON=time-limit), unless
DPBP_REQUEUE=0. Other stops only exit 75. A lost rank or host -- the ranks end with EXIT_PEER_LOST
(their watchdog gave up on a peer) or a rank was killed or crashed (128 + SIGKILL, SIGSEGV, SIGBUS or SIGABRT,
or the bare signal number from hydra: a host's ranks died, the launch command killed a stalled rank, or a
survivor crashed inside MPI when its peer vanished) -- also runs the --requeue command (DPBP_REQUEUE_REASON=lost),
at most --lost-requeues times per run directory (counted in RUN_DIR/lost-requeues.jsonl); the
requeued job resumes from the newest checkpoint. Not when this process got a stop signal first (the
scheduler is ending or requeueing the job itself).

BLAS threads: unless OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS is set (then all are
left alone), all three are set to dpbp.threads' rule for --ranks-per-node ranks sharing --cores CPUs.
DPBP_EXPECT_WORLD_SIZE=--np makes a rank whose MPI world has another size exit 2: a launch that starts
P one-rank programs fails loudly instead of training P copies.

Exit status: the trainer's (0 done, 2 usage / wrong world size, 75 stopped after a checkpoint, 128+N
killed by signal N); 2 for bad launcher arguments; 130 after a second SIGINT.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from dpbp import threads
from dpbp.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
FORWARD = signal.SIGUSR1  # what the launch command gets: passed on to the ranks untouched by srun and mpirun
WARNING = signal.SIGUSR1  # the time-limit warning: its checkpoint is followed by a requeue
ARGS_FILE = "launch.args"
LOG_FILE = "launch.log"
LOST_FILE = "lost-requeues.jsonl"  # one line per requeue after a lost rank or host: the bound's count
# A rank killed (a host's ranks died, or the launch command killed a stalled rank), or crashed inside MPI
# as UCX may when a peer vanishes mid-message (seen: SIGSEGV in the survivor of a killed host).
LOST_SIGNALS = (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
LOST = (EXIT_PEER_LOST, *(128 + s for s in LOST_SIGNALS), *LOST_SIGNALS)  # srun says 128+N, hydra N
SHAPE = "python -m dpbp.launch [OPTIONS] -- LAUNCH COMMAND... -- CONFIG [dpbp.train options...]"


class Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def make_parser():
    p = Parser(prog="python -m dpbp.launch", usage=SHAPE, description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--np", required=True, help="number of ranks (exported as DPBP_EXPECT_WORLD_SIZE)")
    p.add_argument("--cores", help="CPUs that the ranks on this node share (default: this process's CPUs)")
    p.add_argument("--ranks-per-node", help="ranks sharing those CPUs (default: --np)")
    p.add_argument("--run-name", default="{config}",
                   help="run directory name under DPBP_RUNS unless --out, DPBP_RUN_DIR or DPBP_RUN_NAME "
                        "says otherwise; {config} is the config file's name without .toml")
    p.add_argument("--name", default="dpbp.launch", help="who speaks in the log lines (the script)")
    p.add_argument("--tag", default="", help="more of the log lines' prefix, e.g. the job id")
    p.add_argument("--usage", help="the message when no CONFIG is given")
    p.add_argument("--tee", action="store_true", help="append all output to RUN_DIR/launch.log as well")
    p.add_argument("--new-session", action="store_true",
                   help="start the launch command in a session of its own, so that a Ctrl-C in the "
                        "terminal reaches only this process (not inside a batch job: PBS tracks a job's "
                        "processes by session)")
    p.add_argument("--save-args", action="store_true",
                   help=f"save CONFIG and the options in RUN_DIR/{ARGS_FILE}; when none are given, take "
                        f"them from $DPBP_RUN_DIR/{ARGS_FILE} (a resubmitted job given only DPBP_RUN_DIR)")
    p.add_argument("--requeue", metavar="SHELL_COMMAND",
                   help="run after the checkpoint that followed a SIGUSR1 (the time-limit warning)")
    p.add_argument("--lost-requeues", metavar="N", default="0",
                   help=f"after a lost rank or host (status {EXIT_PEER_LOST}, or a rank killed or crashed: "
                        f"{', '.join(str(128 + s) for s in LOST_SIGNALS)}) run the "
                        "--requeue command, at most N times per run directory (default 0: never)")
    p.add_argument("--warn-after", metavar="SECONDS",
                   help="send this process SIGUSR1 after SECONDS (at least 1): a scheduler without a "
                        "warning before its time limit")
    return p


def split_argv(parser, argv):
    """(launcher options, launch command, CONFIG and dpbp.train options): the parts between two `--`."""
    if argv.count("--") < 2:
        parser.parse_args(argv)  # --help still works; otherwise the shape is wrong
        raise UserError(f"expected: {SHAPE}")
    first = argv.index("--")
    second = argv.index("--", first + 1)
    if second == first + 1:
        raise UserError("no launch command between the two '--' (e.g. mpirun -n 4)")
    return argv[:first], argv[first + 1:second], argv[second + 1:]


def parse_train_args(args):
    """(CONFIG, --out DIR or None, the other options in order).

    --out is taken out because the run directory goes to dpbp.train as --resume; the word after --set is
    skipped unread, so a value that looks like an option stays a value.
    """
    config, rest, out, opts, i = args[0], args[1:], None, [], 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--out", "--set"):
            if i + 1 >= len(rest):
                raise UserError("--out needs a directory" if arg == "--out" else "--set needs key=value")
            if arg == "--out":
                out = rest[i + 1]
            else:
                opts += rest[i:i + 2]
            i += 2
            continue
        if arg.split("=")[0] in ("--resume", "--resume-or-start"):
            raise UserError("do not pass --resume: the run directory is resumed automatically (use --out DIR)")
        if arg.startswith("--out="):
            out = arg[len("--out="):]
        else:
            opts.append(arg)
        i += 1
    return config, out, opts


def run_dir_for(out, config, environ, run_name):
    """Absolute, so that the ranks, a requeue command and a resubmitted job all mean the same directory."""
    if out:
        return os.path.abspath(out)
    if environ.get("DPBP_RUN_DIR"):
        return os.path.abspath(environ["DPBP_RUN_DIR"])
    stem = os.path.basename(config)
    stem = stem[:-len(".toml")] if stem.endswith(".toml") else stem
    name = environ.get("DPBP_RUN_NAME") or run_name.replace("{config}", stem)
    return os.path.abspath(os.path.join(environ.get("DPBP_RUNS") or "runs", name))


def saved_args(environ, log):
    """The arguments a job saved with --save-args, for a job given only DPBP_RUN_DIR; [] when none."""
    run_dir = environ.get("DPBP_RUN_DIR")
    path = os.path.join(run_dir, ARGS_FILE) if run_dir else ""
    if not path or not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        args = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
    log(f"arguments from {path}: {' '.join(args)}")
    return args


def save_args(run_dir, config, opts):
    """NUL-separated, the config made absolute: read back by a job that may start in another directory."""
    path = os.path.join(run_dir, ARGS_FILE)
    with open(path + ".tmp", "wb") as f:
        f.write(b"".join(os.fsencode(a) + b"\0" for a in [os.path.abspath(config), *opts]))
    os.replace(path + ".tmp", path)


def thread_exports(environ, cores, ranks_per_node):
    """{variable: value} to add to the ranks' environment: dpbp.threads' rule for `ranks_per_node` ranks
    sharing `cores` CPUs, in all three variables; {} when the user set any of them (their choice stands)."""
    if threads.user_chose(environ):
        return {}
    n = threads.threads_per_rank(cores, ranks_per_node)
    return {k: str(n) for k in threads.THREAD_VARIABLES}


def positive(text, what):
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserError(f"{what} must be a positive whole number, not {text!r}")
    return value


class Log:
    """`[NAME DATE TAG] message` lines on stderr; with --tee also appended, like all output, to launch.log."""

    def __init__(self, name="dpbp.launch", tag=""):
        self.name, self.tag, self.file = name, tag, None
        self.lock = threading.RLock()  # a signal handler may log while the main thread is logging

    def __call__(self, message):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(2, f"[{self.name} {stamp}{' ' + self.tag if self.tag else ''}] {message}\n".encode())

    def write(self, fd, data):
        with self.lock:
            try:
                left = data
                while left:
                    left = left[os.write(fd, left):]
            except OSError:  # the terminal went away: the log file still gets it
                pass
            if self.file is not None:
                self.file.write(data)
                self.file.flush()

    def tee(self, path):
        self.file = open(path, "ab")

    def pump(self, fd):
        """Copy the ranks' output to stdout and the log file until every writer has closed it."""
        while chunk := os.read(fd, 65536):
            self.write(1, chunk)
        os.close(fd)


class Plan:
    """Everything checked before anything starts, so that bad input is one message and exit 2."""

    def __init__(self, opts, command, train, environ, log):
        self.opts, self.log = opts, log
        self.np = positive(opts.np, "the number of ranks (-n P / DPBP_NP)")
        self.cores = positive(opts.cores, "--cores") if opts.cores else threads.affinity_cores()
        self.per_node = positive(opts.ranks_per_node, "--ranks-per-node") if opts.ranks_per_node else self.np
        self.warn_after = self._seconds(opts.warn_after)
        self.lost_requeues = self._count(opts.lost_requeues)
        if not train and opts.save_args:
            train = saved_args(environ, log)
        if not train:
            raise UserError(opts.usage or f"no CONFIG given: {SHAPE}")
        self.config, out, self.train_opts = parse_train_args(train)
        if not os.path.isfile(self.config):
            raise UserError(f"config file '{self.config}' not found (relative to {os.getcwd()})")
        if shutil.which(command[0]) is None:
            raise UserError(f"launch command '{command[0]}' not found (load your MPI or set DPBP_MPIRUN)")
        self.run_dir = run_dir_for(out, self.config, environ, opts.run_name)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.run_dir}: {e.strerror}") from None
        self.exports = thread_exports(environ, self.cores, self.per_node)
        self.env = dict(environ, DPBP_EXPECT_WORLD_SIZE=str(self.np), **self.exports)
        # the scripts' DPBP_PYTHON as given (a wrapper, or a name each node resolves), else this interpreter
        self.python = environ.get("DPBP_PYTHON") or sys.executable
        self.argv = [*command, self.python, "-m", "dpbp.train", "--config", self.config,
                     "--resume-or-start", self.run_dir, *self.train_opts]
        self.launcher = command[0]

    @staticmethod
    def _seconds(text):
        if text is None:
            return None
        try:
            return max(1, int(text))
        except ValueError:
            raise UserError(f"--warn-after needs whole seconds, not {text!r}") from None

    @staticmethod
    def _count(text):
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise UserError(f"--lost-requeues needs a whole number >= 0, not {text!r}")
        return value

    def describe(self):
        """The start line and the resume line (the trainer decides; this only reports what it will find)."""
        if self.exports:
            blas = (f"{self.per_node} rank(s) share {self.cores} core(s) here: "
                    f"{self.exports['OMP_NUM_THREADS']} BLAS thread(s) per rank")
        else:
            blas = "BLAS threads as set: " + " ".join(
                f"{k}={self.env[k]}" for k in threads.THREAD_VARIABLES if self.env.get(k))
        self.log(f"{self.np} ranks on {socket.gethostname()}; {blas}; launcher {self.launcher}; "
                 f"python {self.python}")
        found = sorted(glob.glob(os.path.join(glob.escape(self.run_dir), "ckpt-*.npz")))
        if found:
            self.log(f"run dir {self.run_dir}: resuming (newest checkpoint file: {found[-1]})")
        else:
            self.log(f"run dir {self.run_dir}: no checkpoint yet, fresh start")


class Ranks:
    """The launch command, and what the signals this process gets do to it (the policy in the docstring)."""

    def __init__(self, log):
        self.log, self.proc, self.first, self.forwarded, self.aborted = log, None, None, False, False
        self.session = self.starting = False

    def install(self):
        """First thing: a signal before the ranks start must not kill this process or leave a traceback."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = signum
            if self.proc is None and not self.starting:
                self.log(f"got {name} before the ranks started: not starting them")
                return
            again = "; SIGINT again stops them at once" if signum == signal.SIGINT else ""
            self.log(f"got {name}: forwarding it to the ranks as {FORWARD.name} (they checkpoint and exit "
                     f"{EXIT_PREEMPTED}){again}")
            self.forward()
        elif signum == signal.SIGINT and not self.aborted:
            self.log(f"got {name} again: stopping the ranks at once, without a checkpoint")
            self.aborted = True
            self.kill()
        else:
            self.log(f"got {name}: already stopping")

    def running(self):
        return self.proc is not None and self.proc.returncode is None

    def forward(self):
        if self.running() and not self.forwarded:
            self.forwarded = True
            try:
                os.kill(self.proc.pid, FORWARD)
            except ProcessLookupError:  # it has just ended
                pass

    def kill(self):
        if not self.running():
            return
        try:
            if self.session:  # mpirun and the ranks it started here, all at once
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def start(self, argv, env, new_session, tee):
        """In the background, so that this process keeps taking the signals while the ranks run."""
        out = subprocess.PIPE if tee else None
        self.session, self.starting = new_session, True
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT if tee else None, start_new_session=new_session)
        if self.aborted:  # the signals came while it was starting
            self.kill()
        elif self.first is not None:
            self.forward()
        if not tee:
            return None
        pump = threading.Thread(target=self.log.pump, args=(os.dup(self.proc.stdout.fileno()),), daemon=True)
        self.proc.stdout.close()
        pump.start()
        return pump

    def wait(self):
        """The exit status as a shell reports it: 128 + N when killed by signal N."""
        rc = self.proc.wait()
        return 128 - rc if rc < 0 else rc


def requeue(command, run_dir, log, reason="time-limit"):
    """The scheduler script's requeue command, its output logged; a failure is logged with what to do."""
    env = dict(os.environ, DPBP_RUN_DIR=run_dir, DPBP_REQUEUE_REASON=reason)
    done = subprocess.run(["bash", "-c", command], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in done.stdout.decode(errors="replace").splitlines():
        log(line)
    if done.returncode != 0:
        log(f"error: the requeue command failed with status {done.returncode}; resubmit the job with "
            f"--out {run_dir} (or DPBP_RUN_DIR={run_dir}) to resume")


def finish(rc, ranks, plan, environ):
    """Log what the exit status means, requeue when the stop came from the time-limit warning."""
    log = plan.log
    if ranks.aborted:
        log(f"stopped at once (status {rc}); the newest checkpoint in {plan.run_dir} is older than the stop")
        return EXIT_INTERRUPTED
    if rc == EXIT_OK:
        log("training finished")
        return rc
    may_requeue = plan.opts.requeue and (environ.get("DPBP_REQUEUE") or "1") != "0"
    if rc in LOST and ranks.first is None and plan.lost_requeues and may_requeue:
        return requeue_lost(rc, plan)
    if rc != EXIT_PREEMPTED:
        log(f"trainer failed with status {rc}")
        return rc
    if ranks.first == WARNING and may_requeue:
        log(f"checkpoint written after the time-limit warning: requeueing job ({plan.opts.requeue})")
        requeue(plan.opts.requeue, plan.run_dir, log)
    else:
        got = f" (got {signal.Signals(ranks.first).name})" if ranks.first is not None else ""
        log(f"stopped after writing a checkpoint{got}; it resumes from {plan.run_dir} when run again with "
            f"--out {plan.run_dir} or requeued")
    return rc


def requeue_lost(rc, plan):
    """A rank or host was lost: requeue (the newest checkpoint is intact), unless the bound is used up."""
    path = os.path.join(plan.run_dir, LOST_FILE)
    try:
        with open(path) as f:
            done = sum(1 for line in f if line.strip())
    except FileNotFoundError:
        done = 0
    what = {EXIT_PEER_LOST: "a rank or host was lost"}.get(rc, "a rank was killed or crashed")
    if done >= plan.lost_requeues:
        plan.log(f"{what} (status {rc}); not requeueing: {done} requeue(s) after lost ranks already "
                 f"(--lost-requeues {plan.lost_requeues}); resume with --out {plan.run_dir}")
        return rc
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), "status": rc, "tag": plan.log.tag}) + "\n")
    plan.log(f"{what} (status {rc}): requeueing job, {done + 1} of at most {plan.lost_requeues}; "
             f"it resumes from the newest checkpoint in {plan.run_dir}")
    requeue(plan.opts.requeue, plan.run_dir, plan.log, reason="lost")
    return rc


def run(plan, ranks, environ):
    """Start the ranks unless a stop came first, wait for them, say what their exit status means."""
    if ranks.first is not None:  # nothing ran, nothing to requeue: a requeue here could loop
        return EXIT_INTERRUPTED if ranks.aborted else EXIT_PREEMPTED
    if plan.opts.tee:
        plan.log.tee(os.path.join(plan.run_dir, LOG_FILE))
    if plan.opts.save_args:
        save_args(plan.run_dir, plan.config, plan.train_opts)
    plan.describe()
    if plan.warn_after is not None:
        plan.log(f"time-limit warning (SIGUSR1 to this process) in {plan.warn_after} s")
        signal.signal(signal.SIGALRM, lambda signum, frame: os.kill(os.getpid(), WARNING))
        signal.setitimer(signal.ITIMER_REAL, plan.warn_after)
    pump = ranks.start(plan.argv, plan.env, plan.opts.new_session, plan.opts.tee)
    rc = ranks.wait()
    signal.setitimer(signal.ITIMER_REAL, 0)
    if pump is not None and not ranks.aborted:  # after a kill, ranks elsewhere may hold the pipe open
        pump.join()
    return finish(rc, ranks, plan, environ)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    log = Log()
    ranks = Ranks(log)
    ranks.install()
    parser = make_parser()
    try:
        own, command, train = split_argv(parser, argv)
        opts = parser.parse_args(own)
        log.name, log.tag = opts.name, opts.tag
        plan = Plan(opts, command, train, os.environ, log)
    except UserError as e:
        log(f"error: {e}")
        return EXIT_USAGE
    return run(plan, ranks, os.environ)


if __name__ == "__main__":
    sys.exit(main())
