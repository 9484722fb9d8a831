"""Privacy losses as exact, immutable values, and their composition.

civicdp uses pure differential privacy (delta = 0, Laplace and exponential
mechanisms), so losses compose by adding epsilons (basic composition). A loss is
kept as a :class:`fractions.Fraction` so that 0.1 + 0.1 + 0.1 == 0.3 holds exactly;
converting from the float that OpenDP's privacy map returns is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

from privacy.errors import InvalidLoss

#: Ledger unit: losses are charged in whole micro-epsilons, rounded up.
MICRO = 1_000_000


def _exact(value: object, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction, str)):
        raise InvalidLoss(f"{name} must be a number, got {type(value).__name__}", value=value)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLoss(f"{name} must be finite, got {value}", value=value)
    try:
        # A float is read as the decimal it prints as (its shortest repr), so the loss
        # a person typed as 0.1 is exactly 1/10 and 0.1 + 0.1 + 0.1 == 0.3.
        exact = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, ZeroDivisionError) as exc:
        raise InvalidLoss(f"{name} must be a number, got {value!r}", value=value) from exc
    return exact


@dataclass(frozen=True, order=True)
class PrivacyLoss:
    """An (epsilon, delta) privacy loss; pure DP when delta is 0."""

    epsilon: Fraction
    delta: Fraction = Fraction(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _exact(self.epsilon, "epsilon"))
        object.__setattr__(self, "delta", _exact(self.delta, "delta"))
        if self.epsilon < 0:
            raise InvalidLoss(f"epsilon must not be negative, got {float(self.epsilon)}", value=self.epsilon)
        if not 0 <= self.delta < 1:
            raise InvalidLoss(f"delta must be in [0, 1), got {float(self.delta)}", value=self.delta)

    @classmethod
    def zero(cls) -> PrivacyLoss:
        return cls(Fraction(0))

    @classmethod
    def of(cls, epsilon: object, *, maximum: float | None = None) -> PrivacyLoss:
        """A strictly positive, finite loss, refused with a clear reason otherwise."""
        exact = _exact(epsilon, "epsilon")
        if exact <= 0:
            raise InvalidLoss(f"epsilon must be greater than 0, got {float(exact)}", value=epsilon)
        if maximum is not None and exact > Fraction(maximum):
            raise InvalidLoss(
                f"epsilon {float(exact)} is above the configured maximum {maximum} per query",
                value=epsilon,
            )
        return cls(exact)

    def __add__(self, other: PrivacyLoss) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon + other.epsilon, self.delta + other.delta)

    def scaled(self, factor: Fraction | int) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon * factor, self.delta * factor)

    @property
    def micro_epsilon(self) -> int:
        """Epsilon in whole micro-units, rounded up so a charge never under-counts."""
        return math.ceil(self.epsilon * MICRO)

    def as_dict(self) -> dict[str, float]:
        """Display form: 10 significant digits, so 0.39999999999964 shows as 0.4."""
        return {"epsilon": float(f"{float(self.epsilon):.10g}"), "delta": float(f"{float(self.delta):.10g}")}

    def __str__(self) -> str:
        if self.delta:
            return f"(epsilon={float(self.epsilon):.6g}, delta={float(self.delta):.3g})"
        return f"epsilon={float(self.epsilon):.6g}"


def compose(losses: Iterable[PrivacyLoss]) -> PrivacyLoss:
    """Basic sequential composition of pure-DP losses."""
    total = PrivacyLoss.zero()
    for loss in losses:
        total = total + loss
    return total
