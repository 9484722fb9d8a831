"""Monitors over HTTP: a fixed total loss, batches in order, releases, alerts, who may do what."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.server.state.monitor_models import MonitorBatch, MonitorRelease
from tests.conftest import events_frame
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, DATASET, MICRO, OTHER_ANALYST, OVERSIGHT, STEWARD, Api, api, dataset_folder,
)

START = datetime(2025, 1, 1)
DAY = timedelta(days=1)


def monitor(**changes: Any) -> dict[str, Any]:
    """Daily requests per channel for 8 days at a total epsilon of 1, alerting above 5 a day."""
    return {"name": "daily-channel", "dataset": DATASET, "metric": "count", "group_by": "channel",
            "step": "day", "start": START.isoformat(), "horizon": 8, "epsilon": 1.0, "contributions": 3,
            "rules": [{"op": "above", "value": 5}], "agency": "health", **changes}


def batch(first_day: int, days: int, people: int = 40, per_person: int = 2, seed: int = 0) -> bytes:
    """Events of ``people`` people, ``per_person`` a day, on days [first_day, first_day + days)."""
    rng = np.random.default_rng(seed + first_day)
    frame = events_frame(people=1, seed=seed).clear()
    rows = []
    for day in range(first_day, first_day + days):
        for person in range(people):
            for k in range(per_person):
                rows.append({"event_id": day * 10_000 + person * 10 + k, "person_id": person,
                             "service": "A", "channel": ["counter", "web", "mobile"][person % 3],
                             "request_time": START + day * DAY + timedelta(seconds=int(rng.integers(0, 86_399))),
                             "waiting_minutes": float(rng.uniform(0, 100)), "satisfaction": 3,
                             "remark": "r", "score": 0.0})
    frame = pl.concat([frame, pl.DataFrame(rows, schema=frame.schema)])
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def append(api: Api, data: bytes, first_day: int, days: int, name: str = "daily-channel", who: str = STEWARD):
    start, end = START + first_day * DAY, START + (first_day + days) * DAY
    return api.post(who, f"/v1/monitors/{name}/batches", content=data,
                    params={"start": start.isoformat(), "end": end.isoformat()},
                    headers={"Content-Type": "application/octet-stream"})


def details(api: Api, action: str = "monitor.manage") -> list[tuple[str, dict[str, Any]]]:
    """(decision, detail) of the audit entries of ``action``."""
    out = []
    for entry in api.records(action):
        document = json.loads(entry.entry_json)
        out.append((entry.decision, document.get("detail", {})))
    return out


def dataset_spent(api: Api) -> dict[str, int]:
    spent = api.spent_micro(STEWARD)
    return {"dataset": spent["dataset"], "lifetime": spent["lifetime"]}


def batch_files(api: Api) -> dict[str, str]:
    folder = api.settings.data_dir / "monitors"
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("batch-*.parquet")}


def test_monitor_charges_its_total_once_whatever_the_batches(api: Api) -> None:
    before = dataset_spent(api)
    answer = api.post(STEWARD, "/v1/monitors", json=monitor())
    assert answer.status_code == 201, answer.text
    assert answer.json()["loss"]["epsilon"] <= 1.0
    charged = dataset_spent(api)
    assert charged["dataset"] - before["dataset"] == MICRO and charged["lifetime"] - before["lifetime"] == MICRO
    for first, days in ((0, 1), (1, 2), (3, 1), (4, 4)):
        response = append(api, batch(first, days), first, days)
        assert response.status_code == 201, response.text
    assert dataset_spent(api) == charged  # batches, releases and alerts spend nothing more
    assert api.count(MonitorRelease) == 8
    releases = api.get(OVERSIGHT, "/v1/monitors/daily-channel/releases").json()
    assert [r["step"] for r in releases] == list(range(8))
    row = releases[0]["rows"][0]
    assert set(row) == {"group", "value", "ci_low", "ci_high", "running_value", "running_ci_low", "running_ci_high"}
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    # Every batch is on the record with the steps it released (one entry per request);
    # one definition with its charge.
    recorded = [detail for _, detail in details(api)]
    events = [detail.get("event") for detail in recorded]
    assert events.count("monitor.define") == 1 and events.count("monitor.batch") == 4
    steps = [r["step"] for d in recorded if d.get("event") == "monitor.batch" for r in d["releases"]]
    assert steps == list(range(8))
    listing = api.get(OVERSIGHT, "/v1/monitors").json()
    assert listing[0]["name"] == "daily-channel" and listing[0]["released_steps"] == 8 and not listing[0]["active"]


def test_each_person_counts_at_most_L_times_over_the_horizon(api: Api) -> None:
    # 40 people, 2 events a day for 8 days, L = 3: at most 120 kept events in total.
    api.set_cap("dataset", "*", 100.0)
    api.set_cap("lifetime", "*", 100.0)
    assert api.post(STEWARD, "/v1/monitors", json=monitor(epsilon=50.0, rules=[])).status_code == 201
    assert append(api, batch(0, 8), 0, 8).status_code == 201
    releases = api.get(STEWARD, "/v1/monitors/daily-channel/releases").json()
    last = releases[-1]["rows"]
    total = sum(r["running_value"] for r in last)
    assert 100 <= total <= 140  # 120 exact, noise scale 4 * 3 / 50 per node, 3 nodes per group
    assert sum(r["value"] for r in releases[0]["rows"]) > 60  # day one: 80 events, everyone within L
    assert sum(r["value"] for r in releases[3]["rows"]) < 20  # by day four everyone has used L


def test_batch_beyond_the_horizon_is_refused_and_nothing_changes(api: Api) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    assert append(api, batch(0, 2), 0, 2).status_code == 201
    files = batch_files(api)
    answer = append(api, batch(2, 7), 2, 7)
    assert answer.status_code == 422
    assert answer.json()["field"] == "end" and "beyond the monitor's horizon" in answer.json()["detail"]
    assert batch_files(api) == files and api.count(MonitorBatch) == 1
    refused = [detail for decision, detail in details(api) if decision == "refused"]
    assert refused and "horizon" in refused[-1]["reason"]


@pytest.mark.parametrize(("first", "days", "field", "match"), [
    (1, 2, "start", "overlaps or precedes"),  # overlaps [0, 2)
    (0, 1, "start", "overlaps or precedes"),  # out of order
], ids=["overlapping", "out-of-order"])
def test_overlapping_or_out_of_order_batches_are_refused(api: Api, first: int, days: int, field: str,
                                                          match: str) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    assert append(api, batch(0, 2), 0, 2).status_code == 201
    files = batch_files(api)
    answer = append(api, batch(first, days), first, days)
    assert answer.status_code == 422 and answer.json()["field"] == field
    assert match in answer.json()["detail"]
    assert batch_files(api) == files


def _reshape(data: bytes, change: str) -> bytes:
    frame = pl.read_parquet(io.BytesIO(data))
    if change == "missing":
        frame = frame.drop("remark")
    elif change == "extra":
        frame = frame.with_columns(pl.lit(1).alias("secret"))
    elif change == "type":
        frame = frame.with_columns(pl.col("satisfaction").cast(pl.String))
    elif change == "outside":
        frame = frame.with_columns(pl.col("request_time") + timedelta(days=30))
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("change", "match"), [
    ("missing", "missing ['remark']"), ("extra", "unexpected ['secret']"), ("type", "'satisfaction' has type"),
    ("outside", "outside the batch's declared time range"), ("garbage", "not a readable Parquet"),
], ids=["missing-column", "extra-column", "wrong-type", "events-outside-range", "not-parquet"])
def test_a_batch_unlike_the_dataset_is_refused_and_nothing_is_appended(api: Api, change: str, match: str) -> None:
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    assert append(api, batch(0, 1), 0, 1).status_code == 201
    files = batch_files(api)
    data = b"not parquet" if change == "garbage" else _reshape(batch(1, 1), change)
    answer = append(api, data, 1, 1)
    assert answer.status_code == 422 and match in answer.json()["detail"], answer.text
    assert batch_files(api) == files and api.count(MonitorBatch) == 1
    assert append(api, batch(1, 1), 1, 1).status_code == 201  # the monitor carries on


@pytest.mark.parametrize(("changes", "field", "match"), [
    ({"metric": "median"}, "metric", "count"),
    ({"group_by": "colour"}, "group_by", "unknown column"),
    ({"group_by": "remark"}, "group_by", "no public key set"),
    ({"metric": "share_above", "column": "waiting_minutes", "threshold": 500}, "threshold", "outside the column's bounds"),
    ({"metric": "share_above", "column": "waiting_minutes", "threshold": -1}, "threshold", "outside the column's bounds"),
    ({"metric": "mean", "column": "score"}, "column", "declared bounds"),
    ({"epsilon": 0}, "epsilon", "greater than 0"),
    ({"rules": [{"op": "above", "value": 1, "group": "fax"}]}, "rules.0.group", "not a group"),
], ids=["unknown-metric", "unknown-group", "keyless-group", "threshold-above-bounds", "threshold-below-bounds",
        "unbounded-column", "zero-epsilon", "rule-unknown-group"])
def test_bad_monitor_definitions_are_refused(api: Api, changes: dict, field: str, match: str) -> None:
    before = dataset_spent(api)
    answer = api.post(STEWARD, "/v1/monitors", json=monitor(**changes))
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and match in answer.json()["detail"]
    assert dataset_spent(api) == before


def test_a_monitor_beyond_the_budget_is_refused(api: Api) -> None:
    answer = api.post(STEWARD, "/v1/monitors", json=monitor(epsilon=5.0))
    assert answer.status_code == 409
    assert api.get(OVERSIGHT, "/v1/monitors").json() == []


class _Catcher(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def callback() -> Iterator[tuple[str, list[dict]]]:
    _Catcher.received = []
    server = HTTPServer(("127.0.0.1", 0), _Catcher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Catcher.received
    server.shutdown()
    server.server_close()


def test_alerts_reach_subscribers_by_callback_and_stream(api: Api, callback: tuple[str, list[dict]]) -> None:
    url, received = callback
    assert api.post(STEWARD, "/v1/monitors", json=monitor(epsilon=2.0)).status_code == 201
    # Analysts of the monitor's agency subscribe; others may not; unsubscribed ones read no alerts.
    assert api.post(OTHER_ANALYST, "/v1/monitors/daily-channel/subscriptions", json={}).status_code == 403
    assert api.get(ANALYST, "/v1/monitors/daily-channel/alerts").status_code == 403
    sub = api.post(ANALYST, "/v1/monitors/daily-channel/subscriptions", json={"callback_url": url})
    assert sub.status_code == 201, sub.text
    answer = append(api, batch(0, 1, people=60, per_person=1), 0, 1)
    assert answer.status_code == 201
    alerts = answer.json()["alerts"]
    assert alerts, "20 events a channel against a rule 'above 5' must alert"
    first = alerts[0]
    assert first["rule_text"] == "count above 5" and first["ci_low"] <= first["value"] <= first["ci_high"]
    listed = api.get(ANALYST, "/v1/monitors/daily-channel/alerts").json()
    assert [a["id"] for a in listed] == [a["id"] for a in alerts]
    stream = api.get(ANALYST, "/v1/monitors/daily-channel/alerts/stream", params={"once": "true"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: ")]
    assert [e["id"] for e in events] == [a["id"] for a in alerts]
    for _ in range(100):  # the callback is posted on a background thread
        if received:
            break
        threading.Event().wait(0.05)
    assert received and received[0]["monitor"] == "daily-channel" and len(received[0]["alerts"]) == len(alerts)


def test_who_may_do_what_with_monitors(api: Api) -> None:
    assert api.post(ANALYST, "/v1/monitors", json=monitor()).status_code == 403
    assert api.post(OVERSIGHT, "/v1/monitors", json=monitor()).status_code == 403
    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    assert append(api, batch(0, 1), 0, 1, who=ANALYST).status_code == 403
    assert append(api, batch(0, 1), 0, 1, who=OVERSIGHT).status_code == 403
    assert api.get(OVERSIGHT, "/v1/monitors/daily-channel/releases").status_code == 200
    assert api.get(OTHER_ANALYST, "/v1/monitors/daily-channel").status_code == 403
    assert api.get(ANALYST, "/v1/monitors/daily-channel").status_code == 200
    assert [m["name"] for m in api.get(OTHER_ANALYST, "/v1/monitors").json()] == []
    assert api.get(None, "/v1/monitors").status_code == 401
