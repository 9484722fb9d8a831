"""Role-level decisions: would a holder of role R in agency A be allowed this request? (issue 19)

A feed is defined by a steward for consumer agencies, so the server asks of a *role*
what :meth:`PolicyStore.check` asks of an account. :meth:`PolicyStore.check_role` and
:meth:`PolicyStore.check_role_all` must apply exactly the rules ``check`` applies to an
account holding that role in that agency and nothing else -- per-query caps, column
classes, separation of duties, agencies -- and change nothing in the store.
"""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import pytest
import sqlalchemy
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from civicdp.policies.actions import QUERY_ACTIONS, Action, ColumnClass, Role
from civicdp.policies.decisions import holder_subject
from civicdp.policies.enforcer import Decision, PolicyStore
from civicdp.policies.storage import VersionedAdapter

from .sample import build_store, populate

DEMO = "dataset:civic-demo"
SERVICE = "column:civic-demo/service"
CHANNEL = "column:civic-demo/channel"
WAITING = "column:civic-demo/waiting_minutes"
REMARK = "column:civic-demo/remark"
HEALTH_ONLY = "dataset:health-only"
HEALTH_ONLY_SERVICE = "column:health-only/service"
FEED = "feed:weekly"

AGENCIES = ("health", "transport", "audit-office", "*")
OBJECTS = (DEMO, SERVICE, CHANNEL, WAITING, REMARK, HEALTH_ONLY, HEALTH_ONLY_SERVICE, FEED, "server",
           "column:civic-demo/unclassified", "dataset:*")
EPSILONS = (None, 0.01, 0.05, 0.1, 0.10000001, 0.3, 0.5, 0.5000001, 0.8, 2.0, "0.25", 0, -1.0, math.nan, math.inf)


def holder(role: Role, held_in: str) -> str:
    """The account the comparison store grants exactly ``role`` in ``held_in``."""
    return f"account:only-{role.value}-{'all' if held_in == '*' else held_in}"


@pytest.fixture(scope="module")
def holders() -> PolicyStore:
    """The sample store plus one account per (role, agency) holding only that role there. Read-only."""
    store = build_store()
    for role, held_in in itertools.product(Role, AGENCIES):
        store.grant(holder(role, held_in), role, held_in)
    return store


def assert_same(store: PolicyStore, role: Role, agency: str, objects: list[str], action: Action | str,
                epsilon: object, held_in: str | None = None) -> Decision:
    """check_role_all for the role == check_all for the account holding it (reasons up to the asker's name)."""
    home = agency if held_in is None else held_in
    account = holder(role, home)
    by_role = store.check_role_all(role, agency, objects, action, epsilon, held_in=held_in)  # type: ignore[arg-type]
    by_account = store.check_all(account, agency, objects, action, epsilon)  # type: ignore[arg-type]
    assert (by_role.allowed, by_role.rule, by_role.rules) == (by_account.allowed, by_account.rule, by_account.rules)
    who = f"a holder of {role.value!r} in {home!r}"
    expected = (by_account.reason.replace(f"{account!r} ({role.value} in {home})", who)
                .replace(repr(account), who))
    assert by_role.reason == expected
    if len(objects) == 1:
        single = store.check_role(role, agency, objects[0], action, epsilon, held_in=held_in)  # type: ignore[arg-type]
        assert single == by_role
    return by_role


# -- caps and column classes ------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(QUERY_ACTIONS))
def test_a_loss_above_the_roles_per_query_cap_is_refused(holders: PolicyStore, action: Action) -> None:
    for obj, cap, over in ((DEMO, "0.5", 0.8), (SERVICE, "0.5", 0.5000001), (WAITING, "0.1", 0.2)):
        decision = holders.check_role(Role.ANALYST, "health", obj, action, over)
        assert not decision.allowed
        assert decision.rule is not None and decision.rule[4] == cap and decision.rule[5] == "allow"
        assert decision.reason.startswith(f"the per-query cap {cap} is below the requested epsilon {over}")
        assert not holders.check("account:ana-health", "health", obj, action, over).allowed
        assert holders.check_role(Role.ANALYST, "health", obj, action, float(cap)).allowed


def test_a_sensitive_column_is_refused_whatever_the_loss(holders: PolicyStore) -> None:
    for epsilon in (0.5, 0.01, 1e-9):
        decision = holders.check_role(Role.ANALYST, "health", REMARK, Action.QUERY_RUN, epsilon)
        assert not decision.allowed
        assert decision.rule == ["analyst", "*", "colset:*/sensitive", "query.run", "*", "deny"]
        assert decision.reason.startswith("rule [analyst, *, colset:*/sensitive, query.run, *, deny] forbids "
                                          "a holder of 'analyst' in 'health'")
        assert not holders.check("account:ana-health", "health", REMARK, Action.QUERY_RUN, epsilon).allowed


