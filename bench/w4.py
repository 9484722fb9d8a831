"""W4 — the audit log, as ../shared/BENCHMARKS.md defines it.

Usage::

    python -m bench.w4 [--requests 400] [--entries 1000000] [--database sqlite|postgresql|both]

1. What auditing adds to a request: the app in-process (the real middleware, routes,
   ledger and audit transaction), p50 latency of a cached query and of a metadata read,
   with the audit log on, and with its two writers (``record`` and the middleware's
   ``record_request``) replaced by no-ops — a reference measured in the same run.
   Appends per second through that path (requests per second with auditing on; each
   request is one entry) and of bare ``append`` calls in a transaction.
2. Offline verification of an export of ``--entries`` entries: the entries (shaped like
   the server's query entries) are written to the state database with their leaf
   hashes and checkpoints every 10,000, exported with the server's own export, and
   ``civicdp audit verify`` is run on the bundle in a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from sqlalchemy import create_engine, insert, text, update
from sqlmodel import Session

from bench.demo import demo_dataset

PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"


def _setup(state, dataset_dir: Path) -> str:  # type: ignore[no-untyped-def]
    from civicdp.policies.actions import Role
    from civicdp.server.services import admin
    from civicdp.server.state.db import session_scope

    with session_scope(state.db) as session:
        admin.register_dataset(session, state.policies, None, dataset_dir)
        admin.create_account(session, None, "analyst", "health")
        admin.grant_role(session, state.policies, None, "analyst", Role.ANALYST, "health")
        return admin.issue_key(session, None, "analyst", state.secret, 30)[1]


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def request_overhead(database_url: str | None, dataset_dir: Path, n: int) -> dict[str, float]:
    return asyncio.run(_request_overhead(database_url, dataset_dir, n))


async def _request_overhead(database_url: str | None, dataset_dir: Path, n: int) -> dict[str, float]:
    """The app in-process over httpx's ASGI transport, its lifespan run as a server would."""
    from civicdp.server.http.app import create_app
    from civicdp.server.state.settings import Settings

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=Path(tmp), database_url=database_url, init_state=True))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            results = await _measure(app.state.civicdp, client, dataset_dir, n)
    return results


