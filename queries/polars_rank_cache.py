"""The Polars backend's rank cache: each table's rows in their stable random order per person.

Contribution bounding uses a per-table rank column (:data:`RANK`): each row's position,
within its person, in a random order given by a hash of the row's own content. Keeping
rows with rank <= L keeps at most L rows per person, and which rows are kept depends
only on that person's rows, so adding or removing one person changes nothing else (the
truncation is stable). The rank is computed once per table file and cached as a Parquet
file next to the data (or in ``cache_dir``), sorted by person and rank.

The server prepares every table when a version is registered (:func:`write_ranked`, into a
snapshot folder of :mod:`civicdp.queries.polars_snapshots` under its state directory); a
cache given a ``cache_dir`` reads a table from the snapshot of its dataset version when
there is one (``cache_dir/versions``), and ranks on demand (into ``cache_dir``) only when
there is none.

An on-demand file is named after everything its content depends on: the bytes of every file it
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
from civicdp.queries.polars_exprs import run_rank
from civicdp.queries.polars_snapshots import Snapshots

RANK = "__civicdp_rank"
_HASH_SEED = 0x5EED_C1F1C
_CACHE_VERSION = "v5"  # bump whenever the content of a cache file changes meaning
_ROW, _HASH = "__civicdp_row", "__civicdp_hash"
_KEY_CHARS = 24  # hex characters of the cache key in a cache file's name
_CACHE_NAME = re.compile(rf"[0-9a-f]{{{_KEY_CHARS}}}\.parquet")
_ATTEMPTS = 3  # rankings tried while the steward is replacing files

#: What changes whenever a file's bytes may have: a rewrite (size, mtime, ctime), a
#: replacement (inode), a copy with its mtime preserved (cp -p, rsync -a: inode or ctime).
FileState = tuple[int, int, int, int, int]


class SourceChanged(Exception):
    """A source file changed between its digest (or first look) and the ranking that read it."""


class RankCache:
    """Ranked copies of tables, made once per content and shared by the threads of a process.

    ``forget`` is called with the path of every cache file removed as stale, so that
    whatever was remembered about it can be dropped.
    """

    def __init__(self, cache_dir: Path | None = None, forget: Callable[[str], None] = lambda path: None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._snapshots = Snapshots(self.cache_dir) if self.cache_dir else None
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
        """The prepared file of ``table`` in this version's snapshot, else the cache file of its
        current content, ranked first if there is none yet."""
        if self._snapshots is not None:
            prepared = self._snapshots.table_file(dataset_dir, metadata, table)
            if prepared is not None:
                return prepared
        for _ in range(_ATTEMPTS):
            try:
                return self._ranked_path_once(dataset_dir, metadata, table)
            except SourceChanged:
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
                    # The ranking opens the files by name: published under this key only if
                    # they still hold the bytes that were digested.
                    write_ranked(dataset_dir, metadata, table, Path(tmp),
                                 expected=[state for state, _ in contents])
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
                raise SourceChanged  # replaced or rewritten while hashed
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


#: What a ranking's progress callback is told: (steps done, steps in all) of one table.
Step = Callable[[int, int], None]


def ranking_steps(metadata: DatasetMetadata, table: str) -> int:
    """How many steps :func:`write_ranked` reports for ``table``: the keys, their order, each column, the file."""
    return 3 + len(metadata.tables[table].columns)


def write_ranked(dataset_dir: Path, metadata: DatasetMetadata, table: str, target: Path,
                 step: Step = lambda done, total: None, expected: list[FileState] | None = None) -> None:
    """Write ``table``'s rows, ranked within each person, sorted by person and rank, to ``target``.

    Each row's rank is its position within its person in the order of a hash of the row's
    declared columns (then, for the rare rows whose hashes tie, their order in the file);
    rows without a person are left out (no query counts them). The file holds the declared
    columns, the person (:data:`UNIT`) of a ``privacy_unit_via`` table, and :data:`RANK`.

    Memory stays near the size of the table's declared columns: the sort runs on the
    person, hash and row number only, then each column is read on its own and put in order.
    ``expected``: the states the source files must still have when the file is written
    (default: their states when the ranking starts); otherwise :class:`SourceChanged`.
    ``step`` is called after each of :func:`ranking_steps` steps and may raise to stop.
    """
    meta = metadata.tables[table]
    dataset_dir = Path(dataset_dir)
    source = dataset_dir / meta.path
    via = meta.privacy_unit_via
    sources = [source, *([dataset_dir / metadata.tables[via["table"]].path] if via else [])]
    states = expected if expected is not None else [_file_state(s) for s in sources]
    total, columns, unit = ranking_steps(metadata, table), list(meta.columns), person_column(metadata, table)
    if via:
        owned, keys = owner_key_counts(dataset_dir, metadata, table)
        if owned != keys:
            # Registration refuses such files; these were changed afterwards. A repeated key
            # would credit one row to several people (issue 11's harness: 9 moves for L = 3).
            raise DatasetUnavailable("table", OWNER_KEY_TEXT, "Ask the data steward to make the key unique")
    rows, persons = _rank_order(sources, metadata, table, step)
    step(2, total)
    ranked = {}
    for i, column in enumerate(columns):
        # One chunk: a gather from the reader's many chunks is several times slower.
        ranked[column] = pl.read_parquet(source, columns=[column]).to_series().rechunk().gather(rows)
        step(3 + i, total)
    del rows
    if via:
        ranked[UNIT] = persons
    ranked[RANK] = persons.to_frame().select(run_rank(unit).cast(pl.UInt32).alias(RANK))[RANK]
    del persons
    # zstd level 1: near zstd's default size (the file holds every declared column), twice as fast to write
    pl.DataFrame(ranked).write_parquet(target, compression="zstd", compression_level=1, statistics=True)
    if [_file_state(s) for s in sources] != states:
        raise SourceChanged
    step(total, total)


def _rank_order(sources: list[Path], metadata: DatasetMetadata, table: str,
                step: Step) -> tuple[pl.Series, pl.Series]:
    """The table's row numbers with a person, sorted by person, then content hash, then row
    number; and each one's person, in that order.

    Integer persons spanning fewer than 2**32 values are sorted as one 64-bit key made
    while the file is streamed (the person's offset, then the upper half of the hash; ties
    keep the file's order): a third of the time and memory of sorting person and hash.
    """
    meta = metadata.tables[table]
    via = meta.privacy_unit_via
    unit = person_column(metadata, table)
    scan = pl.scan_parquet(sources[0]).with_row_index(_ROW)
    content = pl.struct(list(meta.columns)).hash(seed=_HASH_SEED).alias(_HASH)
    if via:
        owner = pl.scan_parquet(sources[1]).select(pl.col(via["on"]), pl.col(metadata.privacy_unit).alias(UNIT))
        keyed = scan.select(_ROW, via["on"], content).join(owner, on=via["on"], how="inner").select(_ROW, UNIT, _HASH)
        people = owner.select(pl.col(UNIT))
    else:
        keyed, people = scan.select(_ROW, unit, content), scan.select(pl.col(unit))
    keyed = keyed.filter(pl.col(unit).is_not_null())
    dtype = people.collect_schema()[unit]
    if dtype.is_integer() and dtype != pl.UInt64:
        low, high = people.select(pl.col(unit).min().alias("low"), pl.col(unit).max().alias("high")).collect().row(0)
        if low is None or high - low < 2**32:
            low = low or 0
            key = (pl.col(unit).cast(pl.Int64) - low).cast(pl.UInt64) * (1 << 32) + pl.col(_HASH) // (1 << 32)
            keys = keyed.select(_ROW, key.alias(_HASH)).collect(engine="streaming").rechunk()
            step(1, ranking_steps(metadata, table))
            order = keys.select(pl.arg_sort_by(_HASH, maintain_order=True))[_HASH]
            rows, key = keys[_ROW].gather(order).rechunk(), keys[_HASH].gather(order)
            del keys, order
            persons = ((key // (1 << 32)).cast(pl.Int64) + low).cast(dtype).alias(unit)
            return rows, persons
    keys = keyed.collect(engine="streaming").rechunk()
    step(1, ranking_steps(metadata, table))
    order = keys.select(pl.arg_sort_by([unit, _HASH, _ROW]))[unit]
    return keys[_ROW].gather(order).rechunk(), keys[unit].gather(order)


def remove_on_demand(cache_dir: Path, dataset_dir: Path, tables: list[str]) -> int:
    """Delete the files ranked on demand in ``cache_dir`` for these tables of ``dataset_dir``; how many."""
    prefixes = [_cache_prefix(dataset_dir, table) for table in tables]
    removed = 0
    try:
        entries = list(os.scandir(cache_dir))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if any(entry.name.startswith(p) and _CACHE_NAME.fullmatch(entry.name[len(p):]) for p in prefixes):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _state_of(stat: os.stat_result) -> FileState:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _file_state(path: Path) -> FileState:
    return _state_of(os.stat(path))


def _cache_prefix(dataset_dir: Path, table: str) -> str:
    """Start of the names of one table's cache files; a cache_dir may serve several datasets."""
    where = hashlib.sha256(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:8]
    return f"{table}-{where}-"
