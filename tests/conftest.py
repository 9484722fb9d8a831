"""Shared fixtures: small datasets whose every row the tests know.

A dataset is a folder with ``metadata.json`` and ``events.parquet``. The default one
has 50 people with 1 to 3 events each, so with the default contribution bound
(``max_contributions`` = 3) the bounded data equals the raw data and the truth of
any aggregate can be computed from the frame directly. Test data is drawn from a
seeded numpy generator: it is synthetic input, not privacy noise.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pytest

from civicdp.queries.engine import LocalDataset

PEOPLE = 50
MAX_CONTRIBUTIONS = 3
SERVICES = ("A", "B", "C")
CHANNELS = ("counter", "web", "mobile", "kiosk")  # "kiosk" is declared but never occurs
PERIOD = (datetime(2025, 1, 1), datetime(2025, 7, 1))  # six months
WAIT_BOUNDS = (0.0, 100.0)

BASE_METADATA: dict[str, Any] = {
    "name": "test-services",
    "version": "1",
    "description": "Small synthetic dataset for the civicdp test suite",
    "privacy_unit": "person_id",
    "max_contributions": MAX_CONTRIBUTIONS,
    "max_contributions_limit": 20,
    "tables": {
        "events": {
            "path": "events.parquet",
            "columns": {
                "event_id": {"type": "int", "identifier": True},
                "person_id": {"type": "int", "identifier": True},
                "service": {"type": "str", "keys": list(SERVICES)},
                "channel": {"type": "str", "keys": list(CHANNELS)},
                "request_time": {"type": "datetime",
                                 "bounds": [PERIOD[0].isoformat(), PERIOD[1].isoformat()]},
                "waiting_minutes": {"type": "float", "bounds": list(WAIT_BOUNDS), "nullable": True},
                "satisfaction": {"type": "int", "keys": [1, 2, 3, 4, 5], "bounds": [1, 5]},
                "remark": {"type": "str"},  # no public keys: cannot be grouped or filtered on
                "score": {"type": "float"},  # no bounds: cannot be summed
            },
        }
    },
}


def events_frame(people: int = PEOPLE, seed: int = 0) -> pl.DataFrame:
    """``people`` people; person p has ``1 + p % 3`` events (at most the default bound)."""
    rng = np.random.default_rng(seed)
    person = np.repeat(np.arange(people), [1 + p % 3 for p in range(people)])
    n = len(person)
    seconds_in_period = int((PERIOD[1] - PERIOD[0]).total_seconds())
    times = [PERIOD[0] + timedelta(seconds=int(s)) for s in rng.integers(0, seconds_in_period, n)]
    # events: [event_id, person_id, service, channel, request_time, waiting_minutes, satisfaction, remark, score]
    return pl.DataFrame({
        "event_id": np.arange(n, dtype=np.int64),
        "person_id": person.astype(np.int64),
        "service": [SERVICES[i] for i in rng.choice(3, n, p=[0.5, 0.3, 0.2])],
        "channel": [CHANNELS[i] for i in rng.integers(0, 3, n)],
        "request_time": pl.Series(times, dtype=pl.Datetime("us")),
        "waiting_minutes": np.round(rng.uniform(*WAIT_BOUNDS, n), 2),
        "satisfaction": rng.integers(1, 6, n).astype(np.int64),
        "remark": [f"r{i % 7}" for i in range(n)],
        "score": rng.normal(0, 1, n),
    })


def base_metadata() -> dict[str, Any]:
    """A fresh, freely modifiable copy of the default metadata document."""
    return copy.deepcopy(BASE_METADATA)


def write_dataset(folder: Path, frame: pl.DataFrame, metadata: dict[str, Any]) -> Path:
    """Write ``frame`` as the events table and ``metadata`` as metadata.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / metadata["tables"]["events"]["path"])
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return folder


MakeDataset = Callable[..., LocalDataset]


@pytest.fixture
def make_dataset(tmp_path: Path) -> MakeDataset:
    """Factory: ``make_dataset(frame=None, metadata=None, name="ds")`` -> LocalDataset."""
    def make(frame: pl.DataFrame | None = None, metadata: dict[str, Any] | None = None,
             name: str = "ds") -> LocalDataset:
        folder = write_dataset(tmp_path / name, events_frame() if frame is None else frame,
                               base_metadata() if metadata is None else metadata)
        return LocalDataset(folder)
    return make


@pytest.fixture
def frame() -> pl.DataFrame:
    """The default events frame (50 people, 1-3 events each)."""
    return events_frame()


@pytest.fixture
def dataset(make_dataset: MakeDataset, frame: pl.DataFrame) -> LocalDataset:
    """The default dataset, written to a fresh folder."""
    return make_dataset(frame)
