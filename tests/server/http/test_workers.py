"""Several workers on one database, and the lean path of cached answers (issue 15).

The lean path (``server/http/lean.py``) must answer exactly what the full path answers, with the
same entry, and must hand back to the full path whatever it cannot vouch for: a revoked
or expired key, a revoked role, a dataset registered at another version, a changed answer.
Real server processes (``civicdp serve``) then run on one state -- SQLite files and one
PostgreSQL database: proofs and checkpoints answered by either of two processes verify
against each other, every answer a client received has its entry in the database even
when the server is killed right after, and ``--workers`` keeps Nagle's algorithm off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlmodel import Session

from civicdp.audit.bundle import verify_bundle
from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import verify_consistency, verify_inclusion
from civicdp.audit.signing import VerifierKey
from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.http.lean import LeanQueries
from civicdp.server.state.models import ApiKey, AuditEntry
from tests.conftest import base_metadata
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, DATASET, OTHER_ANALYST, OVERSIGHT, Api, api, count_query, dataset_folder, make_dataset_folder,
    prepare_state, settings_for, wait_until_serving,
)
from tests.server.racing import ROOT

CACHED = count_query(epsilon=0.1)


def _lean(api: Api) -> LeanQueries:
    node: Any = api.client.app.middleware_stack  # type: ignore[attr-defined]
    while node is not None and not isinstance(node, LeanQueries):
        node = getattr(node, "app", None)
    assert node is not None, "the lean path is not in the middleware stack"
    return node


def _warm(api: Api, who: str = ANALYST, spec: dict[str, Any] = CACHED) -> httpx.Response:
    """Asked three times: computed, then served by the full path (which checks it), then by the lean path."""
    answers = [api.query(who, spec) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200], answers[-1].text
    assert [a.json()["cached"] for a in answers] == [False, True, True]
    return answers[-1]


def _entry(api: Api, seq: int) -> dict[str, Any]:
    with Session(api.state.db) as session:
        return json.loads(session.get(AuditEntry, seq).entry_json)  # type: ignore[union-attr]


# -- the lean path --------------------------------------------------------------------------------------


def test_the_lean_path_answers_and_records_what_the_full_path_does(api: Api) -> None:
    full = [api.query(ANALYST, CACHED) for _ in range(2)][-1]  # the full path's cached answer
    before = _lean(api).stages.answered
    lean = api.query(ANALYST, CACHED)
    assert _lean(api).stages.answered == before + 1
    assert lean.status_code == 200 and lean.content == full.content
    assert lean.headers["content-type"] == full.headers["content-type"] == "application/json"
    *_, by_full, by_lean = [json.loads(r.entry_json) for r in api.records("query.run")]
    for entry in (by_full, by_lean):
        entry.pop("seq"), entry.pop("time")
    assert by_lean == by_full and by_lean["decision"] == "cached" and by_lean["who"]["roles"]
    assert api.count(AuditEntry) == api.records()[-1].seq + 1


def test_the_lean_path_refuses_a_revoked_key_an_expired_key_and_a_revoked_role(api: Api) -> None:
    _warm(api)
    key = api.keys[ANALYST]
    prefix = key.split("_")[1]
    with session_scope(api.state.db) as session:
        admin.revoke_key(session, None, prefix)
    refused = api.query(ANALYST, CACHED)
    assert refused.status_code == 401, refused.text
    [failed] = [json.loads(r.entry_json) for r in api.records("auth.failed")]
    assert failed["detail"]["reason"] == "revoked" and failed["detail"]["key_prefix"] == prefix
    assert "key_revoked" in _lean(api).stages.declined

    api.keys[ANALYST] = api.new_key(ANALYST)
    answered = _lean(api).stages.answered
    assert api.query(ANALYST, CACHED).json()["cached"] is True  # a new key: learnt by the lean path at once
    assert _lean(api).stages.answered == answered + 1
    with session_scope(api.state.db) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == api.keys[ANALYST].split("_")[1])
                        .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert api.query(ANALYST, CACHED).status_code == 401

    api.keys[ANALYST] = api.new_key(ANALYST)
    assert api.query(ANALYST, CACHED).status_code == 200
    with session_scope(api.state.db) as session:
        admin.revoke_role(session, api.state.policies, None, ANALYST, Role.ANALYST, "health")
    denied = api.query(ANALYST, CACHED)
    assert denied.status_code == 403, denied.text
    assert api.records("query.run")[-1].decision == "denied"


def test_the_lean_path_never_answers_a_dataset_version_no_longer_registered(api: Api, tmp_path: Path) -> None:
    """The question it remembers was planned at version 1; inside the transaction it finds version 2."""
    old = _warm(api).json()
    metadata = base_metadata()
    metadata["version"] = "2"
    folder = make_dataset_folder(tmp_path / "v2", metadata=metadata)
    with session_scope(api.state.db) as session:
        admin.register_dataset(session, api.state.policies, None, folder)
    fresh = api.query(ANALYST, CACHED)
    assert fresh.status_code == 200, fresh.text
    body = fresh.json()
    assert body["cached"] is False and body["dataset_version"] == "2" != old["dataset_version"]
    assert body["release_id"] != old["release_id"]
    assert "not_stored" in _lean(api).stages.declined
    again = [api.query(ANALYST, CACHED).json() for _ in range(2)]
    assert [a["dataset_version"] for a in again] == ["2", "2"] and all(a["cached"] for a in again)


def test_a_changed_answer_is_not_served_by_the_lean_path(api: Api) -> None:
    answer = _warm(api).json()
    with api.state.db.begin() as connection:
        connection.execute(text("UPDATE release SET result_json = replace(result_json, '\"rows\"', '\"rows\" ') "
                                "WHERE id = :i"), {"i": answer["release_id"]})
    refused = api.query(ANALYST, CACHED)
    assert refused.status_code == 503 and "failed its integrity check" in refused.json()["detail"]


# -- server processes --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(data_dir: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICDP_") and k != "DATABASE_URL"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               CIVICDP_DATA_DIR=str(data_dir), CIVICDP_FEEDS_SCHEDULER="false")
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


@contextmanager
def serving(data_dir: Path, database_url: str | None, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``civicdp serve --workers N`` on the state; its URL and process (stopped, or killed, afterwards)."""
    port = _free_port()
    log = data_dir.parent / f"serve-{port}.log"  # a file, not a pipe nobody reads (it could fill and block)
    with log.open("wb") as errors:
        process = subprocess.Popen([sys.executable, "-c", "from civicdp.server.entry import main; main()", "serve", "--host",
                                    "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                                   cwd=ROOT, env=_env(data_dir, database_url), stdout=subprocess.DEVNULL,
                                   stderr=errors, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, 120, path="/v1/ready", log=log)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None


def _state(tmp_path: Path, database_url: str | None) -> tuple[Path, dict[str, str], str]:
    settings = settings_for(tmp_path / "state", database_url, feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    return settings.data_dir, keys, settings.state_url


def _post(url: str, key: str, spec: dict[str, Any] = CACHED) -> httpx.Response:
    return httpx.post(f"{url}/v1/queries", json=spec, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _get(url: str, key: str, path: str, **params: Any) -> httpx.Response:
    response = httpx.get(f"{url}{path}", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _count(state_url: str, sql: str) -> int:
    engine = create_engine(state_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_proofs_and_checkpoints_from_two_processes_verify_against_each_other(
        tmp_path: Path, database_url: str | None) -> None:
    data_dir, keys, _ = _state(tmp_path, database_url)
    with serving(data_dir, database_url) as (first, _), serving(data_dir, database_url) as (second, _):
        for i in range(6):
            assert _post(first if i % 2 else second, keys[ANALYST], count_query(epsilon=0.1 + i / 100)
                         ).status_code == 200
        public = [VerifierKey.parse(line) for line in httpx.get(f"{first}/v1/audit/public-key").text.split()]
        assert httpx.get(f"{second}/v1/audit/public-key").text.split() == [k.encode() for k in public]
        a = Checkpoint.parse(_get(first, keys[OVERSIGHT], "/v1/audit/checkpoint").text)
        for _ in range(5):  # entries appended through the other process
            assert _post(second, keys[ANALYST]).status_code == 200
        b = Checkpoint.parse(_get(second, keys[OVERSIGHT], "/v1/audit/checkpoint").text)
        assert a.verified_by(public) and b.verified_by(public) and b.size > a.size
        for server in (first, second):  # either process proves b extends a, and a's entries are in b
            proof = _get(server, keys[OVERSIGHT], "/v1/audit/proofs/consistency", first=a.size, second=b.size).json()
            assert verify_consistency(a.size, b.size, a.root, b.root, [bytes.fromhex(h) for h in proof["path"]])
            for seq in (0, a.size - 1, b.size - 1):
                got = _get(server, keys[OVERSIGHT], "/v1/audit/proofs/inclusion", seq=seq, size=b.size).json()
                assert verify_inclusion(bytes.fromhex(got["leaf_hash"]), seq, b.size,
                                        [bytes.fromhex(h) for h in got["path"]], b.root)
        again = Checkpoint.parse(_get(first, keys[OVERSIGHT], "/v1/audit/checkpoint").text)
        assert again.size >= b.size  # the first process signs on from the second's checkpoint
        bundle = tmp_path / "export.zip"
        bundle.write_bytes(_get(second, keys[OVERSIGHT], "/v1/audit/export").content)
        verify_bundle(bundle, public, trusted=a)


@pytest.mark.slow
def test_every_answer_a_client_received_has_its_entry_even_when_the_server_is_killed(
        tmp_path: Path, database_url: str | None) -> None:
    """Two workers, eight clients, cached answers; ``kill -9`` right after the last answer: every entry is there."""
    data_dir, keys, state_url = _state(tmp_path, database_url)
    cached = "SELECT COUNT(*) FROM auditentry WHERE action = 'query.run' AND decision = 'cached'"
    answered = 0
    lock = threading.Lock()
    with serving(data_dir, database_url, workers=2) as (url, process):
        for _ in range(12):  # new connections: each worker checks the release once, then answers it lean
            assert _post(url, keys[ANALYST]).status_code == 200
        before = _count(state_url, cached)

        def client() -> None:
            nonlocal answered
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[ANALYST]}"}, timeout=60) as http:
                for _ in range(40):
                    response = http.post("/v1/queries", json=CACHED)
                    assert response.status_code == 200 and response.json()["cached"] is True
                    with lock:
                        answered += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        os.killpg(process.pid, signal.SIGKILL)  # no shutdown: only what was committed remains
        process.communicate(timeout=30)
    assert answered == 8 * 40
    assert _count(state_url, cached) - before == answered
    size = _count(state_url, "SELECT size FROM audithead")
    assert _count(state_url, "SELECT COUNT(*) FROM auditentry") == size  # gapless
    assert _count(state_url, "SELECT COALESCE(MAX(seq), -1) + 1 FROM auditentry") == size


@pytest.mark.slow
def test_workers_keep_nagle_off_on_keep_alive_connections(tmp_path: Path) -> None:
    """uvicorn's own --workers socket leaves Nagle on: ~43 ms per keep-alive request. Ours: a millisecond or so."""
    data_dir, keys, _ = _state(tmp_path, None)
    with serving(data_dir, None, workers=2) as (url, _):
        with httpx.Client(base_url=url) as http:
            http.get("/v1/health")
            started = time.perf_counter()
            for _ in range(30):
                assert http.get("/v1/health").status_code == 200
            per_request = (time.perf_counter() - started) / 30
    assert per_request < 0.02, f"{per_request * 1000:.1f} ms per keep-alive request (Nagle's algorithm is on)"


# -- monitors across processes ---------------------------------------------------------------------------


def test_a_monitor_batch_sent_to_two_processes_at_once_is_accepted_once(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process has its own lock per monitor: the database decides, and the loser keeps nothing."""
    from civicdp.server.monitors import service as monitors
    from civicdp.server.state.monitor_models import MonitorBatch, MonitorRelease
    from tests.server.monitors.test_monitors import STEWARD, append, batch, monitor

    assert api.post(STEWARD, "/v1/monitors", json=monitor()).status_code == 201
    monkeypatch.setattr(monitors, "_lock", lambda monitor_id: threading.Lock())  # as if two processes
    data = batch(0, 2)
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(append(api, data, 0, 2))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    statuses = sorted(a.status_code for a in answers)
    assert statuses in ([201, 409], [201, 422]), [a.text for a in answers]  # 422: it saw the first's coverage
    loser = next(a for a in answers if a.status_code != 201)
    assert "another batch" in loser.text or "covered" in loser.text
    assert api.count(MonitorBatch) == 1 and api.count(MonitorRelease) == 2
    folder = api.state.settings.data_dir
    files = [p for p in folder.rglob("batch-*.parquet") if not p.name.endswith((".used.parquet",))]
    assert len(files) == 1, files  # the loser's files are gone
