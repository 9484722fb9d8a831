"""The steward's console changes: fixed confirmations, accounts, keys shown once, feed releases,
each with the CSRF check, the policy's refusal for others, and an entry oversight sees at once;
and a failed audit-log integrity check shown as a console page, not JSON or a 500."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from civicdp.server.state.feed_models import FeedRelease
from civicdp.server.state.models import Account, ApiKey
from tests.server.api_fixtures import ANALYST, DATASET, OVERSIGHT, STEWARD, Api, api, dataset_folder  # noqa: F401
from tests.server.http.console.console_fixtures import browser_of, csrf_of, sign_in

FEED_NAME = "console-weekly"


def _seen_by_oversight(api: Api, action: str) -> None:
    """The change's entry, by the steward, is listed on oversight's audit page straight away."""
    entry = api.records(action)[-1]
    assert entry.account == STEWARD and entry.decision == "allowed"
    log = sign_in(api, OVERSIGHT).get(f"/console/audit?action={action}")
    assert log.status_code == 200 and f'/console/audit/{entry.seq}"' in log.text


def test_done_shows_only_the_servers_own_texts(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    assert 'id="done"' not in steward.get("/console/steward").text
    spoof = steward.get("/console/steward", params={"done": "Your session expired. Re-enter your key at https://evil"})
    assert spoof.status_code == 200 and "evil" not in spoof.text and 'id="done"' not in spoof.text
    assert "Role granted (recorded in the audit log)." in steward.get("/console/steward?done=role_granted").text


def _define_feed(api: Api) -> None:
    feed = {"name": FEED_NAME, "dataset": DATASET, "schedule": "weekly", "releases": 2, "agencies": ["health"],
            "specs": [{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.02}]}
    assert api.post(STEWARD, "/v1/feeds", json=feed).status_code == 201


#: Each change: its path, its form, the audit action it records, the done code it confirms with
#: (None: it answers with a page of its own).
CHANGES: dict[str, tuple[str, dict[str, str], str, str | None]] = {
    "account": ("/console/steward/accounts", {"name": "new-clerk", "agency": "housing"}, "account.create",
                "account_created"),
    "key": ("/console/steward/keys", {"account": ANALYST, "expires_in_days": "30"}, "key.create", None),
    "feed": ("/console/steward/feeds/release", {"name": FEED_NAME}, "feed.release", "feed_released"),
}


def _made(api: Api, change: str) -> int:
    """How many of the things ``change`` makes exist."""
    model, where = {"account": (Account, Account.name == "new-clerk"), "key": (ApiKey, True),
                    "feed": (FeedRelease, True)}[change]
    return api.count(model, where)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_change_needs_the_csrf_token_and_the_steward_role(api: Api, change: str) -> None:
    if change == "feed":
        _define_feed(api)
    path, form, _, _ = CHANGES[change]
    before = _made(api, change)
    steward = sign_in(api, STEWARD)
    for token in (None, "not-the-token"):
        refused = steward.post(path, data=form if token is None else {**form, "csrf": token})
        assert refused.status_code == 403 and "security token" in refused.text
    analyst = sign_in(api, ANALYST)
    denied = analyst.post(path, data={**form, "csrf": csrf_of(analyst)})
    assert denied.status_code == 403 and 'id="refusal"' in denied.text
    assert _made(api, change) == before
    assert [e for e in api.records() if e.account == ANALYST and e.decision == "denied"]


@pytest.mark.parametrize("change", ["account", "feed"])
def test_a_steward_change_is_confirmed_with_a_fixed_text_and_seen_by_oversight(api: Api, change: str) -> None:
    if change == "feed":
        _define_feed(api)
    path, form, action, code = CHANGES[change]
    before = _made(api, change)
    steward = sign_in(api, STEWARD)
    answer = steward.post(path, data={**form, "csrf": csrf_of(steward, "/console/steward")})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"/console/steward?done={code}"
    assert 'id="done"' in steward.get(answer.headers["location"]).text
    assert _made(api, change) == before + 1
    _seen_by_oversight(api, action)


def test_a_new_account_appears_with_its_agency(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    path, form, _, _ = CHANGES["account"]
    assert steward.post(path, data={**form, "csrf": csrf_of(steward)}).status_code == 303
    with Session(api.state.db) as session:
        assert session.exec(select(Account.agency).where(Account.name == "new-clerk")).one() == "housing"
    again = steward.post(path, data={**form, "csrf": csrf_of(steward)})
    assert again.status_code == 409 and 'id="refusal"' in again.text  # the API's conflict, as a page
    bad = steward.post(path, data={"name": "no spaces", "agency": "x", "csrf": csrf_of(steward)})
    assert bad.status_code == 422 and "name" in bad.text


def test_an_issued_key_is_shown_once_never_stored_and_works(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    path, form, action, _ = CHANGES["key"]
    answer = steward.post(path, data={**form, "csrf": csrf_of(steward, "/console/steward")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    secret = answer.text.split('<code id="issued-key">')[1].split("</code>")[0]
    assert secret.startswith("cdp_")
    assert api.get(None, "/v1/datasets", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert secret not in steward.get("/console/steward").text  # the list shows its prefix only
    assert all(secret not in e.entry_json for e in api.records())
    with Session(api.state.db) as session:
        stored = [json.dumps(row.model_dump(), default=str) for row in session.exec(select(ApiKey))]
    assert all(secret not in row for row in stored)
    entry = api.records(action)[-1]
    assert secret.split("_")[1] in entry.entry_json  # the prefix names the key in the log
    _seen_by_oversight(api, action)


def test_a_key_that_never_expires_and_a_bad_term(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    never = steward.post("/console/steward/keys", data={"account": ANALYST, "expires_in_days": "never",
                                                        "csrf": csrf_of(steward)})
    assert never.status_code == 200 and "expires never" in never.text
    bad = steward.post("/console/steward/keys", data={"account": ANALYST, "expires_in_days": "9999",
                                                      "csrf": csrf_of(steward)})
    assert bad.status_code == 422 and "expires_in_days" in bad.text
    unknown = steward.post("/console/steward/keys", data={"account": "nobody", "csrf": csrf_of(steward)})
    assert unknown.status_code == 404


def test_releasing_a_feed_that_is_not_there_is_a_404_page(api: Api) -> None:
    steward = sign_in(api, STEWARD)
    answer = steward.post("/console/steward/feeds/release", data={"name": "no-such-feed", "csrf": csrf_of(steward)})
    assert answer.status_code == 404 and 'id="refusal"' in answer.text


def _delete_a_read_entry(api: Api) -> None:
    """Delete an entry this server has read and signed, as test_log_integrity does to a running server."""
    assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 200
    with api.state.db.begin() as connection:
        connection.execute(text("DELETE FROM auditentry WHERE seq = 1"))
    assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 503  # the alarm is raised


@pytest.mark.parametrize("who, method, path", [
    (STEWARD, "GET", "/console/steward"), (OVERSIGHT, "GET", "/console/audit"), (ANALYST, "GET", "/console/analyst"),
    (STEWARD, "POST", "/console/steward/cap")])
def test_a_failed_integrity_check_is_a_console_page_saying_why(api: Api, who: str, method: str, path: str) -> None:
    client = sign_in(api, who)
    form: dict[str, Any] = {"csrf": csrf_of(client), "dataset": DATASET, "scope": "agency", "subject": "health",
                            "epsilon": "3"}
    _delete_a_read_entry(api)
    answer = client.request(method, path, data=form if method == "POST" else None)
    assert answer.status_code == 503 and answer.headers["content-type"].startswith("text/html")
    assert answer.headers["retry-after"] == "300" and answer.headers["cache-control"] == "no-store"
    assert 'id="refusal"' in answer.text and "the audit log failed its integrity check" in answer.text
    assert "no longer stored" in answer.text
    assert api.records("budget.set_cap") == []


def test_signing_in_while_the_log_is_failed_is_the_same_page(api: Api) -> None:
    _delete_a_read_entry(api)
    client = browser_of(api)
    pre = re.search(r'name="pre" value="([^"]+)"', client.get("/console/sign-in").text)
    assert pre is not None
    answer = client.post("/console/session", data={"key": api.keys[ANALYST], "pre": pre[1]})
    assert answer.status_code == 503 and "the audit log failed its integrity check" in answer.text
    assert not any(k == "set-cookie" and v.startswith("civicdp_console=") for k, v in answer.headers.multi_items())
