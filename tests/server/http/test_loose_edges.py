"""Loose edges of issue 19 (and one of issue 15), each pinned by a regression test.

- ``"expires_in_days": true`` made a 1-day key: booleans are refused (422 naming the field);
  no body at all gets the default lifetime.
- ``since=0.0`` was read as the Unix epoch: audit times must be ISO 8601; a time without a
  zone (``--since 2026-12-01``, an HTTP 500 before) is read as UTC.
- ``OPTIONS`` (and any unserved method) answered 405 with ``Allow`` naming one method where
  the path serves two: the header now lists every method of the path.
- Two ``Authorization`` headers were accepted (the first won): refused with the one 401.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from civicdp.queries.client import Client
from civicdp.server.cli import audit as cli_audit
from civicdp.server.entry import app as cli
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, OVERSIGHT, STEWARD, Api, ViaTestClient, api, dataset_folder,
)

ENTRIES = "/v1/audit/entries"


# -- key lifetimes ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_key_lifetime_is_refused(api: Api, value: bool) -> None:
    keys_before = len(api.records("key.create"))
    response = api.post(STEWARD, f"/v1/accounts/{ANALYST}/keys", json={"expires_in_days": value})
    assert response.status_code == 422
    assert response.json()["field"] == "expires_in_days"
    assert "not true or false" in response.json()["problem"]
    assert len(api.records("key.create")) == keys_before


@pytest.mark.parametrize(("body", "days"), [({"expires_in_days": 1}, 1), ({"expires_in_days": 30}, 30),
                                            ({}, 90), (None, 90)])
def test_key_lifetimes_in_whole_days_and_the_default_without_a_body(api: Api, body: dict | None, days: int) -> None:
    kwargs = {} if body is None else {"json": body}
    response = api.post(STEWARD, f"/v1/accounts/{ANALYST}/keys", **kwargs)
    assert response.status_code == 201, response.text
    expires = datetime.fromisoformat(response.json()["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - (datetime.now(timezone.utc) + timedelta(days=days))) < timedelta(minutes=1)


def test_a_key_without_expiry_is_still_possible(api: Api) -> None:
    response = api.post(STEWARD, f"/v1/accounts/{ANALYST}/keys", json={"expires_in_days": None})
    assert response.status_code == 201 and response.json()["expires_at"] is None


# -- audit times ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0.0", "0", "1700000000", "1.7e9", "yesterday", "2026-13-01", "2026-12-01T25:00",
                                   "12/01/2026", "2026-12-01T00:00:00+01"])
@pytest.mark.parametrize("name", ["since", "until"])
def test_audit_times_that_are_not_iso_8601_are_refused(api: Api, name: str, value: str) -> None:
    response = api.get(OVERSIGHT, ENTRIES, params={name: value})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == name and "ISO 8601" in response.json()["problem"]


def _seqs(api: Api, upto: int, **params: str) -> list[int]:
    """The seqs (at most ``upto``: each request adds its own entry) of the entries selected."""
    response = api.get(OVERSIGHT, ENTRIES, params={**params, "limit": "1000"})
    assert response.status_code == 200, response.text
    return [e["seq"] for e in response.json()["entries"] if e["seq"] <= upto]


def test_audit_times_without_a_zone_are_read_as_utc(api: Api) -> None:
    last = max(r.seq for r in api.records())
    (newest,) = [r for r in api.records() if r.seq == last]
    created = newest.created_at if newest.created_at.tzinfo else newest.created_at.replace(tzinfo=timezone.utc)
    just_after = created + timedelta(milliseconds=1)
    naive = just_after.replace(tzinfo=None).isoformat()
    # The same instant written three ways selects the same entries.
    as_utc = _seqs(api, last, until=naive)
    assert as_utc == _seqs(api, last, until=just_after.isoformat()) == _seqs(
        api, last, until=just_after.astimezone(timezone(timedelta(hours=2))).isoformat())
    assert last in as_utc
    assert last not in _seqs(api, last, since=naive)
    # A date alone is midnight UTC.
    assert last in _seqs(api, last, since=created.date().isoformat())
    assert _seqs(api, last, until=created.date().isoformat()) == []
    assert _seqs(api, last, since=(created.date() + timedelta(days=1)).isoformat()) == []


def test_a_zone_whose_plus_sign_arrived_as_a_space_is_read_as_the_zone(api: Api) -> None:
    last = max(r.seq for r in api.records())
    raw = api.get(OVERSIGHT, f"{ENTRIES}?until=2000-01-01T08:00:00+01:00")  # '+' unencoded: a space
    assert raw.status_code == 200 and [e for e in raw.json()["entries"] if e["seq"] <= last] == []
    assert _seqs(api, last, since="2000-01-01T08:00:00+01:00") == _seqs(api, last)


def test_the_cli_audit_entries_with_a_date_answers(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: ``civicdp audit entries --since 2026-12-01`` was an HTTP 500."""
    monkeypatch.setattr(cli_audit, "_client", lambda url, key: Client(
        "http://testserver", key, transport=ViaTestClient(api.client)))
    today = datetime.now(timezone.utc).date().isoformat()
    result = CliRunner().invoke(cli, ["audit", "entries", "--api-key", api.keys[OVERSIGHT], "--since", today])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["seq"] for line in result.output.splitlines() if line.startswith("{")]
    refused = CliRunner().invoke(cli, ["audit", "entries", "--api-key", api.keys[OVERSIGHT], "--since", "0.0"])
    assert refused.exit_code != 0 and "ISO 8601" in refused.output


