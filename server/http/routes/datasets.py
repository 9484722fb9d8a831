"""Datasets: list, read public metadata, register (stewards), follow a registration's preparation."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, BackgroundTasks, Request, status
from pydantic import BaseModel, Field
from sqlmodel import select

from civicdp.policies.actions import Action
from civicdp.server.services import admin, classification
from civicdp.server.state import preparations, registry, value_checks, version_findings
from civicdp.server.state.version_findings import DatasetFindings
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, WriteSession, authorize
from civicdp.server.state.errors import NOT_VISIBLE, AccessDenied, NotFound
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import ColumnClassOut, ColumnClassSet, DatasetOut, DatasetRegister
from civicdp.server.state.models import Dataset, DatasetPreparation

router = APIRouter(prefix="/datasets", tags=["datasets"])


class PreparationOut(BaseModel):
    """One registration's preparation: its state and progress, never anything from the data."""

    id: int
    version: str
    state: Literal["pending", "preparing", "ready", "failed", "superseded", "removed"] = Field(
        description="pending: waiting for a worker; preparing: being built; ready: the version answered; "
                    "failed: see error (the version served before is still answered); superseded / removed: "
                    "replaced by a newer registration (its files removed)")
    tables_done: int
    tables_total: int
    current_table: str | None = None
    requested_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = Field(default=None, description="Why it failed: the table and the cause, no data")


class PreparationStatus(BaseModel):
    dataset: str
    served_version: str | None = Field(description="The version queries are answered on (null: none yet)")
    preparation: PreparationOut | None = Field(
        description="The newest registration's preparation (null: registered before versions were prepared)")


class FindingOut(BaseModel):
    """One effect of the declaration on a version's data, for its steward (exact counts: data)."""

    kind: Literal["dropped_keys", "undeclared_nulls", "clipped", "open_cases"]
    table: str
    column: str | None
    rows: int
    total: int
    share: float
    accepted: bool


class FindingsOut(BaseModel):
    dataset: str
    version: str
    published: bool = Field(description="Whether analysts see the shares in the public metadata")
    findings: list[FindingOut]


class DatasetRegistered(DatasetOut):
    """The version registered, and its preparation: queries answer the version served before (a new
    dataset: 503) until it is ready."""

    preparation: PreparationOut | None
    findings: FindingsOut | None = Field(default=None, description="What the check found in the data (stewards)")
    warnings: list[str] = Field(default_factory=list, description="Clipped values, open cases, linked tables "
                                "without a row limit of their own: registered, but worth telling analysts")


def _preparation(row: DatasetPreparation | None) -> PreparationOut | None:
    if row is None:
        return None
    return PreparationOut(id=int(row.id), version=row.version, state=row.state,  # type: ignore[arg-type]
                          tables_done=row.tables_done, tables_total=row.tables_total,
                          current_table=row.current_table, requested_at=preparations.aware(row.requested_at),
                          started_at=preparations.aware(row.started_at),
                          finished_at=preparations.aware(row.finished_at), error=row.error)


def _findings(row: DatasetFindings | None) -> FindingsOut | None:
    if row is None:
        return None
    return FindingsOut(dataset=row.dataset, version=row.version, published=row.published,
                       findings=[FindingOut(**f, accepted=f["kind"] in row.accepted)  # type: ignore[arg-type]
                                 for f in row.findings])


def _public(row, session) -> DatasetOut:  # type: ignore[no-untyped-def]
    metadata = registry.metadata_of(row)
    return DatasetOut(name=row.name, version=row.version, description=metadata.description,
                      privacy_unit=metadata.privacy_unit, max_contributions=metadata.max_contributions,
                      tables={n: t.model_dump(mode="json") for n, t in metadata.tables.items()},
                      accepted_shares=version_findings.published(session, row.name, row.version))


@router.get("", response_model=list[DatasetOut], responses=errors(401),
            summary="The datasets you may use, with their public metadata")
