"""Bounded work before identity: body size, JSON structure and the anonymous rate limit.

In-process (TestClient): oversized and deeply nested bodies are refused with 413/422 before
any key is looked at, and with the usual error shape naming the limit or the field; the
batch route's larger limit is reached only with a valid key; requests without a valid key
beyond a client's allowance get the same 401 without their body being read, and are
summarised in one audit entry per client instead of one each. Over a socket: 16 clients
sending 40 MB bodies to a real uvicorn server leave its memory flat.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from civicdp.server.http.anonymous_traffic import AnonymousTraffic, ClientBuckets
from civicdp.server.http.json_limits import JsonLimits, json_problem
from civicdp.server.http.limits import DRAIN_BYTES, RequestLimitsMiddleware
from civicdp.server.state.settings import Settings
from tests.server.api_fixtures import wait_until_serving
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, COUNT, STEWARD, Api, api, dataset_folder, make_dataset_folder, prepare_state, running_api,
    settings_for,
)

MiB = 1024 * 1024
QUERIES = "/v1/queries"


def _nested(depth: int) -> dict[str, Any]:
    """A count whose filter value nests ``depth`` lists deep."""
    value: Any = "web"
    for _ in range(depth):
        value = [value]
    return {**COUNT, "filters": [{"column": "channel", "op": "in", "values": value}]}


def _entries(api: Api, action: str | None = None) -> list[dict[str, Any]]:
    return [json.loads(r.entry_json) for r in api.records(action)]


# -- size -------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413_naming_it_before_authentication(api: Api) -> None:
    body = b'{"pad": "' + b"x" * MiB + b'"}'
    failed_before = len(api.records("auth.failed"))
    for who in (None, ANALYST):
        response = api.post(who, QUERIES, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
        answer = response.json()
        assert answer["error"] == "request_too_large" and answer["limit_bytes"] == MiB
        assert "1048576 bytes" in answer["detail"] and answer["field"] == "body"
    assert len(api.records("auth.failed")) == failed_before, "no key was looked at"
    last = _entries(api)[-1]
    assert (last["decision"], last["detail"]["status"]) == ("refused", 413)


def test_a_streamed_body_is_refused_once_it_passes_the_limit(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "'
        for _ in range(40):
            yield b"x" * 64 * 1024
        yield b'"}'

    response = api.post(None, QUERIES, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["limit_bytes"] == MiB


def _through_middleware(headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[list[int], int, int]:
    """Run the middleware alone on a body of ``chunks`` x 64 KiB: (app calls, chunks pulled, status)."""
    settings = Settings(data_dir=Path("unused"), max_request_bytes=256 * 1024)
    called: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(1)

    middleware = RequestLimitsMiddleware(app, settings, AnonymousTraffic(10, 10, 60))
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 64 * 1024, "more_body": pulled < chunks}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/queries", "client": ("10.0.0.1", 1), "app": None,
             "headers": [(b"content-type", b"application/json"), *headers]}
    anyio.run(middleware, scope, receive, send)
    return called, pulled, sent[0]["status"]


def test_a_refused_body_is_dropped_as_it_arrives_and_never_reaches_the_app() -> None:
    # Streamed: the first 256 KiB are held, then the rest is read and dropped (so a client
    # that sends before it reads gets the 413), up to a bound.
    called, pulled, status = _through_middleware([], chunks=100)
    assert (called, pulled, status) == ([], 100, 413)
    called, pulled, status = _through_middleware([], chunks=100_000)  # 6.4 GB
    assert called == [] and status == 413 and pulled <= (256 * 1024 + DRAIN_BYTES) // (64 * 1024) + 2
    # Declared too large: answered at once; a declared size beyond the drain bound is not read at all.
    called, pulled, status = _through_middleware([(b"content-length", b"10000000000")], chunks=100_000)
    assert (called, pulled, status) == ([], 0, 413)


def test_a_body_within_the_limit_reaches_the_app(api: Api) -> None:
    padded = {**COUNT, "filters": [{"column": "channel", "op": "in", "values": ["web"] * 5000}]}
    assert len(json.dumps(padded)) < MiB
    assert api.query(None, padded).status_code == 401
    assert api.query(ANALYST, COUNT).status_code == 200


def test_the_413_is_documented_for_every_operation_with_a_body(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    with_body = [(path, method, op) for path, ops in schema["paths"].items() for method, op in ops.items()
                 if "requestBody" in op]
    assert len(with_body) >= 10
    assert all("413" in op["responses"] for _, _, op in with_body)


# -- the batch route: large bodies only with a valid key ---------------------------------------


def _batch(api: Api, who: str | None, body: bytes, **headers: str) -> httpx.Response:
    return api.post(who, "/v1/monitors/none/batches", content=body,
                    params={"start": "2025-01-01T00:00:00Z", "end": "2025-01-02T00:00:00Z"},
                    headers={"Content-Type": "application/octet-stream", **headers})


def test_the_batch_route_takes_a_large_body_only_from_a_valid_key(tmp_path: Path, dataset_folder: Path) -> None:
    with running_api(tmp_path / "state", dataset_folder, max_batch_bytes=4 * MiB) as started:
        big = b"\0" * (2 * MiB)
        # No key, or a wrong one: 401 before the body is read (not 413, not a 2 MiB read).
        assert _batch(started, None, big).status_code == 401
        wrong = {"Authorization": "Bearer cdp_AAAAAAAAAAAA_" + "A" * 43}
        assert _batch(started, None, big, **wrong).status_code == 401
        # A valid key: the body reaches the route (which finds it is not Parquet).
        reached = _batch(started, STEWARD, big)
        assert reached.status_code == 422 and reached.json()["field"] == "batch"
        # Above the batch limit: 413 naming it.
        over = _batch(started, STEWARD, b"\0" * (4 * MiB + 1))
        assert over.status_code == 413 and over.json()["limit_bytes"] == 4 * MiB
        # JSON sent to the batch route is parsed as JSON, so it gets the small limit.
        as_json = _batch(started, STEWARD, b'"' + b"x" * (2 * MiB) + b'"', **{"Content-Type": "application/json"})
        assert as_json.status_code == 413 and as_json.json()["limit_bytes"] == MiB


# -- JSON structure ----------------------------------------------------------------------------


def test_deeply_nested_specs_are_refused_with_422_naming_the_field_before_authentication(api: Api) -> None:
    failed_before = len(api.records("auth.failed"))
    for who in (None, ANALYST):
        response = api.query(who, _nested(40))
        assert response.status_code == 422, response.text
        answer = response.json()
        assert answer["error"] == "invalid_request"
        assert answer["field"].startswith("filters.0.values.0.0") and "32 levels" in answer["problem"]
        assert answer["fix"] and answer["detail"].startswith(answer["field"])
    assert len(api.records("auth.failed")) == failed_before
    # 30 levels (plus the spec's own three) is within the limit: the spec reaches the planner.
    assert api.query(ANALYST, _nested(29)).status_code == 422
    assert api.query(ANALYST, _nested(29)).json()["error"] == "invalid_query"


def test_long_lists_are_refused_with_422_naming_the_list(api: Api) -> None:
    spec = {**COUNT, "group_by": ["channel"] * 10_001}
    response = api.query(None, spec)
    assert response.status_code == 422
    assert response.json()["field"] == "group_by" and "10000 members" in response.json()["problem"]
    many_keys = {**COUNT, **{f"k{i}": i for i in range(10_001)}}
    assert api.query(None, many_keys).json()["field"] == "body"


def test_a_document_of_many_small_containers_is_refused() -> None:
    problem = json_problem(json.dumps([[{}] * 100 for _ in range(200)]).encode(), JsonLimits())
    assert problem is not None and problem.field == "body" and "arrays and objects" in problem.problem


@pytest.mark.parametrize("body", [b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', b'{"a": "\\"[[[[[[[["}',
                                  b"[}", b"", b'"' + b"[" * 100])
def test_brackets_in_strings_and_text_that_is_not_json_are_left_to_the_parser(body: bytes) -> None:
    assert json_problem(body, JsonLimits(depth=3)) is None


def test_the_structure_check_is_fast_on_a_megabyte() -> None:
    worst = [b"[" + b"0," * 524_000 + b"0]", b"[" + b",".join([b"[" + b",".join([b'"a"'] * 9000) + b"]"] * 25) + b"]",
             b"[" * (512 * 1024) + b"]" * (512 * 1024)]
    for body in worst:
        started = time.process_time()  # CPU time: the shared machine's load does not count
        json_problem(body, JsonLimits())
        assert time.process_time() - started < 1.0


# -- the anonymous rate limit ------------------------------------------------------------------


def test_a_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    buckets = ClientBuckets(burst=3, per_second=0.5, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.empty("a") and not buckets.empty("b")
    now[0] = 1.9
    assert not buckets.take("a")
    now[0] = 2.1
    assert buckets.take("a") and not buckets.take("a")
    now[0] = 1000
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_the_bucket_forgets_the_least_recently_seen_client_first() -> None:
    buckets = ClientBuckets(burst=1, per_second=0.001, max_clients=2)
    assert buckets.take("a") and buckets.take("b")
    assert buckets.take("c")  # "a" forgotten
    assert not buckets.take("c") and buckets.empty("b")


def test_beyond_its_allowance_a_client_without_a_valid_key_is_summarised_not_logged_one_by_one(
        tmp_path: Path, dataset_folder: Path) -> None:
    with running_api(tmp_path / "state", dataset_folder, anonymous_burst=3, anonymous_per_minute=0.01) as started:
        traffic: AnonymousTraffic = started.client.app.state.anonymous_traffic  # type: ignore[attr-defined]
        before = len(started.records())
        wrong = {"Authorization": "Bearer cdp_AAAAAAAAAAAA_" + "A" * 43}
        # The allowance: three requests, each with its own entry.
        for _ in range(3):
            assert started.get(None, "/v1/datasets", headers=wrong).status_code == 401
        assert len(started.records("auth.failed")) == 3
        # Beyond it: the same 401 (no key looked up without one, no body read), no entry each.
        first_401 = started.get(None, "/v1/datasets").json()
        for _ in range(20):
            assert started.get(None, "/v1/datasets").json() == first_401
            assert started.get(None, "/v1/datasets", headers=wrong).status_code == 401
            assert started.post(None, QUERIES, content=b"x" * (2 * MiB)).status_code == 401  # not a 413: unread
            assert started.get(None, "/v1/no-such-thing").status_code == 401
        assert len(started.records("auth.failed")) == 3
        assert traffic.pending() == {"testclient": 81}
        # A valid key from the same address is still served.
        assert started.query(ANALYST, COUNT).status_code == 200
        assert started.get(STEWARD, "/v1/accounts").status_code == 200
        # Health probes are not limited.
        assert started.get(None, "/v1/health").status_code == 200
        assert traffic.flush(started.state.db) == 1
        (summary,) = _entries(started, AnonymousTraffic.ACTION)
        assert summary["target"] == "client:testclient" and summary["decision"] == "refused"
        assert summary["detail"]["refused"] == 81 and summary["detail"]["statuses"] == {"401": 81}
        assert summary["detail"]["burst"] == 3
        # 84 requests without a valid key left 3 entries and one summary (the rest are the
        # keyholders' query, its release and the accounts listing).
        written = len(started.records()) - before
        assert written <= 3 + 1 + 3, f"{written} entries"


def test_the_summary_is_written_each_window_and_at_shutdown(tmp_path: Path, dataset_folder: Path) -> None:
    with running_api(tmp_path / "state", dataset_folder, anonymous_burst=1, anonymous_per_minute=0.01,
                     anonymous_summary_seconds=1) as started:
        for _ in range(5):
            started.get(None, "/v1/datasets")
        deadline = time.monotonic() + 10
        while not started.records(AnonymousTraffic.ACTION):
            assert time.monotonic() < deadline, "no summary within its window"
            time.sleep(0.1)
        assert json.loads(started.records(AnonymousTraffic.ACTION)[0].entry_json)["detail"]["refused"] == 4
        for _ in range(2):
            started.get(None, "/v1/datasets")
    # The lifespan's end wrote what was left (read through a new start of the same state).
    with running_api(tmp_path / "state", None, keys=started.keys) as again:
        counts = [json.loads(r.entry_json)["detail"]["refused"] for r in again.records(AnonymousTraffic.ACTION)]
    assert sum(counts) == 6


# -- memory, over a socket ---------------------------------------------------------------------

SERVE = """
import sys, uvicorn
from pathlib import Path
from civicdp.server.http.app import create_app
from civicdp.server.state.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), feeds_scheduler=False)
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[2]), log_level="error")
"""
CLIENTS = 16
BODY = 40 * 1000 * 1000  # 40 MB each
#: Peak growth of the server's resident memory allowed while they send (the measured growth is
#: far lower; issue 19 saw 1.8 GB for four 42 MB bodies before the limit).
MAX_GROWTH = 120 * MiB


def _send_one(port: int, chunked: bool, outcome: list[str]) -> None:
    chunk = b"[" + b"0," * (32 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {BODY}\r\n".encode()
            sock.sendall(b"POST /v1/queries HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + framing + b"\r\n")
            sent = 0
            while sent < BODY:
                piece = chunk[: BODY - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            outcome.append(sock.recv(200).split(b"\r\n", 1)[0].decode())
    except OSError as exc:  # the server answered 413 and closed while we were still sending
        outcome.append(type(exc).__name__)


def _peak_growth(pid: int, run: Any) -> tuple[int, int]:
    process = psutil.Process(pid)
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return baseline, peak - baseline


@pytest.mark.slow
def test_sixteen_clients_sending_40_mb_bodies_leave_the_servers_memory_flat(
        tmp_path: Path, dataset_folder: Path) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    keys = prepare_state(settings, dataset_folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(settings.data_dir), str(port)],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server)
        analyst = {"Authorization": f"Bearer {keys[ANALYST]}"}
        assert httpx.post(f"{url}{QUERIES}", json=COUNT, headers=analyst, timeout=60).status_code == 200  # warm
        figures = {}
        outcomes = {}
        for chunked in (False, True):
            outcome: list[str] = []

            def run() -> None:
                threads = [threading.Thread(target=_send_one, args=(port, chunked, outcome)) for _ in range(CLIENTS)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)

            started = time.monotonic()
            baseline, growth = _peak_growth(server.pid, run)
            figures["chunked" if chunked else "declared"] = (baseline, growth, time.monotonic() - started)
            outcomes["chunked" if chunked else "declared"] = sorted(set(outcome))
            assert len(outcome) == CLIENTS, outcome
            # Every client is answered 413 (its body was read on and dropped, not held).
            assert all("413" in o for o in outcome), outcome
            assert growth < MAX_GROWTH, f"server memory grew by {growth / MiB:.1f} MiB ({figures})"
        print(outcomes, {k: f"baseline {b / MiB:.0f} MiB, peak growth {g / MiB:.1f} MiB, {t:.1f} s"
               for k, (b, g, t) in figures.items()})
        # Still answering, and still answering keyholders.
        assert httpx.get(f"{url}/v1/health", timeout=5).status_code == 200
        assert httpx.post(f"{url}{QUERIES}", json=COUNT, headers=analyst, timeout=60).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_summary_that_cannot_be_written_is_kept_for_the_next_window(tmp_path: Path) -> None:
    traffic = AnonymousTraffic(burst=1, per_minute=1, window_seconds=60)
    traffic.refused("10.0.0.7", 401)
    traffic.refused("10.0.0.7", 401)

    class Broken:
        def connect(self) -> None:
            raise RuntimeError("database down")

    with pytest.raises(Exception):
        traffic.flush(Broken())  # type: ignore[arg-type]
    traffic.refused("10.0.0.7", 404)
    assert traffic.pending() == {"10.0.0.7": 3}
