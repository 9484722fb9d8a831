"""Intervals for a ratio of two noisy totals, by inverting one test per candidate value.

Lagged points (a share ``A / (A + B)``) and department scores (a ratio ``O / E``) both
release two integer totals with independent discrete Laplace noise (discrete Gaussian on
zCDP datasets: see :func:`noise_margin`) and report a function
of them. Bounding each total by its own interval and taking the corners (the Bonferroni
box) needs both noises extreme at once and splits the error level between the two.
Here a candidate value ``t`` of the ratio is tested directly: written with weights
``w1(t), w2(t) >= 0`` so that ``w1 * first - w2 * second = 0`` exactly at the true
value (a share: ``(1 - p) * A - p * B``; a ratio ``r = tan(theta)``:
``cos(theta) * O - sin(theta) * E``), the statistic ``w1 * first_hat - w2 * second_hat`` is
pure noise at the truth, ``w1 * X - w2 * Y``. The interval is every candidate whose
statistic lies within that noise's ``1 - alpha`` bound; it covers the truth with
probability at least ``1 - alpha``, from public scales alone.

Bounds are conservative and closed-form: a discrete Laplace variable of scale ``s`` is
stochastically below a continuous Laplace variable of scale ``s`` plus one, so
``P(|w1 X - w2 Y| > q) <= P(|w1 C1 + w2 C2| > q - w1 - w2)``, whose tail has a closed form
(the sum of two Laplace variables). Candidates lie on a grid; on each segment between two
nodes the weights are bounded by their larger end, and a sum of symmetric unimodal
variables spreads out when either is scaled up (Birnbaum 1948), so one bound serves the
whole segment. A segment is kept when the statistic can reach the bound anywhere on it
(the statistic is linear or a sinusoid there, so its smallest magnitude is zero or at an
end); the interval runs from the first kept segment's start to the last one's end, and so
contains every accepted candidate, the truth included whenever it is accepted.
"""

from __future__ import annotations

import math

import numpy as np

from civicdp.privacy.mechanisms import GaussianVector

SEGMENTS = 2000  # grid segments over the candidates; the interval is wider by at most one
_CHUNK = 512  # cells per vectorised block (cells x nodes floats)


