"""The computed noise tail stays within a memory limit at any scale (it falls back to the Chernoff bound).

Without the limit, a discrete Gaussian of scale 3e7 (a sum at a fine resolution) would need about
25 GiB; these tests would then run out of memory, or fail on the measured peak.
"""

from __future__ import annotations

import tracemalloc

import pytest

from civicdp.privacy import accuracy

PEAK_LIMIT = 64 * 2**20  # bytes: a few arrays of at most MAX_COMPUTED_POINTS values (8 MiB each)


@pytest.mark.parametrize(("noise", "scale", "counts"), [
    ("gaussian", 3e7, (1, 0)),
    ("gaussian", 3e5, (2, 3)),
    ("laplace", 10.0, (200_000, 0)),
], ids=["gaussian at scale 3e7", "gaussian at scale 3e5", "laplace, 200,000 noises"])
def test_beyond_the_limit_the_chernoff_bound_is_returned_in_little_memory(
        noise: str, scale: float, counts: tuple[int, int]) -> None:
    tracemalloc.start()
    try:
        got = accuracy.sum_tail_threshold(noise, scale, (1, 2), counts, 0.025)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT
    assert got == accuracy.chernoff_threshold(noise, scale, (1, 2), counts, 0.025)


@pytest.mark.parametrize("noise", accuracy.NOISES)
def test_below_the_limit_the_tail_is_still_computed_and_tighter(noise: str) -> None:
    scale, counts = 200.0, (3, 1)
    assert accuracy._points(noise, scale, counts[0]) <= accuracy.MAX_COMPUTED_POINTS
    computed = accuracy.sum_tail_threshold(noise, scale, (1, 1), counts, 0.025)
    assert computed < accuracy.chernoff_threshold(noise, scale, (1, 1), counts, 0.025)
