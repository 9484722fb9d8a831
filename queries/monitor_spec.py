"""What a monitor is: the definition a data steward writes, and the monitor resolved from it.

``MonitorSpec`` and its ``AlertRule`` s are the steward's document (see
:mod:`civicdp.queries.monitoring` for the whole design); ``ResolvedMonitor`` is a spec
checked against the public metadata with its trees (the whole horizon's mechanisms)
fixed, as :func:`civicdp.queries.monitoring.resolve_monitor` makes it. Both the monitor's
batches (:mod:`civicdp.queries.monitor_batches`) and its releases work from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from civicdp.privacy.continual import MAX_HORIZON, TreeCounter
from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.queries.metadata import TableMeta

STEP_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
MAX_RULES = 50


class AlertRule(BaseModel):
    """Fire when a released value is above (or below) ``value``; ``group`` None means every group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["above", "below"]
    value: float = Field(allow_inf_nan=False)
    group: bool | int | str | None = None  # bool first: a JSON true stays a boolean key
    on: Literal["step", "running"] = "step"
    certain: bool = False  # fire only when the whole interval lies beyond the value

    def text(self, metric: str) -> str:
        where = f" in {self.group}" if self.group is not None else ""
        what = "running " if self.on == "running" else ""
        how = " (certainly)" if self.certain else ""
        return f"{what}{metric}{where} {self.op} {self.value:g}{how}"


class MonitorSpec(BaseModel):
    """A monitor's definition; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dataset: str
    table: str = "events"
    metric: Literal["count", "mean", "share_above"]
    column: str | None = None
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    group_by: str | None = None
    time: str = "request_time"
    step: Literal["hour", "day", "week"] = "day"
    start: datetime
    horizon: int = Field(ge=1, le=MAX_HORIZON)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    contributions: int | None = Field(default=None, ge=1)
    confidence: float = Field(default=0.95, ge=0.5, le=0.999)
    rules: tuple[AlertRule, ...] = Field(default=(), max_length=MAX_RULES)
    agency: str | None = None

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class ResolvedMonitor:
    """A validated monitor with its trees (the whole horizon's mechanisms) fixed."""

    spec: MonitorSpec
    table: TableMeta
    unit_column: str
    keys: tuple[Any, ...]  # public groups ("all" when not grouped)
    contributions: int
    trees: dict[str, TreeCounter]  # counts | above (share: [above..., not above...]) | sums + counts
    lower: float = 0.0
    upper: float = 0.0
    resolution: float = 1.0
    unit: int = 1  # mean monitors: the quantised bound of one centred value

    @property
    def loss(self) -> PrivacyLoss:
        return compose(t.loss for t in self.trees.values())

    @property
    def step_seconds(self) -> int:
        return STEP_SECONDS[self.spec.step]

    @property
    def start(self) -> datetime:
        return naive_utc(self.spec.start)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.step_seconds * self.spec.horizon)

    def step_start(self, step: int) -> datetime:
        return self.start + timedelta(seconds=self.step_seconds * step)

    def complete_steps(self, covered_until: datetime) -> int:
        """How many steps end at or before ``covered_until`` (capped at the horizon)."""
        seconds = (covered_until - self.start).total_seconds()
        return max(0, min(self.spec.horizon, math.floor(seconds / self.step_seconds)))

    def widths(self) -> dict[str, int]:
        n = len(self.keys)
        return {"above": 2 * n} if self.spec.metric == "share_above" else {name: n for name in self.trees}


def naive_utc(moment: datetime) -> datetime:
    """Stored times are naive UTC: an aware time is converted to UTC, a naive one kept."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment
