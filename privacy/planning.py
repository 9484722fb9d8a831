"""Allocation of one privacy budget over the parts of a workload: the math, no queries.

A part's half-width shrinks as a power of its budget: ``h ∝ b^(-p)`` with ``p = 1`` under
pure DP (Laplace: ``epsilon ∝ 1 / h``) and ``p = 1/2`` under zCDP (Gaussian: ``rho ∝ 1 / h²``),
and budgets add in the dataset's unit under both accountings. Hence:

- a target per part has one cheapest budget, and the cheapest workload meeting every
  target is the sum of those (separable); what a planner saves comes from sharing
  mechanisms between parts and from splitting *within* a part well;
- a part whose error is ``sum_j a_j / b_j^p`` over several mechanisms (a mean: its sum
  and its count) is cheapest with ``b_j ∝ a_j^(1 / (1 + p))`` (Lagrange), not evenly;
- when targets need ``R`` and only ``A < R`` is left, scaling every half-width by
  ``(R / A)^p`` fits exactly (the best uniform accuracy reachable), and loosening one
  part ``i`` alone fits iff its budget ``b_i > R - A``, by ``(b_i / (b_i - (R - A)))^p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def accuracy_exponent(zcdp: bool) -> float:
    """``p`` in ``h ∝ budget^(-p)``: 1/2 under zCDP (Gaussian), 1 under pure DP (Laplace)."""
    return 0.5 if zcdp else 1.0


def relative_cost(half_width: float, sensitivity: float, exponent: float) -> float:
    """Budget (up to a constant) for ``half_width`` at ``sensitivity``: ``(sensitivity / half_width)^(1/p)``."""
    if not (half_width > 0 and sensitivity > 0):
        raise ValueError("half-width and sensitivity must be positive")
    return (sensitivity / half_width) ** (1 / exponent)


def optimal_shares(coefficients: Sequence[float], exponent: float) -> list[float]:
    """Shares of one budget minimising ``sum_j a_j / b_j^p`` (they sum to 1): ``b_j ∝ a_j^(1/(1+p))``."""
    if not coefficients or any(a <= 0 for a in coefficients):
        raise ValueError("coefficients must be positive")
    weights = [a ** (1 / (1 + exponent)) for a in coefficients]
    total = sum(weights)
    return [w / total for w in weights]


def weighted_shares(weights: Sequence[float]) -> list[float]:
    """Shares proportional to positive ``weights``."""
    if not weights or any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError("weights must be finite and positive")
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class Relaxation:
    """How targets needing ``required`` can fit in ``available`` (both in the dataset's unit)."""

    required: float
    available: float
    uniform_factor: float  # every half-width times this fits exactly
    single: tuple[tuple[int, float], ...]  # (part index, factor): loosening that part alone fits; cheapest first

    @property
    def fits(self) -> bool:
        return self.required <= self.available


def relax(budgets: Sequence[float], available: float, exponent: float) -> Relaxation:
    """What to loosen when the parts' ``budgets`` exceed ``available`` (see the module text)."""
    required = float(sum(budgets))
    if required <= available:
        return Relaxation(required, available, 1.0, ())
    if available <= 0:
        return Relaxation(required, available, math.inf, ())
    excess = required - available
    single = sorted(((i, (b / (b - excess)) ** exponent) for i, b in enumerate(budgets) if b > excess),
                    key=lambda item: item[1])
    return Relaxation(required, available, (required / available) ** exponent, tuple(single))


def even_split_total(budgets: Sequence[float]) -> float:
    """What an even split needs to meet every target: each part as much as the most demanding one."""
    return len(budgets) * max(budgets) if budgets else 0.0


def worst_factor_at(budgets: Sequence[float], given: Sequence[float], exponent: float) -> float:
    """The worst ratio achieved / target half-width when part i gets ``given[i]`` instead of ``budgets[i]``."""
    return max((b / g) ** exponent for b, g in zip(budgets, given))
