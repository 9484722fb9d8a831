"""Feed consumers' pages: their feeds, each feed's releases, a release with its signature checked, CSV.

The pages call the ``/v1/feeds`` handlers (``routes/feeds.py``): the same refusal text whether a
feed exists or not, and every release fetched (JSON or CSV) is a ``feed.read`` entry. The
signature is checked on the server with the server's own public key — a consumer who wants an
independent check runs ``civicdp feeds verify`` with the key they hold.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response

from civicdp.audit.release_signature import ReleaseSignatureError, verify_release
from civicdp.server.http.console.deps import ConsoleRoute, SignedDep, page
from civicdp.server.http.deps import StateDep
from civicdp.server.http.routes import feeds as feeds_api

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False, prefix="/console/feeds")
FeedName = feeds_api.FeedName
Number = Annotated[int, Path(ge=1, le=9_999_999)]


@router.get("", response_class=HTMLResponse)
def my_feeds(request: Request, state: StateDep, signed: SignedDep) -> HTMLResponse:
    return page(request, "feeds.html", signed, title="My feeds", feeds=feeds_api.list_feeds(signed.caller, state))


@router.get("/{name}", response_class=HTMLResponse)
def feed(request: Request, name: FeedName, state: StateDep, signed: SignedDep) -> HTMLResponse:
    answer = feeds_api.index(name, request, signed.caller, state)
    return page(request, "feed.html", signed, title=f"Feed {name}", name=name, document=json.loads(answer.body))


@router.get("/{name}/{number}", response_class=HTMLResponse)
async def release(request: Request, name: FeedName, number: Number, state: StateDep,
                  signed: SignedDep) -> HTMLResponse:
    answer = await feeds_api.fetch(name, str(number), signed.caller, state, format="json", query=0, table="main",
                                   if_none_match=None)
    signature = answer.headers.get("civicdp-signature", "")
    try:
        verify_release(bytes(answer.body), signature, state.signing_key.verifier)
        status = "valid: signed by " + state.signing_key.verifier.encode()
    except ReleaseSignatureError as exc:
        status = f"INVALID: {exc}"
    document = json.loads(answer.body)
    return page(request, "feed_release.html", signed, title=f"Feed {name}, release {number}", name=name,
                number=number, status=status, signature=signature, document=document)


@router.get("/{name}/{number}/csv")
async def release_csv(name: FeedName, number: Number, state: StateDep, signed: SignedDep) -> Response:
    answer = await feeds_api.fetch(name, str(number), signed.caller, state, format="csv", query=0, table="main",
                                   if_none_match=None)
    return Response(answer.body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}-{number}.csv"'})

