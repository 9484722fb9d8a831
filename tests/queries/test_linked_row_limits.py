"""Row limits of linked tables (issue 14): a ``privacy_unit_via`` table (steps per case) keeps
at most its own ``max_contributions`` rows per person by default, or the dataset's when it
declares none, and every answer that reads it says which limit it used and where it came from.

The noise is checked too: the limit is the sensitivity of a count, so a table's own limit
changes the mechanism's scale (a limit left out of the calibration would not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from civicdp.queries.engine import LocalDataset
from civicdp.queries.errors import MetadataError
from civicdp.queries.metadata import parse_metadata
from tests.queries import perf_data

STEPS_COUNT = {"table": "steps", "aggregate": "count", "group_by": ["step"], "epsilon": 1.0}


def _dataset(tmp_path: Path, steps_limit: int | None) -> LocalDataset:
    folder = perf_data.write(tmp_path / f"linked-{steps_limit}", people=300)
    if steps_limit is not None:
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata["tables"]["steps"]["max_contributions"] = steps_limit
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return LocalDataset(folder)


def _linked_notes(notes: list[str]) -> list[str]:
    return [n for n in notes if n.startswith("table 'steps' reaches the privacy unit through events.event_id")]


def test_without_its_own_limit_a_linked_table_takes_the_dataset_bound_and_says_so(tmp_path: Path) -> None:
    local = _dataset(tmp_path, None)
    result = local.run(STEPS_COUNT)
    assert result.contributions == perf_data.MAX_CONTRIBUTIONS
    [note] = _linked_notes(result.notes)
    assert f"at most {perf_data.MAX_CONTRIBUTIONS} of its rows per person_id were kept" in note
    assert "from the dataset's max_contributions: the table declares no max_contributions of its own" in note
    assert _linked_notes(local.estimate(STEPS_COUNT).notes) == [note]
    assert _linked_notes(local.run({**STEPS_COUNT, "table": "events", "group_by": ["channel"]}).notes) == []


def test_a_linked_tables_own_limit_bounds_its_rows_and_scales_the_noise(tmp_path: Path) -> None:
    default = _dataset(tmp_path, None).run(STEPS_COUNT)
    own = _dataset(tmp_path, 2 * perf_data.MAX_CONTRIBUTIONS).run(STEPS_COUNT)
    assert own.contributions == 2 * perf_data.MAX_CONTRIBUTIONS
    assert own.mechanisms[0]["sensitivity"] == 2 * default.mechanisms[0]["sensitivity"]
    assert own.mechanisms[0]["scale"] == pytest.approx(2 * default.mechanisms[0]["scale"])
    [note] = _linked_notes(own.notes)
    assert f"(default {2 * perf_data.MAX_CONTRIBUTIONS}, from tables.steps.max_contributions)" in note
    asked = _dataset(tmp_path, 2 * perf_data.MAX_CONTRIBUTIONS).run({**STEPS_COUNT, "contributions": 3})
    assert "at most 3 of its rows per person_id were kept" in _linked_notes(asked.notes)[0]


def test_lagged_steps_name_the_steps_limit_in_their_notes(tmp_path: Path) -> None:
    local = _dataset(tmp_path, 4)
    spec = {"analysis": "lagged_points", "level": "steps", "epsilon": 1.0}
    for notes in (local.estimate(spec).notes, local.run(spec).notes):
        [note] = _linked_notes(notes)
        assert "at most 4 of its rows per person_id were kept (default 4, from tables.steps.max_contributions)" in note


def test_a_table_limit_is_refused_on_a_table_holding_the_unit_or_above_the_limit() -> None:
    metadata = perf_data.metadata()
    metadata["tables"]["events"]["max_contributions"] = 2
    with pytest.raises(MetadataError, match="is for a table linked through privacy_unit_via"):
        parse_metadata(metadata)
    metadata = perf_data.metadata()
    metadata["tables"]["steps"]["max_contributions"] = metadata["max_contributions_limit"] + 1
    with pytest.raises(MetadataError, match="must not exceed max_contributions_limit"):
        parse_metadata(metadata)
