"""Parse any request document: an aggregate spec or a named analysis."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from civicdp.queries.analyses import ANALYSES, AnalysisSpec
from civicdp.queries.errors import QueryError
from civicdp.queries.spec import QuerySpec, load_document, parse_spec, spec_error

Request = QuerySpec | AnalysisSpec


def parse_request(raw: Any) -> Request:
    """A :class:`QuerySpec`, or the spec of the analysis named by ``"analysis"``."""
    if isinstance(raw, (QuerySpec, AnalysisSpec)):
        return raw
    raw = load_document(raw)
    if not isinstance(raw, dict) or "analysis" not in raw:
        return parse_spec(raw)
    name = raw["analysis"]
    analysis = ANALYSES.get(name) if isinstance(name, str) else None
    if analysis is None:
        raise QueryError("analysis", f"unknown analysis {name!r}",
                         f"Use one of {sorted(ANALYSES)}, or leave 'analysis' out for a single aggregate")
    try:
        return analysis.spec_model.model_validate(raw)
    except ValidationError as exc:
        raise spec_error(exc, {}, f"See the fields of a '{name}' analysis in the README") from None
