"""The shapes a demo dataset can be generated in (``demo``, ``other``, ``continuous``) and their column names.

See :mod:`civicdp.synthetic.demo_data` for what each profile changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """The shape of a generated dataset (see :mod:`civicdp.synthetic.demo_data`)."""

    heavy_share: float = 0.035  # people with a lognormal number of requests
    heavy_mu: float = 2.95
    heavy_sigma: float = 0.85
    heavy_cap: int = 1000
    light_p: float = 0.245  # geometric requests of everyone else
    wait_seconds: bool = True  # waiting times rounded to whole seconds
    zero_wait_share: float = 0.0  # queued requests served at once (waiting exactly 0)
    wait_sigma: float = 0.0  # > 0: waits are lognormal (this sigma) about the same medians instead of gamma
    step_seconds: bool = True  # step (and so event) durations in whole seconds; else in microseconds
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
    # Continuous and skewed, the demo's column names (every analysis runs on it with its defaults).
    "continuous": Profile(heavy_share=0.04, heavy_mu=2.75, heavy_sigma=1.1, heavy_cap=5000, light_p=0.26,
                          wait_seconds=False, zero_wait_share=0.2, wait_sigma=1.0, step_seconds=False),
}
#: Column names per profile: the demo profile's name -> the profile's name.
COLUMNS = {name: {"person_id": p.person, "waiting_minutes": p.waiting, "duration_hours": p.duration}
           for name, p in PROFILES.items()}
