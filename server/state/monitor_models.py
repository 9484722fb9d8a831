"""What the server stores about monitors (SQLModel): definitions, batches, tree nodes, releases, alerts.

A monitor's definition, its calibration and its total loss are fixed when it is defined
(the loss is charged then, once, for the whole horizon). Batches are recorded with their declared
time range; the unique ``(monitor_id, seq)`` and ``(monitor_id, level, index)``
constraints make a concurrent double append or a double release fail and roll back.
Released values are kept as canonical JSON (floats as decimal text would add nothing:
they are already post-processed, public values).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from civicdp.server.state.models import utcnow


class Monitor(SQLModel, table=True):
    """A steward-defined monitor: metric per group and time step over a fixed horizon."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=100)
    dataset: str = Field(index=True, max_length=100)
    agency: str = Field(index=True, max_length=100)  # whose officials may subscribe
    definition_json: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON
    start: datetime
    step_seconds: int
    horizon: int  # number of steps
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))  # total, whole horizon
    released_steps: int = 0  # steps 0 .. released_steps - 1 are released
    covered_until: datetime | None = None  # end of the last accepted batch
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str | None = Field(default=None, max_length=100)
    active: bool = True


class MonitorCalibration(SQLModel, table=True):
    """What a monitor's charge was calibrated on, frozen at definition (one row per monitor).

    A table of its own (``create_all`` adds new tables to an existing database, not new
    columns). ``calibration_json`` is :meth:`civicdp.queries.monitor_calibration.Calibration.to_json`;
    batches rebuild the monitor's trees from it alone. A monitor without a row (defined
    before calibrations were stored) accepts no batch.
    """

    monitor_id: int = Field(foreign_key="monitor.id", primary_key=True)
    metadata_version: str = Field(max_length=100)
    fingerprint: str = Field(max_length=64)
    calibration_json: str = Field(sa_column=Column(Text, nullable=False))


class MonitorBatch(SQLModel, table=True):
    """One accepted batch of events: its declared time range and where its file lies."""

    __table_args__ = (UniqueConstraint("monitor_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor_id: int = Field(foreign_key="monitor.id", index=True)
    seq: int
    start: datetime
    end: datetime
    rows: int
    path: str
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class MonitorNode(SQLModel, table=True):
    """One released node of the binary tree (noisy vector, public once released)."""

    __table_args__ = (UniqueConstraint("monitor_id", "level", "index"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor_id: int = Field(foreign_key="monitor.id", index=True)
    level: int
    index: int
    values_json: str = Field(sa_column=Column(Text, nullable=False))


class MonitorRelease(SQLModel, table=True):
    """The released values of one step: per group the step's value and the running value."""

    __table_args__ = (UniqueConstraint("monitor_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor_id: int = Field(foreign_key="monitor.id", index=True)
    step: int
    step_start: datetime
    rows_json: str = Field(sa_column=Column(Text, nullable=False))
    released_at: datetime = Field(default_factory=utcnow)


class MonitorAlert(SQLModel, table=True):
    """A rule that fired on a released value (post-processing: no extra loss)."""

    id: int | None = Field(default=None, primary_key=True)
    monitor_id: int = Field(foreign_key="monitor.id", index=True)
    step: int
    step_start: datetime
    rule: int  # index in the definition's rules
    rule_text: str = Field(max_length=300)
    group: str = Field(max_length=200)
    value: float
    ci_low: float
    ci_high: float
    created_at: datetime = Field(default_factory=utcnow)


class MonitorSubscription(SQLModel, table=True):
    """An official subscribed to a monitor's alerts (stream and, optionally, an HTTP callback)."""

    __table_args__ = (UniqueConstraint("monitor_id", "account"),)

    id: int | None = Field(default=None, primary_key=True)
    monitor_id: int = Field(foreign_key="monitor.id", index=True)
    account: str = Field(max_length=100)
    callback_url: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow)
