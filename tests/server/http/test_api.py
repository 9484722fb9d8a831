"""The HTTP API end to end, per role: what an analyst gets and pays, what is refused and how,
what a steward changes (and that each change is recorded), what oversight sees, and the
ledger surviving a restart. Also the analyst's Python client against the same app.

Every test starts its own app on a fresh data_dir (``api`` fixture, SQLite); the restart
test runs on PostgreSQL too. Setup: tests/server/api_fixtures.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import update

from civicdp.policies.actions import ColumnClass
from civicdp.queries import client as analyst_client
from civicdp.server.state import ledger
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import ApiKey, Release
from tests.conftest import base_metadata
from tests.server.api_fixtures import (
    ANALYST, COUNT, DATASET, FEED, OTHER_ANALYST, OVERSIGHT, STEWARD, Api, ViaTestClient, assert_charged,
    count_query, make_dataset_folder, running_api, wait_prepared,
)
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures

QUERIES, ESTIMATES, BUDGETS = "/v1/queries", "/v1/queries/estimate", "/v1/budgets"


def _first_of_next_month() -> str:
    now = datetime.now(timezone.utc)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


# -- no key needed -------------------------------------------------------------------------


@pytest.mark.parametrize("path, status", [("/v1/health", "ok"), ("/v1/ready", "ready")], ids=["health", "ready"])
def test_health_and_readiness_need_no_key(api: Api, path: str, status: str) -> None:
    response = api.get(None, path)
    assert response.status_code == 200
    assert response.json() == {"status": status}


# -- an analyst's day ----------------------------------------------------------------------


def test_an_analyst_lists_datasets_and_reads_their_public_metadata(api: Api) -> None:
    listed = api.get(ANALYST, "/v1/datasets")
    assert listed.status_code == 200
    assert [d["name"] for d in listed.json()] == [DATASET]

    one = api.get(ANALYST, f"/v1/datasets/{DATASET}").json()
    assert one == listed.json()[0]
    columns = one["tables"]["events"]["columns"]
    assert columns["channel"]["keys"] == ["counter", "web", "mobile", "kiosk"]
    assert one["privacy_unit"] == "person_id" and one["max_contributions"] == 3


def test_an_estimate_is_free(api: Api) -> None:
    before = api.spent_micro(ANALYST)
    response = api.post(ANALYST, ESTIMATES, json=COUNT)
    assert response.status_code == 200
    estimate = response.json()
    assert estimate["loss"]["epsilon"] == pytest.approx(0.1)
    assert estimate["accuracy"]["half_width"] > 0 and estimate["cached"] is False
    assert api.spent_micro(ANALYST) == before == {scope: 0 for scope in ledger.KINDS}
    assert api.count(Release) == 0


def test_a_query_is_answered_with_intervals_and_charged_to_every_budget(api: Api) -> None:
    before = api.spent_micro(ANALYST)
    response = api.query(ANALYST, COUNT)
    assert response.status_code == 200
    answer = response.json()

    assert answer["cached"] is False
    assert answer["columns"] == ["channel", "value", "ci_low", "ci_high"]
    assert [row["channel"] for row in answer["rows"]] == ["counter", "web", "mobile", "kiosk"]
    for row in answer["rows"]:
        assert row["ci_low"] < row["value"] < row["ci_high"]
    assert answer["charged"] == answer["loss"] and answer["loss"]["epsilon"] == pytest.approx(0.1)
    assert_charged(api, ANALYST, before, answer)

    analyst_budget = next(b for b in answer["budgets"] if b["scope"] == "analyst")
    assert analyst_budget["subject"] == ANALYST
    assert analyst_budget["remaining_epsilon"] == pytest.approx(0.9)
    assert analyst_budget["renews_at"] == _first_of_next_month()
    # One release, one ledger entry per scope, the charge recorded before the data was read
    # and the release after it, both naming the same computation.
    entries = api.ledger_entries(answer["release_id"])
    assert len(entries) == len(ledger.KINDS)
    assert {e.amount_micro for e in entries} == {api.release(answer["release_id"]).loss_micro}
    [use] = api.records("query.run")
    [released] = api.records("query.release")
    charge_detail, release_detail = json.loads(use.entry_json)["detail"], json.loads(released.entry_json)["detail"]
    assert use.decision == "allowed" and charge_detail["loss_micro"] == 100_000
    assert released.decision == "released" and release_detail["release_id"] == answer["release_id"]
    assert charge_detail["computation_id"] == release_detail["computation_id"]
    assert use.seq < released.seq


def test_an_identical_question_is_answered_from_its_release_for_free(api: Api) -> None:
    first = api.query(ANALYST, COUNT).json()
    spent = api.spent_micro(ANALYST)

    again = api.query(ANALYST, dict(reversed(list(COUNT.items()))))  # same question, keys reordered
    assert again.status_code == 200
    repeat = again.json()
    assert repeat["cached"] is True and repeat["charged"]["epsilon"] == 0
    assert repeat["release_id"] == first["release_id"] and repeat["rows"] == first["rows"]
    assert repeat["loss"] == first["loss"]
    assert api.spent_micro(ANALYST) == spent

    # An analyst of another agency gets the same release, free, without touching any budget.
    theirs = api.query(OTHER_ANALYST, COUNT).json()
    assert theirs["cached"] is True and theirs["charged"]["epsilon"] == 0
    assert theirs["release_id"] == first["release_id"] and theirs["rows"] == first["rows"]
    assert api.spent_micro(OTHER_ANALYST)["analyst"] == 0
    assert api.spent_micro(ANALYST) == spent
    assert api.count(Release) == 1
    assert api.post(OTHER_ANALYST, ESTIMATES, json=COUNT).json()["cached"] is True


@pytest.mark.parametrize("column_class, spec, reason", [
    (None, count_query(epsilon=0.6), r"per-query cap 0\.5 is below the requested epsilon"),
    (ColumnClass.QUASI, count_query(group_by=["satisfaction"], epsilon=0.2),
     r"per-query cap 0\.1 is below the requested epsilon"),
    (ColumnClass.SENSITIVE, count_query(group_by=["satisfaction"]), r"colset:\*/sensitive, query.run, \*, deny\] forbids .* 'column:test-services/satisfaction'"),
], ids=["above the 0.5 cap", "quasi-identifier above 0.1", "sensitive column"])
def test_a_query_above_its_per_query_cap_is_refused(api: Api, column_class: ColumnClass | None,
                                                    spec: dict[str, object], reason: str) -> None:
    if column_class is not None:
        api.state.policies.classify_column(DATASET, "satisfaction", column_class)
    response = api.query(ANALYST, spec)
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "forbidden"
    assert re.search(reason, body["detail"]), body["detail"]  # names the cap, or the deny rule
    assert body["rule"] and body["rule"][0] == "analyst"
    assert api.spent_micro(ANALYST) == {scope: 0 for scope in ledger.KINDS}
    assert api.count(Release) == 0
    assert [r.decision for r in api.records("query.run")] == ["denied"]


def test_a_query_beyond_the_remaining_budget_is_refused_with_when_it_renews(api: Api) -> None:
    api.set_cap("analyst", ANALYST, 0.25)
    for epsilon in (0.1, 0.11):
        assert api.query(ANALYST, count_query(epsilon=epsilon)).status_code == 200
    spent = api.spent_micro(ANALYST)

    response = api.query(ANALYST, count_query(epsilon=0.1, confidence=0.9))
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "budget_exhausted"
    assert (body["scope"], body["subject"], body["dataset"]) == ("analyst", ANALYST, DATASET)
    assert body["remaining_epsilon"] == pytest.approx(0.04)
    assert body["requested_epsilon"] == pytest.approx(0.1)
    assert body["renews_at"] == _first_of_next_month().replace("Z", "+00:00")
    assert "renews on" in body["detail"]
    # Nothing released, nothing charged, the refusal recorded.
    assert api.spent_micro(ANALYST) == spent and api.count(Release) == 2
    assert [r.decision for r in api.records("query.run")] == ["allowed", "allowed", "refused"]


NAN_TEXT = json.dumps(count_query(epsilon=float("nan")))
assert "NaN" in NAN_TEXT  # Python writes the bare JSON extension NaN, as a hostile client could


@pytest.mark.parametrize("body, field, fix", [
    (json.dumps(count_query(aggregate="sum", column="nope")), "column", "Use one of"),
    (json.dumps(count_query(group_by=["nope"])), "group_by.0", "Use one of"),
    (json.dumps(count_query(filters=[{"column": "channel", "op": "eq", "value": "fax"}])), "filters.0.value",
     "Use one of"),
    (json.dumps(count_query(epsilon=0)), "epsilon", "Use a value such as 0.1"),
    (json.dumps(count_query(epsilon=-0.1)), "epsilon", "Use a value such as 0.1"),
    (json.dumps(count_query(epsilon=1e6)), "epsilon", "smaller privacy loss"),
    (NAN_TEXT, "epsilon", "Use a value such as 0.1"),
    (json.dumps(count_query(epsilon=float("inf"))), "epsilon", "Use a value such as 0.1"),
    (json.dumps({k: v for k, v in COUNT.items() if k != "epsilon"}), "epsilon", '"epsilon": 0.1'),
    (json.dumps(count_query(epsilon="a lot")), "epsilon", "a positive number such as 0.1"),
], ids=["unknown column", "unknown group", "unknown filter key", "epsilon 0", "negative epsilon",
        "huge epsilon", "epsilon NaN", "epsilon Infinity", "no epsilon", "epsilon a string"])
def test_an_invalid_spec_is_refused_naming_the_field_and_the_fix(api: Api, body: str, field: str,
                                                                 fix: str) -> None:
    for path in (QUERIES, ESTIMATES):
        response = api.post(ANALYST, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        error = response.json()
        assert error["field"] == field and error["problem"]
        assert error["error"] == "invalid_query" and fix in error["fix"]
    assert api.spent_micro(ANALYST) == {scope: 0 for scope in ledger.KINDS}
    assert api.count(Release) == 0


@pytest.mark.parametrize("path", [QUERIES, ESTIMATES], ids=["query", "estimate"])
def test_an_unknown_dataset_is_not_found(api: Api, path: str) -> None:
    response = api.post(ANALYST, path, json=count_query(dataset="no-such-data"))
    assert response.status_code == 404
    assert response.json() == {"error": "not_found",
                               "detail": "no dataset named 'no-such-data'; list them with GET /v1/datasets"}


# -- keys that do not authenticate --------------------------------------------------------


def _flip_last(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def _expired(api: Api) -> str:
    key = api.new_key(ANALYST)
    assert api.get(ANALYST, "/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with session_scope(api.state.db) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == api.key_row(key).prefix)
                        .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    return key


def _revoked_by_the_steward(api: Api) -> str:
    key = api.new_key(ANALYST)
    assert api.get(None, "/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    prefix = api.key_row(key).prefix
    response = api.call(STEWARD, "DELETE", f"/v1/keys/{prefix}")
    assert response.status_code == 200
    revoked = response.json()
    assert (revoked["prefix"], revoked["account"], revoked["api_key"]) == (prefix, ANALYST, None)
    return key


#: How a key fails -> the reason recorded for the audit trail (the caller only sees a 401).
BAD_KEYS: dict[str, tuple[Callable[[Api], str | None], str]] = {
    "missing": (lambda api: None, "missing"),
    "malformed": (lambda api: "not-a-key", "malformed"),
    "unknown prefix": (lambda api: "cdp_AAAAAAAAAAAA_" + api.keys[ANALYST].split("_", 2)[2], "unknown_prefix"),
    "wrong secret": (lambda api: _flip_last(api.keys[ANALYST]), "wrong_secret"),
    "expired": (_expired, "expired"),
    "revoked": (_revoked_by_the_steward, "revoked"),
}


@pytest.mark.parametrize("kind", list(BAD_KEYS), ids=list(BAD_KEYS))
def test_a_key_that_does_not_authenticate_gets_one_and_the_same_401(api: Api, kind: str) -> None:
    make_key, reason = BAD_KEYS[kind]
    key = make_key(api)
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    unknown = api.get(None, "/v1/datasets", headers={"Authorization": "Bearer cdp_AAAAAAAAAAAA_" + "A" * 43})
    for method, path, body in [("GET", "/v1/datasets", None), ("POST", QUERIES, COUNT), ("GET", BUDGETS, None)]:
        response = api.client.request(method, path, headers=headers, json=body)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json() == unknown.json()  # nothing tells the causes apart
    failures = api.records("auth.failed")[-3:]
    assert [json.loads(r.entry_json)["detail"]["reason"] for r in failures] == [reason] * 3
    assert api.count(Release) == 0


def test_a_key_sent_without_the_bearer_scheme_is_refused(api: Api) -> None:
    response = api.get(None, "/v1/datasets", headers={"Authorization": f"Basic {api.keys[ANALYST]}"})
    assert response.status_code == 401


# -- the steward -----------------------------------------------------------------------------


def test_a_steward_creates_an_account_issues_a_key_once_and_grants_and_revokes_a_role(api: Api) -> None:
    created = api.post(STEWARD, "/v1/accounts", json={"name": "ana-new", "agency": "health"})
    assert created.status_code == 201
    assert created.json() == {"name": "ana-new", "agency": "health", "disabled": False, "roles": []}
    assert api.post(STEWARD, "/v1/accounts", json={"name": "ana-new", "agency": "health"}).status_code == 409

    issued = api.post(STEWARD, "/v1/accounts/ana-new/keys", json={"expires_in_days": 7})
    assert issued.status_code == 201
    key = issued.json()["api_key"]
    assert key.startswith("cdp_" + issued.json()["prefix"] + "_")
    api.keys["ana-new"] = key

    listing = api.get(STEWARD, "/v1/accounts")
    assert listing.status_code == 200
    assert key not in listing.text and key.split("_", 2)[2] not in listing.text  # shown once only
    assert "api_key" not in listing.text
    # Without a role the key authenticates but allows nothing.
    assert api.get("ana-new", "/v1/datasets").json() == []
    assert api.query("ana-new", COUNT).status_code == 403

    granted = api.post(STEWARD, "/v1/accounts/ana-new/roles", json={"role": "analyst", "agency": "health"})
    assert granted.status_code == 200
    assert granted.json()["roles"] == [{"role": "analyst", "agency": "health"}]
    assert api.query("ana-new", COUNT).status_code == 200

    revoked = api.call(STEWARD, "DELETE", "/v1/accounts/ana-new/roles/analyst/health")
    assert revoked.status_code == 200 and revoked.json()["roles"] == []
    assert api.query("ana-new", count_query(epsilon=0.2)).status_code == 403


def test_a_cap_set_by_the_steward_applies_to_this_months_budget(api: Api) -> None:
    assert api.query(ANALYST, COUNT).status_code == 200  # opens this month's budget at the default cap 1.0
    response = api.call(STEWARD, "PUT", "/v1/budgets/caps",
                        json={"dataset": DATASET, "scope": "analyst", "subject": ANALYST, "epsilon": 0.15})
    assert response.status_code == 200

    mine = api.get(ANALYST, BUDGETS, params={"dataset": DATASET}).json()
    analyst_budget = next(b for b in mine if b["scope"] == "analyst")
    assert analyst_budget["cap_epsilon"] == pytest.approx(0.15)
    assert analyst_budget["remaining_epsilon"] == pytest.approx(0.05)
    refused = api.query(ANALYST, count_query(epsilon=0.1, confidence=0.9))
    assert refused.status_code == 409 and refused.json()["scope"] == "analyst"
    # Other analysts keep the default.
    assert api.query(OTHER_ANALYST, count_query(epsilon=0.2)).status_code == 200


def test_a_steward_registers_a_dataset(api: Api, tmp_path: Path) -> None:
    metadata = base_metadata()
    metadata["name"] = "second-services"
    folder = make_dataset_folder(tmp_path / "more", metadata=metadata)
    response = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert response.status_code == 201 and response.json()["name"] == "second-services"
    assert [d["name"] for d in api.get(ANALYST, "/v1/datasets").json()] == ["second-services", DATASET]
    wait_prepared(api, "second-services")  # prepared in the background: answered once ready
    assert api.query(ANALYST, count_query(dataset="second-services")).status_code == 200
    missing = api.post(STEWARD, "/v1/datasets", json={"path": str(tmp_path / "nowhere")})
    assert missing.status_code == 422 and missing.json()["field"] == "metadata"


def test_every_steward_change_leaves_a_change_record(api: Api) -> None:
    steward_id = api.key_row(api.keys[STEWARD]).account_id
    spare_prefix = api.key_row(api.new_key(ANALYST)).prefix
    changes = [
        ("POST", "/v1/accounts", {"name": "new-one", "agency": "transport"}, "account.create"),
        ("POST", "/v1/accounts/new-one/keys", {}, "key.create"),
        ("POST", "/v1/accounts/new-one/roles", {"role": "analyst", "agency": "transport"}, "role.grant"),
        ("DELETE", "/v1/accounts/new-one/roles/analyst/transport", None, "role.revoke"),
        ("DELETE", f"/v1/keys/{spare_prefix}", None, "key.revoke"),
        ("PUT", "/v1/budgets/caps", {"dataset": DATASET, "scope": "agency", "subject": "health", "epsilon": 1.5},
         "budget.set_cap"),
        ("POST", "/v1/policies", {"subject": "account:new-one", "agency": "transport", "object": "dataset:*",
                                  "action": "release.read", "cap": "*", "effect": "allow"}, "policy.add"),
        ("POST", "/v1/datasets", {"path": str(api.dataset_folder)}, "dataset.register"),
    ]
    for method, path, body, action in changes:
        response = api.call(STEWARD, method, path, json=body)
        assert response.status_code in (200, 201), (path, response.text)
        [record] = [r for r in api.records(action) if r.account_id == steward_id]
        assert record.decision == "allowed"
    by_the_steward = [r.action for r in api.records() if r.account_id == steward_id]
    assert by_the_steward == [action for *_, action in changes]


@pytest.mark.parametrize("path", [QUERIES, ESTIMATES], ids=["query", "estimate"])
def test_a_steward_cannot_query(api: Api, path: str) -> None:
    response = api.post(STEWARD, path, json=COUNT)
    assert response.status_code == 403
    assert "forbids 'account:steward'" in response.json()["detail"]
    assert api.count(Release) == 0


# -- oversight -------------------------------------------------------------------------------


def test_oversight_reads_every_budget_but_cannot_query_or_manage(api: Api) -> None:
    assert api.query(ANALYST, COUNT).status_code == 200
    assert api.query(OTHER_ANALYST, count_query(epsilon=0.2)).status_code == 200

    response = api.get(OVERSIGHT, BUDGETS, params={"all": "true"})
    assert response.status_code == 200
    seen = {(b["scope"], b["subject"]): b["spent_micro"] for b in response.json()}
    assert seen[("analyst", ANALYST)] == 100_000 and seen[("analyst", OTHER_ANALYST)] == 200_000
    assert seen[("agency", "health")] == 100_000 and seen[("agency", "transport")] == 200_000
    assert seen[("dataset", "*")] == seen[("lifetime", "*")] == 300_000
    assert api.get(STEWARD, BUDGETS, params={"all": "true"}).json() == response.json()

    assert api.query(OVERSIGHT, count_query(epsilon=0.3)).status_code == 403
    assert api.post(OVERSIGHT, ESTIMATES, json=COUNT).status_code == 403
    assert api.post(OVERSIGHT, "/v1/accounts", json={"name": "x", "agency": "y"}).status_code == 403
    assert api.call(OVERSIGHT, "PUT", "/v1/budgets/caps",
                    json={"dataset": DATASET, "scope": "analyst", "subject": ANALYST, "epsilon": 5}).status_code == 403


@pytest.mark.parametrize("who", [ANALYST, OTHER_ANALYST, FEED], ids=[ANALYST, OTHER_ANALYST, FEED])
def test_only_stewards_and_oversight_read_all_budgets(api: Api, who: str) -> None:
    assert api.query(OTHER_ANALYST, COUNT).status_code == 200
    response = api.get(who, BUDGETS, params={"all": "true"})
    assert response.status_code == 403 and response.json()["error"] == "forbidden"


def test_an_analyst_sees_only_the_budgets_they_draw_on(api: Api) -> None:
    assert api.query(OTHER_ANALYST, COUNT).status_code == 200
    mine = api.get(ANALYST, BUDGETS).json()
    assert [(b["scope"], b["subject"]) for b in mine] == [
        ("analyst", ANALYST), ("agency", "health"), ("dataset", "*"), ("lifetime", "*")]
    assert [b["spent_micro"] for b in mine] == [0, 0, 100_000, 100_000]


# -- restarts --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_ledger_and_the_releases_survive_a_restart(request: pytest.FixtureRequest, tmp_path: Path,
                                                       dataset_folder: Path, backend: str) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    with running_api(tmp_path / "state", dataset_folder, database_url=url) as first:
        answer = first.query(ANALYST, COUNT).json()
        spent, keys = first.spent_micro(ANALYST), first.keys
    assert spent["analyst"] == 100_000

    with running_api(tmp_path / "state", None, database_url=url, keys=keys) as second:
        assert second.spent_micro(ANALYST) == spent
        mine = second.get(ANALYST, BUDGETS, params={"dataset": DATASET}).json()
        assert [b["spent_micro"] for b in mine] == [100_000] * 4
        again = second.query(ANALYST, COUNT).json()
        assert again["cached"] is True and again["release_id"] == answer["release_id"]
        assert again["rows"] == answer["rows"]
        # The remaining 0.9 is all there is: a 0.5 and a 0.5 do not both fit any more.
        assert second.query(ANALYST, count_query(epsilon=0.5)).status_code == 200
        assert second.query(ANALYST, count_query(epsilon=0.5, confidence=0.9)).status_code == 409


# -- the Python client -----------------------------------------------------------------------


def _client(api: Api, key: str) -> analyst_client.Client:
    return analyst_client.Client("http://testserver", key, transport=ViaTestClient(api.client))


def test_the_python_client_returns_a_dataframe_with_its_cost_and_budgets(api: Api) -> None:
    with _client(api, api.keys[ANALYST]) as client:
        assert [d["name"] for d in client.datasets()] == [DATASET]
        assert client.estimate(COUNT)["loss"]["epsilon"] == pytest.approx(0.1)
        frame = client.run(COUNT)
        assert isinstance(frame, pd.DataFrame)
        assert list(frame.columns) == ["channel", "value", "ci_low", "ci_high"] and len(frame) == 4
        assert (frame["ci_low"] < frame["value"]).all() and (frame["value"] < frame["ci_high"]).all()
        assert frame.attrs["epsilon"] == pytest.approx(0.1) and frame.attrs["charged"] == pytest.approx(0.1)
        assert frame.attrs["cached"] is False
        analyst_budget = next(b for b in frame.attrs["budgets"] if b["scope"] == "analyst")
        assert analyst_budget["remaining_epsilon"] == pytest.approx(0.9)

        again = client.run(COUNT)
        assert again.attrs["cached"] is True and again.attrs["charged"] == 0
        pd.testing.assert_frame_equal(again, frame)
        assert [b["spent_micro"] for b in client.budgets(DATASET)] == [100_000] * 4


def _spend_everything(api: Api) -> None:
    api.set_cap("analyst", ANALYST, 0.05)


CLIENT_ERRORS = [
    ("unauthenticated", lambda api: _flip_last(api.keys[ANALYST]), None, COUNT,
     analyst_client.Unauthenticated, "valid API key is required"),
    ("access denied", lambda api: api.keys[STEWARD], None, COUNT, analyst_client.AccessDenied, "forbids"),
    ("invalid query", lambda api: api.keys[ANALYST], None, count_query(epsilon=0), analyst_client.InvalidQuery,
     "epsilon: must be a finite number greater than 0"),
    ("not found", lambda api: api.keys[ANALYST], None, count_query(dataset="nope"), analyst_client.NotFound,
     "no dataset named 'nope'"),
    ("budget exhausted", lambda api: api.keys[ANALYST], _spend_everything, COUNT, analyst_client.BudgetExhausted,
     "remaining analyst budget of epsilon 0.05"),
]


@pytest.mark.parametrize("key_of, setup, spec, error, message", [case[1:] for case in CLIENT_ERRORS],
                         ids=[case[0] for case in CLIENT_ERRORS])
def test_the_python_client_raises_the_servers_refusals(api: Api, key_of, setup, spec, error,  # type: ignore[no-untyped-def]
                                                       message: str) -> None:
    if setup is not None:
        setup(api)
    with _client(api, key_of(api)) as client, pytest.raises(error, match=message) as raised:
        client.run(spec)
    refusal = raised.value
    assert isinstance(refusal, analyst_client.ClientError)
    if isinstance(refusal, analyst_client.BudgetExhausted):
        assert refusal.remaining == pytest.approx(0.05) and refusal.renews_at
        assert math.isclose(refusal.body["requested_epsilon"], 0.1)
    if isinstance(refusal, analyst_client.AccessDenied):
        assert refusal.rule == ["steward", "*", "*", "query.run", "*", "deny"]
    if isinstance(refusal, analyst_client.InvalidQuery):
        assert refusal.field == "epsilon"
    assert api.count(Release) == 0
