"""Roles held in the agency ``*`` reach objects linked in one agency only, and nothing else does.

``model.conf`` evaluates a rule in the caller's own agency and, for roles the caller holds
in ``*``, also in each named agency where the object is linked (``linked_in_agency``). The
sample store (:mod:`tests.policies.sample`) has ``dataset:health-only`` linked in
``health`` alone; server-wide stewards and oversight belong to agencies of their own
(``civic-office``, ``audit-office``), as in the demo server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from civicdp.policies.actions import Action, Role
from civicdp.policies.enforcer import PolicyStore

HEALTH_ONLY = "dataset:health-only"
HEALTH_ONLY_SERVICE = "column:health-only/service"
DEMO = "dataset:civic-demo"
STEWARD, OVERSIGHT = "account:steward", "account:oversight"
STEWARD_HOME, OVERSIGHT_HOME = "civic-office", "audit-office"

# -- a role held in '*' sees an object linked only in agency X ---------------------------------

REACH = [  # account, the caller's agency, object, action
    (STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_READ),
    (STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_LIST),
    (STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_MANAGE),
    (STEWARD, "transport", HEALTH_ONLY, Action.DATASET_READ),
    (OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ),
    (OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.DATASET_READ),
    (OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.DATASET_LIST),
    (OVERSIGHT, "transport", HEALTH_ONLY, Action.RELEASE_READ),
    (OVERSIGHT, "health", HEALTH_ONLY, Action.RELEASE_READ),
]


@pytest.mark.parametrize(("account", "agency", "obj", "action"), REACH,
                         ids=[f"{a}-{g}-{act}" for a, g, _, act in REACH])
def test_a_wildcard_role_sees_an_object_linked_in_another_agency(shared_store: PolicyStore, account: str,
                                                                  agency: str, obj: str, action: Action) -> None:
    decision = shared_store.check(account, agency, obj, action)
    assert decision.allowed, decision.reason
    role = account.removeprefix("account:")
    assert decision.rule == [role, "*", "dataset:*", action.value, "*", "allow"]


@settings(deadline=None)
@given(agency=st.text(min_size=0, max_size=30))
def test_a_wildcard_role_sees_it_from_any_agency(shared_store: PolicyStore, agency: str) -> None:
    assert shared_store.check(STEWARD, agency, HEALTH_ONLY, Action.DATASET_READ).allowed
    assert shared_store.check(OVERSIGHT, agency, HEALTH_ONLY, Action.RELEASE_READ).allowed


def test_wildcard_roles_still_never_query_it(shared_store: PolicyStore) -> None:
    for account, agency in ((STEWARD, STEWARD_HOME), (OVERSIGHT, OVERSIGHT_HOME), (OVERSIGHT, "health")):
        for obj in (HEALTH_ONLY, HEALTH_ONLY_SERVICE):
            decision = shared_store.check(account, agency, obj, Action.QUERY_RUN, 0.1)
            assert not decision.allowed
            assert decision.rule is not None and decision.rule[2:] == ["*", "query.run", "*", "deny"]


def test_wildcard_roles_gain_nothing_they_lacked(shared_store: PolicyStore) -> None:
    # Oversight reads but does not manage; stewards manage but do not read releases.
    assert not shared_store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.DATASET_MANAGE).allowed
    assert not shared_store.check(STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed


# -- nobody else reaches another agency's objects -----------------------------------------------


@pytest.mark.parametrize("action", [Action.DATASET_READ, Action.DATASET_LIST, Action.RELEASE_READ])
def test_an_analyst_of_another_agency_does_not_see_it(shared_store: PolicyStore, action: Action) -> None:
    assert shared_store.check("account:ana-health", "health", HEALTH_ONLY, action).allowed
    decision = shared_store.check("account:ana-transport", "transport", HEALTH_ONLY, action)
    assert decision == decision.__class__(
        False, None, f"no rule allows 'account:ana-transport' (analyst in transport) to {action} on "
                     f"'{HEALTH_ONLY}' in agency 'transport'")


@settings(deadline=None)
@given(agency=st.text(min_size=0, max_size=30))
def test_an_analyst_never_sees_it_outside_health(shared_store: PolicyStore, agency: str) -> None:
    assume(agency != "health")
    for account in ("account:ana-transport", "account:ana-health"):
        assert not shared_store.check(account, agency, HEALTH_ONLY, Action.DATASET_READ).allowed
        assert not shared_store.check(account, agency, HEALTH_ONLY_SERVICE, Action.QUERY_RUN, 0.1).allowed


def test_a_role_held_in_one_agency_does_not_travel(shared_store: PolicyStore) -> None:
    # steward-health holds steward in health only: acting in transport it does not reach health's objects.
    assert shared_store.check("account:steward-health", "health", HEALTH_ONLY, Action.DATASET_READ).allowed
    assert not shared_store.check("account:steward-health", "transport", HEALTH_ONLY, Action.DATASET_READ).allowed


def test_only_the_role_held_in_wildcard_travels(store: PolicyStore) -> None:
    # Analyst in health and feed consumer everywhere: outside health only the feed consumer's rules apply.
    store.grant("account:dual", Role.ANALYST, "health")
    store.grant("account:dual", Role.FEED_CONSUMER, "*")
    assert store.check("account:dual", "health", HEALTH_ONLY, Action.DATASET_READ).allowed
    assert not store.check("account:dual", "transport", HEALTH_ONLY, Action.DATASET_READ).allowed
    assert not store.check("account:dual", "transport", HEALTH_ONLY_SERVICE, Action.QUERY_RUN, 0.1).allowed


def test_an_allow_naming_the_account_does_not_travel(store: PolicyStore) -> None:
    store.allow("account:ana-transport", "*", "dataset:*", Action.DATASET_READ)
    store.allow("account:ana-transport", "health", "dataset:*", Action.RELEASE_READ)
    assert not store.check("account:ana-transport", "transport", HEALTH_ONLY, Action.DATASET_READ).allowed
    assert not store.check("account:ana-transport", "transport", HEALTH_ONLY, Action.RELEASE_READ).allowed


# -- deny rules still win ------------------------------------------------------------------------

DENIES = [  # subject of the deny, its agency, its object
    (Role.OVERSIGHT, "health", "dataset:*"),
    (Role.OVERSIGHT, "*", "dataset:*"),
    (Role.OVERSIGHT, "health", HEALTH_ONLY),
    (Role.OVERSIGHT, "*", HEALTH_ONLY),
    (Role.OVERSIGHT, "health", "*"),
    (Role.OVERSIGHT, "*", "*"),
    (OVERSIGHT, "health", HEALTH_ONLY),
    (OVERSIGHT, "health", "*"),
]


@pytest.mark.parametrize(("subject", "agency", "obj"), DENIES, ids=[f"{s}-{a}-{o}" for s, a, o in DENIES])
def test_a_deny_in_the_objects_agency_or_everywhere_wins(store: PolicyStore, subject: str, agency: str,
                                                         obj: str) -> None:
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed
    store.deny(subject, agency, obj, Action.RELEASE_READ)
    decision = store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ)
    assert not decision.allowed
    assert decision.rule == [str(subject), agency, obj, "release.read", "*", "deny"]
    assert decision.reason.startswith(f"rule [{subject}, {agency}, {obj}, release.read, *, deny] forbids")


def test_a_deny_in_another_agency_does_not_apply(store: PolicyStore) -> None:
    store.deny(Role.OVERSIGHT, "transport", "dataset:*", Action.RELEASE_READ)
    store.deny(Role.OVERSIGHT, "transport", "*", Action.RELEASE_READ)
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed


def test_a_deny_in_health_leaves_shared_objects_judged_in_the_callers_agency(store: PolicyStore) -> None:
    # Objects linked in '*' are decided in the caller's agency, exactly as before.
    store.deny(Role.OVERSIGHT, "health", "dataset:*", Action.RELEASE_READ)
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, DEMO, Action.RELEASE_READ).allowed
    assert not store.check(OVERSIGHT, "health", DEMO, Action.RELEASE_READ).allowed


def test_an_allow_in_health_does_not_reach_shared_objects_from_elsewhere(store: PolicyStore) -> None:
    store.allow(Role.OVERSIGHT, "health", "dataset:*", Action.DATASET_MANAGE)
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.DATASET_MANAGE).allowed  # lives in health
    assert not store.check(OVERSIGHT, OVERSIGHT_HOME, DEMO, Action.DATASET_MANAGE).allowed


# -- per-query caps still apply ------------------------------------------------------------------


def test_a_wildcard_role_is_held_to_the_cap_where_the_object_lives(store: PolicyStore) -> None:
    store.grant("account:roamer", Role.FEED_CONSUMER, "*")
    store.allow(Role.FEED_CONSUMER, "*", "dataset:*", Action.QUERY_RUN, 0.3)
    store.allow(Role.FEED_CONSUMER, "*", "colset:*/public", Action.QUERY_RUN, 0.2)
    assert store.check_all("account:roamer", "elsewhere", [HEALTH_ONLY, HEALTH_ONLY_SERVICE],
                           Action.QUERY_RUN, 0.2).allowed
    decision = store.check("account:roamer", "elsewhere", HEALTH_ONLY_SERVICE, Action.QUERY_RUN, 0.25)
    assert not decision.allowed
    assert decision.rule == ["feed_consumer", "*", "colset:*/public", "query.run", "0.2", "allow"]
    assert decision.reason.startswith("the per-query cap 0.2 is below the requested epsilon 0.25")
    for bad in (float("nan"), float("inf"), 0.0, -0.1):
        assert not store.check("account:roamer", "elsewhere", HEALTH_ONLY, Action.QUERY_RUN, bad).allowed
    store.deny(Role.FEED_CONSUMER, "health", "colset:*/public", Action.QUERY_RUN)
    assert not store.check("account:roamer", "elsewhere", HEALTH_ONLY_SERVICE, Action.QUERY_RUN, 0.1).allowed


# -- memoised decisions --------------------------------------------------------------------------


def _count_enforce(store: PolicyStore) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    enforce: Callable[..., Any] = store._enforcer.enforce_ex

    def counting(*request: Any) -> Any:
        calls.append(request)
        return enforce(*request)

    store._enforcer.enforce_ex = counting  # type: ignore[method-assign]
    return calls


def test_decisions_are_memoised_per_subject_agency_object_and_action(store: PolicyStore) -> None:
    calls = _count_enforce(store)
    cases = [  # each differs from the first in one of subject, agency, object, action
        (STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_READ, True),
        ("account:ana-transport", STEWARD_HOME, HEALTH_ONLY, Action.DATASET_READ, False),
        (STEWARD, "health", HEALTH_ONLY, Action.DATASET_READ, True),
        ("account:ana-health", "health", HEALTH_ONLY, Action.DATASET_READ, True),
        ("account:ana-health", "transport", HEALTH_ONLY, Action.DATASET_READ, False),
        (STEWARD, STEWARD_HOME, DEMO, Action.DATASET_READ, True),
        (STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.RELEASE_READ, False),
    ]
    for _ in range(3):  # the answers do not depend on what was asked before
        for subject, agency, obj, action, allowed in cases:
            assert store.check(subject, agency, obj, action).allowed is allowed, (subject, agency, obj, action)
    # One evaluation per distinct request, reused afterwards; refusals without a deny rule also ask
    # the uncapped matcher m2 once, for the reason.
    asked = [request for request in calls if isinstance(request[0], str)]
    assert [request[:4] for request in asked] == [(s, a, o, act.value) for s, a, o, act, _ in cases]
    assert len(calls) - len(asked) == sum(not allowed for *_, allowed in cases)


def test_the_memo_forgets_when_rules_or_links_change(store: PolicyStore) -> None:
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed
    store.deny(Role.OVERSIGHT, "health", HEALTH_ONLY, Action.RELEASE_READ)
    assert not store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed
    store.remove_rule(Role.OVERSIGHT, "health", HEALTH_ONLY, Action.RELEASE_READ, effect="deny")
    assert store.check(OVERSIGHT, OVERSIGHT_HOME, HEALTH_ONLY, Action.RELEASE_READ).allowed

    # A dataset registered for transport after the first checks is seen at once; unlinked, it is gone.
    assert not store.check(STEWARD, STEWARD_HOME, "dataset:transport-only", Action.DATASET_READ).allowed
    store.register_dataset("transport-only", "transport")
    assert store.check(STEWARD, STEWARD_HOME, "dataset:transport-only", Action.DATASET_READ).allowed
    assert not store.check("account:ana-health", "health", "dataset:transport-only", Action.DATASET_READ).allowed
    store.unassign("dataset:transport-only", "dataset:*", "transport")
    assert not store.check(STEWARD, STEWARD_HOME, "dataset:transport-only", Action.DATASET_READ).allowed

    # Moving health-only's link from health to transport moves the deny that applies to it.
    store.deny(Role.STEWARD, "health", "*", Action.DATASET_READ)
    assert not store.check(STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_READ).allowed
    store.unassign(HEALTH_ONLY, "dataset:*", "health")
    store.assign(HEALTH_ONLY, "dataset:*", "transport")
    assert store.check(STEWARD, STEWARD_HOME, HEALTH_ONLY, Action.DATASET_READ).allowed
