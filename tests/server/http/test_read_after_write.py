"""Commit, then confirm: every state-changing route's change (and its audit entry) is committed
before its 2xx leaves, on SQLite and on PostgreSQL.

The app is wrapped in a probe that, at the moment a 2xx response starts (and, for answers
whose body the check needs, when the body is handed to the server), reads the state back
through a fresh connection of its own (``NullPool``: nothing shared with the app's pool) and
checks the change and its audit entry. A route that commits only after sending its answer
(FastAPI's default for a ``yield`` dependency, which ``WriteSession`` used to be) fails here
deterministically, without racing a client against the server. A short test on a real
uvicorn server then repeats the two races of issue 19 over a socket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from sqlmodel import Session, select

from civicdp.server.state import auth
from civicdp.server.state.caller import subject_of
from civicdp.server.state.db import make_engine, session_scope
from civicdp.server.http.deps import WriteSession
from civicdp.server.state.feed_models import Feed, FeedRelease
from civicdp.server.http.app import create_app
from civicdp.server.state.models import Account, ApiKey, AuditEntry, BudgetCap, Dataset, Release
from civicdp.server.state.monitor_models import Monitor, MonitorBatch, MonitorSubscription
from tests.conftest import base_metadata
from tests.server.api_fixtures import wait_until_serving
from tests.server.api_fixtures import (
    ANALYST, COUNT, DATASET, STEWARD, Api, TestClient, make_dataset_folder, populate, prepare_state, settings_for,
)
from tests.server.feeds.test_feeds import definition as feed_definition
from tests.server.monitors.test_monitors import DAY, START, batch, monitor

Check = Callable[[bytes | None], None]


class Probe:
    """Wraps the app; runs the pending check at the start (and body) of the next 2xx answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state  # so Api.state finds the app's state through the TestClient
        self.at_start: Check | None = None
        self.at_body: Check | None = None
        self.ran: list[str] = []

    def expect(self, at_start: Check | None = None, at_body: Check | None = None) -> None:
        self.at_start, self.at_body, self.ran = at_start, at_body, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def probing(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if 200 <= status < 300 and self.at_start is not None:
                    check, self.at_start = self.at_start, None
                    check(None)  # an AssertionError here propagates as the test's failure
                    self.ran.append("start")
            elif message["type"] == "http.response.body" and 200 <= status < 300 and self.at_body is not None:
                check, self.at_body = self.at_body, None
                check(bytes(message.get("body", b"")))
                self.ran.append("body")
            await send(message)

        await self.app(scope, receive, probing)


@dataclass
class Fresh:
    """Fresh connections to the state database and to the policy store's."""

    state_url: str
    policy_url: str
    secret: bytes = b""
    engines: list[Engine] = field(default_factory=list)

    def engine(self, url: str) -> Engine:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"), poolclass=NullPool)
        self.engines.append(engine)
        return engine

    def session(self) -> Session:
        return Session(self.engine(self.state_url))

    def one(self, model: type, *where: Any) -> Any:
        with self.session() as session:
            return session.exec(select(model).where(*where)).first()

    def entry(self, action: str, target: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.exec(select(AuditEntry).where(AuditEntry.action == action, AuditEntry.target == target)
                               .order_by(AuditEntry.seq.desc())).first()  # type: ignore[union-attr]
            return None if row is None else json.loads(row.entry_json)

    def rules(self, ptype: str, *values: str) -> int:
        columns = " AND ".join(f"v{i} = :v{i}" for i in range(len(values)))
        with self.engine(self.policy_url).connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM casbin_rule WHERE ptype = :p AND {columns}"),
                                          {"p": ptype, **{f"v{i}": v for i, v in enumerate(values)}}).scalar_one())

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()


@dataclass
class Harness:
    api: Api
    probe: Probe
    fresh: Fresh

    def call(self, method: str, path: str, expected: int, at_start: Check | None = None,
             at_body: Check | None = None, who: str = STEWARD, **kwargs: Any) -> httpx.Response:
        self.probe.expect(at_start, at_body)
        response = self.api.call(who, method, path, **kwargs)
        assert response.status_code == expected, response.text
        wanted = [name for name, check in (("start", at_start), ("body", at_body)) if check is not None]
        assert self.probe.ran == wanted, "the check did not run while the answer was being sent"
        # And the same check after the answer, through another fresh connection.
        for check in (at_start, at_body):
            if check is not None:
                check(response.content)
        return response


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    database_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    settings = settings_for(tmp_path / "state", database_url, feeds_scheduler=False)
    policy_url = database_url or f"sqlite:///{(settings.data_dir / 'policies.db').resolve()}"
    app = create_app(settings)
    probe = Probe(app)
    fresh = Fresh(settings.state_url, policy_url)
    try:
        with TestClient(probe) as client:
            keys = populate(app.state.civicdp, make_dataset_folder(tmp_path / "datasets"))
            fresh.secret = app.state.civicdp.secret
            yield Harness(Api(client, settings, keys), probe, fresh)
    finally:
        fresh.close()