def test_a_query_is_judged_on_its_dataset_and_every_column(holders: PolicyStore) -> None:
    """A feed spec's objects, as the server lists them: the dataset, then each column it reads."""
    allowed = holders.check_role_all(Role.ANALYST, "health", [DEMO, CHANNEL, SERVICE, WAITING], Action.QUERY_RUN, 0.1)
    assert allowed.allowed
    account = holders.check_all("account:ana-health", "health", [DEMO, CHANNEL, SERVICE, WAITING], Action.QUERY_RUN,
                                0.1)
    assert (allowed.rule, allowed.rules) == (account.rule, account.rules)
    assert [rule[2] for rule in allowed.rules] == ["dataset:*", "colset:*/public", "colset:*/quasi"]
    # The quasi-identifier holds the whole query to its smaller cap:
    over = holders.check_role_all(Role.ANALYST, "health", [DEMO, SERVICE, WAITING], Action.QUERY_RUN, 0.3)
    assert not over.allowed and over.rule is not None and over.rule[2] == "colset:*/quasi"
    # One sensitive column refuses it at any loss:
    sensitive = holders.check_role_all(Role.ANALYST, "health", [DEMO, SERVICE, REMARK], Action.QUERY_RUN, 0.01)
    assert not sensitive.allowed and sensitive.rule is not None and sensitive.rule[-1] == "deny"
    assert not holders.check_role_all(Role.ANALYST, "health", [], Action.QUERY_RUN, 0.1).allowed


def test_a_query_action_needs_a_valid_epsilon(holders: PolicyStore) -> None:
    assert holders.check_role(Role.ANALYST, "health", SERVICE, Action.QUERY_RUN) == Decision(
        False, None, "query.run needs the epsilon the query would spend")
    bad_epsilons: tuple[object, ...] = (0, -0.1, math.nan, math.inf, True, "lots")
    for bad in bad_epsilons:
        decision = holders.check_role(Role.ANALYST, "health", SERVICE, Action.QUERY_RUN, bad)  # type: ignore[arg-type]
        assert not decision.allowed and decision.rule is None


# -- separation of duties and agencies --------------------------------------------------------


@pytest.mark.parametrize("role", [Role.STEWARD, Role.OVERSIGHT, Role.FEED_CONSUMER])
def test_roles_without_data_access_are_refused_queries(holders: PolicyStore, role: Role) -> None:
    for agency in ("health", "*"):
        for obj in (DEMO, SERVICE):
            assert not holders.check_role(role, agency, obj, Action.QUERY_RUN, 0.01).allowed


def test_a_steward_role_is_refused_even_when_allowed_by_mistake(store: PolicyStore) -> None:
    store.allow(Role.STEWARD, "*", "dataset:*", Action.QUERY_RUN, 0.5)
    decision = store.check_role(Role.STEWARD, "health", DEMO, Action.QUERY_RUN, 0.1)
    assert not decision.allowed and decision.rule == ["steward", "*", "*", "query.run", "*", "deny"]


def test_a_feed_consumer_may_read_feeds_but_not_data(holders: PolicyStore) -> None:
    assert holders.check_role(Role.FEED_CONSUMER, "health", FEED, Action.FEED_READ).allowed
    assert not holders.check_role(Role.FEED_CONSUMER, "health", DEMO, Action.DATASET_READ).allowed
    assert not holders.check_role(Role.ANALYST, "health", FEED, Action.FEED_READ).allowed


