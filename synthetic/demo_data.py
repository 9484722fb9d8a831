"""Seeded, vectorised generator of the civicdp synthetic demo dataset.

``generate(people, out, seed)`` writes a realistic year (2025) of public-service
use events (``events.parquet``), the public service catalogue
(``services.parquet``, with the public target of each step in
``service_steps.parquet``), the processing steps of every event (``steps.parquet``),
the data owner's declaration (``metadata.json``) and the planted ground truth
(``bundles.json``, ``ground_truth.json``: service bundles used together within
30 days, lagged services and lagged steps).  Everything is drawn with numpy's
``default_rng(seed)`` and assembled column-wise with polars; there are no Python
loops over people or events, so 2 million people (~10 M events, ~29 M steps)
take under a minute on two cores (``civicdp demo-data`` is the command line).
Requests per person are heavy-tailed (mean ~5; capping every person at 10 events
drops ~19 % of the events), which is the shape the privacy benchmarks rely on.

Three profiles (``generate(..., profile=...)``, ``civicdp demo-data --profile``):

- ``demo`` (the default): waiting times in whole seconds, durations mostly low in
  their [0, 720] bounds, familiar column names.
- ``other``, data of another shape for checking that figures are not artefacts of the
  friendly one: continuous waiting times with a third of them exactly zero (people served
  at once: an atom), durations centred near the top of their bounds (every service's
  target is 520 hours plus 1.25 times the demo's; over a third are clipped at 720), a
  heavier tail of requests per person (lognormal sigma 1.1 instead of 0.85, up to 5,000
  requests), and other names for the person, waiting and duration columns
  (:data:`COLUMNS`).
- ``continuous``: the same heavier tail of requests, with waits and durations that are
  continuous and skewed: lognormal waits (sigma 1, about the demo's medians, so a long right
  tail) never rounded, a fifth of them exactly zero (an atom), and every step timed to the
  microsecond, so durations take (nearly) as many distinct values as there are events. The
  demo's column names, so every analysis runs on it with its defaults.

The generator is assembled from one module per job: :mod:`~civicdp.synthetic.catalogue`
(services, departments, centres, channels, planted lags), :mod:`~civicdp.synthetic.profiles`
(the shapes), :mod:`~civicdp.synthetic.timing` (calendar and request times),
:mod:`~civicdp.synthetic.demand` (requests per person, planted bundles),
:mod:`~civicdp.synthetic.handling` (waiting, steps, durations, satisfaction) and
:mod:`~civicdp.synthetic.declaration` (``metadata.json`` and the ground truth). This module
draws them in a fixed order from one seeded generator and writes the files; the names
other code uses (``generate``, ``PROFILES``, ``COLUMNS``, ``CHANNELS``, ...) stay importable
from here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from civicdp.synthetic import catalogue, declaration, demand, handling, timing
from civicdp.synthetic.catalogue import (CENTRE_IDS, CHANNELS, DEPARTMENT_IDS, MAX_STEPS, N_CENTRES, N_DEPARTMENTS,
                                         N_SERVICES, SERVICE_IDS, Catalogue)
from civicdp.synthetic.declaration import MAX_CONTRIBUTIONS, metadata
from civicdp.synthetic.demand import BUNDLE_WINDOW_DAYS
from civicdp.synthetic.handling import DURATION_CAP_HOURS
from civicdp.synthetic.profiles import COLUMNS, PROFILES, Profile
from civicdp.synthetic.timing import DAYS, US_PER_S, YEAR_START_US

__all__ = [
    "BUNDLE_WINDOW_DAYS", "CENTRE_IDS", "CHANNELS", "COLUMNS", "DAYS", "DEPARTMENT_IDS", "DURATION_CAP_HOURS",
    "MAX_CONTRIBUTIONS", "MAX_STEPS", "N_CENTRES", "N_DEPARTMENTS", "N_SERVICES", "PROFILES", "SERVICE_IDS",
    "Catalogue", "DemoSummary", "Profile", "generate",
]

#: The declaration of a generated dataset, under the name tests and tools have imported it by.
_metadata = metadata


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate`` produced: sizes, wall-clock seconds and written files."""

    people: int
    events: int
    steps: int
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)


def _label(codes: np.ndarray, labels: list[str], name: str) -> pl.Series:
    """Map integer codes to their string labels."""
    return pl.Series(name, labels).gather(codes)


