"""OpenDP mechanisms: the only place in civicdp that draws privacy noise.

Each mechanism is built from a public sensitivity (derived from declared bounds and
the contribution bound, never from the data) and a noise scale. Its privacy loss is
read from OpenDP's privacy map before anything is released, so a plan knows its
cost before it touches data. All noise is added to integers (discrete Laplace for
pure-DP datasets, discrete Gaussian for zCDP datasets, and exponential selection on
integer scores, read in either accounting), which keeps OpenDP's samplers exact and
avoids floating-point attacks. :mod:`civicdp.privacy.accounting` picks the family per dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from functools import lru_cache
from typing import Sequence

import numpy as np
import opendp.accuracy as dp_accuracy
import opendp.combinators as combinators
import opendp.domains as domains
import opendp.measurements as measurements
import opendp.measures as measures
import opendp.metrics as metrics
import opendp.mod
# Not opendp.prelude: it imports scikit-learn, seconds of start-up for every command.

from civicdp.privacy.conversion import ensure_safe_features
from civicdp.privacy.errors import InvalidLoss
from civicdp.privacy.loss import PrivacyLoss

ensure_safe_features()

_INT_VECTOR = domains.vector_domain(domains.atom_domain(T="i64"))


def _int64s(values: Sequence[int]) -> np.ndarray:
    """The integers as one int64 array: OpenDP reads it in one copy, a list element by element
    (~17 us each: 0.1 s for a quantile's 4,801 scores). Values beyond int64 raise, as before."""
    return np.ascontiguousarray(np.asarray([int(v) for v in values] if not isinstance(values, np.ndarray)
                                           else values, dtype=np.int64))
#: Largest Gaussian scale whose accuracy OpenDP computes exactly (beyond it, a closed-form bound).
_EXACT_GAUSSIAN_SCALE = 64.0


def _loss(epsilon: float) -> PrivacyLoss:
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise InvalidLoss(f"OpenDP reported an unusable privacy loss {epsilon}")
    return PrivacyLoss(epsilon)


@lru_cache(maxsize=256)
def _laplace(scale: float) -> opendp.mod.Measurement:
    return measurements.make_laplace(_INT_VECTOR, metrics.l1_distance(T="i64"), scale=scale)


@lru_cache(maxsize=256)
def _gaussian(scale: float) -> opendp.mod.Measurement:
    # An f64 L2 distance on integer vectors: sensitivities such as sqrt(k) are exact enough
    # (OpenDP rounds the map up) and the noise stays the exact discrete Gaussian on integers.
    return measurements.make_gaussian(_INT_VECTOR, metrics.l2_distance(T="f64"), scale=scale)


@lru_cache(maxsize=512)
def _noisy_min(scale: float, zcdp: bool = False) -> opendp.mod.Measurement:
    space = _INT_VECTOR, metrics.linf_distance(T="i64", monotonic=False)
    measure = measures.zero_concentrated_divergence() if zcdp else measures.max_divergence()
    return measurements.make_noisy_max(*space, measure, scale=scale, negate=True)


def _rho_loss(rho: float, delta: float) -> PrivacyLoss:
    if not math.isfinite(rho) or rho <= 0:
        raise InvalidLoss(f"OpenDP reported an unusable privacy loss rho={rho}")
    return PrivacyLoss.zcdp(rho, delta)


def _check_scale(scale: float) -> float:
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidLoss(f"noise scale must be finite and positive, got {scale}")
    return float(scale)


@dataclass(frozen=True)
class LaplaceVector:
    """Discrete Laplace noise on a vector of integers with a public L1 sensitivity."""

    sensitivity: int
    scale: float

    @classmethod
    def for_epsilon(cls, sensitivity: int, epsilon: float) -> LaplaceVector:
        """The least-noise mechanism whose OpenDP privacy map stays within ``epsilon``."""
        _check_epsilon(epsilon)
        scale = _fit_scale(lambda s: _laplace(s).map(sensitivity), sensitivity / epsilon, epsilon)
        return cls(sensitivity, scale)

    @classmethod
    def for_accuracy(cls, sensitivity: int, accuracy: float, alpha: float) -> LaplaceVector:
        """The mechanism whose (1 - alpha) error bound per cell is at most ``accuracy``."""
        if not (math.isfinite(accuracy) and accuracy >= 1 and 0 < alpha < 1):
            # Noise on integers cannot promise less than one unit.
            raise InvalidLoss(f"a target accuracy must be at least one unit of the answer, got {accuracy}")
        scale = _check_scale(dp_accuracy.accuracy_to_discrete_laplacian_scale(float(accuracy), float(alpha)))
        # The two conversions round; shrink the scale until the stated accuracy meets the target.
        for _ in range(64):
            if dp_accuracy.discrete_laplacian_scale_to_accuracy(scale, float(alpha)) <= accuracy:
                return cls(sensitivity, scale)
            scale = math.nextafter(scale, 0.0) * (1 - 1e-12)
        raise InvalidLoss(f"could not calibrate noise for accuracy {accuracy}")

    @property
    def loss(self) -> PrivacyLoss:
        return _loss(_laplace(_check_scale(self.scale)).map(self.sensitivity))

    def accuracy(self, alpha: float) -> float:
        """Half-width that the noise exceeds with probability at most ``alpha``."""
        half = float(dp_accuracy.discrete_laplacian_scale_to_accuracy(self.scale, alpha))
        if not math.isfinite(half) or half <= 0:
            # OpenDP gives -inf when the noise is almost surely 0; |noise| >= 1 is then rarer
            # than alpha, so one unit is a true (conservative) half-width.
            tail = 2 * math.exp(-1 / self.scale) / (1 + math.exp(-1 / self.scale))
            if tail > alpha:
                raise InvalidLoss(f"no finite accuracy for scale {self.scale} at alpha {alpha}")
            return 1.0
        return half

    def release(self, values: Sequence[int]) -> list[int]:
        return list(_laplace(_check_scale(self.scale))(_int64s(values)))

    name = "discrete Laplace"


@dataclass(frozen=True)
class GaussianVector:
    """Discrete Gaussian noise on a vector of integers with a public L2 sensitivity (zCDP).

    Its loss is rho from OpenDP's privacy map, stated as (epsilon, delta) at the
    dataset's public ``delta``.
    """

    sensitivity: float
    scale: float
    delta: float

    @classmethod
    def for_rho(cls, sensitivity: float, rho: float, delta: float) -> GaussianVector:
        """The least-noise mechanism whose OpenDP privacy map stays within ``rho``."""
        _check_epsilon(rho)
        scale = _fit_scale(lambda s: _gaussian(s).map(float(sensitivity)), sensitivity / math.sqrt(2 * rho), rho)
        return cls(float(sensitivity), scale, delta)

    @classmethod
    def for_accuracy(cls, sensitivity: float, accuracy: float, alpha: float, delta: float) -> GaussianVector:
        """The mechanism whose (1 - alpha) error bound per cell is at most ``accuracy``."""
        if not (math.isfinite(accuracy) and accuracy >= 1 and 0 < alpha < 1):
            raise InvalidLoss(f"a target accuracy must be at least one unit of the answer, got {accuracy}")
        scale = _check_scale(dp_accuracy.accuracy_to_discrete_gaussian_scale(float(accuracy), float(alpha)))
        for _ in range(64):
            if dp_accuracy.discrete_gaussian_scale_to_accuracy(scale, float(alpha)) <= accuracy:
                return cls(float(sensitivity), scale, delta)
            scale = math.nextafter(scale, 0.0) * (1 - 1e-12)
        raise InvalidLoss(f"could not calibrate noise for accuracy {accuracy}")

    @property
    def loss(self) -> PrivacyLoss:
        return _rho_loss(_gaussian(_check_scale(self.scale)).map(self.sensitivity), self.delta)

    def accuracy(self, alpha: float) -> float:
        """Half-width that the noise exceeds with probability at most ``alpha``.

        OpenDP's exact figure sums the distribution, slow at large scales (sums of fine
        resolution have scales of 10^9). There the Gaussian quantile is used: for integers
        ``t >= 0``, ``P(X > t) = sum_{k > t} e^{-k^2/2s^2} / Z <= Q(t/s)``, since the sum is at
        most the integral from ``t`` and ``Z >= s sqrt(2 pi)`` (Poisson summation), so
        ``ceil(s * z_{1 - alpha/2})`` is a true half-width (the noise is an integer).
        """
        if self.scale > _EXACT_GAUSSIAN_SCALE:
            return float(math.ceil(self.scale * NormalDist().inv_cdf(1 - alpha / 2)))
        half = float(dp_accuracy.discrete_gaussian_scale_to_accuracy(self.scale, alpha))
        if not math.isfinite(half) or half <= 0:
            return 1.0 if self.scale < 0.2 else float("inf")
        return half

    def release(self, values: Sequence[int]) -> list[int]:
        return list(_gaussian(_check_scale(self.scale))(_int64s(values)))

    name = "discrete Gaussian"


@dataclass(frozen=True)
class NoisyMin:
    """Private selection of the lowest integer score (exponential mechanism, permute-and-flip).

    ``sensitivity`` bounds how much one person can move any single score (L-infinity).
    With ``delta`` set it is accounted in zCDP (OpenDP's zCDP map of the same selection,
    stated at that delta); otherwise in pure epsilon.
    """

    sensitivity: int
    scale: float
    delta: float | None = None

    @classmethod
    def for_epsilon(cls, sensitivity: int, epsilon: float) -> NoisyMin:
        _check_epsilon(epsilon)
        start = 2 * sensitivity / epsilon
        scale = _fit_scale(lambda s: _noisy_min(s).map(sensitivity), start, epsilon)
        return cls(sensitivity, scale)

    @classmethod
    def for_rho(cls, sensitivity: int, rho: float, delta: float) -> NoisyMin:
        """The least-noise selection whose zCDP map stays within ``rho``."""
        _check_epsilon(rho)
        start = sensitivity / math.sqrt(2 * rho)  # rho = (2 * sensitivity / scale)^2 / 8
        scale = _fit_scale(lambda s: _noisy_min(s, True).map(sensitivity), start, rho)
        return cls(sensitivity, scale, delta)

    @property
    def loss(self) -> PrivacyLoss:
        if self.delta is not None:
            return _rho_loss(_noisy_min(_check_scale(self.scale), True).map(self.sensitivity), self.delta)
        return _loss(_noisy_min(_check_scale(self.scale)).map(self.sensitivity))

    def score_error(self, candidates: int, alpha: float) -> float:
        """Excess score of the selected candidate over the best, at confidence 1 - alpha.

        The exponential mechanism selects, with probability at least 1 - alpha, a
        candidate whose score is within ``scale * ln(candidates / alpha)`` of the best.
        """
        return self.scale * math.log(max(candidates, 1) / alpha)

    def release(self, scores: Sequence[int]) -> int:
        if len(scores) == 0:
            raise InvalidLoss("selection needs at least one candidate")
        # The same sampler either way: zCDP only changes how its loss is read.
        return int(_noisy_min(_check_scale(self.scale), self.delta is not None)(_int64s(scores)))

    name = "exponential mechanism (permute-and-flip)"


def _check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon <= 0:
        raise InvalidLoss(f"epsilon must be finite and positive, got {epsilon!r}")


def _fit_scale(epsilon_of, start: float, epsilon: float) -> float:
    """Smallest scale near ``start`` whose privacy map is at most ``epsilon`` (or rho)."""
    scale = _check_scale(start)
    # OpenDP rounds its map conservatively; nudge the scale up until it fits.
    for _ in range(64):
        if epsilon_of(scale) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise InvalidLoss(f"could not calibrate noise for epsilon {epsilon}")
