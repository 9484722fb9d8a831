"""Bundle discovery end to end: over HTTP (charged, cached, capped), through the Python
client as DataFrames, and on the command line. Setup: tests/server/api_fixtures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from civicdp.queries import client as analyst_client
from civicdp.server.entry import app
from tests.conftest import MakeDataset
from tests.server.api_fixtures import ANALYST, DATASET, Api, ViaTestClient, assert_charged
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures

BUNDLES = {"dataset": DATASET, "analysis": "bundles", "item": "service", "epsilon": 0.5, "max_pairs": 3}
CHANGES = {"dataset": DATASET, "analysis": "bundle-changes", "item": "service", "epsilon": 0.4,
           "max_pairs": 3, "window_days": 20, "baseline": {"start": "2025-01-01", "end": "2025-04-01"},
           "period": {"start": "2025-04-01", "end": "2025-07-01"}}


def test_bundles_over_http_are_charged_and_answered_with_all_tables(api: Api) -> None:
    estimate = api.post(ANALYST, "/v1/queries/estimate", json=BUNDLES)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["loss"]["epsilon"] == pytest.approx(0.5)
    before = api.spent_micro(ANALYST)
    response = api.query(ANALYST, BUNDLES)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_charged(api, ANALYST, before, answer)
    assert answer["columns"][:7] == ["rank", "service_a", "service_b", "value", "ci_low", "ci_high", "above_zero"]
    assert len(answer["rows"]) == 3  # every pair of the 3-service catalogue
    assert set(answer["tables"]) == {"bundles", "items"}
    assert answer["tables"]["items"]["rows"][-1]["service"] == "(all people)"
    again = api.query(ANALYST, BUNDLES).json()
    assert again["cached"] is True and again["rows"] == answer["rows"]


def test_bundles_obey_the_per_query_cap_and_name_bad_fields(api: Api) -> None:
    refused = api.query(ANALYST, {**BUNDLES, "epsilon": 1.0})
    assert refused.status_code == 403
    invalid = api.query(ANALYST, {**BUNDLES, "window_days": 0})
    assert invalid.status_code == 422 and invalid.json()["field"] == "window_days"


def test_the_python_client_returns_pairs_and_bundles_as_dataframes(api: Api) -> None:
    with analyst_client.Client("http://testserver", api.keys[ANALYST], transport=ViaTestClient(api.client)) as client:
        pairs, bundles = client.bundles({k: v for k, v in BUNDLES.items() if k != "analysis"})
        assert isinstance(pairs, pd.DataFrame) and isinstance(bundles, pd.DataFrame)
        assert {"service_a", "service_b", "lift", "lift_low", "lift_high", "linked"} <= set(pairs.columns)
        assert list(bundles.columns) == ["bundle", "size", "members", "value", "ci_low", "ci_high", "pairs"]
        assert bundles.attrs["epsilon"] == pytest.approx(0.5)
        changes, bundle_changes = client.bundles(CHANGES)
        assert {"baseline", "period", "change", "change_low", "change_high", "status"} <= set(changes.columns)
        assert "status" in bundle_changes.columns
        assert any("same people" in note for note in changes.attrs["notes"])


def test_the_command_line_prints_pairs_and_bundles(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    spec = tmp_path / "bundles.json"
    spec.write_text(json.dumps({k: v for k, v in BUNDLES.items() if k != "dataset"}))
    result = CliRunner().invoke(app, ["query", str(dataset.path), str(spec)], env={"COLUMNS": "320"})
    assert result.exit_code == 0, result.output
    assert "service_a" in result.output and "bundles" in result.output and "epsilon=0.5" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"analysis": "bundles", "item": "service", "epsilon": 0.5, "top_k": 99}))
    refused = CliRunner().invoke(app, ["query", str(dataset.path), str(bad)])
    assert refused.exit_code == 2 and "top_k" in refused.output


def test_the_example_specs_plan_against_the_demo_metadata() -> None:
    """examples/bundles.json and bundle_changes.json are valid for ``civicdp demo-data`` (no data read)."""
    from civicdp.queries.engine import Engine
    from civicdp.queries.metadata import parse_metadata
    from civicdp.synthetic.demo_data import _metadata

    metadata = parse_metadata(_metadata(seed=0, people=10))
    root = Path(__file__).resolve().parents[3] / "examples"
    for name in ("bundles.json", "bundle_changes.json"):
        plan = Engine().plan(json.loads((root / name).read_text()), metadata, root)
        assert 0 < plan.loss.epsilon <= 0.5  # within an analyst's per-query cap
