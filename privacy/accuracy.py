"""Accuracy of private answers: confidence intervals derived from the known noise.

Intervals describe the noise only: they cover the answer on the bounded data (after
contribution bounding and clipping) with the stated probability. They are computed
from public parameters and the released values, never from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


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


# -- tails of weighted sums of discrete noise (quantile intervals) -------------------------
#
# A quantile interval's endpoint test reads ``a * X + b * Y`` off a noisy tree of counts,
# where X and Y are sums of k1 and k2 independent noises of one family and scale (prefix
# and suffix nodes) and a, b are positive integer weights. The test needs a threshold t
# that this noise reaches with probability at most beta. Both bounds below are upper
# bounds on P(a X + b Y >= t), computed from public parameters only. ``noise`` is
# ``"laplace"`` (P(z) proportional to exp(-|z| / scale)) or ``"gaussian"`` (the discrete
# Gaussian, P(z) proportional to exp(-z^2 / (2 scale^2))), as OpenDP samples them.

#: Probability mass any truncation below may leave out (added back to every tail).
_TRUNCATION = 1e-13
#: Added to every computed tail: covers the floating-point error of the FFT convolutions.
_NUMERICAL_SLACK = 1e-9
#: Noise of scale s is computed on a lattice of step floor(s / _LATTICE_POINTS) (1 below that).
_LATTICE_POINTS = 64
#: Beyond this many values in one array (8 MiB each), the tail is not computed: the Chernoff bound is returned.
MAX_COMPUTED_POINTS = 1 << 20
NOISES = ("laplace", "gaussian")


def _laplace_log_mgf(scale: float, u: float) -> float:
    """log E[exp(u Z)] for Z discrete Laplace of ``scale``, |u| < 1/scale."""
    p = math.exp(-1.0 / scale)
    return 2 * math.log1p(-p) - math.log1p(-p * math.exp(u)) - math.log1p(-p * math.exp(-u))


def chernoff_threshold(noise: str, scale: float, weights: tuple[int, int], counts: tuple[int, int],
                       beta: float) -> int:
    """An integer t with P(a X + b Y >= t) <= beta, by the Chernoff bound (no computation of the tail).

    For every lam > 0, P(a X + b Y >= t) <= exp(-lam t) E[exp(lam (a X + b Y))] (Markov),
    and the moment generating function is a product over the independent noises, each
    at least 1 (Jensen), so the threshold grows with the counts. Laplace: the exact
    generating function, minimised over a grid of 0 < lam < 1 / (scale max(a, b)). The
    discrete Gaussian is scale^2-subgaussian (E[exp(u Z)] <= exp(u^2 scale^2 / 2),
    Canonne, Kamath and Steinke 2020), which gives t = scale sqrt(2 (a^2 k1 + b^2 k2) ln(1/beta)).
    """
    a, b = weights
    k1, k2 = counts
    if noise == "gaussian":
        return max(1, math.ceil(scale * math.sqrt(2 * (a * a * k1 + b * b * k2) * math.log(1 / beta))))
    _check_noise(noise)
    top = 1.0 / (scale * max(a, b))
    best = math.inf
    for i in range(1, 200):
        lam = top * i / 200
        log_mgf = k1 * _laplace_log_mgf(scale, lam * a) + k2 * _laplace_log_mgf(scale, lam * b)
        best = min(best, (log_mgf - math.log(beta)) / lam)
    return max(1, math.ceil(best))


def _check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}")


def _lattice(scale: float) -> int:
    return max(1, math.floor(scale / _LATTICE_POINTS))


def _single_pmf(noise: str, scale: float, c: int, half: int) -> np.ndarray:
    """pmf of U = ceil(Z / c) on -half..half (Z the noise); an upper bound where it is not exact."""
    u = np.arange(-half, half + 1, dtype=np.float64)
    if noise == "laplace":
        p = math.exp(-1.0 / scale)
        # P(U = u) = P(c (u - 1) < Z <= c u): (1 - p^c) / (1 + p) * p^(c (u - 1) + 1) for u >= 1, * p^(-c u) for u <= 0.
        return (-math.expm1(c * math.log(p)) / (1 + p)) * np.where(u >= 1, p ** (c * (u - 1) + 1), p ** (-c * u))
    # Discrete Gaussian: weights exp(-z^2 / (2 scale^2)) on z = -c half .. c half, normalised by their
    # sum (at most the full normaliser, so every probability is rounded up), summed per lattice cell.
    z = np.arange(-c * half - c + 1, c * half + 1, dtype=np.float64)
    weights = np.exp(-(z * z) / (2 * scale * scale))
    return weights.reshape(-1, c).sum(axis=1) / weights.sum()


def _window(noise: str, scale: float, k: int) -> tuple[int, float]:
    """The half-width T (lattice units) of the computed sum of k noises, and each term's truncated mass."""
    c = _lattice(scale)
    if noise == "laplace":
        # Chernoff with lam = c / (2 scale) per lattice unit, using U <= Z / c + 1:
        # P(|S| >= T) <= 2 exp(-lam T) (e^lam M_Z(1 / (2 scale)))^k.
        lam = c / (2 * scale)
        half = math.ceil((math.log(2 / _TRUNCATION) + k * (lam + _laplace_log_mgf(scale, 1 / (2 * scale)))) / lam)
        p = math.exp(-1.0 / scale)
        return half, 2 * p ** (c * half) / (1 + p)  # P(|U| > half) for one term
    # Subgaussian sums: P(S >= T) <= P(sum Z >= c (T - k)) <= exp(-(c (T - k))^2 / (2 k scale^2)), and below.
    half = k + math.ceil(scale * math.sqrt(2 * k * math.log(2 / _TRUNCATION)) / c)
    return half, 2 * math.exp(-((c * (half - 1)) ** 2) / (2 * scale * scale))


