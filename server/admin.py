"""Steward operations: accounts, keys, roles, policies, datasets and budget caps.

Used by the HTTP routes and the command line alike; every change is recorded with
who made it (``actor`` is None for the local command line).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlmodel import Session, select

from policies.actions import Role
from policies.enforcer import PolicyStore
from privacy.loss import PrivacyLoss
from server import auth, ledger, registry
from server.errors import Conflict, NotFound
from server.models import Account, ApiKey, BudgetCap, Dataset
from server.service import Caller, record, subject_of


def create_account(session: Session, actor: Caller | None, name: str, agency: str) -> Account:
    if session.exec(select(Account).where(Account.name == name)).first() is not None:
        raise Conflict(f"an account named '{name}' exists already")
    account = Account(name=name, agency=agency)
    session.add(account)
    session.flush()
    record(session, actor, "account.create", name, agency=agency)
    return account


def account_named(session: Session, name: str) -> Account:
    account = session.exec(select(Account).where(Account.name == name)).first()
    if account is None:
        raise NotFound(f"no account named '{name}'")
    return account


def issue_key(session: Session, actor: Caller | None, account_name: str, secret: bytes,
              expires_in_days: int | None = 90) -> tuple[ApiKey, str]:
    account = account_named(session, account_name)
    expires = datetime.now(timezone.utc) + timedelta(days=expires_in_days) if expires_in_days else None
    key, plaintext = auth.create_key(session, account.id, secret, expires_at=expires)
    record(session, actor, "key.create", account_name, prefix=key.prefix,
           expires_at=expires.isoformat() if expires else None)
    return key, plaintext


def revoke_key(session: Session, actor: Caller | None, prefix: str) -> ApiKey:
    key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if key is None:
        raise NotFound(f"no API key with prefix '{prefix}'")
    auth.revoke_key(session, prefix, datetime.now(timezone.utc))
    record(session, actor, "key.revoke", prefix)
    return key


def grant_role(session: Session, policies: PolicyStore, actor: Caller | None, account_name: str,
               role: Role, agency: str) -> None:
    account_named(session, account_name)
    policies.grant(subject_of(account_name), role, agency)
    record(session, actor, "role.grant", account_name, role=role.value, agency=agency)


def revoke_role(session: Session, policies: PolicyStore, actor: Caller | None, account_name: str,
                role: Role, agency: str) -> None:
    account_named(session, account_name)
    policies.revoke(subject_of(account_name), role, agency)
    record(session, actor, "role.revoke", account_name, role=role.value, agency=agency)


def register_dataset(session: Session, policies: PolicyStore, actor: Caller | None, folder: Path) -> Dataset:
    row = registry.register(session, folder)
    metadata = registry.metadata_of(row)
    for table in metadata.tables.values():
        for column in table.columns:
            policies.assign_public_column(row.name, column)
    record(session, actor, "dataset.register", row.name, version=row.version, path=row.path)
    return row


def set_cap(session: Session, actor: Caller | None, dataset: str, scope: str, subject: str,
            epsilon: float) -> BudgetCap:
    registry.get(session, dataset)
    micro = PrivacyLoss.of(epsilon).micro_epsilon
    cap = session.exec(select(BudgetCap).where(BudgetCap.dataset == dataset, BudgetCap.scope == scope,
                                               BudgetCap.subject == subject)).first()
    if cap is None:
        cap = BudgetCap(dataset=dataset, scope=scope, subject=subject, cap_micro=micro)
    cap.cap_micro = micro
    session.add(cap)
    session.flush()
    # Budget rows copy their cap when created: bring this period's and the lifetime row up to date.
    ledger.apply_cap(session, dataset, scope, subject, micro, now=datetime.now(timezone.utc))
    record(session, actor, "budget.set_cap", dataset, scope=scope, subject=subject, cap_micro=micro)
    return cap
