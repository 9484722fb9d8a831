"""A running civicdp app for HTTP tests: a small dataset, an account and a key for every role.

:func:`running_api` starts ``create_app(Settings(...))`` in a ``TestClient`` (so the
lifespan builds the state and disposes it afterwards), registers the test dataset of
``tests/conftest.py`` (50 people) with ``admin.register_dataset`` and creates the demo
accounts of ``civicdp.server.cli.demo``, each with its role and a fresh key:

    steward        civic-office   steward        in *
    ana-health     health         analyst        in health
    ana-transport  transport      analyst        in transport
    oversight      audit-office   oversight      in *
    feed-health    health         feed_consumer  in health

Test modules import the fixtures they use (``from tests.server.api_fixtures import api``).
Set-up goes through the app's own ``AppState`` (``client.app.state.civicdp``), so the
policy store that answers requests is the one that was changed. The checks shared by
several test files live here too, among them :func:`assert_charged`, whose power to
catch a skipped charge ``test_mutation_guards.py`` demonstrates.
"""

from __future__ import annotations

import subprocess
import time

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from sqlalchemy import func, select
from sqlmodel import Session
from sqlmodel import select as select_models

from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.state import ledger
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.db import session_scope
from civicdp.server.cli.demo import DEMO_ACCOUNTS
from civicdp.server.services.app_state import AppState
from civicdp.server.http.app import create_app
from civicdp.server.state.models import ApiKey, AuditEntry, Budget, LedgerEntry, Release
from civicdp.server.state.settings import Settings
from tests.conftest import base_metadata, events_frame, write_dataset

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package and warns (a UserWarning, an error under
    # filterwarnings = error) when its TestClient runs on httpx, which is what is installed.
    warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

DATASET = base_metadata()["name"]  # "test-services"
#: Account name -> (agency, role, the agency the role is held in).
ACCOUNTS = {name: (agency, Role(role), role_agency) for name, agency, role, role_agency in DEMO_ACCOUNTS}
ROLES = tuple(ACCOUNTS)
STEWARD, ANALYST, OTHER_ANALYST, OVERSIGHT, FEED = (
    "steward", "ana-health", "ana-transport", "oversight", "feed-health")
assert set(ROLES) == {STEWARD, ANALYST, OTHER_ANALYST, OVERSIGHT, FEED}
COUNT = {"dataset": DATASET, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}
MICRO = 1_000_000


def count_query(**changes: Any) -> dict[str, Any]:
    """The count-by-channel question, with ``changes`` (another epsilon, confidence, dataset...)."""
    return {**COUNT, **changes}


def settings_for(data_dir: Path, database_url: str | None = None, **settings: Any) -> Settings:
    """Server settings for a test; ``database_url`` is explicit so no environment variable leaks in.

    ``init_state`` defaults to True: a test's first start creates its state, as ``civicdp init`` would.
    """
    return Settings(data_dir=data_dir, database_url=database_url, **{"init_state": True, **settings})


@dataclass
class Api:
    """A started app, its settings and a plaintext key per account."""

    client: TestClient
    settings: Settings
    keys: dict[str, str]
    dataset_folder: Path | None = None

    @property
    def state(self) -> AppState:
        return self.client.app.state.civicdp  # type: ignore[attr-defined, no-any-return]

    def auth(self, who: str | None) -> dict[str, str]:
        """Headers of account ``who`` (``None``: anonymous)."""
        return {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}

    def call(self, who: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth(who), **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def get(self, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        return self.call(who, "GET", path, **kwargs)

    def post(self, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        return self.call(who, "POST", path, **kwargs)

    def query(self, who: str | None, spec: dict[str, Any]) -> httpx.Response:
        return self.post(who, "/v1/queries", json=spec)

    # -- direct set-up, as the command line would do it -------------------------------------

    def new_key(self, account: str, expires_in_days: int | None = 90) -> str:
        with session_scope(self.state.db) as session:
            return admin.issue_key(session, None, account, self.state.secret, expires_in_days)[1]

    def set_cap(self, scope: str, subject: str, epsilon: float, dataset: str = DATASET) -> None:
        with session_scope(self.state.db) as session:
            admin.set_cap(session, None, dataset, scope, subject, epsilon)

    # -- reading the state ----------------------------------------------------------------

    def spent_micro(self, account: str, dataset: str = DATASET) -> dict[str, int]:
        """What the four scopes ``account`` draws on have spent, read from the budget table."""
        agency = ACCOUNTS[account][0] if account in ACCOUNTS else None
        wanted = {ledger.ANALYST: account, ledger.AGENCY: agency, ledger.DATASET: ledger.ANY,
                  ledger.LIFETIME: ledger.ANY}
        with Session(self.state.db) as session:
            rows = session.execute(select(Budget.scope, Budget.subject, Budget.spent_micro)
                                   .where(Budget.dataset == dataset)).all()
        spent = {kind: 0 for kind in ledger.KINDS}
        for scope, subject, amount in rows:
            if wanted.get(scope) == subject:
                spent[scope] += amount
        return spent

    def count(self, model: type, *where: Any) -> int:
        with Session(self.state.db) as session:
            return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())

    def records(self, action: str | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first, optionally of one action."""
        query = select_models(AuditEntry).order_by(AuditEntry.seq)  # type: ignore[arg-type]
        if action is not None:
            query = query.where(AuditEntry.action == action)
        with Session(self.state.db) as session:
            return list(session.exec(query))

    def release(self, release_id: int) -> Release:
        with Session(self.state.db) as session:
            release = session.get(Release, release_id)
            assert release is not None, f"no release {release_id}"
            return release

    def ledger_entries(self, release_id: int) -> list[LedgerEntry]:
        with Session(self.state.db) as session:
            return list(session.exec(select_models(LedgerEntry).where(LedgerEntry.release_id == release_id)))

    def key_row(self, plaintext: str) -> ApiKey:
        prefix = plaintext.split("_")[1]
        with Session(self.state.db) as session:
            key = session.exec(select_models(ApiKey).where(ApiKey.prefix == prefix)).first()
            assert key is not None
            return key


# -- shared checks ---------------------------------------------------------------------------


def assert_charged(api: Api, account: str, before: dict[str, int], answer: dict[str, Any]) -> None:
    """``answer`` (a fresh, uncached release) was charged, in full, to each of the four scopes.

    The ledger moved by exactly the release's stored loss, that loss is what the answer says
    it charged, and the budgets in the answer are the ledger's.
    """
    after = api.spent_micro(account, answer["dataset"])
    loss_micro = api.release(answer["release_id"]).loss_micro
    assert loss_micro > 0
    assert abs(answer["charged"]["epsilon"] * MICRO - loss_micro) <= 1, "the answer misstates its charge"
    moved = {scope: after[scope] - before[scope] for scope in ledger.KINDS}
    assert moved == {scope: loss_micro for scope in ledger.KINDS}, f"budgets moved by {moved}, not {loss_micro}"
    shown = {b["scope"]: b["spent_micro"] for b in answer["budgets"]}
    assert shown == after, "the budgets in the answer are not the ledger's"


# -- set-up ----------------------------------------------------------------------------------


class ViaTestClient(httpx.BaseTransport):
    """An httpx transport that hands every request to a started ``TestClient``.

    Lets ``civicdp.queries.client.Client`` (a plain ``httpx.Client``) talk to the in-process app
    without a socket; ``httpx.ASGITransport`` would need an ``AsyncClient``.
    """

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.client.request(request.method, str(request.url), headers=dict(request.headers),
                                     content=request.read())
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def wait_prepared(api: Api, dataset: str, seconds: float = 60) -> dict[str, Any]:
    """Wait until the newest registration of ``dataset`` is prepared (issue 14: an API registration
    returns at once and is prepared in the background); its preparation status."""
    deadline = time.monotonic() + seconds
    while True:
        answer = api.get(STEWARD, f"/v1/datasets/{dataset}/preparation")
        assert answer.status_code == 200, answer.text
        preparation = answer.json()["preparation"]
        if preparation is None or preparation["state"] not in ("pending", "preparing"):
            assert preparation is None or preparation["state"] == "ready", preparation
            return answer.json()
        assert time.monotonic() < deadline, preparation
        time.sleep(0.05)


def make_dataset_folder(root: Path, frame: pl.DataFrame | None = None,
                        metadata: dict[str, Any] | None = None) -> Path:
    """A dataset (default: the 50-person test dataset) written to ``root/<its name>``."""
    metadata = base_metadata() if metadata is None else metadata
    return write_dataset(root / metadata["name"], events_frame() if frame is None else frame, metadata)


def populate(state: AppState, dataset_folder: Path, *, expires_in_days: int = 30) -> dict[str, str]:
    """Register the dataset and create every demo account with its role; a fresh key for each."""
    keys = {}
    with session_scope(state.db) as session:
        admin.register_dataset(session, state.policies, None, dataset_folder)
        for name, (agency, role, role_agency) in ACCOUNTS.items():
            admin.create_account(session, None, name, agency)
            admin.grant_role(session, state.policies, None, name, role, role_agency)
            keys[name] = admin.issue_key(session, None, name, state.secret, expires_in_days)[1]
    return keys


def prepare_state(settings: Settings, dataset_folder: Path) -> dict[str, str]:
    """Set up ``settings.data_dir`` without serving it (as ``civicdp demo`` does); a key per account."""
    state = build_state(settings)
    try:
        return populate(state, dataset_folder)
    finally:
        state.close()


@contextmanager
def running_api(data_dir: Path, dataset_folder: Path | None, *, database_url: str | None = None,
                keys: dict[str, str] | None = None, **settings: Any) -> Iterator[Api]:
    """Start the app on ``data_dir`` (and ``database_url``) and stop it on exit.

    With a ``dataset_folder`` the state is populated first (dataset, accounts, keys);
    without one the state is used as it is, with the ``keys`` of an earlier start.
    """
    config = settings_for(data_dir, database_url, **settings)
    with TestClient(create_app(config)) as client:
        state: AppState = client.app.state.civicdp  # type: ignore[attr-defined]
        if dataset_folder is not None:
            keys = populate(state, dataset_folder)
        yield Api(client, config, dict(keys or {}), dataset_folder)


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    return make_dataset_folder(tmp_path / "datasets")


@pytest.fixture
def api(tmp_path: Path, dataset_folder: Path) -> Iterator[Api]:
    """The app on a fresh SQLite data_dir, with the dataset and every role's account and key."""
    with running_api(tmp_path / "state", dataset_folder) as started:
        yield started


def wait_until_serving(url: str, process: "subprocess.Popen[bytes]", seconds: float = 30,
                       path: str = "/v1/health", log: Path | None = None) -> None:
    """Poll ``url + path`` until it answers 200; fail if ``process`` exits (with the end of ``log``,
    its stderr, when given) or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:] if log else "the server exited"
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
