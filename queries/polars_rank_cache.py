"""The Polars backend's rank cache: each table's rows in their stable random order per person.

Contribution bounding uses a per-table rank column (:data:`RANK`): each row's position,
within its person, in a random order given by a hash of the row's own content. Keeping
rows with rank <= L keeps at most L rows per person, and which rows are kept depends
only on that person's rows, so adding or removing one person changes nothing else (the
truncation is stable). The rank is computed once per table file and cached as a Parquet
file next to the data (or in ``cache_dir``), sorted by person and rank.

The cache is named after everything its content depends on: the bytes of every file it
reads (the table and, for a ``privacy_unit_via`` table, the owner table that gives each
row its person), the declared columns, the mapping and the privacy unit. A digest of
the bytes, not the size and mtime: a steward who corrects person ids in ``events``
changes the persons of ``steps`` without touching ``steps.parquet``, and ``cp -p`` or a
restore rewrites a file with its mtime kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable

import polars as pl

from civicdp.queries.backend import UNIT, person_column
from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.integrity import OWNER_KEY_TEXT, owner_key_counts
from civicdp.queries.metadata import DatasetMetadata

RANK = "__civicdp_rank"
_HASH_SEED = 0x5EED_C1F1C
_CACHE_VERSION = "v4"  # bump whenever the content of a cache file changes meaning
_KEY_CHARS = 24  # hex characters of the cache key in a cache file's name
_CACHE_NAME = re.compile(rf"[0-9a-f]{{{_KEY_CHARS}}}\.parquet")
_ATTEMPTS = 3  # rankings tried while the steward is replacing files

#: What changes whenever a file's bytes may have: a rewrite (size, mtime, ctime), a
#: replacement (inode), a copy with its mtime preserved (cp -p, rsync -a: inode or ctime).
FileState = tuple[int, int, int, int, int]


class _SourceChanged(Exception):
    """A source file changed between its digest and the ranking that read it."""


class RankCache:
    """Ranked copies of tables, made once per content and shared by the threads of a process.

    ``forget`` is called with the path of every cache file removed as stale, so that
    whatever was remembered about it can be dropped.
    """

    def __init__(self, cache_dir: Path | None = None, forget: Callable[[str], None] = lambda path: None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._forget = forget
        self._digests: dict[str, tuple[FileState, str]] = {}  # path -> (its state, sha256 of its bytes)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def source(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        return Path(dataset_dir) / metadata.tables[table].path

    def _sources(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> list[Path]:
        """Every file the ranked table is made from."""
        via = metadata.tables[table].privacy_unit_via
        owners = [self.source(dataset_dir, metadata, via["table"])] if via else []
        return [self.source(dataset_dir, metadata, table), *owners]

    def ranked_path(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        """The cache file of ``table``'s current content, ranked first if there is none yet."""
        for _ in range(_ATTEMPTS):
            try:
                return self._ranked_path_once(dataset_dir, metadata, table)
            except _SourceChanged:
                continue
        raise DatasetUnavailable("table", f"the files of table '{table}' kept changing while they were read",
                                 "Ask again once the data steward has finished replacing them")

    def _ranked_path_once(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        meta = metadata.tables[table]
        sources = self._sources(dataset_dir, metadata, table)
        contents = [self._content(source) for source in sources]
        key = json.dumps({"files": [digest for _, digest in contents], "via": meta.privacy_unit_via,
                          "columns": list(meta.columns), "unit": metadata.privacy_unit,
                          "seed": _HASH_SEED, "version": _CACHE_VERSION}, sort_keys=True)
        cache = self.cache_dir or Path(dataset_dir) / ".civicdp-cache"
        prefix = _cache_prefix(dataset_dir, table)
        path = cache / f"{prefix}{hashlib.sha256(key.encode()).hexdigest()[:_KEY_CHARS]}.parquet"
        if path.exists():
            return path
        with self._lock_for(path):  # one writer per file in this process; others wait for it
            if not path.exists():
                cache.mkdir(parents=True, exist_ok=True)
                # A name of its own per writer (other processes may be writing too), then an
                # atomic rename: readers never see half a file.
                handle, tmp = tempfile.mkstemp(dir=cache, prefix=f".{table}-", suffix=".tmp")
                os.close(handle)
                try:
                    self._rank(dataset_dir, metadata, table).sink_parquet(tmp, statistics=True)
                    # The ranking opened the files by name: publish it under this key only if
                    # they still hold the bytes that were digested.
                    if [_file_state(source) for source in sources] != [state for state, _ in contents]:
                        raise _SourceChanged
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                self._remove_stale(cache, prefix, path)
        return path

    def _content(self, path: Path) -> tuple[FileState, str]:
        """The file's state and the sha256 of its bytes, hashed once per state in this process."""
        state = _file_state(path)
        known = self._digests.get(str(path))
        if known is not None and known[0] == state:
            return known
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if _state_of(os.fstat(handle.fileno())) != state:
                raise _SourceChanged  # replaced or rewritten while hashed
        self._digests[str(path)] = (state, digest)
        return state, digest

    def _remove_stale(self, cache: Path, prefix: str, current: Path) -> None:
        """Delete this table's cache files for earlier contents (they are never read again)."""
        for entry in os.scandir(cache):
            name = entry.name
            if name != current.name and name.startswith(prefix) and _CACHE_NAME.fullmatch(name[len(prefix):]):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:  # another process removed it first
                    pass
                self._forget(str(cache / name))

    def _lock_for(self, path: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(str(path), threading.Lock())

    def _rank(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        meta = metadata.tables[table]
        frame = pl.scan_parquet(self.source(dataset_dir, metadata, table))
        if meta.privacy_unit_via:
            via = meta.privacy_unit_via
            rows, keys = owner_key_counts(dataset_dir, metadata, table)
            if rows != keys:
                # Registration refuses such files; these were changed afterwards. A repeated key
                # would credit one row to several people (issue 11's harness: 9 moves for L = 3).
                raise DatasetUnavailable("table", OWNER_KEY_TEXT, "Ask the data steward to make the key unique")
            owner = pl.scan_parquet(self.source(dataset_dir, metadata, via["table"]))
            units = owner.select(pl.col(via["on"]), pl.col(metadata.privacy_unit).alias(UNIT))
            frame = frame.join(units, on=via["on"], how="inner")
        unit = person_column(metadata, table)
        columns = list(meta.columns)
        # rows: [columns..., (UNIT)]; the order within a person comes from the row's own content
        order = pl.struct(columns).hash(seed=_HASH_SEED)
        ranked = frame.with_columns(order.rank("ordinal").over(unit).cast(pl.UInt32).alias(RANK))
        # Sorted so that each person's rows are contiguous and in rank order (see polars_exprs.run_rank).
        return ranked.sort(unit, RANK)


def _state_of(stat: os.stat_result) -> FileState:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _file_state(path: Path) -> FileState:
    return _state_of(os.stat(path))


def _cache_prefix(dataset_dir: Path, table: str) -> str:
    """Start of the names of one table's cache files; a cache_dir may serve several datasets."""
    where = hashlib.sha256(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:8]
    return f"{table}-{where}-"
