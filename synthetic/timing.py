"""When requests are made: the 2025 calendar, seasonality per channel, and request times.

Daily volume follows the season, the weekday and public holidays, hourly volume the
channel's opening hours (:func:`day_weights`, :data:`HOUR_WEIGHTS`);
:func:`sample_times` draws a request time for every event and moves the events of a
planted bundle into their bundle's window.
"""

from __future__ import annotations

import numpy as np

from civicdp.synthetic.catalogue import CHANNELS

DAYS = 365
YEAR_START_US = int(np.datetime64("2025-01-01T00:00:00", "us").astype(np.int64))
US_PER_S = 1_000_000

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


def day_weights() -> np.ndarray:
    """(5, 365) relative daily volume per channel: season x weekday x holidays."""
    day = np.arange(DAYS)
    season = 1.0 + 0.15 * np.cos(2 * np.pi * (day - 20) / DAYS)
    season[(day >= 212) & (day < 243)] *= 0.75  # August
    season[day >= 354] *= 0.6  # Christmas week
    w = season[None, :] * WEEKDAY_WEIGHTS[:, (day + 2) % 7]  # 2025-01-01 is a Wednesday
    w[:, HOLIDAYS] *= HOLIDAY_WEIGHTS[:, None]
    return w


def sample_times(rng: np.random.Generator, channel: np.ndarray,
                 anchor: np.ndarray) -> np.ndarray:
    """Request times in seconds since 2025-01-01 with daily/weekly seasonality."""
    n = len(channel)
    day = np.empty(n, dtype=np.int64)
    hour = np.empty(n, dtype=np.int64)
    dw = day_weights()
    for c in range(len(CHANNELS)):
        idx = np.flatnonzero(channel == c)
        day[idx] = rng.choice(DAYS, len(idx), p=dw[c] / dw[c].sum())
        hour[idx] = rng.choice(24, len(idx), p=HOUR_WEIGHTS[c] / HOUR_WEIGHTS[c].sum())
    # Planted bundle events: same weekday as drawn, moved into [anchor, anchor + 27].
    b = anchor >= 0
    shift = (day[b] - anchor[b]) % 7 + 7 * rng.integers(0, 4, b.sum())
    day[b] = anchor[b] + shift
    return day * 86400 + hour * 3600 + rng.integers(0, 3600, n)
