"""Column classes (issue 14): how identifying a column is, and so what an analyst may spend on it.

A column is ``public`` (the per-query cap of public columns), ``quasi`` (a quasi-identifier:
the lower cap) or ``sensitive`` (never queried), as SECURITY.md and policies/defaults.py
say. The class lives in the policy store (:meth:`civicdp.policies.catalog.CatalogMixin.classify_column`),
where every decision reads it. It is set two ways, both recorded in the audit log:

* by the dataset's metadata (``"class"`` on a column, :class:`civicdp.queries.metadata.ColumnMeta`),
  applied at each registration (:func:`civicdp.server.services.admin.register_dataset`): a class
  stated in a version's metadata wins over one set before; a column with no stated class keeps
  the class it has (public for a new column);
* by a steward, at any time (:func:`classify_column`: ``PUT /v1/datasets/{name}/columns/{column}/class``,
  ``civicdp datasets classify``), for a column of the dataset's current metadata. The change is
  in force at every server process's next request; it lasts until a steward changes it again or
  a registered version states another class for the column.
"""

from __future__ import annotations

from sqlmodel import Session

from civicdp.policies.actions import ColumnClass
from civicdp.policies.enforcer import PolicyStore
from civicdp.policies.session_rules import changes_with
from civicdp.queries.metadata import DatasetMetadata
from civicdp.server.services.query_service import Caller, record
from civicdp.server.state import registry
from civicdp.server.state.errors import InvalidRequest, NotFound

#: From the least to the most restrictive: a column stated in two classes (in two tables) gets the stricter.
_STRICTNESS = (ColumnClass.PUBLIC, ColumnClass.QUASI, ColumnClass.SENSITIVE)


def parse_class(value: str) -> ColumnClass:
    """``value`` as a column class; InvalidRequest (422) naming the classes otherwise."""
    try:
        return ColumnClass(value)
    except ValueError:
        raise InvalidRequest("class", f"{str(value)[:40]!r} is not a column class",
                             "Use one of: " + ", ".join(c.value for c in ColumnClass)) from None


def stated_classes(metadata: DatasetMetadata) -> dict[str, ColumnClass]:
    """The classes the metadata states, by column (a column of several tables: the strictest stated)."""
    stated: dict[str, ColumnClass] = {}
    for table in metadata.tables.values():
        for name, column in table.columns.items():
            if column.column_class is None:
                continue
            wanted = ColumnClass(column.column_class)
            if name not in stated or _STRICTNESS.index(wanted) > _STRICTNESS.index(stated[name]):
                stated[name] = wanted
    return stated


def classify_column(session: Session, policies: PolicyStore, actor: Caller | None, dataset: str, column: str,
                    column_class: ColumnClass | str) -> bool:
    """Put ``column`` of ``dataset`` in ``column_class``, with a ``column.classify`` audit entry.

    The column must be declared in the dataset's current metadata (NotFound otherwise). The
    rule change and its entry commit together. False (nothing changed or recorded) if the
    column already has that class.
    """
    target = parse_class(column_class)
    metadata = registry.metadata_of(registry.get(session, dataset))
    declared = {name for table in metadata.tables.values() for name in table.columns}
    if column not in declared:
        raise NotFound(f"dataset '{dataset}' declares no column named '{column[:100]}' in its current metadata "
                       f"(version {metadata.version}); its columns: {', '.join(sorted(declared))}")
    with changes_with(session, policies):
        before = policies.class_of(dataset, column)
        if before is target:
            return False
        policies.classify_column(dataset, column, target)
        record(session, actor, "column.classify", dataset, dataset=dataset, column=column,
               **{"from": before.value if before is not None else None, "to": target.value})
    return True
