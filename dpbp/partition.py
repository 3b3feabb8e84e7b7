"""How a batch (or any run of n items) is cut across ranks: the one definition every module uses.

    share(n, rank, size)              rank's contiguous share; shares differ by at most one item
    chunk_pieces(n, chunk, rank, size)  the fixed chunks of `chunk` items (cut by position, whatever size
                                      is) that rank computes: a contiguous run of whole chunks
    shares(n, size, chunk=None)       every rank's count of items, as either rule gives it

A leaf: imports nothing.
"""

from __future__ import annotations


def share(n, rank, size):
    """[start, stop) of rank's contiguous share of n items; shares differ by at most one."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def chunk_pieces(n, chunk, rank, size):
    """[(start, stop)] of the fixed chunks of `chunk` items (cut by position in 0..n, whatever `size` is)
    that rank computes: a contiguous run of whole chunks, possibly none."""
    first, last = share(-(-n // chunk), rank, size)
    return [(c * chunk, min((c + 1) * chunk, n)) for c in range(first, last)]


def shares(n, size, chunk=None):
    """[items of rank r for r in range(size)]: contiguous shares, or whole chunks when chunk is given."""
    if chunk is None:
        return [b - a for a, b in (share(n, r, size) for r in range(size))]
    return [sum(b - a for a, b in chunk_pieces(n, chunk, r, size)) for r in range(size)]
