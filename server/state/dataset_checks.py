"""Checks of a steward's dataset folder and declaration before it is registered.

The folder and its metadata come from a steward, but a typo or a hostile path must not
crash or block the server, read beyond the folder, or make an identifier groupable:

- ``metadata.json`` and every file the metadata names (tables, catalogues) must be
  regular files inside the dataset folder — no absolute paths, no ``..``, no symlinks
  out, no devices or FIFOs (``/dev/zero`` would be read until memory runs out, a FIFO
  would block a worker forever); ``metadata.json`` is at most ``MAX_METADATA_BYTES``;
- the privacy unit must be declared an identifier, and an identifier column cannot have
  public keys (it would become a group-by key: one group per person);
- numeric bounds must be finite and at most ``MAX_ABS_BOUND`` in size, and a declared
  resolution must lie between the bounds' float precision and their span;
- nothing may still be marked as proposed from the data (``proposed_from_data``, written
  by ``civicdp datasets init``): keys, bounds and limits read off the data are not public
  knowledge until the steward confirms them.

Every refusal names the file or field and the fix; nothing is registered.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from civicdp.queries.metadata import DatasetMetadata

MAX_METADATA_BYTES = 10 * 1024 * 1024
#: Larger bounds lose whole units in float64 and make every sum's noise astronomical.
MAX_ABS_BOUND = 1e15


class DatasetRefused(ValueError):
    """A dataset folder or declaration that cannot be registered; the message says why and how to fix it."""

    field = "path"


class Unconfirmed(DatasetRefused):
    """A declaration that still marks values as proposed from the data."""

    field = "proposed_from_data"


#: What a draft may mark as proposed from the data: fields of the dataset, and of a column.
DATASET_PROPOSALS = ("max_contributions", "max_contributions_limit")
COLUMN_PROPOSALS = ("identifier", "keys", "bounds", "resolution", "nullable")


def _regular_inside(folder: Path, name: str, what: str) -> Path:
    if not name or Path(name).is_absolute():
        raise DatasetRefused(f"{what} '{name}' must be a path relative to the dataset folder")
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise DatasetRefused(f"{what} '{name}' does not exist in {folder}") from None
    if not resolved.is_relative_to(folder):
        raise DatasetRefused(f"{what} '{name}' lies outside the dataset folder (a '..' or a symlink out); "
                             "copy the file into the folder")
    mode = os.stat(resolved).st_mode
    if not stat.S_ISREG(mode):
        raise DatasetRefused(f"{what} '{name}' is not a regular file (a device, FIFO or folder); "
                             "point to the data file itself")
    return resolved


def check_metadata_file(folder: Path) -> None:
    """``metadata.json`` must be a regular file of reasonable size, before it is read."""
    path = folder / "metadata.json"
    if not path.exists():
        return  # load_metadata names what is missing
    _regular_inside(folder, "metadata.json", "the metadata file")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise DatasetRefused(f"metadata.json is larger than {MAX_METADATA_BYTES // (1024 * 1024)} MiB; "
                             "it should hold the declaration only")


def check_files(folder: Path, metadata: DatasetMetadata) -> None:
    """Every table and catalogue file is a regular file inside ``folder``."""
    for name, table in metadata.tables.items():
        _regular_inside(folder, table.path, f"the file of table '{name}'")
    for key, value in (metadata.catalogue or {}).items():
        if key.endswith("path") and isinstance(value, str):
            _regular_inside(folder, value, f"the catalogue file '{key}'")


def proposal_target(metadata: DatasetMetadata, path: str) -> tuple[str, str | None, str | None] | None:
    """``(field, table, column)`` named by a ``proposed_from_data`` entry, or None if it names nothing.

    Entries are ``max_contributions`` (a dataset field) or
    ``tables.<table>.columns.<column>.<field>``, as registration errors name fields.
    """
    if path in DATASET_PROPOSALS:
        return path, None, None
    for tname, table in metadata.tables.items():
        prefix = f"tables.{tname}.columns."
        if path.startswith(prefix) and "." in path[len(prefix):]:
            column, field = path[len(prefix):].rsplit(".", 1)
            if column in table.columns and field in COLUMN_PROPOSALS:
                return field, tname, column
    return None


def unconfirmed(metadata: DatasetMetadata) -> list[str]:
    """The entries of ``proposed_from_data.fields``: values read off the data, not yet confirmed."""
    return list(metadata.proposed_from_data.fields) if metadata.proposed_from_data else []


def check_confirmed(metadata: DatasetMetadata) -> None:
    """Refuse a declaration that still marks values as proposed from the data, naming each and the way out."""
    marked = unconfirmed(metadata)
    if not marked:
        return
    unknown = [m for m in marked if proposal_target(metadata, m) is None]
    if unknown:
        raise Unconfirmed(f"proposed_from_data.fields: {', '.join(repr(u) for u in unknown)} names no field of this "
                          "declaration (a column renamed or removed?); correct or delete the entry. Entries are "
                          "'max_contributions' or 'tables.<table>.columns.<column>.<field>'")
    raise Unconfirmed(
        f"{len(marked)} value{'s' if len(marked) > 1 else ''} in metadata.json {'were' if len(marked) > 1 else 'was'} "
        f"read off the data by civicdp datasets init and {'are' if len(marked) > 1 else 'is'} not confirmed: "
        f"{', '.join(marked)}. Keys, bounds and limits read off the data are not public knowledge (a key can be one "
        "person's value, a bound their exact measurement). For each: keep the value only if it is public, otherwise "
        "replace it with the public one; then delete its name from proposed_from_data.fields (and "
        "proposed_from_data once it is empty) — or run `civicdp datasets confirm <folder>`, which shows every "
        "marked value and removes the marks (`--field NAME` for one)")


def check_declaration(metadata: DatasetMetadata, *, drafts: bool = False) -> None:
    """The privacy unit is an identifier, identifiers have no keys, bounds and resolutions are sane,
    and nothing is still proposed from the data (unless ``drafts``: ``civicdp datasets check`` lists those)."""
    if not drafts:
        check_confirmed(metadata)
    for tname, table in metadata.tables.items():
        unit = table.columns.get(metadata.privacy_unit)
        if unit is not None and not unit.identifier:
            raise DatasetRefused(f"tables.{tname}.columns.{metadata.privacy_unit}: the privacy unit must be "
                                 'declared an identifier; add "identifier": true')
        for cname, column in table.columns.items():
            where = f"tables.{tname}.columns.{cname}"
            if column.identifier and column.keys is not None:
                raise DatasetRefused(f"{where}: an identifier cannot have public keys (it would be grouped by, "
                                     "one group per person); remove 'keys'")
            if column.type in ("int", "float") and column.bounds is not None:
                lo, hi = (float(b) for b in column.bounds)  # type: ignore[arg-type]
                if max(abs(lo), abs(hi)) > MAX_ABS_BOUND:
                    raise DatasetRefused(f"{where}.bounds: [{lo:g}, {hi:g}] is beyond +-{MAX_ABS_BOUND:g}; "
                                         "declare the range the values really take")
                if column.resolution is not None:
                    finest = max(abs(lo), abs(hi)) * 2.0**-52  # float64 cannot resolve finer steps
                    if not (math.isfinite(column.resolution) and finest <= column.resolution <= hi - lo):
                        raise DatasetRefused(f"{where}.resolution: {column.resolution:g} must lie between "
                                             f"{finest:.3g} and the bounds' span {hi - lo:g}")
