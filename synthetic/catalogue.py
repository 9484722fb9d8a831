"""The public service catalogue of the demo dataset: services, departments, centres, channels and planted lags.

:func:`build_catalogue` draws the 300 services (distinct subject-action pairs covering
every department's subject), how complex and popular each is, which channels it is
requested through, its processing steps and the lagged services and steps that the
ground truth records. :func:`step_catalogue` is the public table of each step's
planned target (``service_steps.parquet``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

N_SERVICES = 300
N_DEPARTMENTS = 40
N_CENTRES = 100
MAX_STEPS = 6
N_LAGGED_SERVICES = 15
N_LAGGED_STEPS = 10

CHANNELS = ("counter", "web", "mobile", "hotline", "kiosk")
CHANNEL_SHARES = np.array([0.30, 0.35, 0.20, 0.10, 0.05])
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


def zipf(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
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


def build_catalogue(rng: np.random.Generator) -> Catalogue:
    """Draw the service catalogue, its processing structure and planted lags."""
    subject, action = _service_names(rng)
    actions = list(ACTIONS)
    names = [f"{SUBJECTS[s]} {actions[a]}" for s, a in zip(subject, action)]
    base = np.array([ACTIONS[a] for a in actions])[action]
    complexity = np.clip(base + rng.integers(-1, 2, N_SERVICES), 1, 5)
    target = TARGET_BY_COMPLEXITY[complexity - 1] * rng.lognormal(0, 0.3, N_SERVICES)
    target = np.maximum(np.round(target * 2) / 2, 0.5)
    popularity = zipf(rng, N_SERVICES, 0.9)
    is_business = np.array([SUBJECTS[s] in BUSINESS_SUBJECTS and actions[a] in
                            BUSINESS_ACTIONS for s, a in zip(subject, action)])
    business = np.where(is_business, zipf(rng, N_SERVICES, 0.8), 0.0)
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


def step_catalogue(cat: Catalogue) -> pl.DataFrame:
    """Public targets of each service's processing steps: its target split as planned (before lags)."""
    svc, step = np.nonzero(np.arange(MAX_STEPS)[None, :] < cat.n_steps[:, None])
    hours = np.maximum(np.round(cat.target_hours[svc] * cat.planned_weight[svc, step], 1), 0.1)
    # service_steps: [service_id, step, target_hours]
    return pl.DataFrame({
        "service_id": [SERVICE_IDS[s] for s in svc],
        "step": pl.Series(step + 1, dtype=pl.Int64),
        "target_hours": pl.Series(hours, dtype=pl.Float64),
    })


def service_table(cat: Catalogue) -> pl.DataFrame:
    """The public catalogue (``services.parquet``): id, name, department, complexity, target hours."""
    return pl.DataFrame({
        "service_id": SERVICE_IDS, "name": cat.names,
        "department": [DEPARTMENT_IDS[d] for d in cat.department],
        "complexity": pl.Series(cat.complexity, dtype=pl.Int64),
        "target_hours": pl.Series(cat.target_hours, dtype=pl.Float64),
    })
