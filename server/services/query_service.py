"""The request flow of a query, from an authenticated caller to a released answer.

authorise (Casbin) -> validate and plan (cost known, no data read) -> a stored
release of the identical question? return it, free -> the same question being
computed? wait for its release -> pre-check the budgets -> in ONE transaction: claim
the question, charge every budget scope with a conditional update, write the audit
entry -> only then read the data and compute the private answer -> in a second
transaction: store the release with its own audit entry -> answer. The loss is spent
before any data is read, so no outcome that depends on the data is free: if computing
fails, whatever the cause, the charge stays, the failure is audited against it and the
analyst gets one fixed answer (:mod:`civicdp.server.services.computations`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.policies.enforcer import PolicyStore
from civicdp.queries.engine import AnalysisPlan, Engine, Plan
from civicdp.queries.errors import DatasetUnavailable, QueryError
from civicdp.queries.request import Request, parse_request
from civicdp.server.services import computations, derived
from civicdp.server.state import ledger, registry
from civicdp.server.state.db import reader, session_scope
from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.state.caller import Caller, subject_of
from civicdp.server.state.errors import AccessDenied
from civicdp.server.state.models import Release
from civicdp.server.services.schemas import BudgetOut, EstimateOut, Loss, QueryResultOut

__all__ = ["Caller", "QueryService", "canonical_json", "record", "sha256_text", "subject_of"]

log = logging.getLogger(__name__)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class CachedQuestion:
    """A planned question, as the lean cached path keeps it: dataset and version, query key, policy objects."""

    dataset: str
    version: str
    canonical: str
    query_hash: str
    objects: tuple[str, ...]
    epsilon: float


class QueryService:
    """Estimates and runs queries for authenticated callers."""

    def __init__(self, db: DbEngine, engine: Engine, policies: PolicyStore, caps: ledger.CapDefaults,
                 computation_timeout: timedelta = timedelta(hours=1),
                 wait_limit: timedelta = timedelta(seconds=30)) -> None:
        self.db = db
        self.computation_timeout = computation_timeout
        # How long a request waits for an identical question another request is computing:
        # bounded well below the timeout, so a client retrying after a lost connection (or
        # a worker that died mid-computation) gets an answer it can act on, not a hung request.
        self.wait_limit = min(wait_limit, computation_timeout)
        self.engine = engine
        self.policies = policies
        self.caps = caps
        self._plans: dict[tuple[str, ...], Plan] = {}

    # -- shared steps ---------------------------------------------------------------

    def _plan(self, raw: Any) -> tuple[Request, Plan | AnalysisPlan, Any]:
        spec = parse_request(raw)
        if spec.dataset is None:
            raise QueryError("dataset", "name the dataset to query", 'Add "dataset": "<name>" to the query')
        with Session(reader(self.db)) as session:
            row = registry.served(session, spec.dataset)  # 503 while its first version is prepared
        key = (spec.canonical(), row.name, row.version, row.path)
        plan = self._plans.get(key)
        if plan is None:  # planning is a pure function of the spec and the metadata
            plan = self.engine.plan(spec, registry.metadata_of(row), Path(row.path))
            if len(self._plans) >= 1024:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return spec, plan, row

    @staticmethod
    def objects(plan: Plan | AnalysisPlan) -> list[str]:
        """What a query of ``plan`` is authorised on: the dataset first, so a deny rule on it blocks
        every query of its columns too, then each column it reads."""
        spec = plan.spec
        return [f"dataset:{spec.dataset}", *(f"column:{spec.dataset}/{c}" for c in sorted(plan.columns()))]

    def question(self, raw: Any) -> CachedQuestion:
        """What the lean cached path (:mod:`civicdp.server.http.lean`) remembers of a spec: facts that cannot change.

        Planning is a pure function of the spec and the dataset's metadata at its version,
        so these hold as long as that version is the registered one (checked again in the
        transaction that records each answer).
        """
        spec, plan, row = self._plan(raw)
        canonical, query_hash = self._query_key(spec)
        return CachedQuestion(dataset=row.name, version=row.version, canonical=canonical, query_hash=query_hash,
                              objects=tuple(self.objects(plan)), epsilon=plan.loss.as_dict()["epsilon"])

    def authorise(self, caller: Caller, plan: Plan | AnalysisPlan, action: Action, row: Any = None) -> None:
        spec = plan.spec
        decision = self.policies.check_all(caller.subject, caller.agency, self.objects(plan), action,
                                           plan.loss.as_dict()["epsilon"])
        slot = current_slot()
        if slot is not None:
            slot.action, slot.target, slot.rule = action.value, str(spec.dataset), decision.rule
            canonical, query_hash = self._query_key(spec)
            slot.detail = {"dataset": spec.dataset, "dataset_version": row.version if row else None,
                           "query": canonical,
                           "query_hash": query_hash,
                           "loss_micro": self.amount(row, plan) if action is Action.QUERY_ESTIMATE and row
                           else 0}
        if not decision.allowed:
            with session_scope(self.db) as session:
                record(session, caller, action.value, str(spec.dataset), "denied", reason=decision.reason,
                       query=spec.canonical(), rule=decision.rule)
            raise AccessDenied(decision.reason, decision.rule)

    @staticmethod
    def amount(row: Any, plan: Plan | AnalysisPlan) -> int:
        """The plan's charge in the dataset's ledger unit (micro-epsilon, or nano-rho on zCDP)."""
        return registry.metadata_of(row).accounting.rule.charge_of(plan.loss)

    @staticmethod
    def _query_key(spec: Request) -> tuple[str, str]:
        canonical = spec.canonical()
        return canonical, sha256_text(canonical)

    def _budgets(self, session: Session, dataset: str, scopes: list[ledger.Scope]) -> list[BudgetOut]:
        return [BudgetOut(**b.as_dict()) for b in ledger.statuses(session, dataset, scopes, defaults=self.caps)]

    @staticmethod
    def _scopes(caller: Caller, dataset: str) -> list[ledger.Scope]:
        return ledger.scopes_for(dataset, caller.name, caller.agency, datetime.now(timezone.utc))

    # -- estimate and run -------------------------------------------------------------

    def estimate(self, caller: Caller, raw: Any) -> EstimateOut:
        spec, plan, row = self._plan(raw)
        self.authorise(caller, plan, Action.QUERY_ESTIMATE, row)
        estimate = self.engine.describe(plan)
        _, query_hash = self._query_key(spec)
        with Session(reader(self.db)) as session:
            cached = self._stored(session, row.name, row.version, query_hash) is not None
        out = EstimateOut(dataset=row.name, loss=Loss(**estimate.loss.as_dict()),
                          contributions=estimate.contributions, confidence=estimate.confidence,
                          mechanisms=estimate.mechanisms, accuracy=estimate.accuracy, notes=estimate.notes,
                          cached=cached)
        # Says whether running it would be answered from stored releases, free.
        return derived.estimated(out, None if cached else derived.find(self.db, self.policies, caller, plan, row))

    def run(self, caller: Caller, raw: Any) -> QueryResultOut:
        spec, plan, row = self._plan(raw)
        self.authorise(caller, plan, Action.QUERY_RUN, row)
        canonical, query_hash = self._query_key(spec)
        scopes = self._scopes(caller, row.name)
        deadline = time.monotonic() + self.wait_limit.total_seconds()
        while True:
            with Session(reader(self.db)) as session:
                stored = self._stored(session, row.name, row.version, query_hash)
                pending = None if stored else computations.running(session, row.name, row.version, query_hash)
                refusal = None
                if stored is None and pending is None:
                    refusal = self._precheck(session, row, scopes, plan)
            if stored is not None:
                return self._cached(caller, stored)
            # Post-processing of stored releases (a roll-up, a ratio) is free: answered before any charge.
            found = None if pending else derived.find(self.db, self.policies, caller, plan, row)
            if found is not None:
                return derived.answer(self.db, caller, row, found, canonical, query_hash,
                                      lambda session: self._budgets(session, row.name, scopes))
            if refusal is not None:  # recorded like a refusal at charge time (outside the read)
                self._record_refusal(caller, row.name, refusal, query_hash)
                raise refusal
            if pending is not None:
                # The same question is being computed: wait for its release rather than pay twice.
                if computations.abandon_stale(self.db, self.computation_timeout, only=pending) == 0:
                    if time.monotonic() > deadline:
                        raise DatasetUnavailable("query", "an identical query is still being computed",
                                                 "Ask again later: its answer will then be served at no cost "
                                                 "(a computation whose process died is given up after "
                                                 "CIVICDP_COMPUTATION_TIMEOUT_MINUTES)")
                    time.sleep(0.05)
                continue
            claimed = self._charge(caller, row, plan, canonical, query_hash, scopes)
            if claimed is not None:
                return self._compute(caller, row, plan, canonical, query_hash, scopes, claimed)

    def _precheck(self, session: Session, row: Any, scopes: list[ledger.Scope],
                  plan: Plan | AnalysisPlan) -> ledger.BudgetRefused | None:
        try:
            ledger.precheck(session, row.name, scopes, self.amount(row, plan), defaults=self.caps)
        except ledger.BudgetRefused as refused:
            return refused
        return None

    def _charge(self, caller: Caller, row: Any, plan: Plan | AnalysisPlan, canonical: str, query_hash: str,
                scopes: list[ledger.Scope]) -> computations.Claim | None:
        """Claim and pay for the question, with its audit entry, before any data is read.

        ``None`` when an identical question was claimed concurrently (nothing charged here).
        """
        loss = self.amount(row, plan)
        try:
            with session_scope(self.db) as session:
                claimed = computations.claim(session, caller, row.name, row.version, query_hash, loss, scopes,
                                             self.caps)
                record(session, caller, Action.QUERY_RUN.value, row.name, dataset=row.name,
                       dataset_version=row.version, computation_id=claimed.id, query=canonical,
                       query_hash=query_hash, loss_micro=loss, ledger=list(claimed.changes))
        except ledger.BudgetRefused as refused:
            self._record_refusal(caller, row.name, refused, query_hash)
            raise
        except IntegrityError:
            return None
        return claimed

    def _compute(self, caller: Caller, row: Any, plan: Plan | AnalysisPlan, canonical: str, query_hash: str,
                 scopes: list[ledger.Scope], claimed: computations.Claim) -> QueryResultOut:
        """Read the data and store the release; on any failure, record it against the charge."""
        try:
            result = self.engine.execute(plan)
            body = {"columns": result.table.columns, "rows": result.table.to_dicts(),
                    "loss": result.loss.as_dict(), "contributions": result.contributions,
                    "confidence": result.confidence, "mechanisms": result.mechanisms, "notes": result.notes,
                    "tables": {name: {"columns": t.columns, "rows": t.to_dicts()}
                               for name, t in result.tables.items()}}
            document = canonical_json(body)
            with session_scope(self.db) as session:
                release = Release(dataset=row.name, dataset_version=row.version, query_hash=query_hash,
                                  canonical_query=canonical, loss_micro=self.amount(row, plan),
                                  result_json=document, result_hash=sha256_text(document),
                                  account_id=caller.account_id)
                session.add(release)
                session.flush()
                computations.complete(session, claimed, release)
                record(session, caller, "query.release", row.name, "released", dataset=row.name,
                       dataset_version=row.version, computation_id=claimed.id, release_id=release.id,
                       query_hash=query_hash, loss_micro=0, result_hash=release.result_hash)
                budgets = self._budgets(session, row.name, scopes)
                release_id = release.id
        except Exception:
            # Whatever failed — the data, the library, a bug — the analyst gets one fixed answer:
            # its text and status must not depend on the data, and the charge stays.
            log.exception("query on %s failed after its charge (computation %s)", row.name, claimed.id)
            computations.fail(self.db, caller, claimed, row.name, row.version, query_hash)
            raise DatasetUnavailable("dataset", computations.FAILED_TEXT,
                                     "Ask the data steward to check the dataset's files against metadata.json"
                                     ) from None
        return self._answer(release_id, row.name, row.version, body, cached=False, charged=body["loss"],
                            budgets=budgets)

    def _record_refusal(self, caller: Caller, dataset: str, refused: ledger.BudgetRefused, query_hash: str) -> None:
        with session_scope(self.db) as session:
            record(session, caller, Action.QUERY_RUN.value, dataset, "refused", reason=str(refused),
                   query_hash=query_hash, loss_micro=0)

    # -- stored releases -----------------------------------------------------------

    @staticmethod
    def _stored(session: Session, dataset: str, version: str, query_hash: str) -> Release | None:
        return session.exec(select(Release).where(Release.dataset == dataset, Release.dataset_version == version,
                                                  Release.query_hash == query_hash)).first()

    def _cached(self, caller: Caller, stored: Release) -> QueryResultOut:
        from civicdp.server.auditlog.answers import check_stored_answer  # noqa: PLC0415 - kept local to this step

        # Served only if its bytes hash to its result_hash and its audit entry records that hash
        # (otherwise 503, an alarm, and a refusal on record).
        check_stored_answer(self.db, caller, stored)
        with session_scope(self.db) as session:
            record(session, caller, Action.QUERY_RUN.value, stored.dataset, "cached", release_id=stored.id,
                   dataset_version=stored.dataset_version, query=stored.canonical_query, query_hash=stored.query_hash,
                   loss_micro=0, result_hash=stored.result_hash)
            budgets = self._budgets(session, stored.dataset, self._scopes(caller, stored.dataset))
        return self._answer(stored.id, stored.dataset, stored.dataset_version, json.loads(stored.result_json),
                            cached=True, charged={"epsilon": 0.0, "delta": 0.0}, budgets=budgets)

    @staticmethod
    def _answer(release_id: int | None, dataset: str, version: str, body: dict[str, Any], *, cached: bool,
                charged: dict[str, float], budgets: list[BudgetOut]) -> QueryResultOut:
        return QueryResultOut(release_id=release_id or 0, dataset=dataset, dataset_version=version, cached=cached,
                              charged=Loss(**charged), loss=Loss(**body["loss"]),
                              contributions=body["contributions"], confidence=body["confidence"],
                              columns=body["columns"], rows=body["rows"], mechanisms=body["mechanisms"],
                              notes=body["notes"], tables=body.get("tables", {}), budgets=budgets)
