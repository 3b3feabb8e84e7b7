"""Element-wise work split across the cores a rank's BLAS uses. The standard library only.

The matrix products of a step run on the rank's BLAS threads; the element-wise passes around them (the
optimizer's update, dropout's hash) are NumPy ufuncs on one thread, so at 2 threads per rank they cost
twice their share of the step. NumPy releases the GIL inside a ufunc's loop, so independent parts of an
element-wise pass can run on threads of a pool. Each part touches its own elements and does to each
element exactly what one thread would, so the result is bitwise the same for any number of threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def pool(threads: int) -> ThreadPoolExecutor | None:
    """A pool of threads - 1 workers shared by every caller in the process (the caller's own thread runs
    one part), created on first use; None for one thread (run_parts then runs everything inline)."""
    if threads <= 1:
        return None
    with _lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="dpbp-worker")
        return _pools[threads]


def split(items: list, parts: int) -> list[list]:
    """items in `parts` contiguous runs of near-equal length (the first ones one longer), none empty."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, a = [], 0
    for k in range(parts):
        b = a + q + (k < r)
        out.append(items[a:b])
        a = b
    return out


def run_parts(fn, parts: list, workers: ThreadPoolExecutor | None) -> None:
    """fn(k, parts[k]) for every k: part 0 on the calling thread, the others on workers' threads (all
    inline without workers). Returns when every part is done; re-raises the first part's error."""
    if workers is None or len(parts) == 1:
        for k, part in enumerate(parts):
            fn(k, part)
        return
    futures = [workers.submit(fn, k, part) for k, part in enumerate(parts) if k]
    errors = []
    try:
        fn(0, parts[0])
    except BaseException as e:  # noqa: BLE001 - re-raised below, once every part has stopped
        errors.append(e)
    for f in futures:  # wait for all: no part may still write into the arrays when this returns
        if f.exception() is not None:
            errors.append(f.exception())
    if errors:
        raise errors[0]
