"""What lagged points asks, and one level of its answer (services, or steps), planned without data.

:class:`LaggedSpec` is the request (see :mod:`civicdp.queries.analyses.lagged`); a
:class:`LevelPlan` holds one level's public cells with their thresholds, the bounded read
it makes and its mechanism, and the noise bounds its intervals and flags use (public
numbers only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field

from civicdp.privacy.accounting import Additive
from civicdp.queries.analyses.base import AnalysisSpec
from civicdp.queries.analyses.ratio_intervals import is_gaussian, noise_margin, segment_margins, share_grid
from civicdp.queries.analyses.service_common import Period
from civicdp.queries.context import QueryContext

DEFAULT_FACTOR = {"median": 1.5, "share_late": 1.0}
CELL = "__lag_cell"  # a cell's position in its level (the order of the counts)


class LaggedSpec(AnalysisSpec):
    """``{"analysis": "lagged_points", "epsilon": 1, ...}``: see the module docstring."""

    analysis: Literal["lagged_points"] = "lagged_points"
    level: Literal["services", "steps", "both"] = "both"
    statistic: Literal["median", "share_late"] = "median"
    target_factor: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    max_share: float = Field(default=0.75, gt=0, lt=1)
    period: Period | None = None
    contributions: int | None = None
    step_contributions: int | None = None
    service: str = "service_id"
    duration: str = "duration_hours"
    time: str = "request_time"
    steps_table: str = "steps"
    step: str = "step"
    step_end: str = "ended"
    step_start: str | None = "started"
    step_target_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @property
    def factor(self) -> float:
        return self.target_factor if self.target_factor is not None else DEFAULT_FACTOR[self.statistic]

    @property
    def share_threshold(self) -> float:
        return 0.5 if self.statistic == "median" else self.max_share


@dataclass(frozen=True)
class LevelPlan:
    """One level (services or steps): its cells, their public thresholds, rows and mechanism."""

    name: str
    cells: pl.DataFrame  # [service, (step), target_hours, threshold_hours, __lag_cell]
    rows: QueryContext  # table, period filters and contribution bound of the bounded read
    mechanism: Additive
    cell_alpha: float  # error level of each cell: the family's alpha over every cell of the answer

    @property
    def n_cells(self) -> int:
        return self.cells.height

    @cached_property
    def share_margins(self) -> np.ndarray:
        """Noise bound of the share test on each segment of the share grid (public numbers only)."""
        _, w1, w2 = share_grid()
        scale = self.mechanism.scale
        return segment_margins(w1, w2, scale, scale, self.cell_alpha, is_gaussian(self.mechanism))

    @cached_property
    def cases_margin(self) -> float:
        """Bound on the noise of a cell's cases (the sum of its two counts) at ``cell_alpha``."""
        scale = self.mechanism.scale
        return float(noise_margin(np.array(scale), np.array(scale), np.array(1.0), np.array(1.0),
                                  self.cell_alpha, is_gaussian(self.mechanism)))

    def cases_needed_to_flag(self, threshold: float) -> int | None:
        """Cases a cell needs to be flagged when all of them are late and the noise is zero."""
        p, _, _ = share_grid()
        # All late: the statistic is n * (1 - p); flagged once every segment starting at or
        # below the threshold rejects, i.e. n * (1 - p_end) > margin on each of them.
        start, end = p[:-1], p[1:]
        binding = start <= threshold
        if (end[binding] >= 1).any():
            return None
        return int(math.floor(float(np.max(self.share_margins[binding] / (1 - end[binding]))))) + 1
