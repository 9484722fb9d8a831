"""Query specs: typed, JSON-serialisable descriptions of one aggregate question.

A spec names the table, the aggregate (count, sum, mean, quantiles, histogram),
its column and parameters, the grouping (public-key columns and time buckets
written ``column:bucket``), filters on public columns, and either a privacy loss
(``epsilon``) or a target accuracy (``accuracy`` at ``confidence``) from which the
engine derives the smallest loss that meets it.

Example::

    {"aggregate": "count", "group_by": ["service_id"], "epsilon": 0.25}
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from civicdp.queries.errors import QueryError

Aggregate = Literal["count", "sum", "mean", "quantiles", "histogram"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CanonicalSpec(_Strict):
    """A request document with one canonical text (the key of stored releases and audit entries)."""

    def canonical(self) -> str:
        """Canonical JSON (sorted keys, defaults included): equal questions, equal text."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def no_booleans(value: Any) -> Any:
    """JSON true/false is not a number here (pydantic would read it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def spec_error(exc: ValidationError, fixes: dict[str, str], default_fix: str = "") -> QueryError:
    """The first validation error as a QueryError naming the field, the problem and a fix."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "literal")))
    fix = fixes.get(str(first["loc"][0]) if first["loc"] else "", default_fix)
    return QueryError(where or "spec", first["msg"].rstrip("."), fix)


class Filter(_Strict):
    """Keep rows whose public column equals a value, is one of values, or lies in a time range."""

    column: str
    op: Literal["eq", "in", "between"]
    value: int | str | bool | None = None
    values: tuple[int | str | bool, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None


class Grid(_Strict):
    """A regular grid of candidate values ``start, start + step, ..., stop``."""

    start: float
    stop: float
    step: float

    def values(self) -> list[float]:
        count = int(math.floor((self.stop - self.start) / self.step + 1e-9)) + 1
        digits = max(0, -math.floor(math.log10(self.step)) + 3)
        return [round(self.start + i * self.step, digits) for i in range(count)]


class QuerySpec(CanonicalSpec):
    """One aggregate question about one table of a dataset."""

    dataset: str | None = None
    table: str = "events"
    aggregate: Aggregate
    column: str | None = None
    bounds: tuple[float, float] | None = None
    quantiles: tuple[float, ...] | None = None
    candidates: Grid | tuple[float, ...] | None = None
    bins: tuple[float, ...] | None = None
    group_by: tuple[str, ...] = ()
    filters: tuple[Filter, ...] = ()
    epsilon: float | None = None
    accuracy: float | None = None
    confidence: float = Field(default=0.95)
    contributions: int | Literal["auto"] | None = None
    intervals: bool = True  # quantiles: spend part of the loss on value intervals

    _no_booleans = field_validator("epsilon", "accuracy", "confidence", "contributions", mode="before")(no_booleans)


def load_document(raw: Any) -> Any:
    """JSON text (str or bytes) decoded; anything else as it is."""
    if not isinstance(raw, (str, bytes)):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QueryError("spec", f"not valid JSON ({exc.msg} at line {exc.lineno})",
                         "Send the query as a JSON object") from None


def parse_spec(raw: Any) -> QuerySpec:
    """Validate a spec document; errors name the field and how to fix it."""
    if isinstance(raw, QuerySpec):
        return raw
    raw = load_document(raw)
    if not isinstance(raw, dict):
        raise QueryError("spec", "a query must be a JSON object",
                         'For example {"aggregate": "count", "epsilon": 0.1}')
    try:
        return QuerySpec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error(exc, _FIXES) from None


_FIXES = {
    "aggregate": "Use one of count, sum, mean, quantiles, histogram",
    "epsilon": "Give epsilon as a positive number such as 0.1",
    "contributions": 'Give a whole number of rows per person, or "auto"',
    "filters": 'Write filters like {"column": "channel", "op": "eq", "value": "web"}',
    "candidates": 'Give a list of values or {"start": 0, "stop": 60, "step": 0.5}',
}
