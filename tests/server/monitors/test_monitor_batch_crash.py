"""A failed and a killed monitor batch leave the monitor's state as before the batch (issue 19).

A monitor (daily counts per channel over 365 days) has one committed batch. A second
batch -- a year of events, about a million rows, so it takes a while -- is appended by
``civicdp monitors batch`` in a process of its own, and that process either fails while
computing (the driver breaks ``step_rows``, after the attempt's state files are written) or
is killed with SIGKILL, once its batch file has appeared in the monitor's folder or once
its state files (per-person use and exact leaves) have. Read afterwards from the test's
process, the monitor is as before: the committed batches, nodes, releases and progress,
the budgets, the audit log's batch entries, and the files the committed batch's row names
(the batch, per-person use and leaves, byte for byte). A killed attempt's files stay
behind; the next batch removes them, and a retry in a fresh process is accepted with the
same result as the same batch appended to a twin monitor that nothing interrupted: the
same batch, steps, nodes, per-person use and exact leaves (released values are noisy, so
only their steps are compared).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from civicdp.server.monitors.batch_files import Attempt, load_state, remove_stale
from civicdp.server.monitors.service import MonitorService
from civicdp.server.services import admin
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import make_engine, reader, session_scope
from civicdp.server.state.models import AuditEntry, Budget
from civicdp.server.state.monitor_models import Monitor, MonitorAlert, MonitorBatch, MonitorNode, MonitorRelease
from civicdp.server.state.settings import Settings
from tests.conftest import events_frame
from tests.server.api_fixtures import DATASET, make_dataset_folder, prepare_state, settings_for
from tests.server.http.test_workers import _env
from tests.server.monitors.test_monitors import DAY, START, monitor
from tests.server.racing import ROOT

NAME = "daily-channel"
HORIZON = 365
PEOPLE = 1500  # x 2 events a day x 364 days: about 1.1 million rows, a second or two to compute
OPERATOR = Caller(account_id=None, name="operator", agency="*")  # type: ignore[arg-type]
CLI = "from civicdp.server.entry import main; main()"
#: The driver of a batch that fails while computing: after the attempt's state files are written.
FAILING = ("import civicdp.server.monitors.batch_files as files\n"
           "def broken(*args, **kwargs):\n"
           "    raise RuntimeError('disk full')\n"
           "files.step_rows = broken\n" + CLI)


def events(first_day: int, days: int, people: int) -> bytes:
    """Parquet of ``people`` people's events, two a day each, on days [first_day, first_day + days)."""
    rng = np.random.default_rng(first_day)
    n = days * people * 2
    day = np.repeat(np.arange(first_day, first_day + days), people * 2)
    person = np.tile(np.repeat(np.arange(people), 2), days)
    times = (np.datetime64(START, "us") + day.astype("timedelta64[D]").astype("timedelta64[us]")
             + rng.integers(0, 86_399_000_000, n).astype("timedelta64[us]"))
    frame = pl.DataFrame({
        "event_id": np.arange(n, dtype=np.int64), "person_id": person.astype(np.int64), "service": ["A"] * n,
        "channel": np.array(["counter", "web", "mobile"])[person % 3], "request_time": times,
        "waiting_minutes": rng.uniform(0, 100, n), "satisfaction": np.full(n, 3, dtype=np.int64),
        "remark": ["r"] * n, "score": np.zeros(n)}).cast(dict(events_frame(people=1).schema))
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def second_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The big batch (days 1 .. 364), written once for every test of the module."""
    path = tmp_path_factory.mktemp("batches") / "year.parquet"
    path.write_bytes(events(1, HORIZON - 1, PEOPLE))
    return path


def monitor_with_one_batch(root: Path) -> Settings:
    """A state with the monitor (365 daily steps, no alert rules) and its first batch (day 0) committed."""
    settings = settings_for(root / "state", None, feeds_scheduler=False)
    prepare_state(settings, make_dataset_folder(root / "datasets"))
    state = build_state(settings)
    try:
        with session_scope(state.db) as session:
            admin.set_cap(session, None, DATASET, "dataset", "*", 100.0)
            admin.set_cap(session, None, DATASET, "lifetime", "*", 100.0)
        service = MonitorService(state.db, settings.data_dir, state.caps)
        service.define(OPERATOR, monitor(rules=[], horizon=HORIZON, epsilon=10.0))
        service.append(OPERATOR, NAME, events(0, 1, 40), START, START + DAY)
    finally:
        state.close()
    return settings


def batch_command(settings: Settings, parquet: Path, script: str = CLI) -> list[str]:
    end = START + HORIZON * DAY
    return [sys.executable, "-c", script, "monitors", "batch", NAME, str(parquet),
            "--start", (START + DAY).isoformat(), "--end", end.isoformat()]


def run_batch(settings: Settings, parquet: Path, script: str = CLI) -> subprocess.CompletedProcess[str]:
    return subprocess.run(batch_command(settings, parquet, script), cwd=ROOT, env=_env(settings.data_dir, None),
                          capture_output=True, text=True, timeout=300)


def folder_of(settings: Settings) -> Path:
    return settings.data_dir / "monitors" / "1"


def batches_committed(settings: Settings) -> int:
    db = make_engine(settings.state_url)
    try:
        with Session(reader(db)) as session:
            return int(session.execute(select(func.count()).select_from(MonitorBatch)).scalar_one())
    finally:
        db.dispose()


def killed_once(settings: Settings, parquet: Path, suffix: str) -> list[str]:
    """Start the batch, SIGKILL it once an attempt file ending in ``suffix`` appears; the files it left."""
    folder = folder_of(settings)
    with (settings.data_dir.parent / "batch.log").open("wb") as log:
        process = subprocess.Popen(batch_command(settings, parquet), cwd=ROOT, env=_env(settings.data_dir, None),
                                   stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith("batch-000002-") and p.name.endswith(suffix) for p in folder.iterdir()):
            assert process.poll() is None, "the batch ended before it was killed"
            assert time.monotonic() < deadline, "the batch's files never appeared"
            time.sleep(0.002)
        process.send_signal(signal.SIGSTOP)  # held still while we look: not committed yet?
        assert batches_committed(settings) == 1, "the batch committed before it could be killed: make it bigger"
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return sorted(p.name for p in folder.iterdir() if "batch-000002-" in p.name)


def _arrays(leaves: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    return {name: vectors.tolist() for name, vectors in sorted(leaves.items())}


def monitor_state(settings: Settings) -> dict[str, Any]:
    """Everything a batch changes, read afresh: rows, budgets, audit entries and the committed files."""
    db = make_engine(settings.state_url)
    try:
        with Session(reader(db)) as session:
            row = session.execute(select(Monitor).where(Monitor.name == NAME)).scalar_one()
            batches = session.execute(select(MonitorBatch).order_by(MonitorBatch.seq)).scalars().all()
            state: dict[str, Any] = {
                "monitor": (row.covered_until, row.released_steps, row.active),
                "batches": [(b.seq, b.start, b.end, b.rows, b.path, b.sha256) for b in batches],
                "nodes": sorted((n.level, n.index, n.values_json)
                                for n in session.execute(select(MonitorNode)).scalars()),
                "releases": sorted((r.step, r.rows_json) for r in session.execute(select(MonitorRelease)).scalars()),
                "alerts": int(session.execute(select(func.count()).select_from(MonitorAlert)).scalar_one()),
                "budgets": sorted(session.execute(select(Budget.scope, Budget.subject, Budget.period,
                                                         Budget.spent_micro)).all()),
                "batch entries": [json.loads(text)["detail"] for text in session.execute(
                    select(AuditEntry.entry_json).where(AuditEntry.entry_json.like('%"event":"monitor.batch"%'))
                    .order_by(AuditEntry.seq)).scalars()],
            }
            used, leaves = load_state(batches[-1])
    finally:
        db.dispose()
    state["used"], state["leaves"] = used, _arrays(leaves)
    state["files"] = {}
    for batch in state["batches"]:
        attempt = Attempt(Path(batch[4]))
        for path in (attempt.batch, attempt.used, attempt.leaves):
            state["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def deterministic(state: dict[str, Any]) -> dict[str, Any]:
    """What does not depend on the noise or on an attempt's file name: to compare with the twin monitor."""
    return {"monitor": state["monitor"], "batches": [b[:4] + b[5:] for b in state["batches"]],
            "nodes": [n[:2] for n in state["nodes"]], "releases": [r[0] for r in state["releases"]],
            "alerts": state["alerts"], "budgets": state["budgets"], "used": state["used"], "leaves": state["leaves"],
            "batch entries": [{k: v for k, v in d.items() if k != "releases"} | {"steps": [r["step"] for r in
                              d["releases"]]} for d in state["batch entries"]]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, second_batch: Path) -> tuple[str, dict[str, Any]]:
    """The twin: the same monitor and batches, appended without failure or kill; its output and state."""
    settings = monitor_with_one_batch(tmp_path_factory.mktemp("twin"))
    appended = run_batch(settings, second_batch)
    assert appended.returncode == 0, appended.stdout + appended.stderr
    return appended.stdout, deterministic(monitor_state(settings))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["failed", "killed-after-its-batch-file", "killed-after-its-state-files"])
