"""Oversight: the audit log's entries, the budget ledger over time, checkpoints, proofs, exports."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, PlainTextResponse, Response
from sqlmodel import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from civicdp.policies.actions import Action
from civicdp.server.state import ledger_history
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, authorize
from civicdp.server.state.errors import InvalidRequest
from civicdp.server.state.models import AuditEntry
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import AuditEntriesOut, AuditEntryOut, BudgetOut, ConsistencyProofOut, InclusionProofOut, LedgerOut

router = APIRouter(prefix="/audit", tags=["audit"])
Size = Annotated[int, Query(ge=0, le=2**62)]
Name = Annotated[str | None, Query(max_length=200)]
_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?")
Time = Annotated[str | None, Query(max_length=40, description="An ISO 8601 date or time, such as 2026-12-01 or "
                                   "2026-12-01T08:00:00+01:00; without a zone it is read as UTC")]


def _time(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 date or time (UTC when it names no zone); numbers such as 0.0 are refused."""
    if value is None:
        return None
    parsed = None
    # A "+01:00" written unencoded in a URL arrives as " 01:00": read it as the zone it was.
    text = re.sub(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?) (\d{2}:?\d{2})$", r"\1+\2", value.strip())
    if _ISO_TIME.fullmatch(text):
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
    if parsed is None:
        raise InvalidRequest(name, f"{value[:40]!r} is not an ISO 8601 date or time",
                             "Give a time such as 2026-12-01 or 2026-12-01T08:00:00Z (no zone: UTC)")
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


@router.get("/entries", response_model=AuditEntriesOut, responses=errors(401, 403, 422),
            summary="Audit entries, oldest first, filtered by account, agency, dataset, action, decision, time")
def entries(caller: CurrentCaller, state: StateDep, session: ReadSession, account: Name = None, agency: Name = None,
            dataset: Name = None, action: Name = None, decision: Name = None, since: Time = None,
            until: Time = None, after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditEntriesOut:
    authorize(state, caller, Action.AUDIT_READ, "server")
    start, end = _time("since", since), _time("until", until)
    query = select(AuditEntry).where(AuditEntry.seq > after)
    for column, value in ((AuditEntry.account, account), (AuditEntry.agency, agency),
                          (AuditEntry.dataset, dataset), (AuditEntry.action, action),
                          (AuditEntry.decision, decision)):
        if value is not None:
            query = query.where(column == value)
    if start is not None:
        query = query.where(AuditEntry.created_at >= start)
    if end is not None:
        query = query.where(AuditEntry.created_at < end)
    rows = list(session.exec(query.order_by(AuditEntry.seq).limit(limit)))  # type: ignore[arg-type]
    out = [AuditEntryOut(seq=r.seq, leaf_hash=r.leaf_hash, entry=json.loads(r.entry_json)) for r in rows]
    return AuditEntriesOut(entries=out, next_after=rows[-1].seq if len(rows) == limit else None)


@router.get("/ledger", response_model=LedgerOut, responses=errors(401, 403, 422),
            summary="Every budget (spent and remaining per scope) and each charge over time")
def ledger_view(caller: CurrentCaller, state: StateDep, session: ReadSession, dataset: Name = None,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> LedgerOut:
    authorize(state, caller, Action.AUDIT_READ, "server")
    budgets = [BudgetOut(**b.as_dict()) for b in ledger_history.budgets_for(session, dataset)]
    return LedgerOut(budgets=budgets, history=ledger_history.charge_history(session, dataset, limit=limit))


TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Text"}}
ZIP = {200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
             "description": "A zip file"}}


@router.get("/checkpoint", response_class=Response, responses={**TEXT, **errors(401, 403)},
            summary="The latest signed checkpoint of the whole log (C2SP note text)")
def checkpoint(caller: CurrentCaller, state: StateDep) -> PlainTextResponse:
    authorize(state, caller, Action.AUDIT_READ, "server")
    return PlainTextResponse(state.audit.checkpoint().note)


@router.get("/public-key", response_class=Response, responses=TEXT,
            summary="The log's public (verifier) keys, current first; public, no key needed")
def public_key(state: StateDep) -> PlainTextResponse:
    keys = [state.audit.key.verifier.encode()]
    keys += [k.verifier for k in state.audit.public_keys() if k.verifier not in keys]
    return PlainTextResponse("\n".join(keys) + "\n")


def _size_within(name: str, size: int, log_size: int) -> None:
    if size > log_size:
        raise InvalidRequest(name, f"the log has {log_size} entries, not {size}",
                             "Ask for a size no larger than the latest checkpoint's")


@router.get("/proofs/inclusion", response_model=InclusionProofOut, responses=errors(401, 403, 422),
            summary="Proof that entry `seq` is in the log of `size` entries (RFC 9162)")
def inclusion(caller: CurrentCaller, state: StateDep, seq: Size, size: Size | None = None) -> InclusionProofOut:
    authorize(state, caller, Action.AUDIT_READ, "server")
    log_size = len(state.audit.sync())
    size = log_size if size is None else size
    _size_within("size", size, log_size)
    if seq >= size:
        raise InvalidRequest("seq", f"entry {seq} is not among the first {size} entries",
                             "Give a seq below the tree size")
    return InclusionProofOut(**state.audit.inclusion(seq, size))


@router.get("/proofs/consistency", response_model=ConsistencyProofOut, responses=errors(401, 403, 422),
            summary="Proof that the log of `first` entries is a prefix of the log of `second` (RFC 9162)")
def consistency(caller: CurrentCaller, state: StateDep, first: Size, second: Size) -> ConsistencyProofOut:
    authorize(state, caller, Action.AUDIT_READ, "server")
    log_size = len(state.audit.sync())
    _size_within("second", second, log_size)
    if first > second:
        raise InvalidRequest("first", f"first ({first}) is larger than second ({second})",
                             "Give the size you hold as first and the newer size as second")
    return ConsistencyProofOut(**state.audit.consistency(first, second))


@router.get("/export", response_class=Response, responses={**ZIP, **errors(401, 403)},
            summary="A bundle (zip: entries.jsonl, checkpoints, proofs) to verify offline")
async def export(caller: CurrentCaller, state: StateDep) -> FileResponse:
    await run_in_threadpool(authorize, state, caller, Action.AUDIT_READ, "server")
    handle, path = tempfile.mkstemp(prefix="civicdp-audit-", suffix=".zip")
    os.close(handle)
    try:
        head = await run_in_threadpool(state.audit.export, path)
    except BaseException:
        os.unlink(path)
        raise
    return FileResponse(path, media_type="application/zip", filename=f"civicdp-audit-{head.size}.zip",
                        background=BackgroundTask(os.unlink, path))
