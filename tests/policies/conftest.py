"""Fixtures: policy stores populated as described in :mod:`tests.policies.sample`."""

from __future__ import annotations

import pytest

from civicdp.policies.enforcer import PolicyStore

from .sample import build_store


@pytest.fixture
def store() -> PolicyStore:
    """A fresh populated store each test may change."""
    return build_store()


@pytest.fixture(scope="module")
def shared_store() -> PolicyStore:
    """One populated store for read-only (and Hypothesis) tests; do not change it."""
    return build_store()
