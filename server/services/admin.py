"""Steward operations: accounts, keys, roles, policies, datasets and budget caps.

Used by the HTTP routes and the command line alike; every change is recorded with
who made it (``actor`` is None for the local command line), and both routes are held to
the same rules: names the API refuses are refused here too, a grant already held changes
nothing (and says so), and a revoke that removes nothing is an error (404 over HTTP, a
non-zero exit on the command line), never a silent success. Role, rule and dataset changes
go to the policy store, queued on the caller's session
(:func:`civicdp.policies.session_rules.changes_with`): the rule rows are written with the change's
audit entry, in the same transaction where the rules live in the state database (PostgreSQL),
and on SQLite, whose rules live in a file of their own, in the order that fails safe (an
entry for a grant that is not in force, never a grant in force without its entry). Once
committed, every server process sees them at its next decision
(:mod:`civicdp.policies.enforcer`).

Separation of duties (issue 19): no account holds a data-reading role (analyst, feed
consumer) beside a steward or oversight role, and an account that ever held a steward or
oversight role never reads data. A duty grant (and a duty revoke) writes deny rules naming
the account -- queries, estimates and feed reads, in every agency, whatever it holds --
which stay when the role goes; a data role is refused to an account that carries them.
So neither a duty role held in some other agency (where the role's own deny rules do not
reach the agency the account acts in), nor a revoke followed by a grant, nor an allow rule
naming the account, gives a steward or an oversight officer an answer. What this cannot
stop: a steward creates accounts and issues their keys, so it can create an analyst and
keep the key it was shown. That account is an analyst, and every step of it is in the
audit log under the steward's name (tests/server/services/test_sod_search.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import ValidationError
from sqlmodel import Session, select

from civicdp.policies.actions import QUERY_ACTIONS, Action, Role
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies.objects import WILDCARD
from civicdp.policies.rulebase import DENY
from civicdp.policies.session_rules import changes_with
from civicdp.privacy.loss import PrivacyLoss
from civicdp.server.state import auth, ledger, registry
from civicdp.server.state.errors import Conflict, InvalidRequest, NotFound
from civicdp.server.state.models import Account, ApiKey, BudgetCap, Dataset
from civicdp.server.services.schemas import AccountCreate, BudgetCapSet, PolicyRule, RoleGrant
from civicdp.server.services.query_service import Caller, record, subject_of


def _validated(model: type, **fields: object) -> None:
    """Hold the command line to the API's rules for names and numbers (InvalidRequest otherwise)."""
    try:
        model.model_validate(fields)  # type: ignore[attr-defined]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        value = fields.get(where, "")
        raise InvalidRequest(where, f"{value!r} is not accepted ({first.get('msg')})",
                             "Names start with a letter or digit and hold only letters, digits, '.', '_' and "
                             "'-' (account names also '@'), at most 100 characters") from None


def create_account(session: Session, actor: Caller | None, name: str, agency: str) -> Account:
    _validated(AccountCreate, name=name, agency=agency)
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
    """Revoke the key; NotFound if there is none, Conflict if it was revoked already (nothing changes)."""
    key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if key is None:
        raise NotFound(f"no API key with prefix '{prefix}'; list them with `civicdp keys list`")
    if key.revoked_at is not None:
        raise Conflict(f"the API key with prefix '{prefix}' was revoked already ({key.revoked_at:%Y-%m-%d %H:%M} "
                       "UTC); nothing was changed")
    auth.revoke_key(session, prefix, datetime.now(timezone.utc))
    record(session, actor, "key.revoke", prefix)
    return key


