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
  resolution must lie between the bounds' float precision and their span.

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


def check_declaration(metadata: DatasetMetadata) -> None:
    """The privacy unit is an identifier, identifiers have no keys, bounds and resolutions are sane."""
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
