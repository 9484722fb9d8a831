"""docs/metadata.md names every field of a plan document (as tests/test_docs_metadata.py does for specs)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from civicdp.queries.plans.spec import PlanPart, PlanSpec, Target, Total
from tests.test_docs_metadata import _documented


@pytest.mark.parametrize("model", [PlanSpec, PlanPart, Target, Total], ids=lambda m: m.__name__)
def test_every_plan_field_is_on_the_page(model: type[BaseModel]) -> None:
    missing = sorted(set(model.model_fields) - _documented())
    assert missing == [], f"{model.__name__}: document {missing} in docs/metadata.md"
