"""The one place where per-rank partial sums become the global sum: "fast" and "reproducible".

A step's reduce buffer is [gradient of the summed error | loss sum | correct count | stop flag]; all of it
rides one Allreduce. Each reducer also decides how this rank's share of the global batch is cut into
the pieces it runs forward/backward on (``pieces``), because reproducibility depends on that cut.

fast
    One piece per rank (its contiguous share; shares differ by at most one sample), then one in-place
    MPI Allreduce of the float buffer. Float addition is not associative, so results differ from the
    1-rank run by rounding (~1e-16 relative per step in float64).

reproducible
    The global batch is cut into fixed chunks of ``chunk`` samples by position in the batch, whatever P is;
    each rank computes whole chunks, each with identically shaped operations, so a chunk's gradient g_c is
    bitwise the same on any rank. The chunk gradients are then summed EXACTLY: for each tensor t,
    with m_t = max over all chunks of |g_c| (one tiny Allreduce-MAX) and N chunks in the batch, pick
    e_t = 52 - exponent(m_t) - ceil(log2 N), so |g_c 2^e_t| < 2^52 / N. q_c = rint(g_c 2^e_t) are integers
    held exactly in float64 and any sum of N of them stays below 2^52, so local sums and MPI's SUM are
    exact in every order: the result sum_c q_c 2^-e_t is independent of P, bit for bit.
    Error bound against the exact sum: |err| <= N/2 * 2^-e_t <= N^2 * m_t * 2^-52 per element (about
    1.4e-14 m_t for N = 8 chunks), far below float32 resolution and near float64's.
    Cost: the buffer is float64 even for float32 models, and each chunk is scaled, rounded and added.
"""

from __future__ import annotations

import math

import numpy as np


def share(n, rank, size):
    """[start, stop) of rank's contiguous share of n items; shares differ by at most one."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class FastReducer:
    mode = "fast"

    def __init__(self, comm, n_buf, dtype, group_bounds):
        self.comm = comm
        self.buf = np.zeros(n_buf, dtype)

    def pieces(self, batch_size):
        """[(start, stop)] positions in the global batch that this rank computes, one piece each."""
        start, stop = share(batch_size, self.comm.rank, self.comm.size)
        return [(start, stop)] if stop > start else []

    def begin(self, batch_size):
        if not self.pieces(batch_size):
            self.buf[:] = 0  # an empty share contributes zeros; otherwise backward overwrites it all

    def add_piece(self, index):
        """The piece's results are already in self.buf (there is only one piece per rank)."""

    def allreduce(self):
        self.comm.allreduce_sum_(self.buf)
        return self.buf


class ReproducibleReducer:
    mode = "reproducible"

    def __init__(self, comm, n_buf, dtype, group_bounds, chunk):
        """group_bounds: [(start, stop)] slices of the buffer that share one scale (one per tensor);
        entries outside every group must hold exact small integers (counts, flags)."""
        self.comm, self.chunk = comm, chunk
        self.buf = np.zeros(n_buf, dtype)  # one chunk's results, written by the model
        self.acc = np.zeros(n_buf, np.float64)
        self.groups = list(group_bounds)
        self._stored = np.zeros((0, n_buf), dtype)
        self._local_max = np.zeros(len(self.groups), np.float64)
        self._q = np.zeros(n_buf, np.float64)
        covered = np.zeros(n_buf, bool)
        for lo, hi in self.groups:
            covered[lo:hi] = True
        self._exact = np.flatnonzero(~covered)
        self._n_local = 0

    def pieces(self, batch_size):
        n_chunks = -(-batch_size // self.chunk)
        first, last = share(n_chunks, self.comm.rank, self.comm.size)
        return [(c * self.chunk, min((c + 1) * self.chunk, batch_size)) for c in range(first, last)]

    def begin(self, batch_size):
        self._n_chunks = -(-batch_size // self.chunk)
        n_local = self._n_local = len(self.pieces(batch_size))
        if n_local > len(self._stored):
            self._stored = np.zeros((n_local, len(self.buf)), self.buf.dtype)
        self._local_max[:] = 0.0
        self.buf[:] = 0

    def add_piece(self, index):
        """Keep chunk `index`'s results (in self.buf) until the global scale is known."""
        np.copyto(self._stored[index], self.buf)
        for g, (lo, hi) in enumerate(self.groups):
            if hi > lo:
                self._local_max[g] = max(self._local_max[g], float(np.max(np.abs(self.buf[lo:hi]))))
        self.buf[:] = 0

    def allreduce(self):
        m = self.comm.allreduce_max_(self._local_max.copy())
        log2_n = math.ceil(math.log2(max(self._n_chunks, 1)))
        exponents = [52 - int(np.frexp(mt)[1]) - log2_n if np.isfinite(mt) else 0 for mt in m]
        self.acc[:] = 0.0
        for stored in self._stored[:self._n_local]:
            self._add_quantized(stored, exponents)
        self.comm.allreduce_sum_(self.acc)
        for (lo, hi), e in zip(self.groups, exponents):
            self.acc[lo:hi] *= 2.0 ** -e  # exact: a power of two
        np.copyto(self.buf, self.acc, casting="same_kind")
        return self.buf

    def _add_quantized(self, chunk_buf, exponents):
        q = self._q
        for (lo, hi), e in zip(self.groups, exponents):
            np.multiply(chunk_buf[lo:hi], 2.0 ** e, out=q[lo:hi])  # exact: a power of two
            np.rint(q[lo:hi], out=q[lo:hi])
        q[self._exact] = chunk_buf[self._exact]  # exact integers (counts, flags)
        self.acc += q


def make_reducer(mode, comm, n_buf, dtype, group_bounds, chunk):
    if mode == "fast":
        return FastReducer(comm, n_buf, dtype, group_bounds)
    return ReproducibleReducer(comm, n_buf, dtype, group_bounds, chunk)
