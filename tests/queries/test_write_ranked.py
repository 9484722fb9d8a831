"""The ranking written at preparation, and the snapshots queries find it in.

``write_ranked`` sorts a table by person and a hash of each row's content, without the
``rank().over(person)`` window the cache used to compute: the file must still hold every
row with a person once, ranks 1..k within each person, contiguous and in rank order, and
which rows a bound keeps must still depend on that person's rows alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from civicdp.queries.backend import AggregateRequest, Measure
from civicdp.queries.metadata import parse_metadata
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.queries.polars_rank_cache import RANK, write_ranked
from civicdp.queries.polars_snapshots import MANIFEST, Snapshots, fingerprint, snapshot_folder, write_manifest
from tests.conftest import base_metadata, events_frame, write_dataset

COLUMNS = list(base_metadata()["tables"]["events"]["columns"])


def ranked(folder: Path, metadata: dict, tmp_path: Path, name: str = "out.parquet") -> pl.DataFrame:
    target = tmp_path / name
    write_ranked(folder, parse_metadata(metadata), "events", target)
    return pl.read_parquet(target)


def check_ranked(out: pl.DataFrame, source: pl.DataFrame, person: str = "person_id") -> None:
    with_person = source.filter(pl.col(person).is_not_null())
    assert out.drop(RANK).sort(COLUMNS).equals(with_person.select(COLUMNS).sort(COLUMNS))
    # each person's rows contiguous, ranks 1..k in file order
    runs = out.with_row_index("i").group_by(person, maintain_order=True).agg(
        pl.col("i").min().alias("first"), pl.col("i").max().alias("last"), pl.len().alias("n"), pl.col(RANK))
    assert (runs["last"] - runs["first"] + 1 == runs["n"]).all()
    assert all(r == list(range(1, len(r) + 1)) for r in runs[RANK].to_list())


@pytest.mark.parametrize("person_type", ["int", "str"])
def test_every_row_once_ranked_within_its_person(tmp_path: Path, person_type: str) -> None:
    frame = events_frame(people=40)
    if person_type == "str":
        frame = frame.with_columns(pl.format("p-{}", pl.col("person_id")).alias("person_id"))
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["person_id"]["type"] = person_type
    folder = write_dataset(tmp_path / "ds", frame.sample(fraction=1.0, shuffle=True, seed=3), metadata)
    check_ranked(ranked(folder, metadata, tmp_path), frame)


def test_rows_without_a_person_are_left_out(tmp_path: Path) -> None:
    frame = events_frame(people=20).with_columns(
        pl.when(pl.col("event_id") % 5 == 0).then(None).otherwise(pl.col("person_id")).alias("person_id"))
    folder = write_dataset(tmp_path / "ds", frame, base_metadata())
    out = ranked(folder, base_metadata(), tmp_path)
    assert out["person_id"].null_count() == 0
    check_ranked(out, frame)


def test_a_persons_kept_rows_do_not_depend_on_other_people(tmp_path: Path) -> None:
    """Adding another person's rows, anywhere in the file, keeps the same rows of everyone else."""
    frame = events_frame(people=30)
    bound = 2

    def kept(source: pl.DataFrame, name: str) -> set[tuple]:
        folder = write_dataset(tmp_path / name, source, base_metadata())
        out = ranked(folder, base_metadata(), tmp_path, f"{name}.parquet")
        return set(out.filter((pl.col(RANK) <= bound) & (pl.col("person_id") != 999)).select(COLUMNS).rows())

    newcomer = events_frame(people=1, seed=9).with_columns(pl.lit(999, dtype=pl.Int64).alias("person_id"))
    newcomer = pl.concat([newcomer] * 5).with_columns((pl.int_range(5) + 1).cast(pl.Int64).alias("satisfaction"))
    middle = frame.height // 2
    grown = pl.concat([frame.head(middle), newcomer, frame.tail(frame.height - middle)])
    assert kept(frame, "before") == kept(grown, "after")


def test_a_query_reads_the_snapshot_of_its_folder_and_metadata(tmp_path: Path) -> None:
    """Found by folder and metadata; its files, not the folder's, are read; gone once removed."""
    frame = events_frame()
    folder = write_dataset(tmp_path / "ds", frame, base_metadata())
    metadata = parse_metadata(base_metadata())
    root = tmp_path / "prepared"
    snapshot = snapshot_folder(root, metadata.name, 7)
    snapshot.mkdir(parents=True)
    write_ranked(folder, metadata, "events", snapshot / "t0.parquet")
    write_manifest(snapshot, {"path": str(folder.resolve()), "metadata": fingerprint(metadata),
                              "tables": {"events": "t0.parquet"}})
    backend = PolarsBackend(cache_dir=root)
    request = AggregateRequest(folder, metadata, "events", 3, (), (), Measure("rows"))
    assert int(backend.aggregate(request)["rows"].item()) == frame.height
    # The steward overwrites the file: the registered snapshot is still what is answered.
    frame.head(10).write_parquet(folder / "events.parquet")
    assert int(backend.aggregate(request)["rows"].item()) == frame.height
    assert not list(root.glob("*.parquet"))  # nothing ranked on demand

    other = parse_metadata({**base_metadata(), "version": "2"})
    assert Snapshots(root).find(folder, other) is None  # another version's metadata: not this snapshot
    (snapshot / MANIFEST).unlink()
    assert Snapshots(root).find(folder, metadata) is None
    assert int(backend.aggregate(request)["rows"].item()) == 10  # ranked on demand from the folder as it is now
    assert not (folder / ".civicdp-cache").exists()  # a backend with a cache_dir never writes in the folder


def test_integer_persons_spread_wider_than_32_bits_sort_the_same(tmp_path: Path) -> None:
    frame = events_frame(people=25).with_columns((pl.col("person_id") * (1 << 40)).alias("person_id"))
    folder = write_dataset(tmp_path / "ds", frame, base_metadata())
    out = ranked(folder, base_metadata(), tmp_path)
    check_ranked(out, frame)
    assert np.all(np.diff(out["person_id"].to_numpy()) >= 0)
