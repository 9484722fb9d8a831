"""The rate limit on requests without an identified caller, and the summaries of what it refused.

Requests that end without an identified caller (no key, a key that fails, a body refused
before identity) take a token from their client address's bucket
(``CIVICDP_ANONYMOUS_BURST`` tokens, refilled at ``CIVICDP_ANONYMOUS_PER_MINUTE``). While a
client's bucket is empty its requests get the same 401 at once
(:class:`civicdp.server.http.limits.RequestLimitsMiddleware`), and instead of one audit entry
each they are counted in one entry per client per ``CIVICDP_ANONYMOUS_SUMMARY_SECONDS``
(``http.rate_limited``), written by :func:`summarise_refusals` and, at shutdown,
:func:`last_summary`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import anyio
from sqlalchemy.engine import Engine as DbEngine

from civicdp.server.auditlog.append import record
from civicdp.server.state.db import session_scope
from civicdp.server.state.settings import Settings

logger = logging.getLogger("civicdp.limits")

#: Clients whose buckets are remembered; the least recently seen is forgotten first.
MAX_CLIENTS = 10_000


class ClientBuckets:
    """A token bucket per client address: ``burst`` tokens, refilled at ``per_second``."""

    def __init__(self, burst: int, per_second: float, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.per_second = per_second
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, as of]
        self._lock = threading.Lock()

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.burst, bucket[0] + (now - bucket[1]) * self.per_second)

    def empty(self, client: str) -> bool:
        """Has ``client`` no token left? (Takes nothing.)"""
        with self._lock:
            bucket = self._buckets.get(client)
            return bucket is not None and self._level(bucket, self.clock()) < 1

    def take(self, client: str) -> bool:
        """Take one token from ``client``'s bucket; False if there was none."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(client)
            if bucket is None:
                while len(self._buckets) >= self.max_clients:
                    self._buckets.popitem(last=False)
                bucket = self._buckets[client] = [self.burst, now]
            else:
                self._buckets.move_to_end(client)
            bucket[0], bucket[1] = self._level(bucket, now), now
            if bucket[0] < 1:
                return False
            bucket[0] -= 1
            return True


class AnonymousTraffic:
    """The rate limit on requests without an identified caller, and the summary of what it refused."""

    ACTION = "http.rate_limited"

    def __init__(self, burst: int, per_minute: float, window_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.per_minute, self.window_seconds = burst, per_minute, window_seconds
        self.buckets = ClientBuckets(burst, per_minute / 60.0, clock=clock)
        self._refused: dict[str, Counter[int]] = {}
        self._spans: dict[str, tuple[datetime, datetime]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AnonymousTraffic:
        return cls(settings.anonymous_burst, settings.anonymous_per_minute, settings.anonymous_summary_seconds)

    def over_limit(self, client: str) -> bool:
        return self.buckets.empty(client)

    def charge(self, client: str) -> bool:
        """Count one request that ended without a caller; False if the client was over its limit."""
        return self.buckets.take(client)

    def refused(self, client: str, status: int) -> None:
        """Count a request left out of the log, for the next summary entry."""
        now = datetime.now(timezone.utc)
        with self._lock:
            if client not in self._refused and len(self._refused) >= MAX_CLIENTS:
                client = "other clients"
            self._refused.setdefault(client, Counter())[status] += 1
            first = self._spans.get(client, (now, now))[0]
            self._spans[client] = (first, now)

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {client: sum(counts.values()) for client, counts in self._refused.items()}

    def flush(self, db: DbEngine) -> int:
        """Write one summary entry per client refused since the last flush; how many were written."""
        with self._lock:
            refused, spans = self._refused, self._spans
            self._refused, self._spans = {}, {}
        if not refused:
            return 0
        try:
            with session_scope(db) as session:
                for client, counts in sorted(refused.items()):
                    first, last = spans[client]
                    record(session, None, self.ACTION, f"client:{client}"[:200], "refused", client=client,
                           refused=sum(counts.values()), statuses={str(s): n for s, n in sorted(counts.items())},
                           first=first, last=last, burst=self.burst, per_minute=self.per_minute)
        except BaseException:
            self._restore(refused, spans)  # counted again at the next attempt
            raise
        return len(refused)

    def _restore(self, refused: dict[str, Counter[int]], spans: dict[str, tuple[datetime, datetime]]) -> None:
        with self._lock:
            for client, counts in refused.items():
                self._refused.setdefault(client, Counter()).update(counts)
                first, last = spans[client]
                held_first, held_last = self._spans.get(client, (first, last))
                self._spans[client] = (min(first, held_first), max(last, held_last))


def last_summary(state: Any, traffic: AnonymousTraffic) -> None:
    """At shutdown: write what the last window counted (a failure is logged, not raised)."""
    try:
        traffic.flush(state.db)
    except Exception:  # noqa: BLE001 - shutting down anyway
        logger.exception("could not write the last summary of rate-limited requests")


async def summarise_refusals(state: Any, traffic: AnonymousTraffic) -> None:
    """Write the summary entries every ``window_seconds`` (run for the server's lifetime)."""
    while True:
        await anyio.sleep(traffic.window_seconds)
        try:
            await anyio.to_thread.run_sync(traffic.flush, state.db)
        except Exception:  # noqa: BLE001 - retried with the next window
            logger.exception("could not write the summary of rate-limited requests; retrying")
