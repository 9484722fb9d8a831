"""Oversight pages: budgets over time, the audit log and its entries, refusals, checkpoints, exports.

Each page calls the ``/v1`` handler that answers the same question (``routes/audit.py``,
``routes/budgets.py``), so it is refused, allowed and audited exactly as that API call.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlmodel import select

from civicdp.policies.actions import Action
from civicdp.server.http.console import charts
from civicdp.server.http.console.deps import ConsoleRoute, SignedDep, page
from civicdp.server.http.deps import ReadSession, StateDep, authorize
from civicdp.server.http.routes import audit as audit_api
from civicdp.server.http.routes import feeds as feeds_api
from civicdp.server.state.models import AuditCheckpoint, AuditEntry

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False, prefix="/console")
Name = Annotated[str | None, Query(max_length=200)]
PAGE = 50
#: The charts show at most this many charges and refusals (the newest refusals).
CHART_ROWS = 10_000


def _blank(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


@router.get("/oversight", response_class=HTMLResponse)
def budgets(request: Request, state: StateDep, session: ReadSession, signed: SignedDep,
            dataset: Name = None) -> HTMLResponse:
    ledger = audit_api.ledger_view(signed.caller, state, session, dataset=_blank(dataset), limit=CHART_ROWS)
    refusals = session.exec(select(AuditEntry.created_at, AuditEntry.decision)
                            .where(AuditEntry.decision.in_(("denied", "refused", "unauthenticated")))  # type: ignore[attr-defined]
                            .order_by(AuditEntry.seq.desc()).limit(CHART_ROWS)).all()  # type: ignore[attr-defined]
    checkpoints = session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(20)).all()  # type: ignore[attr-defined]
    data = {"budgets": charts.budget_charts(ledger.budgets, ledger.history),
            "refusals": charts.refusal_chart([(r[0], r[1]) for r in refusals])}
    return page(request, "oversight.html", signed, title="Budgets and refusals", budgets=ledger.budgets,
                charts=data, checkpoints=checkpoints, dataset=dataset or "")


@router.get("/audit", response_class=HTMLResponse)
def audit_log(request: Request, state: StateDep, session: ReadSession, signed: SignedDep, account: Name = None,
              agency: Name = None, action: Name = None, decision: Name = None, since: Name = None,
              until: Name = None, after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
              latest: bool = False) -> HTMLResponse:
    filters = {"account": _blank(account), "agency": _blank(agency), "action": _blank(action),
               "decision": _blank(decision), "since": _blank(since), "until": _blank(until)}
    if latest:
        after = max(-1, len(state.audit.sync()) - PAGE - 1)
    answer = audit_api.entries(signed.caller, state, session, dataset=None, after=after, limit=PAGE, **filters)
    return page(request, "audit.html", signed, title="Audit log", entries=answer.entries,
                next_after=answer.next_after, filters={k: v or "" for k, v in filters.items()})


@router.get("/audit/{seq}", response_class=HTMLResponse)
def audit_entry(request: Request, state: StateDep, session: ReadSession, signed: SignedDep, seq: int) -> HTMLResponse:
    answer = audit_api.entries(signed.caller, state, session, account=None, agency=None, dataset=None,
                               action=None, decision=None, since=None, until=None, after=seq - 1, limit=1)
    found = answer.entries[0] if answer.entries and answer.entries[0].seq == seq else None
    return page(request, "audit_entry.html", signed, title=f"Audit entry {seq}", item=found,
                status_code=200 if found else 404)


@router.get("/feeds-overview", response_class=HTMLResponse)
def feeds_overview(request: Request, state: StateDep, signed: SignedDep) -> HTMLResponse:
    return page(request, "feeds_overview.html", signed, title="Feeds",
                feeds=feeds_api.overview(signed.caller, state))


@router.get("/verify", response_class=HTMLResponse)
def verify(request: Request, state: StateDep, signed: SignedDep) -> HTMLResponse:
    authorize(state, signed.caller, Action.AUDIT_READ, "server")
    return page(request, "verify.html", signed, title="Verify the audit log in this browser",
                public_keys=audit_api.public_key(state).body.decode().split())


@router.get("/audit-log/entries.jsonl")
def raw_entries(state: StateDep, session: ReadSession, signed: SignedDep,
                after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
                limit: Annotated[int, Query(ge=1, le=50_000)] = 10_000) -> Response:
    """The entries' exact bytes (what was hashed), one per line, for the verification in the browser."""
    authorize(state, signed.caller, Action.AUDIT_READ, "server")
    rows = session.exec(select(AuditEntry.entry_json).where(AuditEntry.seq > after)
                        .order_by(AuditEntry.seq).limit(limit)).all()  # type: ignore[arg-type]
    return Response("".join(f"{text}\n" for text in rows), media_type="application/x-ndjson; charset=utf-8")


@router.get("/audit-log/checkpoints")
def raw_checkpoints(state: StateDep, session: ReadSession, signed: SignedDep) -> dict[str, list[str]]:
    """Every signed checkpoint the server holds, oldest first (signed notes, as stored)."""
    authorize(state, signed.caller, Action.AUDIT_READ, "server")
    notes = session.exec(select(AuditCheckpoint.note).order_by(AuditCheckpoint.size)).all()  # type: ignore[arg-type]
    return {"checkpoints": list(notes), "public_keys": audit_api.public_key(state).body.decode().split()}


@router.get("/export/audit")
async def export_audit(state: StateDep, signed: SignedDep) -> FileResponse:
    return await audit_api.export(signed.caller, state)


def _cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ is quoted with '."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value


@router.get("/export/ledger.csv")
def export_ledger(state: StateDep, session: ReadSession, signed: SignedDep, dataset: Name = None) -> Response:
    ledger = audit_api.ledger_view(signed.caller, state, session, dataset=_blank(dataset), limit=10_000)
    out = io.StringIO()
    fields = ["time", "dataset", "scope", "subject", "period", "amount_micro", "before_micro", "after_micro",
              "cap_micro", "release_id", "account"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in ledger.history)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="civicdp-ledger.csv"'})
