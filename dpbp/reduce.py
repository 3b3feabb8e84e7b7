"""The one place where per-rank partial sums become the global sum: "fast" and "reproducible".

A step's reduce buffer is [gradient of the summed error | loss sum | correct count | stop flag]; all of it
rides one Allreduce. Each reducer also decides how this rank's share of the global batch is cut into
the pieces it runs forward/backward on (``pieces``), because reproducibility depends on that cut.

fast
    One piece per rank (its contiguous share; shares differ by at most one sample), then one in-place
    MPI Allreduce of the float buffer. Float addition is not associative, so results differ from the
    1-rank run by rounding (~1e-16 relative per step in float64).

reproducible
    Bitwise the same gradient, loss and counts for any number of ranks P (same config, seed, BLAS threads).

    1. Fixed chunks. The global batch is cut into N = ceil(B / chunk) chunks of ``comm.chunk`` samples by
       position in the batch, whatever P is; each rank computes whole chunks (a contiguous run of them),
       each with identically shaped operations, so chunk c's gradient g_c is bitwise the same on any rank.
    2. One grid per tensor. m_t = max over all chunks and entries of |g_c| for tensor t (one small
       Allreduce-MAX), 2^(E_t - 1) <= m_t < 2^E_t, and the unit u_t = 2^(E_t - p + 2 + s) with p the dtype's
       significand bits (24 float32, 53 float64) and s = max(0, ceil(log2 N) - (w - p)) (0 up to 256 chunks
       in float32, 2048 in float64); so |g_c / u_t| < 2^(p-2-s).
    3. Round and add as integers. With M_t = 3 * 2^(p-2) u_t, T = fl(g_c + M_t) lies in [2^(p-1) u_t, 2^p u_t],
       where floats are spaced u_t: T = M_t + q u_t with q = round(g_c / u_t), and T's bit pattern, read
       as an unsigned integer of the dtype's width w (32 / 64), is bits(M_t) + q. Those patterns are summed
       as unsigned integers, locally and then by MPI's SUM: integer addition modulo 2^w is associative
       and commutative, so the sum is the same in every order and on every rank. Each rank starts from
       minus its chunks' share of bits(M_t), so the global sum is Q = sum_c q_c exactly
       (|Q| <= N 2^(p-2-s) <= 2^(w-2): no overflow). The result is Q u_t, rounded once to the dtype.
       Counts and flags are exact integers and are summed as integers directly. The Allreduce moves as
       many bytes as "fast".

    Error bound, per entry of tensor t, against the exact sum of the chunk gradients:
        |result - sum_c g_c| <= N u_t / 2 + ulp(result) / 2 <= N 2^(2-p+s) m_t + ulp(result) / 2,
    i.e. N * 4.4e-16 m_t in float64 and N * 2.4e-7 m_t in float32 (m_t: the tensor's largest chunk entry):
    each chunk gradient is rounded to a multiple of 4 ulp(m_t) before the exact sum. The plain float sum
    of "fast" has a bound of the same order ((P - 1) eps sum_r |partial_r|). The chunk gradients themselves
    carry the usual rounding of forward/backward, as in "fast". A non-finite chunk makes its tensor NaN on
    every rank (training then stops with a fault naming it).
    What must match for identical bits: config, seed, comm.chunk, BLAS library/kernel and thread count
    (a chunk's matrix products must round the same on every rank), not the number of ranks.

    Cost: a rank computes chunk by chunk (smaller matrix products, one gradient write per chunk, each
    chunk into a buffer of its own), reads each chunk for its max, adds M and adds the integers, then
    converts the result back (about 6 passes over the gradient with one chunk per rank);
    P > N leaves ranks idle. Memory: ceil(N / P) - 1 gradient-sized chunk buffers and one integer accumulator
    per rank. Measured against "fast" in README.md (section "Verify").
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np

from dpbp.model import Grads
from dpbp.partition import chunk_pieces, share

LOSS, CORRECT, STOP = 0, 1, 2  # statistics that ride the gradient's Allreduce, after the gradient
N_STATS = 3


class Layout:
    """The reduce buffer: [the model's tensors in order (the gradient) | loss sum | correct count | stop flag].

    shapes: the model's parameter shapes in buffer order (model.param_shapes).
    """

    def __init__(self, shapes):
        sizes = [int(np.prod(s)) for s in shapes]
        ends = np.cumsum(sizes).tolist()
        self.shapes = list(shapes)
        self.tensors = list(zip([0] + ends[:-1], ends))  # each tensor's [start, stop) in the buffer
        self.n_grad = ends[-1]
        self.size = self.n_grad + N_STATS
        self.layer_starts = [lo for lo, _ in self.tensors[0::2]]  # where layer l's weight begins

    def grid_groups(self):
        """Slices that share one rounding grid in reproducible mode: each tensor, and the loss (it needs a
        scale); counts and flags are exact integers."""
        return [*self.tensors, (self.n_grad + LOSS, self.n_grad + LOSS + 1)]


class Piece:
    """Where one piece of this rank's share writes: gradient views for backward, and its statistics."""

    def __init__(self, buf, layout):
        self.buf = buf  # (layout.size,)
        self.grads = Grads(buf[:layout.n_grad], layout.shapes)
        self.stats = buf[layout.n_grad:]  # (N_STATS,): LOSS, CORRECT, STOP


class Reducer(Protocol):
    """Turns every rank's partial sums into the global sum; decides how a rank's share is cut into pieces.

    A step: ``for a, b, piece in begin(B)``: forward/backward on positions [a, b) of the global batch into
    ``piece``, then ``add_piece(piece)``; write the stop flag into ``result.stats``; ``allreduce()``.
    Afterwards ``result`` holds the summed gradient and statistics, the same on every rank.
    """

    mode: str
    layout: Layout
    result: Piece
    layer_ready: Callable[[int], None] | None  # for backward: layer l's gradient is final; or None

    def pieces(self, batch_size: int) -> list[tuple[int, int]]: ...

    def begin(self, batch_size: int) -> list[tuple[int, int, Piece]]: ...

    def add_piece(self, piece: Piece) -> None: ...

    def allreduce(self) -> Piece: ...

    def reduce_scatter(self, counts: list[int]) -> Piece:
        """Like allreduce, but only this rank's slice of the gradient (counts[r] entries for rank r, slices
        in rank order over [0, n_grad)) and the statistics hold the global sums afterwards (optim.shard)."""
        ...


class FastReducer:
    """One piece per rank, then the float buffer summed over ranks by MPI, in place.

    Without buckets: ONE blocking Allreduce of the whole buffer after backward.
    With bucket_bytes > 0 (comm.bucket_mb, more than one rank, and a gradient that makes at least two
    buckets): backward reports each layer as soon as its gradient is final (the last layer first; the
    buffer holds layer 0 first, so what is final is always a tail of the gradient). The gradient is cut at
    layer boundaries into buckets of at least ``bucket_bytes``, from the end; each bucket's non-blocking
    Iallreduce starts as soon as it is final, so reducing the later layers can overlap the backward of the
    earlier ones. ``allreduce`` starts what is left, reduces the statistics after the gradient and waits
    for all. Every rank issues the same buckets in the same order (an idle rank starts them all in
    ``allreduce``).
    """

    mode = "fast"

    def __init__(self, comm, layout, dtype, bucket_bytes=0):
        self.comm, self.layout = comm, layout
        self.buf = np.zeros(layout.size, dtype)
        self.result = Piece(self.buf, layout)
        self._plans = {}  # batch size -> [(start, stop, piece)], computed once per size
        self.buckets = self._buckets(bucket_bytes) if comm.size > 1 else []  # [(lo, hi)], last first
        self.layer_ready = self._layer_ready if self.buckets else None
        self._requests = []

    def _buckets(self, bucket_bytes):
        """[(lo, hi)] slices of the gradient of at least bucket_bytes, cut at layer starts, from the end;
        [] (one Allreduce of gradient and statistics together) if that makes fewer than two."""
        if bucket_bytes <= 0:
            return []
        buckets, hi = [], self.layout.n_grad
        for lo in sorted(self.layout.layer_starts, reverse=True):
            if (hi - lo) * self.buf.itemsize >= bucket_bytes or lo == 0:
                if hi > lo:
                    buckets.append((lo, hi))
                hi = lo
        return buckets if len(buckets) >= 2 else []

    def pieces(self, batch_size):
        """[(start, stop)] positions in the global batch that this rank computes: its contiguous share."""
        return [(a, b) for a, b, _ in self._plan(batch_size)]

    def _plan(self, batch_size):
        plan = self._plans.get(batch_size)
        if plan is None:
            start, stop = share(batch_size, self.comm.rank, self.comm.size)
            plan = self._plans[batch_size] = [(start, stop, self.result)] if stop > start else []
        return plan

    def begin(self, batch_size):
        plan = self._plan(batch_size)
        if not plan:
            self.buf[:] = 0  # an empty share contributes zeros; otherwise backward overwrites it all
        return plan

    def add_piece(self, piece):
        """The piece's results are already in the buffer that is reduced."""

    def _layer_ready(self, l):
        """Layer l's gradient, and so buf[layer_starts[l]:n_grad], is final: start the buckets inside it."""
        self._start_buckets(self.layout.layer_starts[l])

    def _start_buckets(self, offset):
        requests, buckets = self._requests, self.buckets
        while len(requests) < len(buckets) and buckets[len(requests)][0] >= offset:
            lo, hi = buckets[len(requests)]
            requests.append(self.comm.iallreduce_sum_(self.buf[lo:hi]))
        if requests:
            self.comm.test_all(requests)  # MPI progresses non-blocking collectives only inside MPI calls

    def allreduce(self):
        if not self.buckets:
            self.comm.allreduce_sum_(self.buf)
            return self.result
        self._start_buckets(0)
        self.comm.allreduce_sum_(self.result.stats)  # the statistics, written after backward
        self.comm.wait_all(self._requests)
        self._requests = []
        return self.result

    def reduce_scatter(self, counts):
        """The gradient reduce-scattered, the statistics allreduced (a few values). No buckets: the
        trainer builds a sharded reducer without them."""
        if self.buckets:
            raise ValueError("reduce_scatter needs a FastReducer built without buckets")
        n = self.layout.n_grad
        self.comm.reduce_scatter_sum_(self.buf[:n], counts)
        self.comm.allreduce_sum_(self.result.stats)
        return self.result


class ReproducibleReducer:
    """Exact integer sums of fixed chunk gradients (see the module doc); bitwise independent of P."""

    mode = "reproducible"
    layer_ready = None

    def __init__(self, comm, layout, dtype, chunk):
        self.comm, self.layout, self.chunk = comm, layout, chunk
        n_buf = layout.size
        self.buf = np.zeros(n_buf, dtype)  # the last chunk's results, then the reduced sum
        self.result = Piece(self.buf, layout)
        f = np.finfo(self.buf.dtype)
        self._p, self._w = f.nmant + 1, 8 * self.buf.itemsize  # significand bits; integer width
        self._min_e = f.minexp - f.nmant  # the smallest unit: M stays a normal number
        self._max_exp = f.maxexp
        self._uint, self._int = np.dtype(f"u{self.buf.itemsize}"), np.dtype(f"i{self.buf.itemsize}")
        self._acc = np.zeros(n_buf, self._uint)
        self.groups = [(lo, hi) for lo, hi in layout.grid_groups() if hi > lo]
        covered = np.zeros(n_buf, bool)
        for lo, hi in self.groups:
            covered[lo:hi] = True
        self._exact = np.flatnonzero(~covered)
        # Every group's max and min in one reduceat call each: cut the buffer at every group boundary.
        cuts = sorted({b for lo, hi in self.groups for b in (lo, hi)} - {n_buf})
        self._cuts, self._firsts = np.array(cuts, np.intp), [cuts.index(lo) for lo, _ in self.groups]
        self._exact_sum = np.zeros(len(self._exact), np.int64)
        self._max = np.zeros(len(self.groups))
        self._kept = []  # Pieces over buffers of their own: this rank's chunks but the last (that uses buf)
        self._n_chunks = self._n_local = 0

    def pieces(self, batch_size):
        """[(start, stop)] positions in the global batch of this rank's chunks (possibly none)."""
        return chunk_pieces(batch_size, self.chunk, self.comm.rank, self.comm.size)

    def begin(self, batch_size):
        """Each chunk but the last writes into a buffer of its own, kept until the grid is known; the
        last one into buf."""
        pieces = self.pieces(batch_size)
        self._n_chunks, self._n_local = -(-batch_size // self.chunk), len(pieces)
        while len(self._kept) < self._n_local - 1:
            self._kept.append(Piece(np.zeros(self.layout.size, self.buf.dtype), self.layout))
        self._max[:] = 0.0
        self._exact_sum[:] = 0
        self.buf[self._exact] = 0  # so that after the pieces they hold only what the caller adds (flags)
        return [(a, b, p) for (a, b), p in zip(pieces, self._chunk_pieces())]

    def _chunk_pieces(self):
        return [*self._kept[:self._n_local - 1], self.result] if self._n_local else []

    def add_piece(self, piece):
        """Note the chunk's largest entries and take its counts."""
        g = piece.buf
        if self.groups:
            largest = np.maximum.reduceat(g, self._cuts)[self._firsts]
            smallest = np.minimum.reduceat(g, self._cuts)[self._firsts]
            np.maximum(self._max, np.maximum(largest, -smallest), out=self._max)  # NaN stays NaN
        self._take_exact(g)

    def _accumulate(self):
        """This rank's integer sums (in self._acc, viewed as signed in the returned q) and the grid units."""
        self._take_exact(self.buf)  # what the caller wrote after the last piece (the stop flag), once per rank
        m = self.comm.allreduce_max_(np.nan_to_num(self._max, nan=math.inf))  # MPI's MAX may drop NaN
        units = [self._unit_exponent(mt) for mt in m]
        magic = [None if e is None else self._magic(e) for e in units]
        acc = self._acc
        chunks = [p.buf for p in self._chunk_pieces()]
        for i, g in enumerate(chunks):
            self._to_grid(g, magic)
            bits = g.view(self._uint)
            if i == 0:  # start from this rank's share of N * bits(M), so the global sum is Q itself
                for (lo, hi), M in zip(self.groups, magic):
                    bias = 0 if M is None else len(chunks) * int(M.view(self._uint)) % (1 << self._w)
                    np.subtract(bits[lo:hi], self._uint.type(bias), out=acc[lo:hi])
            else:
                np.add(acc, bits, out=acc)  # wraps modulo 2^w: harmless, see the module doc
        if not chunks:
            acc[:] = 0
        q = acc.view(self._int)
        q[self._exact] = self._exact_sum
        return q, units

    def allreduce(self):
        q, units = self._accumulate()
        self.comm.allreduce_sum_(self._acc)
        self._from_grid(q, units)
        return self.result

    def reduce_scatter(self, counts):
        """The integer accumulator reduce-scattered (exact: the same Q as allreduce) and its statistics
        allreduced; only this rank's gradient slice is converted back."""
        q, units = self._accumulate()
        n, lo = self.layout.n_grad, sum(counts[:self.comm.rank])
        self.comm.reduce_scatter_sum_(self._acc[:n], counts)
        self.comm.allreduce_sum_(self._acc[n:])
        self._from_grid(q, units, (lo, lo + counts[self.comm.rank]))
        return self.result

    def _to_grid(self, g, magic):
        """T = M + q u: each group of chunk g rounded to its grid, once, in place."""
        for (lo, hi), M in zip(self.groups, magic):
            if M is not None:
                np.add(g[lo:hi], M, out=g[lo:hi])

    def _from_grid(self, q, units, keep=None):
        """buf <- Q u per group (NaN where the grid is undefined); the exact entries as they are.
        keep: (lo, hi), convert only that part of the gradient (the statistics always)."""
        buf, n = self.buf, self.layout.n_grad
        for (lo, hi), e in zip(self.groups, units):
            if keep is not None and lo < n:
                lo, hi = max(lo, keep[0]), min(hi, keep[1])
                if lo >= hi:
                    continue
            if e is None:
                buf[lo:hi] = np.nan
            else:  # Q rounded to the dtype, once, then times u: exact (a power of two) unless subnormal.
                # Two passes: NumPy's cast inside a multiply (dtype=, casting=) is slower than both.
                np.copyto(buf[lo:hi], q[lo:hi], casting="unsafe")
                buf[lo:hi] *= buf.dtype.type(2.0 ** e)
        buf[self._exact] = q[self._exact]

    def _take_exact(self, g):
        self._exact_sum += g[self._exact].astype(np.int64)
        g[self._exact] = 0

    def _unit_exponent(self, m):
        """e with u = 2^e the grid of a tensor whose largest chunk entry is m; None if m is not finite
        or so large that M would overflow."""
        if not math.isfinite(m):
            return None
        p = self._p
        coarsen = max(0, (self._n_chunks - 1).bit_length() - (self._w - p))  # ceil(log2 N) - (w - p)
        e = max(math.frexp(m)[1] - p + 2 + coarsen, self._min_e)
        return e if e + p < self._max_exp else None

    def _magic(self, e):
        """M = 3 * 2^(p-2) * 2^e in the buffer's dtype."""
        return np.ldexp(self.buf.dtype.type(3), self._p - 2 + e)


def make_reducer(mode, comm, layout, dtype, chunk, bucket_bytes=0) -> Reducer:
    if mode == "fast":
        return FastReducer(comm, layout, dtype, bucket_bytes)
    return ReproducibleReducer(comm, layout, dtype, chunk)
