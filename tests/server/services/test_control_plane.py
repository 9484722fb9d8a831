"""One source of truth for the control plane (issue 15): a change made anywhere is in force everywhere.

The command line, the API and every server process share one state: roles, rules and
datasets' policy objects live in one rule table with a version that moves in the
changing transaction, so each process reloads before its next decision. Two server
processes (real uvicorn servers) run on one state -- SQLite files, then one PostgreSQL
database -- while the command line revokes a role, registers a dataset, changes a cap
and shares a feed; each change is in force on both servers' next request. Policy rows
are unique whichever route adds them, a revoke removes every copy, and a revoke of
nothing is an error. The smaller items of the issue follow, each with its regression
test: datetime bounds given as numbers are refused at registration (they made every
time-based query a 500), ``keys list`` and the prefix printed by ``keys create``, caps
listed over HTTP and on the command line, lifetime scopes that "never" renew (not NaN),
account and agency names held to the API's rules, and ``audit entries`` saying when more
entries match.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from civicdp.server.entry import app as cli
from civicdp.server.state.settings import Settings
from tests.conftest import base_metadata
from tests.server.api_fixtures import (
    ANALYST, DATASET, FEED, OTHER_ANALYST, OVERSIGHT, STEWARD, Api, ViaTestClient, api, count_query,  # noqa: F401
    dataset_folder, make_dataset_folder, prepare_state, settings_for,
)
from tests.server.racing import ROOT

runner = CliRunner()

SERVE = """
import sys, uvicorn
from pathlib import Path
from civicdp.server.http.app import create_app
from civicdp.server.state.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2] or None, feeds_scheduler=False)
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICDP_") and k != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@contextmanager
def servers(data_dir: Path, database_url: str | None, count: int = 2) -> Iterator[list[str]]:
    """``count`` server processes on one state; their base URLs (their stderr goes to files beside the state)."""
    ports = [_free_port() for _ in range(count)]
    logs = [data_dir.parent / f"server-{port}.log" for port in ports]
    processes = []
    for port, log in zip(ports, logs, strict=True):
        with log.open("wb") as stderr:  # a file, never a pipe nobody reads (a full pipe would block the server)
            processes.append(subprocess.Popen([sys.executable, "-c", SERVE, str(data_dir), database_url or "",
                                               str(port)], cwd=ROOT, env=_server_env(), stdout=subprocess.DEVNULL,
                                              stderr=stderr))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 120
        for process, url, log in zip(processes, urls, logs, strict=True):
            while True:
                assert process.poll() is None, log.read_text()[-2000:]
                try:
                    if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"a server did not start: {log.read_text()[-2000:]}"
                time.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def use_state(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Point the command line (run in this process) at ``settings``' state."""
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("CIVICDP_DATABASE_URL", raising=False)
    monkeypatch.delenv("CIVICDP_INIT_STATE", raising=False)
    if settings.database_url:
        monkeypatch.setenv("DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("DATABASE_URL", raising=False)


def civicdp(*args: str) -> Any:
    return runner.invoke(cli, list(args))


def ok(*args: str) -> str:
    result = civicdp(*args)
    assert result.exit_code == 0, result.output
    return result.output


class Calls:
    """Requests to several servers with the accounts' keys; every question a fresh one."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.asked = 0

    def call(self, url: str, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        return httpx.request(method, url + path, headers=headers, timeout=60, **kwargs)

    def query(self, url: str, who: str, **changes: Any) -> httpx.Response:
        # A new epsilon each time: never answered from a stored release (which is free).
        self.asked += 1
        spec = count_query(**{"epsilon": round(0.01 + self.asked * 1e-4, 6), **changes})
        return self.call(url, who, "POST", "/v1/queries", json=spec)


def _second_dataset(root: Path) -> Path:
    metadata = base_metadata()
    metadata["name"] = "second-services"
    return make_dataset_folder(root, metadata=metadata)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None


def test_command_line_changes_are_in_force_on_two_running_servers_at_their_next_request(
        database_url: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", database_url, feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    use_state(monkeypatch, settings)
    calls = Calls(keys)
    with servers(settings.data_dir, database_url) as urls:
        # A role revoked on the command line (issue 15: it was still in force, and charged).
        assert all(calls.query(url, ANALYST).status_code == 200 for url in urls)
        ok("roles", "revoke", ANALYST, "analyst", "health")
        for url in urls:
            refused = calls.query(url, ANALYST)
            assert refused.status_code == 403 and "no roles" in refused.json()["detail"], refused.text
        # ... and granted again (it gave "403 (no roles)").
        ok("roles", "grant", ANALYST, "analyst", "health")
        assert all(calls.query(url, ANALYST).status_code == 200 for url in urls)

        # A dataset registered on the command line (it gave "403 not a registered object").
        folder = _second_dataset(tmp_path / "more")
        assert all(calls.call(url, ANALYST, "GET", "/v1/datasets/second-services").status_code == 403
                   for url in urls)  # "not a registered object"
        assert "registered second-services" in ok("datasets", "register", str(folder))
        for url in urls:
            assert calls.call(url, ANALYST, "GET", "/v1/datasets/second-services").status_code == 200
            answered = calls.query(url, ANALYST, dataset="second-services")
            assert answered.status_code == 200, answered.text

        # A cap lowered on the command line.
        assert all(calls.query(url, OTHER_ANALYST).status_code == 200 for url in urls)
        ok("budgets", "set", DATASET, "analyst", "0.02", "--subject", OTHER_ANALYST)
        for url in urls:
            refused = calls.query(url, OTHER_ANALYST)
            assert refused.status_code == 409 and refused.json()["scope"] == "analyst", refused.text

        # A feed shared on the command line.
        definition = tmp_path / "feed.json"
        definition.write_text(json.dumps({"name": "cp-feed", "dataset": DATASET, "schedule": "monthly",
                                          "releases": 1, "agencies": ["transport"],
                                          "specs": [count_query(epsilon=0.01)]}))
        ok("feeds", "define", str(definition))
        assert all(calls.call(url, FEED, "GET", "/v1/feeds").json() == [] for url in urls)
        ok("feeds", "share", "cp-feed", "health")
        for url in urls:
            assert [f["name"] for f in calls.call(url, FEED, "GET", "/v1/feeds").json()] == ["cp-feed"]

        # A change made through one server's API is in force on the other at once.
        first, second = urls
        revoked = calls.call(first, STEWARD, "DELETE", f"/v1/accounts/{OTHER_ANALYST}/roles/analyst/transport")
        assert revoked.status_code == 200, revoked.text
        assert calls.call(second, OTHER_ANALYST, "GET", "/v1/datasets/second-services").status_code == 403


def _rule_rows(settings: Settings, *values: str) -> int:
    url = settings.database_url or f"sqlite:///{settings.data_dir / 'policies.db'}"
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            where = " AND ".join(f"v{i} = :v{i}" for i in range(len(values)))
            return int(connection.execute(text(f"SELECT count(*) FROM casbin_rule WHERE ptype = 'g' AND {where}"),
                                          {f"v{i}": v for i, v in enumerate(values)}).scalar_one())
    finally:
        engine.dispose()


def test_a_role_granted_by_the_cli_and_the_api_is_one_grant_and_one_revoke_removes_it(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    use_state(monkeypatch, api.settings)
    assert api.post(STEWARD, "/v1/accounts", json={"name": "alice", "agency": "health"}).status_code == 201
    api.keys["alice"] = api.new_key("alice")
    assert "granted analyst in health to alice" in ok("roles", "grant", "alice", "analyst", "health")
    granted = api.post(STEWARD, "/v1/accounts/alice/roles", json={"role": "analyst", "agency": "health"})
    assert granted.status_code == 200 and granted.json()["roles"] == [{"role": "analyst", "agency": "health"}]
    assert "already holds" in ok("roles", "grant", "alice", "analyst", "health")
    assert _rule_rows(api.settings, "account:alice", "analyst", "health") == 1
    assert api.query("alice", count_query(epsilon=0.11)).status_code == 200

    assert "revoked analyst in health from alice" in ok("roles", "revoke", "alice", "analyst", "health")
    assert _rule_rows(api.settings, "account:alice", "analyst", "health") == 0
    assert api.query("alice", count_query(epsilon=0.12)).status_code == 403
    # A revoke of nothing says so: a non-zero exit on the command line, 404 over HTTP.
    again = civicdp("roles", "revoke", "alice", "analyst", "health")
    assert again.exit_code == 2 and "does not hold the role analyst in agency 'health'" in again.output
    assert "nothing was revoked" in again.output
    over_http = api.call(STEWARD, "DELETE", "/v1/accounts/alice/roles/analyst/health")
    assert over_http.status_code == 404 and "nothing was revoked" in over_http.json()["detail"]
    assert [e.action for e in api.records("role.revoke")] == ["role.revoke"]  # one change, one record


def test_a_role_stored_twice_before_rules_were_unique_is_removed_by_one_revoke(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    engine = create_engine(f"sqlite:///{settings.data_dir / 'policies.db'}")
    try:
        with engine.begin() as connection:  # the state issue 15 found: a CLI grant and an API grant, two rows
            connection.execute(text("DROP INDEX casbin_rule_unique_rule"))
            connection.execute(text("INSERT INTO casbin_rule (ptype, v0, v1, v2) "
                                    "VALUES ('g', 'account:ana-health', 'analyst', 'health')"))
    finally:
        engine.dispose()
    assert _rule_rows(settings, "account:ana-health", "analyst", "health") == 2
    use_state(monkeypatch, settings)
    ok("roles", "revoke", ANALYST, "analyst", "health")  # opening the state removes the copy; revoke the rest
    assert _rule_rows(settings, "account:ana-health", "analyst", "health") == 0
    with servers(settings.data_dir, None, count=1) as (url,):
        assert Calls(keys).query(url, ANALYST).status_code == 403


# -- issue 15's smaller items -------------------------------------------------------------------


def _numeric_time_bounds(root: Path) -> Path:
    metadata = base_metadata()
    metadata["name"] = "numeric-times"
    time_columns = [name for name, column in metadata["tables"]["events"]["columns"].items()
                    if column["type"] == "datetime"]
    assert time_columns, "the test dataset has a datetime column"
    metadata["tables"]["events"]["columns"][time_columns[0]]["bounds"] = [0, 1_000_000]
    return make_dataset_folder(root, metadata=metadata)


def test_numeric_bounds_on_a_datetime_column_are_refused_at_registration(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _numeric_time_bounds(tmp_path / "bad")
    refused = api.post(STEWARD, "/v1/datasets", json={"path": str(folder)})
    assert refused.status_code == 422, refused.text
    assert "bounds must be ISO times" in refused.json()["detail"]
    use_state(monkeypatch, api.settings)
    result = civicdp("datasets", "register", str(folder))
    assert result.exit_code == 2 and "bounds must be ISO times" in result.output
    assert "Traceback" not in result.output
    assert "numeric-times" not in [d["name"] for d in api.get(STEWARD, "/v1/datasets").json()]


def test_keys_are_listed_with_the_prefix_that_revokes_them(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    use_state(monkeypatch, api.settings)
    created = ok("keys", "create", ANALYST, "--expires-in-days", "7")
    prefix = created.split("prefix ", 1)[1].split()[0]
    assert f"cdp_{prefix}_" in created and f"civicdp keys revoke {prefix}" in created
    listed = json.loads(ok("keys", "list", "--account", ANALYST, "--json"))
    assert {(k["prefix"], k["state"]) for k in listed} >= {(prefix, "active")}
    assert all(k["account"] == ANALYST for k in listed) and all("secret" not in k for k in listed)
    assert prefix in ok("keys", "list")
    ok("keys", "revoke", prefix)
    [row] = [k for k in json.loads(ok("keys", "list", "--json")) if k["prefix"] == prefix]
    assert row["state"] == "revoked" and row["revoked_at"]
    again = civicdp("keys", "revoke", prefix)
    assert again.exit_code == 2 and "revoked already" in again.output
    assert civicdp("keys", "revoke", "nosuchprefix").exit_code == 2
    assert api.call(STEWARD, "DELETE", f"/v1/keys/{prefix}").status_code == 409
    assert civicdp("keys", "list", "--account", "nobody").exit_code == 2


def test_caps_are_listed_over_http_and_on_the_command_line(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    assert api.call(STEWARD, "PUT", "/v1/budgets/caps", json={
        "dataset": DATASET, "scope": "analyst", "subject": OTHER_ANALYST, "epsilon": 0.3}).status_code == 200
    response = api.get(STEWARD, "/v1/budgets/caps")  # was 405
    assert response.status_code == 200, response.text
    caps = {(c["scope"], c["subject"]): (c["epsilon"], c["source"]) for c in response.json()}
    assert caps[("analyst", OTHER_ANALYST)] == (0.3, "set")  # an account that has not spent is listed too
    assert caps[("analyst", "*")] == (1.0, "default") and caps[("lifetime", "*")] == (4.0, "default")
    assert api.get(OVERSIGHT, "/v1/budgets/caps", params={"dataset": DATASET}).status_code == 200
    assert api.get(ANALYST, "/v1/budgets/caps").status_code == 403
    assert api.get(STEWARD, "/v1/budgets/caps", params={"dataset": "nope"}).status_code == 404
    use_state(monkeypatch, api.settings)
    listed = json.loads(ok("budgets", "caps", "--json"))
    assert listed == response.json()
    assert OTHER_ANALYST in ok("budgets", "caps")


def test_the_lifetime_scope_never_renews_and_says_so(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200
    use_state(monkeypatch, api.settings)
    shown = ok("budgets", "list")
    [lifetime] = [line for line in shown.splitlines() if "lifetime" in line]
    assert "never" in lifetime and "nan" not in shown.lower()
    rows = json.loads(ok("budgets", "list", "--json"))
    assert {b["scope"]: b["renews_at"] for b in rows}["lifetime"] is None
    oversight = {"CIVICDP_URL": "http://testserver", "CIVICDP_API_KEY": api.keys[OVERSIGHT]}
    with _client_through(api):
        ledger = runner.invoke(cli, ["audit", "ledger"], env=oversight)
    assert ledger.exit_code == 0, ledger.output
    assert "NaN" not in ledger.output and "never" in ledger.output


@contextmanager
def _client_through(api: Api) -> Iterator[None]:
    """Make the command line's HTTP client talk to the in-process app."""
    import civicdp.queries.client as client_module

    original = client_module.httpx.Client

    def through(*args: Any, **kwargs: Any) -> httpx.Client:
        kwargs["transport"] = ViaTestClient(api.client)
        return original(*args, **kwargs)

    client_module.httpx.Client = through  # type: ignore[misc]
    try:
        yield
    finally:
        client_module.httpx.Client = original  # type: ignore[misc]


@pytest.mark.parametrize("name, agency", [("", "health"), ("a b;c", "health"), ("bob", ""), ("bob", "a b;c"),
                                          ("-bob", "health"), ("bob", "*")])
def test_the_command_line_refuses_names_the_api_refuses(api: Api, monkeypatch: pytest.MonkeyPatch, name: str,
                                                        agency: str) -> None:
    over_http = api.post(STEWARD, "/v1/accounts", json={"name": name, "agency": agency})
    assert over_http.status_code == 422
    use_state(monkeypatch, api.settings)
    result = civicdp("accounts", "create", "--agency", agency, "--", name)
    assert result.exit_code == 2 and "is not accepted" in result.output, result.output
    assert name not in [a["name"] for a in api.get(STEWARD, "/v1/accounts").json()] or name == ""


def test_a_role_in_an_agency_the_api_refuses_is_refused_on_the_command_line(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    use_state(monkeypatch, api.settings)
    result = civicdp("roles", "grant", ANALYST, "analyst", "a b;c")
    assert result.exit_code == 2 and "is not accepted" in result.output
    assert api.post(STEWARD, f"/v1/accounts/{ANALYST}/roles",
                    json={"role": "analyst", "agency": "a b;c"}).status_code == 422


def test_audit_entries_say_when_more_match(api: Api) -> None:
    for i in range(4):
        api.get(ANALYST, "/v1/datasets")
    oversight = {"CIVICDP_URL": "http://testserver", "CIVICDP_API_KEY": api.keys[OVERSIGHT]}
    with _client_through(api):
        few = runner.invoke(cli, ["audit", "entries", "--limit", "3"], env=oversight)
        assert few.exit_code == 0, few.output
        lines = [line for line in few.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 3
        last = json.loads(lines[-1])["seq"]
        assert f"3 entries shown; more match: continue with --after {last}" in few.stderr
        rest = runner.invoke(cli, ["audit", "entries", "--after", str(last), "--limit", "100000"], env=oversight)
    assert rest.exit_code == 0 and "more match" not in rest.stderr
    seqs = [json.loads(line)["seq"] for line in rest.stdout.splitlines() if line.startswith("{")]
    assert seqs and seqs[0] == last + 1
    assert all("NaN" not in line for line in rest.stdout.splitlines())
