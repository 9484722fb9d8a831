"""Reading a table into Spark and ranking each person's rows in the Polars backend's order.

The Polars backend ranks a person's rows by a hash of the row's declared columns
(``pl.struct(columns).hash(seed)``, :mod:`civicdp.queries.polars_rank_cache`), ties kept in
file order; keeping rank <= L keeps at most L rows per person, chosen from that person's rows
alone. Spark's own hash functions are not Polars', so the same hash is computed inside Spark
by Polars itself, on Arrow batches (``mapInArrow``): each executor hashes its rows with the
pinned Polars version, after casting them to the types Polars reads from the Parquet file.
For the same files the rows kept are the same rows on both backends.

The order, as in :func:`civicdp.queries.polars_rank_cache._rank_order`: by person, then
the upper half of the hash (integer persons spanning fewer than 2**32 values) or the whole
hash (any other person), then the row's place in the files. Rows without a person are left
out (no query counts them). The ranked table stays in the cluster (persisted on its executors).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from civicdp.queries.backend import UNIT, person_column
from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.integrity import OWNER_KEY_TEXT
from civicdp.queries.metadata import DatasetMetadata

RANK = "__civicdp_rank"
HASH_SEED = 0x5EED_C1F1C  # the Polars backend's seed (polars_rank_cache._HASH_SEED): the same rows are kept
_HI, _LO, _FILE, _ROW = "__civicdp_hash_hi", "__civicdp_hash_lo", "__civicdp_file", "__civicdp_row"
_TABLE_PREFIX = "table:"
_KEPT = 32  # ranked tables persisted at once, least recently used unpersisted


def location(dataset_dir: Path, path: str) -> str:
    """Where Spark reads a table: ``table:db.name`` (a catalogue table), a URL or absolute path
    as it is, or a path relative to the dataset folder."""
    if path.startswith(_TABLE_PREFIX) or "://" in path or Path(path).is_absolute():
        return path
    return str(Path(dataset_dir).resolve() / path)


def read(spark: Any, dataset_dir: Path, path: str) -> Any:
    """The table's rows, with each row's file and place in it where Spark knows them (Parquet)."""
    from pyspark.sql import functions as F

    where = location(dataset_dir, path)
    if where.startswith(_TABLE_PREFIX):
        frame = spark.read.table(where[len(_TABLE_PREFIX):])
        return frame.withColumn(_FILE, F.lit("")).withColumn(_ROW, F.monotonically_increasing_id())
    frame = spark.read.parquet(where)
    return frame.select("*", F.col("_metadata.file_path").alias(_FILE), F.col("_metadata.row_index").alias(_ROW))


def polars_schema(dataset_dir: Path, path: str) -> dict[str, pl.DataType] | None:
    """The column types Polars reads the table with (the hash depends on them); None where Polars
    cannot open it on this machine (a catalogue table, an object store without credentials here)."""
    where = location(dataset_dir, path)
    if where.startswith(_TABLE_PREFIX):
        return None
    try:
        return dict(pl.scan_parquet(where if not Path(where).is_dir() else f"{where}/**/*.parquet")
                    .collect_schema())
    except Exception:  # noqa: BLE001 - unreadable here: Spark's types are used as they are
        return None


def _hasher(columns: list[str], schema: dict[str, pl.DataType] | None):  # type: ignore[no-untyped-def]
    """The ``mapInArrow`` function: each batch with the rows' hash halves appended."""
    import pyarrow as pa

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            content = frame.select(columns)
            if schema is not None:
                content = content.cast({c: schema[c] for c in columns if c in schema}, strict=False)
            hashed = content.select(pl.struct(columns).hash(seed=HASH_SEED).alias("h"))["h"]
            hi = (hashed // (1 << 32)).cast(pl.Int64).to_arrow()
            lo = (hashed % (1 << 32)).cast(pl.Int64).to_arrow()
            yield pa.RecordBatch.from_arrays([*batch.columns, hi, lo], names=[*batch.schema.names, _HI, _LO])

    return run


def _check_owner_keys(owner: Any, on: str) -> None:
    """One owner row per key, as registration requires: else a row would count for two people."""
    from pyspark.sql import functions as F

    keyed = owner.filter(F.col(on).isNotNull())
    counts = keyed.agg(F.count(F.lit(1)).alias("n"), F.countDistinct(on).alias("k")).collect()[0]
    if counts["n"] != counts["k"]:
        raise DatasetUnavailable("table", OWNER_KEY_TEXT, "Ask the data steward to make the key unique")


def ranked(spark: Any, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Any:
    """The table's rows with a person, each with :data:`RANK` (1.. within the person, in the hash order)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField, StructType

    meta = metadata.tables[table]
    columns = list(meta.columns)
    unit = person_column(metadata, table)
    raw = read(spark, dataset_dir, meta.path)
    schema = StructType([*raw.schema.fields, StructField(_HI, LongType()), StructField(_LO, LongType())])
    frame = raw.mapInArrow(_hasher(columns, polars_schema(dataset_dir, meta.path)), schema)
    via = meta.privacy_unit_via
    if via:
        owner_meta = metadata.tables[via["table"]]
        owner = read(spark, dataset_dir, owner_meta.path).select(via["on"], F.col(metadata.privacy_unit).alias(UNIT))
        _check_owner_keys(owner, via["on"])
        frame = frame.join(owner, on=via["on"], how="inner")
        people = owner.select(F.col(UNIT).alias("p"))
    else:
        people = raw.select(F.col(unit).alias("p"))
    frame = frame.filter(F.col(unit).isNotNull())
    order = [F.col(_HI), F.col(_LO), F.col(_FILE), F.col(_ROW)]
    kind = dict(people.dtypes)["p"]
    if kind in ("tinyint", "smallint", "int", "bigint"):
        low, high = people.agg(F.min("p"), F.max("p")).collect()[0]
        if low is None or int(high) - int(low) < 2**32:
            order = [F.col(_HI), F.col(_FILE), F.col(_ROW)]  # the Polars fast path: ties in file order
    rank = F.row_number().over(Window.partitionBy(unit).orderBy(*order))
    keep = [*columns, *([UNIT] if via else [])]
    return frame.select(*keep, rank.alias(RANK))


class RankedTables:
    """Ranked tables persisted in the cluster, one per table of a registered version."""

    def __init__(self) -> None:
        self._tables: dict[tuple, Any] = {}
        self._guard = threading.Lock()

    def get(self, spark: Any, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Any:
        key = (str(dataset_dir), metadata.model_dump_json(), table)
        with self._guard:
            known = self._tables.pop(key, None)
            if known is not None:
                self._tables[key] = known  # most recently used last
                return known
        frame = ranked(spark, dataset_dir, metadata, table).persist()
        with self._guard:
            self._tables[key] = frame
            while len(self._tables) > _KEPT:
                self._tables.pop(next(iter(self._tables))).unpersist()
        return frame
