"""Error responses shared by the routes' OpenAPI documentation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorOut(BaseModel):
    error: str
    detail: str
    field: str | None = None
    problem: str | None = None
    fix: str | None = None
    rule: list[str] | None = None


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    texts = {401: "Missing, unknown, expired or revoked API key", 403: "Not allowed by the access policies",
             404: "Not found", 409: "Conflicts with the current state (e.g. budget exhausted)",
             422: "Invalid input: names the field and how to fix it", 503: "Dataset files unavailable"}
    return {code: {"model": ErrorOut, "description": texts[code]} for code in codes}
