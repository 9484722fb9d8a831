"""W3 — the server under load, as ../shared/BENCHMARKS.md defines it, with 1, 2 and 4 workers.

Usage::

    python -m bench.w3 [--people 200000] [--database sqlite|postgresql|both] [--workers 1,2,4]
                       [--clients 16] [--seconds 8] [--requests 400] [--no-fresh]

For each database and each number of workers: fresh state, the demo dataset (scale S by
default) registered, an analyst with a key, and the real server started on loopback with
``civicdp serve --workers N``. Then:

- **cached answers** (a repeated query) with ``--clients`` concurrent keep-alive clients,
  measured by two load generators: ``wrk`` (C, from Debian's ``wrk`` package, not the
  bottleneck) for ``--seconds``, and W3's Python client (httpx threads, which costs ~1 ms of
  CPU per request on the same cores) for ``--requests``; req/s, p50 and p99 of each;
- with one worker, **fresh small queries** that spend budget, with 1, 16 and 64 clients;
- the **per-request profile by stage** of the lean cached path (``server/http/lean.py``; the
  server writes it when it stops), the server's CPU per cached answer, and what of it is
  HTTP and framework (uvicorn, the middleware, the event loop);
- the checks: budgets overspent (0), answers without a ledger entry (0), and every answer
  a client received has its audit entry (each cached answer counted against the entries
  of the run; wrk may leave up to one request per connection unanswered at its stop).

Everything runs on 127.0.0.1 and is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from bench.demo import demo_dataset

PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
STAGES = ("authentication", "planning", "policy", "key_recheck", "cache_read", "budgets", "audit_append", "commit",
          "serialisation")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reset_postgres(schema: str) -> None:
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def _setup(env: dict[str, str], data: Path) -> str:
    """Register the dataset, an analyst with a key and caps large enough for the load."""
    script = f"""
from pathlib import Path
from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.db import session_scope
from civicdp.server.state.settings import Settings
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


# -- load generators -----------------------------------------------------------------------------


def _python_load(url: str, key: str, specs: Any, clients: int, requests: int) -> dict[str, Any]:
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
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / seconds, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
            "answered": len(latencies) - failures, "failures": failures}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wrk(url: str, key: str, body: dict[str, Any], clients: int, seconds: float, folder: Path) -> dict[str, Any]:
    script = folder / "post.lua"
    script.write_text(f"wrk.method = \"POST\"\nwrk.body = {json.dumps(json.dumps(body))}\n"
                      "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
                      f"wrk.headers[\"Authorization\"] = \"Bearer {key}\"\n")
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:g}s", "--latency", "-s", str(script),
                          f"{url}/v1/queries"], capture_output=True, text=True, timeout=seconds + 60).stdout

    def latency(percent: str) -> float:
        match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(match[1]) * _UNITS[match[2]] if match else float("nan")

    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    failures = int(bad[1]) if bad else 0
    answered = (int(total[1]) if total else 0) - failures
    return {"rps": float(rps[1]) if rps else float("nan"), "p50": latency("50"), "p99": latency("99"),
            "answered": answered, "failures": failures}


# -- the server ------------------------------------------------------------------------------------


