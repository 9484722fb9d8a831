"""Separation of duties that holds by design: stewards and oversight never read data.

Round 1's reviewer had a steward grant itself ``feed_consumer``, define a feed of any
question, trigger it and read the answer. Now a data-reading role cannot be granted to an
account holding a steward or oversight role (nor the reverse), by any route, and the
policy denies feed reads to stewards and oversight whatever else is granted.
"""

from __future__ import annotations

import pytest

from civicdp.policies.actions import Action, Role
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.state.errors import Conflict
from civicdp.server.services.query_service import subject_of
from tests.server.api_fixtures import ANALYST, FEED, OVERSIGHT, STEWARD, Api, api, dataset_folder  # noqa: F401


@pytest.mark.parametrize("account, role", [
    (STEWARD, Role.FEED_CONSUMER), (STEWARD, Role.ANALYST), (OVERSIGHT, Role.FEED_CONSUMER),
    (OVERSIGHT, Role.ANALYST), (ANALYST, Role.STEWARD), (FEED, Role.OVERSIGHT),
], ids=["steward-feed", "steward-analyst", "oversight-feed", "oversight-analyst", "analyst-steward",
        "feed-oversight"])
def test_a_grant_that_would_mix_duties_is_refused_by_every_route(api: Api, account: str, role: Role) -> None:  # noqa: F811
    response = api.post(STEWARD, f"/v1/accounts/{account}/roles", json={"role": role.value, "agency": "health"})
    assert response.status_code == 409 and "separation of duties" in response.json()["detail"], response.text
    with session_scope(api.state.db) as session, pytest.raises(Conflict, match="separation of duties"):
        admin.grant_role(session, api.state.policies, None, account, role, "health")  # the CLI's route
    assert (role.value, "health") not in {(r.value, a) for r, a in api.state.policies.roles_of(subject_of(account))}


def test_the_policy_denies_feed_reads_to_stewards_even_if_a_grant_slipped_through(api: Api) -> None:  # noqa: F811
    policies = api.state.policies
    policies.grant(subject_of(STEWARD), Role.FEED_CONSUMER, "health")  # as an older state might hold it
    decision = policies.check(subject_of(STEWARD), "health", "feed:*", Action.FEED_READ)
    assert not decision.allowed and decision.rule and decision.rule[-1] == "deny"
