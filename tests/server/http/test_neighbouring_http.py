"""The neighbouring-data harness over HTTP (issue 11): what the server answers on D and on D'.

One server holds D (``nb-base``) and every D' of :data:`tests.privacy.neighbours.ADVERSARIES`
(``nb-<adversary>``) as separate datasets, with caps high enough for every question. With
the noise on, every question of :data:`tests.privacy.neighbours.QUERIES` must get, on D
and on D', the same HTTP status, the same error shape and text, and the same charge: an
outcome that depends on the added person — an error, a refusal, a free failure — is
exactly what differential privacy forbids. Also here:

- a computation that fails after planning is still charged, and answered with a fixed
  text that carries nothing of the failure (not the row, not the value);
- a monitor and a feed release: with the noise removed their exact inputs move by at most
  their sensitivity, and a batch or release holding the adversary's rows is not refused.

The engine-level harness (sensitivities of every part, post-processing) is
``tests/privacy/test_neighbouring.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from civicdp.queries.polars_backend import PolarsBackend
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from tests.privacy.neighbours import (ADVERSARIES, OUTSIDE_DOMAIN, QUERIES, NoiseRemoved, adversary_rows, compare,
                                      structure_differences, write_base, write_neighbour)
from tests.server.api_fixtures import ANALYST, MICRO, STEWARD, Api, count_query, running_api
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # as in tests/privacy/test_neighbouring.py

BASE = "nb-base"
CAPS = {"analyst_month_epsilon": 10_000.0, "agency_month_epsilon": 10_000.0,
        "dataset_month_epsilon": 10_000.0, "dataset_lifetime_epsilon": 10_000.0}
KINDS_ASKED = {name for name, spec in QUERIES.items() if "aggregate" in spec}


#: D's neighbours the server serves; those outside the guarantee's domain are refused when registered.
IN_DOMAIN = [name for name in ADVERSARIES if name not in OUTSIDE_DOMAIN]


def dataset_of(adversary: str | None) -> str:
    return BASE if adversary is None else f"nb-{adversary.replace('_', '-')}"


@dataclass
class Served:
    api: Api
    folders: dict[str, Path]
    memo: dict[Any, Any] = field(default_factory=dict)  # D's outcomes: asked once, never from the cache


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("neighbours-http")
    base = write_base(root / "datasets" / BASE, BASE)
    folders = {BASE: base}
    for name, adversary in ADVERSARIES.items():
        folders[dataset_of(name)] = write_neighbour(base, root / "datasets" / dataset_of(name), adversary,
                                                    dataset_of(name))
    refused = {dataset_of(name) for name in OUTSIDE_DOMAIN}
    with running_api(root / "state", base, feeds_scheduler=False, **CAPS) as started:
        with session_scope(started.state.db) as session:
            for name, folder in folders.items():
                if name != BASE and name not in refused:
                    admin.register_dataset(session, started.state.policies, None, folder,
                                           frozenset({"undeclared_nulls", "dropped_keys"}))  # adversarial, on purpose
        yield Served(started, folders)


# -- queries with the noise on: the same outcome on D and D' ---------------------------------------


def _text(value: Any, dataset: str) -> Any:
    """An answer's text with the dataset's own name taken out (it differs by construction)."""
    return json.loads(json.dumps(value).replace(dataset, "<dataset>"))


def outcome(api: Api, query: str, dataset: str) -> dict[str, Any]:
    """What an analyst can observe of one fresh question: status, shape, error text and the charge."""
    spec = {**QUERIES[query], "dataset": dataset}
    before = api.spent_micro(ANALYST, dataset)
    response = api.query(ANALYST, spec)
    after = api.spent_micro(ANALYST, dataset)
    body = response.json()
    seen: dict[str, Any] = {"status": response.status_code, "keys": sorted(body),
                            "ledger_micro": {scope: after[scope] - before[scope] for scope in after}}
    if response.status_code >= 400:
        seen["error"] = _text(body, dataset)
        return seen
    assert body["cached"] is False, "the harness must compare fresh answers"
    seen.update(charged=body["charged"], loss=body["loss"], columns=body["columns"], confidence=body["confidence"],
                tables={name: t["columns"] for name, t in body["tables"].items()},
                roles=[m.get("role") for m in body["mechanisms"]])
    if query in KINDS_ASKED or query == "performance_report":
        seen["rows"] = len(body["rows"])  # one row per public cell (and level or bin)
    return seen


@pytest.mark.parametrize("adversary", IN_DOMAIN)
@pytest.mark.parametrize("query", list(QUERIES))
def test_status_error_and_charge_are_the_same_on_d_and_d_prime(query: str, adversary: str, served: Served) -> None:
    api = served.api
    if ("query", query) not in served.memo:
        served.memo[("query", query)] = outcome(api, query, BASE)
    on_d = served.memo[("query", query)]
    on_d2 = outcome(api, query, dataset_of(adversary))
    assert on_d["status"] == 200, f"the question itself fails on D: {on_d}"
    assert on_d["ledger_micro"]["analyst"] > 0
    differences = {key: (on_d.get(key), on_d2.get(key)) for key in sorted(set(on_d) | set(on_d2))
                   if on_d.get(key) != on_d2.get(key)}
    assert not differences, (f"{query}: adding one person ({ADVERSARIES[adversary].text}) changes what the "
                             f"analyst sees (D, D'): {json.dumps(differences, default=str)[:1500]}")


# -- a failure after planning: charged, and a fixed text -------------------------------------------


def test_a_computation_that_fails_after_planning_is_charged_and_says_nothing_of_the_data(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - the fixture
    def failing(message: str):  # type: ignore[no-untyped-def]
        def aggregate(self: PolarsBackend, request: Any) -> Any:
            raise ValueError(message)
        return aggregate

    answers = []
    for epsilon, message in ((0.1, "nan at row 17 value 3.14"), (0.2, "inf at row 99 value 2.71")):
        monkeypatch.setattr(PolarsBackend, "aggregate", failing(message))
        spec = count_query(epsilon=epsilon)
        loss = round(api.post(ANALYST, "/v1/queries/estimate", json=spec).json()["loss"]["epsilon"] * MICRO)
        before = api.spent_micro(ANALYST)
        try:
            response = api.query(ANALYST, spec)
        except ValueError as escaped:
            pytest.fail(f"the computation's exception escaped the service ({escaped}): an unhandled 500, and "
                        "nothing says its loss was charged")
        spent = api.spent_micro(ANALYST)
        assert {scope: spent[scope] - before[scope] for scope in spent} == {scope: loss for scope in spent}, (
            "a computation that read data and failed must keep its charge in every scope "
            f"(moved: {({scope: spent[scope] - before[scope] for scope in spent})}, loss {loss})")
        assert response.status_code >= 500, response.text
        body = response.json()
        assert {"error", "detail"} <= set(body)
        for leaked in ("3.14", "2.71", "row 17", "row 99", "nan at", "inf at"):
            assert leaked not in response.text, f"the error answer carries the failure's data: {response.text}"
        answers.append((response.status_code, body))
    assert answers[0] == answers[1], "the failure's answer must be one fixed text, whatever failed"
    audit = "".join(entry.entry_json for entry in api.records())
    assert "3.14" not in audit and "row 17" not in audit, "the audit log (read by oversight) carries data"


# -- a monitor, with the noise removed and on ---------------------------------------------------


MONITOR_START = datetime(2025, 3, 1)
MONITOR_DAYS = 8


def monitor_spec(name: str) -> dict[str, Any]:
    return {"name": name, "dataset": BASE, "metric": "mean", "column": "duration_hours", "group_by": "department",
            "step": "day", "start": MONITOR_START.isoformat(), "horizon": MONITOR_DAYS, "epsilon": 1.0,
            "contributions": 3, "agency": "health"}


def monitor_batch(folder: Path, adversary: str | None) -> bytes:
    """D's events (and the adversary's rows) with their request times folded into the monitor's days."""
    events = pl.read_parquet(folder / "events.parquet")
    if adversary is not None:
        extra, _ = adversary_rows(ADVERSARIES[adversary], events, pl.read_parquet(folder / "steps.parquet"))
        events = pl.concat([events, extra])
    offset = (pl.col("request_time") - pl.lit(datetime(2025, 1, 1))).dt.total_seconds() % (MONITOR_DAYS * 86400)
    events = events.with_columns((pl.lit(MONITOR_START) + pl.duration(seconds=offset)).cast(pl.Datetime("us"))
                                 .alias("request_time"))
    buffer = io.BytesIO()
    events.write_parquet(buffer)
    return buffer.getvalue()


