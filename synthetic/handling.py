"""How each request is served: its waiting time, its processing steps and durations, and its satisfaction score.

:func:`waiting` draws waiting minutes at counters and kiosks (the only queued
channels); :func:`steps` expands every event into its consecutive processing steps,
whose durations add up to the event's (soft-capped, :func:`soft_cap`) duration;
:func:`satisfaction` scores the request from its wait and its delay.
"""

from __future__ import annotations

import numpy as np

from civicdp.synthetic.catalogue import MAX_STEPS, Catalogue
from civicdp.synthetic.profiles import PROFILES, Profile
from civicdp.synthetic.timing import HOUR_WEIGHTS, US_PER_S

DURATION_CAP_HOURS = 1344.0  # 8 weeks: every step ends before 2026-03-01
QUEUED_CHANNELS = (0, 4)  # counter, kiosk: the only channels with a waiting time
SATISFACTION_BY_CHANNEL = np.array([0.0, 0.15, 0.2, -0.35, -0.1])


def waiting(rng: np.random.Generator, channel: np.ndarray, centre: np.ndarray,
            seconds: np.ndarray, centre_busy: np.ndarray, profile: Profile = PROFILES["demo"]) -> np.ndarray:
    """Waiting minutes (NaN off counter/kiosk): gamma bulk, busy hours, rare tail (and an atom at 0)."""
    hour = (seconds // 3600) % 24
    busy = HOUR_WEIGHTS[0] / HOUR_WEIGHTS[0].max()
    median = 11.0 * centre_busy[centre] * (0.75 + 0.35 * busy[hour])
    median *= np.where(channel == 4, 0.8, 1.0)
    if profile.wait_sigma:
        wait = median * rng.lognormal(0.0, profile.wait_sigma, len(median))  # right-skewed, no rounding
    else:
        shape = 2.2
        wait = rng.gamma(shape, median / (shape - 1 / 3))
    tail = rng.random(len(wait)) < 0.005
    wait[tail] += rng.lognormal(np.log(180), 0.5, tail.sum())
    if profile.wait_seconds:
        wait = np.round(wait * 60) / 60
    if profile.zero_wait_share:
        wait[rng.random(len(wait)) < profile.zero_wait_share] = 0.0
    return np.where(np.isin(channel, QUEUED_CHANNELS), wait, np.nan)


def soft_cap(hours: np.ndarray, knee: float = 960.0) -> np.ndarray:
    """Compress durations above ``knee`` smoothly so they stay below the cap."""
    room = DURATION_CAP_HOURS - knee
    return np.where(hours > knee, knee + room * np.tanh((hours - knee) / room), hours)


def steps(rng: np.random.Generator, cat: Catalogue, service: np.ndarray, request_us: np.ndarray,
          profile: Profile = PROFILES["demo"]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Expand events into consecutive steps; returns step columns and each event's duration in hours.

    Steps last whole seconds, or whole microseconds (continuous durations) when the profile
    says ``step_seconds=False``."""
    n = len(service)
    k = cat.n_steps[service]
    ev = np.repeat(np.arange(n, dtype=np.int32), k)
    last = np.cumsum(k) - 1  # row of each event's last step
    step = np.arange(len(ev), dtype=np.int32) - np.repeat((last - k + 1).astype(np.int32), k)
    flat = service[ev].astype(np.int32) * MAX_STEPS + step  # (service, step) cell
    share = cat.step_weight.ravel()[flat] * rng.uniform(0.5, 1.5, len(ev))
    hours = cat.target_hours[service] * rng.lognormal(0, 0.5, n) * cat.service_lag[service]
    unit = 1 if profile.step_seconds else US_PER_S  # ticks per second
    ticks_per_share = soft_cap(hours) * 3600 * unit / np.bincount(ev, share, minlength=n)
    step_t = np.rint(share * ticks_per_share[ev]).astype(np.int64)
    np.maximum(step_t, 1, out=step_t)
    end_t = np.cumsum(step_t)
    end_t -= np.repeat(np.concatenate(([0], end_t[last[:-1]])), k)  # restart per event
    ended = np.repeat(request_us, k)
    ended += end_t * (US_PER_S // unit)
    cols = {"event_index": ev, "step": step + 1,
            "department": cat.step_department.ravel()[flat],
            "started": ended - step_t * (US_PER_S // unit), "ended": ended}
    return cols, end_t[last] / (3600.0 * unit)


def satisfaction(rng: np.random.Generator, cat: Catalogue, service: np.ndarray,
                 channel: np.ndarray, wait: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """Scores 1..5 (NaN = missing, ~40 %) that drop with long waits and delays."""
    late = np.maximum(np.log(hours / cat.target_hours[service]), 0.0)
    slow = np.nan_to_num(np.maximum(wait - 10.0, 0.0), nan=0.0)
    latent = (4.1 + rng.normal(0, 0.9, len(service)) - 0.03 * slow - 0.7 * late
              + SATISFACTION_BY_CHANNEL[channel])
    score = np.clip(np.rint(latent), 1, 5)
    return np.where(rng.random(len(service)) < 0.4, np.nan, score)