def keys_of(session: Session, account_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every API key (of one account, or of all), with its account's name: prefixes and states, never secrets."""
    query = select(ApiKey, Account.name).join(Account, Account.id == ApiKey.account_id)  # type: ignore[arg-type]
    if account_name is not None:
        query = query.where(Account.id == account_named(session, account_name).id)
    return [(key, name) for key, name in session.exec(query.order_by(Account.name, ApiKey.id))]  # type: ignore[arg-type]


def grant_role(session: Session, policies: PolicyStore, actor: Caller | None, account_name: str,
               role: Role, agency: str) -> bool:
    """Grant ``role`` in ``agency``; False (nothing recorded) if the account holds it already."""
    role = Role(role)
    _validated(RoleGrant, role=role, agency=agency)
    account_named(session, account_name)
    subject = subject_of(account_name)
    _check_separation(policies, account_name, role)
    with changes_with(session, policies):
        if not policies.grant(subject, role, agency):
            return False
        if role in DUTY_ROLES:
            _mark_duty(policies, subject)
        record(session, actor, "role.grant", account_name, role=role.value, agency=agency)
    return True


#: Roles that read data, and roles that must never: no account holds one of each (in any agency).
DATA_ROLES = frozenset({Role.ANALYST, Role.FEED_CONSUMER})
DUTY_ROLES = frozenset({Role.STEWARD, Role.OVERSIGHT})
#: What an account that ever held a duty role is denied, by rules naming it, in every agency and on every object.
DUTY_DENIALS = (*sorted(QUERY_ACTIONS), Action.FEED_READ)


def duty_denials(subject: str) -> list[list[str]]:
    """The deny rules a steward or oversight grant writes for ``subject`` (as :meth:`PolicyStore.rules` lists them)."""
    return [[subject, WILDCARD, WILDCARD, action.value, "*", DENY] for action in DUTY_DENIALS]


def _mark_duty(policies: PolicyStore, subject: str) -> None:
    """Deny ``subject`` every read of data for good (rules already present are left as they are)."""
    for action in DUTY_DENIALS:
        policies.deny(subject, WILDCARD, WILDCARD, action)


def _held_duty(policies: PolicyStore, subject: str) -> bool:
    """Does ``subject`` carry the deny rules of a duty role (it holds, or once held, steward or oversight)?"""
    rules = policies.rules()
    return all(rule in rules for rule in duty_denials(subject))


def _check_separation(policies: PolicyStore, account_name: str, role: Role) -> None:
    """Refuse a grant that would let a steward or an oversight officer read data, or the reverse."""
    held = {Role(r) for r, _ in policies.roles_of(subject_of(account_name))}
    clash = (DUTY_ROLES & held) if role in DATA_ROLES else (DATA_ROLES & held) if role in DUTY_ROLES else set()
    if clash:
        other = sorted(r.value for r in clash)[0]
        raise Conflict(f"separation of duties: account '{account_name}' holds the role {other}, so it cannot also "
                       f"hold {role.value} (stewards and oversight never read data; data readers never manage or "
                       "audit). Use another account")
    if role in DATA_ROLES and _held_duty(policies, subject_of(account_name)):
        raise Conflict(f"separation of duties: account '{account_name}' has held a steward or oversight role, so it "
                       f"cannot hold {role.value}: its queries and feed reads are denied for good (deny rules naming "
                       "it stay when the role is revoked). Use another account")


def revoke_role(session: Session, policies: PolicyStore, actor: Caller | None, account_name: str,
                role: Role, agency: str) -> None:
    """Revoke ``role`` in ``agency`` (every stored copy); NotFound if the account did not hold it.

    Revoking a steward or oversight role leaves (or, for a grant made before they existed,
    writes) the deny rules naming the account: it never reads data afterwards either.
    """
    account_named(session, account_name)
    subject = subject_of(account_name)
    with changes_with(session, policies):
        if not policies.revoke(subject, role, agency):
            held = ", ".join(f"{r} in {a}" for r, a in policies.roles_of(subject)) or "none"
            raise NotFound(f"account '{account_name}' does not hold the role {role.value} in agency '{agency}', "
                           f"so nothing was revoked (its roles: {held})")
        if Role(role) in DUTY_ROLES:
            _mark_duty(policies, subject)
        record(session, actor, "role.revoke", account_name, role=Role(role).value, agency=agency)


def add_rule(session: Session, policies: PolicyStore, actor: Caller | None, rule: PolicyRule) -> bool:
    """Add an allow or deny rule, committed with its audit entry; False (nothing recorded) if it is present."""
    with changes_with(session, policies):
        add = policies.allow if rule.effect == "allow" else policies.deny
        if not add(rule.subject, rule.agency, rule.object, rule.action, cap=rule.cap):
            return False
        # The rule as one field: its "action" would clash with record()'s own parameter.
        record(session, actor, "policy.add", rule.object, rule=rule.model_dump())
    return True


def register_dataset(session: Session, policies: PolicyStore, actor: Caller | None, folder: Path,
                     accept: frozenset[str] = frozenset(), publish_shares: bool = False) -> Dataset:
    """Register the folder's version; ``accept`` names check problems accepted, not fixed, and
    ``publish_shares`` shows analysts the shares the check found (both audited)."""
    from civicdp.server.services.classification import stated_classes

    row = registry.register(session, folder, accept, publish_shares=publish_shares)
    metadata = registry.metadata_of(row)
    # A class stated in the metadata wins (issue 14); a column without one keeps the class a
    # steward gave it, or becomes public.
    stated = stated_classes(metadata)
    with changes_with(session, policies):
        for table in metadata.tables.values():
            for column in table.columns:
                if column in stated:
                    policies.classify_column(row.name, column, stated[column])
                else:
                    policies.assign_public_column(row.name, column)
        record(session, actor, "dataset.register", row.name, version=row.version, path=row.path,
               **({"accepted": sorted(accept)} if accept else {}),
               **({"shares_published": True} if publish_shares else {}),
               **({"classes": {column: c.value for column, c in sorted(stated.items())}} if stated else {}))
    return row


def set_cap(session: Session, actor: Caller | None, dataset: str, scope: str, subject: str,
            epsilon: float) -> BudgetCap:
    _validated(BudgetCapSet, dataset=dataset, scope=scope, subject=subject, epsilon=epsilon)
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



def caps_of(session: Session, defaults: ledger.CapDefaults, dataset: str | None = None) -> list[dict[str, object]]:
    """Every cap in force, per dataset: those stewards set, feed allocations, and the server's defaults.

    A scope kind without a ``*`` cap of its own on a dataset shows the server default
    (``source``: ``default``); ``set`` is a steward's cap (``*``: every subject of the kind
    without a cap of its own); ``feed`` a feed's announced allocation. Caps of analyst,
    agency, dataset and lifetime scopes are in micro-epsilon (unit ``epsilon``), as set; feed
    allocations in the dataset's ledger unit (as budgets show it: ``epsilon`` or ``rho``).
    """
    names = [registry.get(session, dataset).name] if dataset else [r.name for r in registry.all_datasets(session)]
    rows = list(session.exec(select(BudgetCap).where(BudgetCap.dataset.in_(names))  # type: ignore[attr-defined]
                             .order_by(BudgetCap.dataset, BudgetCap.scope, BudgetCap.subject)))
    order = {kind: i for i, kind in enumerate(ledger.SCOPE_KINDS)}
    out: list[dict[str, object]] = []
    for name in names:
        accounting = ledger.accounting_of(session, name)
        mine = [r for r in rows if r.dataset == name]
        for kind in ledger.KINDS:
            if not any(r.scope == kind and r.subject == ledger.ANY for r in mine):
                out.append(_cap_view(name, kind, ledger.ANY, defaults.for_kind(kind), "default", accounting))
        out += [_cap_view(name, r.scope, r.subject, r.cap_micro,
                          "feed" if r.scope == ledger.FEED else "set", accounting) for r in mine]
    return sorted(out, key=lambda c: (str(c["dataset"]), order.get(str(c["scope"]), 99), c["subject"] != ledger.ANY,
                                      str(c["subject"])))


def _cap_view(dataset: str, scope: str, subject: str, cap_micro: int, source: str,
              accounting: object) -> dict[str, object]:
    if scope == ledger.FEED:
        unit = accounting.unit  # type: ignore[attr-defined]
        epsilon = accounting.shown(cap_micro)["epsilon"]  # type: ignore[attr-defined]
    else:
        unit, epsilon = "epsilon", cap_micro / PrivacyLoss.of(1.0).micro_epsilon  # caps are set in epsilon
    return {"dataset": dataset, "scope": scope, "subject": subject, "epsilon": epsilon, "cap_micro": cap_micro,
            "unit": unit, "source": source}
