"""Running a stored plan: ONE charge for every part not yet released, then every part's answer.

The request flow of a query (:mod:`civicdp.server.services.query_service`), once for the
whole plan: authorise each part -> plan on the served version (no data read) -> groups
already released on this version are answered from their stored releases, free -> the
same run being computed? wait for it -> in ONE transaction: claim the run (a
computation row unique per dataset, version and the set of questions it pays for),
charge the plan's total to every budget scope and write one ``plan.run`` entry listing
the parts -> only then read the data, group by group -> in a second transaction store
each group's release with its ``query.release`` entry. Concurrent runs of one plan make
one claim: the others wait and are answered from its releases, never charged. A failure
after the charge keeps the charge and answers one fixed 503 (as a query does).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.privacy.loss import compose
from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.plans import run as plan_run
from civicdp.queries.plans.planner import WorkloadPlan
from civicdp.server.auditlog.append import record
from civicdp.server.services import computations
from civicdp.server.services.plans import PlanService
from civicdp.server.services.query_service import canonical_json, sha256_text
from civicdp.server.state import ledger
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import Release

log = logging.getLogger(__name__)


def run_plan(service: PlanService, caller: Caller, plan_id: str) -> dict[str, Any]:
    """Answer every part of the stored plan ``plan_id``, charging what is not yet released, once."""
    stored = service.stored(caller, plan_id)
    _, planned, row = service.plan(stored.spec_json)
    service.authorise(caller, planned, Action.QUERY_RUN, plan_id)
    queries = service.queries
    scopes = ledger.scopes_for(row.name, caller.name, caller.agency, datetime.now(timezone.utc))
    deadline = time.monotonic() + queries.wait_limit.total_seconds()
    while True:
        with Session(reader(service.db)) as session:
            cached = service.cached(session, planned, row.version)
            fresh = [i for i in range(len(planned.groups)) if i not in cached]
            run_hash = sha256_text(json.dumps({"plan": plan_id, "questions": [planned.groups[i].question_hash
                                                                              for i in fresh]}))
            pending = computations.running(session, row.name, row.version, run_hash) if fresh else None
        if not fresh:
            return _answer(service, caller, planned, row, cached, {}, charged=0, plan_id=plan_id)
        if pending is not None:  # the same run is being computed: wait for its releases rather than pay twice
            if computations.abandon_stale(service.db, queries.computation_timeout, only=pending) == 0:
                if time.monotonic() > deadline:
                    raise DatasetUnavailable("plan", "a run of this plan is still being computed",
                                             "Ask again later: its answers will then be served at no cost")
                time.sleep(0.05)
            continue
        amount = planned.accounting.charge_of(compose(planned.groups[i].loss for i in fresh))
        claimed = _charge(service, caller, planned, row, plan_id, run_hash, amount, scopes, cached)
        if claimed is None:
            continue  # another run claimed it first: wait for it
        releases = _compute(service, caller, planned, row, fresh, claimed, run_hash)
        return _answer(service, caller, planned, row, cached, releases, charged=amount, plan_id=plan_id)


class _Released(Exception):
    """Raised inside the charging transaction when the groups were released meanwhile (rolls it back)."""


def _charge(service: PlanService, caller: Caller, planned: WorkloadPlan, row: Any, plan_id: str, run_hash: str,
            amount: int, scopes: list[ledger.Scope], cached: dict[int, Release]) -> computations.Claim | None:
    """Claim the run and pay its total, with one audit entry listing the parts, before any data is read."""
    caps = service.queries.caps
    parts = [{"name": p.name, "group": p.group, "cached": p.group in cached,
              "derived_from": planned.groups[p.group].parts[0] if p.rollup else None,
              "question_hash": planned.groups[p.group].question_hash} for p in planned.parts]
    fresh = {i for i in range(len(planned.groups)) if i not in cached}
    try:
        with session_scope(service.db) as session:
            claimed = computations.claim(session, caller, row.name, row.version, run_hash, amount, scopes, caps)
            # Inside the charging transaction (it holds the write lock): a run that finished since
            # this one looked has released these groups, and paying for them again would waste budget.
            if fresh & set(service.cached(session, planned, row.version)):
                raise _Released
            record(session, caller, "plan.run", row.name, dataset=row.name, dataset_version=row.version,
                   computation_id=claimed.id, plan_id=plan_id, query_hash=run_hash, parts=parts,
                   loss_micro=amount, ledger=list(claimed.changes))
    except _Released:
        return None  # rolled back, nothing charged: answered from those releases
    except ledger.BudgetRefused as refused:
        with Session(reader(service.db)) as session:
            if fresh & set(service.cached(session, planned, row.version)):
                return None  # refused only because a concurrent run of the same groups spent first
        with session_scope(service.db) as session:
            record(session, caller, "plan.run", row.name, "refused", reason=str(refused), plan_id=plan_id,
                   query_hash=run_hash, loss_micro=0)
        raise
    except IntegrityError:
        return None
    return claimed


def _stored_meanwhile(session: Session, row: Any, question_hash: str) -> Release | None:
    """The release of a group stored by another run (of another plan sharing it) after this one was charged.

    Storing ours would break the release's uniqueness and roll back every group of this run, whose
    charge stays: the run answers with the stored release instead (this run paid for it too)."""
    return session.exec(select(Release).where(Release.dataset == row.name, Release.dataset_version == row.version,
                                              Release.query_hash == question_hash)).first()


def _compute(service: PlanService, caller: Caller, planned: WorkloadPlan, row: Any, fresh: list[int],
             claimed: computations.Claim, run_hash: str) -> dict[int, tuple[int, str]]:
    """Read the data for each fresh group and store its release; on any failure the charge stays."""
    engine = service.queries.engine
    try:
        bodies = {}
        for i in fresh:
            result = engine.execute(planned.groups[i].plan)
            bodies[i] = {"columns": result.table.columns, "rows": result.table.to_dicts(),
                         "loss": result.loss.as_dict(), "contributions": result.contributions,
                         "confidence": result.confidence, "mechanisms": result.mechanisms, "notes": result.notes,
                         "tables": {}}
        releases: dict[int, tuple[int, str]] = {}  # group -> (release id, stored document)
        first: Release | None = None  # the charge's ledger rows are linked to the first group's release
        with session_scope(service.db) as session:
            for i, body in bodies.items():
                group = planned.groups[i]
                stored = _stored_meanwhile(session, row, group.question_hash)
                if stored is not None:  # another plan's run released this group since ours looked: keep theirs
                    releases[i] = (int(stored.id or 0), stored.result_json)
                    first = first if i != fresh[0] else stored
                    continue
                document = canonical_json(body)
                release = Release(dataset=row.name, dataset_version=row.version, query_hash=group.question_hash,
                                  canonical_query=group.question,
                                  loss_micro=planned.accounting.charge_of(group.loss), result_json=document,
                                  result_hash=sha256_text(document), account_id=caller.account_id)
                session.add(release)
                session.flush()
                record(session, caller, "query.release", row.name, "released", dataset=row.name,
                       dataset_version=row.version, computation_id=claimed.id, release_id=release.id,
                       query_hash=group.question_hash, loss_micro=0, result_hash=release.result_hash,
                       plan_run=run_hash)
                releases[i] = (int(release.id or 0), document)
                first = first if i != fresh[0] else release
            computations.complete(session, claimed, first)
    except Exception:
        log.exception("plan run on %s failed after its charge (computation %s)", row.name, claimed.id)
        computations.fail(service.db, caller, claimed, row.name, row.version, run_hash)
        raise DatasetUnavailable("dataset", computations.FAILED_TEXT,
                                 "Ask the data steward to check the dataset's files against metadata.json") from None
    return releases


def _answer(service: PlanService, caller: Caller, planned: WorkloadPlan, row: Any, cached: dict[int, Release],
            fresh: dict[int, tuple[int, str]], *, charged: int, plan_id: str) -> dict[str, Any]:
    """Every part's table with its interval; cached groups' use recorded like a cached answer."""
    stored = {**{i: (int(r.id or 0), r.result_json) for i, r in cached.items()}, **fresh}
    tables = {i: plan_run.table_of(json.loads(document)) for i, (_, document) in stored.items()}
    if cached:
        with session_scope(service.db) as session:
            record(session, caller, "plan.run", row.name, "cached", dataset=row.name, dataset_version=row.version,
                   plan_id=plan_id, release_ids=sorted(int(r.id or 0) for r in cached.values()), loss_micro=0)
    answers = plan_run.answers(planned, tables)
    scopes = ledger.scopes_for(row.name, caller.name, caller.agency, datetime.now(timezone.utc))
    with Session(reader(service.db)) as session:
        budgets = ledger.statuses(session, row.name, scopes, defaults=service.queries.caps)
    parts = []
    for part in planned.parts:
        table = answers[part.name]
        parts.append({"name": part.name, "columns": table.columns, "rows": table.to_dicts(),
                      "release_id": stored[part.group][0], "cached": part.group in cached,
                      "derived_from": planned.groups[part.group].parts[0] if part.rollup else None,
                      "confidence": part.context.spec.confidence, "predicted": part.predicted})
    return {"plan_id": plan_id, "dataset": row.name, "dataset_version": row.version,
            "charged": planned.accounting.shown(charged), "charged_amount": charged, "unit": planned.accounting.unit,
            "parts": parts, "budgets": [b.as_dict() for b in budgets]}
