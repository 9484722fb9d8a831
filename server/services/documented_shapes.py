"""The shapes of values the API passes on as they are, for OpenAPI (``DocumentAs(...)`` in the schemas).

An answer's rows, its mechanisms and accuracy, an audit entry, a ledger charge and a feed's last
refusal are built by the engine, the audit log or the ledger as plain dicts. The HTTP schemas keep
them as dicts (an audit entry's bytes are what its leaf hash covers, so nothing may re-serialise
it) and document them with these models, which are never used to validate anything. Where keys
depend on the question (a row's group columns), the extra keys are typed too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Scalar = bool | int | float | str | None


class ResultRow(BaseModel):
    """One cell of an answer: its group keys (one key per ``group_by`` column), value and interval."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar]
    value: float | int | None = Field(description="The private value (null where none is released)")
    ci_low: float | None = Field(default=None, description="Lower end of the interval at the answer's confidence")
    ci_high: float | None = Field(default=None, description="Upper end of the interval")


class TableRow(BaseModel):
    """One row of an analysis table: a value for each of the table's ``columns``."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar | list[Scalar]]


class Mechanism(BaseModel):
    """One noise-adding step of a release, with its scale and the sensitivity it was calibrated to."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar]
    role: str = Field(description="What it releases: counts, sums, cdf, q0.5, ...")
    mechanism: str = Field(description="discrete Laplace, discrete Gaussian, exponential mechanism, ...")
    scale: float | None = None
    sensitivity: float | int | None = None
    epsilon: float | None = None


class Accuracy(BaseModel):
    """Predicted accuracy of an estimate; the keys present depend on the aggregate."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar | list[Scalar] | dict[str, Scalar]]
    unit: str | None = Field(default=None, description="What the widths count: rows, the column's unit, rows of rank")
    cells: int | None = Field(default=None, description="Cells of the answer")
    half_width: float | None = Field(default=None, description="Half-width of each cell's interval")
    rank_error: dict[str, float] | None = Field(default=None, description="Quantiles: rank error per quantile")
    note: str | None = None


class PublicColumn(BaseModel):
    """A column as analysts see it (docs/metadata.md): its type, public keys or bounds, class."""

    type: str = Field(description="int, float, str, datetime or bool")
    identifier: bool = False
    keys: list[Scalar] | None = Field(default=None, description="The public key set, if any")
    bounds: list[float | str] | None = Field(default=None, description="Public clipping bounds (times as ISO text)")
    nullable: bool = False
    resolution: float | None = None
    column_class: str | None = Field(default=None, alias="class", description="public, quasi or sensitive")
    ends_case: bool = False


class PublicTable(BaseModel):
    """A table's public metadata."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Any]
    path: str
    columns: dict[str, PublicColumn]
    privacy_unit_via: dict[str, str] | None = None
    max_contributions: int | None = None


class AuditCaller(BaseModel):
    account: str
    account_id: int | None
    agency: str
    roles: list[str]


class AuditRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar]
    method: str
    path: str


class AuditEntry(BaseModel):
    """An audit log entry, as hashed into the log (canonical JSON: times in UTC ending in Z, floats as the
    text of their repr). ``detail`` depends on the action."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Any]
    seq: int
    time: datetime
    action: str = Field(description="query.run, dataset.register, budget.set_cap, ... (docs/architecture.md)")
    decision: str = Field(description="allowed, denied, refused, ...")
    who: AuditCaller | None = Field(description="The caller; null for the command line")
    target: str | None
    rule: list[str] | None = Field(description="The policy rule that decided, if any")
    request: AuditRequest | None = Field(description="Method and path of the HTTP request, if any")
    detail: dict[str, Any] = Field(description="What the action recorded; its fields depend on the action")


class LedgerCharge(BaseModel):
    """One charge of the ledger."""

    time: str = Field(description="When it was charged (ISO 8601, UTC; without an offset on SQLite)")
    dataset: str
    scope: str
    subject: str
    period: str
    amount_micro: int
    before_micro: int
    after_micro: int
    cap_micro: int | None = Field(description="The cap in force when it was charged (null if not known)")
    release_id: int | None
    account: str | None


class FeedRefusal(BaseModel):
    """The latest refused attempt at a feed's release (nothing was charged)."""

    number: int
    period: str
    time: datetime
    origin: str
    reason: str


class FeedFailure(BaseModel):
    """The latest release charged and then failed (the charge stands)."""

    number: int
    period: str
    attempt: int
    charged_at: datetime
    time: datetime
    origin: str
    charged_micro: int
    reason: str
