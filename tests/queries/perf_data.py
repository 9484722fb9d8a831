"""A small service-events dataset with a public catalogue, for the performance analyses' tests.

Every person has at most ``MAX_CONTRIBUTIONS`` events, so the bounded data equals the raw
data and exact answers can be computed from the frames. Durations are the service's
target times a lognormal factor (median 1), times ``lag`` for the services listed in
``lagged``. Drawn with a seeded numpy generator: synthetic input, not privacy noise.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

MAX_CONTRIBUTIONS = 3
SERVICES = [f"S{i}" for i in range(1, 13)]
DEPARTMENTS = ["D1", "D2", "D3", "D4", "D5", "D6"]
CHANNELS = ["counter", "web", "kiosk"]
START = datetime(2025, 1, 1)


def metadata() -> dict:
    year = [START.isoformat(), datetime(2026, 1, 1).isoformat()]
    return {
        "name": "perf-test", "version": "1", "privacy_unit": "person_id",
        "max_contributions": MAX_CONTRIBUTIONS, "max_contributions_limit": 20,
        "tables": {
            "events": {"path": "events.parquet", "columns": {
                "event_id": {"type": "int", "identifier": True},
                "person_id": {"type": "int", "identifier": True},
                "service_id": {"type": "str", "keys": SERVICES},
                "department": {"type": "str", "keys": DEPARTMENTS},
                "channel": {"type": "str", "keys": CHANNELS},
                "request_time": {"type": "datetime", "bounds": year},
                "waiting_minutes": {"type": "float", "bounds": [0, 240], "nullable": True},
                "duration_hours": {"type": "float", "bounds": [0, 720]},
                "satisfaction": {"type": "int", "keys": [1, 2, 3, 4, 5], "bounds": [1, 5], "nullable": True},
            }},
            "steps": {"path": "steps.parquet", "privacy_unit_via": {"table": "events", "on": "event_id"},
                      "columns": {
                          "event_id": {"type": "int", "identifier": True},
                          "step": {"type": "int", "keys": [1, 2]},
                          "started": {"type": "datetime", "bounds": [year[0], "2026-03-01T00:00:00"]},
                          "ended": {"type": "datetime", "bounds": [year[0], "2026-03-01T00:00:00"]},
                      }},
        },
        "catalogue": {"path": "services.parquet", "steps_path": "service_steps.parquet"},
    }


def targets() -> dict[str, float]:
    return {s: float(4 * (1 + i % 4)) for i, s in enumerate(SERVICES)}


def department_of(service: str) -> str:
    return DEPARTMENTS[SERVICES.index(service) % len(DEPARTMENTS)]


def write(folder: Path, people: int = 3000, seed: int = 0, lagged: dict[str, float] | None = None,
          department_speed: dict[str, float] | None = None) -> Path:
    """Write the dataset; ``lagged`` multiplies durations of services, ``department_speed`` of departments."""
    rng = np.random.default_rng(seed)
    lagged = lagged or {}
    speed = department_speed or {}
    per_person = rng.integers(1, MAX_CONTRIBUTIONS + 1, people)
    person = np.repeat(np.arange(people), per_person)
    n = len(person)
    service = rng.choice(SERVICES, n)
    target = np.array([targets()[s] for s in service])
    factor = np.array([lagged.get(s, 1.0) * speed.get(department_of(s), 1.0) for s in service])
    duration = np.minimum(target * factor * rng.lognormal(0, 0.4, n), 719.0)
    channel = rng.choice(CHANNELS, n)
    waiting = np.where(channel == "web", np.nan, np.round(rng.gamma(2, 6, n), 2))
    times = [START + timedelta(seconds=int(s)) for s in rng.integers(0, 364 * 86400, n)]
    events = pl.DataFrame({
        "event_id": np.arange(n, dtype=np.int64), "person_id": person.astype(np.int64),
        "service_id": service, "department": [department_of(s) for s in service], "channel": channel,
        "request_time": pl.Series(times, dtype=pl.Datetime("us")),
        "waiting_minutes": pl.Series(waiting, nan_to_null=True),
        "duration_hours": duration,
        "satisfaction": pl.Series(np.where(rng.random(n) < 0.3, np.nan, rng.integers(1, 6, n)),
                                  nan_to_null=True).cast(pl.Int64),
    })
    # Two steps per case: the first takes 40% of the duration, the second the rest.
    first = pl.Series(duration * 0.4 * 3600e6).cast(pl.Int64)
    begin = events["request_time"]
    middle = begin + pl.Series(first).cast(pl.Duration("us"))
    end = begin + pl.Series(duration * 3600e6).cast(pl.Int64).cast(pl.Duration("us"))
    steps = pl.concat([
        pl.DataFrame({"event_id": events["event_id"], "step": 1, "started": begin, "ended": middle}),
        pl.DataFrame({"event_id": events["event_id"], "step": 2, "started": middle, "ended": end}),
    ]).with_columns(pl.col("step").cast(pl.Int64))
    folder.mkdir(parents=True, exist_ok=True)
    events.write_parquet(folder / "events.parquet")
    steps.write_parquet(folder / "steps.parquet")
    pl.DataFrame({"service_id": SERVICES, "department": [department_of(s) for s in SERVICES],
                  "complexity": [1 + i % 4 for i in range(len(SERVICES))],
                  "target_hours": [targets()[s] for s in SERVICES]}).write_parquet(folder / "services.parquet")
    pl.DataFrame({"service_id": [s for s in SERVICES for _ in (1, 2)], "step": [1, 2] * len(SERVICES),
                  "target_hours": [targets()[s] * share for s in SERVICES for share in (0.4, 0.6)]}
                 ).write_parquet(folder / "service_steps.parquet")
    (folder / "metadata.json").write_text(json.dumps(metadata(), indent=2))
    return folder
