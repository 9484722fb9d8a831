"""``civicdp plan FILE.json`` and ``Client.plan``/``run_plan``: the planner from the command line and from Python."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from civicdp.queries.client import Client
from civicdp.server.entry import app
from tests.conftest import MakeDataset
from tests.server.api_fixtures import ANALYST, Api, ViaTestClient
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures
from tests.server.services.test_plans import PLAN

runner = CliRunner()


def _file(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return path


def test_plan_prints_each_part_and_the_total(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    plan = {**PLAN, "dataset": None}
    result = runner.invoke(app, ["plan", str(_file(tmp_path, plan)), "--data", str(dataset.path)])
    assert result.exit_code == 0, result.output
    assert "wait_median" in result.output and "total: epsilon" in result.output
    as_json = runner.invoke(app, ["plan", str(_file(tmp_path, plan)), "--data", str(dataset.path), "--json"])
    assert json.loads(as_json.output)["parts"][0]["name"] == "by_channel"


def test_a_bad_plan_is_one_line_and_status_2(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    bad = {"parts": [{"name": "a", "aggregate": "count", "epsilon": 0.1}]}
    result = runner.invoke(app, ["plan", str(_file(tmp_path, bad)), "--data", str(dataset.path)])
    assert result.exit_code == 2 and "parts.0.epsilon" in result.output
    assert "Traceback" not in result.output


def test_the_client_plans_and_runs(api: Api) -> None:
    client = Client("http://testserver", api.keys[ANALYST], transport=ViaTestClient(api.client))
    planned = client.plan(PLAN)
    assert client.get_plan(planned["id"])["total"] == planned["total"]
    frames = client.run_plan(planned["id"])
    assert list(frames) == [p["name"] for p in PLAN["parts"]]
    assert frames["wait_p90"].attrs["plan"]["charged"]["epsilon"] > 0
    assert {"value", "ci_low", "ci_high"} <= set(frames["by_channel"].columns)
