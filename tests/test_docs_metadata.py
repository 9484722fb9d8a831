"""docs/metadata.md names every field of metadata.json and of every query spec.

A field added to the code and not to the page fails here: the page is the steward's and
the analyst's reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from civicdp.queries.analyses import ANALYSES
from civicdp.queries.metadata import AccountingMeta, ColumnMeta, DatasetMetadata, TableMeta
from civicdp.queries.spec import Filter, Grid, QuerySpec

PAGE = Path(__file__).resolve().parents[1] / "docs" / "metadata.md"
MODELS: list[type[BaseModel]] = [DatasetMetadata, TableMeta, ColumnMeta, AccountingMeta, QuerySpec, Filter, Grid,
                                 *{analysis.spec_model for analysis in ANALYSES.values()}]


def _documented() -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", PAGE.read_text())) | set(re.findall(r'"([a-z_]+)"', PAGE.read_text()))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_on_the_page(model: type[BaseModel]) -> None:
    # By the name in JSON (ColumnMeta's ``column_class`` is ``class`` in metadata.json).
    missing = sorted({field.alias or name for name, field in model.model_fields.items()} - _documented())
    assert missing == [], f"{model.__name__}: document {missing} in docs/metadata.md"


def test_every_analysis_is_on_the_page() -> None:
    names = {name.replace("-", "_") for name in ANALYSES}
    assert sorted(names - _documented()) == []


def test_the_check_sees_a_missing_field() -> None:
    """Guard against a vacuous check: a field name that is not on the page is reported."""
    assert "no_such_field_anywhere" not in _documented()
    assert {"privacy_unit", "max_contributions_limit", "privacy_unit_via", "nullable", "resolution"} <= _documented()
