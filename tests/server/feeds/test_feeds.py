"""Agency feeds end to end: definitions checked against the budgets, releases charged once and
read many times, refusals recorded and explained, signatures that catch tampering, and a 403
that says nothing about whether a feed exists. Setup: tests/server/api_fixtures.py (the
scheduler is off; the tests drive ``FeedService.run_due`` with explicit times).
PostgreSQL, two processes: tests/server/feeds/test_feeds_pg.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

from civicdp.audit.signing import SigningKey
from civicdp.policies.actions import Role
from civicdp.queries import client as consumer_client
from civicdp.queries.release_check import SignatureInvalid
from civicdp.server.services import admin
from civicdp.server.state import ledger
from civicdp.server.entry import app as cli
from civicdp.server.state.db import session_scope
from civicdp.server.state.feed_models import Feed, FeedRefusal, FeedRelease
from civicdp.server.feeds.outcomes import FeedRefused
from civicdp.server.feeds.schedule import schedule_of
from civicdp.server.feeds.service import FeedService
from civicdp.server.state.models import AuditEntry, Budget, BudgetCap, LedgerEntry, Release
from tests.server.api_fixtures import (
    ANALYST, DATASET, FEED, OVERSIGHT, STEWARD, Api, ViaTestClient, running_api,
)
from tests.server.api_fixtures import dataset_folder  # noqa: F401 - fixture

OTHER_FEED = "feed-transport"  # a feed consumer in the transport agency
NOW = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)
MICRO = 1_000_000
SPECS = [{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1},
         {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["service"], "epsilon": 0.05}]
LOSS = 150_000  # micro-epsilon per release: the specs' losses added
runner = CliRunner()


def definition(**changes: Any) -> dict[str, Any]:
    """A daily feed whose first three releases are due at NOW (00:00 of the last three days)."""
    start = (NOW - timedelta(days=2)).replace(hour=0, minute=0) - timedelta(minutes=1)
    return {"name": "daily-volumes", "dataset": DATASET, "specs": SPECS, "schedule": "daily", "releases": 5,
            "start": start.isoformat(), "agencies": ["health"], **changes}


@pytest.fixture
def api(tmp_path: Path, dataset_folder: Path) -> Iterator[Api]:  # noqa: F811 - the fixture above
    with running_api(tmp_path / "state", dataset_folder, feeds_scheduler=False) as started:
        with session_scope(started.state.db) as session:
            admin.create_account(session, None, OTHER_FEED, "transport")
            admin.grant_role(session, started.state.policies, None, OTHER_FEED, Role.FEED_CONSUMER, "transport")
            started.keys[OTHER_FEED] = admin.issue_key(session, None, OTHER_FEED, started.state.secret, 30)[1]
        yield started


def define(api: Api, **changes: Any) -> dict[str, Any]:
    response = api.post(STEWARD, "/v1/feeds", json=definition(**changes))
    assert response.status_code == 201, response.text
    return response.json()


def service(api: Api) -> FeedService:
    return FeedService.of(api.state)


def spent(api: Api, feed: str = "daily-volumes") -> dict[str, int]:
    """What the feed's allocation, the dataset's months and its lifetime have spent."""
    with Session(api.state.db) as session:
        rows = session.execute(select(Budget.scope, Budget.subject, Budget.spent_micro)
                               .where(Budget.dataset == DATASET)).all()
    out = {"feed": 0, "dataset": 0, "lifetime": 0, "analyst": 0, "agency": 0}
    for scope, subject, amount in rows:
        if scope != ledger.FEED or subject == feed:
            out[scope] += amount
    return out


def rows(api: Api, model: type, *where: Any) -> list[Any]:
    with Session(api.state.db) as session:
        return list(session.exec(select(model).where(*where)).scalars()) if where else \
            list(session.exec(select(model)).scalars())


# -- charged once, read by many -------------------------------------------------------------


def test_a_release_is_charged_once_however_many_agencies_fetch_it(api: Api) -> None:
    define(api, agencies=["health", "transport"])
    produced = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert produced.status_code == 201, produced.text
    release = produced.json()
    assert release["fresh"] is True and release["number"] == 1 and release["loss_micro"] == LOSS
    charged = {"feed": LOSS, "dataset": LOSS, "lifetime": LOSS, "analyst": 0, "agency": 0}
    assert spent(api) == charged
    (stored,) = rows(api, FeedRelease)
    assert len(rows(api, LedgerEntry, LedgerEntry.release_id == stored.release_id)) == 3

    fetched = set()
    for who in (FEED, OTHER_FEED, FEED, OTHER_FEED):
        for path in ("/v1/feeds/daily-volumes/releases/latest", "/v1/feeds/daily-volumes/releases/1",
                     "/v1/feeds/daily-volumes/releases/1?format=csv&query=1"):
            answer = api.get(who, path)
            assert answer.status_code == 200, answer.text
            fetched.add(answer.content) if "csv" not in path else None
    with consumer_client.Client("http://testserver", api.keys[OTHER_FEED],
                                transport=ViaTestClient(api.client)) as client:
        assert [f["name"] for f in client.feeds()] == ["daily-volumes"]
        frames = client.feed_release("daily-volumes")
    assert len(fetched) == 1, "every reader gets the same stored bytes"
    assert [list(f.columns) for f in frames] == [["channel", "value", "ci_low", "ci_high"],
                                                 ["service", "value", "ci_low", "ci_high"]]
    assert frames[0].attrs["release"]["number"] == 1 and frames[0].attrs["verified"] is True
    # A steward triggering again gets the next period, never a second release of the first.
    assert spent(api) == charged, "reading a release must cost nothing"
    assert len(rows(api, FeedRelease)) == 1 and len(rows(api, Release)) == 1
    reads = [e for e in api.records("feed.read") if json.loads(e.entry_json)["detail"].get("number") == 1]
    assert len(reads) == 13 and {e.account for e in reads} == {FEED, OTHER_FEED}
    # The charge has its own entry, written (and committed) before the data was read; the release's
    # entry points at it and carries the result's hash.
    (charge,) = api.records("feed.charge")
    (made,) = api.records("feed.release")
    assert charge.seq < made.seq and json.loads(charge.entry_json)["detail"]["loss_micro"] == LOSS
    detail = json.loads(made.entry_json)["detail"]
    assert made.decision == "allowed" and detail["charge_seq"] == charge.seq and detail["charged_micro"] == LOSS
    assert detail["loss_micro"] == 0 and detail["result_hash"] == stored.sha256


def test_polling_with_an_etag_answers_304_and_the_index_lists_releases(api: Api) -> None:
    define(api)
    index = api.get(FEED, "/v1/feeds/daily-volumes")
    assert index.status_code == 200 and index.json()["items"] == []
    etag = index.headers["ETag"]
    assert api.get(FEED, "/v1/feeds/daily-volumes", headers={"If-None-Match": etag}).status_code == 304
    assert api.get(FEED, "/v1/feeds/daily-volumes/releases/latest").status_code == 404
    service(api).run_due(NOW)
    changed = api.get(FEED, "/v1/feeds/daily-volumes", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    items = changed.json()["items"]
    assert changed.json()["version"] == "https://jsonfeed.org/version/1.1"
    assert [i["_civicdp"]["number"] for i in items] == [3, 2, 1]
    latest = api.get(FEED, "/v1/feeds/daily-volumes/releases/latest")
    assert json.loads(latest.content)["number"] == 3 and latest.headers["ETag"] == f'"{items[0]["_civicdp"]["sha256"]}"'
    again = api.get(FEED, "/v1/feeds/daily-volumes/releases/latest", headers={"If-None-Match": latest.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert api.records("feed.read")[-1].entry_json.count('"not_modified":true') == 1
    csv = api.get(FEED, "/v1/feeds/daily-volumes/releases/2?format=csv")
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.splitlines()[0] == "channel,value,ci_low,ci_high"
    assert len(csv.text.splitlines()) == 1 + 4  # one row per declared channel
    assert api.get(FEED, "/v1/feeds/daily-volumes/releases/9").status_code == 404
    assert api.get(FEED, "/v1/feeds/daily-volumes/releases/1?format=csv&query=5").status_code == 422


# -- the scheduler: catch-up, exactly once, refusals ---------------------------------------------


def test_catching_up_makes_each_due_release_once(api: Api) -> None:
    define(api)
    feeds = service(api)
    first = feeds.run_due(NOW)
    assert [r.number for r in first] == [1, 2, 3]  # three days of downtime, caught up in order
    assert feeds.run_due(NOW) == [] and feeds.run_due(NOW + timedelta(minutes=5)) == []
    assert [r.number for r in feeds.run_due(NOW + timedelta(days=1))] == [4]
    assert [r.number for r in feeds.run_due(NOW + timedelta(days=30))] == [5]
    assert feeds.run_due(NOW + timedelta(days=60)) == [], "nothing beyond the announced releases"
    assert sorted(r.number for r in rows(api, FeedRelease)) == [1, 2, 3, 4, 5]
    assert spent(api)["feed"] == 5 * LOSS
    triggered = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert triggered.status_code == 409 and "all 5 releases" in triggered.json()["detail"]
    overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
    assert (overview["produced"], overview["spent_micro"], overview["planned_micro"]) == (5, 5 * LOSS, 0)


def test_a_release_beyond_a_budget_is_refused_recorded_and_explained(api: Api) -> None:
    define(api)
    api.set_cap("lifetime", "*", 0.35)  # room for two releases of 0.15, lowered after the definition
    feeds = service(api)
    outcomes = feeds.run_due(NOW)
    assert [getattr(o, "number", None) for o in outcomes] == [1, 2, None]
    refused = outcomes[2]
    assert isinstance(refused, FeedRefused) and refused.budget is not None
    assert refused.budget.scope_kind == "lifetime" and "lifetime budget" in refused.reason
    assert spent(api)["lifetime"] == 2 * LOSS and len(rows(api, FeedRelease)) == 2
    (stored,) = rows(api, FeedRefusal)
    assert (stored.number, stored.origin, stored.attempt) == (3, "scheduler", 0)
    assert feeds.run_due(NOW) == [], "a refused period is not retried by the scheduler"
    assert len(rows(api, FeedRefusal)) == 1
    (entry,) = [e for e in api.records("feed.release") if e.decision == "refused"]
    assert "lifetime budget" in json.loads(entry.entry_json)["detail"]["reason"]
    # The steward is told why: in the overview, and when triggering the period again.
    overview = api.get(STEWARD, "/v1/feeds/overview").json()[0]
    assert overview["refused"] == 1 and overview["last_refusal"]["number"] == 3
    assert "lifetime budget" in overview["last_refusal"]["reason"]
    again = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert again.status_code == 409 and again.json()["scope"] == "lifetime"
    assert "Cannot answer without exceeding the remaining lifetime budget" in again.json()["detail"]
    assert [r.attempt for r in rows(api, FeedRefusal)] == [0, 1]
    assert spent(api)["lifetime"] == 2 * LOSS, "a refusal charges nothing"
    api.set_cap("lifetime", "*", 4.0)  # the steward raises the cap: the retry goes through
    assert api.post(STEWARD, "/v1/feeds/daily-volumes/releases").json()["number"] == 3


def test_the_feed_allocation_caps_what_a_feed_spends(api: Api) -> None:
    define(api, releases=2)
    with session_scope(api.state.db) as session:  # as if the announced total had been smaller
        session.execute(BudgetCap.__table__.update().where(BudgetCap.scope == ledger.FEED).values(cap_micro=LOSS))
    outcomes = service(api).run_due(NOW)
    assert isinstance(outcomes[1], FeedRefused) and outcomes[1].budget is not None
    assert outcomes[1].budget.scope_kind == "feed" and "allocation of feed daily-volumes" in outcomes[1].reason


def test_the_scheduler_runs_in_the_server_and_catches_up_on_start(tmp_path: Path, dataset_folder: Path) -> None:  # noqa: F811
    with running_api(tmp_path / "state", dataset_folder, feeds_scheduler=False) as api:
        define(api)
        keys = api.keys
    with running_api(tmp_path / "state", None, keys=keys, feeds_scheduler=True, feeds_check_seconds=0.2) as api:
        due = [n for n, _ in schedule_of(rows(api, Feed)[0]).due(datetime.now(timezone.utc))]
        assert due, "the definition's first releases are in the past"
        deadline = time.monotonic() + 20
        while len(rows(api, FeedRelease)) < len(due) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more checks: still one release per period
        assert sorted(r.number for r in rows(api, FeedRelease)) == due
        assert all(r.origin == "scheduler" for r in rows(api, FeedRelease))


# -- who may read -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/feeds/{}", "/v1/feeds/{}/releases/latest", "/v1/feeds/{}/releases/1",
                                  "/v1/feeds/{}/releases/1/signature", "/v1/feeds/{}/releases/1?format=csv"],
                         ids=["index", "latest", "numbered", "signature", "csv"])
def test_an_agency_not_allowed_learns_nothing_about_a_feed(api: Api, path: str) -> None:
    define(api)  # shared with health only
    service(api).run_due(NOW)
    assert api.get(FEED, path.format("daily-volumes")).status_code == 200
    for who in (OTHER_FEED, ANALYST, STEWARD, OVERSIGHT):
        existing = api.get(who, path.format("daily-volumes"))
        missing = api.get(who, path.format("no-such-feed"))
        assert existing.status_code == missing.status_code == 403, existing.text
        assert existing.json() == {**missing.json(), "detail": missing.json()["detail"].replace(
            "no-such-feed", "daily-volumes")}, "the answer must not depend on whether the feed exists"
        assert "ETag" not in existing.headers and "Civicdp-Signature" not in existing.headers
    assert api.get(FEED, path.format("no-such-feed")).status_code == 403
    assert api.get(OTHER_FEED, "/v1/feeds").json() == []
    assert [f["name"] for f in api.get(FEED, "/v1/feeds").json()] == ["daily-volumes"]
    denied = [e for e in api.records("feed.read") if e.decision == "denied"]
    assert denied, "refusals are in the audit log, with the true reason"


def test_sharing_with_another_agency_opens_the_feed_to_it(api: Api) -> None:
    define(api)
    assert api.get(OTHER_FEED, "/v1/feeds/daily-volumes").status_code == 403
    assert service(api).share(None, "daily-volumes", "transport") == ["health", "transport"]
    assert api.get(OTHER_FEED, "/v1/feeds/daily-volumes").status_code == 200
    service(api).share(None, "daily-volumes", "transport", shared=False)
    assert api.get(OTHER_FEED, "/v1/feeds/daily-volumes").status_code == 403


# -- bad definitions ----------------------------------------------------------------------------


@pytest.mark.parametrize("changes, status, field, words", [
    ({"dataset": "nope"}, 422, "dataset", "no dataset named 'nope'"),
    ({"specs": [{"aggregate": "count", "group_by": ["nope"], "epsilon": 0.1}]}, 422, "specs[0].group_by",
     "unknown column 'nope'"),
    ({"specs": [{"aggregate": "count", "epsilon": 0}]}, 422, "specs[0]", "greater than 0"),
    ({"specs": [{"aggregate": "count", "epsilon": 0.1, "dataset": "other"}]}, 422, "specs[0].dataset", "not the feed's"),
    ({"specs": []}, 422, "specs", "at least 1"),
    ({"schedule": "every full moon"}, 422, "schedule", "cannot be parsed"),
    ({"schedule": "0 0 30 2 *"}, 422, "schedule", "fires only 0 times"),
    ({"schedule": "61 * * * *"}, 422, "schedule", "cannot be parsed"),
    ({"schedule": "monthly", "releases": 30}, 422, "releases", "lifetime budget has 4 left"),
    ({"schedule": "0 * * * *", "releases": 24}, 422, "schedule", "above the dataset's monthly cap of 3"),
    ({"specs": [{"aggregate": "count", "epsilon": 50}]}, 422, "specs[0]", "above the maximum"),
    ({"name": "Bad Name"}, 422, "name", "pattern"),
    ({"name": "overview"}, 422, "name", "reserved"),
    ({"agencies": []}, 422, "agencies", "at least 1"),
    ({"agencies": ["a,b"]}, 422, "agencies.0", "pattern"),
], ids=["unknown-dataset", "unknown-column", "zero-loss", "other-dataset", "no-specs", "unparsable-schedule",
        "never-fires", "bad-cron-field", "beyond-lifetime", "beyond-month", "beyond-per-query-max", "bad-name",
        "reserved-name", "no-agency", "bad-agency"])
def test_bad_definitions_are_refused_clearly_and_change_nothing(api: Api, changes: dict[str, Any], status: int,
                                                                field: str, words: str) -> None:
    audit_before = len(api.records())
    response = api.post(STEWARD, "/v1/feeds", json=definition(**changes))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"].startswith(field), body
    assert words in body["detail"], body["detail"]
    assert rows(api, Feed) == [] and rows(api, BudgetCap, BudgetCap.scope == ledger.FEED) == []
    assert not [e for e in api.records()[audit_before:] if e.action == "feed.define"]
    assert "feed:daily-volumes" not in api.state.policies._known_objects()


def test_a_second_feed_cannot_announce_what_the_first_has_committed(api: Api) -> None:
    define(api, schedule="monthly", releases=20)  # 20 x 0.15 = 3 of the lifetime cap of 4
    refused = api.post(STEWARD, "/v1/feeds", json=definition(name="second", schedule="monthly", releases=10))
    assert refused.status_code == 422 and "3 is committed to other feeds" in refused.json()["detail"]
    assert "at most 6 releases" in refused.json()["fix"]
    assert api.post(STEWARD, "/v1/feeds", json=definition(name="second", schedule="monthly", releases=6)).status_code == 201
    duplicate = api.post(STEWARD, "/v1/feeds", json=definition(name="second", releases=1))
    assert duplicate.status_code == 409 and "exists already" in duplicate.json()["detail"]


def test_only_stewards_define_and_trigger(api: Api) -> None:
    for who in (ANALYST, OVERSIGHT, FEED):
        assert api.post(who, "/v1/feeds", json=definition()).status_code == 403
    define(api)
    for who in (ANALYST, OVERSIGHT, FEED):
        assert api.post(who, "/v1/feeds/daily-volumes/releases").status_code == 403
    assert rows(api, FeedRelease) == []


# -- signatures -------------------------------------------------------------------------------


@pytest.fixture
def downloaded(api: Api, tmp_path: Path) -> tuple[Path, str]:
    """Release 1 and its signature as files, and the server's public key."""
    define(api)
    service(api).run_due(NOW)
    answer = api.get(FEED, "/v1/feeds/daily-volumes/releases/1")
    release = tmp_path / "release.json"
    release.write_bytes(answer.content)
    signature = api.get(FEED, "/v1/feeds/daily-volumes/releases/1/signature").text
    assert signature.strip() == answer.headers["Civicdp-Signature"]
    (tmp_path / "release.json.sig").write_text(signature)
    key = api.get(None, "/v1/audit/public-key").text.splitlines()[0]
    return release, key