def test_a_failed_or_killed_batch_leaves_the_monitor_as_before_and_a_retry_succeeds(
        tmp_path: Path, second_batch: Path, uninterrupted: tuple[str, dict[str, Any]], how: str) -> None:
    settings = monitor_with_one_batch(tmp_path)
    before = monitor_state(settings)
    assert len(before["batches"]) == 1 and before["releases"] and before["used"]

    if how == "failed":
        failed = run_batch(settings, second_batch, FAILING)
        assert failed.returncode != 0 and "disk full" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
        left = sorted(p.name for p in folder_of(settings).iterdir() if "batch-000002-" in p.name)
        assert left == []  # a failure removes its own files
    else:
        suffix = ".parquet" if how == "killed-after-its-batch-file" else ".leaves.npz"
        left = killed_once(settings, second_batch, suffix)
        assert any(name.endswith(suffix) and not name.startswith(".") for name in left), left

    # Read afresh in this process: the monitor is as before the batch, whatever the attempt left.
    assert monitor_state(settings) == before
    named = set(before["files"])
    assert not named & set(left)

    # A retry, in a fresh process, is accepted as if nothing had happened, and the stale files are gone.
    output, twin = uninterrupted
    retried = run_batch(settings, second_batch)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert retried.stdout == output  # batch 2, its rows, the steps it released
    after = monitor_state(settings)
    assert deterministic(after) == twin
    assert sorted(p.name for p in folder_of(settings).iterdir()) == sorted(after["files"]), \
        "files of the interrupted attempt stayed behind"


