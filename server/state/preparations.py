"""Preparation status of registered versions (:class:`DatasetPreparation`): what registration
records, and what a query on a version not prepared yet is told.

Registration through the CLI or the API (inside :func:`preparing_registrations`) checks the
folder as before, then records the version as a ``pending`` preparation instead of serving
it at once; :mod:`civicdp.server.intake.prepare` builds its snapshot and switches. The
version served before keeps being answered meanwhile. A dataset's *first* version has
nothing before it: queries on it get a 503 saying it is being prepared, and since when,
until it is ready (or that it could not be prepared). Code that calls
:func:`civicdp.server.state.registry.register` outside that block (tests, the demo)
serves the version at once, ranked at its first query as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session, select

from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.polars_snapshots import source_states
from civicdp.server.state.models import Dataset, DatasetPreparation, utcnow

PENDING, PREPARING, READY, FAILED, SUPERSEDED, REMOVED = (
    "pending", "preparing", "ready", "failed", "superseded", "removed")
OPEN = (PENDING, PREPARING)
_AT_REGISTRATION = "civicdp.prepare_registrations"


@contextmanager
def preparing_registrations(session: Session) -> Iterator[None]:
    """Registrations in ``session`` inside this block are prepared before they are served."""
    session.info[_AT_REGISTRATION] = True
    try:
        yield
    finally:
        session.info.pop(_AT_REGISTRATION, None)


def prepares(session: Session) -> bool:
    return bool(session.info.get(_AT_REGISTRATION))


def request(session: Session, metadata: DatasetMetadata, folder: Path, document: str, *,
            first: bool) -> DatasetPreparation:
    """Record a registered version as waiting to be prepared; an earlier one still waiting is given up."""
    now = give_up_waiting(session, metadata.name)
    row = DatasetPreparation(dataset=metadata.name, version=metadata.version, path=str(folder),
                             metadata_json=document, first=first, tables_total=len(metadata.tables),
                             requested_at=now)
    session.add(row)
    session.flush()
    return row


def give_up_waiting(session: Session, dataset: str) -> datetime:
    """A newer registration: preparations of the dataset still waiting or under way are given up."""
    now = utcnow()
    session.execute(update(DatasetPreparation)
                    .where(DatasetPreparation.dataset == dataset,
                           DatasetPreparation.state.in_(OPEN))  # type: ignore[attr-defined]
                    .values(state=SUPERSEDED, superseded_at=now, current_table=None))
    return now


def of_registration(session: Session, dataset: str, version: str, path: str) -> DatasetPreparation | None:
    """The newest preparation of this version from this folder (what a registration just recorded or found)."""
    return session.exec(select(DatasetPreparation).where(
        DatasetPreparation.dataset == dataset, DatasetPreparation.version == version,
        DatasetPreparation.path == path).order_by(DatasetPreparation.id.desc())).first()  # type: ignore[union-attr]


def latest(session: Session, dataset: str) -> DatasetPreparation | None:
    return session.exec(select(DatasetPreparation).where(DatasetPreparation.dataset == dataset)
                        .order_by(DatasetPreparation.id.desc())).first()  # type: ignore[union-attr]


def served(session: Session, dataset: str) -> DatasetPreparation | None:
    """The preparation whose snapshot is answered (None: served without one, or nothing served)."""
    return session.exec(select(DatasetPreparation).where(DatasetPreparation.dataset == dataset,
                                                         DatasetPreparation.state == READY)
                        .order_by(DatasetPreparation.id.desc())).first()  # type: ignore[union-attr]


def unchanged(ready: DatasetPreparation, folder: Path, metadata: DatasetMetadata, document: str) -> bool:
    """Is a registration of ``folder`` the prepared one again: the same metadata, path and file states?"""
    if ready.path != str(folder) or ready.metadata_json != document or not ready.sources_json:
        return False
    try:
        return json.loads(ready.sources_json) == source_states(folder, metadata)
    except OSError:
        return False


def retire(session: Session, dataset: str) -> None:
    """Another version is served without preparation: every preparation of the dataset is given up."""
    session.execute(update(DatasetPreparation)
                    .where(DatasetPreparation.dataset == dataset,
                           DatasetPreparation.state.in_((*OPEN, READY)))  # type: ignore[attr-defined]
                    .values(state=SUPERSEDED, superseded_at=utcnow(), current_table=None))


def waiting(session: Session, row: Dataset) -> DatasetPreparation | None:
    """The preparation a registered dataset's first version waits for (None: the dataset is answered)."""
    newest = session.exec(select(DatasetPreparation).where(
        DatasetPreparation.dataset == row.name,
        DatasetPreparation.state.in_((*OPEN, FAILED, READY)))  # type: ignore[attr-defined]
        .order_by(DatasetPreparation.id.desc())).first()  # type: ignore[union-attr]
    if newest is None or not newest.first or newest.state == READY:
        return None
    return newest


def refusal(preparation: DatasetPreparation) -> DatasetUnavailable:
    """What a query on a first version not prepared yet is answered (503): the state and its times only."""
    name, version = preparation.dataset, preparation.version
    if preparation.state == FAILED:
        return DatasetUnavailable(
            "dataset", f"dataset '{name}' version {version} (registered {_when(preparation.requested_at)}) could not "
            "be prepared, so it is not answered", "The data steward sees why at GET /v1/datasets/"
            f"{name}/preparation, and registers the dataset again")
    if preparation.state == PREPARING and preparation.started_at is not None:
        since = (f"is being prepared (since {_when(preparation.started_at)}; {preparation.tables_done} of "
                 f"{preparation.tables_total} tables done)")
    else:
        since = f"is waiting to be prepared (registered {_when(preparation.requested_at)})"
    return DatasetUnavailable("dataset", f"dataset '{name}' version {version} {since}; it is answered once its "
                              "preparation has finished", "Ask again in a few minutes")


def aware(moment: datetime | None) -> datetime | None:
    """A stored time as UTC (SQLite returns them without their zone)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _when(moment: datetime | None) -> str:
    value = aware(moment)
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value is not None else "at an unknown time"
