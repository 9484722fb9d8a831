"""W3 — the server under load, as ../shared/BENCHMARKS.md defines it.

Usage::

    python -m bench.w3 [--people 200000] [--database sqlite|postgresql|both] [--requests 400]

Starts the real server (uvicorn, one process) on loopback with fresh state, registers
the demo dataset (scale S by default), creates an analyst, and measures requests per
second and p50/p99 latency for (a) a repeated, cached query and (b) fresh small
queries that spend budget, with 1, 16 and 64 concurrent clients. Then it checks the
ledger: budgets overspent and answers without a ledger entry (both must be 0).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import text

from bench.demo import demo_dataset

PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reset_postgres(schema: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def _setup(env: dict[str, str], data: Path) -> str:
    """Register the dataset, an analyst with a key and caps large enough for the load."""
    script = f"""
from pathlib import Path
from policies.actions import Role
from server import admin
from server.bootstrap import build_state
from server.db import session_scope
from server.settings import Settings
state = build_state(Settings())
with session_scope(state.db) as s:
    row = admin.register_dataset(s, state.policies, None, Path({str(data)!r}))
    admin.create_account(s, None, "bench", "health")
    admin.grant_role(s, state.policies, None, "bench", Role.ANALYST, "health")
    for scope in ("analyst", "agency", "dataset", "lifetime"):
        admin.set_cap(s, None, row.name, scope, "*", 1000.0)
    _, key = admin.issue_key(s, None, "bench", state.secret, 1)
state.db.dispose()
print(key)
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def _load(url: str, key: str, specs, clients: int, requests: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            for i in counter:
                started = time.perf_counter()
                response = http.post("/v1/queries", json=specs(i))
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    failures += response.status_code != 200

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    return time.perf_counter() - started, latencies, failures


def _check_ledger(env: dict[str, str]) -> tuple[int, int]:
    script = """
from sqlalchemy import text
from server.db import make_engine
from server.settings import Settings
db = make_engine(Settings().state_url)
with db.connect() as c:
    over = c.execute(text("SELECT COUNT(*) FROM budget WHERE spent_micro > cap_micro")).scalar()
    missing = c.execute(text("SELECT COUNT(*) FROM release r WHERE NOT EXISTS "
                             "(SELECT 1 FROM ledgerentry l WHERE l.release_id = r.id)")).scalar()
db.dispose()
print(over, missing)
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
    over, missing = out.stdout.split()
    return int(over), int(missing)


def run(database: str, data: Path, requests: int, dataset: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="civicdp-w3-"))
    env = {**os.environ, "CIVICDP_DATA_DIR": str(workdir)}
    env.pop("DATABASE_URL", None)
    if database == "postgresql":
        schema = f"w3_{os.getpid()}"
        _reset_postgres(schema)
        env["DATABASE_URL"] = f"{PG_URL}?options=-csearch_path%3D{schema}"
    key = _setup(env, data)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:create_app", "--factory",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        cached = {"dataset": dataset, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1,
                  "contributions": 10}
        httpx.post(f"{url}/v1/queries", json=cached, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        print(f"\n[{database}] {requests} requests per setting")
        serial = iter(range(10**9))
        for label, specs in (
            ("cached (repeated query)", lambda i: cached),
            # Fresh: each request asks a new question (a different loss), so it is computed and charged.
            ("fresh count by service", lambda i: {"dataset": dataset, "aggregate": "count",
                                                  "group_by": ["service_id"], "contributions": 10,
                                                  "epsilon": round(0.01 + next(serial) * 1e-6, 6)}),
        ):
            for clients in (1, 16, 64):
                n = requests if clients > 1 or label.startswith("cached") else max(50, requests // 4)
                seconds, latencies, failures = _load(url, key, specs, clients, n)
                latencies.sort()
                p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
                print(f"  {label:<26} clients={clients:<3} {n / seconds:8.1f} req/s  "
                      f"p50 {statistics.median(latencies) * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  "
                      f"non-200: {failures}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    over, missing = _check_ledger(env)
    print(f"  overspent budgets: {over}; answers without a ledger entry: {missing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    data = demo_dataset("w1", args.people, args.seed)
    from queries.metadata import load_metadata

    dataset = load_metadata(data).name
    for database in (("sqlite", "postgresql") if args.database == "both" else (args.database,)):
        run(database, data.resolve(), args.requests, dataset)


if __name__ == "__main__":
    main()
