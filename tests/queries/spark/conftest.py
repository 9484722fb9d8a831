"""One Spark session (local[2]) for the Spark tests, stopped after them, and the data they share.

Spark starts in ~10-20 s and each job costs a second or more, so the tests use small data,
ask for many aggregates per job, and share datasets across modules (session-scoped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from civicdp.queries.spark_backend import SparkBackend


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.slow)
            # pyspark warns that it is not yet tested with pandas 3 (it is not used: Arrow batches go to Polars).
            item.add_marker(pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"))
            item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))


@pytest.fixture(scope="package")
def spark() -> Iterator[Any]:
    """The process's Spark session (the one the server's Spark backend uses too), local[2]."""
    from civicdp.queries import spark_session

    saved = {k: os.environ.get(k) for k in ("CIVICDP_SPARK_MASTER", "CIVICDP_SPARK_CONF", "CIVICDP_SPARK_REMOTE")}
    os.environ["CIVICDP_SPARK_MASTER"] = "local[2]"
    os.environ["CIVICDP_SPARK_CONF"] = "spark.sql.shuffle.partitions=2;spark.default.parallelism=2"
    os.environ.pop("CIVICDP_SPARK_REMOTE", None)
    yield spark_session.session()
    spark_session.stop()  # the session is the process's: later tests' servers have no Spark dataset
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="package")
def spark_backend(spark: Any) -> SparkBackend:
    return SparkBackend(spark)


@pytest.fixture(scope="session")
def spark_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The datasets the Spark tests compare on: the demo generator's (small), the neighbouring
    harness's D, and D plus many adversarial people at once (NaN, +-inf, values far out of
    bounds, keys outside the key set, boolean spellings, 1,000-row people, 1,000 rows without
    a person)."""
    import dataclasses
    import json

    import polars as pl

    from civicdp.synthetic.demo_data import generate
    from tests.privacy.neighbours import ADVERSARIES, ADVERSARY_ID, adversary_rows, write_base

    root = tmp_path_factory.mktemp("spark-data")
    generate(400, root / "demo", seed=3)
    base = write_base(root / "perf", name="spark-perf")
    folder = root / "adversarial"
    folder.mkdir()
    events, steps = pl.read_parquet(base / "events.parquet"), pl.read_parquet(base / "steps.parquet")
    extra = []
    for k, adversary in enumerate(a for a in ADVERSARIES.values() if not a.shared_event_ids):
        if adversary.person_id is not None:
            adversary = dataclasses.replace(adversary, person_id=ADVERSARY_ID + k)
        rows, _ = adversary_rows(adversary, events, steps)
        extra.append(rows.with_columns(pl.col("event_id") + 10_000 * k))
    pl.concat([events, *extra]).write_parquet(folder / "events.parquet")
    for name in ("steps.parquet", "services.parquet", "service_steps.parquet"):
        (folder / name).write_bytes((base / name).read_bytes())
    metadata = json.loads((base / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "name": "spark-adversarial"}))
    return {"demo": root / "demo", "perf": base, "adversarial": folder}
