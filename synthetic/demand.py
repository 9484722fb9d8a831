"""Who asks for which service: requests per person, planted service bundles, and everyone else's choices.

:func:`sample_counts` draws the heavy-tailed number of requests per person;
:func:`plant_bundles` gives some people a bundle of services within one 30-day window
(the ground truth the bundle analyses look for); :func:`natural_services` fills every
other request from the catalogue's popularity, business users favouring business
services.
"""

from __future__ import annotations

import numpy as np

from civicdp.synthetic.catalogue import N_SERVICES, SERVICE_IDS, Catalogue
from civicdp.synthetic.profiles import PROFILES, Profile
from civicdp.synthetic.timing import DAYS, day_weights

N_BUNDLES = 20
BUNDLE_WINDOW_DAYS = 30


def sample_counts(rng: np.random.Generator, people: int,
                  profile: Profile = PROFILES["demo"]) -> tuple[np.ndarray, np.ndarray]:
    """Events per person: geometric bulk plus a few lognormal heavy users (3.5 % in the demo)."""
    heavy = rng.random(people) < profile.heavy_share
    light = rng.geometric(profile.light_p, people)
    heavy_n = np.ceil(rng.lognormal(profile.heavy_mu, profile.heavy_sigma, people)).astype(np.int64) + 2
    return np.where(heavy, np.minimum(heavy_n, profile.heavy_cap), light), heavy


def plant_bundles(rng: np.random.Generator, cat: Catalogue, counts: np.ndarray,
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
    season = day_weights()[1, : DAYS - 28]
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


def natural_services(rng: np.random.Generator, cat: Catalogue, service: np.ndarray,
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
