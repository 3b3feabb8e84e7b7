"""dpbp.workers: parts cover the items in order, run on several threads, and errors come back."""

from __future__ import annotations

import threading
import time

import pytest

from dpbp.threads import element_wise_threads
from dpbp.workers import pool, run_parts, split


@pytest.mark.parametrize("n, parts", [(1, 3), (7, 2), (15, 2), (16, 3), (5, 5)])
def test_split_is_contiguous_near_equal_and_never_empty(n, parts):
    items = list(range(n))
    out = split(items, parts)
    assert [x for part in out for x in part] == items
    assert len(out) == min(n, parts) and all(out)
    assert max(map(len, out)) - min(map(len, out)) <= 1


def test_parts_run_on_other_threads_and_all_finish_before_return():
    seen = {}

    def work(k, part):
        time.sleep(0.05 if k else 0.0)  # part 0 (the caller's) ends first: run_parts must still wait
        seen[k] = (threading.get_ident(), list(part))

    run_parts(work, split(list(range(9)), 3), pool(3))
    assert sorted(seen) == [0, 1, 2]
    assert seen[0][0] == threading.get_ident() and len({t for t, _ in seen.values()}) == 3


def test_an_error_in_any_part_is_raised_after_the_others_finish():
    done = []

    def work(k, part):
        if k == 1:
            raise ValueError("part 1 failed")
        time.sleep(0.05)
        done.append(k)

    with pytest.raises(ValueError, match="part 1 failed"):
        run_parts(work, [[0], [1], [2]], pool(3))
    assert sorted(done) == [0, 2]


def test_one_thread_has_no_pool_and_runs_inline():
    assert pool(1) is None
    order = []
    run_parts(lambda k, part: order.append((k, threading.get_ident())), [[0], [1]], None)
    assert order == [(0, threading.get_ident()), (1, threading.get_ident())]


@pytest.mark.parametrize("env, cores, expected", [
    ({}, 2, 2), ({"OMP_NUM_THREADS": "1"}, 2, 1), ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}, 4, 2),
    ({"OPENBLAS_NUM_THREADS": "8"}, 2, 2), ({"MKL_NUM_THREADS": "3"}, 4, 3), ({"OMP_NUM_THREADS": "x"}, 4, 1),
])
def test_element_wise_threads_follow_the_blas_variables_within_the_cores(env, cores, expected):
    assert element_wise_threads(env, cores) == expected
