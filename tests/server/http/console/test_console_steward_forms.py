"""The steward's larger console forms: register a dataset, add a policy rule, define a feed or a monitor,
stop a monitor — each refused without the CSRF token and for an analyst (nothing changed), its entry
seen by oversight at once, and bad input a 4xx page naming the problem (never a 500)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from civicdp.server.state.feed_models import Feed
from civicdp.server.state.monitor_models import Monitor
from civicdp.server.state.models import DatasetPreparation
from tests.conftest import base_metadata
from tests.server.api_fixtures import (  # noqa: F401
    ANALYST, DATASET, OVERSIGHT, STEWARD, Api, api, dataset_folder, make_dataset_folder)
from tests.server.http.console.console_fixtures import csrf_of, sign_in

NEW_DATASET = "console-registered"
RULE = {"subject": "analyst", "agency": "housing", "object": DATASET, "action": "query.run", "cap": "0.5",
        "effect": "allow"}
FEED = {"name": "console-defined", "dataset": DATASET, "schedule": "weekly", "releases": 2, "agencies": ["health"],
        "specs": [{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.02}]}
MONITOR = {"name": "console-monitor", "dataset": DATASET, "metric": "count", "group_by": "channel", "step": "day",
           "start": "2025-01-01T00:00:00", "horizon": 4, "epsilon": 0.01, "agency": "health"}


def _new_folder(tmp_path: Path) -> str:
    metadata = base_metadata()
    metadata["name"] = NEW_DATASET
    return str(make_dataset_folder(tmp_path / "incoming", metadata=metadata))


def _rules(api: Api) -> list[list[str]]:
    answer = api.get(STEWARD, "/v1/policies")
    assert answer.status_code == 200
    return answer.json()


def _forms(tmp_path: Path) -> dict[str, tuple[str, dict[str, str], str]]:
    """Each change: its path, its form, the audit action it records."""
    return {
        "dataset": ("/console/steward/datasets", {"path": _new_folder(tmp_path), "accept_dropped_keys": "1"},
                    "dataset.register"),
        "rule": ("/console/steward/policies", RULE, "policy.add"),
        "feed": ("/console/steward/feeds", {"definition": json.dumps(FEED)}, "feed.define"),
        "monitor": ("/console/steward/monitors", {"definition": json.dumps(MONITOR)}, "monitor.manage"),
        "stop": ("/console/steward/monitors/stop", {"name": MONITOR["name"]}, "monitor.manage"),
    }


def _state(api: Api, change: str) -> Any:
    """What ``change`` changes, to compare before and after."""
    if change == "dataset":
        return api.count(DatasetPreparation, DatasetPreparation.dataset == NEW_DATASET)
    if change == "rule":
        return len(_rules(api))
    if change == "feed":
        return api.count(Feed, True)
    if change == "monitor":
        return api.count(Monitor, True)
    return api.get(STEWARD, f"/v1/monitors/{MONITOR['name']}").json()["active"]


def _prepare(api: Api, change: str) -> None:
    if change == "stop":
        assert api.post(STEWARD, "/v1/monitors", json=MONITOR).status_code == 201


def _seen_by_oversight(api: Api, action: str) -> None:
    entry = api.records(action)[-1]
    assert entry.account == STEWARD and entry.decision == "allowed"
    log = sign_in(api, OVERSIGHT).get(f"/console/audit?action={action}")
    assert log.status_code == 200 and f'/console/audit/{entry.seq}"' in log.text


CHANGES = ["dataset", "rule", "feed", "monitor", "stop"]


@pytest.mark.parametrize("change", CHANGES)
def test_each_form_needs_the_csrf_token_and_the_steward_role(api: Api, tmp_path: Path, change: str) -> None:
    _prepare(api, change)
    path, form, _ = _forms(tmp_path)[change]
    before = _state(api, change)
    steward = sign_in(api, STEWARD)
    for token in (None, "not-the-token"):
        refused = steward.post(path, data=form if token is None else {**form, "csrf": token})
        assert refused.status_code == 403 and "security token" in refused.text
    other_site = steward.post(path, data={**form, "csrf": csrf_of(steward)}, headers={"Sec-Fetch-Site": "cross-site"})
    assert other_site.status_code == 403 and "security token" in other_site.text
    analyst = sign_in(api, ANALYST)
    denied = analyst.post(path, data={**form, "csrf": csrf_of(analyst)})
    assert denied.status_code == 403 and 'id="refusal"' in denied.text
    assert _state(api, change) == before
    assert [e for e in api.records() if e.account == ANALYST and e.decision == "denied"]


@pytest.mark.parametrize("change", ["rule", "feed", "monitor", "stop"])
def test_a_form_change_is_confirmed_and_seen_by_oversight(api: Api, tmp_path: Path, change: str) -> None:
    _prepare(api, change)
    path, form, action = _forms(tmp_path)[change]
    before = _state(api, change)
    steward = sign_in(api, STEWARD)
    answer = steward.post(path, data={**form, "csrf": csrf_of(steward, "/console/steward")})
    assert answer.status_code == 303, answer.text
    code = {"rule": "rule_added", "feed": "feed_defined", "monitor": "monitor_defined", "stop": "monitor_stopped"}
    assert answer.headers["location"] == f"/console/steward?done={code[change]}"
    assert 'id="done"' in steward.get(answer.headers["location"]).text
    assert _state(api, change) != before
    _seen_by_oversight(api, action)


def test_the_rule_added_is_the_one_typed(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    assert steward.post("/console/steward/policies", data={**RULE, "csrf": csrf_of(steward)}).status_code == 303
    assert ["analyst", "housing", DATASET, "query.run", "0.5", "allow"] in _rules(api)


def test_registering_a_dataset_shows_what_the_check_found(api: Api, tmp_path: Path) -> None:
    path, form, action = _forms(tmp_path)["dataset"]
    steward = sign_in(api, STEWARD)
    answer = steward.post(path, data={**form, "csrf": csrf_of(steward)})
    assert answer.status_code == 200, answer.text
    assert 'id="registered"' in answer.text and NEW_DATASET in answer.text and 'id="findings"' in answer.text
    assert _state(api, "dataset") == 1
    entry = api.records(action)[-1]
    assert "dropped_keys" in entry.entry_json  # the accepted problem is recorded
    _seen_by_oversight(api, action)


@pytest.mark.parametrize("change, field, bad, status, named", [
    ("dataset", "path", "/no/such/folder", 422, "no metadata file at /no/such/folder"),
    ("dataset", "path", "", 422, "path"),
    ("rule", "action", "query.everything", 422, "action"),
    ("rule", "cap", "lots", 422, "cap"),
    ("feed", "definition", "{not json", 422, "not JSON"),
    ("feed", "definition", "[1, 2]", 422, "not an object"),
    ("feed", "definition", json.dumps({**FEED, "releases": "many"}), 422, "releases"),
    ("feed", "definition", json.dumps({**FEED, "dataset": "no-such-dataset"}), 422, "no-such-dataset"),
    ("monitor", "definition", json.dumps({**MONITOR, "metric": "median-ish"}), 422, "metric"),
    ("monitor", "definition", "x" * 20_001, 422, "more than 20000"),
    ("stop", "name", "no-such-monitor", 404, "no-such-monitor"),
])
def test_bad_input_is_a_page_naming_the_problem(api: Api, tmp_path: Path, change: str, field: str, bad: str,
                                                status: int, named: str) -> None:
    path, form, _ = _forms(tmp_path)[change]
    before = _state(api, change) if change != "stop" else None
    steward = sign_in(api, STEWARD)
    answer = steward.post(path, data={**form, field: bad, "csrf": csrf_of(steward)})
    assert answer.status_code == status and answer.headers["content-type"].startswith("text/html"), answer.text
    assert 'id="refusal"' in answer.text and named in answer.text, answer.text
    if before is not None:
        assert _state(api, change) == before


def test_the_steward_page_carries_each_form_with_its_token_and_confirmation(api: Api) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=MONITOR).status_code == 201
    steward = sign_in(api, STEWARD)
    text = steward.get("/console/steward").text
    token = csrf_of(steward, "/console/steward")
    for form in ("dataset-form", "rule-form", "feed-form", "monitor-form"):
        start = text.index(f'id="{form}"')
        assert "data-confirm=" in text[text.rindex("<form", 0, start):start]
        assert f'name="csrf" value="{token}"' in text[start:text.index("</form>", start)]
    assert 'action="/console/steward/monitors/stop"' in text and f'value="{MONITOR["name"]}"' in text
