"""A rule change and its audit entry commit together (issue 15).

Grants, revokes, allow and deny rules and dataset registrations made through
``civicdp.server.services.admin`` queue their rule rows on the steward's session
(``civicdp.policies.session_rules.changes_with``). On PostgreSQL the rules live in the state
database: rows, policy version and audit entry are one transaction. On SQLite they live in
``policies.db``, a file of its own, and the two commits are ordered to fail safe: a change
that widens access is committed only after its entry, one that only narrows it just before.

Each test injects a failure between the rule write and the commit -- the audit append
raising, or the session's commit failing after the rule rows were written -- and checks,
with a fresh policy store on the same database (what another process, or a restart, would
load), that the rule is not in force and no entry was written; and that the normal path
writes both. The crash that SQLite's two files cannot rule out (after the state commit,
before the rules' commit) is simulated too: it leaves an entry for a grant that is not in
force, never a grant in force without its entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlmodel import Session

from civicdp.policies.actions import Action, Role
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies import session_rules
from civicdp.server.services import admin
from civicdp.server.services.app_state import AppState
from civicdp.server.services.bootstrap import build_policies, build_state
from civicdp.server.services.schemas import PolicyRule
from civicdp.server.state.caller import subject_of
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import AuditEntry
from tests.server.api_fixtures import STEWARD, Api, api, dataset_folder, make_dataset_folder, settings_for  # noqa: F401

ACCOUNT = "ana-atomic"
SUBJECT = subject_of(ACCOUNT)


class Injected(RuntimeError):
    """The failure a test injects."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppState]:
    """A new state (SQLite: rules in policies.db; PostgreSQL: in the state database) with one account."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    opened = build_state(settings_for(tmp_path / "state", url, feeds_scheduler=False))
    try:
        with session_scope(opened.db) as session:
            admin.create_account(session, None, ACCOUNT, "health")
        yield opened
    finally:
        opened.close()


def fresh(state: AppState) -> PolicyStore:
    """A policy store of its own on the same database: what another process would load."""
    return build_policies(state.policy_db)


def entries(state: AppState, action: str) -> int:
    with Session(state.db) as session:
        return int(session.execute(select(func.count()).select_from(AuditEntry)
                                   .where(AuditEntry.action == action, AuditEntry.target == ACCOUNT)).scalar_one())


def entries_of(state: AppState, action: str) -> int:
    with Session(state.db) as session:
        return int(session.execute(select(func.count()).select_from(AuditEntry)
                                   .where(AuditEntry.action == action)).scalar_one())


def holds(store: PolicyStore, role: Role = Role.ANALYST, agency: str = "health") -> bool:
    return (role, agency) in store.roles_of(SUBJECT)


def version(state: AppState) -> int:
    return fresh(state)._watcher.adapter.version()  # type: ignore[union-attr]  # noqa: SLF001


def failing_audit(monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    """The audit append of ``action`` raises (after the store took the rule change)."""
    real = admin.record

    def record(session: Session, actor: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        if what == action:
            raise Injected(f"the audit append of {what} failed")
        return real(session, actor, what, *args, **kwargs)

    monkeypatch.setattr(admin, "record", record)


def failing_commit(session: Session) -> None:
    """The session's commit fails after the queued rule rows were written (a listener after the store's)."""
    def fail(_: Session) -> None:
        raise Injected("the commit failed after the rule rows were written")
    admin.account_named(session, ACCOUNT)  # the store's listener is registered at its first change; this one later
    event.listen(session, "before_commit", fail)


# -- the normal path ----------------------------------------------------------------------------------


def test_a_grant_writes_the_rule_and_its_entry(state: AppState) -> None:
    before = version(state)
    with session_scope(state.db) as session:
        assert admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
        assert holds(state.policies), "the rest of the request sees the grant (the answer lists it)"
        assert not holds(fresh(state)), "nothing is stored before the commit"
    assert holds(fresh(state)) and holds(state.policies)
    assert entries(state, "role.grant") == 1
    assert version(state) == before + 1  # one step for the change: every process reloads
    with session_scope(state.db) as session:  # held already: nothing changes, nothing is recorded
        assert not admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    assert entries(state, "role.grant") == 1 and version(state) == before + 1


def test_a_revoke_and_a_duty_grant_write_their_rules_and_entries(state: AppState) -> None:
    with session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    with session_scope(state.db) as session:
        admin.revoke_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    assert not holds(fresh(state)) and not holds(state.policies) and entries(state, "role.revoke") == 1
    with session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, ACCOUNT, Role.STEWARD, "*")
    stored = fresh(state)
    assert holds(stored, Role.STEWARD, "*")
    assert all(rule in stored.rules() for rule in admin.duty_denials(SUBJECT)), "the deny rules came with the grant"


def test_a_rule_and_a_dataset_registration_commit_with_their_entries(state: AppState, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rule = PolicyRule(subject=SUBJECT, agency="health", object="dataset:*", action=Action.DATASET_LIST)
    with session_scope(state.db) as session:
        assert admin.add_rule(session, state.policies, None, rule)
    assert [SUBJECT, "health", "dataset:*", "dataset.list", "*", "allow"] in fresh(state).rules()
    folder = make_dataset_folder(tmp_path / "datasets")
    failing_audit(monkeypatch, "dataset.register")
    with pytest.raises(Injected), session_scope(state.db) as session:
        admin.register_dataset(session, state.policies, None, folder)
    assert fresh(state).groups_of("dataset:test-services") == [] == state.policies.groups_of("dataset:test-services")
    monkeypatch.undo()
    with session_scope(state.db) as session:
        admin.register_dataset(session, state.policies, None, folder)
    assert fresh(state).groups_of("dataset:test-services") == ["dataset:*"]
    assert entries_of(state, "dataset.register") == 1


# -- failures between the rule write and the commit ----------------------------------------------------


@pytest.mark.parametrize("role, agency", [(Role.ANALYST, "health"), (Role.STEWARD, "*")])
def test_a_grant_whose_audit_entry_fails_is_not_in_force(state: AppState, monkeypatch: pytest.MonkeyPatch,
                                                         role: Role, agency: str) -> None:
    before = version(state)
    failing_audit(monkeypatch, "role.grant")
    with pytest.raises(Injected), session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, ACCOUNT, role, agency)
    assert not holds(fresh(state), role, agency), "a restart would load a grant without its entry"
    assert not holds(state.policies, role, agency), "the live store still holds what it had mirrored"
    assert not any(r in fresh(state).rules() for r in admin.duty_denials(SUBJECT))
    assert entries(state, "role.grant") == 0
    assert version(state) == before


def test_a_grant_whose_commit_fails_after_the_rows_were_written_is_not_in_force(state: AppState) -> None:
    with pytest.raises(Injected), session_scope(state.db) as session:
        failing_commit(session)
        admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    assert not holds(fresh(state)) and not holds(state.policies)
    assert entries(state, "role.grant") == 0


def test_a_revoke_that_fails_leaves_the_role_in_force_and_unrecorded(state: AppState,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    failing_audit(monkeypatch, "role.revoke")
    with pytest.raises(Injected), session_scope(state.db) as session:
        admin.revoke_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    assert holds(fresh(state)) and holds(state.policies)
    monkeypatch.undo()
    # On SQLite a revoke is written before the entry commits; a commit that fails after it is undone.
    with pytest.raises(Injected), session_scope(state.db) as session:
        failing_commit(session)
        admin.revoke_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    assert holds(fresh(state)) and holds(state.policies)
    assert entries(state, "role.revoke") == 0


def test_a_rule_whose_audit_entry_fails_is_not_in_force(state: AppState, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_audit(monkeypatch, "policy.add")
    rule = PolicyRule(subject=SUBJECT, agency="*", object="dataset:*", action=Action.QUERY_RUN, cap="0.5")
    with pytest.raises(Injected), session_scope(state.db) as session:
        admin.add_rule(session, state.policies, None, rule)
    assert [SUBJECT, "*", "dataset:*", "query.run", "0.5", "allow"] not in fresh(state).rules()
    assert [SUBJECT, "*", "dataset:*", "query.run", "0.5", "allow"] not in state.policies.rules()


def test_a_crash_between_the_two_commits_leaves_an_entry_never_a_grant_without_one(
        state: AppState, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite only splits them: the process dies after the state commit, before the rules' commit."""
    def die(changes: session_rules.SessionChanges) -> None:
        changes._close(commit=False)  # noqa: SLF001 - what a dying process's open transaction comes to
        changes.open = False

    monkeypatch.setattr(session_rules.SessionChanges, "after_commit", die)
    with session_scope(state.db) as session:
        admin.grant_role(session, state.policies, None, ACCOUNT, Role.ANALYST, "health")
    shared = state.policy_db is state.db
    assert holds(fresh(state)) == shared  # PostgreSQL: one transaction, committed whole
    assert entries(state, "role.grant") == 1


def test_over_http_a_grant_whose_entry_fails_is_refused_and_not_in_force(api: Api,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with session_scope(api.state.db) as session:
        admin.create_account(session, None, ACCOUNT, "health")
    failing_audit(monkeypatch, "role.grant")
    with pytest.raises(Injected):
        api.post(STEWARD, f"/v1/accounts/{ACCOUNT}/roles", json={"role": "analyst", "agency": "health"})
    assert not holds(build_policies(api.state.policy_db)) and not holds(api.state.policies)
    monkeypatch.undo()
    granted = api.post(STEWARD, f"/v1/accounts/{ACCOUNT}/roles", json={"role": "analyst", "agency": "health"})
    assert granted.status_code == 200 and granted.json()["roles"] == [{"role": "analyst", "agency": "health"}]
    assert holds(build_policies(api.state.policy_db))
