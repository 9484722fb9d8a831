"""Domain errors mapped to HTTP responses, in one place.

Every error body has the same shape: ``{"error": code, "detail": text, ...fields}``.
Texts depend on the request and the public state (policies, budgets), never on the
data: the same status and shape whether a filter matches 0 or 100,000 rows.

Mapping::

    AuthenticationFailed  -> 401 unauthenticated  (one text for every cause)
    AccessDenied          -> 403 forbidden        (which rule or reason)
    NotFound              -> 404 not_found
    BudgetRefused         -> 409 budget_exhausted (scope, remaining, renews_at)
    QueryError            -> 422 invalid_query    (field, problem, fix)
    request validation    -> 422 invalid_request  (field, problem; also a body that is not JSON text)
    InvalidRequest        -> 422 invalid_request  (field, problem, fix)
    DatasetUnavailable    -> 503 dataset_unavailable
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from civicdp.policies.errors import PolicyError
from civicdp.privacy.errors import InvalidLoss
from civicdp.queries.errors import DatasetUnavailable, QueryError
from civicdp.server.state.auth import AuthenticationFailed
from civicdp.server.state.errors import AccessDenied, Conflict, InvalidRequest, NotFound
from civicdp.server.state.ledger import BudgetRefused


def _body(code: str, detail: str, **fields: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, **fields}


def install(app: FastAPI) -> None:
    """Register the handlers that turn domain errors into responses."""

    @app.exception_handler(AuthenticationFailed)
    async def _unauthenticated(_: Request, exc: AuthenticationFailed) -> JSONResponse:
        # One text for every cause, so callers cannot probe which keys exist.
        return JSONResponse(_body("unauthenticated", "A valid API key is required: send it as "
                                  "'Authorization: Bearer <key>'. Keys that are unknown, expired "
                                  "or revoked are refused."), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(AccessDenied)
    async def _forbidden(_: Request, exc: AccessDenied) -> JSONResponse:
        return JSONResponse(_body("forbidden", exc.reason, rule=exc.rule), status_code=403)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(_body("not_found", str(exc)), status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(_body("conflict", str(exc)), status_code=409)

    @app.exception_handler(BudgetRefused)
    async def _budget(_: Request, exc: BudgetRefused) -> JSONResponse:
        return JSONResponse({**exc.as_dict(), **_body("budget_exhausted", str(exc))}, status_code=409)

    @app.exception_handler(QueryError)
    async def _invalid_query(_: Request, exc: QueryError) -> JSONResponse:
        if isinstance(exc, DatasetUnavailable):
            return JSONResponse(_body("dataset_unavailable", str(exc)), status_code=503)
        return JSONResponse({**exc.as_dict(), **_body("invalid_query", str(exc))}, status_code=422)

    @app.exception_handler(InvalidLoss)
    async def _invalid_loss(_: Request, exc: InvalidLoss) -> JSONResponse:
        return JSONResponse(_body("invalid_query", str(exc), field="epsilon", problem=str(exc),
                                  fix="Give a finite privacy loss greater than 0"), status_code=422)

    @app.exception_handler(PolicyError)
    async def _invalid_rule(_: Request, exc: PolicyError) -> JSONResponse:
        return JSONResponse(_body("invalid_request", str(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body" (bytes that are not UTF-8 JSON
            # text): an invalid request like any other, with the shape and status of one.
            return JSONResponse(_body("invalid_request", f"body: {exc.detail}", field="body",
                                      problem="the request body is not JSON text"), status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid_parameter(_: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse(_body("invalid_request", str(exc), field=exc.field, problem=exc.problem, fix=exc.fix),
                            status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(_body("invalid_request", f"{where or 'request'}: {first.get('msg')}",
                                  field=where, problem=str(first.get("msg"))), status_code=422)
