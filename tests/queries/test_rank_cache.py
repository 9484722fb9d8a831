"""The per-person rank cache follows the content of every file it is made from.

The cached file holds each row's person and rank. For ``steps``, whose person comes from
joining ``events``, that person is only right while ``events`` is the file it was made
from; and a file rewritten with its size and mtime kept (``cp -p``, ``rsync -a``, a
restore) is still a different file. A stale cache would bound queries by old persons.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.queries.backend import UNIT, AggregateRequest, GroupKey, Measure
from civicdp.queries.metadata import DatasetMetadata, parse_metadata
from civicdp.queries.polars_backend import RANK, PolarsBackend
from tests.conftest import CHANNELS, MakeDataset, base_metadata, events_frame

PEOPLE = 30
L = 3


def via_metadata() -> dict:
    return {
        "name": "via-test", "version": "1", "privacy_unit": "person_id",
        "max_contributions": L, "max_contributions_limit": 20,
        "tables": {
            "events": {"path": "events.parquet", "columns": {
                "event_id": {"type": "int", "identifier": True},
                "person_id": {"type": "int", "identifier": True},
                "service": {"type": "str", "keys": ["A", "B"]},
            }},
            "steps": {"path": "steps.parquet", "privacy_unit_via": {"table": "events", "on": "event_id"},
                      "columns": {
                          "event_id": {"type": "int", "identifier": True},
                          "step": {"type": "int", "keys": [1, 2]},
                          "hours": {"type": "float", "bounds": [0, 100]},
                      }},
        },
    }


def events(person_of_event: np.ndarray) -> pl.DataFrame:
    n = len(person_of_event)
    return pl.DataFrame({"event_id": np.arange(n, dtype=np.int64), "person_id": person_of_event.astype(np.int64),
                         "service": ["A", "B"] * (n // 2)})


def write_via_dataset(folder: Path) -> tuple[Path, DatasetMetadata]:
    """One event (and one step) per person at first."""
    folder.mkdir(parents=True)
    raw = via_metadata()
    (folder / "metadata.json").write_text(json.dumps(raw))
    events(np.arange(PEOPLE)).write_parquet(folder / "events.parquet")
    pl.DataFrame({"event_id": np.arange(PEOPLE, dtype=np.int64), "step": np.ones(PEOPLE, dtype=np.int64),
                  "hours": np.linspace(1, 50, PEOPLE)}).write_parquet(folder / "steps.parquet")
    return folder, parse_metadata(raw)


def count(backend: PolarsBackend, folder: Path, metadata: DatasetMetadata, table: str) -> int:
    request = AggregateRequest(folder, metadata, table, L, (), (), Measure("rows"))
    return int(backend.aggregate(request)["rows"].item())


def kept_per_person(backend: PolarsBackend, folder: Path, metadata: DatasetMetadata) -> dict[int, int]:
    """Kept steps per person, the person taken from the events file as it is now."""
    owners = pl.read_parquet(folder / "events.parquet").select("event_id", "person_id")
    kept = backend.scan(folder, metadata, "steps").filter(pl.col(RANK) <= L).collect()
    joined = kept.join(owners, on="event_id")
    per_person = dict(joined.group_by("person_id").len().iter_rows())
    assert max(per_person.values()) <= L
    assert (joined[UNIT] == joined["person_id"]).all()  # the cached person is the current one
    return per_person


def cache_files(folder: Path, table: str) -> list[str]:
    return sorted(p.name for p in (folder / ".civicdp-cache").glob(f"{table}-*.parquet"))


def test_correcting_the_owner_table_rebounds_the_steps(tmp_path: Path) -> None:
    folder, metadata = write_via_dataset(tmp_path / "ds")
    backend = PolarsBackend()
    assert count(backend, folder, metadata, "steps") == PEOPLE
    steps_file = folder / "steps.parquet"
    before = steps_file.stat()
    # The steward re-attributes 26 events to person 0; steps.parquet is not touched.
    corrected = np.arange(PEOPLE)
    corrected[:26] = 0
    events(corrected).write_parquet(folder / "events.parquet")
    assert steps_file.stat().st_mtime_ns == before.st_mtime_ns
    for reader in (backend, PolarsBackend()):  # this process, and a new one reading the cache files
        per_person = kept_per_person(reader, folder, metadata)
        assert per_person[0] == L
        assert count(reader, folder, metadata, "steps") == L + (PEOPLE - 26)
    assert len(cache_files(folder, "steps")) == 1  # the ranking by the old persons is gone


def totals_by_channel(frame: pl.DataFrame) -> dict[str, float]:
    return dict(frame.group_by("channel").agg(pl.col("waiting_minutes").sum() * 4).iter_rows())


def test_a_rewrite_with_the_same_size_and_mtime_is_seen(make_dataset: MakeDataset) -> None:
    frame = events_frame().with_columns(pl.Series("waiting_minutes", np.arange(99) * 0.5 + 0.25))
    dataset = make_dataset(frame, base_metadata())
    table = dataset.path / "events.parquet"
    frame.write_parquet(table, compression="uncompressed")  # its size depends on the layout only
    backend = PolarsBackend()
    measure = Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=0.25)
    request = AggregateRequest(dataset.path, dataset.metadata, "events", L, (), (GroupKey("channel", None, CHANNELS),),
                               measure)
    assert totals_by_channel(frame) == dict(backend.aggregate(request).select("channel", "total").iter_rows())
    old = table.stat()
    # The same values in another order: the same layout, so the file has the same size.
    rewritten = frame.with_columns(pl.col("waiting_minutes").reverse())
    rewritten.write_parquet(table, compression="uncompressed")
    os.utime(table, ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p or rsync -a leave it
    new = table.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert totals_by_channel(rewritten) != totals_by_channel(frame)
    for reader in (backend, PolarsBackend()):
        answer = dict(reader.aggregate(request).select("channel", "total").iter_rows())
        assert answer == totals_by_channel(rewritten)
    assert len(cache_files(dataset.path, "events")) == 1


def test_stale_files_go_but_other_datasets_in_a_shared_cache_stay(make_dataset: MakeDataset,
                                                                  tmp_path: Path) -> None:
    frame = events_frame()
    first, second = (make_dataset(frame, base_metadata(), name=n) for n in ("first", "second"))
    backend = PolarsBackend(cache_dir=tmp_path / "shared-cache")
    rows = {}
    for dataset in (first, second):  # the same bytes in two folders: two cache files
        rows[dataset.path] = backend.contribution_profile(dataset.path, dataset.metadata, "events", L)
        backend.aggregate(AggregateRequest(dataset.path, dataset.metadata, "events", L, (), (), Measure("rows")))
    second_files = sorted((tmp_path / "shared-cache").glob("events-*.parquet"))
    assert len(second_files) == 2
    frame.head(10).write_parquet(first.path / "events.parquet")
    backend.aggregate(AggregateRequest(first.path, first.metadata, "events", L, (), (), Measure("rows")))
    after = sorted((tmp_path / "shared-cache").glob("events-*.parquet"))
    assert len(after) == 2 and len(set(after) & set(second_files)) == 1  # second's file stayed
    assert backend.contribution_profile(first.path, first.metadata, "events", L).sum() == 10
    assert (backend.contribution_profile(second.path, second.metadata, "events", L) == rows[second.path]).all()


def test_the_digest_is_computed_once_per_file_state(make_dataset: MakeDataset,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = make_dataset(events_frame(), base_metadata())
    backend = PolarsBackend()
    hashed: list[object] = []
    file_digest = hashlib.file_digest

    def counting(handle: Any, digest: str) -> Any:
        hashed.append(handle)
        return file_digest(handle, digest)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    request = AggregateRequest(dataset.path, dataset.metadata, "events", L, (), (), Measure("rows"))
    for _ in range(3):
        backend.aggregate(request)
    assert len(hashed) == 1
    (dataset.path / "events.parquet").touch()  # a new state: hashed again; same bytes, same cache file
    backend.aggregate(request)
    assert len(hashed) == 2 and len(cache_files(dataset.path, "events")) == 1
