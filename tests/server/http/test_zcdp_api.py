"""A zCDP dataset over HTTP: Gaussian answers, nano-rho charges, caps in epsilon, no mode change once spent.

The steward chooses the accounting per dataset (``"accounting": {"mode": "zcdp", "delta": 1e-7}``);
analysts still ask in epsilon. Each answer costs the largest rho within its epsilon at the
dataset's delta, the ledger adds rho, and so one epsilon of budget holds many more answers
than under pure epsilon — exactly as many as the rho allows, also under concurrency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from civicdp.privacy.accounting import Accounting, epsilon_of_rho, rho_for_epsilon
from civicdp.privacy.loss import NANO
from civicdp.privacy.mechanisms import _gaussian
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Budget, LedgerEntry
from tests.conftest import base_metadata, events_frame, write_dataset
from tests.server.api_fixtures import ANALYST, DATASET, Api, count_query, running_api
from tests.server.http.test_api_concurrency import ask_all_at_once, build_rank_cache

DELTA = 1e-7
ZCDP = Accounting("zcdp", DELTA)


def zcdp_metadata(**accounting: object) -> dict:
    metadata = base_metadata()
    metadata["accounting"] = {"mode": "zcdp", "delta": DELTA, **accounting}
    return metadata


@pytest.fixture
def zcdp_api(tmp_path: Path) -> Iterator[Api]:
    folder = write_dataset(tmp_path / "datasets" / DATASET, events_frame(), zcdp_metadata())
    with running_api(tmp_path / "state", folder) as api:
        yield api


def test_an_answer_is_gaussian_and_charged_its_rho_in_nano_rho(zcdp_api: Api) -> None:
    answer = zcdp_api.query(ANALYST, count_query(epsilon=0.1)).json()
    [mechanism] = answer["mechanisms"]
    assert mechanism["mechanism"] == "discrete Gaussian"
    rho = rho_for_epsilon(0.1, DELTA)
    exact = _gaussian(mechanism["scale"]).map(float(mechanism["sensitivity"]))
    assert answer["loss"]["rho"] == pytest.approx(exact, rel=1e-9) and exact <= rho
    assert answer["loss"]["epsilon"] <= 0.1 and answer["loss"]["delta"] == DELTA
    charge = math.ceil(exact * NANO)
    assert {e.amount_micro for e in zcdp_api.ledger_entries(answer["release_id"])} == {charge}
    analyst = next(b for b in answer["budgets"] if b["scope"] == "analyst")
    assert analyst["unit"] == "rho" and analyst["spent_micro"] == charge
    assert analyst["cap_micro"] == math.floor(rho_for_epsilon(1.0, DELTA) * NANO)  # the default cap, epsilon 1
    assert analyst["spent_epsilon"] == pytest.approx(epsilon_of_rho(charge / NANO, DELTA))


def test_one_epsilon_of_budget_holds_as_many_answers_as_its_rho_allows(zcdp_api: Api) -> None:
    charge = ZCDP.charge_of(ZCDP.additive(3, rho_for_epsilon(0.1, DELTA)).loss)
    fits = math.floor(rho_for_epsilon(1.0, DELTA) * NANO) // charge
    assert fits > 50  # under pure epsilon, 10
    statuses = Counter(zcdp_api.query(ANALYST, count_query(epsilon=0.1, confidence=0.5 + i / 1000)).status_code
                       for i in range(fits + 2))
    assert statuses == {200: fits, 409: 2}
    refusal = zcdp_api.query(ANALYST, count_query(epsilon=0.1, confidence=0.75)).json()
    assert refusal["error"] == "budget_exhausted" and "remaining analyst budget of rho" in refusal["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_simultaneous_zcdp_requests_never_overspend(request: pytest.FixtureRequest, tmp_path: Path,
                                                     backend: str) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    folder = write_dataset(tmp_path / "datasets" / DATASET, events_frame(), zcdp_metadata())
    with running_api(tmp_path / "state", folder, database_url=url) as api:
        charge = ZCDP.charge_of(ZCDP.additive(3, rho_for_epsilon(0.1, DELTA)).loss)
        # A cap (set in epsilon, as stewards do) whose rho holds 10.5 answers: exactly 10 fit.
        api.set_cap("analyst", ANALYST, epsilon_of_rho(10.5 * charge / NANO, DELTA))
        build_rank_cache(api)
        questions = [count_query(epsilon=0.1, confidence=0.5 + i / 1000) for i in range(200)]
        responses = ask_all_at_once(api, questions)
        assert Counter(r.status_code for r in responses) == {200: 10, 409: 190}
        with Session(api.state.db) as session:
            [budget] = session.exec(select(Budget).where(Budget.scope == "analyst")).all()
            entries = session.exec(select(LedgerEntry).where(LedgerEntry.budget_id == budget.id)).all()
        assert budget.spent_micro == 10 * charge <= budget.cap_micro
        assert sum(e.amount_micro for e in entries) == budget.spent_micro and len(entries) == 10


def test_per_query_caps_compare_the_queries_epsilon_at_delta(zcdp_api: Api) -> None:
    denied = zcdp_api.query(ANALYST, count_query(epsilon=0.6))  # the default cap on public columns is 0.5
    assert denied.status_code == 403
    assert zcdp_api.query(ANALYST, count_query(epsilon=0.5)).status_code == 200


def _reregister(api: Api, folder: Path, metadata: dict) -> None:
    write_dataset(folder, events_frame(), metadata)
    with session_scope(api.state.db) as session:
        admin.register_dataset(session, api.state.policies, None, folder)


def test_the_accounting_cannot_change_once_anything_was_spent(tmp_path: Path) -> None:
    folder = tmp_path / "datasets" / DATASET
    write_dataset(folder, events_frame(), base_metadata())
    with running_api(tmp_path / "state", folder) as api:
        # Before any spending the steward may switch; budget rows reopen in the new unit.
        api.get(ANALYST, "/v1/budgets")
        _reregister(api, folder, {**zcdp_metadata(), "version": "2"})
        answer = api.query(ANALYST, count_query(epsilon=0.1)).json()
        assert answer["mechanisms"][0]["mechanism"] == "discrete Gaussian"
        with pytest.raises(Exception, match="cannot change to 'pure'"):
            _reregister(api, folder, {**base_metadata(), "version": "3"})
        with pytest.raises(Exception, match="cannot change"):
            _reregister(api, folder, {**zcdp_metadata(delta=1e-8), "version": "3"})
        # The same accounting with other metadata is an ordinary new version.
        _reregister(api, folder, {**zcdp_metadata(), "version": "3", "description": "corrected"})


def test_a_zcdp_dataset_with_a_large_delta_is_refused(tmp_path: Path) -> None:
    from civicdp.queries.errors import MetadataError
    from civicdp.queries.metadata import load_metadata

    folder = write_dataset(tmp_path / "d", events_frame(), zcdp_metadata(delta=1e-3))
    with pytest.raises(MetadataError, match=r"accounting.*public delta in \(0, 1e-07\]"):
        load_metadata(folder)
