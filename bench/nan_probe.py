"""The NaN probe of issue 11, repeated over HTTP: is any outcome free, or different between neighbours?

Usage::

    python -m bench.nan_probe [--people 2000] [--probes 13] [--epsilon 1e-6]

Builds two neighbouring datasets from the demo generator: D, and D' = D plus one
person whose one event has a NaN waiting time (and, in further variants, +inf, -inf
and a value far outside the bounds). An analyst then runs the binary search over a
time filter that, before the fix, located the NaN event to within 32 minutes in 13
probes for 6 micro-epsilon in total (each failed probe was a free 503). Every probe is
sent to a server holding D and to one holding D'; the script prints, per probe, the
HTTP status and the loss charged on each, and at the end whether any probe differed
in status, error body or charge (there must be none) and what the search spent.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import uvicorn

from civicdp.policies.actions import Role
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.http.app import create_app
from civicdp.server.state.settings import Settings
from civicdp.synthetic.demo_data import generate

START, END = datetime(2025, 1, 1), datetime(2026, 1, 1)
HIDDEN_AT = datetime(2025, 8, 17, 14, 7)
HEAD_STATUS, HEAD_CHARGED = "D' status", "D' charged"


def neighbours(root: Path, people: int, value: float) -> tuple[Path, Path]:
    """D (the demo data) and D' (D plus one person with one event whose waiting time is ``value``)."""
    plain = root / "D"
    generate(people, plain, seed=7)
    events = pl.read_parquet(plain / "events.parquet")
    odd = events.head(1).with_columns(
        pl.lit(int(events["person_id"].max()) + 1, events["person_id"].dtype).alias("person_id"),
        pl.lit(int(events["event_id"].max()) + 1, events["event_id"].dtype).alias("event_id"),
        pl.lit(HIDDEN_AT, events["request_time"].dtype).alias("request_time"),
        pl.lit(value, events["waiting_minutes"].dtype).alias("waiting_minutes"),
        pl.lit("counter").cast(events["channel"].dtype).alias("channel"))
    other = root / "D-prime"
    other.mkdir()
    for path in plain.iterdir():
        if path.is_file() and path.name != "events.parquet":
            (other / path.name).write_bytes(path.read_bytes())
    pl.concat([events, odd]).write_parquet(other / "events.parquet")
    return plain, other


class Served:
    """The real app on a loopback port (uvicorn in a thread), stopped by :meth:`close`."""

    def __init__(self, state: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.app = create_app(Settings(data_dir=state, database_url=None, feeds_scheduler=False, init_state=True))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


def serve(state: Path, dataset: Path) -> tuple[Served, str]:
    served = Served(state)
    app_state = served.app.state.civicdp
    with session_scope(app_state.db) as session:
        admin.register_dataset(session, app_state.policies, None, dataset)
        admin.create_account(session, None, "prober", "health")
        admin.grant_role(session, app_state.policies, None, "prober", Role.ANALYST, "health")
        admin.set_cap(session, None, "civic-demo", "analyst", "prober", 1.0)
        key = admin.issue_key(session, None, "prober", app_state.secret, 30)[1]
    return served, key


def probe(served: Served, key: str, start: datetime, end: datetime, epsilon: float) -> dict[str, Any]:
    spec = {"dataset": "civic-demo", "aggregate": "mean", "column": "waiting_minutes", "epsilon": epsilon,
            "filters": [{"column": "request_time", "op": "between", "start": start.isoformat(),
                         "end": end.isoformat()}]}
    client = served.client
    response = client.post("/v1/queries", json=spec, headers={"Authorization": f"Bearer {key}"})
    body = response.json()
    error = None if response.status_code == 200 else json.dumps(body, sort_keys=True)
    charged = body["charged"]["epsilon"] if response.status_code == 200 else None
    spent = client.get("/v1/budgets", headers={"Authorization": f"Bearer {key}"}).json()
    spent_micro = max(b["spent_micro"] for b in spent) if isinstance(spent, list) else None
    return {"status": response.status_code, "error": error, "charged": charged, "spent_micro": spent_micro,
            "value": body["rows"][0]["value"] if response.status_code == 200 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=13)
    parser.add_argument("--epsilon", type=float, default=1e-6)
    args = parser.parse_args()
    differing = 0
    for label, value in (("NaN", float("nan")), ("+inf", float("inf")), ("-inf", -float("inf")),
                         ("1e300", 1e300)):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            plain, other = neighbours(root, args.people, value)
            servers = {"D": serve(root / "state-D", plain), "D'": serve(root / "state-Dp", other)}
            print(f"\nadversarial waiting time {label}: binary search over request_time, "
                  f"epsilon {args.epsilon:g} per probe")
            print(f"{'probe':>5}  {'window start':<17} {'minutes':>8}   {'D status':>8} {'D charged':>10}   "
                  + f"{HEAD_STATUS:>9} {HEAD_CHARGED:>11}  same")
            low, high = START, END
            for number in range(1, args.probes + 1):
                middle = low + (high - low) / 2
                outcomes = {name: probe(c, k, low, middle, args.epsilon) for name, (c, k) in servers.items()}
                a, b = outcomes["D"], outcomes["D'"]
                same = (a["status"], a["error"], a["charged"], a["spent_micro"]) == \
                    (b["status"], b["error"], b["charged"], b["spent_micro"])
                differing += not same
                minutes = (middle - low) / timedelta(minutes=1)
                print(f"{number:>5}  {low:%Y-%m-%d %H:%M} {minutes:>8.0f}   {a['status']:>8} "
                      f"{a['charged'] or 0:>10.2g}   {b['status']:>9} {b['charged'] or 0:>11.2g}  "
                      f"{'yes' if same else 'NO'}")
                # The attacker's rule: a failed probe means "the odd event is in this half".
                if b["status"] != 200:
                    high = middle
                else:
                    low = middle
            for name, (client, key) in servers.items():
                final = probe(client, key, START, END, args.epsilon)
                print(f"{name}: spent {final['spent_micro']:,} micro-epsilon over {args.probes + 1} probes")
                client.close()
    print(f"\nprobes whose status, error body or charge differed between D and D': {differing}")


if __name__ == "__main__":
    main()
