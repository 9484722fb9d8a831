"""A feed gives its consumer agencies no more than a query by them would get (issue 19).

Separation of duties: a steward defines a feed, its agencies' feed consumers read it. Each
spec is held, for each consumer agency, to the decision a query by that agency's analysts
gets (per-query caps, column classes, deny rules) — when the feed is defined, when it is
shared, and before every period's charge. Every test here fails on the server that held
feed specs to the budgets only (a steward could define epsilon 5 against a per-query cap
of 0.5, or a sensitive column no analyst may touch).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from civicdp.policies.actions import Action, ColumnClass, Role
from civicdp.server.feeds.outcomes import FeedRefused
from civicdp.server.state.errors import AccessDenied
from civicdp.server.state.feed_models import Feed, FeedClaim, FeedRefusal, FeedRelease
from civicdp.server.state.models import BudgetCap
from tests.server.api_fixtures import ANALYST, DATASET, FEED, OTHER_ANALYST, STEWARD, Api
from tests.server.api_fixtures import dataset_folder  # noqa: F401 - fixture
from tests.server.feeds.test_feeds import LOSS, NOW, OTHER_FEED, SPECS, api, define, definition, rows, service, spent

NOTHING = {"feed": 0, "dataset": 0, "lifetime": 0, "analyst": 0, "agency": 0}
DATASET_CAP_RULE = ["analyst", "*", "dataset:*", "query.run", "0.5", "allow"]
QUASI_CAP_RULE = ["analyst", "*", "colset:*/quasi", "query.run", "0.1", "allow"]
SENSITIVE_RULE = ["analyst", "*", "colset:*/sensitive", "query.run", "*", "deny"]
__all__ = ["api"]  # the fixture, imported from test_feeds


def refused_definition(api: Api, **changes: Any) -> dict[str, Any]:
    """POST /v1/feeds, expected to be refused with 403; nothing of the feed may be stored."""
    response = api.post(STEWARD, "/v1/feeds", json=definition(**changes))
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "forbidden"
    assert rows(api, Feed) == [] and rows(api, BudgetCap, BudgetCap.scope == "feed") == []
    assert api.state.policies.groups_of("feed:daily-volumes", "health") == []
    assert spent(api) == NOTHING
    (entry,) = api.records("feed.define")
    assert entry.decision == "denied" and json.loads(entry.entry_json)["rule"] == body["rule"]
    return body  # type: ignore[no-any-return]


def query_refusal(api: Api, who: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The same spec asked as a query by an analyst: refused too, by the same rule."""
    response = api.query(who, {**spec, "dataset": DATASET})
    assert response.status_code == 403, response.text
    return response.json()  # type: ignore[no-any-return]


# -- at definition ------------------------------------------------------------------------------


def test_a_spec_above_the_per_query_cap_is_refused_naming_the_rule_and_the_agency(api: Api) -> None:
    greedy = {"aggregate": "count", "group_by": ["channel"], "epsilon": 5}
    body = refused_definition(api, specs=[greedy])
    assert body["rule"] == DATASET_CAP_RULE
    assert "specs[0] of feed 'daily-volumes' would not be allowed as a query by agency 'health'" in body["detail"]
    assert "the per-query cap 0.5 is below the requested epsilon 5" in body["detail"]
    assert query_refusal(api, ANALYST, greedy)["rule"] == DATASET_CAP_RULE
    # Just above the cap, in the second spec: refused there, and named.
    response = api.post(STEWARD, "/v1/feeds", json=definition(
        specs=[SPECS[0], {**SPECS[0], "epsilon": 0.5000001}]))
    assert response.status_code == 403 and "specs[1] of feed" in response.json()["detail"]


def test_a_sensitive_column_is_refused_as_a_query_on_it_would_be(api: Api) -> None:
    api.state.policies.classify_column(DATASET, "satisfaction", ColumnClass.SENSITIVE)
    spec = {"aggregate": "count", "group_by": ["satisfaction"], "epsilon": 0.01}
    body = refused_definition(api, specs=[spec])
    assert body["rule"] == SENSITIVE_RULE
    assert "forbids a holder of 'analyst' in 'health'" in body["detail"]
    assert query_refusal(api, ANALYST, spec)["rule"] == SENSITIVE_RULE


def test_a_quasi_identifier_is_held_to_its_smaller_cap(api: Api) -> None:
    api.state.policies.classify_column(DATASET, "waiting_minutes", ColumnClass.QUASI)
    over = {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["service"], "epsilon": 0.2}
    body = refused_definition(api, specs=[SPECS[0], over])
    assert body["rule"] == QUASI_CAP_RULE and "specs[1]" in body["detail"]
    assert query_refusal(api, ANALYST, over)["rule"] == QUASI_CAP_RULE
    # Within the quasi-identifier's cap (SPECS spends 0.05 on it): defined.
    assert define(api)["loss_micro_per_release"] == LOSS


