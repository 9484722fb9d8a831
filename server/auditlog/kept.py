"""The reconciliation's evidence kept between starts (the evidence mark): a start folds only what is newer.

:class:`Kept` is what :func:`civicdp.server.auditlog.reconcile.check_state` carries from
one reconciliation to the next, and stores in the database (authenticated as every mark
is, :mod:`civicdp.server.auditlog.marks`): the audited charges and release claims of the
entries the log's check had verified (:class:`~civicdp.server.auditlog.budgets.AuditFolds`,
``upto`` below that check's size), the ledger folded up to an entry id
(:class:`~civicdp.server.auditlog.ledger_folds.LedgerFolds`), and the last release whose
stored answer was checked. Kept only while the log verifies (the log's alarm discards
it, and the log's recovery the stored one too).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from civicdp.server.auditlog.budgets import AuditFolds, Fold
from civicdp.server.auditlog.ledger_folds import LedgerFolds
from civicdp.server.auditlog.marks import EVIDENCE_MARK, Mark
from civicdp.server.state.db import session_scope

if TYPE_CHECKING:
    from civicdp.server.auditlog.log import AuditLog

#: Entries folded since the stored evidence before it is stored again.
KEEP_EVERY = 10_000


@dataclass
class Kept:
    folds: AuditFolds = field(default_factory=AuditFolds)
    ledger: LedgerFolds | None = None
    releases: int = 0  # every stored answer up to this release id was checked

    def to_bytes(self) -> bytes:
        """The kept state, compressed: the claims apart, so that a start need not read them."""
        def fold(f: Fold) -> list[Any]:
            return [f.count, f.total, f.end, f.sum_after, *(f.problem or ("", ""))]

        folds = self.folds
        claims = folds.unpack()
        state = {"upto": folds.upto, "by_key": [[*key, *fold(f)] for key, f in folds.by_key.items()],
                 "orphans": [[budget_id, *fold(f)] for budget_id, f in folds.orphans.items()],
                 "claims_upto": max(claims, default=0),
                 "ledger": None if self.ledger is None else self.ledger.to_state(), "releases": self.releases}
        packed = zlib.compress(json.dumps([[c.seq, c.release_id, c.result_hash, c.dataset, c.dataset_version,
                                            c.query_hash] for cs in claims.values() for c in cs],
                                          separators=(",", ":")).encode(), 1)
        head = zlib.compress(json.dumps(state, separators=(",", ":")).encode(), 1)
        return len(head).to_bytes(4, "big") + head + packed

    @classmethod
    def from_bytes(cls, data: bytes) -> Kept:
        """The kept state; its claims stay packed until a check of every stored answer needs them."""
        def fold(values: list[Any]) -> Fold:
            count, total, end, sum_after, short, detail = values
            return Fold(count, total, end, sum_after, (short, detail) if short or detail else None)

        length = int.from_bytes(data[:4], "big")
        state = json.loads(zlib.decompress(data[4:4 + length]))
        folds = AuditFolds()
        folds.upto = int(state["upto"])
        folds.by_key = {tuple(row[:4]): fold(row[4:]) for row in state["by_key"]}  # type: ignore[misc]
        folds.orphans = {int(row[0]): fold(row[1:]) for row in state["orphans"]}
        folds.packed, folds.packed_upto = data[4 + length:], int(state["claims_upto"])
        ledger = None if state["ledger"] is None else LedgerFolds.from_state(state["ledger"])
        return cls(folds, ledger, int(state["releases"]))


def stored(log: AuditLog) -> Kept | None:
    """What the evidence mark holds (None if there is none, or it does not verify)."""
    mark = log.marks.read(EVIDENCE_MARK)
    if mark is None or mark.data is None:
        return None
    try:
        kept = Kept.from_bytes(mark.data)
    except (ValueError, KeyError, TypeError, IndexError, zlib.error):
        return None
    if kept.folds.upto != mark.size - 1:
        return None
    log.alarms.evidence_kept = kept.folds.upto
    return kept


def keep(log: AuditLog, kept: Kept, *, only_if_none: bool = False) -> None:
    """Store ``kept`` (the evidence mark) once it covers :data:`KEEP_EVERY` entries more than the stored one.

    ``only_if_none`` (a start, which leaves the claims packed): only if none is stored yet.
    """
    if log.alarms.evidence_kept >= 0 and (only_if_none or kept.folds.upto - log.alarms.evidence_kept < KEEP_EVERY):
        return
    mark = Mark(EVIDENCE_MARK, kept.folds.upto + 1, "", datetime.now(timezone.utc), data=kept.to_bytes())
    with session_scope(log.db) as session:
        log.marks.write(mark, session)
    log.alarms.evidence_kept = kept.folds.upto