def list_datasets(caller: CurrentCaller, state: StateDep, session: ReadSession) -> list[DatasetOut]:
    return [_public(row, session) for row in registry.all_datasets(session)
            if state.policies.check(caller.subject, caller.agency, f"dataset:{row.name}", Action.DATASET_LIST).allowed]


@router.get("/{name}", response_model=DatasetOut, responses=errors(401, 403, 404),
            summary="One dataset's public metadata")
def get_dataset(name: str, caller: CurrentCaller, state: StateDep, session: ReadSession) -> DatasetOut:
    # One text whether the dataset does not exist or may not be read: existence is not told.
    try:
        authorize(state, caller, Action.DATASET_READ, f"dataset:{name}")
        return _public(registry.get(session, name), session)
    except (AccessDenied, NotFound):
        raise AccessDenied(NOT_VISIBLE.format(what="dataset", name=name[:100])) from None


@router.post("", response_model=DatasetRegistered, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 404, 409, 422), summary="Register a dataset folder (stewards)")
def register_dataset(body: DatasetRegister, caller: CurrentCaller, state: StateDep, session: WriteSession,
                     request: Request, background: BackgroundTasks) -> DatasetRegistered:
    """Checked now; prepared in the background (follow it at ``GET /v1/datasets/{name}/preparation``)."""
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    with preparations.preparing_registrations(session):
        row = admin.register_dataset(session, state.policies, caller, Path(body.path), frozenset(body.accept),
                                     publish_shares=body.publish_accepted_shares)
    preparation = _preparation(preparations.of_registration(session, row.name, row.version, row.path))
    found = version_findings.of_version(session, row.name, row.version, row.path)
    preparer = getattr(request.app.state, "civicdp_preparer", None)
    if preparer is not None:
        background.add_task(preparer.wake)  # after the commit, which precedes the response
    public = _public(row, session).model_dump(exclude={"accepted_shares"})
    return DatasetRegistered(**public, accepted_shares=found and version_findings.published(
        session, row.name, row.version), preparation=preparation, findings=_findings(found),
        warnings=value_checks.warnings(registry.metadata_of(row), found.found() if found else []))


@router.get("/{name}/preparation", response_model=PreparationStatus, responses=errors(401, 403, 404),
            summary="The preparation of a dataset's newest registration (stewards)")
def preparation_status(name: str, caller: CurrentCaller, state: StateDep, session: ReadSession) -> PreparationStatus:
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    latest = preparations.latest(session, name)
    served = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if latest is None and served is None:
        raise NotFound(f"no dataset named '{name}'; list them with GET /v1/datasets")
    waiting = served is not None and preparations.waiting(session, served) is not None
    return PreparationStatus(dataset=name, served_version=None if served is None or waiting else served.version,
                             preparation=_preparation(latest))


@router.get("/{name}/findings", response_model=FindingsOut, responses=errors(401, 403, 404),
            summary="What the registration check found in the served version's data (stewards)")
def dataset_findings(name: str, caller: CurrentCaller, state: StateDep, session: ReadSession) -> FindingsOut:
    """Rows outside the keys, undeclared nulls, clipped values and open cases, with counts and shares."""
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    row = registry.get(session, name)
    found = _findings(version_findings.of_version(session, row.name, row.version, row.path))
    if found is None:
        raise NotFound(f"dataset '{name}' version {row.version} was registered before findings were kept; "
                       "register it again to check it")
    return found


@router.put("/{name}/columns/{column}/class", response_model=ColumnClassOut, responses=errors(401, 403, 404, 422),
            summary="Change a column's class: public, quasi or sensitive (stewards)")
def classify_column(name: str, column: str, body: ColumnClassSet, caller: CurrentCaller, state: StateDep,
                    session: WriteSession) -> ColumnClassOut:
    """In force at every server process's next request; recorded as ``column.classify``."""
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    changed = classification.classify_column(session, state.policies, caller, name, column, body.column_class)
    return ColumnClassOut(dataset=name, column=column, column_class=body.column_class, changed=changed)
