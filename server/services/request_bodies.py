"""Bodies the services validate themselves, documented in OpenAPI by the models they must match.

A query or analysis spec and a monitor definition are checked by ``civicdp.queries`` (its errors
name the field and the fix, and a refused monitor is an audit entry), so the HTTP layer takes them
as a JSON object and hands it on unchanged. For readers of ``/docs`` they are still typed: each
class below is a named schema that is a choice of the models the service validates against
(``anyOf``), with examples. Only the documentation changes; validation stays where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, GetJsonSchemaHandler, RootModel, TypeAdapter
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from civicdp.queries.analyses import ANALYSES
from civicdp.queries.monitor_spec import MonitorSpec
from civicdp.queries.spec import QuerySpec


def _schema_of(models: Sequence[type[BaseModel]], handler: GetJsonSchemaHandler) -> JsonSchemaValue:
    """The schema of one of ``models`` (a ``$ref`` to each, their definitions registered)."""
    inner = models[0].__pydantic_core_schema__ if len(models) == 1 else core_schema.union_schema(
        [model.__pydantic_core_schema__ for model in models])
    return dict(handler(inner))


@dataclass(frozen=True)
class DocumentAs:
    """``Annotated[dict[str, Any], DocumentAs(Model)]``: a value passed on as it is (the bytes of an
    audit entry, a stored definition, a result's rows), documented as ``Model`` (any type:
    ``list[Row]``, ``dict[str, Table]``). Nothing is validated or re-serialised by it."""

    shape: Any

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        if isinstance(self.shape, type) and issubclass(self.shape, DocumentedObject):
            return _schema_of(self.shape.models(), handler)  # its models (a RootModel's own hook is not called here)
        if isinstance(self.shape, type) and issubclass(self.shape, BaseModel):
            return _schema_of([self.shape], handler)  # a $ref to the model's own schema
        return dict(handler(TypeAdapter(self.shape).core_schema))


class DocumentedObject(RootModel[dict[str, Any]]):
    """A JSON object taken as it is, documented as one of :meth:`models`."""

    description: ClassVar[str] = ""
    examples: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def models(cls) -> Sequence[type[BaseModel]]:
        raise NotImplementedError

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**_schema_of(cls.models(), handler), "description": cls.description, "examples": cls.examples}


class QueryRequest(DocumentedObject):
    description = ("An aggregate question (QuerySpec) or a named analysis (\"analysis\": its name, see the "
                   "README). Invalid specs are answered 422 naming the field and how to fix it.")
    #: The first is tests/server/http/test_schemathesis.py's query (the columns it groups by are the test dataset's).
    examples = [
        {"dataset": "civic-demo", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1},
        {"dataset": "civic-demo", "aggregate": "mean", "column": "duration_hours", "bounds": [0, 720],
         "group_by": ["department"], "epsilon": 0.45, "contributions": 10},
        {"dataset": "civic-demo", "analysis": "bundles", "period": {"start": "2025-01-01", "end": "2026-01-01"},
         "window_days": 30, "top_k": 50, "epsilon": 0.5},
    ]

    @classmethod
    def models(cls) -> Sequence[type[BaseModel]]:
        analyses = list(dict.fromkeys(analysis.spec_model for analysis in ANALYSES.values()))  # aliases once
        return [QuerySpec, *analyses]


class MonitorRequest(DocumentedObject):
    description = ("A monitor's definition: its metric per step, the horizon, the total privacy loss for the "
                   "whole horizon (charged when it is defined) and alert rules.")
    examples = [
        {"name": "daily-late-share", "dataset": "civic-demo", "agency": "health", "metric": "share_above",
         "column": "duration_hours", "threshold": 96, "group_by": "department", "step": "day",
         "start": "2026-01-01T00:00:00", "horizon": 90, "epsilon": 0.5, "contributions": 10,
         "rules": [{"op": "above", "value": 0.5, "certain": True}]},
    ]

    @classmethod
    def models(cls) -> Sequence[type[BaseModel]]:
        return [MonitorSpec]
