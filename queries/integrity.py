"""Checks of a dataset's files that the privacy unit relies on, run before anyone queries it.

A table linked to its person through another table (``privacy_unit_via``, e.g. steps
through events on ``event_id``) is attributed by that join. If the owner table held the
same key for two people, a step under it would count for both, and adding one person
who reuses other people's keys would change *their* rows: the person-level bound would
not hold. The owner's key must therefore be unique; a dataset where it is not lies
outside what the guarantee covers, and is refused when it is registered (by the
steward, before any query) rather than when an analyst asks.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from civicdp.queries.metadata import DatasetMetadata


#: What the engine answers when a linked table's owner key repeats (fixed: it names no data).
OWNER_KEY_TEXT = ("a linked table's owner key is not unique, so its rows cannot be attributed to one "
                  "person each")


def owner_key_counts(dataset_dir: Path, metadata: DatasetMetadata, table: str) -> tuple[int, int]:
    """(rows, distinct keys) of the owner table that ``table`` is linked to its person through."""
    via = metadata.tables[table].privacy_unit_via or {}
    owner, on = via["table"], via["on"]
    path = Path(dataset_dir) / metadata.tables[owner].path
    counts = (pl.scan_parquet(path).select(pl.col(on))
              .select(pl.len().alias("rows"), pl.col(on).n_unique().alias("keys")).collect())
    return int(counts["rows"][0]), int(counts["keys"][0])


def duplicated_owner_keys(dataset_dir: Path, metadata: DatasetMetadata) -> list[str]:
    """One line per linked table whose owner key is not unique (empty when all are), for the steward."""
    problems = []
    for name, table in metadata.tables.items():
        via = table.privacy_unit_via
        if not via:
            continue
        rows, keys = owner_key_counts(dataset_dir, metadata, name)
        if rows != keys:
            problems.append(f"table '{name}' is linked to its person through '{via['table']}.{via['on']}', but "
                            f"{rows - keys} of the {rows} rows of '{via['table']}' repeat a value of '{via['on']}'")
    return problems
