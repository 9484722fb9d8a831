"""Privacy losses as exact, immutable values, and their composition.

Two accountings, chosen per dataset (:mod:`civicdp.privacy.accounting`):

- **pure** differential privacy (delta = 0, Laplace and exponential mechanisms): losses
  compose by adding epsilons (basic composition), and the ledger counts micro-epsilon;
- **zCDP** (Gaussian noise, exponential selections read as zCDP): losses compose by
  adding rho, and the ledger counts nano-rho; ``epsilon`` and ``delta`` then state the
  same loss as (epsilon, delta)-DP at the dataset's public delta, via OpenDP's
  conversion, for display and for per-query caps.

Amounts are kept as :class:`fractions.Fraction` so that 0.1 + 0.1 + 0.1 == 0.3 holds
exactly; converting from the float that OpenDP's privacy map returns is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

from civicdp.privacy.conversion import epsilon_of_rho
from civicdp.privacy.errors import InvalidLoss

#: Ledger unit of pure-DP datasets: losses are charged in whole micro-epsilons, rounded up.
MICRO = 1_000_000
#: Ledger unit of zCDP datasets: whole nano-rho, rounded up (rho is small: epsilon 1 at
#: delta 1e-7 is rho 0.0152, so micro-rho would round a typical query's charge by ~1%).
NANO = 1_000_000_000


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
    """An (epsilon, delta) privacy loss; pure DP when delta is 0 and ``rho`` is None.

    A zCDP loss has ``rho`` set: that is what composes and what the ledger charges;
    ``epsilon`` and ``delta`` are the same loss stated as (epsilon, delta)-DP at the
    dataset's public delta (rounded up), never added themselves.
    """

    epsilon: Fraction
    delta: Fraction = Fraction(0)
    rho: Fraction | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _exact(self.epsilon, "epsilon"))
        object.__setattr__(self, "delta", _exact(self.delta, "delta"))
        if self.epsilon < 0:
            raise InvalidLoss(f"epsilon must not be negative, got {float(self.epsilon)}", value=self.epsilon)
        if not 0 <= self.delta < 1:
            raise InvalidLoss(f"delta must be in [0, 1), got {float(self.delta)}", value=self.delta)
        if self.rho is not None:
            object.__setattr__(self, "rho", _exact(self.rho, "rho"))
            if self.rho < 0:  # type: ignore[operator]
                raise InvalidLoss(f"rho must not be negative, got {float(self.rho)}", value=self.rho)

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

    @classmethod
    def zcdp(cls, rho: object, delta: float) -> PrivacyLoss:
        """A rho-zCDP loss, stated as (epsilon, delta)-DP at ``delta`` (OpenDP's conversion)."""
        exact = _exact(rho, "rho")
        if exact < 0:
            raise InvalidLoss(f"rho must not be negative, got {float(exact)}", value=rho)
        epsilon = epsilon_of_rho(float(exact), delta) if exact > 0 else 0.0
        return cls(Fraction(repr(epsilon)), Fraction(repr(delta)) if exact > 0 else Fraction(0), exact)

    @property
    def is_zcdp(self) -> bool:
        return self.rho is not None

    def as_rho(self) -> Fraction:
        """The loss as rho: itself for zCDP; a pure epsilon-DP loss is (epsilon^2 / 2)-zCDP."""
        if self.rho is not None:
            return self.rho
        if self.delta:
            raise InvalidLoss("an (epsilon, delta) loss with delta > 0 has no rho")
        return self.epsilon * self.epsilon / 2

    def __add__(self, other: PrivacyLoss) -> PrivacyLoss:
        if self.rho is None and other.rho is None:
            return PrivacyLoss(self.epsilon + other.epsilon, self.delta + other.delta)
        # Any zCDP part makes the sum zCDP: rho adds (pure parts count as epsilon^2 / 2).
        delta = max(self.delta, other.delta)
        if not delta:
            raise InvalidLoss("a zCDP loss needs the dataset's delta to be stated")
        return PrivacyLoss.zcdp(self.as_rho() + other.as_rho(), float(delta))

    def scaled(self, factor: Fraction | int) -> PrivacyLoss:
        if self.rho is not None:
            return PrivacyLoss.zcdp(self.rho * factor, float(self.delta))
        return PrivacyLoss(self.epsilon * factor, self.delta * factor)

    @property
    def micro_epsilon(self) -> int:
        """Epsilon in whole micro-units, rounded up so a charge never under-counts."""
        return math.ceil(self.epsilon * MICRO)

    @property
    def ledger_amount(self) -> int:
        """What the ledger charges, rounded up: micro-epsilon (pure) or nano-rho (zCDP)."""
        if self.rho is not None:
            return math.ceil(self.rho * NANO)
        return self.micro_epsilon

    def as_dict(self) -> dict[str, float]:
        """Display form: 10 significant digits, so 0.39999999999964 shows as 0.4."""
        shown = {"epsilon": float(f"{float(self.epsilon):.10g}"), "delta": float(f"{float(self.delta):.10g}")}
        if self.rho is not None:
            shown["rho"] = float(f"{float(self.rho):.10g}")
        return shown

    def __str__(self) -> str:
        if self.rho is not None:
            return f"rho={float(self.rho):.6g} (epsilon={float(self.epsilon):.6g} at delta={float(self.delta):.3g})"
        if self.delta:
            return f"(epsilon={float(self.epsilon):.6g}, delta={float(self.delta):.3g})"
        return f"epsilon={float(self.epsilon):.6g}"


def compose(losses: Iterable[PrivacyLoss]) -> PrivacyLoss:
    """Sequential composition: epsilons add (pure), or rho adds (zCDP)."""
    total = PrivacyLoss.zero()
    for loss in losses:
        total = total + loss
    return total
