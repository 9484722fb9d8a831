"""Steward commands on the server's own state: accounts, keys, roles, datasets, budgets.

They act on the state database directly (``CIVICDP_DATA_DIR`` or ``DATABASE_URL``),
as the operator on the server machine, and record every change like the API does. They
refuse to run on a missing state (create it once with ``civicdp init``) or on files that
do not belong with the database. A change is in force on every running server process
at its next request; a revoke that removes nothing is an error (exit status 2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import select

from civicdp.policies.actions import ColumnClass, Role
from civicdp.policies.errors import PolicyError
from civicdp.queries.errors import QueryError
from civicdp.server.services import admin
from civicdp.server.state import ledger_history
from civicdp.server.services.bootstrap import build_state
from civicdp.server.cli.common import fail
from civicdp.server.state.db import session_scope
from civicdp.server.services.app_state import AppState
from civicdp.server.state.errors import Conflict, InvalidRequest, NotFound
from civicdp.server.state.identity import StateError
from civicdp.server.state.models import Account, utcnow
from civicdp.server.services.query_service import subject_of
from civicdp.server.state.settings import Settings

console = Console(soft_wrap=True)
accounts = typer.Typer(help="Accounts of analysts, stewards, oversight officers and feed consumers.",
                       no_args_is_help=True)
keys = typer.Typer(help="API keys (shown once at creation).", no_args_is_help=True)
roles = typer.Typer(help="Roles per agency.", no_args_is_help=True)
datasets = typer.Typer(help="Registered datasets.", no_args_is_help=True)
budgets = typer.Typer(help="Budget caps and spending.", no_args_is_help=True)


@contextmanager
def _state() -> Iterator[AppState]:
    try:
        state = build_state(Settings())
    except StateError as exc:
        fail(str(exc))
    try:
        yield state
    except (NotFound, Conflict, InvalidRequest, QueryError, PolicyError, ValueError) as exc:
        fail(str(exc))
    finally:
        state.close()


@accounts.command("create")
def accounts_create(name: str, agency: Annotated[str, typer.Option(help="The account's agency")]) -> None:
    with _state() as state, session_scope(state.db) as session:
        admin.create_account(session, None, name, agency)
    console.print(f"created account {name} in agency {agency}")


@accounts.command("list")
def accounts_list() -> None:
    with _state() as state, session_scope(state.db) as session:
        for account in session.exec(select(Account).order_by(Account.name)):
            granted = ", ".join(f"{r}@{a}" for r, a in state.policies.roles_of(subject_of(account.name)))
            console.print(f"{account.name}\tagency={account.agency}\troles={granted or '-'}")


@keys.command("create")
def keys_create(account: str, expires_in_days: Annotated[int, typer.Option(min=1, max=3650)] = 90) -> None:
    """Issue a key; the key is shown once, its prefix (for `keys revoke`) is listed by `keys list`."""
    with _state() as state, session_scope(state.db) as session:
        key, plaintext = admin.issue_key(session, None, account, state.secret, expires_in_days)
        prefix, expires = key.prefix, key.expires_at
    console.print(f"API key for {account} (shown once, store it safely):\n{plaintext}", highlight=False)
    console.print(f"prefix {prefix} (revoke with: civicdp keys revoke {prefix}); expires "
                  f"{expires:%Y-%m-%d %H:%M} UTC" if expires else f"prefix {prefix}; never expires", highlight=False)


@keys.command("list")
def keys_list(account: Annotated[str | None, typer.Option(help="Only this account's keys")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Every API key's prefix, account and state (never the keys themselves)."""
    now = utcnow()
    with _state() as state, session_scope(state.db) as session:
        rows = [_key_row(key, name, now) for key, name in admin.keys_of(session, account)]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no API keys" + (f" for {account}" if account else ""))
        return
    table = Table("prefix", "account", "created", "expires", "state")
    for row in rows:
        table.add_row(row["prefix"], row["account"], row["created_at"][:16].replace("T", " "),
                      (row["expires_at"] or "never")[:16].replace("T", " "), row["state"])
    console.print(table)


def _key_row(key: object, account: str, now: object) -> dict[str, object]:
    def aware(value: object) -> object:
        return value.replace(tzinfo=now.tzinfo) if value is not None and value.tzinfo is None else value  # type: ignore[attr-defined]

    created, expires, revoked = (aware(getattr(key, f)) for f in ("created_at", "expires_at", "revoked_at"))
    state = ("revoked" if revoked is not None else "expired" if expires is not None and expires <= now  # type: ignore[operator]
             else "active")
    return {"prefix": key.prefix, "account": account, "created_at": created.isoformat(),  # type: ignore[attr-defined]
            "expires_at": expires.isoformat() if expires else None,  # type: ignore[attr-defined]
            "revoked_at": revoked.isoformat() if revoked else None, "state": state}  # type: ignore[attr-defined]


