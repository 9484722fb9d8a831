"""What is written about the generated data: the data owner's declaration and the planted ground truth.

:func:`metadata` is ``metadata.json`` in the format ``queries/metadata.py`` reads
(privacy unit, contribution bound, column types, keys and bounds);
:func:`ground_truth` is ``ground_truth.json``: the planted bundles, lagged services and
lagged steps that the benchmarks and tests compare released figures with.
"""

from __future__ import annotations

import numpy as np

from civicdp.synthetic.catalogue import CENTRE_IDS, CHANNELS, DEPARTMENT_IDS, MAX_STEPS, SERVICE_IDS, Catalogue
from civicdp.synthetic.profiles import PROFILES

MAX_CONTRIBUTIONS = 10


def metadata(seed: int, people: int, profile: str = "demo") -> dict:
    """The data owner's declaration for the generated tables."""
    names = PROFILES[profile]
    depts = {"type": "str", "keys": DEPARTMENT_IDS}
    year = ["2025-01-01T00:00:00", "2026-01-01T00:00:00"]
    steps_span = ["2025-01-01T00:00:00", "2026-03-01T00:00:00"]
    return {
        "name": "civic-demo",
        "version": f"{seed}-{people}" + ("" if profile == "demo" else f"-{profile}"),
        "description": "Synthetic public-service use events (civicdp demo-data"
                       + ("" if profile == "demo" else f", profile {profile}") + ")",
        "privacy_unit": names.person,
        "max_contributions": MAX_CONTRIBUTIONS,
        "tables": {
            "events": {"path": "events.parquet", "columns": {
                "event_id": {"type": "int", "identifier": True},
                names.person: {"type": "int", "identifier": True},
                "service_id": {"type": "str", "keys": SERVICE_IDS},
                "department": depts,
                "centre": {"type": "str", "keys": CENTRE_IDS},
                "channel": {"type": "str", "keys": list(CHANNELS)},
                "request_time": {"type": "datetime", "bounds": year},
                names.waiting: {"type": "float", "bounds": [0, 240], "nullable": True},
                names.duration: {"type": "float", "bounds": [0, 720]},
                "satisfaction": {"type": "int", "keys": [1, 2, 3, 4, 5],
                                 "bounds": [1, 5], "nullable": True},
            }},
            "steps": {"path": "steps.parquet",
                      "privacy_unit_via": {"table": "events", "on": "event_id"},
                      "columns": {
                          "event_id": {"type": "int", "identifier": True},
                          "step": {"type": "int", "keys": list(range(1, MAX_STEPS + 1))},
                          "department": depts,
                          "started": {"type": "datetime", "bounds": steps_span},
                          "ended": {"type": "datetime", "bounds": steps_span},
                      }},
        },
        "catalogue": {"path": "services.parquet", "steps_path": "service_steps.parquet"},
    }


def ground_truth(cat: Catalogue, bundles: list[dict]) -> dict:
    """Planted bundles, lagged services and lagged steps."""
    lagged = np.flatnonzero(cat.service_lag > 1)
    svc, step = np.nonzero(cat.step_lag > 0)
    return {
        "bundles": bundles,
        "lagged_services": [{"service_id": SERVICE_IDS[s],
                             "factor": round(float(cat.service_lag[s]), 2)} for s in lagged],
        "lagged_steps": [{"service_id": SERVICE_IDS[s], "step": int(j) + 1,
                          "factor": round(float(cat.step_lag[s, j]), 2),
                          "share": round(float(cat.step_weight[s, j]), 3)}
                         for s, j in zip(svc, step)],
    }
