"""Continual release by the binary-tree mechanism: a fixed total loss for a whole horizon.

A monitor releases a vector (one entry per group, or two per group for a share) at every
time step ``t = 0 .. T - 1`` of its horizon. The tree mechanism (Dwork et al. 2010, Chan
et al. 2011) keeps one noisy vector per dyadic interval of steps: level ``l`` has nodes
covering steps ``[j * 2**l, (j + 1) * 2**l)``. A node is released once, when its last step
is complete. A step's own value is its leaf; the running total up to step ``t`` is the sum
of at most ``levels`` nodes (the dyadic decomposition of ``[0, t]``).

Privacy: each person has at most ``L`` kept rows over the **whole horizon** (the server
keeps a per-person count across batches); a row lies in exactly one step, hence in one
node per level, and moves one entry of that node by at most ``unit``. So the vector of
all nodes of the horizon has L1 sensitivity ``levels * L * unit``, and discrete Laplace
noise calibrated to it gives the stated epsilon for the entire horizon, however the
stream arrives. The loss is charged once, when the monitor is defined.

Accuracy: a leaf is within ``half(alpha)`` of its exact value; a running total adds at
most ``k <= levels`` independent node noises, within ``k * half(alpha / k)`` (union
bound). Both grow with ``log T``, not with ``T`` (splitting the loss over the steps
would make each step's noise grow linearly with ``T``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from civicdp.privacy.errors import InvalidLoss
from civicdp.privacy.loss import PrivacyLoss
from civicdp.privacy.mechanisms import LaplaceVector

#: Longest horizon a monitor may declare (2**20 steps: two years of minutes).
MAX_HORIZON = 1 << 20


@dataclass(frozen=True)
class Node:
    """A dyadic interval of steps: level ``level``, index ``index``."""

    level: int
    index: int

    @property
    def first(self) -> int:
        return self.index << self.level

    @property
    def last(self) -> int:
        return ((self.index + 1) << self.level) - 1


def levels_for(horizon: int) -> int:
    """Number of tree levels that cover ``horizon`` steps (leaves included)."""
    if not isinstance(horizon, int) or isinstance(horizon, bool) or not 1 <= horizon <= MAX_HORIZON:
        raise InvalidLoss(f"a horizon must be a whole number of steps between 1 and {MAX_HORIZON}, got {horizon!r}")
    return max(1, math.ceil(math.log2(horizon))) + 1 if horizon > 1 else 1


@dataclass(frozen=True)
class TreeCounter:
    """The binary-tree mechanism for ``horizon`` steps at a total ``epsilon``.

    ``contributions`` bounds a person's rows over the whole horizon; ``unit`` bounds how
    much one row moves one entry of a step's vector (1 for counts, the quantised bound
    for sums).
    """

    horizon: int
    contributions: int
    unit: int
    mechanism: LaplaceVector

    @classmethod
    def for_epsilon(cls, horizon: int, contributions: int, epsilon: float, unit: int = 1) -> TreeCounter:
        if contributions < 1 or unit < 1:
            raise InvalidLoss("contributions and unit must be at least 1")
        levels = levels_for(horizon)
        return cls(horizon, contributions, unit,
                   LaplaceVector.for_epsilon(levels * contributions * unit, epsilon))

    @classmethod
    def restore(cls, horizon: int, contributions: int, unit: int, sensitivity: int, scale: float) -> TreeCounter:
        """The tree of a stored calibration, with its stored noise scale (nothing refitted).

        Refuses a calibration whose sensitivity is not ``levels * contributions * unit``: a
        tree is only as private as the bound its noise was calibrated for.
        """
        if contributions < 1 or unit < 1 or sensitivity != levels_for(horizon) * contributions * unit:
            raise InvalidLoss(f"a stored tree's sensitivity {sensitivity} does not match {levels_for(horizon)} "
                              f"levels x {contributions} contributions x unit {unit}")
        return cls(horizon, contributions, unit, LaplaceVector(sensitivity, float(scale)))

    def as_dict(self) -> dict[str, int | float]:
        """What :meth:`restore` needs (public: derived from metadata and the definition)."""
        return {"horizon": self.horizon, "contributions": self.contributions, "unit": self.unit,
                "sensitivity": self.mechanism.sensitivity, "scale": self.mechanism.scale}

    @property
    def levels(self) -> int:
        return levels_for(self.horizon)

    @property
    def loss(self) -> PrivacyLoss:
        """The loss of the whole horizon (every node of the tree)."""
        return self.mechanism.loss

    def completed_by(self, step: int) -> list[Node]:
        """Nodes whose last step is ``step``: released as soon as ``step`` is complete."""
        self._check(step)
        return [Node(level, (step + 1 >> level) - 1) for level in range(self.levels)
                if (step + 1) % (1 << level) == 0]

    def prefix(self, step: int) -> list[Node]:
        """The dyadic decomposition of steps ``[0, step]``: at most ``levels`` completed nodes."""
        self._check(step)
        nodes, start, remaining = [], 0, step + 1
        for level in reversed(range(self.levels)):
            size = 1 << level
            if remaining >= size:
                nodes.append(Node(level, start >> level))
                start += size
                remaining -= size
        return nodes

    def release(self, exact: Sequence[int]) -> list[int]:
        """One node's noisy vector (draws the noise through :mod:`civicdp.privacy.mechanisms`)."""
        return self.mechanism.release(exact)

    def leaf_half_width(self, alpha: float) -> float:
        return self.mechanism.accuracy(alpha)

    def prefix_half_width(self, step: int, alpha: float) -> float:
        """Half-width of a running total up to ``step`` (union bound over its nodes)."""
        k = len(self.prefix(step))
        return k * self.mechanism.accuracy(alpha / k)

    def _check(self, step: int) -> None:
        if not 0 <= step < self.horizon:
            raise InvalidLoss(f"step {step} is outside the horizon of {self.horizon} steps")
