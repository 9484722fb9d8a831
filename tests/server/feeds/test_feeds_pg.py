"""Two scheduler processes over one PostgreSQL database make exactly one release per period.

Each process builds its own server state (engine, pool, policy store) on the same schema
and, on a common signal, runs the scheduler's check three times at the same moment, with
twenty hourly periods due. Their computations are slowed down so that both try to produce
the same periods (the test checks that they did); the unique ``(feed, period)`` claim,
inserted before the charge, must let exactly one producer per period charge, and the
other must lose there — before charging or reading any data: each period is computed
once in all.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from civicdp.server.state import ledger
from civicdp.server.services.bootstrap import build_state
from civicdp.server.state.feed_models import FeedClaim, FeedRelease
from civicdp.server.feeds.schemas import FeedDefinition
from civicdp.server.feeds.service import FeedService
from civicdp.server.state.models import AuditEntry, Budget, LedgerEntry, Release
from tests.server.api_fixtures import DATASET, make_dataset_folder, prepare_state, settings_for
from tests.server.racing import race

PERIODS = 20
LOSS = 50_000
NOW = datetime.now(timezone.utc).replace(minute=30, second=0, microsecond=0)

#: One "server process": its own state on the shared database, started on a signal.
WORKER = r"""
import json, sys, time
from datetime import datetime
from pathlib import Path

from civicdp.server.services.bootstrap import build_state
from civicdp.server.feeds.outcomes import FeedBusy
from civicdp.server.feeds.service import FeedService
from civicdp.server.state.settings import Settings

data_dir, url, sync, name, now = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
state = build_state(Settings(data_dir=data_dir, database_url=url, feeds_scheduler=False))
try:
    feeds = FeedService.of(state)
    computed = []
    execute = feeds.engine.execute

    def slow_execute(plan, *args, **kwargs):
        # A slower computation widens the window between "not released yet?" and the commit,
        # so both processes compute the same periods and only the database can keep one.
        computed.append(1)
        time.sleep(0.1)
        return execute(plan, *args, **kwargs)

    feeds.engine.execute = slow_execute
    lost = []
    produce = feeds.produce

    def counting_produce(*args, **kwargs):
        try:
            return produce(*args, **kwargs)
        except FeedBusy:
            lost.append(1)  # the other process held the claim: nothing charged or computed here
            raise

    feeds.produce = counting_produce
    (sync / f"{name}.ready").touch()
    deadline = time.monotonic() + 60
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    fresh = [r.number for _ in range(3) for r in feeds.run_due(datetime.fromisoformat(now)) if getattr(r, "fresh", False)]
finally:
    state.close()
print(json.dumps({"fresh": fresh, "computed": len(computed), "lost": len(lost)}))
"""


@pytest.mark.postgres
def test_two_scheduler_processes_make_exactly_one_release_per_period(pg_url: str, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "state", pg_url, feeds_scheduler=False)
    prepare_state(settings, make_dataset_folder(tmp_path / "datasets"))
    state = build_state(settings)
    try:
        start = NOW.replace(minute=0) - timedelta(hours=PERIODS - 1, minutes=1)
        FeedService.of(state).define(None, FeedDefinition(
            name="hourly", dataset=DATASET, specs=[{"aggregate": "count", "group_by": ["channel"], "epsilon": 0.05}],
            schedule="0 * * * *", releases=PERIODS, start=start, agencies=["health"]), now=NOW)
    finally:
        state.close()

    reports = race(WORKER, tmp_path, {name: [str(settings.data_dir), pg_url, str(tmp_path), name, NOW.isoformat()]
                                      for name in ("server-a", "server-b")})

    fresh = sorted(n for r in reports for n in r["fresh"])
    assert sum(r["lost"] for r in reports) > 0, f"the processes never raced: {reports}"
    assert sum(r["computed"] for r in reports) == PERIODS, f"a loser read the data: {reports}"
    assert fresh == list(range(1, PERIODS + 1)), f"each period produced once in all: {reports}"
    state = build_state(settings)
    try:
        with Session(state.db) as session:
            releases = list(session.exec(select(FeedRelease)).scalars())
            assert sorted(r.number for r in releases) == list(range(1, PERIODS + 1))
            assert len({r.period for r in releases}) == PERIODS
            assert session.execute(select(func.count()).select_from(Release)).scalar_one() == PERIODS
            (allocation,) = session.execute(select(Budget.spent_micro).where(
                Budget.scope == ledger.FEED, Budget.subject == "hourly")).scalars()
            assert allocation == PERIODS * LOSS, "charged once per period"
            lifetime = session.execute(select(Budget.spent_micro).where(Budget.scope == ledger.LIFETIME)).scalar_one()
            assert lifetime == PERIODS * LOSS
            assert session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one() == 3 * PERIODS
            made = session.execute(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.action == "feed.release", AuditEntry.decision == "allowed")).scalar_one()
            assert made == PERIODS
            charged = session.execute(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.action == "feed.charge")).scalar_one()
            assert charged == PERIODS
            claims = session.execute(select(FeedClaim.state)).scalars().all()
            assert sorted(claims) == ["released"] * PERIODS
    finally:
        state.close()
