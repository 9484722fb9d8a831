"""Preparing registered versions: claimed by one worker, built, switched in, old files removed.

A registration through the CLI or the API leaves a ``pending`` row
(:mod:`civicdp.server.state.preparations`). Every server process runs a :class:`Preparer`
thread that claims pending rows with a conditional update, so one process prepares each
version however many workers serve the state; the claim carries a heartbeat, and a row
whose worker stopped beating for :data:`STALE_AFTER` is claimed again by another. The CLI
prepares its own registration before it returns (:func:`prepare_now`), or follows the
worker that claimed it first.

When the snapshot is complete the version becomes the served one in the same
transaction that marks it ``ready`` and writes the ``dataset.prepared`` audit entry. The
version served before stays served until then, and its snapshot is removed once no
query can still be reading it: ``prepared_keep_seconds`` after the switch, and not while
a charged computation on that version is running. A failure is stored (``failed``, its
text naming the table and cause but no data) and audited as ``dataset.prepare``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.queries.metadata import parse_metadata
from civicdp.queries.polars_rank_cache import remove_on_demand
from civicdp.queries.polars_snapshots import MANIFEST, snapshot_folder
from civicdp.server.auditlog.append import record
from civicdp.server.intake import snapshot
from civicdp.server.state import preparations, registry
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import Conflict
from civicdp.server.state.models import Computation, Dataset, DatasetPreparation, utcnow
from civicdp.server.state.preparations import FAILED, OPEN, PENDING, PREPARING, READY, REMOVED, SUPERSEDED, aware
from civicdp.server.state.settings import Settings

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(seconds=60)  # a claim not renewed for this long is taken over
HEARTBEAT_SECONDS = 10.0
POLL_SECONDS = 2.0
_REPORT_SECONDS = 1.0  # progress written to the row at most this often (and at each table)

#: What a CLI sees of a preparation: (table, tables done, tables in all, steps done in it, its steps).
Progress = snapshot.Progress


def worker_name() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim(db: DbEngine, worker: str, ident: int | None = None) -> DatasetPreparation | None:
    """Claim the oldest pending preparation (or ``ident``), or one whose worker stopped; None if none."""
    cutoff = utcnow() - STALE_AFTER
    with Session(reader(db)) as session:
        query = select(DatasetPreparation).where(DatasetPreparation.state.in_(OPEN))  # type: ignore[attr-defined]
        if ident is not None:
            query = query.where(DatasetPreparation.id == ident)
        # Compared in Python: SQLite keeps datetimes as text without their zone.
        candidates = [(p.id, p.state, p.worker, p.heartbeat_at) for p in session.exec(query.order_by(
            DatasetPreparation.id)) if p.state == PENDING or (aware(p.heartbeat_at) or cutoff) < cutoff]
    for pid, state, owner, beat in candidates:
        now = utcnow()
        with session_scope(db) as session:
            taken = session.execute(update(DatasetPreparation).where(
                DatasetPreparation.id == pid, DatasetPreparation.state == state,
                DatasetPreparation.worker == owner if owner is not None else DatasetPreparation.worker.is_(None),  # type: ignore[union-attr]
                DatasetPreparation.heartbeat_at == beat if beat is not None
                else DatasetPreparation.heartbeat_at.is_(None))  # type: ignore[union-attr]
                .values(state=PREPARING, worker=worker, heartbeat_at=now, started_at=now, tables_done=0,
                        current_table=None, error=None))
            if getattr(taken, "rowcount", 0) == 1:
                claimed = session.get(DatasetPreparation, pid)
                session.expunge(claimed)
                if state == PREPARING:
                    log.warning("preparation %s of %s taken over from %s, which stopped", pid, claimed.dataset, owner)
                return claimed
    return None


def _mine(ident: int, worker: str):  # type: ignore[no-untyped-def]
    return update(DatasetPreparation).where(DatasetPreparation.id == ident, DatasetPreparation.state == PREPARING,
                                            DatasetPreparation.worker == worker)


def _still_mine(db: DbEngine, ident: int, worker: str, **values: object) -> bool:
    with session_scope(db) as session:
        done = session.execute(_mine(ident, worker).values(heartbeat_at=utcnow(), **values))
    return getattr(done, "rowcount", 0) == 1


class _Heartbeat:
    """Renews a claim every HEARTBEAT_SECONDS; ``lost`` once it could not (given up, or taken over)."""

    def __init__(self, db: DbEngine, ident: int, worker: str) -> None:
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(db, ident, worker), daemon=True,
                                        name=f"civicdp-prepare-heartbeat-{ident}")
        self._thread.start()

    def _run(self, db: DbEngine, ident: int, worker: str) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not _still_mine(db, ident, worker):
                    self.lost = True
                    return
            except Exception:  # the database is away for a moment: try again at the next beat
                log.warning("could not renew the claim of preparation %s", ident, exc_info=True)

    def stop(self) -> None:
        self._stop.set()


def run(db: DbEngine, root: Path, keep: timedelta, claimed: DatasetPreparation, worker: str,
        progress: Progress | None = None) -> str:
    """Build a claimed preparation and serve it; its final state (``ready``, ``failed`` or ``superseded``)."""
    ident, name = int(claimed.id), claimed.dataset  # type: ignore[arg-type]
    metadata = parse_metadata(json.loads(claimed.metadata_json))
    started, beat = time.monotonic(), _Heartbeat(db, ident, worker)
    reported = {"at": 0.0, "table": -1}

    def report(table: str, done: int, total: int, step: int, steps: int) -> None:
        if beat.lost:
            raise snapshot.Stopped
        now = time.monotonic()
        if done != reported["table"] or now - reported["at"] >= _REPORT_SECONDS:
            if not _still_mine(db, ident, worker, tables_done=done, current_table=table):
                raise snapshot.Stopped
            reported.update(at=now, table=done)
        if progress is not None:
            progress(table, done, total, step, steps)

    try:
        _refuse_inside(root, Path(claimed.path))
        manifest = snapshot.build_snapshot(Path(claimed.path), metadata, root, ident, worker.rsplit(":", 1)[-1],
                                           report)
    except snapshot.Stopped:
        return SUPERSEDED
    except (snapshot.Failed, Conflict) as failed:
        log.warning("preparation %s of %s version %s failed: %s", ident, name, claimed.version, failed,
                    exc_info=failed.__cause__ is not None)
        return _fail(db, root, claimed, worker, str(failed))
    finally:
        beat.stop()
    try:
        replaced = _switch(db, claimed, worker, manifest, time.monotonic() - started)
    except Conflict as refused:
        return _fail(db, root, claimed, worker, str(refused))
    if replaced is None:
        return SUPERSEDED  # a newer registration came first: the sweep removes this snapshot
    old_path, old_tables = replaced
    if old_path is not None:
        remove_on_demand(root, Path(old_path), old_tables)  # ranked at queries before this version existed
    sweep(db, root, keep)
    return READY


def _refuse_inside(root: Path, folder: Path) -> None:
    if root.resolve().is_relative_to(folder.resolve()):
        raise snapshot.Failed(f"the prepared folder {root} (CIVICDP_PREPARED_DIR) is inside the dataset folder "
                              f"{folder}, which is the steward's and is never written to: set CIVICDP_PREPARED_DIR "
                              "to a folder of the server's state")


def _switch(db: DbEngine, claimed: DatasetPreparation, worker: str, manifest: dict,
            seconds: float) -> tuple[str | None, list[str]] | None:
    """Serve the prepared version (one transaction); the folder and tables of the row it replaced, or
    None if the preparation was given up meanwhile."""
    with session_scope(db) as session:
        prep = session.get(DatasetPreparation, claimed.id)
        if prep is None or prep.state != PREPARING or prep.worker != worker:
            return None
        before = session.exec(select(Dataset).where(Dataset.name == prep.dataset)).first()
        old = (before.path, list(registry.metadata_of(before).tables)) if before is not None else (None, [])
        _, replaced = registry.serve(session, prep)
        now = utcnow()
        session.execute(update(DatasetPreparation).where(
            DatasetPreparation.dataset == prep.dataset, DatasetPreparation.id != prep.id,
            DatasetPreparation.state == READY).values(state=SUPERSEDED, superseded_at=now))
        prep.state, prep.finished_at, prep.heartbeat_at, prep.current_table = READY, now, now, None
        prep.tables_done, prep.sources_json = prep.tables_total, json.dumps(manifest.get("sources", {}))
        session.add(prep)
        record(session, None, "dataset.prepared", prep.dataset, version=prep.version, preparation=prep.id,
               replaced_version=replaced, tables=prep.tables_total, seconds=round(seconds, 1))
    return old


def _fail(db: DbEngine, root: Path, claimed: DatasetPreparation, worker: str, text: str) -> str:
    with session_scope(db) as session:
        failed = session.execute(_mine(int(claimed.id), worker).values(  # type: ignore[arg-type]
            state=FAILED, error=text[:2000], finished_at=utcnow(), current_table=None))
        if getattr(failed, "rowcount", 0) == 1:
            record(session, None, "dataset.prepare", claimed.dataset, "failed", version=claimed.version,
                   preparation=claimed.id, reason=text[:2000])
    _remove(root, claimed.dataset, int(claimed.id))  # type: ignore[arg-type]
    return FAILED if getattr(failed, "rowcount", 0) == 1 else SUPERSEDED


def _remove(root: Path, dataset: str, ident: int) -> None:
    """Remove a snapshot: its manifest first (no query finds it after that), then its files."""
    folder = snapshot_folder(root, dataset, ident)
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    snapshot.remove_building(root, dataset, ident)


def sweep(db: DbEngine, root: Path, keep: timedelta) -> int:
    """Remove the snapshots of replaced and given-up versions no query can still be reading; how many."""
    cutoff = utcnow() - keep
    with Session(reader(db)) as session:
        old = [p for p in session.exec(select(DatasetPreparation).where(DatasetPreparation.state == SUPERSEDED))
               if (aware(p.superseded_at) or cutoff) <= cutoff]
        if not old:
            return 0
        computing = {(c.dataset, c.dataset_version) for c in session.exec(select(Computation))}
        served = {d.name: d.version for d in session.exec(select(Dataset))}
    removed = 0
    for prep in old:
        if (prep.dataset, prep.version) in computing and served.get(prep.dataset) != prep.version:
            continue  # a query charged on that version may still read it
        _remove(root, prep.dataset, int(prep.id))  # type: ignore[arg-type]
        with session_scope(db) as session:
            session.execute(update(DatasetPreparation).where(DatasetPreparation.id == prep.id,
                                                             DatasetPreparation.state == SUPERSEDED)
                            .values(state=REMOVED))
        removed += 1
    return removed


def prepare_now(db: DbEngine, settings: Settings, dataset: str, version: str, path: str,
                progress: Progress | None = None, poll_seconds: float = 0.5) -> DatasetPreparation | None:
    """Prepare a registration (dataset, version, folder) in this process (the CLI), or follow the worker
    that claimed it, until it is ready, failed or given up; its row then (None: none was recorded)."""
    worker = worker_name()
    root, keep = settings.prepared_path, timedelta(seconds=settings.prepared_keep_seconds)
    while True:
        with Session(reader(db)) as session:
            prep = preparations.of_registration(session, dataset, version, path)
            if prep is not None:
                session.expunge(prep)
        if prep is None or prep.state not in OPEN:
            return prep
        claimed = claim(db, worker, int(prep.id))  # type: ignore[arg-type]
        if claimed is not None:
            run(db, root, keep, claimed, worker, progress)
            continue
        if progress is not None and prep.current_table:
            progress(prep.current_table, prep.tables_done, prep.tables_total, 0, 1)
        time.sleep(poll_seconds)


class Preparer:
    """The thread of a server process that prepares registered versions (and removes old snapshots)."""

    def __init__(self, db: DbEngine, settings: Settings, poll_seconds: float = POLL_SECONDS) -> None:
        self.db, self.root = db, settings.prepared_path
        self.keep = timedelta(seconds=settings.prepared_keep_seconds)
        self.worker, self.poll_seconds = worker_name(), poll_seconds
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Preparer:
        self._thread = threading.Thread(target=self._loop, name="civicdp-prepare", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for pending preparations now (a registration was committed)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop looking; a preparation under way is left to be taken over (its claim goes stale)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and (claimed := claim(self.db, self.worker)) is not None:
                    run(self.db, self.root, self.keep, claimed, self.worker)
                sweep(self.db, self.root, self.keep)
            except Exception:
                log.exception("preparing registered dataset versions failed; trying again")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