def _pids(root: int) -> list[int]:
    """The server process and its workers (children, recursively)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _rss_mib(root: int) -> float:
    """Resident memory of the server process and its workers, MiB."""
    total = 0
    for pid in _pids(root):
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])  # type: ignore[index]
        except (OSError, TypeError):
            pass
    return total / 1024


def _cpu_seconds(root: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / ticks


class Server:
    def __init__(self, env: dict[str, str], workers: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-c", "from civicdp.server.entry import main; main()", "serve",
                                         "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._errors: list[str] = []
        threading.Thread(target=lambda: self._errors.extend(self.process.stderr or []), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start: " + "".join(self._errors[-20:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _count(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


CACHED_ENTRIES = "SELECT COUNT(*) FROM auditentry WHERE action = 'query.run' AND decision = 'cached'"


def _profiles(folder: Path) -> dict[str, Any]:
    """The lean path's stage times, summed over the workers' reports."""
    total: dict[str, Any] = {"answered": 0, "batches": 0, "seconds": dict.fromkeys(STAGES, 0.0), "declined": {},
                             "wall": {"queue": 0.0, "commit": 0.0}}
    for path in folder.glob("profile.*.json"):
        report = json.loads(path.read_text())
        total["answered"] += report["answered"]
        total["batches"] += report["batches"]
        for name in STAGES:
            total["seconds"][name] += report["us_per_answer"].get(name, 0.0) * report["answered"] / 1e6
        for name in total["wall"]:
            total["wall"][name] += report["wall_us_per_answer"].get(name, 0.0) * report["answered"] / 1e6
        for reason, n in report["declined"].items():
            total["declined"][reason] = total["declined"].get(reason, 0) + n
    return total


def run(database: str, data: Path, dataset: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="civicdp-w3-"))
    env = {**os.environ, "CIVICDP_DATA_DIR": str(workdir), "CIVICDP_INIT_STATE": "true",
           "CIVICDP_FEEDS_SCHEDULER": "false", "CIVICDP_PROFILE_FILE": str(workdir / "profile.json"),
           **({"CIVICDP_CHECKPOINT_EVERY_ENTRIES": os.environ["W3_EVERY"]} if "W3_EVERY" in os.environ else {})}
    env.pop("DATABASE_URL", None)
    state_url = f"sqlite:///{workdir / 'civicdp.db'}"
    if database == "postgresql":
        schema = f"w3_{os.getpid()}_{workers}"
        _reset_postgres(schema)
        state_url = env["DATABASE_URL"] = f"{PG_URL}?options=-csearch_path%3D{schema}"
    key = _setup(env, data)
    server = Server(env, workers)
    out: dict[str, Any] = {"database": database, "workers": workers}
    cached = {"dataset": dataset, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1, "contributions": 10}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        assert httpx.post(f"{server.url}/v1/queries", json=cached, headers=headers, timeout=300).status_code == 200
        for _ in range(8 * workers):  # new connections, so every worker checks the release once
            assert httpx.post(f"{server.url}/v1/queries", json=cached, headers=headers, timeout=60).status_code == 200
        cpu0, before = _cpu_seconds(server.process.pid), _count(state_url, CACHED_ENTRIES)
        out["rss_before"] = _rss_mib(server.process.pid)
        out["python"] = _python_load(server.url, key, lambda i: cached, args.clients, args.requests)
        after = _count(state_url, CACHED_ENTRIES)
        out["python"]["entries"] = after - before
        if shutil.which("wrk"):
            out["wrk"] = _wrk(server.url, key, cached, args.clients, args.seconds, workdir)
            out["wrk"]["entries"] = _count(state_url, CACHED_ENTRIES) - after
        cpu1 = _cpu_seconds(server.process.pid)
        out["rss_after"] = _rss_mib(server.process.pid)
        served = out["python"]["answered"] + out.get("wrk", {}).get("answered", 0)
        out["cpu_ms_per_cached"] = (cpu1 - cpu0) / max(served, 1) * 1000
        if args.fresh and workers == 1:
            serial = iter(range(10**9))
            out["fresh"] = {}
            for clients in (1, 16, 64):
                n = args.requests if clients > 1 else max(50, args.requests // 4)
                # Each request asks a new question (a different loss), so it is computed and charged.
                out["fresh"][clients] = _python_load(
                    server.url, key, lambda i: {"dataset": dataset, "aggregate": "count", "group_by": ["service_id"],
                                                "contributions": 10,
                                                "epsilon": round(0.01 + next(serial) * 1e-6, 6)}, clients, n)
    finally:
        server.stop()
    out["profile"] = _profiles(workdir)
    out["overspent"] = _count(state_url, "SELECT COUNT(*) FROM budget WHERE spent_micro > cap_micro")
    out["unledgered"] = _count(state_url, "SELECT COUNT(*) FROM release r WHERE NOT EXISTS "
                                          "(SELECT 1 FROM ledgerentry l WHERE l.release_id = r.id)")
    head = _count(state_url, "SELECT size FROM audithead")
    out["gapless"] = head == _count(state_url, "SELECT COUNT(*) FROM auditentry") == \
        _count(state_url, "SELECT COALESCE(MAX(seq) + 1, 0) FROM auditentry")
    if database == "sqlite":
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _line(label: str, m: dict[str, Any]) -> str:
    return (f"{label:<34} {m['rps']:8.1f} req/s  p50 {m['p50']:7.1f} ms  p99 {m['p99']:7.1f} ms  "
            f"non-200 {m['failures']}")


def report(result: dict[str, Any], clients: int) -> None:
    db, workers = result["database"], result["workers"]
    print(f"\n[{db}, {workers} worker{'s' if workers > 1 else ''}]")
    for tool in ("wrk", "python"):
        if tool in result:
            m = result[tool]
            missing = m["answered"] - m["entries"]
            extra = m["entries"] - m["answered"]
            print("  " + _line(f"cached, {clients} clients ({tool})", m)
                  + f"  answers without an entry: {max(missing, 0)}"
                  + (f" (entries of requests unanswered at wrk's stop: {extra})" if extra > 0 else ""))
    for clients_, m in result.get("fresh", {}).items():
        print("  " + _line(f"fresh count, {clients_} clients (python)", m))
    profile = result["profile"]
    if profile["answered"]:
        per = {name: profile["seconds"][name] / profile["answered"] * 1e6 for name in STAGES}
        wall = {name: profile["wall"][name] / profile["answered"] * 1e6 for name in profile["wall"]}
        cpu = result["cpu_ms_per_cached"] * 1000
        busy = sum(per.values())
        print(f"  lean path: {profile['answered']:,} answers in {profile['batches']:,} group commits "
              f"({profile['answered'] / max(profile['batches'], 1):.1f} per commit); handed to the full path: "
              f"{sum(profile['declined'].values()):,} {profile['declined'] or ''}")
        print("  per cached answer, CPU (us): " + ", ".join(f"{k} {v:.0f}" for k, v in per.items())
              + f"; HTTP + framework + event loop (the rest) {max(cpu - busy, 0):.0f}; server CPU in all {cpu:.0f}")
        print(f"  per cached answer, waiting (us): for the writer {wall['queue']:.0f}, commit (wall, with fsync) "
              f"{wall['commit']:.0f}")
    answered = sum(result[t]["answered"] for t in ("wrk", "python") if t in result)
    print(f"  server memory (all processes): {result['rss_before']:.0f} MiB before the cached runs, "
          f"{result['rss_after']:.0f} MiB after {answered:,} more answers")
    print(f"  overspent budgets: {result['overspent']}; answers without a ledger entry: {result['unledgered']}; "
          f"audit numbering gapless: {result['gapless']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=400, help="requests per Python-client run")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each wrk run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure fresh (charged) queries with one worker")
    args = parser.parse_args()
    data = demo_dataset("w1", args.people, args.seed)
    from civicdp.queries.metadata import load_metadata

    dataset = load_metadata(data).name
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk): cached answers are measured with the Python client only")
    for database in (("sqlite", "postgresql") if args.database == "both" else (args.database,)):
        for workers in (int(w) for w in args.workers.split(",")):
            report(run(database, data.resolve(), dataset, workers, args), args.clients)


if __name__ == "__main__":
    main()
