"""HTTP schemas of monitors: what ``/v1/monitors`` answers (``civicdp.server.monitors.service``'s dicts).

Times are the ISO 8601 texts the service writes (kept as text, so answers stay byte for byte what
they were); the definition is the monitor's canonical document, documented as ``MonitorSpec``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from civicdp.queries.monitor_spec import MonitorSpec
from civicdp.server.services.request_bodies import DocumentAs

GroupKey = bool | int | str | None
Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class MonitorLoss(BaseModel):
    epsilon: float = Field(description="Total privacy loss of the whole horizon, charged when it was defined")
    delta: float


class MonitorOut(BaseModel):
    name: str
    dataset: str
    agency: str
    definition: Annotated[dict[str, Any], DocumentAs(MonitorSpec)] = Field(
        description="The definition as stored (canonical: defaults filled in)")
    loss: MonitorLoss
    start: Time
    step_seconds: int
    horizon: int = Field(description="Steps watched")
    released_steps: int
    covered_until: Time | None = Field(description="End of the data received so far")
    active: bool
    created_by: str
    created_at: Time


class MonitorRowOut(BaseModel):
    """One group's released value at a step, and the running value over the steps so far."""

    group: GroupKey = Field(description="The group's public key ('all' when not grouped)")
    value: float | None = Field(description="null when a share has no people to divide by")
    ci_low: float
    ci_high: float
    running_value: float | None
    running_ci_low: float
    running_ci_high: float


class MonitorReleaseOut(BaseModel):
    step: int
    step_start: Time
    rows: list[MonitorRowOut]


class AlertOut(BaseModel):
    id: int | None
    monitor: str
    step: int
    step_start: Time
    rule: int = Field(description="Index of the rule in the definition")
    rule_text: str
    group: str | None
    value: float
    ci_low: float
    ci_high: float


class BatchOut(BaseModel):
    monitor: str
    seq: int = Field(description="The batch's number")
    rows: int = Field(description="Rows received")
    released_steps: list[int] = Field(description="Steps this batch completed, released now")
    alerts: list[AlertOut]


class SubscriptionOut(BaseModel):
    monitor: str
    account: str
    callback_url: str | None
