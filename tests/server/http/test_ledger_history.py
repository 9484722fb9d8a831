"""The ledger's history shows each charge with the cap in force when it was charged (issue 15).

The budget row keeps only today's cap; oversight reading the history (``GET /v1/audit/ledger``,
``civicdp audit ledger``) must see the cap each charge was checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from civicdp.server.entry import app as cli
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, DATASET, OVERSIGHT, STEWARD, Api, ViaTestClient, api, count_query, dataset_folder,
)

runner = CliRunner()


@contextmanager
def _cli_through(api: Api) -> Iterator[None]:
    """The command line's HTTP client talks to the in-process app."""
    import civicdp.queries.client as client_module

    original = client_module.httpx.Client

    def through(*args: Any, **kwargs: Any) -> httpx.Client:
        kwargs["transport"] = ViaTestClient(api.client)
        return original(*args, **kwargs)

    client_module.httpx.Client = through  # type: ignore[misc]
    try:
        yield
    finally:
        client_module.httpx.Client = original  # type: ignore[misc]


def _use_state(monkeypatch: pytest.MonkeyPatch, api: Api) -> None:
    """Point the command line's steward commands at the app's state."""
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    for name in ("CIVICDP_DATABASE_URL", "CIVICDP_INIT_STATE", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _cli_history(output: str) -> list[dict[str, str]]:
    """The history table ``civicdp audit ledger`` prints (after the budgets), one dict per row."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["time"])
    header = lines[start].split()
    return [dict(zip(header, line.split(), strict=True)) for line in lines[start + 1:] if line.strip()]


def test_the_history_shows_the_cap_each_charge_was_made_under(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cap 1.0, a charge, the cap raised to 2.0, a charge: the history shows 1.0 then 2.0."""
    cap = {"dataset": DATASET, "scope": "analyst", "subject": ANALYST, "epsilon": 1.0}
    assert api.call(STEWARD, "PUT", "/v1/budgets/caps", json=cap).status_code == 200
    assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200
    _use_state(monkeypatch, api)
    raised = runner.invoke(cli, ["budgets", "set", DATASET, "analyst", "2.0", "--subject", ANALYST])
    assert raised.exit_code == 0, raised.output
    assert api.query(ANALYST, count_query(epsilon=0.2)).status_code == 200

    view = api.get(OVERSIGHT, "/v1/audit/ledger", params={"dataset": DATASET}).json()
    [budget] = [b for b in view["budgets"] if b["scope"] == "analyst" and b["subject"] == ANALYST]
    assert budget["cap_micro"] == 2_000_000  # the budget: today's cap
    charges = [h for h in view["history"] if h["scope"] == "analyst" and h["subject"] == ANALYST]
    assert [(h["cap_micro"], h["before_micro"], h["after_micro"]) for h in charges] == \
        [(1_000_000, 0, 100_000), (2_000_000, 100_000, 300_000)]

    oversight = {"CIVICDP_URL": "http://testserver", "CIVICDP_API_KEY": api.keys[OVERSIGHT]}
    with _cli_through(api):
        shown = runner.invoke(cli, ["audit", "ledger", "--dataset", DATASET], env=oversight)
    assert shown.exit_code == 0, shown.output
    rows = [r for r in _cli_history(shown.output) if r["scope"] == "analyst" and r["subject"] == ANALYST]
    assert [(r["cap_micro"], r["after_micro"]) for r in rows] == [("1000000", "100000"), ("2000000", "300000")]
