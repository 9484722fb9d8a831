"""Steward pages: datasets and their versions, accounts, keys, roles, caps, feeds, monitors — and changes.

Reads and changes call the ``/v1`` handlers (``routes/admin.py``, ``routes/budgets.py``,
``routes/datasets.py``, ``routes/feeds.py``, ``routes/monitors.py``), so the policy decides
and each change commits with its audit entry as it does through the API. Keys are listed
as the API's key answers show them: prefix, dates, revocation — never a secret or its hash.
A key just issued is shown once, on the answer to the form's post (never in a URL, never stored).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import select

from civicdp.policies.actions import Action, Role
from civicdp.server.http.console.deps import ConsoleRoute, FormDep, SignedDep, page
from civicdp.server.http.deps import ReadSession, StateDep, WriteSession, authorize
from civicdp.server.http.routes import admin as admin_api
from civicdp.server.http.routes import budgets as budgets_api
from civicdp.server.http.routes import datasets as datasets_api
from civicdp.server.http.routes import feeds as feeds_api
from civicdp.server.http.routes import monitors as monitors_api
from civicdp.server.services.schemas import AccountCreate, BudgetCapSet, RoleGrant
from civicdp.server.state.models import Account, ApiKey, DatasetPreparation

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False, prefix="/console/steward")

#: The confirmation a change redirects with (``?done=<code>``). Fixed texts: a link someone else
#: wrote cannot put its own words on the page (an unknown code shows nothing).
DONE = {
    "cap_set": "Cap set (recorded in the audit log as budget.set_cap).",
    "key_revoked": "Key revoked: its sessions end now (recorded in the audit log).",
    "role_granted": "Role granted (recorded in the audit log).",
    "role_revoked": "Role revoked (recorded in the audit log).",
    "account_created": "Account created (recorded in the audit log). Grant it a role and issue it a key below.",
    "feed_released": "Feed release produced and signed (recorded in the audit log).",
    "rule_added": "Policy rule added (recorded in the audit log as policy.add).",
    "feed_defined": "Feed defined (recorded in the audit log as feed.define).",
    "monitor_defined": "Monitor defined; its whole horizon's loss is charged (recorded in the audit log).",
    "monitor_stopped": "Monitor stopped (recorded in the audit log).",
}


def _keys(state: StateDep, session: ReadSession, signed: SignedDep) -> list[dict[str, Any]]:
    authorize(state, signed.caller, Action.KEY_MANAGE, "server")
    rows = session.exec(select(ApiKey.prefix, Account.name, ApiKey.created_at, ApiKey.expires_at, ApiKey.revoked_at)
                        .join(Account, Account.id == ApiKey.account_id)  # type: ignore[arg-type]
                        .order_by(Account.name, ApiKey.created_at)).all()
    return [{"prefix": r[0], "account": r[1], "created_at": r[2], "expires_at": r[3], "revoked_at": r[4]} for r in rows]


def _versions(state: StateDep, session: ReadSession, signed: SignedDep) -> list[DatasetPreparation]:
    authorize(state, signed.caller, Action.DATASET_MANAGE, "server")
    return list(session.exec(select(DatasetPreparation).order_by(DatasetPreparation.dataset,  # type: ignore[arg-type]
                                                                 DatasetPreparation.id.desc())))  # type: ignore[union-attr]


@router.get("", response_class=HTMLResponse)
def overview(request: Request, state: StateDep, session: ReadSession, signed: SignedDep,
             done: str | None = None) -> HTMLResponse:
    caller = signed.caller
    return page(request, "steward.html", signed, title="Administration", done=DONE.get(done or "", ""),
                datasets=datasets_api.list_datasets(caller, state, session), versions=_versions(state, session, signed),
                accounts=admin_api.list_accounts(caller, state, session), keys=_keys(state, session, signed),
                caps=budgets_api.list_caps(caller, state, session), feeds=feeds_api.overview(caller, state),
                monitors=monitors_api.list_monitors(caller, state), role_names=[r.value for r in Role],
                action_names=[a.value for a in Action])


def redirect_done(code: str) -> RedirectResponse:
    return RedirectResponse(f"/console/steward?{urlencode({'done': code})}", status_code=303)


@router.post("/cap")
def set_cap(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    body = BudgetCapSet(dataset=form.get("dataset", ""), scope=form.get("scope", ""),
                        subject=form.get("subject") or "*", epsilon=form.get("epsilon", ""))  # type: ignore[arg-type]
    budgets_api.set_cap(body, signed.caller, state, session)
    return redirect_done("cap_set")


@router.post("/keys/revoke")
def revoke_key(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    prefix = form.get("prefix", "")[:32]
    admin_api.revoke_key(prefix, signed.caller, state, session)
    return redirect_done("key_revoked")


@router.post("/roles/grant")
def grant_role(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    name = form.get("account", "")[:100]
    grant = RoleGrant(role=form.get("role", ""), agency=form.get("agency", ""))  # type: ignore[arg-type]
    admin_api.grant_role(name, grant, signed.caller, state, session)
    return redirect_done("role_granted")


@router.post("/roles/revoke")
def revoke_role(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    name, agency = form.get("account", "")[:100], form.get("agency", "")[:100]
    role = RoleGrant(role=form.get("role", ""), agency=agency or "*").role  # type: ignore[arg-type]
    admin_api.revoke_role(name, role, agency, signed.caller, state, session)
    return redirect_done("role_revoked")


@router.post("/accounts")
def create_account(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    body = AccountCreate(name=form.get("name", ""), agency=form.get("agency", ""))
    admin_api.create_account(body, signed.caller, state, session)
    return redirect_done("account_created")


@router.post("/keys", response_class=HTMLResponse)
def issue_key(request: Request, state: StateDep, session: WriteSession, signed: SignedDep,
              form: FormDep) -> HTMLResponse:
    """The new key's secret on this answer only: not in a URL, and ``Cache-Control: no-store`` (:func:`page`)."""
    days = form.get("expires_in_days", "90")
    body = admin_api.KeyCreate(expires_in_days=None if days == "never" else days)  # type: ignore[arg-type]
    issued = admin_api.create_key(form.get("account", "")[:100], signed.caller, state, session, body)
    return page(request, "key_issued.html", signed, title="API key issued", key=issued)


@router.post("/feeds/release")
def release_feed(state: StateDep, signed: SignedDep, form: FormDep) -> RedirectResponse:
    feeds_api.trigger(form.get("name", "")[:100], signed.caller, state)
    return redirect_done("feed_released")
