"""Datasets: list, read public metadata, register (stewards)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, status

from civicdp.policies.actions import Action
from civicdp.server.services import admin, classification
from civicdp.server.state import registry
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, WriteSession, authorize
from civicdp.server.state.errors import NOT_VISIBLE, AccessDenied, NotFound
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import ColumnClassOut, ColumnClassSet, DatasetOut, DatasetRegister

router = APIRouter(prefix="/datasets", tags=["datasets"])


def _public(row) -> DatasetOut:  # type: ignore[no-untyped-def]
    metadata = registry.metadata_of(row)
    return DatasetOut(name=row.name, version=row.version, description=metadata.description,
                      privacy_unit=metadata.privacy_unit, max_contributions=metadata.max_contributions,
                      tables={n: t.model_dump(mode="json") for n, t in metadata.tables.items()})


@router.get("", response_model=list[DatasetOut], responses=errors(401),
            summary="The datasets you may use, with their public metadata")
def list_datasets(caller: CurrentCaller, state: StateDep, session: ReadSession) -> list[DatasetOut]:
    return [_public(row) for row in registry.all_datasets(session)
            if state.policies.check(caller.subject, caller.agency, f"dataset:{row.name}", Action.DATASET_LIST).allowed]


@router.get("/{name}", response_model=DatasetOut, responses=errors(401, 403, 404),
            summary="One dataset's public metadata")
def get_dataset(name: str, caller: CurrentCaller, state: StateDep, session: ReadSession) -> DatasetOut:
    # One text whether the dataset does not exist or may not be read: existence is not told.
    try:
        authorize(state, caller, Action.DATASET_READ, f"dataset:{name}")
        return _public(registry.get(session, name))
    except (AccessDenied, NotFound):
        raise AccessDenied(NOT_VISIBLE.format(what="dataset", name=name[:100])) from None


@router.post("", response_model=DatasetOut, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 404, 409, 422), summary="Register a dataset folder (stewards)")
def register_dataset(body: DatasetRegister, caller: CurrentCaller, state: StateDep,
                     session: WriteSession) -> DatasetOut:
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    return _public(admin.register_dataset(session, state.policies, caller, Path(body.path), frozenset(body.accept)))


@router.put("/{name}/columns/{column}/class", response_model=ColumnClassOut, responses=errors(401, 403, 404, 422),
            summary="Change a column's class: public, quasi or sensitive (stewards)")
def classify_column(name: str, column: str, body: ColumnClassSet, caller: CurrentCaller, state: StateDep,
                    session: WriteSession) -> ColumnClassOut:
    """In force at every server process's next request; recorded as ``column.classify``."""
    authorize(state, caller, Action.DATASET_MANAGE, "server")
    changed = classification.classify_column(session, state.policies, caller, name, column, body.column_class)
    return ColumnClassOut(dataset=name, column=column, column_class=body.column_class, changed=changed)
