"""``kill -9`` under a load of spending queries: the state a restart finds tells one story (issue 15).

A server with two workers (``civicdp serve --workers 2``) answers fresh questions (each
one asked once, so each one is charged) from several client threads until the analyst's
budget is spent. Mid-load, either one worker is killed with SIGKILL (the supervisor starts
another; the load goes on), or the whole server is (supervisor and workers at once). The
server is then started again on the same state, with a computation timeout so short that
the claims the dead processes left are abandoned at start-up, and spends the rest of the
budget. Then, read from the database and from a fresh export:

- every charge's audit entry (``query.run``, allowed) has exactly one outcome entry --
  released, failed or abandoned -- no claim is left, and the ledger holds exactly those
  charges: each budget's ledger entries add up to the losses of the entries that charged
  it, and to its ``spent_micro``; the server's own reconciliation finds nothing;
- every answer a client received (2xx) has its release entry, naming its release and the
  hash of the very bytes the client was sent, and its charge;
- the entries are numbered without a gap, up to the log's head;
- ``civicdp audit export`` of the restarted server passes ``civicdp audit verify`` and
  ``civicdp audit reconcile`` against the database;
- no budget is spent beyond its cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import select
from sqlmodel import Session

from civicdp.queries.request import parse_request
from civicdp.server.auditlog.reconcile import reconcile_database
from civicdp.server.state.db import make_engine, reader
from civicdp.server.state.models import AuditEntry, AuditHead, Budget, Computation, LedgerEntry, Release
from tests.server.api_fixtures import (
    ANALYST, MICRO, OVERSIGHT, count_query, make_dataset_folder, prepare_state, settings_for, wait_until_serving,
)
from tests.server.http.test_workers import _env, _free_port
from tests.server.racing import ROOT

CLIENTS = 6
#: Each question's epsilon: 0.02 and a millionth per question asked, so no two are alike (none is cached).
#: The analyst's monthly cap (1.0) is spent after about 50 answers.
EPSILON = 0.02
#: Checkpoints are signed every so many entries, so kills may also land while one is being signed.
CHECKPOINT_EVERY = "25"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None


@contextmanager
def serving(data_dir: Path, database_url: str | None, workers: int,
            **settings: str) -> Iterator[tuple[str, subprocess.Popen[bytes], int]]:
    """``civicdp serve --workers N`` with extra ``CIVICDP_*`` settings; URL, process and port.

    Stopped with SIGTERM afterwards, if the test has not killed it already.
    """
    port = _free_port()
    env = _env(data_dir, database_url)
    env.update(CIVICDP_CHECKPOINT_EVERY_ENTRIES=CHECKPOINT_EVERY,
               **{f"CIVICDP_{name.upper()}": value for name, value in settings.items()})
    log = data_dir.parent / f"serve-{port}.log"
    with log.open("wb") as errors:
        process = subprocess.Popen([sys.executable, "-c", "from civicdp.server.entry import main; main()", "serve",
                                    "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, 120, log=log)
        yield url, process, port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def workers_of(supervisor: int, port: int) -> list[psutil.Process]:
    """The supervisor's children that hold the listening socket: its workers."""
    found = []
    for child in psutil.Process(supervisor).children():
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in child.net_connections("tcp")):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def connections_to(worker: psutil.Process, port: int) -> int:
    """How many client connections ``worker`` holds open (accepted on ``port``)."""
    try:
        return sum(1 for c in worker.net_connections("tcp")
                   if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
    except psutil.NoSuchProcess:
        return 0


@dataclass
class Load:
    """Client threads asking fresh questions until stopped, or until the budget refuses them all."""

    url: str
    key: str
    numbers: Iterator[int]
    answers: list[dict[str, Any]] = field(default_factory=list)  # every 2xx body
    refused: int = 0  # 409: the budget has no room
    errors: list[str] = field(default_factory=list)  # no answer at all (connection broken, refused...)
    unexpected: list[tuple[int, str]] = field(default_factory=list)
    #: Per client thread: the local port of its connection (as of its last answer) and the hash of the
    #: question it is asking now, to tell which questions a worker is busy with.
    asking: dict[int, tuple[int | None, str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def _client(self, index: int) -> None:
        http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)
        refused_in_a_row = 0
        port: int | None = None
        try:
            while not self.stop.is_set() and refused_in_a_row < 3:
                with self.lock:
                    number = next(self.numbers)
                spec = count_query(epsilon=round(EPSILON + number / MICRO, 6))
                self.asking[index] = (port, query_hash(spec))
                try:
                    response = http.post("/v1/queries", json=spec)
                    port = response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
                except httpx.HTTPError as exc:
                    port = None
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    http.close()  # its connection may be to a dead worker
                    http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                        timeout=60)
                    time.sleep(0.05)
                    continue
                with self.lock:
                    if response.status_code == 200:
                        self.answers.append(response.json())
                        refused_in_a_row = 0
                    elif response.status_code == 409:
                        self.refused += 1
                        refused_in_a_row += 1
                    else:
                        self.unexpected.append((response.status_code, response.text[:500]))
        finally:
            http.close()

    def wait_for(self, answers: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while len(self.answers) < answers:
            assert any(t.is_alive() for t in self.threads), "the clients stopped early"
            assert time.monotonic() < deadline, f"only {len(self.answers)} answers in {seconds} s"
            time.sleep(0.01)

    def join(self, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "the clients did not finish"


def query_hash(spec: dict[str, Any]) -> str:
    """The hash a question is claimed under (``QueryService._query_key``)."""
    return hashlib.sha256(parse_request(spec).canonical().encode()).hexdigest()


def claimed_hashes(state_url: str) -> set[str]:
    """The questions charged and still being computed (their ``Computation`` rows)."""
    db = make_engine(state_url)
    try:
        with Session(reader(db)) as session:  # no write lock: the frozen processes may hold it
            return set(session.execute(select(Computation.query_hash)).scalars())
    finally:
        db.dispose()


def kill_while_computing(frozen: list[int], busy_with: Callable[[], set[str]], state_url: str,
                         kill: Callable[[], None], seconds: float = 60) -> set[str]:
    """SIGKILL once the ``frozen`` processes, stopped (SIGSTOP), hold a charged question still computing.

    ``busy_with`` names the questions they may be computing; the claims of the database that
    are among them are what the kill leaves charged and unanswered (returned). Until there is
    one, the processes go on (SIGCONT) and are stopped again a moment later.
    """
    deadline = time.monotonic() + seconds
    while True:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            left = claimed_hashes(state_url) & busy_with()
            if left:
                kill()
                return left
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)  # killed or not: never left stopped
        assert time.monotonic() < deadline, "never caught a worker with a charged question in hand"
        time.sleep(0.005)


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from civicdp.server.entry import main; main()", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(command: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = command.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        command.kill()
        out, err = command.communicate()
    return command.returncode, out, err


def _result_hash(answer: dict[str, Any]) -> str:
    """The SHA-256 of the stored document behind an answer, rebuilt from what the client was sent.

    The document is the answer's fields as the engine gave them (``QueryService._compute``); the
    response adds only ``rho: null`` to a pure-DP loss.
    """
    body = {name: answer[name] for name in ("columns", "rows", "loss", "contributions", "confidence",
                                            "mechanisms", "notes", "tables")}
    body["loss"] = {k: v for k, v in body["loss"].items() if not (k == "rho" and v is None)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def check_state(state_url: str, answers: list[dict[str, Any]]) -> tuple[dict[str, int], set[str]]:
    """Everything the module docstring promises of the state, read from the database.

    Returns counts of entries and outcomes, and the questions whose computations were abandoned.
    """
    db = make_engine(state_url)
    try:
        assert reconcile_database(db) == [], "the server's reconciliation disagrees"
        with Session(reader(db)) as session:
            rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json).order_by(AuditEntry.seq)).all()
            head = session.get(AuditHead, 1)
            budgets = session.execute(select(Budget)).scalars().all()
            ledger = session.execute(select(LedgerEntry)).scalars().all()
            releases = {r.id: r for r in session.execute(select(Release)).scalars()}
            claims = session.execute(select(Computation)).scalars().all()
    finally:
        db.dispose()

    # Numbered without a gap, up to the head.
    assert head is not None and [seq for seq, _ in rows] == list(range(head.size))
    entries = [json.loads(text) for _, text in rows]

    # Every charge has exactly one outcome; nothing is left being computed.
    charges = {e["detail"]["computation_id"]: e for e in entries
               if e["action"] == "query.run" and e["decision"] == "allowed"}
    outcomes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        if (e["action"], e["decision"]) in (("query.release", "released"), ("query.failed", "failed"),
                                            ("query.abandoned", "failed")):
            outcomes[e["detail"]["computation_id"]].append(e)
    assert claims == [], f"claims left after the restart: {[c.id for c in claims]}"
    assert set(outcomes) == set(charges), "outcomes without a charge, or charges without an outcome"
    assert all(len(o) == 1 for o in outcomes.values()), "a computation with two outcomes"

    # The ledger holds exactly the audited charges: per budget, in number and in amount.
    audited: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for entry in charges.values():
        for item in entry["detail"]["ledger"]:
            audited[(item["scope"], item["subject"], item["period"])].append(entry["detail"]["loss_micro"])
    by_budget: dict[int, list[int]] = defaultdict(list)
    for row in ledger:
        by_budget[row.budget_id].append(row.amount_micro)
    for budget in budgets:
        key = (budget.scope, budget.subject, budget.period)
        assert sorted(by_budget[budget.id]) == sorted(audited[key]), f"budget {key}: ledger != audited losses"
        assert budget.spent_micro == sum(audited[key]), f"budget {key}: spent != audited losses"
        assert budget.spent_micro <= budget.cap_micro, f"budget {key} overspent"
    assert sum(len(v) for v in audited.values()) == len(ledger)

    # Every release is one released outcome, and its charge is linked to it.
    released = {o[0]["detail"]["release_id"]: o[0] for o in outcomes.values() if o[0]["action"] == "query.release"}
    assert set(released) == set(releases)
    linked = Counter(row.release_id for row in ledger if row.release_id is not None)
    assert linked == {release_id: len(charges[e["detail"]["computation_id"]]["detail"]["ledger"])
                      for release_id, e in released.items()}

    # Every answer a client received has its entries: the release, its hash, and its charge.
    assert len({a["release_id"] for a in answers}) == len(answers), "one release answered twice as fresh"
    for answer in answers:
        assert answer["cached"] is False
        entry = released.get(answer["release_id"])
        assert entry is not None, f"answer of release {answer['release_id']} has no release entry"
        assert entry["detail"]["result_hash"] == _result_hash(answer) == releases[answer["release_id"]].result_hash
        charge = charges[entry["detail"]["computation_id"]]["detail"]
        assert abs(answer["charged"]["epsilon"] * MICRO - charge["loss_micro"]) <= 1
    kinds = Counter(o[0]["action"] for o in outcomes.values())
    abandoned = {o[0]["detail"]["query_hash"] for o in outcomes.values() if o[0]["action"] == "query.abandoned"}
    return {"entries": head.size, "charged": len(charges), "released": kinds["query.release"],
            "failed": kinds["query.failed"], "abandoned": kinds["query.abandoned"]}, abandoned


def export_verify_reconcile(url: str, key: str, state_url: str, data_dir: Path, database_url: str | None,
                            folder: Path) -> None:
    """``civicdp audit export``, ``verify`` and ``reconcile``, as oversight would run them."""
    env = _env(data_dir, database_url)
    bundle = folder / "export.zip"
    public = httpx.get(f"{url}/v1/audit/public-key", timeout=30).text.strip()
    code, out, err = _finished(_cli("audit", "export", str(bundle), "--url", url, "--api-key", key, env=env))
    assert code == 0, out + err
    verifying = _cli("audit", "verify", str(bundle), "--public-key", public, env=env)  # the two at once
    reconciling = _cli("audit", "reconcile", str(bundle), "--public-key", public, "--database-url", state_url,
                       env=env)
    code, out, err = _finished(verifying)
    assert code == 0, out + err
    code, out, err = _finished(reconciling)
    assert code == 0 and "OK:" in out, out + err


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["one-worker", "whole-server"])
def test_killed_under_spending_load_the_restarted_state_reconciles(
        tmp_path: Path, database_url: str | None, kill: str) -> None:
    settings = settings_for(tmp_path / "state", database_url, feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    data_dir, state_url = settings.data_dir, settings.state_url
    numbers = itertools.count()
    with serving(data_dir, database_url, workers=2) as (url, process, port):
        load = Load(url, keys[ANALYST], numbers).start()
        load.wait_for(15)
        if kill == "one-worker":
            workers = workers_of(process.pid, port)
            assert len(workers) == 2, workers
            victim = max(workers, key=lambda w: connections_to(w, port))

            def victims_questions() -> set[str]:  # those asked over the victim's connections
                ports = {c.raddr.port for c in victim.net_connections("tcp")
                         if c.raddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED}
                return {asked for client_port, asked in list(load.asking.values()) if client_port in ports}

            left = kill_while_computing([victim.pid], victims_questions, state_url,
                                        lambda: victim.send_signal(signal.SIGKILL))
            victim.wait(10)
            deadline = time.monotonic() + 60  # the supervisor starts another worker
            while len([w for w in workers_of(process.pid, port) if w.pid != victim.pid]) < 2:
                assert time.monotonic() < deadline, "no worker replaced the killed one"
                time.sleep(0.1)
            load.join()  # to the end of the budget, served by the survivor and the replacement
        else:
            everyone = [process.pid, *(w.pid for w in workers_of(process.pid, port))]
            left = kill_while_computing(everyone, lambda: {asked for _, asked in list(load.asking.values())},
                                        state_url, lambda: os.killpg(process.pid, signal.SIGKILL))
            process.communicate(timeout=30)  # supervisor and workers gone: only what was committed remains
            load.stop.set()
            load.join()
    first = load
    assert first.unexpected == [], first.unexpected[:3]

    # Started again on the same state: the dead processes' claims are abandoned at once.
    with serving(data_dir, database_url, workers=2, computation_timeout_minutes="0.000001") as (url, _, _):
        ready = httpx.get(f"{url}/v1/ready", timeout=30)
        assert ready.json()["status"] == "ready", ready.text  # no integrity alarm: nothing held
        second = Load(url, keys[ANALYST], numbers).start()
        second.join()  # the rest of the budget
        assert second.unexpected == [] and second.errors == [], (second.unexpected[:3], second.errors[:3])
        assert second.refused >= 3  # it ends at the cap
        ready = httpx.get(f"{url}/v1/ready", timeout=30)
        assert ready.json()["status"] == "ready", ready.text
        export_verify_reconcile(url, keys[OVERSIGHT], state_url, data_dir, database_url, tmp_path)
    counts, abandoned = check_state(state_url, first.answers + second.answers)
    assert left <= abandoned  # what the kill interrupted was charged, and its charge stays
    print(f"{kill}: {len(first.answers)} + {len(second.answers)} answers, {len(first.errors)} without an answer, "
          f"{counts}")
