"""The OpenAPI document's 422 answers are the server's errors, not FastAPI's validation shape.

FastAPI documents a 422 with its own ``HTTPValidationError`` (a list of ``loc``/``msg``/``type``
objects) on every operation with parameters, but the server answers invalid input with one
``ErrorOut`` naming the field, the problem and the fix (``errors.py``). This rewrites those 422s
to ``ErrorOut`` and drops FastAPI's two schemas, so clients generated from the document parse the
answers they will get.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

INVALID = {"description": "Invalid input: names the field and how to fix it",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
FASTAPI_SHAPES = ("HTTPValidationError", "ValidationError")


def _uses_fastapi_shape(answer: dict[str, Any]) -> bool:
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def document_errors(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI document name ``ErrorOut`` for every 422."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                answers = operation.get("responses", {}) if isinstance(operation, dict) else {}
                if "422" in answers and _uses_fastapi_shape(answers["422"]):
                    answers["422"] = INVALID
        components = schema.get("components", {}).get("schemas", {})
        for name in FASTAPI_SHAPES:
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
