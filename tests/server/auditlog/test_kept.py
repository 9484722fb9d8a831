"""The reconciliation's evidence kept between starts: a start folds only the newer entries, and still finds tampering.

The folded audit trail of the verified entries, the ledger folded up to an entry id and the
last stored answer checked are kept in the database (the evidence mark, authenticated like
the log's mark). Each "restart" here forgets what the test process remembered of the
database, as a new server process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from civicdp.server.auditlog import alarms as alarms_module
from civicdp.server.auditlog import kept, reconcile
from tests.server.api_fixtures import ANALYST, Api, count_query, dataset_folder, running_api  # noqa: F401
from tests.server.auditlog.test_reconcile import _ready, _spend_the_month


@pytest.fixture(autouse=True)
def keep_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kept, "KEEP_EVERY", 0)  # stored at every periodic check, not every 10,000 entries


@pytest.fixture
def folded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first entry number each fold of entries started from."""
    starts: list[int] = []
    original = reconcile._evidence_rows

    def spy(session: Any, after: int = -1, below: int | None = None) -> Iterator[tuple[int, str]]:
        starts.append(after + 1)
        return original(session, after, below)

    monkeypatch.setattr(reconcile, "_evidence_rows", spy)
    return starts


def _sql(api: Api, statement: str, **params: Any) -> None:
    with api.state.db.begin() as connection:
        connection.execute(text(statement), params)


def _restart(tmp_path: Path, keys: dict[str, str]) -> Any:
    alarms_module._ALARMS.clear()  # a new process: nothing remembered of the database
    return running_api(tmp_path / "state", None, keys=keys)


def _kept_state(tmp_path: Path, dataset_folder: Path) -> tuple[dict[str, str], int]:
    """Two charges, then a periodic check that keeps the evidence; the keys and the analyst budget's id."""
    with running_api(tmp_path / "state", dataset_folder) as first:
        budget = _spend_the_month(first)
        first.state.audit.checkpoint()  # the entries integrated into the stored tree: what a check verifies and marks
        first.state.audit.tick(force=True)
        assert _ready(first) == {"status": "ready"}
        return first.keys, int(budget.id)  # type: ignore[arg-type]


def test_a_start_folds_only_the_entries_after_the_kept_evidence(tmp_path: Path, dataset_folder: Path,
                                                                  folded: list[int]) -> None:
    keys, _ = _kept_state(tmp_path, dataset_folder)
    folded.clear()
    with _restart(tmp_path, keys) as api:
        assert _ready(api) == {"status": "ready"}
        released = max(r.seq for r in api.records("query.release"))
        assert folded and min(folded) > released  # not from entry 0: the charges and releases were folded before
        assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 409  # the real remainder: 0.01


def test_a_budget_and_its_ledger_reset_after_the_kept_evidence_are_caught_at_start(
        tmp_path: Path, dataset_folder: Path) -> None:
    keys, budget_id = _kept_state(tmp_path, dataset_folder)
    with _restart(tmp_path, keys) as api:
        _sql(api, "DELETE FROM ledgerentry WHERE budget_id = :i", i=budget_id)
        _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget_id)
    with _restart(tmp_path, keys) as api:
        [held] = _ready(api)["held_budgets"]
        assert held["budget_id"] == budget_id and held["problem"] == "spent amount differs from its audited charges"
        assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 503


def test_a_ledger_entry_deleted_below_the_kept_folds_is_caught_at_start(tmp_path: Path, dataset_folder: Path) -> None:
    """The ledger's kept folds no longer add up: the start folds the whole ledger again."""
    keys, budget_id = _kept_state(tmp_path, dataset_folder)
    with _restart(tmp_path, keys) as api:
        first = min(e.id for e in api.ledger_entries(1))  # type: ignore[type-var]
        _sql(api, "DELETE FROM ledgerentry WHERE id = :i", i=first)
    with _restart(tmp_path, keys) as api:
        problems = {b["budget_id"]: b["problem"] for b in _ready(api)["held_budgets"]}
        assert any("ledger" in problem for problem in problems.values()), problems


def test_kept_evidence_changed_without_the_key_is_not_used(tmp_path: Path, dataset_folder: Path,
                                                           folded: list[int]) -> None:
    keys, budget_id = _kept_state(tmp_path, dataset_folder)
    with _restart(tmp_path, keys) as api:
        _sql(api, "UPDATE auditmark SET data = :d WHERE name = 'evidence'", d=b"\x00\x00\x00\x02xx")
        _sql(api, "DELETE FROM ledgerentry WHERE budget_id = :i", i=budget_id)
        _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget_id)
    folded.clear()
    with _restart(tmp_path, keys) as api:
        assert 0 in folded  # folded from the first entry again
        [held] = _ready(api)["held_budgets"]
        assert held["budget_id"] == budget_id