def test_only_attempts_at_a_committed_seq_are_stale(tmp_path: Path) -> None:
    """What another process may still be writing (the next ``seq``) is left alone; the rest goes."""
    committed = Attempt(tmp_path / "batch-000001-aaaaaaaaaaaa.parquet")
    killed = Attempt(tmp_path / "batch-000001-bbbbbbbbbbbb.parquet")  # lost to the retry that committed seq 1
    live = Attempt(tmp_path / "batch-000002-cccccccccccc.parquet")  # perhaps another process's, computing now
    half_written = tmp_path / ".batch-000001-bbbbbbbbbbbb.leaves.npz-x1y2z3.tmp"
    unrelated = tmp_path / "notes.txt"
    for attempt in (committed, killed, live):
        for path in (attempt.batch, attempt.used, attempt.leaves):
            path.write_bytes(b"x")
    half_written.write_bytes(b"x")
    unrelated.write_bytes(b"x")
    removed = remove_stale(tmp_path, [(1, str(committed.batch))])
    assert sorted(p.name for p in removed) == sorted([killed.batch.name, killed.used.name, killed.leaves.name,
                                                      half_written.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for a in (committed, live) for p in (a.batch, a.used, a.leaves)] + [unrelated.name])
    assert remove_stale(tmp_path / "missing", []) == []