def test_an_allowed_spec_is_defined_and_released(api: Api) -> None:
    overview = define(api, agencies=["health", "transport"])
    assert overview["agencies"] == ["health", "transport"]
    for spec in SPECS:  # what the feed answers, the agencies' analysts may ask
        assert api.query(ANALYST, {**spec, "dataset": DATASET}).status_code == 200
        assert api.query(OTHER_ANALYST, {**spec, "dataset": DATASET}).status_code == 200
    assert [r.number for r in service(api).run_due(NOW)] == [1, 2, 3]
    assert api.get(FEED, "/v1/feeds/daily-volumes/releases/latest").status_code == 200


def test_each_consumer_agency_is_asked_with_its_own_rules(api: Api) -> None:
    """A deny rule for transport's analysts refuses a feed shared with transport, or with every agency."""
    api.state.policies.deny(Role.ANALYST, "transport", f"column:{DATASET}/channel", Action.QUERY_RUN)
    rule = ["analyst", "transport", f"column:{DATASET}/channel", "query.run", "*", "deny"]
    body = refused_definition(api, agencies=["health", "transport"])
    assert body["rule"] == rule and "query by agency 'transport'" in body["detail"]
    assert query_refusal(api, OTHER_ANALYST, SPECS[0])["rule"] == rule
    # '*': every agency where a feed consumer is (OTHER_FEED consumes in transport).
    response = api.post(STEWARD, "/v1/feeds", json=definition(agencies=["*"]))
    assert response.status_code == 403 and response.json()["rule"] == rule, response.text
    # Shared with health alone it is defined; sharing it with transport afterwards is refused.
    define(api)
    with pytest.raises(AccessDenied) as refusal:
        service(api).share(None, "daily-volumes", "transport")
    assert refusal.value.rule == rule and "query by agency 'transport'" in refusal.value.reason
    assert json.loads(rows(api, Feed)[0].agencies_json) == ["health"]
    assert api.get(OTHER_FEED, "/v1/feeds").json() == []
    assert [e.decision for e in api.records("feed.share")] == ["denied"]


# -- before every period's charge ------------------------------------------------------------------


def test_a_rule_tightened_after_the_definition_refuses_the_next_periods_before_any_charge(api: Api) -> None:
    define(api)
    first = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert first.status_code == 201 and spent(api)["feed"] == LOSS
    # Oversight of the policy: channel becomes sensitive for health's analysts.
    tightened = api.post(STEWARD, "/v1/policies", json={
        "subject": "analyst", "agency": "health", "object": f"column:{DATASET}/channel", "action": "query.run",
        "cap": "*", "effect": "deny"})
    assert tightened.status_code == 201, tightened.text
    rule = ["analyst", "health", f"column:{DATASET}/channel", "query.run", "*", "deny"]

    outcomes = service(api).run_due(NOW)
    assert [type(o) for o in outcomes] == [FeedRefused, FeedRefused]  # periods 2 and 3; 1 was released
    assert all(o.rule == rule and o.budget is None for o in outcomes if isinstance(o, FeedRefused))
    assert "would not be allowed as a query by agency 'health'" in outcomes[0].reason  # type: ignore[union-attr]
    # Refused before the claim and the charge: nothing spent, nothing claimed, no charge entry.
    assert spent(api)["feed"] == LOSS and spent(api)["lifetime"] == LOSS
    assert [c.number for c in rows(api, FeedClaim)] == [1]
    assert len(api.records("feed.charge")) == 1
    assert sorted((r.number, r.attempt) for r in rows(api, FeedRefusal)) == [(2, 0), (3, 0)]
    refusals = [e for e in api.records("feed.release") if e.decision == "refused"]
    assert len(refusals) == 2 and all(json.loads(e.entry_json)["rule"] == rule for e in refusals)
    # A steward's trigger is refused the same way (409, the reason), and charges nothing.
    again = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert again.status_code == 409 and "agency 'health'" in again.json()["detail"], again.text
    assert spent(api)["feed"] == LOSS and len(rows(api, FeedRelease)) == 1
    overview = api.get(STEWARD, "/v1/feeds/overview").json()[0]
    assert overview["refused"] == 2 and "query by agency 'health'" in overview["last_refusal"]["reason"]
    # The rule lifted, the period is released (and charged) again.
    assert api.state.policies.remove_rule(*rule)
    assert api.post(STEWARD, "/v1/feeds/daily-volumes/releases").json()["number"] == 2
    assert spent(api)["feed"] == 2 * LOSS
