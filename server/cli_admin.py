"""Steward commands on the server's own state: accounts, keys, roles, datasets, budgets.

They act on the state database directly (``CIVICDP_DATA_DIR`` or ``DATABASE_URL``),
as the operator on the server machine, and record every change like the API does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlmodel import select

from policies.actions import Role
from queries.errors import QueryError
from server import admin, ledger
from server.bootstrap import build_state
from server.cli_common import fail
from server.db import session_scope
from server.deps import AppState
from server.errors import Conflict, NotFound
from server.models import Account
from server.service import subject_of
from server.settings import Settings

console = Console(soft_wrap=True)
accounts = typer.Typer(help="Accounts of analysts, stewards, oversight officers and feed consumers.",
                       no_args_is_help=True)
keys = typer.Typer(help="API keys (shown once at creation).", no_args_is_help=True)
roles = typer.Typer(help="Roles per agency.", no_args_is_help=True)
datasets = typer.Typer(help="Registered datasets.", no_args_is_help=True)
budgets = typer.Typer(help="Budget caps and spending.", no_args_is_help=True)


@contextmanager
def _state() -> Iterator[AppState]:
    state = build_state(Settings())
    try:
        yield state
    except (NotFound, Conflict, QueryError, ValueError) as exc:
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
    with _state() as state, session_scope(state.db) as session:
        key, plaintext = admin.issue_key(session, None, account, state.secret, expires_in_days)
    console.print(f"API key for {account} (shown once, store it safely):\n{plaintext}")


@keys.command("revoke")
def keys_revoke(prefix: str) -> None:
    with _state() as state, session_scope(state.db) as session:
        admin.revoke_key(session, None, prefix)
    console.print(f"revoked key {prefix}")


@roles.command("grant")
def roles_grant(account: str, role: Role, agency: str) -> None:
    with _state() as state, session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, account, role, agency)
    console.print(f"granted {role.value} in {agency} to {account}")


@roles.command("revoke")
def roles_revoke(account: str, role: Role, agency: str) -> None:
    with _state() as state, session_scope(state.db) as session:
        admin.revoke_role(session, state.policies, None, account, role, agency)
    console.print(f"revoked {role.value} in {agency} from {account}")


@datasets.command("register")
def datasets_register(folder: Path) -> None:
    with _state() as state, session_scope(state.db) as session:
        row = admin.register_dataset(session, state.policies, None, folder)
        name, version = row.name, row.version
    console.print(f"registered {name} version {version}")


@datasets.command("list")
def datasets_list() -> None:
    from server import registry

    with _state() as state, session_scope(state.db) as session:
        for row in registry.all_datasets(session):
            console.print(f"{row.name}\tversion={row.version}\tpath={row.path}")


@budgets.command("set")
def budgets_set(dataset: str, scope: Annotated[str, typer.Argument(help="analyst, agency, dataset or lifetime")],
                epsilon: float, subject: Annotated[str, typer.Option(help="Account or agency; * for all")] = "*") -> None:
    if scope not in ("analyst", "agency", "dataset", "lifetime"):
        raise typer.BadParameter("scope must be analyst, agency, dataset or lifetime")
    with _state() as state, session_scope(state.db) as session:
        admin.set_cap(session, None, dataset, scope, subject, epsilon)
    console.print(f"cap of {scope} {subject} on {dataset}: epsilon {epsilon}")


@budgets.command("list")
def budgets_list(dataset: Annotated[str | None, typer.Option()] = None) -> None:
    with _state() as state, session_scope(state.db) as session:
        console.print_json(json.dumps([b.as_dict() for b in ledger.budgets_for(session, dataset)]))
