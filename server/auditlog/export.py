"""The export of the whole log: a bundle of its entries, checkpoints and consistency proofs.

Every exported entry is checked against the stored tree as it is written: an entry
changed, removed or reordered in the database since it was read raises the alarm and
fails the export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.bundle import write_bundle
from civicdp.audit.merkle import HashTree, leaf_hash
from civicdp.server.state.db import reader
from civicdp.server.state.models import AuditCheckpoint, AuditEntry

if TYPE_CHECKING:
    from civicdp.server.auditlog.log import AuditLog

_BATCH = 20_000


def export(log: AuditLog, target: str | Path | IO[bytes]) -> AuditCheckpoint:
    """Write a bundle of ``log`` up to a checkpoint signed now (see :meth:`AuditLog.export`)."""
    head = log.checkpoint()
    with Session(reader(log.db)) as session:
        checkpoints = list(session.exec(select(AuditCheckpoint).where(AuditCheckpoint.size <= head.size)
                                        .order_by(AuditCheckpoint.size)))
    tree = log.sync()
    proofs = [{"first": a.size, "second": b.size, "path": [h.hex() for h in tree.consistency_proof(a.size, b.size)]}
              for a, b in zip(checkpoints, checkpoints[1:])]
    write_bundle(target, entries(log.db, head.size, tree, log.fail), [c.note for c in checkpoints], proofs)
    return head


def entries(db: DbEngine, size: int, tree: HashTree, fail: Callable[[str], NoReturn]) -> Iterator[bytes]:
    """The first ``size`` stored entries, each checked against ``tree`` (``fail`` raises the alarm)."""
    expected = 0
    with Session(reader(db)) as session:
        for start in range(0, size, _BATCH):
            rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json)
                                   .where(AuditEntry.seq >= start, AuditEntry.seq < min(size, start + _BATCH))
                                   .order_by(AuditEntry.seq))
            for seq, text in rows:
                data = text.encode()
                if seq != expected or leaf_hash(data) != tree.leaf(seq):
                    fail(f"entry {expected} is not what this server read and signed: it was changed, "
                         "removed or reordered in the database (the export was stopped)")
                expected += 1
                yield data
    if expected != size:
        fail(f"entry {expected} is no longer stored: entries were deleted from the database "
             "(the export was stopped)")