def _authenticates(fresh: Fresh, key: str) -> str | None:
    """The reason a key fails through a fresh connection, or None if it authenticates."""
    with fresh.session() as session:
        try:
            auth.verify_key(session, key, fresh.secret, datetime.now(timezone.utc))
        except auth.AuthenticationFailed as failure:
            return failure.reason
    return None


def test_every_state_change_is_committed_with_its_entry_before_its_2xx(harness: Harness, tmp_path: Path) -> None:
    h, fresh = harness, harness.fresh

    # accounts
    def account_made(_: bytes | None) -> None:
        row = fresh.one(Account, Account.name == "ana-new")
        assert row is not None and row.agency == "health", "account not committed"
        assert fresh.entry("account.create", "ana-new") is not None, "its audit entry is not committed"

    h.call("POST", "/v1/accounts", 201, account_made, json={"name": "ana-new", "agency": "health"})

    # keys: issued (the key in the body authenticates) ...
    def key_works(body: bytes | None) -> None:
        if body is None:
            return
        key = json.loads(body)["api_key"]
        assert _authenticates(fresh, key) is None, "the key just issued does not authenticate"
        prefix = json.loads(body)["prefix"]
        assert fresh.one(ApiKey, ApiKey.prefix == prefix) is not None
        assert fresh.entry("key.create", "ana-new") is not None

    issued = h.call("POST", "/v1/accounts/ana-new/keys", 201, at_body=key_works, json={"expires_in_days": 7})
    key, prefix = issued.json()["api_key"], issued.json()["prefix"]

    # ... and revoked (it no longer authenticates)
    def key_revoked(_: bytes | None) -> None:
        assert _authenticates(fresh, key) == "revoked", "a key reported revoked still authenticates"
        assert fresh.entry("key.revoke", prefix) is not None

    h.call("DELETE", f"/v1/keys/{prefix}", 200, key_revoked)

    # roles
    def granted(_: bytes | None) -> None:
        assert fresh.rules("g", subject_of("ana-new"), "analyst", "health") == 1, "grant not committed"
        assert fresh.entry("role.grant", "ana-new") is not None

    h.call("POST", "/v1/accounts/ana-new/roles", 200, granted, json={"role": "analyst", "agency": "health"})

    def revoked(_: bytes | None) -> None:
        assert fresh.rules("g", subject_of("ana-new"), "analyst", "health") == 0, "revoke not committed"
        assert fresh.entry("role.revoke", "ana-new") is not None

    h.call("DELETE", "/v1/accounts/ana-new/roles/analyst/health", 200, revoked)

    # policies
    rule = {"subject": subject_of("ana-new"), "agency": "health", "object": f"dataset:{DATASET}",
            "action": "dataset.list", "effect": "deny"}

    def rule_added(_: bytes | None) -> None:
        assert fresh.rules("p", rule["subject"], "health", rule["object"], "dataset.list") == 1
        assert fresh.entry("policy.add", rule["object"]) is not None

    h.call("POST", "/v1/policies", 201, rule_added, json=rule)

    # datasets
    metadata = base_metadata()
    metadata["name"] = "second-set"
    folder = make_dataset_folder(tmp_path / "more", metadata=metadata)

    def registered(_: bytes | None) -> None:
        assert fresh.one(Dataset, Dataset.name == "second-set") is not None, "registration not committed"
        assert fresh.entry("dataset.register", "second-set") is not None

    h.call("POST", "/v1/datasets", 201, registered, json={"path": str(folder)})

    # caps
    def capped(_: bytes | None) -> None:
        cap = fresh.one(BudgetCap, BudgetCap.dataset == DATASET, BudgetCap.scope == "analyst",
                        BudgetCap.subject == ANALYST)
        assert cap is not None and cap.cap_micro == 700_000, "cap not committed"
        assert fresh.entry("budget.set_cap", DATASET) is not None

    h.call("PUT", "/v1/budgets/caps", 200, capped,
           json={"dataset": DATASET, "scope": "analyst", "subject": ANALYST, "epsilon": 0.7})

    # feeds: defined (and shared with its agencies), then triggered
    def feed_defined(_: bytes | None) -> None:
        feed = fresh.one(Feed, Feed.name == "daily-volumes")
        assert feed is not None and json.loads(feed.agencies_json) == ["health"], "feed not committed"
        assert fresh.entry("feed.define", "feed:daily-volumes") is not None

    h.call("POST", "/v1/feeds", 201, feed_defined, json=feed_definition())

    def feed_released(_: bytes | None) -> None:
        assert fresh.one(FeedRelease) is not None, "feed release not committed"
        assert fresh.entry("feed.release", "feed:daily-volumes") is not None

    h.call("POST", "/v1/feeds/daily-volumes/releases", 201, feed_released)

    # monitors: defined, subscribed, fed a batch, stopped
    def monitor_defined(_: bytes | None) -> None:
        assert fresh.one(Monitor, Monitor.name == "daily-channel") is not None, "monitor not committed"
        assert fresh.entry("monitor.manage", "monitor:daily-channel") is not None

    h.call("POST", "/v1/monitors", 201, monitor_defined, json=monitor())

    def subscribed(_: bytes | None) -> None:
        assert fresh.one(MonitorSubscription, MonitorSubscription.account == ANALYST) is not None
        assert fresh.entry("monitor.subscribe", "monitor:daily-channel") is not None

    h.call("POST", "/v1/monitors/daily-channel/subscriptions", 201, subscribed, who=ANALYST, json={})

    def batch_stored(_: bytes | None) -> None:
        assert fresh.one(MonitorBatch) is not None, "batch not committed"

    h.call("POST", "/v1/monitors/daily-channel/batches", 201, batch_stored, content=batch(0, 2),
           params={"start": START.isoformat(), "end": (START + 2 * DAY).isoformat()},
           headers={"Content-Type": "application/octet-stream"})

    def stopped(_: bytes | None) -> None:
        row = fresh.one(Monitor, Monitor.name == "daily-channel")
        assert row is not None and row.active is False, "deactivation not committed"

    h.call("DELETE", "/v1/monitors/daily-channel", 200, stopped)

    # a query (its release and entry)
    def answered(body: bytes | None) -> None:
        if body is None:
            return
        release_id = json.loads(body)["release_id"]
        assert fresh.one(Release, Release.id == release_id) is not None, "release not committed"
        assert fresh.entry("query.release", DATASET) is not None

    h.call("POST", "/v1/queries", 200, at_body=answered, who=ANALYST, json=COUNT)


