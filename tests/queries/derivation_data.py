"""The test dataset with a public catalogue (service -> department), for the derived-answer tests.

Services A and B belong to department D1, C to D2 (``empty_department=True`` also declares D3,
which has no service). Every event's ``department`` column agrees with the catalogue, so a
roll-up is the true answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from civicdp.queries import derivation
from civicdp.queries.engine import LocalDataset, Result
from civicdp.queries.spec import parse_spec
from tests.conftest import base_metadata, events_frame, write_dataset

DEPARTMENT = {"A": "D1", "B": "D1", "C": "D2"}
DEPARTMENTS = ["D1", "D2"]


def catalogue_metadata(version: str = "1", zcdp: bool = False, empty_department: bool = False) -> dict[str, Any]:
    metadata = base_metadata()
    metadata["version"] = version
    if zcdp:
        metadata["accounting"] = {"mode": "zcdp", "delta": 1e-9}
    metadata["tables"]["events"]["columns"]["department"] = {"type": "str",
                                                          "keys": DEPARTMENTS + ["D3"] * empty_department}
    metadata["catalogue"] = {"path": "services.parquet"}
    return metadata


def write_catalogue_dataset(folder: Path, version: str = "1", zcdp: bool = False,
                            empty_department: bool = False) -> Path:
    """The 50-person test dataset with a department column and the catalogue file."""
    frame = events_frame().with_columns(pl.col("service").replace_strict(DEPARTMENT).alias("department"))
    write_dataset(folder, frame, catalogue_metadata(version, zcdp, empty_department))
    pl.DataFrame({"service": list(DEPARTMENT), "department": list(DEPARTMENT.values()),
                  "target_hours": [24.0, 48.0, 72.0]}).write_parquet(folder / "services.parquet")
    return folder


def body_of(result: Result) -> dict[str, Any]:
    """A result as the server stores it (a release's body, through JSON)."""
    body = {"columns": result.table.columns, "rows": result.table.to_dicts(), "loss": result.loss.as_dict(),
            "contributions": result.contributions, "confidence": result.confidence,
            "mechanisms": result.mechanisms, "notes": result.notes, "tables": {}}
    return json.loads(json.dumps(body, default=str))


def stored(dataset: LocalDataset, ident: int, spec: dict[str, Any]) -> derivation.StoredRelease:
    """Run ``spec`` on ``dataset`` and keep it as stored release ``ident``."""
    return derivation.StoredRelease(ident, parse_spec(spec), body_of(dataset.run(spec)))
