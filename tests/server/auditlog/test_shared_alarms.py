"""Integrity alarms are shared by the server processes on one database: readiness on any reports them all.

Each process stores the alarms it raises (``integrityalarm``) and takes up those of the
others when readiness or a periodic check asks; an alarm taken up goes when the process that
raised it clears it (after its own check passed), and the restoration is recorded once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import Session, select

from civicdp.server.state import ledger
from civicdp.server.state.models import Budget
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, Api, api, count_query, dataset_folder, make_dataset_folder, prepare_state, running_api, settings_for,
)
from tests.server.auditlog.test_log_integrity import _row, _sql
from tests.server.http.test_read_after_write import served

#: Another process on the same database: an AuditLog that checks nothing, asked what readiness would show.
OTHER = """
import json, sys
from pathlib import Path
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.state.db import make_engine
db = make_engine(sys.argv[1])
log = AuditLog(db, Path(sys.argv[2]), "civicdp.local/audit", check_on_start=False)
print(json.dumps(log.integrity()))
"""


def _in_another_process(api: Api) -> dict[str, Any]:
    api.state.audit.alarms.flush()  # the alarms raised here are stored (by a background writer)
    done = subprocess.run([sys.executable, "-c", OTHER, api.settings.state_url, str(api.settings.audit_key_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_budget_held_in_one_process_is_reported_by_another(api: Api) -> None:
    assert api.query(ANALYST, count_query(epsilon=0.5)).status_code == 200
    with Session(api.state.db) as session:
        budget = session.exec(select(Budget).where(Budget.scope == ledger.ANALYST, Budget.subject == ANALYST)).one()
    _sql_api(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
    assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 503  # held here, by the spend check
    [held] = _in_another_process(api)["held_budgets"]
    assert held["budget_id"] == budget.id and "differs from its last ledger entry" in held["problem"]
    _sql_api(api, "UPDATE budget SET spent_micro = 500000 WHERE id = :i", i=budget.id)
    api.state.audit.tick(force=True)  # agrees again: restored here, and its row removed
    assert _in_another_process(api)["held_budgets"] == []
    assert [json.loads(r.entry_json)["target"] for r in api.records("integrity.restored")] == [f"budget:{budget.id}"]


def _sql_api(api: Api, statement: str, **params: Any) -> None:
    from sqlalchemy import text

    with api.state.db.begin() as connection:
        connection.execute(text(statement), params)


def test_readiness_of_every_worker_reports_an_alarm_raised_by_one(tmp_path: Path) -> None:
    """Two workers on one state: one finds rows deleted; the other's /v1/ready says so and it answers nothing."""
    settings = settings_for(tmp_path / "state", feeds_scheduler=False)
    keys = prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    analyst = {"Authorization": f"Bearer {keys[ANALYST]}"}
    with served(settings.data_dir, None) as other, running_api(tmp_path / "state", None, keys=keys,
                                                                 feeds_scheduler=False) as here:
        assert httpx.get(f"{other}/v1/ready").json() == {"status": "ready"}
        saved = _row(tmp_path, 1)
        _sql(tmp_path, "DELETE FROM auditentry WHERE seq = 1")
        here.state.audit.tick(force=True)
        assert here.state.audit.failed and "entry 1 is missing" in here.state.audit.failed
        here.state.audit.alarms.flush()
        ready = httpx.get(f"{other}/v1/ready")
        assert ready.status_code == 503 and "entry 1 is missing" in ready.json()["audit_log"]["problem"]
        assert httpx.get(f"{other}/v1/datasets", headers=analyst).status_code == 503  # it answers nothing either

        _sql(tmp_path, "INSERT INTO auditentry (seq, created_at, account, account_id, agency, action, target, "
                       "dataset, decision, entry_json, leaf_hash) VALUES (:seq, :created_at, :account, :account_id, "
                       ":agency, :action, :target, :dataset, :decision, :entry_json, :leaf_hash)", **saved)
        here.state.audit.tick(force=True)  # verifies again: cleared here, and its row removed
        assert here.get(None, "/v1/ready").json() == {"status": "ready"}
        assert httpx.get(f"{other}/v1/ready").json() == {"status": "ready"}
        assert httpx.get(f"{other}/v1/datasets", headers=analyst).status_code == 200
        assert len(here.records("audit.integrity_restored")) == 1
