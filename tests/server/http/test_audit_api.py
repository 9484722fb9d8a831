"""The audit log through the server: one entry per request, in the charge's transaction,
and everything an oversight officer reads, proves and exports verifies offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

import civicdp.server.services.query_service
from civicdp.audit.bundle import TamperDetected, verify_bundle
from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import verify_consistency, verify_inclusion
from civicdp.audit.signing import VerifierKey
from civicdp.server.state import ledger
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, Budget, LedgerEntry, Release
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, DATASET, OTHER_ANALYST, OVERSIGHT, STEWARD, Api, api, count_query, dataset_folder, running_api,
)


def _entries(api: Api) -> list[dict]:
    with Session(api.state.db) as session:
        return [json.loads(r.entry_json) for r in session.exec(select(AuditEntry).order_by(AuditEntry.seq))]


def _key(api: Api) -> VerifierKey:
    return VerifierKey.parse(api.client.get("/v1/audit/public-key").text.split()[0])


def test_every_request_leaves_exactly_one_entry_and_a_fresh_query_two(api: Api) -> None:
    """A fresh query records its charge before reading data and its release after; all else one entry."""
    api.set_cap("analyst", ANALYST, 0.25)
    before = len(_entries(api))
    requests = [
        (ANALYST, "POST", "/v1/queries", {"json": count_query(epsilon=0.1)}),              # allowed, charged
        (ANALYST, "POST", "/v1/queries", {"json": count_query(epsilon=0.1)}),              # cached
        (ANALYST, "POST", "/v1/queries/estimate", {"json": count_query(epsilon=0.2)}),     # estimate
        (ANALYST, "POST", "/v1/queries", {"json": count_query(epsilon=0.2)}),              # budget refused
        (ANALYST, "POST", "/v1/queries", {"json": count_query(epsilon=-1)}),               # invalid
        (ANALYST, "POST", "/v1/queries", {"json": count_query(dataset="nope")}),           # unknown dataset
        (STEWARD, "POST", "/v1/queries", {"json": count_query(epsilon=0.05)}),             # policy denied
        (OTHER_ANALYST, "GET", "/v1/audit/entries", {}),                                   # denied read
        (None, "GET", "/v1/datasets", {}),                                                 # unauthenticated
        (ANALYST, "GET", "/v1/datasets", {}),                                              # plain read
        (ANALYST, "GET", "/v1/budgets", {}),
        (STEWARD, "POST", "/v1/accounts", {"json": {"name": "newcomer", "agency": "health"}}),  # a change
        (OVERSIGHT, "GET", "/v1/audit/checkpoint", {}),
        (OVERSIGHT, "GET", "/v1/audit/entries", {"params": {"limit": 2}}),
    ]
    statuses = [api.call(who, method, path, **kw).status_code for who, method, path, kw in requests]
    assert statuses == [200, 200, 200, 409, 422, 404, 403, 403, 401, 200, 200, 201, 200, 200]
    api.get(None, "/v1/health")  # probes are not uses
    api.get(None, "/v1/audit/public-key")
    new = _entries(api)[before:]
    assert len(new) == len(requests) + 1
    assert [e["action"] for e in new[:2]] == ["query.run", "query.release"]
    assert new[1]["detail"]["computation_id"] == new[0]["detail"]["computation_id"]
    assert len(new[1]["detail"]["result_hash"]) == 64 and new[1]["detail"]["release_id"]
    assert [e["decision"] for e in new] == ["allowed", "released", "cached", "allowed", "refused", "invalid", "not_found",
                                            "denied", "denied", "unauthenticated", "allowed", "allowed",
                                            "allowed", "allowed", "allowed"]
    assert [e["seq"] for e in new] == list(range(before, before + len(requests) + 1))
    first = new[0]
    assert first["who"]["account"] == ANALYST and first["who"]["agency"] == "health"
    assert first["who"]["roles"] == ["analyst@health"]
    assert first["rule"] == ["analyst", "*", "dataset:*", "query.run", "0.5", "allow"]
    assert first["request"] == {"method": "POST", "path": "/v1/queries"}
    assert json.loads(first["detail"]["query"])["epsilon"] == 0.1
    assert first["detail"]["dataset_version"] and first["detail"]["loss_micro"] == 100_000
    assert new[7]["rule"][-1] == "deny"  # the steward's query: the deny rule that matched
    estimate = new[3]
    assert estimate["action"] == "query.estimate" and estimate["detail"]["loss_micro"] == 200_000
    assert json.loads(estimate["detail"]["query"])["epsilon"] == 0.2 and estimate["detail"]["dataset_version"]
    assert "float" not in json.dumps(new)  # sanity: amounts are integers


def test_each_release_entry_carries_the_ledger_change(api: Api) -> None:
    answer = api.query(ANALYST, count_query(epsilon=0.3)).json()
    [entry] = [e for e in _entries(api) if e["action"] == "query.run" and e["decision"] == "allowed"]
    [released] = [e for e in _entries(api) if e["action"] == "query.release"]
    with Session(api.state.db) as session:
        release = session.get(Release, answer["release_id"])
        charges = list(session.exec(select(LedgerEntry).where(LedgerEntry.release_id == release.id)))
    assert entry["detail"]["loss_micro"] == release.loss_micro == 300_000
    assert released["detail"]["result_hash"] == release.result_hash
    assert released["detail"]["computation_id"] == entry["detail"]["computation_id"]
    changes = entry["detail"]["ledger"]
    assert sorted(c["scope"] for c in changes) == sorted(ledger.KINDS)
    assert {c["after_micro"] - c["before_micro"] for c in changes} == {release.loss_micro}
    assert sorted((c.spent_before_micro, c.spent_after_micro) for c in charges) == \
        sorted((c["before_micro"], c["after_micro"]) for c in changes)


def test_a_failure_between_the_charge_and_the_audit_insert_rolls_both_back(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    real_record = civicdp.server.services.query_service.record

    def failing_record(session, caller, action, *args, **kwargs):  # type: ignore[no-untyped-def]
        if action == "query.run" and kwargs.get("ledger"):
            raise RuntimeError("injected: the audit insert fails after the ledger update")
        return real_record(session, caller, action, *args, **kwargs)

    monkeypatch.setattr(civicdp.server.services.query_service, "record", failing_record)
    spent_before = api.spent_micro(ANALYST)
    with pytest.raises(RuntimeError, match="injected"):  # the test client re-raises what became a 500
        api.query(ANALYST, count_query(epsilon=0.2))
    assert api.spent_micro(ANALYST) == spent_before
    assert api.count(Release) == 0 and api.count(LedgerEntry) == 0
    [entry] = [e for e in _entries(api) if e["request"] and e["request"]["path"] == "/v1/queries"]
    assert entry["decision"] == "error"  # the request itself is still on record, as a failure
    monkeypatch.setattr(civicdp.server.services.query_service, "record", real_record)
    assert api.query(ANALYST, count_query(epsilon=0.2)).status_code == 200  # and nothing is stuck


def test_oversight_filters_entries_and_reads_the_ledger_over_time(api: Api) -> None:
    api.query(ANALYST, count_query(epsilon=0.1))
    api.query(OTHER_ANALYST, count_query(epsilon=0.2))
    api.query(STEWARD, count_query(epsilon=0.1))
    page = api.get(OVERSIGHT, "/v1/audit/entries", params={"action": "query.run", "agency": "transport"}).json()
    assert [(e["entry"]["who"]["account"], e["entry"]["decision"]) for e in page["entries"]] == \
        [(OTHER_ANALYST, "allowed")]
    denied = api.get(OVERSIGHT, "/v1/audit/entries", params={"decision": "denied", "dataset": DATASET}).json()
    assert [e["entry"]["who"]["account"] for e in denied["entries"]] == [STEWARD]
    paged = api.get(OVERSIGHT, "/v1/audit/entries", params={"limit": 2}).json()
    assert len(paged["entries"]) == 2 and paged["next_after"] == paged["entries"][-1]["seq"]
    view = api.get(OVERSIGHT, "/v1/audit/ledger", params={"dataset": DATASET}).json()
    analyst = [b for b in view["budgets"] if b["scope"] == "analyst" and b["subject"] == ANALYST]
    assert analyst[0]["spent_micro"] == 100_000
    lifetime = [h for h in view["history"] if h["scope"] == "lifetime"]
    assert [(h["before_micro"], h["after_micro"], h["account"]) for h in lifetime] == \
        [(0, 100_000, ANALYST), (100_000, 300_000, OTHER_ANALYST)]
    bad = api.get(OVERSIGHT, "/v1/audit/entries", params={"limit": 5000})
    assert bad.status_code == 422 and bad.json()["field"] == "query.limit"


def test_checkpoints_and_proofs_verify_with_the_public_key_alone(api: Api) -> None:
    key = _key(api)
    for epsilon in (0.1, 0.11, 0.12):
        api.query(ANALYST, count_query(epsilon=epsilon))
    first = Checkpoint.parse(api.get(OVERSIGHT, "/v1/audit/checkpoint").text)
    assert first.verified_by([key]) and first.origin == api.settings.audit_origin
    api.query(ANALYST, count_query(epsilon=0.13))
    second = Checkpoint.parse(api.get(OVERSIGHT, "/v1/audit/checkpoint").text)
    assert second.size > first.size
    proof = api.get(OVERSIGHT, "/v1/audit/proofs/consistency",
                    params={"first": first.size, "second": second.size}).json()
    assert verify_consistency(first.size, second.size, first.root, second.root,
                              [bytes.fromhex(h) for h in proof["path"]])
    with Session(api.state.db) as session:
        row = session.exec(select(AuditEntry).where(AuditEntry.action == "query.run")).first()
    inclusion = api.get(OVERSIGHT, "/v1/audit/proofs/inclusion", params={"seq": row.seq, "size": second.size}).json()
    assert verify_inclusion(bytes.fromhex(row.leaf_hash), row.seq, second.size,
                            [bytes.fromhex(h) for h in inclusion["path"]], second.root)
    too_far = api.get(OVERSIGHT, "/v1/audit/proofs/inclusion", params={"seq": 0, "size": second.size + 10_000})
    assert too_far.status_code == 422 and "the log has" in too_far.json()["detail"]
    backwards = api.get(OVERSIGHT, "/v1/audit/proofs/consistency", params={"first": 5, "second": 2})
    assert backwards.status_code == 422


def test_an_export_verifies_offline_and_a_tampered_copy_does_not(api: Api, tmp_path: Path) -> None:
    from civicdp.server.entry import app

    for epsilon in (0.1, 0.2):
        api.query(ANALYST, count_query(epsilon=epsilon))
    held = api.get(OVERSIGHT, "/v1/audit/checkpoint").text
    api.query(OTHER_ANALYST, count_query(epsilon=0.1))
    response = api.get(OVERSIGHT, "/v1/audit/export")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    bundle = tmp_path / "audit.zip"
    bundle.write_bytes(response.content)
    (tmp_path / "held.txt").write_text(held)
    report = verify_bundle(bundle, [_key(api)], trusted=Checkpoint.parse(held))
    assert report.entries == report.head.size >= Checkpoint.parse(held).size
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", str(bundle), "--public-key", _key(api).encode(),
                             "--trusted-checkpoint", str(tmp_path / "held.txt")])
    assert ok.exit_code == 0, ok.output
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    assert b'"decision":"allowed"' in files["entries.jsonl"]
    files["entries.jsonl"] = files["entries.jsonl"].replace(b'"decision":"allowed"', b'"decision":"refused"', 1)
    with zipfile.ZipFile(tmp_path / "edited.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(TamperDetected):
        verify_bundle(tmp_path / "edited.zip", [_key(api)])


def test_a_checkpoint_is_signed_every_n_entries(tmp_path: Path, dataset_folder: Path) -> None:  # noqa: F811
    with running_api(tmp_path / "state", dataset_folder, checkpoint_every_entries=4) as api:
        for _ in range(10):
            api.get(ANALYST, "/v1/datasets")
        with Session(api.state.db) as session:
            sizes = [c.size for c in session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size))]
            log_size = len(list(session.exec(select(AuditEntry.seq))))
    # Set-up wrote entries before any request; from the first request on, at most 4 apart.
    assert len(sizes) >= 2 and all(b - a <= 4 for a, b in zip(sizes, sizes[1:]))
    assert log_size - sizes[-1] < 4


def test_key_rotation_is_recorded_and_vouched_for_by_the_old_key(api: Api, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from civicdp.server.entry import app

    old = _key(api)
    api.query(ANALYST, count_query(epsilon=0.1))
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(api.settings.data_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["audit", "rotate-key"])
    assert result.exit_code == 0, result.output
    new = _key(api)
    assert new != old and old.encode() in api.client.get("/v1/audit/public-key").text
    [rotation] = [e for e in _entries(api) if e["action"] == "audit.key_rotate"]
    assert rotation["detail"] == {"old_key": old.encode(), "new_key": new.encode()}
    api.query(ANALYST, count_query(epsilon=0.2))
    bundle = tmp_path / "after.zip"
    bundle.write_bytes(api.get(OVERSIGHT, "/v1/audit/export").content)
    with Session(api.state.db) as session:
        transition = session.get(AuditCheckpoint, rotation["seq"] + 1)
    assert Checkpoint.parse(transition.note).verified_by([old, new]) == [old, new]
    verify_bundle(bundle, [old, new])
    with pytest.raises(TamperDetected, match="not signed by the public key"):
        verify_bundle(bundle, [old])  # later checkpoints need the new key, which the old one vouched for


def test_a_checkpoint_is_signed_every_m_minutes_when_the_log_grew(tmp_path: Path,
                                                                    dataset_folder: Path) -> None:  # noqa: F811
    import time

    # 0.01 minutes = 0.6 s; the timer looks every second at least.
    with running_api(tmp_path / "state", dataset_folder, checkpoint_every_entries=10**6,
                     checkpoint_every_minutes=0.01) as api:
        api.get(ANALYST, "/v1/datasets")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with Session(api.state.db) as session:
                latest = session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc())).first()
                size = len(list(session.exec(select(AuditEntry.seq))))
            if latest is not None and latest.size == size:
                break
            time.sleep(0.2)
        assert latest is not None and latest.size == size, "no timed checkpoint covered the log"
        assert Checkpoint.parse(latest.note).verified_by([_key(api)])