def _us(values: np.ndarray, name: str) -> pl.Series:
    """Microseconds since the epoch as a Datetime("us") series."""
    return pl.Series(name, values, dtype=pl.Int64).cast(pl.Datetime("us"))


def generate(people: int, out: Path, seed: int = 0, profile: str = "demo") -> DemoSummary:
    """Generate the demo dataset for ``people`` people into directory ``out`` (see :data:`PROFILES`)."""
    if people < 1:
        raise ValueError("people must be at least 1")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILES)}")
    shape = PROFILES[profile]
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cat = catalogue.build_catalogue(rng)
    if (shape.duration_factor, shape.duration_offset) != (1.0, 0.0):
        target = cat.target_hours * shape.duration_factor + shape.duration_offset
        cat = replace(cat, target_hours=np.round(target * 2) / 2)
    counts, heavy = demand.sample_counts(rng, people, shape)
    n = int(counts.sum())
    person = np.repeat(np.arange(people), counts)
    starts = np.cumsum(counts) - counts
    service = np.full(n, -1, dtype=np.int64)
    anchor = np.full(n, -1, dtype=np.int64)
    bundles = demand.plant_bundles(rng, cat, counts, starts, service, anchor)
    demand.natural_services(rng, cat, service, heavy[person])

    centre_p = catalogue.zipf(rng, N_CENTRES, 0.6)
    home = rng.choice(N_CENTRES, people, p=centre_p)
    centre = np.where(rng.random(n) < 0.85, home[person], rng.choice(N_CENTRES, n, p=centre_p))
    u = rng.random(n)
    channel = np.zeros(n, dtype=np.int64)
    for c in range(len(CHANNELS) - 1):
        channel += u > cat.channel_cdf[service, c]
    seconds = timing.sample_times(rng, channel, anchor)

    order = np.argsort(seconds, kind="stable")
    person, service, centre, channel, seconds = (
        a[order] for a in (person, service, centre, channel, seconds))
    event_id = rng.permutation(n)
    person_id = rng.permutation(people)[person]
    centre_busy = rng.lognormal(0, 0.15, N_CENTRES) * (1 + 8 * centre_p) ** 0.5
    wait = handling.waiting(rng, channel, centre, seconds, centre_busy / np.median(centre_busy), shape)
    request_us = YEAR_START_US + seconds * US_PER_S
    step_cols, hours = handling.steps(rng, cat, service, request_us, shape)
    satisfaction = handling.satisfaction(rng, cat, service, channel, wait, hours)

    events = pl.DataFrame([
        pl.Series("event_id", event_id, dtype=pl.Int64),
        pl.Series(shape.person, person_id, dtype=pl.Int64),
        _label(service, SERVICE_IDS, "service_id"),
        _label(cat.department[service], DEPARTMENT_IDS, "department"),
        _label(centre, CENTRE_IDS, "centre"),
        _label(channel, list(CHANNELS), "channel"),
        _us(request_us, "request_time"),
        pl.Series(shape.waiting, wait, dtype=pl.Float64, nan_to_null=True),
        pl.Series(shape.duration, hours, dtype=pl.Float64),
        pl.Series("satisfaction", satisfaction, nan_to_null=True).cast(pl.Int64),
    ])
    steps = pl.DataFrame([
        pl.Series("event_id", event_id[step_cols["event_index"]], dtype=pl.Int64),
        pl.Series("step", step_cols["step"], dtype=pl.Int64),
        _label(step_cols["department"], DEPARTMENT_IDS, "department"),
        _us(step_cols["started"], "started"),
        _us(step_cols["ended"], "ended"),
    ])
    services = catalogue.service_table(cat)
    service_steps = catalogue.step_catalogue(cat)
    truth = declaration.ground_truth(cat, bundles)
    paths = {name: out / name for name in (
        "events.parquet", "services.parquet", "service_steps.parquet", "steps.parquet",
        "bundles.json", "ground_truth.json", "metadata.json")}
    events.write_parquet(paths["events.parquet"])
    services.write_parquet(paths["services.parquet"])
    service_steps.write_parquet(paths["service_steps.parquet"])
    steps.write_parquet(paths["steps.parquet"])
    for name, obj in (("bundles.json", bundles), ("ground_truth.json", truth),
                      ("metadata.json", declaration.metadata(seed, people, profile))):
        paths[name].write_text(json.dumps(obj, indent=2) + "\n")
    return DemoSummary(people, n, steps.height, time.perf_counter() - t0, paths)

