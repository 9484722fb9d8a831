"""``civicdp audit reconcile``: an exported bundle (verified first) against a database.

The export's entries are compared with the database's log, and the budgets and stored
answers of the database with the charges and releases the export records
(:mod:`civicdp.server.auditlog.budgets`, :mod:`civicdp.server.auditlog.answers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine as DbEngine

from civicdp.server.auditlog.answers import release_problem
from civicdp.server.auditlog.budgets import AuditFolds, compare, ledger_summaries
from civicdp.server.auditlog.evidence import Disagreement
from civicdp.server.auditlog.reconcile import budget_rows, release_rows, snapshot
from civicdp.server.state.models import AuditEntry


@dataclass
class OfflineReport:
    entries: int  # in the export
    database_entries: int
    budgets: int
    releases: int
    found: list[Disagreement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = [f"compared {self.entries:,} exported entries with the database's {self.database_entries:,}, "
                f"{self.budgets:,} budgets and {self.releases:,} stored answers"]
        if not self.found:
            return [*head, "OK: every budget's spent amount is the sum of its ledger entries and of its audited "
                           "charges, charges follow on from each other, and every stored answer hashes to the "
                           "hash its audit entry records", *self.notes]
        return [*head, *(f"DISAGREES: {f.line()}" for f in self.found), *self.notes]


def reconcile_export(lines: list[bytes], db: DbEngine) -> OfflineReport:
    """Compare a (verified) export's entries with a database: its log, budgets and stored answers.

    Entries in the database beyond the export are used too (they are not vouched for by
    the export's signatures; a note says how many).
    """
    found: list[Disagreement] = []
    notes: list[str] = []
    with snapshot(db) as session:
        stored = 0
        beyond: list[tuple[int, str]] = []
        mismatch: str | None = None
        rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json).order_by(AuditEntry.seq))
        for seq, text in rows:
            stored += 1
            if seq >= len(lines):
                beyond.append((seq, text))
                continue
            if mismatch is None and (seq != stored - 1 or text.encode() != lines[seq]):
                expected = stored - 1
                mismatch = (f"entry {expected} is missing from the database (the next stored is {seq})"
                            if seq != expected else
                            f"entry {seq} in the database differs from the exported one (changed or reordered)")
        if mismatch is None and stored < len(lines):
            mismatch = (f"the database holds {stored:,} entries, the export {len(lines):,}: entries were deleted "
                        "from the database")
        if mismatch is not None:
            found.append(Disagreement("log", "the database's log differs from the export", mismatch))
        if beyond:
            notes.append(f"note: {len(beyond):,} entries in the database came after the export and are not covered "
                         "by its signatures (export again to cover them)")
        budgets = budget_rows(session)
        key_of = {b.id: b.key for b in budgets}
        folds = AuditFolds()
        for seq, data in [*enumerate(lines), *beyond]:
            folds.add(seq, data, key_of)
        found += compare(budgets, ledger_summaries(session), folds)
        releases = 0
        for release in release_rows(session):
            releases += 1
            problem = release_problem(release, folds.claims.get(release.id, []))
            if problem is not None:
                found.append(Disagreement("release", problem[0], problem[1], release_id=release.id))
    return OfflineReport(len(lines), stored, len(budgets), releases, found, notes)
