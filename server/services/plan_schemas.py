"""OpenAPI shapes of workload plans (``/v1/plans``): the body as written, and the answers.

The plan service validates a plan itself (``civicdp.queries.plans.spec.parse_plan``: its errors name
the part and the fix) and answers with dicts built by the planner; these models document both and
validate nothing. A part is written flat: a query spec (without ``epsilon``, which the planner
chooses) plus its name and either an accuracy target or a weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, Field

from civicdp.queries.plans.spec import PlanSpec, Target, Total
from civicdp.queries.spec import QuerySpec
from civicdp.server.services import documented_shapes as shapes
from civicdp.server.services.request_bodies import DocumentAs, DocumentedObject, QueryRequest
from civicdp.server.services.schemas import BudgetOut, Loss

Scalar = shapes.Scalar
Stored = Annotated[dict[str, Any], DocumentAs(QueryRequest)]


class PlanPartIn(QuerySpec):
    """One part: a query spec written flat, with its name and an accuracy target or a weight."""

    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.\-]+$")
    accuracy: Target | None = Field(default=None, description="The accuracy the part must meet")  # type: ignore[assignment]
    weight: float | None = Field(default=None, gt=0, description="Or a share of what is left, by weight")


class PlanIn(BaseModel):
    dataset: str | None = None
    contributions: int | None = Field(default=None, ge=1)
    total: Total | None = Field(default=None, description="An upper bound on the plan's total loss")
    parts: list[PlanPartIn]


class PlanRequest(DocumentedObject):
    description = ("A workload plan: the dataset and its parts, each a query spec with an accuracy target or a "
                   "weight (docs/metadata.md, 'Plans'). The planner chooses every part's loss.")
    examples = [{"dataset": "civic-demo", "parts": [
        {"name": "by_channel", "aggregate": "count", "group_by": ["channel"], "accuracy": {"half_width": 200}},
        {"name": "by_centre", "aggregate": "count", "group_by": ["centre"], "accuracy": {"half_width": 300}}]}]

    @classmethod
    def models(cls) -> Sequence[type[BaseModel]]:
        return [PlanIn]


Predicted = dict[str, Scalar | list[Scalar] | dict[str, Scalar]]


class PlannedPart(BaseModel):
    name: str
    aggregate: str
    target: dict[str, Scalar] | None = Field(description="The part's accuracy target, if it has one")
    weight: float | None
    group: int = Field(description="Index of the group (one release) that answers it")
    loss: Loss | None = Field(description="Its group's loss; null when it is rolled up from another part, free")
    derived_from: str | None
    cached: bool = Field(description="Answered by a stored release: free")
    predicted: Predicted | None = Field(description="Predicted accuracy at the chosen loss")


class PlannedGroup(BaseModel):
    parts: list[str]
    query: Stored
    loss: Loss
    mechanisms: Annotated[list[dict[str, Any]], DocumentAs(list[shapes.Mechanism])]
    cached: bool


class PlanFit(BaseModel):
    fits: bool
    required: float
    available: float
    unit: str
    total_limit: float | None = None
    uniform_factor: float | None = Field(default=None, description="When it does not fit: loosen every target by this")
    best_reachable: dict[str, dict[str, Scalar]] | None = None
    loosen_one: list[dict[str, list[str] | float]] | None = None
    note: str | None = None


class PlanOut(BaseModel):
    """A plan with its estimate: losses chosen per group, predicted accuracy per part, whether it fits."""

    id: str
    created_at: str | None = Field(default=None, description="When it was stored (reading a stored plan)")
    plan: Annotated[dict[str, Any], DocumentAs(PlanSpec)] = Field(
        description="The plan as stored (canonical: each part's query nested under query)")
    dataset: str
    dataset_version: str
    accounting: dict[str, Scalar]
    contributions: int
    parts: list[PlannedPart]
    groups: list[PlannedGroup]
    total: Loss
    to_charge: Loss = Field(description="What running it now would charge (cached groups are free)")
    to_charge_amount: int
    unit: str
    fit: PlanFit
    budgets: list[BudgetOut]


class PlanPartAnswer(BaseModel):
    name: str
    columns: list[str]
    rows: Annotated[list[dict[str, Any]], DocumentAs(list[shapes.ResultRow])]
    release_id: int
    cached: bool
    derived_from: str | None
    confidence: float
    predicted: Predicted | None


class PlanRunOut(BaseModel):
    plan_id: str
    dataset: str
    dataset_version: str
    charged: dict[str, Scalar]
    charged_amount: int
    unit: str
    parts: list[PlanPartAnswer]
    budgets: list[BudgetOut]
