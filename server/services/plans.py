"""Workload plans for analysts: estimate and store (free), read, and run (one charge for all parts).

authorise every part as the query it is (Casbin, per-query caps) -> plan the workload
from the dataset's public metadata (no data read) -> price what is not already released
-> compare with the caller's remaining budgets (every scope). Running is in
:mod:`civicdp.server.services.plan_runs`. A plan is stored as its document and planned
again at every use against the version then served, so it reruns on the next version.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.privacy.loss import MICRO, NANO
from civicdp.queries.errors import QueryError
from civicdp.queries.plans import report
from civicdp.queries.plans.planner import WorkloadPlan, plan_workload
from civicdp.queries.plans.spec import PlanSpec, parse_plan
from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.services.query_service import QueryService
from civicdp.server.state import ledger, registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import AccessDenied, NotFound
from civicdp.server.state.models import Release
from civicdp.server.state.plan_models import WorkloadPlanRow


class PlanService:
    """Plans of the analysts of one server, on the query service's engine, policies and budgets."""

    def __init__(self, queries: QueryService) -> None:
        self.queries = queries
        self.db = queries.db

    # -- planning ---------------------------------------------------------------------

    def plan(self, raw: Any) -> tuple[PlanSpec, WorkloadPlan, Any]:
        """The workload planned on the dataset's served version, and that version's row."""
        spec = parse_plan(raw)
        if spec.dataset is None:
            raise QueryError("dataset", "name the dataset the plan queries", 'Add "dataset": "<name>" to the plan')
        with Session(reader(self.db)) as session:
            row = registry.served(session, spec.dataset)
        planned = plan_workload(spec, registry.metadata_of(row), Path(row.path), self.queries.engine.limits)
        return spec, planned, row

    def authorise(self, caller: Caller, planned: WorkloadPlan, action: Action, plan_id: str | None = None) -> None:
        """Every part checked as the query it is: its dataset and columns, at its group's epsilon."""
        dataset = planned.metadata.name
        slot = current_slot()
        if slot is not None:
            slot.action, slot.target = ("plan.run" if action is Action.QUERY_RUN else "plan.estimate"), dataset
            slot.detail = {"dataset": dataset, "dataset_version": planned.metadata.version, "plan_id": plan_id,
                           "parts": [p.name for p in planned.parts], "loss_micro": 0}
        for part in planned.parts:
            group = planned.groups[part.group]
            objects = [f"dataset:{dataset}", *(f"column:{dataset}/{c}" for c in sorted(_columns(part)))]
            decision = self.queries.policies.check_all(caller.subject, caller.agency, objects, action,
                                                       group.loss.as_dict()["epsilon"])
            if not decision.allowed:
                if slot is not None:
                    slot.rule = decision.rule
                with session_scope(self.db) as session:
                    record(session, caller, "plan.run" if action is Action.QUERY_RUN else "plan.estimate", dataset,
                           "denied", reason=f"part {part.name}: {decision.reason}", plan_id=plan_id,
                           part=part.name, rule=decision.rule)
                raise AccessDenied(f"part '{part.name}': {decision.reason}", decision.rule)
            if slot is not None:
                slot.rule = decision.rule

    def cached(self, session: Session, planned: WorkloadPlan, version: str) -> dict[int, Release]:
        """Groups whose identical question (mechanisms included) was released on this version."""
        found = {}
        for i, group in enumerate(planned.groups):
            stored = session.exec(select(Release).where(
                Release.dataset == planned.metadata.name, Release.dataset_version == version,
                Release.query_hash == group.question_hash)).first()
            if stored is not None:
                found[i] = stored
        return found

    def estimate(self, caller: Caller, raw: Any, plan_id: str | None = None) -> dict[str, Any]:
        """Each part's loss and predicted accuracy, the total, and how it fits the caller's budgets. Free."""
        spec, planned, row = self.plan(raw)
        self.authorise(caller, planned, Action.QUERY_ESTIMATE, plan_id)
        scopes = ledger.scopes_for(row.name, caller.name, caller.agency, datetime.now(timezone.utc))
        with Session(reader(self.db)) as session:
            cached = frozenset(self.cached(session, planned, row.version))
            budgets = ledger.statuses(session, row.name, scopes, defaults=self.queries.caps)
        unit = NANO if planned.accounting.zcdp else MICRO
        available = min(b.remaining_micro for b in budgets) / unit
        total = spec.total.epsilon if spec.total else None
        return {**report.describe(planned, cached), "fit": report.fit(planned, available, cached, total),
                "budgets": [b.as_dict() for b in budgets]}

    # -- stored plans -------------------------------------------------------------------

    def create(self, caller: Caller, raw: Any) -> dict[str, Any]:
        """Estimate the plan and store it for later runs; returns its id with the estimate."""
        spec = parse_plan(raw)
        plan_id = "plan_" + secrets.token_hex(8)
        answer = self.estimate(caller, spec, plan_id)
        canonical = spec.canonical()
        with session_scope(self.db) as session:
            session.add(WorkloadPlanRow(id=plan_id, dataset=str(spec.dataset), account_id=caller.account_id,
                                        agency=caller.agency, spec_json=canonical,
                                        spec_hash=hashlib.sha256(canonical.encode()).hexdigest()))
            record(session, caller, "plan.create", str(spec.dataset), dataset=spec.dataset, plan_id=plan_id,
                   plan=canonical, loss_micro=0)
        return {"id": plan_id, "plan": spec.model_dump(mode="json"), **answer}

    def stored(self, caller: Caller, plan_id: str) -> WorkloadPlanRow:
        """A stored plan of the caller's agency (others' plans answer 404, as if absent)."""
        with Session(reader(self.db)) as session:
            row = session.get(WorkloadPlanRow, plan_id)
        if row is None or row.agency != caller.agency:
            raise NotFound(f"no plan '{plan_id}' of your agency")
        return row

    def get(self, caller: Caller, plan_id: str) -> dict[str, Any]:
        """A stored plan with its estimate on the dataset's version served now."""
        row = self.stored(caller, plan_id)
        answer = self.estimate(caller, row.spec_json, plan_id)
        return {"id": row.id, "created_at": row.created_at.isoformat(), "plan": parse_plan(row.spec_json).model_dump(
            mode="json"), **answer}


def _columns(part: Any) -> set[str]:
    spec = part.context.spec
    names = [spec.column, *(g.column for g in part.context.group_by), *(f.column for f in part.context.filters)]
    return {c for c in names if c}
