"""No hang, ever: a thread on every rank that ends the attempt when a peer stops answering.

MPICH never reports a dead TCP peer, a stopped process or a cut link: the ranks that wait for it stay in
their Allreduce for as long as anyone lets them. So every blocking call of dpbp's communicator is armed
(``comm.Deadline``: a counter incremented before and after the call, its name stored; no lock, no clock,
no wake-up), and one daemon thread per rank (mpi4py releases the GIL inside blocking MPI calls, so it
runs while the main thread waits) looks at that slot every ``period`` seconds and times how long the
counter stays unchanged (to within a period). With T = comm.timeout:

    waited T/2 in one MPI call   ask every peer, over a UDP socket of the watchdogs' own (no MPI call
                                 from this thread: MPI runs in MPI_THREAD_SINGLE), every ``period``;
                                 each peer's watchdog answers at once with what its main thread does:
                                 in which MPI call or busy, for how long, at which step, in which phase
    a peer silent for T/2        lost (stopped, dead, or behind a cut link): the attempt ends at T
    a peer busy for more than T  stuck (e.g. in a hung file system): it answers, but does not come;
                                 10 T (``LONG``) when its phase is a legitimately long one: start-up,
                                 the first step, a held-out evaluation, rank 0 writing a checkpoint
    waited 10 T, all answering   every rank is in MPI and MPI delivers nothing: the attempt ends too

Ending: the rank that decided tells every peer that answered (a "lost" datagram, sent twice); the lowest
rank that answered and is not a culprit prints the one message, naming the ranks, their hosts and the
step; every rank that hears it, and the one that decided, flushes and leaves with ``os._exit
(EXIT_PEER_LOST)`` (never MPI_Finalize or atexit, which would wait for the lost rank). Ranks cut off on
the far side of a split find the near side silent and end by themselves the same way. A checkpoint being
written is a temporary file until its rename, so exiting mid-write leaves the newest checkpoint intact.

The waits dpbp knows to be long do not fire: the waiting ranks ask, the busy rank answers with its phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import zlib

from dpbp.comm import Deadline, host_address, rank_list
from dpbp.errors import EXIT_PEER_LOST

LONG = 10  # legitimately long phases (and waits where every rank answers) may last LONG * comm.timeout
GREETINGS = 10  # hellos at start, one a period, until every peer has been heard from


class Watchdog:
    """One rank's watchdog thread; ``start`` arms the communicator, ``stop`` disarms it."""

    def __init__(self, comm, timeout, prog, sock, slot):
        self.comm, self.rank, self.timeout, self.prog = comm, comm.rank, float(timeout), prog
        self.sock, self.slot = sock, slot
        self.period = min(1.0, max(0.05, self.timeout / 20))  # how often it looks, and asks
        self.peers = {}  # rank -> (host, address, port), filled by start's allgather
        self.heard = {}  # rank -> (monotonic time, its answer) since this wait began to ask
        self.seen, self.since = -1, time.monotonic()  # slot.calls as last seen, and since when
        self.episode = None  # the slot.calls value of the wait being asked about
        self.asked_since = self.last_ask = 0.0
        self.stopped = False
        self.job = None  # start's token of this world, in every datagram
        self.processes = {}  # rank -> (pid, start time in clock ticks since boot): to end a stopped peer
        self.ever = set()  # the peers whose watchdog has been heard at least once (greet asks them)
        self.greetings, self.last_greeting = 0, 0.0
        self.thread = threading.Thread(target=self._run, name="dpbp-watchdog", daemon=True)

    @classmethod
    def start(cls, comm, timeout, prog, alone=False):
        """Collective (one allgather of the watchdogs' addresses, itself watched). None when there is
        nothing to watch: one rank (unless alone: the benchmark's cost of arming one), or timeout 0."""
        if not timeout or (comm.size == 1 and not alone) or comm.deadline is not None:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
        dog = cls(comm, timeout, prog, sock, Deadline())
        dog.slot.phase = "start-up"
        comm.watch(dog.slot)
        dog.thread.start()
        me = (socket.gethostname(), host_address() or "127.0.0.1", sock.getsockname()[1], os.getpid(), started(os.getpid()))
        everyone = comm.allgather(me)
        dog.job = zlib.crc32(repr(everyone).encode())  # the same on every rank: strangers' datagrams are ignored
        dog.peers = {r: tuple(p[:3]) for r, p in enumerate(everyone) if r != comm.rank}
        dog.processes = {r: tuple(p[3:]) for r, p in enumerate(everyone) if r != comm.rank}
        dog.greet(time.monotonic())  # a peer never heard from at all hints at blocked UDP (see _verdict)
        return dog

    def stop(self):
        """Disarm: the communicator is unwatched again (dpbp.fit returns to its caller)."""
        if self.comm.deadline is self.slot:
            self.comm.watch(None)
        self.stopped = True
        self._send(("127.0.0.1", self.sock.getsockname()[1]), {"kind": "wake", "rank": self.rank})
        self.thread.join()
        self.sock.close()

    # ------------------------------------------------------------ the thread

    def _run(self):
        while not self.stopped:
            ready, _, _ = select.select([self.sock], [], [], self.period)
            now = time.monotonic()
            if ready:
                self._receive(now)
            self._check(now)

    def _receive(self, now):
        while True:
            try:
                data, source = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error queued on the socket: nothing to read
                continue
            try:
                msg = json.loads(data)
                kind, sender = msg["kind"], int(msg["rank"])
            except (ValueError, KeyError, TypeError):
                continue
            if msg.get("job") != self.job or sender not in self.peers:
                continue  # not from this world (or a wake-up from stop)
            self.ever.add(sender)
            if kind == "ask":
                self._send(source, {"kind": "answer", "rank": self.rank, **self._state(now)})
            elif kind == "answer":
                self.heard[sender] = (now, msg)
            elif kind == "lost":
                self._end(msg["text"], msg["printer"], tell=())

    def _observe(self, now):
        """(slot.calls now, seconds it has stayed so): odd while the main thread is in a blocking MPI call."""
        calls = self.slot.calls
        if calls != self.seen:
            self.seen, self.since = calls, now
        return calls, now - self.since

    def _state(self, now):
        """This rank's answer: in which MPI call (or None: busy) for how long, the step and phase."""
        calls, seconds = self._observe(now)
        slot = self.slot
        return {"in": slot.what if calls & 1 else None, "for": seconds, "step": slot.step, "phase": slot.phase}

    def _send(self, address, msg):
        try:
            self.sock.sendto(json.dumps({**msg, "job": self.job}).encode(), address)
        except OSError:  # unreachable (a cut link): silence is what the asker will judge
            pass

    def greet(self, now):
        """Ask the peers not heard from yet, every period, GREETINGS times at most: a peer still finishing
        start's allgather ignores datagrams of a world it does not know yet, so one hello may be lost."""
        if self.greetings >= GREETINGS or now - self.last_greeting < self.period or len(self.ever) == len(self.peers):
            return
        self.greetings, self.last_greeting = self.greetings + 1, now
        for r, (host, address, port) in self.peers.items():
            if r not in self.ever:
                self._send((address, port), {"kind": "ask", "rank": self.rank})

    def _check(self, now):
        self.greet(now)
        calls, waited = self._observe(now)
        half = self.timeout / 2
        if not calls & 1 or waited < half:
            self.episode = None
            return
        if self.episode != calls:  # a new wait: ask afresh
            self.episode, self.asked_since, self.heard = calls, now, {}
        if now - self.last_ask >= self.period:
            self.last_ask = now
            for host, address, port in self.peers.values():
                self._send((address, port), {"kind": "ask", "rank": self.rank})
        if not self.peers and waited >= self.timeout:  # still in start's allgather of addresses
            self._end(f"not every rank reached the start within comm.timeout = {self.timeout:g} s "
                      f"(exit status {EXIT_PEER_LOST})", 0, tell=())
        if now - self.asked_since >= half and self.peers:
            verdict = self._verdict(now, waited)
            if verdict is not None:
                self._kill_stopped(verdict[2])
                self._end(*verdict[:2], tell=[r for r in self.peers if r in self.heard])

    def _kill_stopped(self, silent):
        """SIGKILL the silent peers on this host, checked by PID and start time (never a reused PID).

        A SIGSTOPped rank cannot leave by itself, and a launcher may wait for it for as long as it stays
        (mpirun usually kills it when a survivor exits non-zero; not always: observed > 40 s in CI).
        The attempt ends anyway, so the survivors end it too."""
        here = socket.gethostname()
        for r in silent:
            pid, start = self.processes.get(r, (None, None))
            if pid is not None and self.peers[r][0] == here and started(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------ the verdict

    def _verdict(self, now, waited):
        """None while every peer answers and none is over its allowance; else (message, printer, silent)."""
        T, half = self.timeout, self.timeout / 2
        silent, stuck = [], []
        for r in sorted(self.peers):
            got = self.heard.get(r)
            if got is None or now - got[0] > half:
                silent.append(r)
                continue
            answer = got[1]
            busy = float(answer["for"]) + (now - got[0])
            allowed = LONG * T if answer.get("phase") else T
            if answer.get("in") is None and busy > allowed:
                stuck.append((r, busy, answer))
        slot = self.slot
        where = f"step {slot.step}" if slot.step else "start-up"
        waiting = f"rank {self.rank} waited {waited:.1f} s in {slot.what}"
        limit = f"comm.timeout = {T:g} s, exit status {EXIT_PEER_LOST}"
        culprits = silent + [r for r, _, _ in stuck]
        printer = min([r for r in self.heard if r not in culprits and r in self.peers] + [self.rank])
        if silent:
            text = (f"{self.who(silent)} stopped answering at {where}: {waiting} for "
                    f"{'it' if len(silent) == 1 else 'them'}, no answer for {half:g} s ({limit})")
            never = [r for r in silent if r not in self.ever]
            if never:
                text += (f"; {rank_list(never, self.comm.size)} never answered since the start: if this "
                         f"repeats, UDP between the watchdogs may be blocked (a firewall); comm.timeout = 0 "
                         f"turns the watchdog off")
        elif stuck:
            parts = [f"{self.who([r])} answers but has been {busy_words(a)} for {busy:.1f} s at step {a.get('step')}"
                     for r, busy, a in stuck]
            text = (f"{'; '.join(parts)} while {waiting} (allowed: {T:g} s, {LONG * T:g} s in a long phase; "
                    f"{limit})")
        elif waited > LONG * T:
            text = f"every rank answers but MPI delivers nothing: at {where} {waiting} ({LONG} x comm.timeout; {limit})"
        else:
            return None
        return text, printer, silent

    def who(self, ranks):
        """Ranks with their hosts, grouped by host: "rank 1 (host b, 10.0.0.2)", "ranks 2, 3 (all of host c, 10.0.0.3)"."""
        by_host = {}
        for r in ranks:
            host, address, _ = self.peers[r]
            by_host.setdefault((host, address), []).append(r)
        words = []
        for (host, address), rs in by_host.items():
            everyone = sum(1 for h, a, _ in self.peers.values() if (h, a) == (host, address)) == len(rs)
            on = f"all of host {host}" if everyone and len(rs) > 1 else f"host {host}"
            words.append(f"{rank_list(rs, self.comm.size)} ({on}, {address})")
        return "; ".join(words)

    def _end(self, text, printer, tell):
        """Tell the peers that answered, print if this rank is the printer, leave at once."""
        for _ in range(2):  # datagrams may be lost; hearing it twice is harmless
            for r in tell:
                host, address, port = self.peers[r]
                self._send((address, port), {"kind": "lost", "rank": self.rank, "text": text,
                                             "printer": printer})
        if printer == self.rank:
            print(f"{self.prog}: stopped: {text}", file=sys.stderr, flush=True)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(EXIT_PEER_LOST)


def started(pid):
    """A process's start time (clock ticks after boot, /proc/PID/stat field 22); None when gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def busy_words(answer):
    phase = answer.get("phase")
    return f"busy ({phase})" if phase else "busy outside MPI"


@contextlib.contextmanager
def long_phase(slot, words):
    """Mark a legitimately long stretch of work (``LONG`` x comm.timeout); slot may be None (unwatched)."""
    if slot is None:
        yield
        return
    before, slot.phase = slot.phase, words
    try:
        yield
    finally:
        slot.phase = before