def _verify(release: Path, key: str, *extra: str) -> Any:
    return runner.invoke(cli, ["feeds", "verify", str(release), "--public-key", key, *extra])


def test_verify_accepts_a_release_as_served(downloaded: tuple[Path, str], tmp_path: Path) -> None:
    release, key = downloaded
    result = _verify(release, key)
    assert result.exit_code == 0, result.output
    assert "verified: release 1 of feed daily-volumes" in result.output
    (tmp_path / "key.pub").write_text(key + "\n")  # the key may also be given as a file
    assert _verify(release, str(tmp_path / "key.pub")).exit_code == 0


def test_verify_detects_every_change_of_the_bytes(downloaded: tuple[Path, str], tmp_path: Path) -> None:
    release, key = downloaded
    data = release.read_bytes()
    tampered = tmp_path / "tampered.json"
    (tmp_path / "tampered.json.sig").write_text((tmp_path / "release.json.sig").read_text())
    positions = sorted({*range(0, len(data), max(1, len(data) // 60)), data.index(b'"value":') + 8})
    for position in positions:
        changed = bytearray(data)
        changed[position] ^= 0x01
        tampered.write_bytes(bytes(changed))
        result = _verify(tampered, key)
        assert result.exit_code == 1 and "NOT VERIFIED" in result.output, position
    document = json.loads(data)
    document["results"][0]["rows"][0]["value"] += 1  # a plausible forgery, written canonically
    tampered.write_bytes(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    assert _verify(tampered, key).exit_code == 1
    tampered.write_bytes(json.dumps(json.loads(data), indent=2).encode())  # only re-formatted: still refused
    result = _verify(tampered, key)
    assert result.exit_code == 1 and "re-formatted" in result.output


def test_verify_detects_a_changed_signature_or_another_key(downloaded: tuple[Path, str], tmp_path: Path) -> None:
    release, key = downloaded
    name, encoded = (tmp_path / "release.json.sig").read_text().split()
    raw = bytearray(base64.b64decode(encoded))
    for position in (0, 4, 40, 67):  # the key id, and the signature's first, middle and last bytes
        changed = bytearray(raw)
        changed[position] ^= 0x80
        (tmp_path / "forged.sig").write_text(f"{name} {base64.b64encode(bytes(changed)).decode()}\n")
        assert _verify(release, key, "--signature", str(tmp_path / "forged.sig")).exit_code == 1
    other = SigningKey.generate(name).verifier.encode()
    result = _verify(release, other)
    assert result.exit_code == 1 and "not by" in result.output
    assert _verify(release, "not-a-key").exit_code == 2


def test_the_python_client_verifies_by_default(api: Api) -> None:
    define(api)
    service(api).run_due(NOW)
    key = api.get(None, "/v1/audit/public-key").text.splitlines()[0]
    stranger = SigningKey.generate("civicdp.local/audit").verifier.encode()
    with consumer_client.Client("http://testserver", api.keys[FEED], transport=ViaTestClient(api.client)) as client:
        assert client.feed_release("daily-volumes", 2, public_key=key)[0].attrs["release"]["number"] == 2
        with pytest.raises(SignatureInvalid, match="does not match|not by"):
            client.feed_release("daily-volumes", 2, public_key=stranger)
        assert client.feed_release("daily-volumes", 2, verify=False, public_key=stranger)
        index = client.feed_index("daily-volumes")
        assert index is not None and client.feed_index("daily-volumes", etag=index["etag"]) is None
    # A release altered in storage no longer verifies in the client.
    with session_scope(api.state.db) as session:
        stored = session.get(Release, rows(api, FeedRelease, FeedRelease.number == 2)[0].release_id)
        stored.result_json = stored.result_json.replace('"number":2', '"number":7')
        session.add(stored)
    with consumer_client.Client("http://testserver", api.keys[FEED], transport=ViaTestClient(api.client)) as client:
        with pytest.raises(SignatureInvalid, match="does not match"):
            client.feed_release("daily-volumes", 2)


# -- the command line -------------------------------------------------------------------------


def test_stewards_define_list_and_trigger_on_the_command_line(api: Api, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CIVICDP_DATABASE_URL", raising=False)
    path = tmp_path / "feed.json"
    path.write_text(json.dumps(definition(name="cli-feed")))
    result = runner.invoke(cli, ["feeds", "define", str(path)])
    assert result.exit_code == 0, result.output
    assert "defined feed cli-feed: 5 daily releases" in result.output
    path.write_text(json.dumps(definition(name="cli-feed-2", schedule="fortnightly")))
    bad = runner.invoke(cli, ["feeds", "define", str(path)])
    assert bad.exit_code == 2 and "cannot be parsed" in bad.output
    triggered = runner.invoke(cli, ["feeds", "trigger", "cli-feed"])
    assert triggered.exit_code == 0 and "release 1 of feed cli-feed" in triggered.output
    listed = json.loads(runner.invoke(cli, ["feeds", "list"]).output)
    assert [(f["name"], f["produced"], f["spent_micro"]) for f in listed] == [("cli-feed", 1, LOSS)]
    assert runner.invoke(cli, ["feeds", "trigger", "nope"]).exit_code == 2


def test_next_release_at_skips_a_period_released_by_hand_before_its_time(api: Api) -> None:
    """Issue 15: a steward's trigger makes the next period early; next_release_at must then name the one after."""
    define(api)
    service(api).run_due(NOW)  # releases 1 to 3 (due); 4 is tomorrow's
    times = schedule_of(rows(api, Feed)[0]).times

    def shown() -> set[str | None]:
        summary = api.get(FEED, "/v1/feeds").json()[0]["next_release_at"]
        index = api.get(FEED, "/v1/feeds/daily-volumes").json()["_civicdp"]["next_release_at"]
        overview = api.get(STEWARD, "/v1/feeds/overview").json()[0]["next_release_at"]
        return {None if t is None else datetime.fromisoformat(t.replace("Z", "+00:00")).isoformat()
                for t in (summary, index, overview)}

    assert shown() == {times[3].isoformat()}
    early = api.post(STEWARD, "/v1/feeds/daily-volumes/releases")
    assert early.status_code == 201 and early.json()["number"] == 4
    assert shown() == {times[4].isoformat()}, "release 4 is made: the next is 5"
    assert api.post(STEWARD, "/v1/feeds/daily-volumes/releases").json()["number"] == 5
    assert shown() == {None}, "every announced release is made"
