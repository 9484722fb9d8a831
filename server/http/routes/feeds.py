"""Feeds: stewards define and trigger them, agencies' feed consumers list, poll and fetch signed releases.

A consumer not allowed a feed gets the same 403 whether the feed exists or not (the
body never names a reason that differs between the two); the true reason goes to the
audit log. Reads are free: a release is the stored, signed bytes, served with a strong
ETag (the SHA-256 of those bytes) so pollers send ``If-None-Match`` and get 304.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, status
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from civicdp.policies.actions import Action
from civicdp.server.state.db import session_scope
from civicdp.server.http.deps import CurrentCaller, StateDep, authorize
from civicdp.server.auditlog.append import record
from civicdp.server.state.caller import Caller
from civicdp.server.state.errors import AccessDenied, Conflict
from civicdp.server.feeds.schemas import (
    FEED_NAME, FeedDefinition, FeedIndex, FeedOverview, FeedReleaseDocument, FeedReleaseOut, FeedSummary,
)
from civicdp.server.feeds.outcomes import FeedRefused
from civicdp.server.feeds.reading import release_csv
from civicdp.server.feeds.service import FeedService
from civicdp.server.http.routes.common import errors

router = APIRouter(prefix="/feeds", tags=["feeds"])
FeedName = Annotated[str, Path(pattern=FEED_NAME, description="The feed's name")]
Which = Annotated[str, Path(pattern=r"^(latest|[0-9]{1,7})$", description="'latest' or a release number")]
IfNoneMatch = Annotated[str | None, Header(max_length=200, description="An ETag from an earlier answer")]
_TEXT = {"schema": {"type": "string"}}
_BYTES = {200: {"model": FeedReleaseDocument, "content": {"application/json": {}, "text/csv": _TEXT},
                "description": "The release's canonical bytes (signed) or one of its tables as CSV"},
          304: {"description": "Not modified since the ETag sent in If-None-Match"}}


def _may_read(state: StateDep, caller: Caller, name: str) -> None:
    """FEED_READ on ``feed:<name>``, refused with one text whether or not the feed exists."""
    try:
        authorize(state, caller, Action.FEED_READ, f"feed:{name}")
    except AccessDenied:
        raise AccessDenied(f"you may not read feed '{name}': there is no feed of that name shared with agency "
                           f"'{caller.agency}' (ask a steward to share it)") from None


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    return if_none_match.strip() == "*" or etag in {t.strip().removeprefix("W/") for t in if_none_match.split(",")}


@router.get("", response_model=list[FeedSummary], responses=errors(401),
            summary="The feeds you may read (feed consumers of the agencies a feed is shared with)")
def list_feeds(caller: CurrentCaller, state: StateDep) -> list[FeedSummary]:
    return FeedService.of(state).readable(caller)


@router.get("/overview", response_model=list[FeedOverview], responses=errors(401, 403),
            summary="Every feed's schedule, agencies, spend so far and planned spend (stewards, oversight)")
def overview(caller: CurrentCaller, state: StateDep) -> list[FeedOverview]:
    authorize(state, caller, Action.BUDGET_READ_ALL, "server")
    return FeedService.of(state).overview()


@router.post("", response_model=FeedOverview, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 409, 422), summary="Define a feed (stewards): checked against the "
                                                           "dataset's budgets for every release it announces, and "
                                                           "each spec against the policy as a query by each "
                                                           "consumer agency (403 naming the rule and the agency)")
def define(body: FeedDefinition, caller: CurrentCaller, state: StateDep) -> FeedOverview:
    authorize(state, caller, Action.FEED_MANAGE, "server")
    return FeedService.of(state).define(caller, body)


@router.post("/{name}/releases", response_model=FeedReleaseOut, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 404, 409, 422),
             summary="Produce the feed's next release now (stewards); 409 says why if it is refused (nothing "
                     "charged), failed after its charge (one fixed text), or is being produced")
def trigger(name: FeedName, caller: CurrentCaller, state: StateDep) -> FeedReleaseOut:
    authorize(state, caller, Action.FEED_MANAGE, "server")
    try:
        return FeedService.of(state).trigger(caller, name).out()
    except FeedRefused as refused:
        if refused.budget is not None:
            raise refused.budget from None
        raise Conflict(refused.reason) from None


@router.get("/{name}", responses={**errors(401, 403, 404, 422), 200: {"model": FeedIndex},
                                  304: {"description": "Not modified"}},
            summary="The feed's releases, newest first, as a JSON Feed 1.1 document (poll with If-None-Match)")
def index(name: FeedName, request: Request, caller: CurrentCaller, state: StateDep,
          if_none_match: IfNoneMatch = None) -> Response:
    _may_read(state, caller, name)
    public_key = state.signing_key.verifier.encode()
    document = FeedService.of(state).index(name, str(request.base_url), public_key)
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    etag = f'"{hashlib.sha256(body).hexdigest()}"'
    if _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/feed+json", headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.get("/{name}/releases/{release}", response_class=Response, responses={**errors(401, 403, 404, 422), **_BYTES},
            summary="One release: its signed canonical JSON (signature in the Civicdp-Signature header), or a "
                    "table of it as CSV")
async def fetch(name: FeedName, release: Which, caller: CurrentCaller, state: StateDep,
                format: Annotated[Literal["json", "csv"], Query()] = "json",  # noqa: A002 - a query parameter
                query: Annotated[int, Query(ge=0, le=100, description="CSV: which result")] = 0,
                table: Annotated[str, Query(max_length=100, description="CSV: 'main' or a further table")] = "main",
                if_none_match: IfNoneMatch = None) -> Response:
    return await run_in_threadpool(_fetch, state, caller, name, release, format, query, table, if_none_match)


def _fetch(state: StateDep, caller: Caller, name: str, which: str, form: str, query: int, table: str,
           if_none_match: str | None) -> Response:
    _may_read(state, caller, name)
    feed, row, data = FeedService.of(state).release(name, which)
    etag = f'"{row.sha256}"' if form == "json" else f'"{row.sha256}.csv.{query}.{hashlib.sha256(table.encode()).hexdigest()[:16]}"'
    unchanged = _matches(if_none_match, etag)
    body = b"" if unchanged else (data if form == "json" else release_csv(data, query, table).encode())
    with session_scope(state.db) as session:  # every fetch is in the log, 304s included; it costs nothing
        record(session, caller, Action.FEED_READ.value, f"feed:{name}", feed=name, number=row.number,
               period=row.period, result_hash=row.sha256, format=form, not_modified=unchanged, loss_micro=0)
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Civicdp-Signature": row.signature,
               "Content-Location": f"/v1/feeds/{name}/releases/{row.number}"}
    if unchanged:
        return Response(status_code=304, headers=headers)
    media = "application/json" if form == "json" else "text/csv; charset=utf-8"
    return Response(body, media_type=media, headers=headers)


@router.get("/{name}/releases/{release}/signature", response_class=Response,
            responses={**errors(401, 403, 404, 422), 200: {"content": {"text/plain": _TEXT},
                                                            "description": "'<key name> <base64>'"}},
            summary="A release's detached Ed25519 signature (verify with `civicdp feeds verify`)")
def signature(name: FeedName, release: Which, caller: CurrentCaller, state: StateDep) -> Response:
    _may_read(state, caller, name)
    _, row, _ = FeedService.of(state).release(name, release)
    return Response(row.signature + "\n", media_type="text/plain")