@keys.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its prefix (see `keys list`); an unknown or already revoked key is an error."""
    with _state() as state, session_scope(state.db) as session:
        admin.revoke_key(session, None, prefix)
    console.print(f"revoked key {prefix}")


@roles.command("grant")
def roles_grant(account: str, role: Role, agency: str) -> None:
    """Grant a role in an agency ('*': every agency); in force on running servers at their next request."""
    with _state() as state, session_scope(state.db) as session:
        granted = admin.grant_role(session, state.policies, None, account, role, agency)
    if granted:
        console.print(f"granted {role.value} in {agency} to {account}")
    else:
        console.print(f"{account} already holds {role.value} in {agency}: nothing changed")


@roles.command("revoke")
def roles_revoke(account: str, role: Role, agency: str) -> None:
    """Revoke a role (every copy of the grant); exit status 2 if the account did not hold it."""
    with _state() as state, session_scope(state.db) as session:
        admin.revoke_role(session, state.policies, None, account, role, agency)
    console.print(f"revoked {role.value} in {agency} from {account}")


@datasets.command("classify")
def datasets_classify(dataset: str, column: str,
                      column_class: Annotated[ColumnClass, typer.Argument(
                          metavar="CLASS", help="public, quasi (quasi-identifier: the lower per-query cap) or "
                                                "sensitive (never queried)")]) -> None:
    """Change a column's class; in force on running servers at their next request, recorded in the audit log."""
    from civicdp.server.services import classification

    with _state() as state, session_scope(state.db) as session:
        changed = classification.classify_column(session, state.policies, None, dataset, column, column_class)
    if changed:
        console.print(f"column {column} of {dataset} is now {column_class.value}")
    else:
        console.print(f"column {column} of {dataset} is {column_class.value} already: nothing changed")


@datasets.command("list")
def datasets_list() -> None:
    from civicdp.server.state import registry

    with _state() as state, session_scope(state.db) as session:
        for row in registry.all_datasets(session):
            console.print(f"{row.name}\tversion={row.version}\tpath={row.path}")


@budgets.command("set")
def budgets_set(dataset: str, scope: Annotated[str, typer.Argument(help="analyst, agency, dataset or lifetime")],
                epsilon: float, subject: Annotated[str, typer.Option(help="Account or agency; * for all")] = "*") -> None:
    """Set a cap; in force on running servers at their next request."""
    if scope not in ("analyst", "agency", "dataset", "lifetime"):
        raise typer.BadParameter("scope must be analyst, agency, dataset or lifetime")
    with _state() as state, session_scope(state.db) as session:
        admin.set_cap(session, None, dataset, scope, subject, epsilon)
    console.print(f"cap of {scope} {subject} on {dataset}: epsilon {epsilon}")


@budgets.command("list")
def budgets_list(dataset: Annotated[str | None, typer.Option()] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON (renews_at null: never)")] = False,
                 ) -> None:
    """Budgets opened so far (spent, remaining, renewal); caps of scopes not opened yet: `budgets caps`."""
    with _state() as state, session_scope(state.db) as session:
        rows = [b.as_dict() for b in ledger_history.budgets_for(session, dataset)]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no budgets opened yet (a budget opens at its first charge); caps: civicdp budgets caps")
        return
    table = Table("dataset", "scope", "subject", "period", "cap", "spent", "remaining", "renews")
    for b in rows:
        renews = b["renews_at"][:10] if b["renews_at"] else "never"  # the lifetime scope
        table.add_row(b["dataset"], b["scope"], b["subject"], b["period"], f"{b['cap_epsilon']:g}",
                      f"{b['spent_epsilon']:g}", f"{b['remaining_epsilon']:g}", renews)
    console.print(table)


@budgets.command("caps")
def budgets_caps(dataset: Annotated[str | None, typer.Option()] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Every cap in force: those stewards set, feed allocations, and the server's defaults."""
    with _state() as state, session_scope(state.db) as session:
        rows = admin.caps_of(session, state.caps, dataset)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no datasets registered")
        return
    table = Table("dataset", "scope", "subject", "epsilon", "source")
    for c in rows:
        table.add_row(str(c["dataset"]), str(c["scope"]), str(c["subject"]), f"{c['epsilon']:g}", str(c["source"]))
    console.print(table)
