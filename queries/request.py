"""Parse any request document: an aggregate spec or a named analysis."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from queries.analyses import ANALYSES, AnalysisSpec
from queries.errors import QueryError
from queries.spec import QuerySpec, parse_spec, spec_error

Request = QuerySpec | AnalysisSpec


def parse_request(raw: Any) -> Request:
    """A :class:`QuerySpec`, or the spec of the analysis named by ``"analysis"``."""
    if isinstance(raw, (QuerySpec, AnalysisSpec)):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise QueryError("spec", f"not valid JSON ({exc.msg} at line {exc.lineno})",
                             "Send the query as a JSON object") from None
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