def test_a_role_held_in_one_agency_does_not_reach_another(holders: PolicyStore) -> None:
    assert holders.check_role(Role.ANALYST, "health", HEALTH_ONLY, Action.QUERY_RUN, 0.1).allowed
    assert not holders.check_role(Role.ANALYST, "transport", HEALTH_ONLY, Action.QUERY_RUN, 0.1).allowed
    # Held in transport, asking in health: like ana-transport acting in health.
    refused = holders.check_role(Role.ANALYST, "health", SERVICE, Action.QUERY_RUN, 0.1, held_in="transport")
    assert refused == Decision(False, None, "no rule allows a holder of 'analyst' in 'transport' to query.run on "
                                            f"'{SERVICE}' in agency 'health'")
    assert not holders.check("account:ana-transport", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed


def test_a_role_held_in_every_agency_sees_objects_of_one_agency(holders: PolicyStore) -> None:
    assert holders.check_role(Role.OVERSIGHT, "audit-office", HEALTH_ONLY, Action.DATASET_READ, held_in="*").allowed
    assert not holders.check_role(Role.OVERSIGHT, "audit-office", HEALTH_ONLY, Action.DATASET_READ).allowed


def test_an_unknown_role_or_an_impossible_agency_is_refused(holders: PolicyStore) -> None:
    assert holders.check_role("auditor", "health", DEMO, Action.DATASET_READ) == Decision(
        False, None, "unknown role 'auditor'")
    for agency in ("", "a,b", " health", "x" * 256):
        decision = holders.check_role(Role.ANALYST, agency, DEMO, Action.DATASET_READ)
        assert not decision.allowed and decision.rule is None
        assert "no account can hold analyst in agency" in decision.reason


def test_the_stand_in_cannot_be_granted_or_named_by_a_rule(store: PolicyStore) -> None:
    subject = holder_subject(Role.ANALYST, "health")
    with pytest.raises(ValueError):
        store.grant(subject, Role.STEWARD, "health")
    with pytest.raises(ValueError):
        store.allow(subject, "health", REMARK, Action.QUERY_RUN)


# -- the same decisions as check ----------------------------------------------------------------


def test_the_role_check_agrees_with_check_on_every_query_request(holders: PolicyStore) -> None:
    """Every role, agency, object and loss of a query action: the same decision as its holder's."""
    for role, agency, obj, action, epsilon in itertools.product(Role, AGENCIES, OBJECTS, sorted(QUERY_ACTIONS),
                                                                EPSILONS):
        assert_same(holders, role, agency, [obj], action, epsilon)


@settings(deadline=None, max_examples=400)
@given(role=st.sampled_from(list(Role)), agency=st.sampled_from(AGENCIES),
       held_in=st.sampled_from((None, *AGENCIES)),
       objects=st.lists(st.sampled_from(OBJECTS), min_size=0, max_size=4),
       action=st.sampled_from([*Action, "bogus.action"]), epsilon=st.sampled_from(EPSILONS))
def test_the_role_check_agrees_with_check_for_the_holder_of_exactly_that_role(
        holders: PolicyStore, role: Role, agency: str, held_in: str | None, objects: list[str],
        action: Action | str, epsilon: object) -> None:
    assert_same(holders, role, agency, objects, action, epsilon, held_in=held_in)


def test_the_role_check_follows_rule_changes(store: PolicyStore) -> None:
    question = (Role.ANALYST, "health", SERVICE, Action.QUERY_RUN, 0.3)
    assert store.check_role(*question).allowed  # memoised now
    assert store.remove_rule(Role.ANALYST, "*", "colset:*/public", Action.QUERY_RUN, "0.5")
    assert store.allow(Role.ANALYST, "*", "colset:*/public", Action.QUERY_RUN, "0.2")
    assert not store.check_role(*question).allowed
    store.classify_column("civic-demo", "service", ColumnClass.SENSITIVE)
    assert not store.check_role(Role.ANALYST, "health", SERVICE, Action.QUERY_RUN, 0.01).allowed


# -- it changes nothing --------------------------------------------------------------------------


def test_a_role_check_leaves_no_grant_behind(holders: PolicyStore) -> None:
    rules, grants = holders.rules(), holders._enforcer.get_named_grouping_policy("g")  # noqa: SLF001
    for role, agency in itertools.product(Role, AGENCIES):
        holders.check_role(role, agency, SERVICE, Action.QUERY_RUN, 0.1)
        subject = holder_subject(role, agency)
        manager = holders._enforcer.get_model()["g"]["g"].rm  # noqa: SLF001
        assert not manager.has_link(subject, role.value, agency)
        assert holders.roles_of(subject) == []
        # The stand-in, asked directly, holds nothing:
        assert not holders.check(subject, agency, SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert holders.rules() == rules
    assert holders._enforcer.get_named_grouping_policy("g") == grants  # noqa: SLF001


def test_a_role_check_writes_nothing_to_the_database(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'policies.db'}")
    try:
        store = populate(PolicyStore(VersionedAdapter(engine)))
        adapter = VersionedAdapter(engine)
        version = adapter.version()
        with engine.connect() as connection:
            before = connection.execute(text("SELECT count(*) FROM casbin_rule")).scalar_one()
        assert store.check_role(Role.ANALYST, "health", WAITING, Action.QUERY_RUN, 0.1).allowed
        assert not store.check_role(Role.ANALYST, "health", WAITING, Action.QUERY_RUN, 0.2).allowed
        assert adapter.version() == version == store.version
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM casbin_rule")).scalar_one() == before
            assert connection.execute(text("SELECT count(*) FROM casbin_rule WHERE v0 LIKE '(holder%'")
                                      ).scalar_one() == 0
        # Another process's store sees the same answers, and no stand-in.
        other = PolicyStore(VersionedAdapter(engine))
        assert other.check_role(Role.ANALYST, "health", WAITING, Action.QUERY_RUN, 0.1).allowed
        assert other.roles_of(holder_subject(Role.ANALYST, "health")) == []
    finally:
        engine.dispose()


def test_role_checks_and_account_checks_in_threads_do_not_mix() -> None:
    store = build_store()
    expected = {
        "role-analyst": True, "role-steward": False, "ana-health": True, "steward": False,
    }
    results: dict[str, list[bool]] = {key: [] for key in expected}
    errors: list[BaseException] = []

    def ask(key: str) -> None:
        try:
            for _ in range(60):
                if key == "role-analyst":
                    decision = store.check_role(Role.ANALYST, "health", SERVICE, Action.QUERY_RUN, 0.1)
                elif key == "role-steward":
                    decision = store.check_role(Role.STEWARD, "health", SERVICE, Action.QUERY_RUN, 0.1)
                else:
                    decision = store.check(f"account:{key}", "health", SERVICE, Action.QUERY_RUN, 0.1)
                results[key].append(decision.allowed)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(key,)) for key in expected for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for key, allowed in expected.items():
        assert results[key] == [allowed] * 120, key
    assert store.roles_of("account:steward") == [(Role.STEWARD, "*")]
