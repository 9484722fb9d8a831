"""civicdp: a privacy-preserving analytics server with governance controls.

The public API, one import path for users::

    from civicdp import Client, BudgetExhausted        # an analyst's client for a server
    from civicdp import LocalDataset, Engine           # the engine on a local dataset folder

The project's parts are sub-packages (``civicdp.server``, ``civicdp.queries``,
``civicdp.privacy``, ``civicdp.policies``, ``civicdp.audit``); in the repository they
are the top-level folders of the same names. Names here load on first use, so
``from civicdp import Client`` does not import the engine.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "Client": "civicdp.queries.client",
    "ClientError": "civicdp.queries.client",
    "Unauthenticated": "civicdp.queries.client",
    "AccessDenied": "civicdp.queries.client",
    "NotFound": "civicdp.queries.client",
    "BudgetExhausted": "civicdp.queries.client",
    "InvalidQuery": "civicdp.queries.client",
    "ServerUnavailable": "civicdp.queries.client",
    "LocalDataset": "civicdp.queries.engine",
    "Engine": "civicdp.queries.engine",
    "Result": "civicdp.queries.engine",
    "QueryError": "civicdp.queries.errors",
    "PrivacyLoss": "civicdp.privacy.loss",
}

__all__ = [*_EXPORTS, "__version__"]

try:
    __version__ = version("civicdp")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from civicdp.privacy.loss import PrivacyLoss
    from civicdp.queries.client import (AccessDenied, BudgetExhausted, Client, ClientError, InvalidQuery,
                                        NotFound, ServerUnavailable, Unauthenticated)
    from civicdp.queries.engine import Engine, LocalDataset, Result
    from civicdp.queries.errors import QueryError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'civicdp' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
