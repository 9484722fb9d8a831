"""OpenDP mechanisms: the only place in civicdp that draws privacy noise.

Each mechanism is built from a public sensitivity (derived from declared bounds and
the contribution bound, never from the data) and a noise scale. Its privacy loss is
read from OpenDP's privacy map before anything is released, so a plan knows its
cost before it touches data. All noise is added to integers (discrete Laplace, and
permute-and-flip/exponential selection on integer scores), which keeps OpenDP's
samplers exact and avoids floating-point attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import opendp.accuracy as dp_accuracy
import opendp.domains as domains
import opendp.measurements as measurements
import opendp.measures as measures
import opendp.metrics as metrics
import opendp.mod
# Not opendp.prelude: it imports scikit-learn, seconds of start-up for every command.

from privacy.errors import InvalidLoss
from privacy.loss import PrivacyLoss

#: OpenDP features that would weaken the guarantees civicdp states.
UNSAFE_FEATURES = frozenset({"floating-point", "honest-but-curious"})


def ensure_safe_features() -> None:
    """Enable OpenDP's "contrib" feature and refuse to run with weakening ones."""
    unsafe = UNSAFE_FEATURES & set(opendp.mod.GLOBAL_FEATURES)
    if unsafe:
        raise RuntimeError(
            f"OpenDP features {sorted(unsafe)} are enabled; civicdp refuses to run with them "
            "because they weaken the differential privacy guarantee. Disable them."
        )
    opendp.mod.enable_features("contrib")


ensure_safe_features()

_INT_VECTOR = domains.vector_domain(domains.atom_domain(T="i64"))


def _loss(epsilon: float) -> PrivacyLoss:
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise InvalidLoss(f"OpenDP reported an unusable privacy loss {epsilon}")
    return PrivacyLoss(epsilon)


@lru_cache(maxsize=256)
def _laplace(scale: float) -> opendp.mod.Measurement:
    return measurements.make_laplace(_INT_VECTOR, metrics.l1_distance(T="i64"), scale=scale)


@lru_cache(maxsize=256)
def _noisy_min(scale: float) -> opendp.mod.Measurement:
    space = _INT_VECTOR, metrics.linf_distance(T="i64", monotonic=False)
    return measurements.make_noisy_max(*space, measures.max_divergence(), scale=scale, negate=True)


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
        return list(_laplace(_check_scale(self.scale))([int(v) for v in values]))

    name = "discrete Laplace"


@dataclass(frozen=True)
class NoisyMin:
    """Private selection of the lowest integer score (exponential mechanism, permute-and-flip).

    ``sensitivity`` bounds how much one person can move any single score (L-infinity).
    """

    sensitivity: int
    scale: float

    @classmethod
    def for_epsilon(cls, sensitivity: int, epsilon: float) -> NoisyMin:
        _check_epsilon(epsilon)
        start = 2 * sensitivity / epsilon
        scale = _fit_scale(lambda s: _noisy_min(s).map(sensitivity), start, epsilon)
        return cls(sensitivity, scale)

    @property
    def loss(self) -> PrivacyLoss:
        return _loss(_noisy_min(_check_scale(self.scale)).map(self.sensitivity))

    def score_error(self, candidates: int, alpha: float) -> float:
        """Excess score of the selected candidate over the best, at confidence 1 - alpha.

        The exponential mechanism selects, with probability at least 1 - alpha, a
        candidate whose score is within ``scale * ln(candidates / alpha)`` of the best.
        """
        return self.scale * math.log(max(candidates, 1) / alpha)

    def release(self, scores: Sequence[int]) -> int:
        if not scores:
            raise InvalidLoss("selection needs at least one candidate")
        return int(_noisy_min(_check_scale(self.scale))([int(s) for s in scores]))

    name = "exponential mechanism (permute-and-flip)"


def _check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon <= 0:
        raise InvalidLoss(f"epsilon must be finite and positive, got {epsilon!r}")


def _fit_scale(epsilon_of, start: float, epsilon: float) -> float:
    """Smallest scale near ``start`` whose privacy map is at most ``epsilon``."""
    scale = _check_scale(start)
    # OpenDP rounds its map conservatively; nudge the scale up until it fits.
    for _ in range(64):
        if epsilon_of(scale) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise InvalidLoss(f"could not calibrate noise for epsilon {epsilon}")
