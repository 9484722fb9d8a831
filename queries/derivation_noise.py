"""The noise of a derived answer's cells: a stored release's mechanism, and half-widths of sums of its noise.

Released noise is independent per cell, so a sum of ``k`` cells carries ``k`` independent
noises of the release's family and scale. Half-widths are memoised by (noise, scale, cells,
alpha): a question has few distinct sizes of sums, and every candidate release of one scale
shares them, so judging a release costs a few bounds however many cells it has.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from civicdp.privacy import accuracy
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector

NOISES = {"discrete Laplace": "laplace", "discrete Gaussian": "gaussian"}
#: Sums of more cells use the closed-form Chernoff bound (sound, somewhat wider) rather than the computed tail.
COMPUTED_CELLS = 200
Mechanism = LaplaceVector | GaussianVector


def mechanism_of(body: dict[str, Any], role: str, delta: float) -> Mechanism | None:
    """A release's one noise mechanism, rebuilt from its public description (None if not a plain one)."""
    rows = body.get("mechanisms") or []
    if len(rows) != 1 or rows[0].get("role") != role or rows[0].get("mechanism") not in NOISES:
        return None
    row = rows[0]
    if row["mechanism"] == LaplaceVector.name:
        return LaplaceVector(int(row["sensitivity"]), float(row["scale"]))
    return GaussianVector(float(row["sensitivity"]), float(row["scale"]), delta)


def half_width(mechanism: Mechanism, cells: int, alpha: float) -> float:
    """Half-width that the sum of ``cells`` independent noises exceeds with probability at most ``alpha``."""
    if cells == 0:
        return 0.0
    if cells == 1:
        return _single(mechanism, alpha)
    return _sum(NOISES[mechanism.name], mechanism.scale, cells, alpha)


def _single(mechanism: Mechanism, alpha: float) -> float:
    """The mechanism's own half-width (it depends on the family and scale alone)."""
    return _single_of(mechanism.name, mechanism.scale, alpha)


@lru_cache(maxsize=4096)
def _single_of(name: str, scale: float, alpha: float) -> float:
    mechanism = LaplaceVector(1, scale) if name == LaplaceVector.name else GaussianVector(1.0, scale, 0.0)
    return float(mechanism.accuracy(alpha))


@lru_cache(maxsize=4096)
def _sum(noise: str, scale: float, cells: int, alpha: float) -> float:
    # The computed tail falls back to the Chernoff bound by itself where computing would need too much memory.
    bound = accuracy.sum_tail_threshold if cells <= COMPUTED_CELLS else accuracy.chernoff_threshold
    # P(S >= t) <= alpha/2 per side, the noise symmetric: |S| <= t - 1 with probability >= 1 - alpha.
    return float(bound(noise, scale, (1, 1), (cells, 0), alpha / 2) - 1)


def interval_text(mechanism: Mechanism, cells: int) -> str:
    noise = f"{mechanism.name} noise of scale {mechanism.scale:g} per cell, independent"
    if cells <= 1:
        return f"the release's own half-width ({noise})"
    return f"a tail bound of a sum of up to {cells} independent noises ({noise}), alpha/2 per side"
