"""Schemathesis over the app's own OpenAPI schema, in-process: every operation, once per role's
key and once anonymously (GOVERNANCE.md, "Testing what matters").

For every generated request (valid and invalid ones): no 5xx, the status code is one the
operation documents, and the body conforms to the documented schema for that status.
Anonymous requests are refused with 401 everywhere but ``/v1/health``, ``/v1/ready`` and the
audit log's public key.

The dataset is registered under the name of the schema's own query example
(``civic-demo``, with the columns that example groups by), so the examples phase also
sends answerable queries. Bounded: ``max_examples`` per operation and no deadline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from civicdp.server.http.app import create_app
from civicdp.server.services.request_bodies import QueryRequest
from tests.conftest import base_metadata
from tests.server.api_fixtures import ANALYST, ROLES, make_dataset_folder, prepare_state, settings_for

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
OPEN_PATHS = {"/v1/health", "/v1/ready", "/v1/audit/public-key"}
ANONYMOUS = "anonymous"
IDENTITIES = [*ROLES, ANONYMOUS]


#: Only for reading the OpenAPI document (never started); each test calls its own app.
SCHEMA_APP = create_app(settings_for(Path("never-started")))


def _load(*phases: str) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_dict(SCHEMA_APP.openapi())
    loaded.app = SCHEMA_APP  # Schemathesis then calls an ASGI app in-process (the one passed as app=)
    loaded.config.phases.update(phases=list(phases))
    return loaded


#: Documented examples and random valid and invalid requests, for every caller.
schema = _load("examples", "fuzzing")
#: Schemathesis's boundary and invalid-value cases: for the two callers whose requests get
#: past authorisation on most operations, where the values are actually used.
edge_cases = _load("coverage")


@dataclass
class Served:
    """A started app and who is calling it."""

    who: str
    headers: dict[str, str]
    app: FastAPI


@pytest.fixture(scope="module", params=IDENTITIES, ids=IDENTITIES)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One app per caller, shared by that caller's tests of every operation."""
    root = tmp_path_factory.mktemp("schemathesis")
    metadata = base_metadata()
    metadata["name"] = QueryRequest.examples[0]["dataset"]
    settings = settings_for(root / "state")
    keys = prepare_state(settings, make_dataset_folder(root / "datasets", metadata=metadata))
    who = request.param
    headers = {} if who == ANONYMOUS else {"Authorization": f"Bearer {keys[who]}"}
    try:
        yield Served(who, headers, create_app(settings))
    finally:
        # Schemathesis starts an app's lifespan on its first call and keeps it running;
        # ending it disposes the app's database engines.
        asgi.shutdown_lifespans()


def _undecodable_body(case: schemathesis.Case) -> bool:
    """Raw bytes that are not JSON text: FastAPI refuses them (422) before any dependency runs."""
    if not isinstance(case.body, bytes):
        return False
    try:
        json.loads(case.body.decode("utf-8"))
    except ValueError:
        return True
    return False


SETTINGS = hypothesis.settings(max_examples=10, deadline=None, database=None,
                              suppress_health_check=list(hypothesis.HealthCheck))


def check(case: schemathesis.Case, served: Served) -> None:
    response = case.call_and_validate(app=served.app, headers=served.headers, checks=CHECKS)
    documented_method = case.method.upper() == case.operation.method.upper()  # not a 405 probe
    if served.who == ANONYMOUS and case.operation.path not in OPEN_PATHS and documented_method:
        allowed = {401, 422} if _undecodable_body(case) else {401}
        assert response.status_code in allowed, f"{case.operation.label} answered an anonymous call"


@schema.parametrize()
@SETTINGS
def test_every_caller_gets_documented_answers(case: schemathesis.Case, served: Served) -> None:
    check(case, served)


@edge_cases.parametrize()
@SETTINGS
@pytest.mark.parametrize("served", ["steward", ANALYST], indirect=True)
def test_edge_cases_get_documented_answers(case: schemathesis.Case, served: Served) -> None:
    check(case, served)
