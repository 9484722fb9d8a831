"""Column classes (issue 14): stated in metadata, changed by stewards (API and CLI), honoured and audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from civicdp.policies.actions import ColumnClass
from civicdp.queries.metadata import ColumnMeta
from civicdp.server.entry import app as cli
from civicdp.server.services import admin, classification
from civicdp.server.state.db import session_scope
from civicdp.server.state.errors import NotFound
from tests.conftest import base_metadata
from tests.server.api_fixtures import (ANALYST, DATASET, OVERSIGHT, STEWARD, Api, api, count_query, make_dataset_folder,
                                       running_api)  # noqa: F401 (api: a fixture)
from tests.server.services.test_control_plane import use_state

runner = CliRunner()
# Between the quasi-identifier cap (0.1) and the public cap (0.5) of policies/defaults.py.
BETWEEN_CAPS, BELOW_QUASI = 0.3, 0.05


def _metadata(**classes: str) -> dict[str, Any]:
    metadata = base_metadata()
    for column, column_class in classes.items():
        metadata["tables"]["events"]["columns"][column]["class"] = column_class
    return metadata


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    return make_dataset_folder(tmp_path / "datasets", metadata=_metadata(channel="quasi", satisfaction="sensitive"))


def _by(api: Api, column: str, epsilon: float) -> int:
    return api.query(ANALYST, count_query(group_by=[column], epsilon=epsilon)).status_code


def _details(api: Api, action: str) -> list[dict[str, Any]]:
    return [json.loads(entry.entry_json) for entry in api.records(action)]


def _reregister(api: Api, tmp_path: Path, version: str, **classes: str) -> None:
    metadata = _metadata(**classes)
    metadata["version"] = version
    folder = make_dataset_folder(tmp_path / f"v{version}", metadata=metadata)
    with session_scope(api.state.db) as session:
        admin.register_dataset(session, api.state.policies, None, folder)


def _classify(api: Api, who: str, column: str, body: Any, dataset: str = DATASET) -> Any:
    return api.call(who, "PUT", f"/v1/datasets/{dataset}/columns/{column}/class", json=body)


def test_a_class_in_metadata_sets_the_cap(api: Api) -> None:
    assert api.state.policies.class_of(DATASET, "channel") is ColumnClass.QUASI
    assert _by(api, "channel", BETWEEN_CAPS) == 403  # above the quasi cap, below the public one
    assert _by(api, "channel", BELOW_QUASI) == 200
    assert _by(api, "service", BETWEEN_CAPS) == 200  # not stated: public
    assert _by(api, "satisfaction", 0.001) == 403  # sensitive: at any epsilon
    registered = _details(api, "dataset.register")[-1]
    assert json.dumps({"channel": "quasi", "satisfaction": "sensitive"}) in json.dumps(registered)


def test_the_public_metadata_shows_the_stated_class(api: Api) -> None:
    columns = api.get(ANALYST, f"/v1/datasets/{DATASET}").json()["tables"]["events"]["columns"]
    assert columns["channel"]["class"] == "quasi" and columns["service"]["class"] is None


def test_a_steward_changes_a_class_by_the_api_in_force_at_the_next_request(api: Api) -> None:
    assert _by(api, "service", BETWEEN_CAPS) == 200
    response = _classify(api, STEWARD, "service", {"class": "quasi"})
    assert response.status_code == 200, response.text
    assert response.json() == {"dataset": DATASET, "column": "service", "class": "quasi", "changed": True}
    assert _by(api, "service", BETWEEN_CAPS) == 403
    assert _by(api, "service", BELOW_QUASI) == 200
    assert _classify(api, STEWARD, "service", {"class": "sensitive"}).status_code == 200
    assert _by(api, "service", BELOW_QUASI) == 403
    assert _classify(api, STEWARD, "channel", {"class": "public"}).status_code == 200
    assert _by(api, "channel", BETWEEN_CAPS) == 200
    entries = [e for e in _details(api, "column.classify")]
    assert len(entries) == 3
    text = json.dumps(entries)
    for part in ('"from": "public"', '"to": "quasi"', '"from": "quasi"', '"to": "sensitive"', '"to": "public"'):
        assert part in text
    again = _classify(api, STEWARD, "channel", {"class": "public"})
    assert again.json()["changed"] is False and len(_details(api, "column.classify")) == 3


@pytest.mark.parametrize("column, body, status", [
    ("service", {"class": "secret"}, 422),
    ("service", {}, 422),
    ("service", {"class": "quasi", "other": 1}, 422),
    ("nowhere", {"class": "quasi"}, 404),
])
def test_bad_classifications_are_refused_clearly(api: Api, column: str, body: Any, status: int) -> None:
    response = _classify(api, STEWARD, column, body)
    assert response.status_code == status, response.text
    assert _classify(api, STEWARD, "service", {"class": "quasi"}, dataset="absent").status_code == 404


@pytest.mark.parametrize("who", [ANALYST, OVERSIGHT])
def test_analysts_and_oversight_cannot_change_a_class(api: Api, who: str) -> None:
    response = _classify(api, who, "satisfaction", {"class": "public"})
    assert response.status_code == 403, response.text
    assert api.state.policies.class_of(DATASET, "satisfaction") is ColumnClass.SENSITIVE
    assert _details(api, "column.classify") == []


def test_re_registration_keeps_a_class_set_by_a_steward_and_a_stated_class_wins(api: Api, tmp_path: Path) -> None:
    assert _classify(api, STEWARD, "service", {"class": "quasi"}).status_code == 200
    _reregister(api, tmp_path, "2")  # no class stated anywhere
    assert api.state.policies.class_of(DATASET, "service") is ColumnClass.QUASI
    assert api.state.policies.class_of(DATASET, "channel") is ColumnClass.QUASI  # stated by version 1, kept
    assert _by(api, "service", BETWEEN_CAPS) == 403
    _reregister(api, tmp_path, "3", service="public", channel="sensitive")
    assert _by(api, "service", BETWEEN_CAPS) == 200
    assert _by(api, "channel", BELOW_QUASI) == 403


def test_a_steward_changes_a_class_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_dataset_folder(tmp_path / "datasets", metadata=_metadata(channel="quasi"))
    with running_api(tmp_path / "state", folder) as api:
        use_state(monkeypatch, api.settings)
        assert _by(api, "service", BETWEEN_CAPS) == 200
        result = runner.invoke(cli, ["datasets", "classify", DATASET, "service", "quasi"])
        assert result.exit_code == 0, result.output
        assert "now quasi" in result.output
        assert _by(api, "service", BETWEEN_CAPS) == 403
        assert '"to": "quasi"' in json.dumps(_details(api, "column.classify"))
        for args in (["absent", "service", "quasi"], [DATASET, "nowhere", "quasi"]):
            result = runner.invoke(cli, ["datasets", "classify", *args])
            assert result.exit_code != 0 and "no " in result.output, result.output
        result = runner.invoke(cli, ["datasets", "classify", DATASET, "service", "secret"])
        assert result.exit_code != 0 and "Traceback" not in result.output


def test_an_identifier_cannot_be_given_a_class() -> None:
    with pytest.raises(ValueError, match="identifier column cannot have a 'class'"):
        ColumnMeta.model_validate({"type": "int", "identifier": True, "class": "sensitive"})


def test_the_service_refuses_an_undeclared_column(api: Api) -> None:
    with session_scope(api.state.db) as session, pytest.raises(NotFound, match="declares no column"):
        classification.classify_column(session, api.state.policies, None, DATASET, "nowhere", ColumnClass.QUASI)