def two_laplace_tail(x: np.ndarray, scale1: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """``P(|scale1 * C1 + scale2 * C2| > x)`` for independent standard Laplace ``C1, C2``, ``x >= 0``."""
    scale1, scale2 = np.asarray(scale1, float), np.asarray(scale2, float)
    big, small = np.maximum(scale1, scale2), np.minimum(scale1, scale2)
    x, big, small = np.broadcast_arrays(np.asarray(x, float), big, small)
    out = np.empty_like(x)
    u = np.divide(small, big, out=np.zeros_like(big), where=big > 0)
    # Nearly equal scales: the equal-scale formula at the larger one is an upper bound (the
    # tail grows with either scale) and avoids the cancellation of the general one.
    close = u > 1 - 1e-4
    z = x / np.where(big > 0, big, 1.0)
    out[close] = np.exp(-z[close]) * (1 + z[close] / 2)
    far = ~close
    uf, zf = u[far], z[far]
    with np.errstate(divide="ignore", over="ignore"):
        second = np.where(uf > 0, uf**2 * np.exp(-zf / np.where(uf > 0, uf, 1.0)), 0.0)
    out[far] = (np.exp(-zf) - second) / (1 - uf**2)
    return np.clip(out, 0.0, 1.0)


def noise_margin(scale1: np.ndarray, scale2: np.ndarray, w1: np.ndarray, w2: np.ndarray,
                 alpha: float, gaussian: bool = False) -> np.ndarray:
    """Bound ``q`` with ``P(|w1 X - w2 Y| > q) <= alpha`` for discrete Laplace ``X, Y`` of those scales.

    With ``gaussian``, ``X, Y`` are discrete Gaussians of those scales (zCDP datasets): each
    is sigma^2-subgaussian (Canonne, Kamath and Steinke 2020), so ``w1 X - w2 Y`` is
    subgaussian with variance proxy ``(w1 s1)^2 + (w2 s2)^2`` and
    ``q = sqrt(2 (w1^2 s1^2 + w2^2 s2^2) ln(2 / alpha))`` bounds it, growing with either weight.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    s1 = np.asarray(w1, float) * scale1
    s2 = np.asarray(w2, float) * scale2
    s1, s2 = np.broadcast_arrays(s1, s2)
    if gaussian:
        return np.sqrt(2 * (s1**2 + s2**2) * math.log(2 / alpha))
    # Bonferroni over the two terms bounds the answer from above; bisect below it.
    high = (s1 + s2) * math.log(2 / alpha) + 1e-12
    low = np.zeros_like(high)
    for _ in range(100):
        mid = (low + high) / 2
        above = two_laplace_tail(mid, s1, s2) > alpha
        low, high = np.where(above, mid, low), np.where(above, high, mid)
    return high + np.asarray(w1, float) + np.asarray(w2, float)


def segment_margins(nodes_w1: np.ndarray, nodes_w2: np.ndarray, scale1: float, scale2: float,
                    alpha: float, gaussian: bool = False) -> np.ndarray:
    """One noise bound per grid segment, valid for every candidate of the segment.

    The weights are monotone on each segment, so their largest values are at its ends.
    """
    w1 = np.maximum(nodes_w1[:-1], nodes_w1[1:])
    w2 = np.maximum(nodes_w2[:-1], nodes_w2[1:])
    return noise_margin(np.full_like(w1, scale1), np.full_like(w2, scale2), w1, w2, alpha, gaussian)


def is_gaussian(mechanism: object) -> bool:
    """Whether a mechanism's noise is discrete Gaussian (zCDP) rather than discrete Laplace."""
    return isinstance(mechanism, GaussianVector)


def inverted_intervals(first: np.ndarray, second: np.ndarray, nodes_w1: np.ndarray, nodes_w2: np.ndarray,
                       margins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Node indices ``(low, high)`` of each cell's interval from its released totals.

    A cell whose every candidate is rejected (an event within the ``alpha`` already
    allowed for) gets the segment that came closest to acceptance.
    """
    first, second = np.asarray(first, float), np.asarray(second, float)
    low = np.empty(first.shape[0], dtype=np.int64)
    high = np.empty(first.shape[0], dtype=np.int64)
    for start in range(0, first.shape[0], _CHUNK):
        a, b = first[start:start + _CHUNK, None], second[start:start + _CHUNK, None]
        g = a * nodes_w1[None, :] - b * nodes_w2[None, :]  # [cells, nodes]: the statistic at each node
        left, right = g[:, :-1], g[:, 1:]
        smallest = np.where(left * right <= 0, 0.0, np.minimum(np.abs(left), np.abs(right)))
        excess = smallest - margins[None, :]  # [cells, segments]: <= 0 where a candidate is accepted
        kept = excess <= 0
        anything = kept.any(axis=1)
        first_kept = np.where(anything, kept.argmax(axis=1), excess.argmin(axis=1))
        last_kept = np.where(anything, kept.shape[1] - 1 - kept[:, ::-1].argmax(axis=1), first_kept)
        low[start:start + _CHUNK] = first_kept
        high[start:start + _CHUNK] = last_kept + 1
    return low, high


def share_grid(segments: int = SEGMENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate shares ``p`` in [0, 1] and their weights ``(1 - p, p)``."""
    p = np.linspace(0.0, 1.0, segments + 1)
    return p, 1 - p, p


def ratio_grid(segments: int = SEGMENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate ratios ``tan(theta)`` in [0, inf] and their weights ``(cos(theta), sin(theta))``."""
    theta = np.linspace(0.0, math.pi / 2, segments + 1)
    w1, w2 = np.cos(theta), np.sin(theta)
    w1[-1], w2[0] = 0.0, 0.0
    ratio = np.divide(w2, w1, out=np.full_like(w2, math.inf), where=w1 > 0)
    return ratio, w1, w2