def test_write_sessions_end_before_the_answer() -> None:
    (dependency,) = WriteSession.__metadata__  # type: ignore[attr-defined]
    assert dependency.scope == "function", "WriteSession must commit before the answer is sent"


def test_the_probe_catches_a_commit_after_the_answer(tmp_path: Path) -> None:
    """The harness's power: a route whose yield dependency commits after the answer (FastAPI's
    default scope) fails the check while its answer is sent; scope="function" passes it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'probe.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE thing (name TEXT)"))

    def writer() -> Iterator[Session]:
        with session_scope(engine) as session:
            yield session

    app = FastAPI()

    @app.post("/late")
    def late(session: Session = Depends(writer)) -> dict[str, str]:  # noqa: B008 - locals: no Annotated
        session.execute(text("INSERT INTO thing VALUES ('late')"))
        return {}

    @app.post("/early")
    def early(session: Session = Depends(writer, scope="function")) -> dict[str, str]:  # noqa: B008
        session.execute(text("INSERT INTO thing VALUES ('early')"))
        return {}

    fresh = Fresh(f"sqlite:///{tmp_path / 'probe.db'}", "")
    probe = Probe(app)

    def stored(name: str) -> Check:
        def check(_: bytes | None) -> None:
            with fresh.engine(fresh.state_url).connect() as connection:
                found = connection.execute(text("SELECT count(*) FROM thing WHERE name = :n"), {"n": name})
                assert found.scalar_one() == 1, f"{name}: not committed while the answer was sent"
        return check

    try:
        with TestClient(probe) as client:
            probe.expect(stored("early"))
            assert client.post("/early").status_code == 200 and probe.ran == ["start"]
            probe.expect(stored("late"))
            with pytest.raises(AssertionError, match="late: not committed"):
                client.post("/late")
    finally:
        fresh.close()
        engine.dispose()


# -- over a socket: issue 19's two races, on a real server --------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVE = """
import sys, uvicorn
from pathlib import Path
from civicdp.server.http.app import create_app
from civicdp.server.state.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2] or None, feeds_scheduler=False)
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


@contextmanager
def served(data_dir: Path, database_url: str | None) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(data_dir), database_url or "", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


TRIES = 25


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_over_a_socket_a_new_account_takes_a_key_and_a_revoked_key_is_refused_at_once(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    database_url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    settings = settings_for(tmp_path / "state", database_url, feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    steward = {"Authorization": f"Bearer {keys[STEWARD]}"}
    with served(settings.data_dir, database_url) as url:
        # One connection for the steward, another for the account's own calls.
        with httpx.Client(base_url=url, headers=steward) as admin_http, httpx.Client(base_url=url) as user_http:
            for i in range(TRIES):
                name = f"race-{i}"
                assert admin_http.post("/v1/accounts", json={"name": name, "agency": "health"}).status_code == 201
                issued = admin_http.post(f"/v1/accounts/{name}/keys", json={"expires_in_days": 1})
                assert issued.status_code == 201, f"try {i}: {issued.text}"
                key = {"Authorization": f"Bearer {issued.json()['api_key']}"}
                assert user_http.get("/v1/datasets", headers=key).status_code == 200, f"try {i}: new key refused"
                assert admin_http.delete(f"/v1/keys/{issued.json()['prefix']}").status_code == 200
                assert user_http.get("/v1/datasets", headers=key).status_code == 401, f"try {i}: revoked key worked"
