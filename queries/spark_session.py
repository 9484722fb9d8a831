"""The server's one Spark session, created on first use, and what it cost (for readiness).

Configuration comes from the environment, read when the session is first needed:

- ``CIVICDP_SPARK_REMOTE``: a Spark Connect URL (``sc://host:15002``); takes precedence;
- ``CIVICDP_SPARK_MASTER``: a master URL for a classic session (``spark://host:7077``,
  ``yarn``, ``k8s://...``); ``local[*]`` by default;
- ``CIVICDP_SPARK_CONF``: extra settings, ``key=value`` pairs separated by ``;``
  (``spark.executor.memory=8g;spark.sql.shuffle.partitions=400``).

Whatever is configured, three settings are fixed because answers depend on them: ANSI
SQL (a cast that cannot succeed is refused at planning, and ``try_cast`` gives null
instead of a made-up value), the UTC session time zone (hours and days of timestamps
are the same as the Polars backend's), and no web UI unless asked for (it would show
query plans with the literal values of filters to anyone on the port). A local master's
Python workers run this process's interpreter (``PYSPARK_PYTHON``), unless set: the
workers hash rows with Polars and Arrow, which the first ``python3`` on PATH may lack.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

_FIXED = {
    "spark.sql.ansi.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.inferTimestampNTZ.enabled": "true",
}
_DEFAULTS = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
}


@dataclass
class SessionStatus:
    """What readiness reports of the session: never anything about data."""

    started: bool = False
    where: str = ""
    seconds: float | None = None  # how long creating the session took
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "where": self.where, "start_seconds": self.seconds, "error": self.error}


_lock = threading.Lock()
_session: Any = None
_status = SessionStatus()


def settings() -> tuple[str, dict[str, str]]:
    """Where the session runs (a Connect URL or a master) and its configuration, from the environment."""
    remote = os.environ.get("CIVICDP_SPARK_REMOTE", "").strip()
    where = remote or os.environ.get("CIVICDP_SPARK_MASTER", "").strip() or "local[*]"
    conf = dict(_DEFAULTS)
    for pair in os.environ.get("CIVICDP_SPARK_CONF", "").split(";"):
        if "=" in pair:
            key, value = pair.split("=", 1)
            conf[key.strip()] = value.strip()
    conf.update(_FIXED)
    return where, conf


def session() -> Any:
    """The process's Spark session, created on the first call (later calls return it)."""
    global _session
    if _session is not None:
        return _session
    with _lock:
        if _session is None:
            where, conf = settings()
            started = time.perf_counter()
            try:
                _session = _build(where, conf)
            except Exception as exc:
                _status.where, _status.error = where, f"{type(exc).__name__}: could not start Spark at {where}"
                raise
            _status.started, _status.where, _status.error = True, where, None
            _status.seconds = round(time.perf_counter() - started, 3)
    return _session


def _build(where: str, conf: dict[str, str]) -> Any:
    from pyspark.sql import SparkSession  # imported here: servers without Spark datasets never load it

    if where.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable  # read by the context when it starts its workers
    builder = SparkSession.builder.appName("civicdp")
    builder = builder.remote(where) if where.startswith("sc://") else builder.master(where)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    for key, value in _FIXED.items():  # also on a session that existed already (Connect, tests)
        spark.conf.set(key, value)
    return spark


def stop() -> None:
    """Stop the process's session, if any; readiness then reports none (the next use starts one afresh)."""
    global _session, _status
    with _lock:
        if _session is not None:
            _session.stop()
        _session, _status = None, SessionStatus()


def status() -> dict[str, Any]:
    """The session's state for readiness: not started yet, started (and how long that took), or failed."""
    return _status.as_dict()
