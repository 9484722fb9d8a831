"""The command line: bad input gives one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from civicdp.server.entry import app
from tests.conftest import MakeDataset

runner = CliRunner()


def _spec(tmp_path: Path, spec: object, name: str = "spec.json") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_query_prints_values_intervals_and_loss(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    spec = _spec(tmp_path, {"aggregate": "count", "group_by": ["service"], "epsilon": 0.5})
    result = runner.invoke(app, ["query", str(dataset.path), str(spec)])
    assert result.exit_code == 0, result.output
    assert "ci_low" in result.output and "epsilon=0.5" in result.output


def test_query_json_output_is_machine_readable(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    spec = _spec(tmp_path, {"aggregate": "count", "group_by": ["service"], "epsilon": 0.5})
    result = runner.invoke(app, ["query", str(dataset.path), str(spec), "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert [row["service"] for row in answer["table"]] == ["A", "B", "C"]
    assert answer["loss"]["epsilon"] == 0.5


def test_estimate_reads_no_data(make_dataset: MakeDataset, tmp_path: Path) -> None:
    dataset = make_dataset()
    (dataset.path / "events.parquet").unlink()
    spec = _spec(tmp_path, {"aggregate": "count", "accuracy": 20})
    result = runner.invoke(app, ["estimate", str(dataset.path), str(spec)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"]["half_width"] <= 20


@pytest.mark.parametrize("spec, message", [
    ("{not json", "not valid JSON"),
    ({"aggregate": "count", "epsilon": 0}, "greater than 0"),
    ({"aggregate": "count", "group_by": ["nope"], "epsilon": 1}, "unknown column 'nope'"),
    ({"aggregate": "sum", "column": "score", "epsilon": 1}, "no declared bounds"),
], ids=["bad-json", "zero-loss", "unknown-column", "unbounded-sum"])
def test_bad_specs_fail_cleanly(make_dataset: MakeDataset, tmp_path: Path, spec: object, message: str) -> None:
    dataset = make_dataset()
    result = runner.invoke(app, ["query", str(dataset.path), str(_spec(tmp_path, spec))])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_and_spec_fail_cleanly(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"aggregate": "count", "epsilon": 1})
    result = runner.invoke(app, ["query", str(tmp_path / "absent"), str(spec)])
    assert result.exit_code == 2 and "no metadata file" in result.output
    result = runner.invoke(app, ["estimate", str(tmp_path), str(tmp_path / "absent.json")])
    assert result.exit_code == 2 and "no query spec file" in result.output


def test_demo_data_and_tour(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo-data", "--people", "3000", "--out", str(out), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "metadata.json").exists() and (out / "events.parquet").exists()
    result = runner.invoke(app, ["tour", "--data", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("privacy loss spent") == 4
    # W1 (1) + bundles (0.5) + report, lagged points, scores (1 each) + the monitor (0.5)
    assert "total privacy loss of the tour: epsilon=5 " in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("total privacy loss of the tour")


def test_missing_or_mismatched_data_files_fail_cleanly(make_dataset: MakeDataset, tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"aggregate": "count", "group_by": ["service"], "epsilon": 1})
    missing = make_dataset(name="missing")
    (missing.path / "events.parquet").unlink()
    mismatched = make_dataset(name="mismatched")
    metadata = json.loads((mismatched.path / "metadata.json").read_text())
    metadata["tables"]["events"]["columns"]["service"]["keys"] = ["A", "B", "C"]
    metadata["tables"]["events"]["columns"]["service_renamed"] = metadata["tables"]["events"]["columns"].pop("service")
    (mismatched.path / "metadata.json").write_text(json.dumps(metadata))
    renamed = _spec(tmp_path, {"aggregate": "count", "group_by": ["service_renamed"], "epsilon": 1}, "r.json")
    for folder, query in ((missing.path, spec), (mismatched.path, renamed)):
        result = runner.invoke(app, ["query", str(folder), str(query)])
        assert result.exit_code == 2, result.output
        assert "do not have the columns and types its metadata declares" in result.output
        assert "Traceback" not in result.output
