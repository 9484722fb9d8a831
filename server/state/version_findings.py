"""What registration found in a version's data, stored beside the version (a table of its own).

Each registration writes one :class:`DatasetFindings` row: the counts and shares of
:func:`civicdp.server.state.value_checks.findings` (rows outside the keys, undeclared
nulls, clipped values, open cases), which of them the steward accepted, and whether the
steward publishes the shares to analysts. The shares are data (exact counts of the
steward's rows, not noisy), so they are private by default: stewards see them in the
dataset's admin view and CLI; analysts see them in the public metadata only when the
steward registered with ``publish`` (``--publish-accepted-shares``).

A table beside ``dataset`` rather than columns on it: ``create_all`` adds new tables to
an existing state database, not new columns.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, Session, SQLModel, select

from civicdp.server.state.models import utcnow
from civicdp.server.state.value_checks import Finding


class DatasetFindings(SQLModel, table=True):
    """The findings of one registration of a version (the newest row of a version is in force)."""

    __tablename__ = "dataset_findings"
    id: int | None = Field(default=None, primary_key=True)
    dataset: str = Field(index=True, max_length=100)
    version: str = Field(max_length=100)
    path: str = Field(sa_column=Column(Text, nullable=False))
    registered_at: datetime = Field(default_factory=utcnow)
    #: The problems the steward accepted instead of fixing (JSON list of names).
    accepted_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    #: Every finding, with its counts and share (JSON list of objects).
    findings_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    published: bool = False

    @property
    def accepted(self) -> list[str]:
        return list(json.loads(self.accepted_json))

    @property
    def findings(self) -> list[dict[str, object]]:
        return list(json.loads(self.findings_json))

    def found(self) -> list[Finding]:
        return [Finding(f["kind"], f["table"], f["column"], f["rows"], f["total"]) for f in self.findings]


def record(session: Session, dataset: str, version: str, path: str, found: list[Finding],
           accept: frozenset[str], publish: bool) -> DatasetFindings:
    row = DatasetFindings(dataset=dataset, version=version, path=path, accepted_json=json.dumps(sorted(accept)),
                          findings_json=json.dumps([f.as_dict() for f in found]), published=publish)
    session.add(row)
    session.flush()
    return row


def of_version(session: Session, dataset: str, version: str, path: str | None = None) -> DatasetFindings | None:
    """The newest findings of a version (from ``path``, if given); None for one registered before they were kept."""
    query = select(DatasetFindings).where(DatasetFindings.dataset == dataset, DatasetFindings.version == version)
    if path is not None:
        query = query.where(DatasetFindings.path == path)
    return session.exec(query.order_by(DatasetFindings.id.desc())).first()  # type: ignore[union-attr]


def published(session: Session, dataset: str, version: str) -> list[dict[str, object]] | None:
    """The shares analysts may see for a version: only if its steward published them (else None).

    An analyst sees the share of each finding and whether it was accepted, to the whole percent."""
    row = of_version(session, dataset, version)
    if row is None or not row.published:
        return None
    return [{"kind": f["kind"], "table": f["table"], "column": f["column"], "share": published_share(float(f["share"])),
             "accepted": f["kind"] in row.accepted} for f in row.findings]


def published_share(share: float) -> float:
    """A share to the whole percent, anything up to 1 % shown as 0.01.

    The steward publishes a share, not a count of rows: finer steps (0.1 %) would tell a
    single row apart in a table of a few thousand rows; at 1 % one row of a table of
    more than 100 rows is not told apart from none."""
    return max(0.01, round(share, 2))
