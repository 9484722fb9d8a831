"""The plan document: a list of aggregate specs, each with a target accuracy or a weight.

Example::

    {"dataset": "civic-demo", "contributions": 10, "total": {"epsilon": 0.5},
     "parts": [
       {"name": "volumes", "aggregate": "count", "group_by": ["service_id"],
        "accuracy": {"half_width": 50, "confidence": 0.95}},
       {"name": "duration", "aggregate": "mean", "column": "duration_hours", "group_by": ["department"],
        "accuracy": {"half_width": 10, "min_rows": 1000}},
       {"name": "waits", "aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5],
        "group_by": ["channel"], "accuracy": {"rank_half_width": 200}},
       {"name": "centres", "aggregate": "count", "group_by": ["centre"], "weight": 1}]}

A part is a query spec (``queries/spec.py``) without ``epsilon`` or a numeric
``accuracy``: the planner chooses its loss. Every field is documented in docs/metadata.md.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from civicdp.queries.errors import QueryError
from civicdp.queries.spec import QuerySpec, load_document, no_booleans, spec_error

#: Parts one plan may hold (each is planned, authorised and answered).
MAX_PARTS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """What a part must achieve, at ``confidence``, computed from public parameters only.

    ``half_width``: counts, sums, histograms (rows or the column's unit), means (the column's
    unit, for every group of at least ``min_rows`` bounded rows); ``relative``: a mean's
    half-width as a share of its bounds' range (with ``min_rows``); ``rank_half_width``:
    quantiles, rows of rank the released value may lie from the exact quantile.
    """

    half_width: float | None = Field(default=None, gt=0)
    relative: float | None = Field(default=None, gt=0, lt=1)
    rank_half_width: float | None = Field(default=None, gt=0)
    min_rows: int | None = Field(default=None, ge=1)
    confidence: float = Field(default=0.95, ge=0.5, le=0.999)

    _no_booleans = field_validator("half_width", "relative", "rank_half_width", "min_rows", "confidence",
                                   mode="before")(no_booleans)


class Total(_Strict):
    """The plan's total loss, in epsilon (what the analyst's budgets are stated in)."""

    epsilon: float = Field(gt=0)

    _no_booleans = field_validator("epsilon", mode="before")(no_booleans)


class PlanPart(_Strict):
    """One statistic of the plan: its name, its query, and a target or a weight."""

    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.\-]+$")
    query: QuerySpec
    accuracy: Target | None = None
    weight: float | None = Field(default=None, gt=0)


class PlanSpec(_Strict):
    """A workload: its dataset, the contribution bound of all parts, an optional total, the parts."""

    dataset: str | None = None
    contributions: int | None = Field(default=None, ge=1)
    total: Total | None = None
    parts: tuple[PlanPart, ...]

    def canonical(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def parse_plan(raw: Any) -> PlanSpec:
    """Validate a plan document; errors name the field (``parts.2.accuracy``) and a fix."""
    if isinstance(raw, PlanSpec):
        return raw
    raw = load_document(raw)
    if not isinstance(raw, dict):
        raise QueryError("plan", "a plan must be a JSON object", 'For example {"dataset": "civic-demo", "parts": [...]}')
    parts = raw.get("parts")
    if not isinstance(parts, list) or not parts:
        raise QueryError("parts", "a plan needs a non-empty list of parts",
                         'Give "parts": [{"name": "...", "aggregate": "count", "accuracy": {"half_width": 50}}]')
    if len(parts) > MAX_PARTS:
        raise QueryError("parts", f"{len(parts)} parts is more than the {MAX_PARTS} a plan may hold",
                         "Split the workload into several plans")
    document = {k: v for k, v in raw.items() if k != "parts"}
    document["parts"] = [_part(i, p, raw.get("dataset")) for i, p in enumerate(parts)]
    try:
        plan = PlanSpec.model_validate(document)
    except ValidationError as exc:
        raise spec_error(exc, _FIXES, "See the plan fields in docs/metadata.md") from None
    names = [p.name for p in plan.parts]
    if len(set(names)) != len(names):
        raise QueryError("parts", "two parts have the same name", "Give every part its own name")
    return plan


def _part(index: int, raw: Any, dataset: Any) -> dict[str, Any]:
    """A part written flat (a query spec plus name/accuracy/weight) as a :class:`PlanPart` document."""
    where = f"parts.{index}"
    if not isinstance(raw, dict):
        raise QueryError(where, "a part must be a JSON object", 'E.g. {"name": "v", "aggregate": "count", ...}')
    if isinstance(raw.get("query"), dict):  # the stored (canonical) form: the query nested, its placeholder loss
        query = {k: v for k, v in raw["query"].items() if v is not None and k != "epsilon"}
        raw = {**query, **{k: raw[k] for k in ("name", "accuracy", "weight") if raw.get(k) is not None}}
    if "analysis" in raw:
        raise QueryError(f"{where}.analysis", "plans hold aggregate queries only",
                         "Run analyses on their own (POST /v1/queries), or plan their aggregates")
    query = {k: v for k, v in raw.items() if k not in ("name", "accuracy", "weight")}
    for field in ("epsilon",):
        if field in query:
            raise QueryError(f"{where}.{field}", "the planner chooses each part's loss",
                             'Give the part an "accuracy" target or a "weight" instead')
    accuracy, weight = raw.get("accuracy"), raw.get("weight")
    if (accuracy is None) == (weight is None):
        raise QueryError(where, "give the part either an accuracy target or a weight",
                         'E.g. "accuracy": {"half_width": 50, "confidence": 0.95}, or "weight": 1')
    if accuracy is not None and not isinstance(accuracy, dict):
        raise QueryError(f"{where}.accuracy", "a part's accuracy is an object",
                         'E.g. {"half_width": 50, "confidence": 0.95}')
    if dataset is not None and query.get("dataset", dataset) != dataset:
        raise QueryError(f"{where}.dataset", "every part queries the plan's dataset", "Leave 'dataset' out of parts")
    # A placeholder loss makes the part a valid query spec; the planner replaces it.
    query = {**query, "epsilon": 1.0, "dataset": dataset}
    if accuracy is not None and "confidence" in accuracy:
        query["confidence"] = accuracy["confidence"]
    try:
        spec = QuerySpec.model_validate(query)
    except ValidationError as exc:
        error = spec_error(exc, {})
        raise QueryError(f"{where}.{error.field}", error.problem, error.fix) from None
    return {"name": raw.get("name", f"part{index}"), "query": spec, "accuracy": accuracy, "weight": weight}


_FIXES = {
    "total": 'Give the total as {"epsilon": 0.5}',
    "contributions": "Give a whole number of rows per person for every part",
    "parts": 'Each part: a name matching [A-Za-z0-9_.-], and "accuracy": {...} or "weight": 1',
}