def append(api: Api, name: str, data: bytes) -> Any:
    end = MONITOR_START + timedelta(days=MONITOR_DAYS)
    return api.post(STEWARD, f"/v1/monitors/{name}/batches", content=data,
                    params={"start": MONITOR_START.isoformat(), "end": end.isoformat()},
                    headers={"Content-Type": "application/octet-stream"})


def monitor_run(served: Served, name: str, adversary: str | None, replay: Any = None) -> tuple[Any, Any, Any]:
    """Define monitor ``name`` on the base dataset and send it one batch (D, or D'), noise removed."""
    api = served.api
    defined = api.post(STEWARD, "/v1/monitors", json=monitor_spec(name))
    assert defined.status_code == 201, defined.text
    with NoiseRemoved(replay=replay) as harness:
        response = append(api, name, monitor_batch(served.folders[BASE], adversary))
    releases = api.get(STEWARD, f"/v1/monitors/{name}/releases")
    return response, harness.recording, releases.json() if releases.status_code == 200 else releases.text


#: A batch is the steward's upload and is checked against its declared schema before anything
#: is computed: one whose person ids are missing (declared without nulls) is refused whole.
MONITOR_ADVERSARIES = [name for name in ADVERSARIES if ADVERSARIES[name].person_id is not None]


@pytest.mark.parametrize("adversary", MONITOR_ADVERSARIES)
def test_a_monitor_moves_by_at_most_its_tree_sensitivity(adversary: str, served: Served) -> None:
    if "monitor" not in served.memo:
        served.memo["monitor"] = monitor_run(served, "nb-monitor-base", None)
    response, on_d, releases_d = served.memo["monitor"]
    assert response.status_code == 201, response.text
    response2, on_d2, releases_d2 = monitor_run(served, f"nb-monitor-{adversary.replace('_', '-')}", adversary,
                                                replay=on_d)
    assert response2.status_code == 201, (f"the batch with one more person ({ADVERSARIES[adversary].text}) "
                                          f"was refused: {response2.text}")
    problems = structure_differences(on_d, on_d2)
    assert not problems, "\n".join(problems)
    changes = compare(on_d, on_d2)
    assert changes and all(c.within for c in changes), "\n".join(
        f"{c.part}: moved by {c.observed:.6g} over {c.calls} nodes, sensitivity {c.declared}" for c in changes)
    # Coupled to D's node values, the released steps are D's: post-processing only.
    assert releases_d2 == releases_d