# -- OPTIONS and Allow ------------------------------------------------------------------------


def _documented_methods(api: Api) -> dict[str, set[str]]:
    schema = api.client.get("/openapi.json").json()
    return {path: {m.upper() for m in ops} for path, ops in schema["paths"].items()}


def _concrete(path: str) -> str:
    return path.replace("{name}", "x").replace("{prefix}", "x").replace("{role}", "analyst").replace(
        "{agency}", "health").replace("{release}", "1").replace("{release_id}", "1")


def test_a_405_lists_every_method_the_path_serves(api: Api) -> None:
    documented = _documented_methods(api)
    assert documented["/v1/accounts"] == {"GET", "POST"}
    checked = 0
    for path, methods in documented.items():
        if "{" in _concrete(path):
            continue
        for probe in ("OPTIONS", "PATCH", "PUT", "DELETE", "POST"):
            if probe in methods:
                continue
            response = api.call(STEWARD, probe, _concrete(path))
            assert response.status_code == 405, (probe, path, response.status_code)
            assert set(response.headers["allow"].split(", ")) == methods, (probe, path, response.headers["allow"])
            checked += 1
    assert checked > 50


def test_options_is_answered_405_with_the_complete_allow_anonymously_too(api: Api) -> None:
    for path, methods in {"/v1/accounts": "GET, POST", "/v1/monitors/x": "GET, DELETE",
                          "/v1/feeds": "GET, POST"}.items():
        response = api.call(None, "OPTIONS", path)
        assert response.status_code == 405
        assert set(response.headers["allow"].split(", ")) == set(methods.split(", "))


# -- duplicate Authorization headers --------------------------------------------------------


@pytest.mark.parametrize("order", ["valid first", "valid second", "twice the same"])
def test_two_authorization_headers_are_refused_with_the_one_401(api: Api, order: str) -> None:
    valid = f"Bearer {api.keys[STEWARD]}"
    other = valid if order == "twice the same" else "Bearer cdp_AAAAAAAAAAAA_" + "A" * 43
    pair = [valid, other] if order != "valid second" else [other, valid]
    unknown = api.get(None, "/v1/accounts", headers={"Authorization": other if other != valid else "Bearer x"})
    response = api.client.get("/v1/accounts", headers=[("Authorization", pair[0]), ("Authorization", pair[1])])
    assert response.status_code == 401
    assert response.json() == unknown.json() and response.headers["WWW-Authenticate"] == "Bearer"
    failure = json.loads(api.records("auth.failed")[-1].entry_json)
    assert failure["detail"]["reason"] == "malformed"


def test_one_authorization_header_in_any_case_of_bearer_still_works(api: Api) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert api.client.get("/v1/accounts", headers={"Authorization": f"{scheme} {api.keys[STEWARD]}"}
                              ).status_code == 200
