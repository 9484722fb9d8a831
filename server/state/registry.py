"""The dataset registry: which datasets the server serves, and their public metadata."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import polars as pl
from sqlalchemy import delete, func
from sqlmodel import Session, select

from civicdp.queries.errors import QueryError
from civicdp.queries.integrity import duplicated_owner_keys
from civicdp.queries.metadata import DatasetMetadata, load_metadata, parse_metadata
from civicdp.server.state.dataset_checks import DatasetRefused, check_declaration, check_files, check_metadata_file
from civicdp.server.state.table_checks import check_tables
from civicdp.server.state.errors import Conflict, InvalidRequest, NotFound
from civicdp.server.state import preparations, value_checks, version_findings
from civicdp.server.state.models import Budget, Dataset, DatasetPreparation


def register(session: Session, folder: Path, accept: frozenset[str] = frozenset(), *,
             publish_shares: bool = False) -> Dataset:
    """Register (or update to a new version) the dataset in ``folder``; metadata and values are checked.

    Rows outside a column's declared keys are refused unless ``accept`` names
    ``dropped_keys``; what the check found is stored with the version
    (:mod:`civicdp.server.state.version_findings`), shown to analysts if ``publish_shares``.
    Inside :func:`civicdp.server.state.preparations.preparing_registrations` the version is
    recorded for preparation and served once prepared (:func:`serve`); otherwise at once.
    """
    try:
        folder = Path(folder).resolve()
        check_metadata_file(folder)  # before reading it: a FIFO would block, a device never end
        metadata = load_metadata(folder)
        missing = [t.path for t in metadata.tables.values() if not (folder / t.path).exists()]
    except QueryError:
        raise  # metadata.json is missing or invalid: the error names the field and the fix
    except DatasetRefused as refused:
        raise InvalidRequest("path", str(refused), "Fix the dataset folder and register again") from None
    except (OSError, ValueError) as exc:  # a name too long or with a NUL byte, a folder the server may not read
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise NotFound(f"cannot read a dataset folder at {str(folder)[:200]!r}: {reason}") from None
    if missing:
        raise NotFound(f"the dataset's table file {missing[0]} is not in {folder}")
    try:
        check_files(folder, metadata)
        check_declaration(metadata)
        check_tables(folder, metadata, accept)
    except DatasetRefused as refused:
        raise InvalidRequest(refused.field, str(refused),
                             "Fix the dataset folder or its metadata.json and register again") from None
    try:
        found = value_checks.findings(metadata, value_checks.count_values(folder, metadata))
        duplicated = duplicated_owner_keys(folder, metadata)
    except (OSError, pl.exceptions.PolarsError):
        raise Conflict(f"the files of dataset '{metadata.name}' cannot be read as Parquet with the "
                       "declared columns; check them against metadata.json") from None
    if duplicated:
        raise Conflict(f"dataset '{metadata.name}': {duplicated[0]}. Each step must belong to one "
                       "person: give the owner table unique keys (or link the table by another column)")
    refused = value_checks.refused(found, accept)
    if refused:  # nothing is replaced: the version served before stays served
        where, problem, fix = value_checks.refusal(refused[0])
        more = f" (and {len(refused) - 1} more columns: civicdp datasets check lists them)" if len(refused) > 1 else ""
        raise InvalidRequest(where, problem + more, fix)
    row = session.exec(select(Dataset).where(Dataset.name == metadata.name)).first()
    document = metadata.model_dump_json()
    if row is not None and row.version == metadata.version and _parsed(row.metadata_json) != metadata:
        # Compared as parsed metadata: a row stored before a field existed equals its default.
        raise Conflict(f"dataset '{metadata.name}' version {metadata.version} is registered with other "
                       "metadata; give the new metadata a new version")
    version_findings.record(session, metadata.name, metadata.version, str(folder), found, accept, publish_shares)
    if preparations.prepares(session):
        return _register_prepared(session, row, metadata, folder, document)
    if row is None:
        row = Dataset(name=metadata.name, version=metadata.version, path=str(folder), metadata_json=document)
    else:
        _check_accounting(session, _parsed(row.metadata_json), metadata)
        if (row.version, row.path, row.metadata_json) != (metadata.version, str(folder), document):
            preparations.retire(session, row.name)  # served as it is now: no snapshot of an earlier version
        row.version, row.path, row.metadata_json = metadata.version, str(folder), document
    session.add(row)
    session.flush()
    return row


def _register_prepared(session: Session, row: Dataset | None, metadata: DatasetMetadata, folder: Path,
                       document: str) -> Dataset:
    """Record the version for preparation (:mod:`civicdp.server.state.preparations`); what was registered.

    A dataset already answered keeps its row (the version served) until the new version is
    prepared: the version returned is then not stored yet. A new dataset, or one whose
    first version was never prepared, gets its row now; queries on it wait for preparation.
    Registering the prepared folder again, with its files unchanged, prepares nothing.
    """
    if row is not None and preparations.waiting(session, row) is None:
        ready = preparations.served(session, row.name)
        if ready is not None and row.version == metadata.version and preparations.unchanged(
                ready, folder, metadata, document):
            preparations.give_up_waiting(session, row.name)  # the newest registration is this one
            return row
        _check_accounting(session, _parsed(row.metadata_json), metadata, remove=False)  # removed at the switch
        preparations.request(session, metadata, folder, document, first=False)
        return Dataset(name=metadata.name, version=metadata.version, path=str(folder), metadata_json=document)
    if row is None:
        row = Dataset(name=metadata.name, version=metadata.version, path=str(folder), metadata_json=document)
    else:  # never answered: the row follows the newest registration
        _check_accounting(session, _parsed(row.metadata_json), metadata)
        row.version, row.path, row.metadata_json = metadata.version, str(folder), document
    session.add(row)
    session.flush()
    preparations.request(session, metadata, folder, document, first=True)
    return row


def serve(session: Session, preparation: DatasetPreparation) -> tuple[Dataset, str | None]:
    """Make a prepared version the one answered; the dataset's row and the version it replaced.

    Checked again as at registration, against what is served now: a version kept with other
    metadata, or an accounting change after loss was spent meanwhile, is refused (Conflict).
    """
    metadata = _parsed(preparation.metadata_json)
    row = session.exec(select(Dataset).where(Dataset.name == preparation.dataset)).first()
    replaced = None
    if row is None:
        row = Dataset(name=metadata.name, version=metadata.version, path=preparation.path,
                      metadata_json=preparation.metadata_json)
    else:
        if row.version == metadata.version and _parsed(row.metadata_json) != metadata:
            raise Conflict(f"dataset '{metadata.name}' version {metadata.version} is registered with other "
                           "metadata; give the new metadata a new version")
        _check_accounting(session, _parsed(row.metadata_json), metadata)
        replaced = None if preparation.first else row.version  # a first version's row held it already
        row.version, row.path, row.metadata_json = metadata.version, preparation.path, preparation.metadata_json
    session.add(row)
    session.flush()
    return row, replaced


def _check_accounting(session: Session, old: DatasetMetadata, new: DatasetMetadata, remove: bool = True) -> None:
    """A dataset's accounting may change only before anything was spent on it.

    Its budget rows count in the accounting's unit (micro-epsilon or nano-rho): spent
    amounts cannot be converted without losing the guarantee. Unspent rows are removed
    (unless ``remove`` is false: a registration still to be prepared removes them when it
    is served), so they reopen with caps in the new unit.
    """
    if old.accounting == new.accounting:
        return
    spent = session.execute(select(func.coalesce(func.sum(Budget.spent_micro), 0))
                            .where(Budget.dataset == new.name)).scalar_one()
    if spent:
        raise Conflict(f"dataset '{new.name}' has spent privacy loss under '{old.accounting.mode}' accounting "
                       f"(delta {old.accounting.delta:g}); its accounting cannot change to "
                       f"'{new.accounting.mode}' (delta {new.accounting.delta:g}). Keep the accounting, or "
                       "register the data as a new dataset")
    if remove:
        session.execute(delete(Budget).where(Budget.dataset == new.name))


def get(session: Session, name: str) -> Dataset:
    row = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if row is None:
        raise NotFound(f"no dataset named '{name}'; list them with GET /v1/datasets")
    return row


def served(session: Session, name: str) -> Dataset:
    """The dataset as queries read it: its row, unless its first version is still being prepared
    (DatasetUnavailable, 503, saying so and since when)."""
    row = get(session, name)
    waiting = preparations.waiting(session, row)
    if waiting is not None:
        raise preparations.refusal(waiting)
    return row


def all_datasets(session: Session) -> list[Dataset]:
    return list(session.exec(select(Dataset).order_by(Dataset.name)))


@lru_cache(maxsize=64)
def _parsed(document: str) -> DatasetMetadata:
    return parse_metadata(json.loads(document))


def metadata_of(row: Dataset) -> DatasetMetadata:
    """The parsed metadata of a registered dataset (cached per version)."""
    return _parsed(row.metadata_json)