@pytest.mark.parametrize("adversary", MONITOR_ADVERSARIES)
def test_a_monitor_batch_with_the_adversary_is_accepted_with_the_noise_on(adversary: str, served: Served) -> None:
    api = served.api
    name = f"nb-noisy-{adversary.replace('_', '-')}"
    assert api.post(STEWARD, "/v1/monitors", json=monitor_spec(name)).status_code == 201
    response = append(api, name, monitor_batch(served.folders[BASE], adversary))
    assert response.status_code == 201, response.text
    assert response.json()["released_steps"] == list(range(MONITOR_DAYS))


# -- a feed release, with the noise removed and on ---------------------------------------------------


FEED_SPECS = [{"aggregate": "mean", "column": "duration_hours", "group_by": ["department"], "epsilon": 0.2},
              {"aggregate": "sum", "column": "waiting_minutes", "group_by": ["channel"], "epsilon": 0.1},
              {"aggregate": "count", "group_by": ["service_id"], "epsilon": 0.1}]


def define_feed(api: Api, dataset: str) -> str:
    name = f"feed-{dataset}"
    start = (datetime.now(timezone.utc) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    response = api.post(STEWARD, "/v1/feeds", json={"name": name, "dataset": dataset, "specs": FEED_SPECS,
                                                    "schedule": "daily", "releases": 3, "start": start.isoformat(),
                                                    "agencies": ["health"]})
    assert response.status_code == 201, response.text
    return name


def trigger(api: Api, feed: str, dataset: str, replay: Any = None, noise: bool = False) -> tuple[Any, Any, int]:
    """The feed's next release: (response, recording or None, what the dataset's scopes were charged)."""
    before = api.spent_micro(STEWARD, dataset)
    if noise:
        response, recording = api.post(STEWARD, f"/v1/feeds/{feed}/releases"), None
    else:
        with NoiseRemoved(replay=replay) as harness:
            response = api.post(STEWARD, f"/v1/feeds/{feed}/releases")
        recording = harness.recording
    after = api.spent_micro(STEWARD, dataset)
    charged = {scope: after[scope] - before[scope] for scope in ("dataset", "lifetime")}
    return response, recording, charged


@pytest.mark.parametrize("adversary", IN_DOMAIN)
def test_a_feed_release_moves_by_at_most_its_sensitivity_and_is_made_on_d_prime(adversary: str,
                                                                                 served: Served) -> None:
    api = served.api
    if "feed" not in served.memo:
        feed = define_feed(api, BASE)
        served.memo["feed"] = (trigger(api, feed, BASE), trigger(api, feed, BASE, noise=True))
    (response, on_d, charged), (noisy, _, noisy_charged) = served.memo["feed"]
    assert response.status_code == 201 and noisy.status_code == 201, (response.text, noisy.text)
    dataset = dataset_of(adversary)
    feed = define_feed(api, dataset)
    response2, on_d2, charged2 = trigger(api, feed, dataset, replay=on_d)
    assert response2.status_code == 201, (f"the release with one more person ({ADVERSARIES[adversary].text}) "
                                          f"was not made: {response2.text}")
    assert charged2 == charged
    problems = structure_differences(on_d, on_d2)
    assert not problems, "\n".join(problems)
    changes = compare(on_d, on_d2)
    assert changes and all(c.within for c in changes), "\n".join(
        f"{c.part}: moved by {c.observed:.6g}, sensitivity {c.declared}" for c in changes)
    noisy2, _, noisy_charged2 = trigger(api, feed, dataset, noise=True)
    assert (noisy2.status_code, noisy_charged2) == (noisy.status_code, noisy_charged), noisy2.text


@pytest.mark.parametrize("adversary", sorted(OUTSIDE_DOMAIN))
def test_a_dataset_outside_the_guarantees_domain_is_refused_at_registration(adversary: str,
                                                                           served: Served) -> None:
    """Events reusing other people's event ids: a step would count for two people, so it is not registered."""
    folder = served.folders[dataset_of(adversary)]
    response = served.api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert response.status_code == 409, response.text
    assert "repeat a value of 'event_id'" in response.json()["detail"]
    assert served.api.get(ANALYST, f"/v1/datasets/{dataset_of(adversary)}").status_code in (403, 404)
