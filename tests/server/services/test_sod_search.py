"""Separation of duties under search (issue 19): no sequence of steward moves lets a steward or an
oversight account read an answer.

The promise (README "For stewards", SECURITY.md "Who can do what"): stewards and oversight never
read data, and no account holds a data-reading role (analyst, feed consumer) beside a steward or
oversight role. This module does not replay one scripted attack; it searches.

**Who attacks.** A coalition acting only through the HTTP API, holding the keys of the demo
steward ``S`` (steward in ``*``), the demo oversight officer ``O`` (oversight in ``*``), and of two
accounts ``S`` created and issued keys for: a deputy ``M`` made steward in ``*`` and a puppet ``P``
(agency ``health``) with no role yet. A move is tried with each key in turn (those holding the
steward role in every agency first) until one is not refused with 403, so a steward that gave
its own role away still acts through the deputy.

**Moves** (:func:`moves_on`): grant an account a role -- analyst, feed consumer, steward,
oversight -- in ``*``, in its own agency or in an agency it does not act in; revoke a role it
holds. Before the search the coalition has done everything that only widens its reach
(:func:`set_scene`): allow rules for the steward and oversight roles and for each of its accounts
on every query, estimate, release and feed read; a second dataset registered; feeds shared with
every agency and with ``health``, defined and triggered; a monitor with a batch; every cap
raised; an analyst's questions answered and stored (so the lean path of cached answers is
tried as well as the full one). Moves that only widen are no use later than first, so the search
need not order them.

**What is read** (:func:`probe`) with every key whose account is, or on the path was, a steward
or oversight account: two stored queries (the lean path) and a never-asked one (the full path,
on the second dataset), a feed's index and latest release, the other feed's latest, a stored
release, the monitor's releases. Such a key must be refused every query and feed read (401 or
403: a 409 would mean it got as far as the charge); no body it gets may contain a value of any
stored answer; the policy store must deny it queries and feed reads; and no account may hold a
data role beside a duty role.

**The search** (:func:`search`) is exhaustive: every sequence of at most :data:`DEPTH` moves on
one account, for each of S, O and P, depth first, each move undone afterwards (the rule table
restored), a state (the rule table) expanded once at the smallest depth it was reached. One
account's moves do not change what another may read -- the decisions for an account depend only
on the rules naming it and the roles' rules, and a manager is always at hand (M) -- so every
mixed sequence reaches a combination of states this reaches one account at a time. Each account
is probed once for every set of rules naming it. At depth 3 that is about 1,200 moves, 170
states and 2,300 requests; the test prints them and its time (15 to 45 s, by the machine's load).

**What it found** on the code before it (at depth 1 and 2), kept below as regression examples:
(1) revoking an oversight (or steward) account's duty role left nothing between its old key and
an allow rule naming it, nor between it and a later ``analyst`` or ``feed_consumer`` grant (in
``*`` or its own agency); (2) a steward or oversight role granted in an agency the account does
not act in left the role's deny rules out of reach, so an allow rule naming the account let a
"steward" query and read feeds; (3) so a steward could have a deputy steward revoke its role and
grant it ``analyst``. Now a duty grant (and a duty revoke) writes deny rules naming the account
-- queries, estimates and feed reads, in every agency -- which stay when the role goes, and a
data role is refused to an account that carries them: once a steward or oversight account,
never a data reader.

**What it does not forbid.** A steward creates accounts, grants them roles and issues their keys:
that is its job, and the key it is shown is the one it hands to the analyst. So a steward can
create an analyst account and keep the key
(:func:`test_residual_a_steward_can_keep_the_key_of_an_analyst_it_made`). That account is an
analyst, never a steward, and each step is in the audit log under the steward's name; closing it
needs keys that reach analysts around the steward (a secret the analyst chooses, or keys of
data-reading accounts issued only on the server machine) -- a change of the product's key flow.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from civicdp.policies.actions import Action, ColumnClass, Role
from civicdp.policies.objects import ALL_DATASETS, ALL_FEEDS, class_group
from civicdp.server.services import admin
from civicdp.server.state.caller import subject_of
from civicdp.server.state.db import session_scope
from civicdp.server.state.errors import Conflict
from civicdp.server.state.models import AuditEntry, Release
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, COUNT, DATASET, OVERSIGHT, STEWARD, Api, api, dataset_folder, make_dataset_folder, running_api,
)
from tests.conftest import base_metadata
from tests.server.monitors.test_monitors import append, batch, monitor

#: How many moves on one account the search makes at most (CIVICDP_SOD_DEPTH to go deeper).
DEPTH = int(os.environ.get("CIVICDP_SOD_DEPTH", "3"))
DEPUTY, PUPPET = "deputy", "puppet"
AGENCY = {STEWARD: "civic-office", OVERSIGHT: "audit-office", DEPUTY: "civic-office", PUPPET: "health"}
#: Per account searched: the agencies a role is granted in -- every agency, its own, one it does not act in.
GRANT_AGENCIES = {STEWARD: ("*", "civic-office", "health"), OVERSIGHT: ("*", "audit-office", "health"),
                  PUPPET: ("*", "health", "transport")}
DUTY = frozenset({Role.STEWARD, Role.OVERSIGHT})
DATA = frozenset({Role.ANALYST, Role.FEED_CONSUMER})

SECOND = "sod-second"  # a dataset the steward registers over HTTP
UNGROUPED = {"dataset": DATASET, "aggregate": "count", "epsilon": 0.1}
FRESH = {"dataset": SECOND, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.2}  # never asked
FEEDS = ("sod-everyone", "sod-health")
MONITOR = "sod-monitor"
REFUSED = {401, 403}

#: ("grant" | "revoke", account, role, agency)
Move = tuple[str, str, str, str]
Row = tuple[Any, ...]  # a rule row: ptype, v0..v5


def reading_rules(subject: str) -> list[dict[str, Any]]:
    """Allow rules naming ``subject`` (an account or a role) for every way of reading data."""
    public = class_group(ColumnClass.PUBLIC)
    return [{"subject": subject, "agency": "*", "object": obj, "action": action.value, "cap": cap}
            for obj, action, cap in ((ALL_DATASETS, Action.QUERY_RUN, "1"), (public, Action.QUERY_RUN, "1"),
                                     (ALL_DATASETS, Action.QUERY_ESTIMATE, "1"), (public, Action.QUERY_ESTIMATE, "1"),
                                     (ALL_DATASETS, Action.RELEASE_READ, "*"), (ALL_FEEDS, Action.FEED_READ, "*"))]


# -- the world the coalition acts in --------------------------------------------------------------


@dataclass
class World:
    """The running app, the coalition's keys, and which accounts held a duty role on the current path."""

    api: Api
    keys: dict[str, str]  # account -> the key the coalition holds
    ever_duty: set[str]
    fingerprints: frozenset[str] = frozenset()
    release_ids: tuple[int, ...] = ()
    requests: int = 0

    def call(self, account: str, method: str, path: str, **kwargs: Any) -> Any:
        self.requests += 1
        headers = {"Authorization": f"Bearer {self.keys[account]}"}
        return self.api.client.request(method, path, headers=headers, **kwargs)

    def as_any_manager(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer to the first of the coalition's keys not refused with 403 (else the first 403).

        Tried first: the accounts holding the steward role in every agency (S's key before the
        deputy's while S holds it), so a refusal usually costs one request.
        """
        stewards = {row[1] for _, row in self.rules() if row[0] == "g" and row[2:4] == ("steward", "*")}
        first = None
        for account in sorted((STEWARD, DEPUTY, PUPPET, OVERSIGHT), key=lambda a: subject_of(a) not in stewards):
            response = self.call(account, method, path, **kwargs)
            if response.status_code != 403:  # done, or refused for a reason every manager would hear
                return response
            first = first or response
        return first

    # -- the rule table: the state, and how a move is undone --

    def rules(self) -> list[tuple[int, Row]]:
        with self.api.state.policy_db.connect() as conn:
            return [(row[0], tuple(row[1:])) for row in conn.execute(text(
                "SELECT id, ptype, v0, v1, v2, v3, v4, v5 FROM casbin_rule ORDER BY id"))]

    def restore(self, rows: Counter[Row]) -> None:
        """Make the rule table hold ``rows`` again (and move the version, as any change does)."""
        now = self.rules()
        extra = Counter(row for _, row in now) - rows
        missing = rows - Counter(row for _, row in now)
        if not extra and not missing:
            return
        with self.api.state.policy_db.begin() as conn:
            for rule_id, row in now:
                if extra[row] > 0:
                    extra[row] -= 1
                    conn.execute(text("DELETE FROM casbin_rule WHERE id = :id"), {"id": rule_id})
            for row in missing.elements():
                conn.execute(text("INSERT INTO casbin_rule (ptype, v0, v1, v2, v3, v4, v5) "
                                  "VALUES (:p, :v0, :v1, :v2, :v3, :v4, :v5)"),
                             dict(zip(("p", "v0", "v1", "v2", "v3", "v4", "v5"), row, strict=True)))
            conn.execute(text("UPDATE casbin_rule_version SET version = version + 1 WHERE id = 1"))


def naming(account: str, rows: list[tuple[int, Row]]) -> frozenset[Row]:
    """The rules that name ``account``: with the roles' rules, all that decides what it may do."""
    subject = subject_of(account)
    return frozenset(row for _, row in rows if row[1] == subject)


def moves_on(account: str, rows: list[tuple[int, Row]]) -> list[Move]:
    """Every grant to ``account`` (each role, each agency of :data:`GRANT_AGENCIES`); a revoke of each role it holds."""
    held = [("revoke", account, row[2], row[3]) for row in naming(account, rows) if row[0] == "g"]
    return [*(("grant", account, role.value, agency) for role in Role for agency in GRANT_AGENCIES[account]),
            *sorted(held)]


def do(world: World, move: Move) -> bool:
    """Make ``move`` through the API, with any key of the coalition; True if the server accepted it."""
    kind, account, role, agency = move
    if kind == "grant":
        response = world.as_any_manager("POST", f"/v1/accounts/{account}/roles", json={"role": role, "agency": agency})
    else:
        response = world.as_any_manager("DELETE", f"/v1/accounts/{account}/roles/{role}/{agency}")
    if response.status_code < 300 and kind == "grant" and Role(role) in DUTY:
        world.ever_duty.add(account)
    return bool(response.status_code < 300)


# -- what is read, and what must never be ----------------------------------------------------------


def reads(world: World) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(method, path, request arguments, whether it reads data) for every way a key might reach an answer."""
    return [
        ("POST", "/v1/queries", {"json": COUNT}, True),  # stored: answered by the lean path
        ("POST", "/v1/queries", {"json": UNGROUPED}, True),  # stored too
        ("POST", "/v1/queries", {"json": FRESH}, True),  # never asked: the full path
        ("GET", f"/v1/feeds/{FEEDS[0]}", {}, True),
        ("GET", f"/v1/feeds/{FEEDS[0]}/releases/latest", {"params": {"format": "csv"}}, True),
        ("GET", f"/v1/feeds/{FEEDS[1]}/releases/latest", {}, True),
        ("GET", f"/v1/monitors/{MONITOR}/releases", {}, False),  # stewards and oversight read monitors
        ("GET", f"/v1/releases/{world.release_ids[0]}", {}, False),  # a query, its loss and hash: no values
    ]


def probe(world: World, account: str) -> list[str]:
    """What went wrong when ``account``'s key tried every way of reading, in words ([]: nothing)."""
    problems: list[str] = []
    policies = world.api.state.policies
    subject = subject_of(account)
    roles = {Role(r) for r, _ in policies.roles_of(subject)}
    if roles & DUTY and roles & DATA:
        problems.append(f"{account} holds {sorted(roles)}: a data role beside a duty role")
    if account not in world.ever_duty:
        return problems  # a data reader of the steward's making: see the residual test
    agency = AGENCY[account]
    for obj, action, epsilon in ((f"dataset:{DATASET}", Action.QUERY_RUN, 0.1),
                                 (f"feed:{FEEDS[0]}", Action.FEED_READ, None),
                                 (f"feed:{FEEDS[1]}", Action.FEED_READ, None)):
        decision = policies.check(subject, agency, obj, action, epsilon)
        if decision.allowed:
            problems.append(f"the policy allows {account} {action} on {obj}: {decision.reason}")
    for method, url, kwargs, reads_data in reads(world):
        response = world.call(account, method, url, **kwargs)
        if reads_data and response.status_code not in REFUSED:
            problems.append(f"{account} got {response.status_code} from {method} {url} {kwargs}: {response.text[:160]}")
        leaked = sorted(f for f in world.fingerprints if f in response.text)
        if leaked:
            problems.append(f"{account} got values of a stored answer from {method} {url}: {leaked[:3]}")
    return problems


def fingerprints(api: Api) -> tuple[frozenset[str], tuple[int, ...]]:
    """Values of every stored answer precise enough not to turn up by chance, and the releases' ids."""
    with Session(api.state.db) as session:
        releases = list(session.exec(select(Release)))
    found = {number for release in releases for number in re.findall(r"-?\d+\.\d{6,}", release.result_json)}
    return frozenset(found), tuple(release.id or 0 for release in releases)


# -- setting the scene ------------------------------------------------------------------------------


def fast_commits(engine: Engine) -> None:
    """SQLite without a sync per commit (WAL, synchronous=NORMAL): the search commits thousands of times.

    Durability on power loss is all it gives up; what each commit holds is unchanged.
    """
    if engine.dialect.name == "sqlite":
        event.listen(engine, "checkout", lambda dbapi, *_: dbapi.execute("PRAGMA synchronous=NORMAL"))
        engine.pool.dispose()  # connections made before the listener take it at their next checkout too


@pytest.fixture
def world(tmp_path: Path, dataset_folder: Path) -> Iterator[World]:  # noqa: F811 - the fixture
    with running_api(tmp_path / "state", dataset_folder, feeds_scheduler=False) as started:
        fast_commits(started.state.db)
        fast_commits(started.state.policy_db)
        yield set_scene(started, tmp_path / "more-datasets")


def set_scene(api: Api, datasets: Path) -> World:  # noqa: F811 - api is the started app here
    """Everything the coalition does once because it only widens its reach (see the module's text)."""
    world = World(api, keys={STEWARD: api.keys[STEWARD], OVERSIGHT: api.keys[OVERSIGHT]},
                  ever_duty={STEWARD, OVERSIGHT, DEPUTY})
    for account in (DEPUTY, PUPPET):
        assert world.call(STEWARD, "POST", "/v1/accounts", json={"name": account, "agency": AGENCY[account]}
                          ).status_code == 201
        issued = world.call(STEWARD, "POST", f"/v1/accounts/{account}/keys", json={"expires_in_days": 1})
        assert issued.status_code == 201
        world.keys[account] = issued.json()["api_key"]
    assert world.call(STEWARD, "POST", f"/v1/accounts/{DEPUTY}/roles", json={"role": "steward", "agency": "*"}
                      ).status_code == 200
    for scope in ("analyst", "agency", "dataset", "lifetime"):
        assert world.call(STEWARD, "PUT", "/v1/budgets/caps",
                          json={"dataset": DATASET, "scope": scope, "subject": "*", "epsilon": 100}).status_code == 200
    for subject in (Role.STEWARD.value, Role.OVERSIGHT.value, *(subject_of(a) for a in world.keys)):
        for rule in reading_rules(subject):
            assert world.call(STEWARD, "POST", "/v1/policies", json=rule).status_code == 201
    folder = make_dataset_folder(datasets, metadata={**base_metadata(), "name": SECOND})
    assert world.call(STEWARD, "POST", "/v1/datasets", json={"path": str(folder)}).status_code == 201
    for spec in (COUNT, UNGROUPED, {**FRESH, "epsilon": 0.1}):
        assert api.query(ANALYST, spec).status_code == 200
    start = (datetime.now(timezone.utc) - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    for name, agencies in zip(FEEDS, (["*"], ["health"]), strict=True):
        body = {"name": name, "dataset": DATASET, "schedule": "daily", "releases": 3,
                "specs": [{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}],
                "start": (start - timedelta(minutes=1)).isoformat(), "agencies": agencies}
        assert world.call(STEWARD, "POST", "/v1/feeds", json=body).status_code == 201
        assert world.call(STEWARD, "POST", f"/v1/feeds/{name}/releases").status_code == 201
    assert world.call(STEWARD, "POST", "/v1/monitors", json=monitor(name=MONITOR)).status_code == 201
    assert append(api, batch(0, 2), 0, 2, name=MONITOR).status_code == 201
    world.fingerprints, world.release_ids = fingerprints(api)
    assert len(world.fingerprints) > 10 and len(world.release_ids) >= 4
    return world


# -- the search -------------------------------------------------------------------------------------


@dataclass
class Searched:
    account: str
    depth: int
    states: int = 0
    tried: int = 0
    accepted: int = 0
    probes: int = 0
    problems: list[str] = field(default_factory=list)


def search(world: World, account: str, depth: int,
           probed: dict[tuple[str, bool, frozenset[Row]], list[str]]) -> Searched:
    """Every sequence of at most ``depth`` moves on ``account``, depth first; the coalition probed after each.

    ``probed`` remembers, per account, whether it held a duty role and the rules naming it, what
    its probe found: an account is probed again only when one of those changed.
    """
    out = Searched(account, depth)
    seen: dict[frozenset[Row], int] = {}

    def check(path: list[Move], rows: list[tuple[int, Row]]) -> None:
        for who in (STEWARD, OVERSIGHT, DEPUTY, PUPPET):
            key = (who, who in world.ever_duty, naming(who, rows))
            if key not in probed:
                out.probes += 1
                probed[key] = [f"after {path}: {problem}" for problem in probe(world, who)]
                out.problems += probed[key]

    def visit(path: list[Move]) -> None:
        rows = world.rules()
        state = frozenset(row for _, row in rows)
        if seen.get(state, depth + 1) <= len(path):
            return
        if state not in seen:
            out.states += 1
            check(path, rows)
        seen[state] = len(path)
        if len(path) == depth:
            return
        before = Counter(row for _, row in rows)
        for move in moves_on(account, rows):
            ever = set(world.ever_duty)
            out.tried += 1
            if do(world, move):
                out.accepted += 1
                visit([*path, move])
            elif Counter(row for _, row in world.rules()) != before:
                out.problems.append(f"after {[*path, move]}: a refused move changed the rules")
            world.restore(before)
            world.ever_duty = ever

    visit([])
    return out


@pytest.mark.slow
def test_no_sequence_of_moves_lets_a_steward_or_oversight_account_read(world: World) -> None:
    started = time.monotonic()
    probed: dict[tuple[str, bool, frozenset[Row]], list[str]] = {}
    results = [search(world, account, DEPTH, probed) for account in (STEWARD, OVERSIGHT, PUPPET)]
    took = time.monotonic() - started
    for r in results:
        print(f"separation-of-duties search, moves on {r.account} to depth {r.depth}: {r.tried} tried, "
              f"{r.accepted} accepted, {r.states} states, {r.probes} accounts probed")
    print(f"separation-of-duties search: {world.requests} requests, {took:.1f} s")
    problems = [p for r in results for p in r.problems]
    assert not problems, "\n".join(problems[:40])
    # The search went somewhere: each account through many states, the puppet both ways.
    assert all(r.states >= 20 for r in results)
    assert any(k[0] == PUPPET and k[1] for k in probed) and any(k[0] == PUPPET and not k[1] for k in probed)


# -- what the search found, kept as examples ------------------------------------------------------


def _key_for(api: Api, account: str, agency: str) -> str:  # noqa: F811
    """Create ``account`` and issue its key, both by the steward over HTTP."""
    assert api.post(STEWARD, "/v1/accounts", json={"name": account, "agency": agency}).status_code == 201
    issued = api.post(STEWARD, f"/v1/accounts/{account}/keys", json={"expires_in_days": 1})
    assert issued.status_code == 201
    api.keys[account] = issued.json()["api_key"]
    return api.keys[account]


def _allow_reads(api: Api, account: str) -> None:  # noqa: F811
    for rule in reading_rules(subject_of(account)):
        assert api.post(STEWARD, "/v1/policies", json=rule).status_code == 201


@pytest.mark.parametrize("account, role", [(OVERSIGHT, Role.OVERSIGHT), (STEWARD, Role.STEWARD)])
def test_found_a_revoked_duty_role_left_the_account_free_to_read(api: Api, account: str,  # noqa: F811
                                                                 role: Role) -> None:
    """Found at depth 1 and 2: revoke the role; then an allow rule naming the account decides, or an analyst grant."""
    _allow_reads(api, account)
    assert api.query(ANALYST, COUNT).status_code == 200  # stored: the lean path answers it next time
    assert api.call(STEWARD, "DELETE", f"/v1/accounts/{account}/roles/{role.value}/*").status_code == 200
    assert api.query(account, COUNT).status_code == 403
    assert api.query(account, UNGROUPED).status_code == 403
    with session_scope(api.state.db) as session, pytest.raises(Conflict, match="has held a steward or oversight"):
        admin.grant_role(session, api.state.policies, None, account, Role.ANALYST, "*")
    assert api.query(account, COUNT).status_code == 403


def test_found_a_steward_role_in_another_agency_did_not_deny_reads(api: Api) -> None:  # noqa: F811
    """Found at depth 1: the role's deny rules reach only where it is held, a rule naming the account everywhere."""
    _key_for(api, "steward-elsewhere", "health")
    _allow_reads(api, "steward-elsewhere")
    granted = api.post(STEWARD, "/v1/accounts/steward-elsewhere/roles", json={"role": "steward", "agency": "transport"})
    assert granted.status_code == 200
    assert api.query("steward-elsewhere", UNGROUPED).status_code == 403
    assert api.query("steward-elsewhere", COUNT).status_code == 403


def test_found_a_steward_made_itself_an_analyst_through_a_deputy(api: Api) -> None:  # noqa: F811
    """Found at depth 2, the deputy acting: it revokes the steward's role, then grants it analyst."""
    _key_for(api, DEPUTY, "civic-office")
    assert api.post(STEWARD, f"/v1/accounts/{DEPUTY}/roles", json={"role": "steward", "agency": "*"}).status_code == 200
    assert api.call(DEPUTY, "DELETE", f"/v1/accounts/{STEWARD}/roles/steward/*").status_code == 200
    refused = api.post(DEPUTY, f"/v1/accounts/{STEWARD}/roles", json={"role": "analyst", "agency": "civic-office"})
    assert refused.status_code == 409 and "has held a steward or oversight role" in refused.json()["detail"]
    assert api.query(STEWARD, COUNT).status_code == 403


def test_a_duty_grant_writes_deny_rules_naming_the_account_that_outlast_the_role(api: Api) -> None:  # noqa: F811
    policies = api.state.policies
    subject = subject_of(OVERSIGHT)
    assert all(rule in policies.rules() for rule in admin.duty_denials(subject))  # written with the demo's grant
    # An older state: a steward granted before the deny rules existed gets them when its role is revoked.
    _key_for(api, "old-steward", "civic-office")
    policies.grant(subject_of("old-steward"), Role.STEWARD, "*")
    assert not any(rule in policies.rules() for rule in admin.duty_denials(subject_of("old-steward")))
    assert api.call(STEWARD, "DELETE", "/v1/accounts/old-steward/roles/steward/*").status_code == 200
    assert all(rule in policies.rules() for rule in admin.duty_denials(subject_of("old-steward")))
    refused = api.post(STEWARD, "/v1/accounts/old-steward/roles", json={"role": "feed_consumer", "agency": "health"})
    assert refused.status_code == 409
    # A data reader may still become a steward once its data role is gone (and then reads nothing).
    assert api.call(STEWARD, "DELETE", f"/v1/accounts/{ANALYST}/roles/analyst/health").status_code == 200
    assert api.post(STEWARD, f"/v1/accounts/{ANALYST}/roles", json={"role": "steward", "agency": "health"}
                    ).status_code == 200
    assert api.query(ANALYST, COUNT).status_code == 403


def test_residual_a_steward_can_keep_the_key_of_an_analyst_it_made(api: Api) -> None:  # noqa: F811
    """Not a hole this module closes (see its text): the account is an analyst, and the log says who made it."""
    _key_for(api, "ana-made", "health")
    assert api.post(STEWARD, "/v1/accounts/ana-made/roles", json={"role": "analyst", "agency": "health"}
                    ).status_code == 200
    assert api.query("ana-made", COUNT).status_code == 200
    with Session(api.state.db) as session:
        entries = list(session.exec(select(AuditEntry).where(AuditEntry.target == "ana-made")))
    made_by = {entry.action: entry.account for entry in entries}
    assert made_by == {"account.create": STEWARD, "key.create": STEWARD, "role.grant": STEWARD}, made_by
    policies = api.state.policies
    assert {Role(r) for r, _ in policies.roles_of(subject_of("ana-made"))} == {Role.ANALYST}
    assert not any(rule in policies.rules() for rule in admin.duty_denials(subject_of("ana-made")))
