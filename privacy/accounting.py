"""How a dataset accounts for privacy loss: pure epsilon (Laplace) or zCDP (Gaussian).

The data steward chooses per dataset (``accounting`` in its metadata). Analysts always
ask in epsilon; what differs is what that epsilon buys and how answers compose:

- ``pure``: a query of epsilon is epsilon-DP; its parts split epsilon; the ledger adds
  epsilons (basic composition). Laplace noise. The default.
- ``zcdp``: a query of epsilon is the largest rho whose (epsilon, delta)-DP statement at
  the dataset's public delta is within epsilon (OpenDP's zCDP-to-approximate-DP
  conversion); its parts split rho; the ledger adds rho, so k answers cost about
  sqrt(k) times one in epsilon terms, not k times. Gaussian noise (discrete, exact);
  selections are the same exponential mechanism, read through OpenDP's zCDP map.

:class:`Accounting` is the one place that turns a share of the budget into a
mechanism, so kinds and analyses never choose the noise family themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Union

from civicdp.privacy.errors import InvalidLoss
from civicdp.privacy.loss import MICRO, NANO, PrivacyLoss
from civicdp.privacy.conversion import epsilon_of_rho
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector, NoisyMin

Mode = Literal["pure", "zcdp"]
Additive = Union[LaplaceVector, GaussianVector]
#: Largest delta a zCDP dataset may declare (GOVERNANCE.md: delta <= 1e-7 where Gaussian noise is used).
MAX_DELTA = 1e-7


@lru_cache(maxsize=4096)
@lru_cache(maxsize=4096)
def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho whose (epsilon, delta)-DP statement at ``delta`` is within ``epsilon``."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidLoss(f"epsilon must be finite and positive, got {epsilon!r}")
    low, high = 0.0, epsilon  # epsilon(rho) >= rho, so rho <= epsilon
    for _ in range(80):
        middle = (low + high) / 2
        if middle > 0 and epsilon_of_rho(middle, delta) <= epsilon:
            low = middle
        else:
            high = middle
    if low <= 0:
        raise InvalidLoss(f"epsilon {epsilon} is too small for any zCDP loss at delta {delta}")
    return low


@dataclass(frozen=True)
class Accounting:
    """A dataset's accounting: ``mode`` and, for zCDP, its public ``delta``."""

    mode: Mode = "pure"
    delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode == "zcdp" and not (0 < self.delta <= MAX_DELTA):
            raise InvalidLoss(f"a zCDP dataset needs a public delta in (0, {MAX_DELTA:g}], got {self.delta}")
        if self.mode == "pure" and self.delta:
            raise InvalidLoss("a pure-DP dataset has delta 0")

    @property
    def zcdp(self) -> bool:
        return self.mode == "zcdp"

    @property
    def unit(self) -> str:
        """What budgets of the dataset count: ``epsilon`` or ``rho``."""
        return "rho" if self.zcdp else "epsilon"

    def budget(self, epsilon: float) -> float:
        """What an analyst's ``epsilon`` buys, in the unit parts split: epsilon, or rho."""
        return rho_for_epsilon(float(epsilon), self.delta) if self.zcdp else float(epsilon)

    def cap_amount(self, epsilon: float) -> float:
        """A cap stated in epsilon, in the dataset's unit (zCDP: the rho whose epsilon at delta fits)."""
        return self.budget(epsilon)

    def loss_of(self, amount: float) -> PrivacyLoss:
        """A budget amount (epsilon or rho) as a loss."""
        return PrivacyLoss.zcdp(amount, self.delta) if self.zcdp else PrivacyLoss.of(amount)

    def additive(self, sensitivity: int, budget: float, l2_sensitivity: float | None = None) -> Additive:
        """Noise for an integer vector with L1 ``sensitivity`` (and, if smaller, L2 one), spending ``budget``."""
        if self.zcdp:
            l2 = float(sensitivity if l2_sensitivity is None else min(l2_sensitivity, sensitivity))
            return GaussianVector.for_rho(l2, budget, self.delta)
        return LaplaceVector.for_epsilon(sensitivity, budget)

    def additive_for_accuracy(self, sensitivity: int, accuracy: float, alpha: float,
                              l2_sensitivity: float | None = None) -> Additive:
        """Noise whose (1 - alpha) error bound per cell is at most ``accuracy``."""
        if self.zcdp:
            l2 = float(sensitivity if l2_sensitivity is None else min(l2_sensitivity, sensitivity))
            return GaussianVector.for_accuracy(l2, accuracy, alpha, self.delta)
        return LaplaceVector.for_accuracy(sensitivity, accuracy, alpha)

    def selection(self, sensitivity: int, budget: float) -> NoisyMin:
        """A private choice of the lowest score (L-infinity ``sensitivity``), spending ``budget``."""
        if self.zcdp:
            return NoisyMin.for_rho(sensitivity, budget, self.delta)
        return NoisyMin.for_epsilon(sensitivity, budget)

    def charge_of(self, loss: PrivacyLoss) -> int:
        """The ledger amount of ``loss`` in this dataset's unit, rounded up.

        A pure epsilon-DP loss on a zCDP dataset is charged as (epsilon^2 / 2)-zCDP (it is
        that); a zCDP loss cannot be charged to a pure dataset (it has no pure epsilon).
        """
        if self.zcdp:
            return math.ceil(loss.as_rho() * NANO)
        if loss.is_zcdp:
            raise InvalidLoss("a zCDP loss cannot be charged to a pure-DP dataset")
        return loss.micro_epsilon

    def cap_of(self, cap_micro_epsilon: int) -> int:
        """A cap set in micro-epsilon, in the ledger unit: nano-rho of the largest rho within it (zCDP)."""
        if not self.zcdp or cap_micro_epsilon <= 0:
            return cap_micro_epsilon
        return math.floor(rho_for_epsilon(cap_micro_epsilon / MICRO, self.delta) * NANO)

    def shown(self, amount: int) -> dict[str, float]:
        """A ledger amount for people: epsilon (pure); rho and its epsilon at delta (zCDP)."""
        if not self.zcdp:
            return {"epsilon": amount / MICRO}
        rho = amount / NANO
        return {"rho": rho, "epsilon": epsilon_of_rho(rho, self.delta) if rho > 0 else 0.0}

    def amount(self, loss: PrivacyLoss) -> float:
        """A loss in the dataset's unit (a pure loss in a zCDP dataset counts as epsilon^2 / 2)."""
        return float(loss.as_rho()) if self.zcdp else float(loss.epsilon)

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "delta": self.delta, "unit": self.unit}


PURE = Accounting()
