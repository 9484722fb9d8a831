"""Derived answers in the server: a question computed from stored releases is free (issue 18).

After the identical-question check (the cached path) and before any charge, the query
service asks :func:`find` whether the planned question is a deterministic function of
releases already stored for the same dataset version (:mod:`civicdp.queries.derivation`
decides and computes; nothing here reads data). If it is, :func:`answer` serves it like a
cached answer: every source's bytes are checked against their audit entries first
(:func:`civicdp.server.auditlog.answers.check_stored_answer`), one ``query.run`` entry with
decision ``derived`` records the sources, how, and the hash of the answer sent, and the
ledger is not touched. The derived answer is not stored: the same sources give the same
answer again (sources are taken oldest first).

A source is used only if the caller may run its question too: the policy check of a query
of its columns (a roll-up from services reads the service column even when the question
names departments) at the larger of the caller's epsilon and the source's own (the epsilon
its answer was released at). A per-query cap is therefore never passed through a derived
answer: a caller refused the source question on the cached path is refused its derivations
too. A mean's sum and count are each checked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.policies.enforcer import PolicyStore
from civicdp.queries import derivation
from civicdp.queries.errors import QueryError
from civicdp.queries.spec import QuerySpec, parse_spec
from civicdp.server.auditlog.answers import check_stored_answer
from civicdp.server.auditlog.append import record
from civicdp.server.services.schemas import BudgetOut, DerivedOut, EstimateOut, Loss, QueryResultOut
from civicdp.server.state import registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import Release

#: Stored questions looked at, and stored answers read, per question at most (oldest first): the work a
#: fresh question may add is bounded.
MAX_SOURCES = 2000
MAX_READ = 64
_SPECS: dict[tuple[int, str], QuerySpec | None] = {}  # parsed stored questions (a release never changes)
_SPECS_KEPT = 50_000
_SPECS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Found:
    """A derivable question: the derived answer and the stored releases it is computed from."""

    derived: derivation.Derived
    sources: tuple[Release, ...]

    @property
    def out(self) -> DerivedOut:
        return DerivedOut(from_=list(self.derived.sources), how=self.derived.how)


def find(db: DbEngine, policies: PolicyStore, caller: Caller, plan: Any, row: Any) -> Found | None:
    """The planned question answered from stored releases of ``row``'s version, or None (then it is charged).

    Stored questions are judged oldest first, by their text alone, and a stored answer is read
    only for a question that could serve; the first release (or, for a mean, pair) that does, wins.
    """
    if not derivation.eligible(plan):
        return None
    spec, epsilon = plan.spec, plan.loss.as_dict()["epsilon"]
    parents = derivation.catalogue_parents(registry.metadata_of(row), Path(row.path))
    pairs = spec.aggregate == "mean"  # a mean needs a sum and a count: keep what was read
    read: list[tuple[Release, derivation.StoredRelease]] = []
    judged: dict[Any, Any] = {}  # each release judged once, however many are read after it
    with Session(reader(db)) as session:
        heads = session.execute(
            select(Release.id, Release.query_hash, Release.canonical_query)
            .where(Release.dataset == row.name, Release.dataset_version == row.version, *_prefilter(spec))
            .order_by(Release.id).limit(MAX_SOURCES)).all()  # type: ignore[arg-type]
        for ident, query_hash, canonical in heads:
            stored = _spec(ident, query_hash, canonical)
            # Checked at the stated epsilon before reading, then at the released one (an accuracy target's).
            if (stored is None or not derivation.usable(plan, stored, parents)
                    or not _may_run(policies, caller, row.name, stored, max(epsilon, stored.epsilon or 0.0))):
                continue
            release = session.get(Release, ident)
            if release is None:
                continue
            body = json.loads(release.result_json)
            if not _may_run(policies, caller, row.name, stored, max(epsilon, _released_epsilon(body))):
                continue
            read.append((release, derivation.StoredRelease(ident, stored, body)))
            tried = read if pairs else read[-1:]
            derived = derivation.derive(plan, [r for _, r in tried], parents, judged)
            if derived is not None:
                by_id = {int(r.id or 0): r for r, _ in tried}
                return Found(derived, tuple(by_id[i] for i in derived.sources))
            if len(read) >= MAX_READ:
                return None
    return None


def answer(db: DbEngine, caller: Caller, row: Any, found: Found, canonical: str, query_hash: str,
           budgets: Callable[[Session], list[BudgetOut]]) -> QueryResultOut:
    """Serve a derived answer: sources checked, one ``derived`` entry, nothing charged."""
    for source in found.sources:
        check_stored_answer(db, caller, source)  # 503, an alarm and a refusal if a source was altered
    body = found.derived.body
    document = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    with session_scope(db) as session:
        record(session, caller, Action.QUERY_RUN.value, row.name, "derived", dataset=row.name,
               dataset_version=row.version, query=canonical, query_hash=query_hash, loss_micro=0,
               derived_from=list(found.derived.sources), how=found.derived.how,
               result_hash=hashlib.sha256(document.encode()).hexdigest())
        left = budgets(session)
    return QueryResultOut(release_id=0, dataset=row.name, dataset_version=row.version, cached=False,
                          derived=found.out, charged=Loss(epsilon=0.0, delta=0.0), loss=Loss(**body["loss"]),
                          contributions=body["contributions"], confidence=body["confidence"],
                          columns=body["columns"], rows=body["rows"], mechanisms=body["mechanisms"],
                          notes=body["notes"], tables={}, budgets=left)


def estimated(estimate: EstimateOut, found: Found | None) -> EstimateOut:
    """An estimate that says the question would be answered derived, free."""
    if found is None:
        return estimate
    notes = [*estimate.notes, "running it would answer from stored releases "
             f"{', '.join(map(str, found.derived.sources))} at no cost: {found.derived.how}"]
    return estimate.model_copy(update={"derived": found.out, "notes": notes})


def _prefilter(spec: QuerySpec) -> list[Any]:
    """SQL conditions that keep the stored questions :func:`derivation.relevant` could accept (a superset:
    LIKE's ``_`` matches any character) — the canonical text has sorted keys and no spaces."""
    aggregates = ("sum", "count") if spec.aggregate == "mean" else (spec.aggregate,)
    column = json.dumps(spec.column)
    conditions = [Release.canonical_query.like(f'%"table":{json.dumps(spec.table)}%'),  # type: ignore[attr-defined]
                  Release.canonical_query.like(f'%"column":{column},%')]  # type: ignore[attr-defined]
    matches = [Release.canonical_query.like(f'%"aggregate":"{a}"%') for a in aggregates]  # type: ignore[attr-defined]
    return [*conditions, matches[0] if len(matches) == 1 else (matches[0] | matches[1])]


def _spec(ident: int, query_hash: str, canonical: str) -> QuerySpec | None:
    """The stored question as a spec (None for an analysis or anything that no longer parses)."""
    key = (ident, query_hash)
    with _SPECS_LOCK:
        if key in _SPECS:
            return _SPECS[key]
    try:
        document = json.loads(canonical)
        spec = None if not isinstance(document, dict) or "analysis" in document else parse_spec(document)
    except (QueryError, ValueError, TypeError):
        spec = None
    with _SPECS_LOCK:
        if len(_SPECS) >= _SPECS_KEPT:
            _SPECS.pop(next(iter(_SPECS)))
        _SPECS[key] = spec
    return spec


def _released_epsilon(body: dict[str, Any]) -> float:
    """The epsilon a stored answer was released at (its body's ``loss``)."""
    try:
        return float(body["loss"]["epsilon"])
    except (KeyError, TypeError, ValueError):
        return float("inf")  # no stated loss: only a caller allowed any epsilon may use it


def _may_run(policies: PolicyStore, caller: Caller, dataset: str, spec: QuerySpec, epsilon: float) -> bool:
    """Whether the caller may run the stored question at ``epsilon`` (dataset, then each column it reads)."""
    columns = {spec.column, *(g.partition(":")[0] for g in spec.group_by),
               *(f.column.partition(":")[0] for f in spec.filters)} - {None}
    objects = [f"dataset:{dataset}", *(f"column:{dataset}/{c}" for c in sorted(columns))]  # type: ignore[type-var]
    return policies.check_all(caller.subject, caller.agency, objects, Action.QUERY_RUN, epsilon).allowed
