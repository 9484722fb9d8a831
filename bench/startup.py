"""Start-up — how long one server worker takes to open a state whose audit log holds a million entries.

Usage::

    python -m bench.startup [--entries 1000000] [--runs 3] [--keep DIR]

Builds a state on SQLite shaped like a busy server's: per 20 entries one fresh query (its
charge ``query.run`` moving four budgets, and its ``query.release``), 14 cached answers
(``query.run``, decision ``cached``, naming their release) and 5 reads (``http.request``);
the ledger, budgets and releases agree with the entries, and checkpoints are signed every
1,000 entries by the server's own :class:`~civicdp.server.auditlog.log.AuditLog` (which
integrates the stored tree). Then, each in a fresh process, a worker's start
(:func:`civicdp.server.services.bootstrap.build_state`: the log's check at start and the
reconciliation of budgets and stored answers) is timed:

- the **first start** on that state, with nothing recorded about earlier checks (what a
  start cost before starts were incremental, and what it costs once after an upgrade);
- **later starts** (``--runs`` of them; the median is the figure), each after a few more
  entries were appended by a running server — the tail a start has to check.

Each start is also checked to find the state sound (no alarm).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, update
from sqlmodel import Session

DATASET = "civic-demo"
PERIOD = "2026-11"
LOSS = 1_000
CAP = 10**12
ANALYSTS = 97
#: One block of 20 entries: a fresh query (charge and release), 14 cached answers, 5 reads.
BLOCK = ["charge", "release", *["cached"] * 14, *["read"] * 5][:20]

TIMED = """
import json, sys, time
start = time.perf_counter()
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.settings import Settings
imported = time.perf_counter()
state = build_state(Settings(data_dir=sys.argv[1]), init=False)
opened = time.perf_counter()
report = state.audit.integrity()
state.close()
print(json.dumps({"import": imported - start, "start": opened - imported, "report": report}))
"""


def _query(seq: int) -> str:
    return json.dumps({"aggregate": "count", "dataset": DATASET, "epsilon": 0.001, "group_by": ["channel"],
                       "table": "events", "n": seq}, sort_keys=True, separators=(",", ":"))


def build(data_dir: Path, entries: int) -> None:
    """A state in ``data_dir`` whose log holds ``entries`` entries, consistent with its ledger and releases."""
    from civicdp.server.auditlog.canonical import entry_values
    from civicdp.server.auditlog.log import AuditLog
    from civicdp.server.services.bootstrap import build_state
    from civicdp.server.state.caller import Caller
    from civicdp.server.state.models import AuditHead, AuditEntry, Budget, LedgerEntry, Release
    from civicdp.server.state.settings import Settings

    settings = Settings(data_dir=data_dir)
    state = build_state(settings, init=True)
    db = state.db
    with Session(db) as session:
        first = session.get(AuditHead, 1).size  # type: ignore[union-attr]
    budgets: dict[tuple[str, str], int] = {}
    with Session(db) as session:
        for scope, subject in ([("analyst", f"analyst-{i}") for i in range(ANALYSTS)]
                               + [("agency", "health"), ("dataset", "*"), ("lifetime", "*")]):
            period = "lifetime" if scope == "lifetime" else PERIOD
            row = Budget(dataset=DATASET, scope=scope, subject=subject, period=period, cap_micro=CAP, spent_micro=0)
            session.add(row)
            session.flush()
            budgets[(scope, subject)] = int(row.id)  # type: ignore[arg-type]
        session.commit()
    spent = dict.fromkeys(budgets, 0)
    log = AuditLog(db, settings.audit_key_path, settings.audit_origin, check_on_start=False)
    now = datetime(2026, 11, 2, tzinfo=timezone.utc)
    rows: list[dict] = []
    ledger: list[dict] = []
    releases: list[dict] = []
    release_ids: list[tuple[int, str, str]] = []  # id, result hash, query hash
    release_id = 0
    last_charge: dict[int, tuple[Caller, str, str]] = {}
    seq = first
    for n in range(entries - first):
        kind = BLOCK[n % len(BLOCK)]
        analyst = n // len(BLOCK) % ANALYSTS
        caller = Caller(account_id=analyst + 10, name=f"analyst-{analyst}", agency="health")
        when = now + timedelta(microseconds=seq * 1000)
        request = {"method": "POST", "path": "/v1/queries"}
        rule = ["analyst", "*", "dataset:*", "query.run", "0.5", "allow"]
        if kind == "charge":
            release_id += 1
            query = _query(release_id)
            query_hash = hashlib.sha256(query.encode()).hexdigest()
            result = json.dumps({"columns": ["channel", "count"], "rows": [[c, release_id % 1000 + i] for i, c in
                                 enumerate(["online", "phone", "counter", "post", "app"])],
                                 "intervals": {"confidence": 0.95, "half_width": "12.5"}, "note": "x" * 500})
            result_hash = hashlib.sha256(result.encode()).hexdigest()
            items = []
            for scope, subject in (("agency", "health"), ("analyst", caller.name), ("dataset", "*"),
                                   ("lifetime", "*")):
                key = (scope, subject)
                before, after = spent[key], spent[key] + LOSS
                spent[key] = after
                items.append({"after_micro": after, "before_micro": before, "cap_micro": CAP,
                              "period": "lifetime" if scope == "lifetime" else PERIOD, "scope": scope,
                              "subject": subject})
                ledger.append({"budget_id": budgets[key], "release_id": release_id, "account_id": None,
                               "amount_micro": LOSS, "spent_before_micro": before, "spent_after_micro": after,
                               "created_at": when})
            releases.append({"id": release_id, "dataset": DATASET, "dataset_version": "1", "query_hash": query_hash,
                             "canonical_query": query, "loss_micro": LOSS, "result_json": result,
                             "result_hash": result_hash, "account_id": None, "created_at": when})
            release_ids.append((release_id, result_hash, query_hash))
            detail = {"computation_id": release_id, "dataset": DATASET, "dataset_version": "1", "ledger": items,
                      "loss_micro": LOSS, "query": query, "query_hash": query_hash}
            last_charge[analyst] = (caller, query_hash, result_hash)
            row = entry_values(seq, when, caller=caller, action="query.run", target=DATASET, decision="allowed",
                               rule=rule, roles=["analyst@health"], request=request, detail=detail, dataset=DATASET)
        elif kind == "release":
            rid, result_hash, query_hash = release_ids[-1]
            detail = {"computation_id": rid, "dataset": DATASET, "dataset_version": "1", "loss_micro": 0,
                      "query_hash": query_hash, "release_id": rid, "result_hash": result_hash}
            row = entry_values(seq, when, caller=caller, action="query.release", target=DATASET, decision="released",
                               rule=rule, roles=["analyst@health"], request=request, detail=detail, dataset=DATASET)
        elif kind == "cached":
            rid, result_hash, query_hash = release_ids[(n * 7919) % len(release_ids)]
            detail = {"dataset_version": "1", "loss_micro": 0, "query": _query(rid), "query_hash": query_hash,
                      "release_id": rid, "result_hash": result_hash}
            row = entry_values(seq, when, caller=caller, action="query.run", target=DATASET, decision="cached",
                               rule=rule, roles=["analyst@health"], request=request, detail=detail, dataset=DATASET)
        else:
            row = entry_values(seq, when, caller=caller, action="http.request", target="/v1/datasets",
                               decision="allowed", roles=["analyst@health"],
                               request={"method": "GET", "path": "/v1/datasets"}, detail={"status": 200})
        rows.append(row)
        seq += 1
        if len(rows) == 1000 or seq == entries:
            with Session(db) as session:
                if releases:
                    session.execute(insert(Release), releases)
                if ledger:
                    session.execute(insert(LedgerEntry), ledger)
                session.execute(insert(AuditEntry), rows)
                session.execute(update(AuditHead).where(AuditHead.id == 1).values(size=seq))
                session.commit()
            rows, ledger, releases = [], [], []
            log.checkpoint()
    with Session(db) as session:
        for key, budget_id in budgets.items():
            session.execute(update(Budget).where(Budget.id == budget_id).values(spent_micro=spent[key]))
        session.commit()
    state.close()


def timed_start(data_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", TIMED, str(data_dir)], capture_output=True, text=True,
                          env={**os.environ, "CIVICDP_DATA_DIR": str(data_dir)}, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the start failed:\n{done.stdout}{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = result["report"]
    if not report["audit_log"]["ok"] or report["held_budgets"] or report["refused_releases"]:
        raise SystemExit(f"the start found the state unsound: {report}")
    return result


def append_some(data_dir: Path, count: int) -> None:
    """``count`` more entries, as a running server appends them (reads)."""
    from civicdp.server.auditlog.append import record
    from civicdp.server.services.bootstrap import build_state
    from civicdp.server.state.db import session_scope
    from civicdp.server.state.settings import Settings

    state = build_state(Settings(data_dir=data_dir), init=False)
    for i in range(count):
        with session_scope(state.db) as session:
            record(session, None, "http.request", "/v1/datasets", status=200, n=i)
    state.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Build the state in this folder (reused if it has one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.keep or Path(tmp) / "state"
        fresh = not (data_dir / "civicdp.db").exists()
        if fresh:
            start = time.perf_counter()
            build(data_dir, args.entries)
            print(f"{'building the state (s)':50s} {time.perf_counter() - start:10.2f}")
            first = timed_start(data_dir)
            print(f"{'first start, nothing recorded of earlier checks (s)':50s} {first['start']:10.2f}")
        later = []
        for _ in range(args.runs):
            append_some(data_dir, 200)
            later.append(timed_start(data_dir))
        starts = [r["start"] for r in later]
        print(f"{'later starts (s)':50s} {' '.join(f'{s:.2f}' for s in starts):>10s}")
        print(f"{f'start, median of {len(starts)} (s)':50s} {statistics.median(starts):10.2f}")
        print(f"{'imports before the start, median (s)':50s} {statistics.median(r['import'] for r in later):10.2f}")
        print(f"{'database (MB)':50s} {(data_dir / 'civicdp.db').stat().st_size / 1e6:10.1f}")


if __name__ == "__main__":
    main()
