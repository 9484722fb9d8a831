"""Decisions of the policy store: roles per agency, separation of duties, per-query caps, reasons."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from civicdp.policies.actions import Action, ColumnClass, Role
from civicdp.policies.enforcer import Decision, PolicyStore
from civicdp.policies.errors import InvalidRuleValue

from .sample import ACCOUNTS

SERVICE = "column:civic-demo/service"
WAITING = "column:civic-demo/waiting_minutes"
REMARK = "column:civic-demo/remark"
DEMO = "dataset:civic-demo"
HEALTH_ONLY = "dataset:health-only"

# -- the authorisation matrix -----------------------------------------------------------------

MATRIX = [  # account, agency, object, action, epsilon, allowed
    ("ana-health", "health", "server", Action.DATASET_LIST, None, True),
    ("ana-health", "health", DEMO, Action.DATASET_READ, None, True),
    ("ana-health", "health", DEMO, Action.RELEASE_READ, None, True),
    ("ana-health", "health", "server", Action.BUDGET_READ_OWN, None, True),
    ("ana-health", "health", DEMO, Action.QUERY_RUN, 0.5, True),
    ("ana-health", "health", SERVICE, Action.QUERY_ESTIMATE, 0.5, True),
    ("ana-health", "health", "server", Action.BUDGET_READ_ALL, None, False),
    ("ana-health", "health", "server", Action.AUDIT_READ, None, False),
    ("ana-health", "health", "server", Action.ROLE_MANAGE, None, False),
    ("ana-health", "health", "feed:weekly", Action.FEED_READ, None, False),
    ("ana-health", "transport", DEMO, Action.DATASET_READ, None, False),
    ("ana-health", "transport", SERVICE, Action.QUERY_RUN, 0.1, False),
    ("ana-transport", "transport", SERVICE, Action.QUERY_RUN, 0.1, True),
    ("ana-transport", "health", SERVICE, Action.QUERY_RUN, 0.1, False),
    ("steward", "health", "server", Action.ACCOUNT_MANAGE, None, True),
    ("steward", "transport", "server", Action.POLICY_MANAGE, None, True),
    ("steward", "health", "server", Action.BUDGET_READ_ALL, None, True),
    ("steward", "health", DEMO, Action.DATASET_MANAGE, None, True),
    ("steward", "health", DEMO, Action.DATASET_READ, None, True),
    ("steward", "health", DEMO, Action.QUERY_RUN, 0.1, False),
    ("steward", "health", SERVICE, Action.QUERY_ESTIMATE, 0.1, False),
    ("steward", "health", "server", Action.AUDIT_READ, None, False),
    ("steward-health", "health", "server", Action.KEY_MANAGE, None, True),
    ("steward-health", "transport", "server", Action.KEY_MANAGE, None, False),
    ("oversight", "health", "server", Action.AUDIT_READ, None, True),
    ("oversight", "transport", "server", Action.BUDGET_READ_ALL, None, True),
    ("oversight", "audit-office", "server", Action.AUDIT_READ, None, True),
    ("oversight", "health", DEMO, Action.RELEASE_READ, None, True),
    ("oversight", "health", HEALTH_ONLY, Action.DATASET_READ, None, True),
    ("oversight", "health", DEMO, Action.QUERY_RUN, 0.1, False),
    ("oversight", "health", SERVICE, Action.QUERY_ESTIMATE, 0.1, False),
    ("oversight", "health", "server", Action.ACCOUNT_MANAGE, None, False),
    ("feed-health", "health", "feed:weekly", Action.FEED_READ, None, True),
    ("feed-health", "health", DEMO, Action.DATASET_READ, None, False),
    ("feed-health", "health", SERVICE, Action.QUERY_RUN, 0.1, False),
]


@pytest.mark.parametrize(("account", "agency", "obj", "action", "epsilon", "allowed"), MATRIX,
                         ids=[f"{a}-{g}-{o}-{act}" for a, g, o, act, _, _ in MATRIX])
def test_authorisation_matrix(shared_store: PolicyStore, account: str, agency: str, obj: str, action: Action,
                              epsilon: float | None, allowed: bool) -> None:
    decision = shared_store.check(f"account:{account}", agency, obj, action, epsilon)
    assert decision.allowed is allowed, decision.reason


# -- deny by default --------------------------------------------------------------------------

names = st.text(min_size=0, max_size=40)


@settings(deadline=None)
@given(subject=names)
def test_unknown_subjects_are_denied(shared_store: PolicyStore, subject: str) -> None:
    assume(subject.removeprefix("account:") not in ACCOUNTS)
    for obj, action, epsilon in [(SERVICE, Action.QUERY_RUN, 0.1), ("server", Action.DATASET_LIST, None),
                                 ("server", Action.AUDIT_READ, None), ("feed:weekly", Action.FEED_READ, None)]:
        assert not shared_store.check(subject, "health", obj, action, epsilon).allowed


@settings(deadline=None)
@given(agency=names)
def test_an_analyst_is_denied_in_every_other_agency(shared_store: PolicyStore, agency: str) -> None:
    assume(agency != "health")
    assert not shared_store.check("account:ana-health", agency, SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert not shared_store.check("account:ana-health", agency, DEMO, Action.DATASET_READ).allowed


@settings(deadline=None)
@given(obj=names)
def test_unregistered_objects_are_denied(shared_store: PolicyStore, obj: str) -> None:
    assume(obj not in {DEMO, HEALTH_ONLY, SERVICE, "column:civic-demo/channel", WAITING, "server"}
           and not obj.startswith("colset:civic-demo/"))
    for action in (Action.QUERY_RUN, Action.DATASET_READ):
        assert not shared_store.check("account:ana-health", "health", obj, action, 0.01).allowed


@settings(deadline=None)
@given(action=names)
def test_unknown_actions_are_denied(shared_store: PolicyStore, action: str) -> None:
    assume(action not in Action._value2member_map_)
    decision = shared_store.check("account:ana-health", "health", DEMO, action, 0.1)
    assert not decision.allowed
    assert decision.reason == f"unknown action {action!r}"


@settings(deadline=None)
@given(subject=names, agency=names, obj=names, action=names)
def test_random_requests_are_denied(shared_store: PolicyStore, subject: str, agency: str, obj: str,
                                    action: str) -> None:
    assert not shared_store.check(subject, agency, obj, action, 0.1).allowed


def test_an_empty_store_denies_everything() -> None:
    decision = PolicyStore().check("account:x", "health", "server", Action.DATASET_LIST)
    assert decision == Decision(False, None, "'server' is not a registered object")


@pytest.mark.parametrize("subject", ["analyst", "steward", "*"], ids=["role-analyst", "role-steward", "star"])
def test_roles_and_the_wildcard_cannot_ask(shared_store: PolicyStore, subject: str) -> None:
    decision = shared_store.check(subject, "health", "server", Action.DATASET_LIST)
    assert not decision.allowed
    assert "is not a subject" in decision.reason


def test_an_unclassified_column_is_denied(store: PolicyStore) -> None:
    decision = store.check("account:ana-health", "health", "column:civic-demo/new_column", Action.QUERY_RUN, 0.1)
    assert decision == Decision(False, None, "'column:civic-demo/new_column' is not a registered object")
    store.assign_public_column("civic-demo", "new_column")
    assert store.check("account:ana-health", "health", "column:civic-demo/new_column", Action.QUERY_RUN, 0.1).allowed


def test_a_refusal_names_the_subject_roles_and_agency(shared_store: PolicyStore) -> None:
    decision = shared_store.check("account:ana-health", "transport", SERVICE, Action.QUERY_RUN, 0.1)
    assert decision == Decision(False, None, "no rule allows 'account:ana-health' (analyst in health) to "
                                             f"query.run on '{SERVICE}' in agency 'transport'")


# -- agencies ---------------------------------------------------------------------------------


def test_a_dataset_of_one_agency_is_invisible_elsewhere(shared_store: PolicyStore) -> None:
    assert shared_store.check("account:ana-health", "health", HEALTH_ONLY, Action.QUERY_RUN, 0.1).allowed
    # Even if the server passed the analyst's own agency for another agency's dataset:
    assert not shared_store.check("account:ana-transport", "transport", HEALTH_ONLY, Action.QUERY_RUN, 0.1).allowed
    assert not shared_store.check("account:ana-transport", "transport", HEALTH_ONLY, Action.DATASET_READ).allowed


# -- separation of duties ---------------------------------------------------------------------


def test_a_steward_cannot_query_even_when_allowed_by_mistake(store: PolicyStore) -> None:
    store.allow(Role.STEWARD, "*", "dataset:*", Action.QUERY_RUN, 0.5)
    store.allow("account:steward", "health", SERVICE, Action.QUERY_RUN)
    for obj in (DEMO, SERVICE):
        decision = store.check("account:steward", "health", obj, Action.QUERY_RUN, 0.1)
        assert not decision.allowed
        assert decision.rule == ["steward", "*", "*", "query.run", "*", "deny"]
        assert decision.reason.startswith("rule [steward, *, *, query.run, *, deny] forbids 'account:steward'")


def test_an_analyst_who_is_also_steward_cannot_query(store: PolicyStore) -> None:
    store.grant("account:ana-health", Role.STEWARD, "health")
    assert not store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed
    store.revoke("account:ana-health", Role.STEWARD, "health")
    assert store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed


def test_oversight_cannot_query_even_when_granted_analyst(store: PolicyStore) -> None:
    store.grant("account:oversight", Role.ANALYST, "health")
    decision = store.check("account:oversight", "health", SERVICE, Action.QUERY_ESTIMATE, 0.1)
    assert not decision.allowed
    assert decision.rule == ["oversight", "*", "*", "query.estimate", "*", "deny"]


# -- per-query caps ---------------------------------------------------------------------------

CAPS = [  # object, epsilon, allowed
    (SERVICE, 0.5, True),
    (SERVICE, 0.01, True),
    (SERVICE, "0.25", True),
    (DEMO, 0.5, True),
    (DEMO, 0.51, False),
    (SERVICE, 0.5000001, False),
    (SERVICE, 0.8, False),
    (WAITING, 0.1, True),
    (WAITING, 0.05, True),
    (WAITING, 0.10000001, False),
    (WAITING, 0.5, False),
]


@pytest.mark.parametrize(("obj", "epsilon", "allowed"), CAPS,
                         ids=[f"{o.rsplit('/', 1)[-1]}-{e}" for o, e, _ in CAPS])
def test_epsilon_within_the_cap(shared_store: PolicyStore, obj: str, epsilon: float, allowed: bool) -> None:
    for action in (Action.QUERY_RUN, Action.QUERY_ESTIMATE):
        assert shared_store.check("account:ana-health", "health", obj, action, epsilon).allowed is allowed


@pytest.mark.parametrize(("obj", "epsilon", "cap"), [(SERVICE, 0.8, "0.5"), (WAITING, 0.2, "0.1")],
                         ids=["public", "quasi"])
def test_a_refusal_above_the_cap_names_the_cap(shared_store: PolicyStore, obj: str, epsilon: float,
                                               cap: str) -> None:
    decision = shared_store.check("account:ana-health", "health", obj, Action.QUERY_RUN, epsilon)
    assert not decision.allowed
    assert decision.reason.startswith(f"the per-query cap {cap} is below the requested epsilon {epsilon}")
    assert decision.rule is not None and decision.rule[4] == cap


BAD_EPSILONS = [math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, "abc", "", "nan", True, [0.1]]


@pytest.mark.parametrize("epsilon", BAD_EPSILONS, ids=[repr(e) for e in BAD_EPSILONS])
def test_an_invalid_epsilon_is_refused(shared_store: PolicyStore, epsilon: object) -> None:
    decision = shared_store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, epsilon)  # type: ignore[arg-type]
    assert decision == Decision(False, None, f"the requested epsilon {epsilon!r} is not a finite number "
                                             "greater than 0")


@settings(deadline=None)
@given(epsilon=st.floats(allow_nan=True, allow_infinity=True))
def test_a_public_column_allows_exactly_the_epsilons_up_to_its_cap(shared_store: PolicyStore,
                                                                   epsilon: float) -> None:
    allowed = shared_store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, epsilon).allowed
    assert allowed is (math.isfinite(epsilon) and 0 < epsilon <= 0.5)


def test_a_query_needs_an_epsilon(shared_store: PolicyStore) -> None:
    decision = shared_store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN)
    assert decision == Decision(False, None, "query.run needs the epsilon the query would spend")


@pytest.mark.parametrize("epsilon", [0.001, 0.1, 0.5], ids=["tiny", "quasi-cap", "public-cap"])
def test_sensitive_columns_are_never_queried(shared_store: PolicyStore, epsilon: float) -> None:
    decision = shared_store.check("account:ana-health", "health", REMARK, Action.QUERY_RUN, epsilon)
    assert not decision.allowed
    assert decision.rule == ["analyst", "*", "colset:*/sensitive", "query.run", "*", "deny"]


def test_a_sensitive_column_stays_denied_when_an_account_is_allowed_it(store: PolicyStore) -> None:
    store.allow("account:ana-health", "health", REMARK, Action.QUERY_RUN, 0.5)
    assert not store.check("account:ana-health", "health", REMARK, Action.QUERY_RUN, 0.1).allowed


def test_a_reclassified_column_takes_the_cap_of_its_new_class(store: PolicyStore) -> None:
    assert store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.3).allowed
    store.classify_column("civic-demo", "service", ColumnClass.QUASI)
    assert store.class_of("civic-demo", "service") is ColumnClass.QUASI
    assert store.groups_of(SERVICE) == ["colset:civic-demo/quasi"]  # no longer also public
    assert not store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.3).allowed
    store.assign_public_column("civic-demo", "service")  # re-registration keeps the steward's class
    assert store.class_of("civic-demo", "service") is ColumnClass.QUASI


# -- the rule behind a decision ---------------------------------------------------------------


def test_an_allowed_decision_carries_the_matched_rule(shared_store: PolicyStore) -> None:
    decision = shared_store.check("account:ana-health", "health", WAITING, Action.QUERY_RUN, 0.1)
    assert decision.allowed
    assert decision.rule == ["analyst", "*", "colset:*/quasi", "query.run", "0.1", "allow"]
    assert decision.rules == [decision.rule]
    assert all(type(field) is str for field in decision.rule)
    assert decision.reason == ("rule [analyst, *, colset:*/quasi, query.run, 0.1, allow] allows "
                               f"'account:ana-health' to query.run on '{WAITING}' in agency 'health'")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
        decision.allowed = False  # type: ignore[misc]


def test_check_all_allows_with_one_rule_per_object(shared_store: PolicyStore) -> None:
    decision = shared_store.check_all("account:ana-health", "health", [DEMO, SERVICE, WAITING],
                                      Action.QUERY_RUN, 0.1)
    assert decision.allowed
    assert decision.rule == ["analyst", "*", "dataset:*", "query.run", "0.5", "allow"]
    assert [rule[2] for rule in decision.rules] == ["dataset:*", "colset:*/public", "colset:*/quasi"]


def test_check_all_returns_the_first_refusal(shared_store: PolicyStore) -> None:
    decision = shared_store.check_all("account:ana-health", "health", [DEMO, SERVICE, WAITING, REMARK],
                                      Action.QUERY_RUN, 0.3)
    assert not decision.allowed
    assert decision.reason.startswith("the per-query cap 0.1 is below the requested epsilon 0.3")
    assert f"'{WAITING}'" in decision.reason


def test_check_all_refuses_an_empty_list(shared_store: PolicyStore) -> None:
    decision = shared_store.check_all("account:ana-health", "health", [], Action.QUERY_RUN, 0.1)
    assert decision == Decision(False, None, "there is nothing to authorise: no object was named")


# -- managing grants and rules ----------------------------------------------------------------


def test_grants_and_roles(store: PolicyStore) -> None:
    assert store.roles_of("account:ana-health") == [(Role.ANALYST, "health")]
    assert store.grant("account:ana-health", Role.ANALYST, "transport") is True
    assert store.grant("account:ana-health", "analyst", "transport") is False
    assert store.roles_of("account:ana-health") == [(Role.ANALYST, "health"), (Role.ANALYST, "transport")]
    assert store.check("account:ana-health", "transport", SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert store.revoke("account:ana-health", Role.ANALYST, "transport") is True
    assert store.revoke("account:ana-health", Role.ANALYST, "transport") is False
    assert not store.check("account:ana-health", "transport", SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert store.roles_of("account:nobody") == []


def test_rules_have_six_string_fields_and_can_be_removed(store: PolicyStore) -> None:
    rules = store.rules()
    assert rules and all(len(rule) == 6 and all(type(f) is str for f in rule) for rule in rules)
    assert ["analyst", "*", "colset:*/public", "query.run", "0.5", "allow"] in rules
    assert store.remove_rule("analyst", "*", "colset:*/public", Action.QUERY_RUN, 0.5) is True
    assert not store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed
    assert store.remove_rule(*["analyst", "*", "colset:*/public", "query.run", "0.5", "allow"]) is False
    deny = ["steward", "*", "*", "query.run", "*", "deny"]
    assert store.remove_rule(*deny) is True and deny not in store.rules()


def test_an_account_rule_grants_a_larger_cap_only_where_it_says(store: PolicyStore) -> None:
    store.allow("account:ana-health", "health", "dataset:civic-demo", Action.QUERY_RUN, cap="1")
    assert ["account:ana-health", "health", DEMO, "query.run", "1.0", "allow"] in store.rules()
    assert store.check("account:ana-health", "health", DEMO, Action.QUERY_RUN, 0.9).allowed
    assert not store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.9).allowed


INVALID_RULES = [
    (("analyst", "*", "*", Action.QUERY_RUN, 0.5), "'\\*' is only for deny rules"),
    (("analyst", "*", DEMO, "query.drop", 0.5), "not one of the actions"),
    (("analyst", "*", DEMO, Action.QUERY_RUN, "nan"), "a per-query cap must be"),
    (("analyst", "*", DEMO, Action.QUERY_RUN, 0), "a per-query cap must be"),
    (("analyst", "*", DEMO, Action.QUERY_RUN, -1), "a per-query cap must be"),
    (("analyst", "*", "dataset:a,b", Action.QUERY_RUN, 0.5), "contains a comma"),
    (("analyst", " health", DEMO, Action.QUERY_RUN, 0.5), "surrounding space"),
    (("analyst", "", DEMO, Action.QUERY_RUN, 0.5), "non-empty string"),
    (("x" * 256, "*", DEMO, Action.QUERY_RUN, 0.5), "longer than 255"),
    (("*", "*", DEMO, Action.QUERY_RUN, 0.5), "not '\\*'"),
]


@pytest.mark.parametrize(("args", "message"), INVALID_RULES,
                         ids=["star-object", "unknown-action", "nan-cap", "zero-cap", "negative-cap", "comma",
                              "space", "empty", "too-long", "star-subject"])
def test_invalid_rules_are_refused(store: PolicyStore, args: tuple[object, ...], message: str) -> None:
    before = store.rules()
    with pytest.raises(InvalidRuleValue, match=message):
        store.allow(*args)  # type: ignore[arg-type]
    assert store.rules() == before


def test_a_deny_rule_takes_no_cap(store: PolicyStore) -> None:
    with pytest.raises(InvalidRuleValue, match="a deny rule refuses whatever epsilon"):
        store.deny("account:ana-health", "health", DEMO, Action.QUERY_RUN, cap=0.1)


@pytest.mark.parametrize(("subject", "role", "message"),
                         [("analyst", Role.ANALYST, "not '\\*' or a role name"),
                          ("account:x", "root", "not one of the roles"),
                          ("account:x(1)", Role.ANALYST, "parenthesis")],
                         ids=["role-as-subject", "unknown-role", "unsafe-name"])
def test_invalid_grants_are_refused(store: PolicyStore, subject: str, role: str, message: str) -> None:
    with pytest.raises(InvalidRuleValue, match=message):
        store.grant(subject, role, "health")


@pytest.mark.parametrize(("obj", "group"), [("*", "dataset:*"), ("dataset:x", "*")], ids=["object", "group"])
def test_the_bare_wildcard_is_not_an_object_or_group(store: PolicyStore, obj: str, group: str) -> None:
    with pytest.raises(InvalidRuleValue, match="'\\*' alone is not an object or a group"):
        store.assign(obj, group)


@pytest.mark.parametrize(("dataset", "column"), [("civic*", "x"), ("civic-demo", "a/b")], ids=["star", "slash"])
def test_dataset_and_column_names_cannot_forge_groups(store: PolicyStore, dataset: str, column: str) -> None:
    with pytest.raises(InvalidRuleValue, match="reserved for groups"):
        store.assign_public_column(dataset, column)


def test_save_and_load_without_an_adapter_keep_the_rules(store: PolicyStore) -> None:
    before = (store.rules(), store.roles_of("account:steward"))
    store.save()
    store.load()
    assert (store.rules(), store.roles_of("account:steward")) == before


def test_checks_stay_consistent_while_grants_change(store: PolicyStore) -> None:
    """Readers never see a half-made change nor crash while another thread grants and revokes."""
    stop = threading.Event()
    failures: list[str] = []

    def read() -> None:
        while not stop.is_set():
            if not store.check("account:ana-health", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed:
                failures.append("a standing grant was not seen")
            if store.check("account:steward", "health", SERVICE, Action.QUERY_RUN, 0.1).allowed:
                failures.append("a steward was allowed to query")

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for i in range(50):
            store.grant(f"account:temp-{i}", Role.ANALYST, "health")
            store.assign_public_column("civic-demo", f"extra_{i}")
            store.revoke(f"account:temp-{i}", Role.ANALYST, "health")
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert failures == []
