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

Two profiles (``generate(..., profile=...)``, ``civicdp demo-data --profile``):

- ``demo`` (the default): waiting times in whole seconds, durations mostly low in
  their [0, 720] bounds, familiar column names.
- ``other``, data of another shape for checking that figures are not artefacts of the
  friendly one: continuous waiting times with a third of them exactly zero (people served
  at once: an atom), durations centred near the top of their bounds (every service's
  target is 520 hours plus 1.25 times the demo's; over a third are clipped at 720), a
  heavier tail of requests per person (lognormal sigma 1.1 instead of 0.85, up to 5,000
  requests), and other names for the person, waiting and duration columns
  (:data:`COLUMNS`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

N_SERVICES = 300
N_DEPARTMENTS = 40
N_CENTRES = 100
MAX_STEPS = 6
DAYS = 365
N_BUNDLES = 20
N_LAGGED_SERVICES = 15
N_LAGGED_STEPS = 10
BUNDLE_WINDOW_DAYS = 30
MAX_CONTRIBUTIONS = 10
DURATION_CAP_HOURS = 1344.0  # 8 weeks: every step ends before 2026-03-01
YEAR_START_US = int(np.datetime64("2025-01-01T00:00:00", "us").astype(np.int64))
US_PER_S = 1_000_000

CHANNELS = ("counter", "web", "mobile", "hotline", "kiosk")
CHANNEL_SHARES = np.array([0.30, 0.35, 0.20, 0.10, 0.05])
QUEUED_CHANNELS = (0, 4)  # counter, kiosk: the only channels with a waiting time
SERVICE_IDS = [f"S{i:03d}" for i in range(1, N_SERVICES + 1)]
DEPARTMENT_IDS = [f"D{i:02d}" for i in range(1, N_DEPARTMENTS + 1)]
CENTRE_IDS = [f"C{i:03d}" for i in range(1, N_CENTRES + 1)]

# One subject per department (D01 = "Land", ...); actions carry a base complexity.
SUBJECTS = (
    "Land", "Vehicle", "Birth", "Marriage", "Business", "Building", "Residence",
    "Passport", "Identity card", "Tax", "Pension", "Child benefit", "Housing",
    "Parking", "Waste collection", "Water connection", "School enrolment",
    "Childcare", "Health insurance", "Disability support", "Unemployment",
    "Social assistance", "Dog", "Event", "Market stall", "Alcohol", "Tree felling",
    "Road works", "Noise", "Environmental", "Energy grant", "Library",
    "Sports facility", "Burial", "Citizenship", "Voter", "Fishing", "Hunting",
    "Taxi", "Heritage",
)
ACTIONS = {
    "information request": 1, "appointment": 1, "certificate": 2,
    "registration": 2, "renewal": 2, "deregistration": 2, "licence": 3,
    "application": 3, "complaint": 3, "permit": 4, "subsidy": 4,
    "inspection": 4, "appeal": 5,
}
BUSINESS_SUBJECTS = {"Land", "Business", "Building", "Tax", "Event", "Market stall",
                     "Alcohol", "Road works", "Environmental", "Taxi"}
BUSINESS_ACTIONS = {"registration", "renewal", "licence", "application", "permit",
                    "inspection"}
TARGET_BY_COMPLEXITY = np.array([2.0, 12.0, 36.0, 96.0, 192.0])

# 2025 day indices (0 = Wed 1 January) of public holidays.
HOLIDAYS = np.array([0, 107, 110, 120, 148, 159, 358, 359])
WEEKDAY_WEIGHTS = np.array([  # Mon..Sun, rows follow CHANNELS
    [1.15, 1.05, 1.00, 1.05, 0.90, 0.08, 0.01],
    [1.10, 1.05, 1.00, 1.00, 0.90, 0.65, 0.70],
    [1.00, 1.00, 1.00, 1.00, 1.00, 0.85, 0.90],
    [1.20, 1.05, 1.00, 1.00, 0.90, 0.15, 0.05],
    [1.00, 1.00, 1.00, 1.00, 1.00, 0.45, 0.25],
])
HOLIDAY_WEIGHTS = np.array([0.02, 0.80, 0.85, 0.10, 0.30])
_OFFICE = [0.6, 1.0, 1.2, 1.1, 0.6, 0.7, 1.0, 1.0, 0.8, 0.5]  # 08..17, lunch dip at 12
HOUR_WEIGHTS = np.array([  # 00..23, rows follow CHANNELS
    [0] * 8 + _OFFICE + [0] * 6,
    [.08, .05, .03, .02, .02, .04, .1, .3, .6, .8, .9, .9, .8, .8, .85, .85, .8, .75,
     .8, 1.0, 1.15, 1.1, .7, .3],
    [.1, .05, .03, .02, .02, .05, .2, .5, .6, .6, .7, .7, .8, .7, .65, .65, .7, .8,
     .9, 1.1, 1.3, 1.25, .8, .35],
    [0] * 7 + [0.1] + _OFFICE + [0.15] + [0] * 5,
    [0] * 7 + [0.15] + _OFFICE + [0.45, 0.35, 0.15] + [0] * 3,
])
SATISFACTION_BY_CHANNEL = np.array([0.0, 0.15, 0.2, -0.35, -0.1])


@dataclass(frozen=True)
class Profile:
    """The shape of a generated dataset (see the module docstring)."""

    heavy_share: float = 0.035  # people with a lognormal number of requests
    heavy_mu: float = 2.95
    heavy_sigma: float = 0.85
    heavy_cap: int = 1000
    light_p: float = 0.245  # geometric requests of everyone else
    wait_seconds: bool = True  # waiting times rounded to whole seconds
    zero_wait_share: float = 0.0  # queued requests served at once (waiting exactly 0)
    duration_factor: float = 1.0  # every service's target (and so its durations) is factor * target + offset
    duration_offset: float = 0.0  # hours
    person: str = "person_id"
    waiting: str = "waiting_minutes"
    duration: str = "duration_hours"


PROFILES = {
    "demo": Profile(),
    "other": Profile(heavy_share=0.04, heavy_mu=2.75, heavy_sigma=1.1, heavy_cap=5000, light_p=0.26,
                     wait_seconds=False, zero_wait_share=0.33, duration_factor=1.25, duration_offset=520.0,
                     person="resident_id", waiting="queue_minutes", duration="handling_hours"),
}
#: Column names per profile: the demo profile's name -> the profile's name.
COLUMNS = {name: {"person_id": p.person, "waiting_minutes": p.waiting, "duration_hours": p.duration}
           for name, p in PROFILES.items()}


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate`` produced: sizes, wall-clock seconds and written files."""

    people: int
    events: int
    steps: int
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Catalogue:
    """Per-service arrays (index = service code 0..299) driving the simulation."""

    names: list[str]
    department: np.ndarray  # int, 0..39
    complexity: np.ndarray  # int, 1..5
    target_hours: np.ndarray
    popularity: np.ndarray  # Zipf-like probabilities
    business: np.ndarray  # probabilities heavy (business) users draw from
    channel_cdf: np.ndarray  # (300, 5) cumulative channel probabilities
    n_steps: np.ndarray  # int, 1..6
    step_department: np.ndarray  # (300, 6) int
    step_weight: np.ndarray  # (300, 6) share of duration, 0 beyond n_steps
    service_lag: np.ndarray  # duration multiplier, 1 unless lagged
    step_lag: np.ndarray  # (300, 6) lagged step: times the longest other step, else 0
    planned_weight: np.ndarray  # (300, 6) share of duration as planned (before lags): public step targets


def _zipf(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf probabilities over ``n`` items in random rank order."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return rng.permutation(p / p.sum())


def _service_names(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick 300 distinct (subject, action) pairs covering every subject."""
    n_act = len(ACTIONS)
    first = np.arange(N_DEPARTMENTS) * n_act + rng.integers(0, n_act, N_DEPARTMENTS)
    rest = np.setdiff1d(np.arange(N_DEPARTMENTS * n_act), first)
    pairs = np.sort(np.concatenate(
        [first, rng.choice(rest, N_SERVICES - N_DEPARTMENTS, replace=False)]))
    return pairs // n_act, pairs % n_act


def _build_catalogue(rng: np.random.Generator) -> Catalogue:
    """Draw the service catalogue, its processing structure and planted lags."""
    subject, action = _service_names(rng)
    actions = list(ACTIONS)
    names = [f"{SUBJECTS[s]} {actions[a]}" for s, a in zip(subject, action)]
    base = np.array([ACTIONS[a] for a in actions])[action]
    complexity = np.clip(base + rng.integers(-1, 2, N_SERVICES), 1, 5)
    target = TARGET_BY_COMPLEXITY[complexity - 1] * rng.lognormal(0, 0.3, N_SERVICES)
    target = np.maximum(np.round(target * 2) / 2, 0.5)
    popularity = _zipf(rng, N_SERVICES, 0.9)
    is_business = np.array([SUBJECTS[s] in BUSINESS_SUBJECTS and actions[a] in
                            BUSINESS_ACTIONS for s, a in zip(subject, action)])
    business = np.where(is_business, _zipf(rng, N_SERVICES, 0.8), 0.0)
    channel_p = rng.dirichlet(CHANNEL_SHARES * 12, N_SERVICES)
    n_steps = np.clip(complexity + rng.integers(-1, 2, N_SERVICES), 1, MAX_STEPS)
    step_department = np.where(rng.random((N_SERVICES, MAX_STEPS)) < 0.7,
                               subject[:, None],
                               rng.integers(0, N_DEPARTMENTS, (N_SERVICES, MAX_STEPS)))
    step_department[:, 0] = subject
    step_weight = rng.gamma(2.0, 1.0, (N_SERVICES, MAX_STEPS))
    step_weight[np.arange(MAX_STEPS)[None, :] >= n_steps[:, None]] = 0.0
    step_weight /= step_weight.sum(axis=1, keepdims=True)
    # Lags are planted among the 200 most used services so they stay detectable;
    # lagged services are of complexity <= 3 so lagging rarely exceeds 720 hours.
    common = np.argsort(-popularity)[:200]
    lagged = rng.choice(common[complexity[common] <= 3], N_LAGGED_SERVICES, replace=False)
    service_lag = np.ones(N_SERVICES)
    service_lag[lagged] = rng.uniform(3.0, 10.0, N_LAGGED_SERVICES)
    multi = common[(n_steps[common] >= 2) & ~np.isin(common, lagged)]
    lag_svc = rng.choice(multi, N_LAGGED_STEPS, replace=False)
    lag_step = rng.integers(0, n_steps[lag_svc])
    step_lag = np.zeros((N_SERVICES, MAX_STEPS))
    step_lag[lag_svc, lag_step] = rng.uniform(4.0, 8.0, N_LAGGED_STEPS)
    # A lagged step takes `factor` times the service's longest other step; the
    # service's total duration is unchanged (the other steps shrink).
    planned_weight = step_weight.copy()
    others = np.where(step_lag > 0, 0.0, step_weight).max(axis=1)
    step_weight = np.where(step_lag > 0, step_lag * others[:, None], step_weight)
    step_weight /= step_weight.sum(axis=1, keepdims=True)
    return Catalogue(names, subject, complexity, target, popularity,
                     business / business.sum(), np.cumsum(channel_p, axis=1),
                     n_steps, step_department, step_weight, service_lag, step_lag, planned_weight)


def _sample_counts(rng: np.random.Generator, people: int,
                   profile: Profile = PROFILES["demo"]) -> tuple[np.ndarray, np.ndarray]:
    """Events per person: geometric bulk plus a few lognormal heavy users (3.5 % in the demo)."""
    heavy = rng.random(people) < profile.heavy_share
    light = rng.geometric(profile.light_p, people)
    heavy_n = np.ceil(rng.lognormal(profile.heavy_mu, profile.heavy_sigma, people)).astype(np.int64) + 2
    return np.where(heavy, np.minimum(heavy_n, profile.heavy_cap), light), heavy


def _day_weights() -> np.ndarray:
    """(5, 365) relative daily volume per channel: season x weekday x holidays."""
    day = np.arange(DAYS)
    season = 1.0 + 0.15 * np.cos(2 * np.pi * (day - 20) / DAYS)
    season[(day >= 212) & (day < 243)] *= 0.75  # August
    season[day >= 354] *= 0.6  # Christmas week
    w = season[None, :] * WEEKDAY_WEIGHTS[:, (day + 2) % 7]  # 2025-01-01 is a Wednesday
    w[:, HOLIDAYS] *= HOLIDAY_WEIGHTS[:, None]
    return w


def _plant_bundles(rng: np.random.Generator, cat: Catalogue, counts: np.ndarray,
                   starts: np.ndarray, service: np.ndarray,
                   anchor: np.ndarray) -> list[dict]:
    """Overwrite leading event slots of chosen people with bundle services.

    Sets ``service`` and the bundle's anchor day in ``anchor`` for planted events
    (the request days are moved into the window later) and returns the bundles.
    """
    common = np.argsort(-cat.popularity)[:120]
    sizes = rng.choice([2, 2, 3, 3, 4], N_BUNDLES)
    p = cat.popularity[common] / cat.popularity[common].sum()
    chosen = rng.choice(common, sizes.sum(), replace=False, p=p)
    season = _day_weights()[1, : DAYS - 28]
    used = np.zeros(len(counts), dtype=np.int64)
    bundles = []
    for svcs in np.split(chosen, np.cumsum(sizes)[:-1]):
        k = len(svcs)
        eligible = np.flatnonzero(counts - used >= k)
        m = min(int(round(rng.uniform(0.01, 0.03) * len(counts))), len(eligible))
        members = eligible[np.argpartition(rng.random(len(eligible)), m - 1)[:m]] \
            if m else eligible[:0]
        day = rng.choice(DAYS - 28, m, p=season / season.sum())
        for j, s in enumerate(svcs):
            ev = starts[members] + used[members] + j
            service[ev] = s
            anchor[ev] = day
        used[members] += k
        bundles.append({"services": sorted(SERVICE_IDS[s] for s in svcs),
                        "window_days": BUNDLE_WINDOW_DAYS, "people": int(m)})
    return bundles


def _natural_services(rng: np.random.Generator, cat: Catalogue, service: np.ndarray,
                      heavy_event: np.ndarray) -> None:
    """Fill unplanted events; popularity is corrected for the planted volume."""
    free = service < 0
    planted = np.bincount(service[~free], minlength=N_SERVICES)
    want = cat.popularity * len(service) - planted
    general = np.maximum(want, 0.25 * cat.popularity * len(service))
    general /= general.sum()
    biz = free & heavy_event & (rng.random(len(service)) < 0.6)
    rest = free & ~biz
    service[biz] = rng.choice(N_SERVICES, biz.sum(), p=cat.business)
    service[rest] = rng.choice(N_SERVICES, rest.sum(), p=general)


def _sample_times(rng: np.random.Generator, channel: np.ndarray,
                  anchor: np.ndarray) -> np.ndarray:
    """Request times in seconds since 2025-01-01 with daily/weekly seasonality."""
    n = len(channel)
    day = np.empty(n, dtype=np.int64)
    hour = np.empty(n, dtype=np.int64)
    dw = _day_weights()
    for c in range(len(CHANNELS)):
        idx = np.flatnonzero(channel == c)
        day[idx] = rng.choice(DAYS, len(idx), p=dw[c] / dw[c].sum())
        hour[idx] = rng.choice(24, len(idx), p=HOUR_WEIGHTS[c] / HOUR_WEIGHTS[c].sum())
    # Planted bundle events: same weekday as drawn, moved into [anchor, anchor + 27].
    b = anchor >= 0
    shift = (day[b] - anchor[b]) % 7 + 7 * rng.integers(0, 4, b.sum())
    day[b] = anchor[b] + shift
    return day * 86400 + hour * 3600 + rng.integers(0, 3600, n)


def _waiting(rng: np.random.Generator, channel: np.ndarray, centre: np.ndarray,
             seconds: np.ndarray, centre_busy: np.ndarray, profile: Profile = PROFILES["demo"]) -> np.ndarray:
    """Waiting minutes (NaN off counter/kiosk): gamma bulk, busy hours, rare tail (and an atom at 0)."""
    hour = (seconds // 3600) % 24
    busy = HOUR_WEIGHTS[0] / HOUR_WEIGHTS[0].max()
    median = 11.0 * centre_busy[centre] * (0.75 + 0.35 * busy[hour])
    median *= np.where(channel == 4, 0.8, 1.0)
    shape = 2.2
    wait = rng.gamma(shape, median / (shape - 1 / 3))
    tail = rng.random(len(wait)) < 0.005
    wait[tail] += rng.lognormal(np.log(180), 0.5, tail.sum())
    if profile.wait_seconds:
        wait = np.round(wait * 60) / 60
    if profile.zero_wait_share:
        wait[rng.random(len(wait)) < profile.zero_wait_share] = 0.0
    return np.where(np.isin(channel, QUEUED_CHANNELS), wait, np.nan)


def _soft_cap(hours: np.ndarray, knee: float = 960.0) -> np.ndarray:
    """Compress durations above ``knee`` smoothly so they stay below the cap."""
    room = DURATION_CAP_HOURS - knee
    return np.where(hours > knee, knee + room * np.tanh((hours - knee) / room), hours)


def _steps(rng: np.random.Generator, cat: Catalogue, service: np.ndarray,
           request_us: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Expand events into consecutive steps; returns step columns and event seconds."""
    n = len(service)
    k = cat.n_steps[service]
    ev = np.repeat(np.arange(n, dtype=np.int32), k)
    last = np.cumsum(k) - 1  # row of each event's last step
    step = np.arange(len(ev), dtype=np.int32) - np.repeat((last - k + 1).astype(np.int32), k)
    flat = service[ev].astype(np.int32) * MAX_STEPS + step  # (service, step) cell
    share = cat.step_weight.ravel()[flat] * rng.uniform(0.5, 1.5, len(ev))
    hours = cat.target_hours[service] * rng.lognormal(0, 0.5, n) * cat.service_lag[service]
    seconds_per_share = _soft_cap(hours) * 3600 / np.bincount(ev, share, minlength=n)
    step_s = np.rint(share * seconds_per_share[ev]).astype(np.int64)
    np.maximum(step_s, 1, out=step_s)
    end_s = np.cumsum(step_s)
    end_s -= np.repeat(np.concatenate(([0], end_s[last[:-1]])), k)  # restart per event
    ended = np.repeat(request_us, k)
    ended += end_s * US_PER_S
    cols = {"event_index": ev, "step": step + 1,
            "department": cat.step_department.ravel()[flat],
            "started": ended - step_s * US_PER_S, "ended": ended}
    return cols, end_s[last]


def _satisfaction(rng: np.random.Generator, cat: Catalogue, service: np.ndarray,
                  channel: np.ndarray, wait: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """Scores 1..5 (NaN = missing, ~40 %) that drop with long waits and delays."""
    late = np.maximum(np.log(hours / cat.target_hours[service]), 0.0)
    slow = np.nan_to_num(np.maximum(wait - 10.0, 0.0), nan=0.0)
    latent = (4.1 + rng.normal(0, 0.9, len(service)) - 0.03 * slow - 0.7 * late
              + SATISFACTION_BY_CHANNEL[channel])
    score = np.clip(np.rint(latent), 1, 5)
    return np.where(rng.random(len(service)) < 0.4, np.nan, score)


def _label(codes: np.ndarray, labels: list[str], name: str) -> pl.Series:
    """Map integer codes to their string labels."""
    return pl.Series(name, labels).gather(codes)


def _us(values: np.ndarray, name: str) -> pl.Series:
    """Microseconds since the epoch as a Datetime("us") series."""
    return pl.Series(name, values, dtype=pl.Int64).cast(pl.Datetime("us"))


def _metadata(seed: int, people: int, profile: str = "demo") -> dict:
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


def _step_catalogue(cat: Catalogue) -> pl.DataFrame:
    """Public targets of each service's processing steps: its target split as planned (before lags)."""
    svc, step = np.nonzero(np.arange(MAX_STEPS)[None, :] < cat.n_steps[:, None])
    hours = np.maximum(np.round(cat.target_hours[svc] * cat.planned_weight[svc, step], 1), 0.1)
    # service_steps: [service_id, step, target_hours]
    return pl.DataFrame({
        "service_id": [SERVICE_IDS[s] for s in svc],
        "step": pl.Series(step + 1, dtype=pl.Int64),
        "target_hours": pl.Series(hours, dtype=pl.Float64),
    })


def _ground_truth(cat: Catalogue, bundles: list[dict]) -> dict:
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
    cat = _build_catalogue(rng)
    if (shape.duration_factor, shape.duration_offset) != (1.0, 0.0):
        target = cat.target_hours * shape.duration_factor + shape.duration_offset
        cat = replace(cat, target_hours=np.round(target * 2) / 2)
    counts, heavy = _sample_counts(rng, people, shape)
    n = int(counts.sum())
    person = np.repeat(np.arange(people), counts)
    starts = np.cumsum(counts) - counts
    service = np.full(n, -1, dtype=np.int64)
    anchor = np.full(n, -1, dtype=np.int64)
    bundles = _plant_bundles(rng, cat, counts, starts, service, anchor)
    _natural_services(rng, cat, service, heavy[person])

    centre_p = _zipf(rng, N_CENTRES, 0.6)
    home = rng.choice(N_CENTRES, people, p=centre_p)
    centre = np.where(rng.random(n) < 0.85, home[person], rng.choice(N_CENTRES, n, p=centre_p))
    u = rng.random(n)
    channel = np.zeros(n, dtype=np.int64)
    for c in range(len(CHANNELS) - 1):
        channel += u > cat.channel_cdf[service, c]
    seconds = _sample_times(rng, channel, anchor)

    order = np.argsort(seconds, kind="stable")
    person, service, centre, channel, seconds = (
        a[order] for a in (person, service, centre, channel, seconds))
    event_id = rng.permutation(n)
    person_id = rng.permutation(people)[person]
    centre_busy = rng.lognormal(0, 0.15, N_CENTRES) * (1 + 8 * centre_p) ** 0.5
    wait = _waiting(rng, channel, centre, seconds, centre_busy / np.median(centre_busy), shape)
    request_us = YEAR_START_US + seconds * US_PER_S
    step_cols, total_s = _steps(rng, cat, service, request_us)
    hours = total_s / 3600.0
    satisfaction = _satisfaction(rng, cat, service, channel, wait, hours)

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
    services = pl.DataFrame({
        "service_id": SERVICE_IDS, "name": cat.names,
        "department": [DEPARTMENT_IDS[d] for d in cat.department],
        "complexity": pl.Series(cat.complexity, dtype=pl.Int64),
        "target_hours": pl.Series(cat.target_hours, dtype=pl.Float64),
    })
    service_steps = _step_catalogue(cat)
    truth = _ground_truth(cat, bundles)
    paths = {name: out / name for name in (
        "events.parquet", "services.parquet", "service_steps.parquet", "steps.parquet",
        "bundles.json", "ground_truth.json", "metadata.json")}
    events.write_parquet(paths["events.parquet"])
    services.write_parquet(paths["services.parquet"])
    service_steps.write_parquet(paths["service_steps.parquet"])
    steps.write_parquet(paths["steps.parquet"])
    for name, obj in (("bundles.json", bundles), ("ground_truth.json", truth),
                      ("metadata.json", _metadata(seed, people, profile))):
        paths[name].write_text(json.dumps(obj, indent=2) + "\n")
    return DemoSummary(people, n, steps.height, time.perf_counter() - t0, paths)

