"""Prepared snapshots of dataset versions: built when a version is registered, read by queries.

A snapshot is the folder ``<root>/versions/<dataset>/<id>`` (``id``: the number of the
preparation in the server's state) holding each table ranked per person
(:func:`civicdp.queries.polars_rank_cache.write_ranked`), copies of the public catalogue
files, and ``prepared.json``: the dataset folder and the metadata (its fingerprint) it was
made from, the file of each table and the state of each source file when it was read. It is
written under another name and renamed into place once complete, so a folder by that name
is always whole; it never changes afterwards and is removed as a whole.

A query finds a table's file by the dataset folder and the metadata it was planned with
(:class:`Snapshots`): the newest snapshot made from exactly those. The snapshot *is* the
version as registered: files the steward overwrites later change no answer until the
folder is registered again, and the folder itself is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from civicdp.queries.metadata import DatasetMetadata

MANIFEST = "prepared.json"
FORMAT = "civicdp-prepared/1"
VERSIONS = "versions"  # the folder of a state's prepared directory that holds the snapshots
_BUILDING = ".building-"
_FINGERPRINTS_KEPT = 256


def fingerprint(metadata: DatasetMetadata) -> str:
    """The sha256 of the metadata as the registry stores it: a snapshot serves this metadata only."""
    return hashlib.sha256(metadata.model_dump_json().encode()).hexdigest()


def dataset_folder(root: Path, dataset: str) -> Path:
    return Path(root) / VERSIONS / dataset


def snapshot_folder(root: Path, dataset: str, ident: int) -> Path:
    return dataset_folder(root, dataset) / str(ident)


def building_folder(root: Path, dataset: str, ident: int, tag: str) -> Path:
    """Where preparation ``ident`` is written by the worker ``tag`` before it is renamed into place."""
    return dataset_folder(root, dataset) / f"{_BUILDING}{ident}-{tag}"


def building_folders(root: Path, dataset: str, ident: int) -> list[Path]:
    """Every unfinished folder of preparation ``ident`` (one per worker that started it)."""
    try:
        names = os.listdir(dataset_folder(root, dataset))
    except FileNotFoundError:
        return []
    return [dataset_folder(root, dataset) / n for n in names if n.startswith(f"{_BUILDING}{ident}-")]


def source_files(dataset_dir: Path, metadata: DatasetMetadata) -> dict[str, Path]:
    """Every file a snapshot is made from, by its name in the folder: the tables and the catalogue."""
    names = [t.path for t in metadata.tables.values()]
    names += [v for v in (metadata.catalogue or {}).values() if isinstance(v, str)]
    return {name: Path(dataset_dir) / name for name in dict.fromkeys(names)}


def source_states(dataset_dir: Path, metadata: DatasetMetadata) -> dict[str, list[int]]:
    """(device, inode, size, mtime, ctime) of each source file: they change whenever its bytes may have."""
    states = {}
    for name, path in source_files(dataset_dir, metadata).items():
        stat = os.stat(path)
        states[name] = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return states


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True)
    tmp = Path(folder) / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(folder) / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a snapshot folder; None if there is none (or not one this version reads)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


class Snapshots:
    """Finds the snapshot a query reads, shared by the threads of a process.

    A snapshot found is remembered and checked to still exist at each use (one ``stat``);
    one not found is looked for again at the next use (the dataset's folder is listed).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._found: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
        self._fingerprints: dict[int, tuple[DatasetMetadata, str]] = {}
        self._guard = threading.Lock()

    def table_file(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path | None:
        """The ranked file of ``table`` in the snapshot of this folder and metadata; None if there is none."""
        found = self.find(dataset_dir, metadata)
        if found is None:
            return None
        folder, manifest = found
        name = manifest.get("tables", {}).get(table)
        return folder / name if isinstance(name, str) else None

    def find(self, dataset_dir: Path, metadata: DatasetMetadata) -> tuple[Path, dict[str, Any]] | None:
        key = (str(dataset_dir), self._fingerprint(metadata))
        known = self._found.get(key)
        if known is not None and (known[0] / MANIFEST).exists():
            return known
        found = self._search(dataset_dir, metadata, key[1])
        with self._guard:
            if found is None:
                self._found.pop(key, None)
            else:
                self._found[key] = found
        return found

    def _search(self, dataset_dir: Path, metadata: DatasetMetadata,
                print_: str) -> tuple[Path, dict[str, Any]] | None:
        parent = dataset_folder(self.root, metadata.name)
        try:
            idents = sorted((int(n) for n in os.listdir(parent) if n.isdigit()), reverse=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        where = str(Path(dataset_dir).resolve())
        for ident in idents:
            folder = parent / str(ident)
            manifest = read_manifest(folder)
            if manifest is not None and manifest.get("path") == where and manifest.get("metadata") == print_:
                return folder, manifest
        return None

    def _fingerprint(self, metadata: DatasetMetadata) -> str:
        known = self._fingerprints.get(id(metadata))
        if known is not None and known[0] is metadata:
            return known[1]
        value = fingerprint(metadata)
        with self._guard:
            if len(self._fingerprints) >= _FINGERPRINTS_KEPT:
                self._fingerprints.pop(next(iter(self._fingerprints)))
            self._fingerprints[id(metadata)] = (metadata, value)  # kept alive: its id is not reused meanwhile
        return value
