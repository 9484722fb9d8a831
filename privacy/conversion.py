"""OpenDP's conversion of a rho-zCDP loss into its (epsilon, delta)-DP statement.

Kept apart from the mechanisms so that :mod:`civicdp.privacy.loss` can state a zCDP
loss without importing them (no import circle); it draws no noise.
"""

from __future__ import annotations

import math

import opendp.combinators as combinators
import opendp.domains as domains
import opendp.measurements as measurements
import opendp.metrics as metrics
import opendp.mod

from civicdp.privacy.errors import InvalidLoss

#: OpenDP features that would weaken the guarantees civicdp states.
UNSAFE_FEATURES = frozenset({"floating-point", "honest-but-curious"})


def ensure_safe_features() -> None:
    """Enable OpenDP's "contrib" feature and refuse to run with weakening ones."""
    unsafe = UNSAFE_FEATURES & set(opendp.mod.GLOBAL_FEATURES)
    if unsafe:
        raise RuntimeError(
            f"OpenDP features {sorted(unsafe)} are enabled; civicdp refuses to run with them "
            "because they weaken the differential privacy guarantee. Disable them."
        )
    opendp.mod.enable_features("contrib")


ensure_safe_features()


def zcdp_epsilon(rho: float, delta: float) -> float:
    """OpenDP's (epsilon, delta)-DP statement of rho-zCDP at ``delta`` (``make_zCDP_to_approxDP``)."""
    gaussian = measurements.make_gaussian(domains.atom_domain(T="f64", nan=False),
                                          metrics.absolute_distance(T="f64"), scale=1.0)
    # A Gaussian of scale 1 has rho = d^2 / 2 at sensitivity d: rho's profile is the one at d = sqrt(2 rho).
    return float(combinators.make_zCDP_to_approxDP(gaussian).map(math.sqrt(2 * rho)).epsilon(delta))


def epsilon_of_rho(rho: float, delta: float) -> float:
    """The epsilon at which rho-zCDP holds as (epsilon, delta)-DP (OpenDP's conversion, rounded up)."""
    if not (math.isfinite(rho) and rho > 0 and 0 < delta < 1):
        raise InvalidLoss(f"cannot convert rho={rho} at delta={delta}")
    return zcdp_epsilon(rho, delta)
