"""Accuracy of private answers: confidence intervals derived from the known noise.

Intervals describe the noise only: they cover the answer on the bounded data (after
contribution bounding and clipping) with the stated probability. They are computed
from public parameters and the released values, never from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def symmetric(value: float, half_width: float) -> Interval:
    return Interval(value - half_width, value + half_width)


def ratio(numerator: float, num_half_width: float, denominator: float, den_half_width: float,
          lower: float, upper: float) -> Interval:
    """Interval for numerator / denominator when each lies within its half-width.

    If both component intervals hold (each at confidence 1 - alpha/2, so jointly at
    least 1 - alpha by the union bound), the ratio lies between the extreme corners.
    The result is clipped to the public value bounds ``[lower, upper]``, and is the
    whole range when the denominator could be zero or negative.
    """
    den_low = denominator - den_half_width
    if den_low <= 0 or not math.isfinite(den_low):
        return Interval(lower, upper)
    corners = [
        (numerator + sn * num_half_width) / (denominator + sd * den_half_width)
        for sn in (-1, 1)
        for sd in (-1, 1)
    ]
    return Interval(max(lower, min(corners)), min(upper, max(corners)))
