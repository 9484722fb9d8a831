"""The authorisation matrix: every caller x every endpoint, against a table written out here.

Callers are the five demo roles and an anonymous client. Endpoints that concern a dataset
are asked about three datasets: ``shared`` (registered for every agency, as the server
registers datasets), ``health-only`` and ``transport-only`` (their policy objects linked in
one agency only), so the analysts' columns read "own agency" and "other agency". The
table is what the default rules (policies/defaults.py) and GOVERNANCE.md say: analysts
query and read releases where their agency may, stewards manage but never query,
oversight reads budgets and releases everywhere but never queries or manages, the feed
consumer reads the feeds shared with its agency and nothing else (stewards define and trigger
feeds, oversight and stewards see their overview), only oversight reads the audit log,
and anonymous callers get 401 on everything but health, readiness and the log's public key.

Cells in ``KNOWN_GAPS`` are what governance asks for but the server does not do yet;
they are expected failures (strict: they turn red once fixed, so the table is updated).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.state import registry
from civicdp.server.state.db import session_scope
from civicdp.server.feeds.schemas import FeedDefinition
from civicdp.server.feeds.service import FeedService
from sqlmodel import select

from civicdp.server.state.caller import Caller
from civicdp.server.state.models import Account
from civicdp.server.monitors.service import MonitorService
from tests.conftest import base_metadata
from tests.server.api_fixtures import (
    ANALYST, DATASET, FEED, OTHER_ANALYST, OVERSIGHT, STEWARD, Api, count_query, make_dataset_folder, running_api,
)

ANONYMOUS = "anonymous"
CALLERS = (STEWARD, ANALYST, OTHER_ANALYST, OVERSIGHT, FEED, ANONYMOUS)
SHARED, HEALTH_ONLY, TRANSPORT_ONLY = DATASET, "health-only", "transport-only"
AGENCY_DATASETS = {HEALTH_ONLY: "health", TRANSPORT_ONLY: "transport"}
SPARE = "spare"  # an account without roles, for the key and role endpoints
FEED_NAME = "matrix-feed"  # shared with health: only health's feed consumer reads it
#: The table's labels for the three datasets.
DATASETS = {"shared": SHARED, "health-only": HEALTH_ONLY, "transport-only": TRANSPORT_ONLY}

# The expected status of every (endpoint, caller). One row per endpoint; columns in CALLERS order.
#                                                     steward  ana-health  ana-transport  oversight  feed  anonymous
EXPECTED_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "GET /v1/health":                                     (200,    200,        200,           200,       200,  200),
    "GET /v1/ready":                                      (200,    200,        200,           200,       200,  200),
    "GET /v1/datasets":                                   (200,    200,        200,           200,       200,  401),
    "GET /v1/datasets/{name} [shared]":                   (200,    200,        200,           200,       403,  401),
    "GET /v1/datasets/{name} [health-only]":              (200,    200,        403,           200,       403,  401),
    "GET /v1/datasets/{name} [transport-only]":           (200,    403,        200,           200,       403,  401),
    "POST /v1/queries/estimate [shared]":                 (403,    200,        200,           403,       403,  401),
    "POST /v1/queries/estimate [health-only]":            (403,    200,        403,           403,       403,  401),
    "POST /v1/queries/estimate [transport-only]":         (403,    403,        200,           403,       403,  401),
    "POST /v1/queries [shared]":                          (403,    200,        200,           403,       403,  401),
    "POST /v1/queries [health-only]":                     (403,    200,        403,           403,       403,  401),
    "POST /v1/queries [transport-only]":                  (403,    403,        200,           403,       403,  401),
    # A release's query is its agency's (made by ana-health here): other agencies get the 403 of a missing one.
    "GET /v1/releases/{release_id} [shared]":             (403,    200,        403,           200,       403,  401),
    "GET /v1/releases/{release_id} [health-only]":        (403,    200,        403,           200,       403,  401),
    "GET /v1/releases/{release_id} [transport-only]":     (403,    403,        200,           200,       403,  401),
    "GET /v1/budgets":                                    (403,    200,        200,           403,       403,  401),
    "GET /v1/budgets [all=true]":                         (200,    403,        403,           200,       403,  401),
    "PUT /v1/budgets/caps":                               (200,    403,        403,           403,       403,  401),
    "GET /v1/budgets/caps":                               (200,    403,        403,           200,       403,  401),
    "GET /v1/accounts":                                   (200,    403,        403,           403,       403,  401),
    "POST /v1/accounts":                                  (201,    403,        403,           403,       403,  401),
    "POST /v1/accounts/{name}/keys":                      (201,    403,        403,           403,       403,  401),
    "DELETE /v1/keys/{prefix}":                           (200,    403,        403,           403,       403,  401),
    "POST /v1/accounts/{name}/roles":                     (200,    403,        403,           403,       403,  401),
    "DELETE /v1/accounts/{name}/roles/{role}/{agency}":   (200,    403,        403,           403,       403,  401),
    "GET /v1/policies":                                   (200,    403,        403,           403,       403,  401),
    "POST /v1/policies":                                  (201,    403,        403,           403,       403,  401),
    "POST /v1/datasets":                                  (201,    403,        403,           403,       403,  401),
    "GET /v1/datasets/{name}/preparation":                (200,    403,        403,           403,       403,  401),
    "GET /v1/datasets/{name}/findings":                   (200,    403,        403,           403,       403,  401),
    # Plans are analysts' questions, each part checked as the query it is. A stored plan is its agency's: outside
    # it (ana-transport; steward and oversight, whose accounts are another agency's) no plan has that id (404); health's
    # feed consumer is refused the plan's queries (403).
    "POST /v1/plans [shared]":                            (403,    200,        200,           403,       403,  401),
    "POST /v1/plans [health-only]":                       (403,    200,        403,           403,       403,  401),
    "POST /v1/plans [transport-only]":                    (403,    403,        200,           403,       403,  401),
    "GET /v1/plans/{plan_id}":                            (404,    200,        404,           404,       403,  401),
    "POST /v1/plans/{plan_id}/run":                       (404,    200,        404,           404,       403,  401),
    "GET /v1/audit/entries":                              (403,    403,        403,           200,       403,  401),
    "GET /v1/audit/ledger":                               (403,    403,        403,           200,       403,  401),
    "GET /v1/audit/checkpoint":                           (403,    403,        403,           200,       403,  401),
    "GET /v1/audit/public-key":                           (200,    200,        200,           200,       200,  200),
    "GET /v1/audit/proofs/inclusion":                     (403,    403,        403,           200,       403,  401),
    "GET /v1/audit/proofs/consistency":                   (403,    403,        403,           200,       403,  401),
    "GET /v1/audit/export":                               (403,    403,        403,           200,       403,  401),
    "GET /v1/feeds":                                      (200,    200,        200,           200,       200,  401),
    "GET /v1/feeds/overview":                             (200,    403,        403,           200,       403,  401),
    "POST /v1/feeds":                                     (201,    403,        403,           403,       403,  401),
    "POST /v1/feeds/{name}/releases":                     (201,    403,        403,           403,       403,  401),
    "GET /v1/feeds/{name}":                               (403,    403,        403,           403,       200,  401),
    "GET /v1/feeds/{name}/releases/{release}":            (403,    403,        403,           403,       200,  401),
    "GET /v1/feeds/{name}/releases/{release}/signature":  (403,    403,        403,           403,       200,  401),
    "GET /v1/monitors":                                   (200,    200,        200,           200,       403,  401),
    "POST /v1/monitors":                                  (201,    403,        403,           403,       403,  401),
    "GET /v1/monitors/{name}":                            (200,    200,        403,           200,       403,  401),
    "DELETE /v1/monitors/{name}":                         (200,    403,        403,           403,       403,  401),
    "POST /v1/monitors/{name}/batches":                   (201,    403,        403,           403,       403,  401),
    "GET /v1/monitors/{name}/releases":                   (200,    200,        403,           200,       403,  401),
    "GET /v1/monitors/{name}/alerts":                     (200,    200,        403,           200,       403,  401),
    "GET /v1/monitors/{name}/alerts/stream":              (200,    200,        403,           200,       403,  401),
    "POST /v1/monitors/{name}/subscriptions":             (403,    201,        403,           403,       403,  401),
    # A feed's specs are held to a query by its consumer agencies (issue 19): even a steward is refused.
    "POST /v1/feeds [above the consumers' per-query cap]": (403,   403,        403,           403,       403,  401),
    "POST /v1/feeds [a column sensitive for consumers]":  (403,    403,        403,           403,       403,  401),
    # A column's class (issue 14): stewards only. The column no other cell reads, set to the class it has.
    "PUT /v1/datasets/{name}/columns/{column}/class":     (200,    403,        403,           403,       403,  401),
}
EXPECTED = {(caller, endpoint): status for endpoint, row in EXPECTED_TABLE.items()
            for caller, status in zip(CALLERS, row, strict=True)}

#: Which datasets each caller is shown by GET /v1/datasets.
VISIBLE = {
    STEWARD: [HEALTH_ONLY, SHARED, TRANSPORT_ONLY],
    ANALYST: [HEALTH_ONLY, SHARED],
    OTHER_ANALYST: [SHARED, TRANSPORT_ONLY],
    OVERSIGHT: [HEALTH_ONLY, SHARED, TRANSPORT_ONLY],
    FEED: [],
}

#: Cells governance asks for but the server does not do yet, with the reason: (caller, endpoint) -> reason.
#: Empty since roles held in '*' are also evaluated in the agency an object is linked in (policies/model.conf),
#: which closed the agency-scoped gap of stewards and oversight.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


@dataclass
class Matrix:
    """The app with the three datasets, a release on each, and a spare account."""

    api: Api
    releases: dict[str, int]
    folder: Path
    plan: str  # a plan of health's analyst on the shared dataset


def _register_for_one_agency(api: Api, folder: Path, agency: str) -> None:
    state = api.state
    with session_scope(state.db) as session:
        row = registry.register(session, folder)
        for table in registry.metadata_of(row).tables.values():
            for column in table.columns:
                state.policies.assign_public_column(row.name, column, agency=agency)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("matrix")
    folder = make_dataset_folder(root / "datasets")
    with running_api(root / "state", folder) as api:
        for name, agency in AGENCY_DATASETS.items():
            metadata = base_metadata()
            metadata["name"] = name
            _register_for_one_agency(api, make_dataset_folder(root / "datasets", metadata=metadata), agency)
        with session_scope(api.state.db) as session:
            admin.create_account(session, None, SPARE, "health")
        releases = {}
        for dataset, owner in ((SHARED, ANALYST), (HEALTH_ONLY, ANALYST), (TRANSPORT_ONLY, OTHER_ANALYST)):
            response = api.query(owner, count_query(dataset=dataset))
            assert response.status_code == 200, response.text
            releases[dataset] = response.json()["release_id"]
        # A feed of the shared dataset for health's feed consumers, with its first release.
        feeds = FeedService.of(api.state)
        feeds.define(None, FeedDefinition(name=FEED_NAME, dataset=SHARED, specs=[count_query(epsilon=0.05)],
                                          schedule="monthly", releases=10, agencies=["health"]))
        feeds.trigger(None, FEED_NAME)
        # A monitor of health's, which health's analyst follows.
        _new_monitor(api, MONITOR_NAME)
        assert api.post(ANALYST, f"/v1/monitors/{MONITOR_NAME}/subscriptions", json={}).status_code == 201
        created = api.post(ANALYST, "/v1/plans", json=_plan(SHARED))
        assert created.status_code == 200, created.text
        yield Matrix(api, releases, folder, created.json()["id"])


MONITOR_NAME = "matrix-monitor"


def _plan(dataset: str) -> dict[str, Any]:
    return {"dataset": dataset, "contributions": 5,
            "parts": [{"name": "by_service", "aggregate": "count", "group_by": ["service"],
                       "accuracy": {"half_width": 2000}}]}


def _monitor_spec(name: str) -> dict[str, Any]:
    return {"name": name, "dataset": SHARED, "metric": "count", "group_by": "channel", "step": "day",
            "start": "2025-01-01T00:00:00", "horizon": 4, "epsilon": 0.01, "agency": "health"}


def _new_monitor(api: Api, name: str) -> str:
    with session_scope(api.state.db) as session:
        account = session.exec(select(Account).where(Account.name == STEWARD)).one()
        steward = Caller(account_id=account.id or 0, name=STEWARD, agency=account.agency)
    MonitorService(api.state.db, api.settings.data_dir, api.state.caps).define(steward, _monitor_spec(name))
    return name


def _batch_request(m: Matrix) -> Request:
    from tests.server.monitors.test_monitors import batch

    name = _new_monitor(m.api, f"m-{uuid.uuid4().hex[:8]}")
    return ("POST", f"/v1/monitors/{name}/batches", {
        "content": batch(0, 1), "headers": {"Content-Type": "application/octet-stream"},
        "params": {"start": "2025-01-01T00:00:00", "end": "2025-01-02T00:00:00"}})


# -- the requests, one per endpoint ------------------------------------------------------

Request = tuple[str, str, dict[str, Any]]


def _fresh_key_prefix(m: Matrix) -> str:
    return m.api.new_key(SPARE).split("_")[1]


def _held_role(m: Matrix) -> str:
    with session_scope(m.api.state.db) as session:
        admin.grant_role(session, m.api.state.policies, None, SPARE, Role.ANALYST, "transport")
    return f"/v1/accounts/{SPARE}/roles/analyst/transport"


def _metadata(dataset: str) -> Callable[[Matrix], Request]:
    return lambda m: ("GET", f"/v1/datasets/{dataset}", {})


def _release(dataset: str) -> Callable[[Matrix], Request]:
    return lambda m: ("GET", f"/v1/releases/{m.releases[dataset]}", {})


def _ask(path: str, dataset: str) -> Callable[[Matrix], Request]:
    # A question of its own (not the stored release's), so an allowed query computes and charges.
    question = count_query(dataset=dataset, group_by=["service"], epsilon=0.05)
    return lambda m: ("POST", path, {"json": question})


REQUESTS: dict[str, Callable[[Matrix], Request]] = {
    "GET /v1/health": lambda m: ("GET", "/v1/health", {}),
    "GET /v1/ready": lambda m: ("GET", "/v1/ready", {}),
    "GET /v1/datasets": lambda m: ("GET", "/v1/datasets", {}),
    **{f"GET /v1/datasets/{{name}} [{d}]": _metadata(DATASETS[d]) for d in DATASETS},
    **{f"POST /v1/queries/estimate [{d}]": _ask("/v1/queries/estimate", DATASETS[d]) for d in DATASETS},
    **{f"POST /v1/queries [{d}]": _ask("/v1/queries", DATASETS[d]) for d in DATASETS},
    **{f"GET /v1/releases/{{release_id}} [{d}]": _release(DATASETS[d]) for d in DATASETS},
    "GET /v1/budgets": lambda m: ("GET", "/v1/budgets", {}),
    "GET /v1/budgets [all=true]": lambda m: ("GET", "/v1/budgets", {"params": {"all": "true"}}),
    "PUT /v1/budgets/caps": lambda m: ("PUT", "/v1/budgets/caps", {"json": {
        "dataset": SHARED, "scope": "lifetime", "subject": "*", "epsilon": 4.0}}),  # the default: no change
    "GET /v1/budgets/caps": lambda m: ("GET", "/v1/budgets/caps", {}),
    "GET /v1/accounts": lambda m: ("GET", "/v1/accounts", {}),
    "POST /v1/accounts": lambda m: ("POST", "/v1/accounts", {"json": {
        "name": f"new-{uuid.uuid4().hex[:8]}", "agency": "health"}}),
    "POST /v1/accounts/{name}/keys": lambda m: ("POST", f"/v1/accounts/{SPARE}/keys", {"json": {}}),
    "DELETE /v1/keys/{prefix}": lambda m: ("DELETE", f"/v1/keys/{_fresh_key_prefix(m)}", {}),
    "POST /v1/accounts/{name}/roles": lambda m: ("POST", f"/v1/accounts/{SPARE}/roles", {"json": {
        "role": "analyst", "agency": "health"}}),
    "DELETE /v1/accounts/{name}/roles/{role}/{agency}": lambda m: ("DELETE", _held_role(m), {}),
    "GET /v1/policies": lambda m: ("GET", "/v1/policies", {}),
    "POST /v1/policies": lambda m: ("POST", "/v1/policies", {"json": {
        "subject": f"account:{SPARE}", "agency": "health", "object": "dataset:*", "action": "release.read",
        "cap": "*", "effect": "allow"}}),
    "POST /v1/datasets": lambda m: ("POST", "/v1/datasets", {"json": {"path": str(m.folder)}}),  # re-register
    "GET /v1/datasets/{name}/preparation": lambda m: ("GET", f"/v1/datasets/{SHARED}/preparation", {}),
    "GET /v1/datasets/{name}/findings": lambda m: ("GET", f"/v1/datasets/{SHARED}/findings", {}),
    "GET /v1/audit/entries": lambda m: ("GET", "/v1/audit/entries", {"params": {"limit": 5}}),
    "GET /v1/audit/ledger": lambda m: ("GET", "/v1/audit/ledger", {}),
    "GET /v1/audit/checkpoint": lambda m: ("GET", "/v1/audit/checkpoint", {}),
    "GET /v1/audit/public-key": lambda m: ("GET", "/v1/audit/public-key", {}),
    "GET /v1/audit/proofs/inclusion": lambda m: ("GET", "/v1/audit/proofs/inclusion", {"params": {"seq": 0}}),
    "GET /v1/audit/proofs/consistency": lambda m: ("GET", "/v1/audit/proofs/consistency",
                                                   {"params": {"first": 1, "second": 2}}),
    "GET /v1/audit/export": lambda m: ("GET", "/v1/audit/export", {}),
    "GET /v1/feeds": lambda m: ("GET", "/v1/feeds", {}),
    "GET /v1/feeds/overview": lambda m: ("GET", "/v1/feeds/overview", {}),
    "POST /v1/feeds": lambda m: ("POST", "/v1/feeds", {"json": {
        "name": f"new-{uuid.uuid4().hex[:8]}", "dataset": SHARED, "specs": [count_query(epsilon=0.01)],
        "schedule": "monthly", "releases": 1, "agencies": ["health"]}}),
    "POST /v1/feeds/{name}/releases": lambda m: ("POST", f"/v1/feeds/{FEED_NAME}/releases", {}),
    "GET /v1/feeds/{name}": lambda m: ("GET", f"/v1/feeds/{FEED_NAME}", {}),
    "GET /v1/feeds/{name}/releases/{release}": lambda m: ("GET", f"/v1/feeds/{FEED_NAME}/releases/1", {}),
    "GET /v1/feeds/{name}/releases/{release}/signature": lambda m: ("GET", f"/v1/feeds/{FEED_NAME}/releases/1/signature",
                                                                  {}),
    "GET /v1/monitors": lambda m: ("GET", "/v1/monitors", {}),
    "POST /v1/monitors": lambda m: ("POST", "/v1/monitors", {"json": _monitor_spec(f"m-{uuid.uuid4().hex[:8]}")}),
    "GET /v1/monitors/{name}": lambda m: ("GET", f"/v1/monitors/{MONITOR_NAME}", {}),
    "DELETE /v1/monitors/{name}": lambda m: ("DELETE", f"/v1/monitors/{_new_monitor(m.api, f'm-{uuid.uuid4().hex[:8]}')}",
                                             {}),
    "POST /v1/monitors/{name}/batches": _batch_request,
    "GET /v1/monitors/{name}/releases": lambda m: ("GET", f"/v1/monitors/{MONITOR_NAME}/releases", {}),
    "GET /v1/monitors/{name}/alerts": lambda m: ("GET", f"/v1/monitors/{MONITOR_NAME}/alerts", {}),
    "GET /v1/monitors/{name}/alerts/stream": lambda m: ("GET", f"/v1/monitors/{MONITOR_NAME}/alerts/stream",
                                                        {"params": {"once": "true"}}),
    "POST /v1/monitors/{name}/subscriptions": lambda m: ("POST", f"/v1/monitors/{MONITOR_NAME}/subscriptions",
                                                         {"json": {}}),
    "POST /v1/feeds [above the consumers' per-query cap]": lambda m: ("POST", "/v1/feeds", {"json": {
        "name": f"new-{uuid.uuid4().hex[:8]}", "dataset": SHARED, "specs": [count_query(epsilon=0.6)],
        "schedule": "monthly", "releases": 1, "agencies": ["health"]}}),
    "POST /v1/feeds [a column sensitive for consumers]": lambda m: _sensitive_feed(m),
    "PUT /v1/datasets/{name}/columns/{column}/class": lambda m: ("PUT", f"/v1/datasets/{SHARED}/columns/remark/class",
                                                                 {"json": {"class": "public"}}),
    **{f"POST /v1/plans [{d}]": lambda m, d=d: ("POST", "/v1/plans", {"json": _plan(DATASETS[d])}) for d in DATASETS},
    "GET /v1/plans/{plan_id}": lambda m: ("GET", f"/v1/plans/{m.plan}", {}),
    "POST /v1/plans/{plan_id}/run": lambda m: ("POST", f"/v1/plans/{m.plan}/run", {}),
}
assert set(REQUESTS) == set(EXPECTED_TABLE), set(REQUESTS) ^ set(EXPECTED_TABLE)


def _cells(expected: dict[tuple[str, str], Any]) -> list[Any]:
    return [pytest.param(caller, endpoint, want, id=f"{caller}: {endpoint}",
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[caller, endpoint])]
                         if (caller, endpoint) in KNOWN_GAPS else [])
            for (caller, endpoint), want in expected.items()]


@pytest.mark.parametrize("caller, endpoint, status", _cells(EXPECTED))
def test_the_authorisation_matrix(matrix: Matrix, caller: str, endpoint: str, status: int) -> None:
    method, path, kwargs = REQUESTS[endpoint](matrix)
    response = matrix.api.call(None if caller == ANONYMOUS else caller, method, path, **kwargs)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"] == "forbidden"
    if status == 401:
        assert response.json()["error"] == "unauthenticated"


@pytest.mark.parametrize("caller, endpoint, names", _cells(
    {(caller, "GET /v1/datasets [names]"): names for caller, names in VISIBLE.items()}))
def test_each_caller_is_shown_the_datasets_it_may_use(matrix: Matrix, caller: str, endpoint: str,
                                                     names: list[str]) -> None:
    response = matrix.api.get(caller, "/v1/datasets")
    assert response.status_code == 200
    assert [d["name"] for d in response.json()] == names


def test_the_table_covers_every_operation_of_the_api(matrix: Matrix) -> None:
    """A new route needs a row: the table's operations are exactly the OpenAPI document's."""
    paths = matrix.api.client.get("/openapi.json").json()["paths"]
    documented = {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations}
    assert {endpoint.split(" [")[0] for endpoint in EXPECTED_TABLE} == documented


def _sensitive_feed(m: Matrix) -> Request:
    """A feed grouping by a column classified sensitive (which no other cell reads)."""
    from civicdp.policies.actions import ColumnClass

    m.api.state.policies.classify_column(SHARED, "satisfaction", ColumnClass.SENSITIVE)
    return ("POST", "/v1/feeds", {"json": {
        "name": f"new-{uuid.uuid4().hex[:8]}", "dataset": SHARED,
        "specs": [count_query(group_by=["satisfaction"], epsilon=0.01)],
        "schedule": "monthly", "releases": 1, "agencies": ["health"]}})