def _points(noise: str, scale: float, k: int) -> int:
    """How many float64 values computing the sum of k noises holds in one array (the largest)."""
    if k == 0:
        return 1
    half, _ = _window(noise, scale, k)
    fft = 1 << (2 * half + 1).bit_length()
    # The discrete Gaussian's weights are summed per lattice cell from every integer: c values per cell.
    return max(fft, _lattice(scale) * (2 * half + 1)) if noise == "gaussian" else fft


@lru_cache(maxsize=128)
def _sum_pmf(noise: str, scale: float, k: int) -> tuple[np.ndarray, int, float]:
    """pmf of the sum S of k independent copies of U = ceil(Z / c), c = _lattice(scale).

    Returns (pmf over -T..T, T, a bound on the mass outside -T..T or lost to truncation).
    Each Z <= c U, so sums of Z are at most c times S (an upper bound for upper tails).
    """
    _check_noise(noise)
    if k == 0:
        return np.ones(1), 0, 0.0
    c = _lattice(scale)
    half, single_lost = _window(noise, scale, k)
    single = _single_pmf(noise, scale, c, half)
    size = 1 << (2 * half + 1).bit_length()
    spectrum = np.fft.rfft(np.roll(np.pad(single, (0, size - single.size)), -half)) ** k
    folded = np.fft.irfft(spectrum, size)
    pmf = np.clip(np.concatenate((folded[-half:], folded[: half + 1])), 0.0, None)
    # Lost: the sum's tails beyond +/-half, and the truncated tails of each term.
    return pmf, half, _TRUNCATION + k * single_lost


@lru_cache(maxsize=4096)
def sum_tail_threshold(noise: str, scale: float, weights: tuple[int, int], counts: tuple[int, int],
                       beta: float) -> int:
    """The smallest integer t with computed P(a X + b Y >= t) <= beta (X, Y: sums of counts[0], counts[1] noises).

    The tail is computed, not estimated: on a lattice of step c (exact for scales below
    ``_LATTICE_POINTS``; rounded up otherwise, which only raises the bound), by FFT
    convolution, with every truncated mass and a numerical slack added back. Never above
    :func:`chernoff_threshold`, which is returned when it is smaller, and in place of the
    computation when it would hold more than ``MAX_COMPUTED_POINTS`` values in one array
    (the discrete Gaussian needs memory growing with its scale, either noise with the counts).
    """
    _check_noise(noise)
    if max(_points(noise, scale, k) for k in counts) > MAX_COMPUTED_POINTS:
        return chernoff_threshold(noise, scale, weights, counts, beta)
    a, b = weights
    c = _lattice(scale)
    pmf1, t1, lost1 = _sum_pmf(noise, scale, counts[0])
    pmf2, t2, lost2 = _sum_pmf(noise, scale, counts[1])
    # survival[i + 1] = P(S1 >= i - t1) for i = 0..2 t1; survival[0] = 1 (below the window), survival[-1] = 0.
    survival = np.concatenate(([1.0], np.cumsum(pmf1[::-1])[::-1], [0.0]))
    y = np.arange(-t2, t2 + 1)
    slack = lost1 + lost2 + _NUMERICAL_SLACK

    def tail(v: int) -> float:  # bound on P(a S1 + b S2 >= v)
        need = -((b * y - v) // a)  # ceil((v - b y) / a): S1 must reach it
        index = np.clip(need + t1 + 1, 0, survival.size - 1)
        return float(np.dot(pmf2, survival[index])) + slack

    low, high = 0, a * t1 + b * t2 + 1  # tail(high) is the slack alone
    if tail(high) > beta:
        raise ValueError(f"cannot bound a noise tail below {beta}")
    while low < high:
        mid = (low + high) // 2
        if tail(mid) <= beta:
            high = mid
        else:
            low = mid + 1
    # a X + b Y <= c (a S1 + b S2): P(a X + b Y >= t) <= tail(ceil(t / c)) <= beta once t > c (high - 1).
    return min(c * (high - 1) + 1, chernoff_threshold(noise, scale, weights, counts, beta))