async def _measure(state, client: httpx.AsyncClient, dataset_dir: Path, n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import civicdp.server.http.request_log
    import civicdp.server.auditlog.append
    import civicdp.server.http.deps
    import civicdp.server.services.query_service

    query = {"dataset": "civic-demo", "aggregate": "count", "group_by": ["channel"], "epsilon": 0.01}
    results: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {_setup(state, dataset_dir)}"}
    assert (await client.post("/v1/queries", json=query, headers=headers)).status_code == 200
    cases = {"cached query": lambda: client.post("/v1/queries", json=query, headers=headers),
             "metadata read": lambda: client.get("/v1/datasets", headers=headers)}
    writers = (civicdp.server.services.query_service, civicdp.server.http.deps, civicdp.server.auditlog.append)
    originals = {m: m.record for m in writers}
    original_request = civicdp.server.http.request_log.record_request
    for label, call in cases.items():
        for _ in range(20):
            await call()  # warm up
        on, off = [], []
        for _ in range(5):  # interleaved rounds, so drift hits both alike
            on += await _timed(call, n // 5)
            for module in writers:
                module.record = lambda *a, **k: None  # type: ignore[assignment]
            civicdp.server.http.request_log.record_request = lambda db, slot, status: setattr(slot, "recorded", True)
            try:
                off += await _timed(call, n // 5)
            finally:
                for module, original in originals.items():
                    module.record = original  # type: ignore[assignment]
                civicdp.server.http.request_log.record_request = original_request
        results[f"{label}: p50 with audit (ms)"] = statistics.median(on)
        results[f"{label}: p50 without (ms)"] = statistics.median(off)
        results[f"{label}: audit adds (ms)"] = statistics.median(on) - statistics.median(off)
        results[f"{label}: appends/s through requests"] = 1000 / statistics.mean(on)
    from civicdp.server.auditlog.append import append
    from civicdp.server.state.db import session_scope

    start = time.perf_counter()
    count = 500
    for i in range(count):
        with session_scope(state.db) as session:
            append(session, caller=None, action="bench.append", target="bench", decision="allowed",
                   detail={"i": i})
    results["bare append, one per transaction: appends/s"] = count / (time.perf_counter() - start)
    return results


def _entry(seq: int) -> bytes:
    from civicdp.server.auditlog.canonical import canonical_bytes

    return canonical_bytes({
        "seq": seq, "time": "2026-11-23T12:00:00.000000Z", "action": "query.run", "target": "civic-demo",
        "decision": "allowed", "rule": ["analyst", "*", "dataset:*", "query.run", "0.5", "allow"],
        "who": {"account": f"analyst-{seq % 97}", "account_id": seq % 97, "agency": "health",
                "roles": ["analyst@health"]},
        "request": {"method": "POST", "path": "/v1/queries"},
        "detail": {"dataset": "civic-demo", "dataset_version": "0-200000", "release_id": seq,
                   "query": json.dumps({"aggregate": "count", "group_by": ["service_id"], "epsilon": "0.1",
                                        "n": seq}), "query_hash": f"{seq:064x}", "loss_micro": 100_000,
                   "result_hash": f"{seq * 7:064x}",
                   "ledger": [{"scope": s, "subject": "x", "period": "2026-11", "cap_micro": 10**6,
                               "before_micro": 0, "after_micro": 100_000} for s in ("analyst", "agency")]},
    })


def verification(entries: int, database_url: str | None) -> dict[str, float]:
    from civicdp.audit.checkpoint import Checkpoint
    from civicdp.audit.merkle import MerkleTree, leaf_hash
    from civicdp.server.auditlog.append import ensure_head
    from civicdp.server.auditlog.log import AuditLog
    from civicdp.server.state.db import init_db, make_engine
    from civicdp.server.state.models import AuditCheckpoint, AuditEntry, AuditHead

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{tmp}/state.db"
        db = make_engine(url)
        init_db(db)
        ensure_head(db)
        log = AuditLog(db, Path(tmp) / "signing.key", "civicdp.bench/audit")
        start = time.perf_counter()
        tree = MerkleTree()
        batch: list[dict] = []
        notes: list[dict] = []
        for seq in range(entries):
            data = _entry(seq)
            digest = leaf_hash(data)
            tree.append(digest)
            batch.append({"seq": seq, "action": "query.run", "target": "civic-demo", "dataset": "civic-demo",
                          "decision": "allowed", "account": f"analyst-{seq % 97}", "agency": "health",
                          "entry_json": data.decode(), "leaf_hash": digest.hex()})
            if (seq + 1) % 10_000 == 0:
                note = Checkpoint("civicdp.bench/audit", seq + 1, tree.root()).signed_by(log.key)
                notes.append({"size": seq + 1, "root": note.root.hex(), "note": note.text()})
            if len(batch) == 20_000 or seq == entries - 1:
                with Session(db) as session:
                    session.execute(insert(AuditEntry), batch)
                    if notes:
                        session.execute(insert(AuditCheckpoint), notes)
                    session.execute(update(AuditHead).where(AuditHead.id == 1).values(size=seq + 1))
                    session.commit()
                batch, notes = [], []
        out["writing the log (s)"] = time.perf_counter() - start
        bundle = Path(tmp) / "audit.zip"
        start = time.perf_counter()
        log.export(bundle)
        out["server export (s)"] = time.perf_counter() - start
        out["bundle size (MB)"] = bundle.stat().st_size / 1e6
        key = log.key.verifier.encode()
        db.dispose()
        start = time.perf_counter()
        done = subprocess.run([str(Path(sys.executable).parent / "civicdp"), "audit", "verify", str(bundle),
                               "--public-key", key], capture_output=True, text=True,
                              env={**os.environ, "CIVICDP_DATA_DIR": str(Path(tmp) / "none")})
        out["offline verify, fresh process (s)"] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"verify failed: {done.stdout}{done.stderr}")
        out["entries verified"] = float(entries)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--people", type=int, default=20_000, help="Demo dataset size for the request path")
    args = parser.parse_args()
    data = demo_dataset("w4", args.people, 0)
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    for database in databases:
        url = None
        if database == "postgresql":
            engine = create_engine(PG_URL)
            with engine.begin() as conn:
                conn.execute(text('DROP SCHEMA IF EXISTS "civicdp_w4" CASCADE'))
                conn.execute(text('CREATE SCHEMA "civicdp_w4"'))
            engine.dispose()
            url = PG_URL + "?options=-csearch_path%3Dcivicdp_w4"
        print(f"\n== W4 on {database} ==")
        for name, value in request_overhead(url, data, args.requests).items():
            print(f"{name:50s} {value:10.2f}")
        if database == databases[0] and args.entries:
            for name, value in verification(args.entries, None).items():
                print(f"{name:50s} {value:10.2f}")


if __name__ == "__main__":
    main()
