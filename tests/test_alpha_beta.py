"""launch/alpha_beta.py's fits recover alpha and beta from times made with the ring formula."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("alpha_beta", Path(__file__).resolve().parents[1] / "launch" / "alpha_beta.py")
alpha_beta = importlib.util.module_from_spec(spec)
spec.loader.exec_module(alpha_beta)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_two_part_fit_recovers_the_ends(P):
    alpha, beta = 12e-6, 0.115e9  # 12 us, 115 MB/s (a 1 Gbit/s link)
    sizes = [2 ** k for k in range(3, 25)]
    ring = [2 * (P - 1) * alpha + 2 * (P - 1) / P * n / beta for n in sizes]
    # the middle of the sweep off the line (a token bucket passing medium messages at full speed):
    # it must not move either end's figure
    times = [t / 3 if 16 << 10 <= n <= 256 << 10 else t for n, t in zip(sizes, ring)]
    a, b = alpha_beta.fit_two_part(P, sizes, times)
    small = [t for n, t in zip(sizes, ring) if n <= 4096]
    assert a == pytest.approx(np.median(small) / (2 * (P - 1)), rel=1e-12)
    assert a == pytest.approx(alpha, rel=0.1)  # the median message (~384 B) adds < 10% at 115 MB/s
    assert b == pytest.approx(beta, rel=1e-9)


def test_two_part_fit_needs_both_ends():
    assert alpha_beta.fit_two_part(2, [1 << 20, 2 << 20], [1e-3, 2e-3]) is None
    assert alpha_beta.fit_two_part(2, [8, 1 << 20], [1e-5, 1e-3]) is None
