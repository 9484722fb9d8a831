"""Mutation guards: the suite must turn red if the charge is skipped or the noise removed
(GOVERNANCE.md, "Testing what matters").

Each guard runs a check the API tests rely on twice: against the real server, where it
passes, and against a mutated server (``civicdp.server.state.ledger.charge`` replaced by a no-op, or
``LaplaceVector.release`` by the identity), where it must raise ``AssertionError``. A
check that also passed on the mutant would protect nothing.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

import civicdp.server.state.ledger
from civicdp.privacy.mechanisms import LaplaceVector
from tests.conftest import CHANNELS, events_frame
from tests.server.api_fixtures import ANALYST, Api, assert_charged, count_query
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures

RUNS = 5


def _skip_the_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(civicdp.server.state.ledger, "charge", lambda *args, **kwargs: [])


def _remove_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LaplaceVector, "release", lambda self, values: [int(v) for v in values])


# -- the charge ------------------------------------------------------------------------------


def _query_and_check_the_charge(api: Api) -> None:
    before = api.spent_micro(ANALYST)
    response = api.query(ANALYST, count_query())
    assert response.status_code == 200
    assert_charged(api, ANALYST, before, response.json())


def test_the_charge_check_passes_on_the_real_ledger(api: Api) -> None:
    _query_and_check_the_charge(api)


def test_the_charge_check_catches_a_skipped_charge(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_the_charge(monkeypatch)
    with pytest.raises(AssertionError, match="budgets moved by"):
        _query_and_check_the_charge(api)


# -- the noise -------------------------------------------------------------------------------


def exact_counts_by_channel() -> list[int]:
    """The true answer: every person has at most 3 events (the bound), so bounding drops nothing."""
    counts = dict(events_frame().group_by("channel").agg(pl.len()).iter_rows())
    return [counts.get(channel, 0) for channel in CHANNELS]


def assert_noisy(answers: list[dict[str, Any]], exact: list[int]) -> None:
    """Released values differ from the exact answer in most cells, across several releases.

    With epsilon 0.1 and 3 rows per person the discrete Laplace scale is 30, so a cell
    comes out exact with probability tanh(1/60), about 0.017: more than half of 5 x 4
    cells exact has a probability below 1e-14.
    """
    assert len({a["release_id"] for a in answers}) == len(answers), "each run must be a fresh release"
    released = [[row["value"] for row in a["rows"]] for a in answers]
    cells = [(value, truth) for values in released for value, truth in zip(values, exact, strict=True)]
    exact_cells = sum(value == truth for value, truth in cells)
    assert exact_cells <= len(cells) // 2, f"{exact_cells} of {len(cells)} released cells equal the exact counts"


def _release_several_times(api: Api) -> list[dict[str, Any]]:
    answers = []
    for run in range(RUNS):  # different confidences: different questions, none answered from a release
        response = api.query(ANALYST, count_query(confidence=0.9 + run / 100))
        assert response.status_code == 200 and response.json()["cached"] is False
        answers.append(response.json())
    return answers


def test_the_noise_check_passes_on_the_real_mechanism(api: Api) -> None:
    assert_noisy(_release_several_times(api), exact_counts_by_channel())


def test_the_noise_check_catches_a_removed_mechanism(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _remove_the_noise(monkeypatch)
    with pytest.raises(AssertionError, match="20 of 20 released cells equal the exact counts"):
        assert_noisy(_release_several_times(api), exact_counts_by_channel())
