"""Building a registered version's snapshot (:mod:`civicdp.queries.polars_snapshots`).

Each table is ranked per person (:func:`civicdp.queries.polars_rank_cache.write_ranked`)
into ``<prepared>/versions/<dataset>/.building-<id>-<worker>``; the manifest is written
last and the folder renamed to ``<id>`` once complete. The dataset folder is only read.

Versions whose tables hold more than :data:`CHILD_ABOVE_BYTES` are built in a child
process (``python -m civicdp.server.intake.snapshot``): the few GB a ranking of tens of
millions of rows needs for a while are given back to the system when it exits (Polars'
allocator keeps freed memory in the process otherwise), a crash or an out-of-memory kill
ends that child, not the server, and a preparation given up is stopped by ending it. The
child reports each step on its standard output as a JSON line.

Errors are described by :func:`describe` in words that quote no data: the library's own
message could hold values from the files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata, parse_metadata
from civicdp.queries.polars_rank_cache import SourceChanged, write_ranked
from civicdp.queries.polars_snapshots import (building_folder, building_folders, fingerprint, read_manifest,
                                              snapshot_folder, source_states, write_manifest)

#: Built in a child process above this many bytes of table files.
CHILD_ABOVE_BYTES = 64 * 1024 * 1024
#: The child's allocator gives freed memory back within a second (peak 2.0 instead of 3.4 GB at 29 M rows).
CHILD_MALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"

#: (table, tables done, tables in all, steps done in this table, its steps); may raise to stop the build.
Progress = Callable[[str, int, int, int, int], None]


class Stopped(Exception):
    """The preparation was given up (a newer registration, or its claim was lost)."""


class Failed(Exception):
    """Building failed; the message is :func:`describe`'s (no data in it)."""


def build_snapshot(dataset_dir: Path, metadata: DatasetMetadata, root: Path, ident: int, tag: str,
                   progress: Progress) -> dict[str, Any]:
    """Build the snapshot of preparation ``ident``; its manifest. Raises Stopped or Failed."""
    size = sum(os.stat(Path(dataset_dir) / t.path).st_size for t in metadata.tables.values())
    if size > CHILD_ABOVE_BYTES:
        return _in_child(dataset_dir, metadata, root, ident, tag, progress)
    return build(dataset_dir, metadata, root, ident, tag, progress)


def build(dataset_dir: Path, metadata: DatasetMetadata, root: Path, ident: int, tag: str,
          progress: Progress) -> dict[str, Any]:
    """Build the snapshot in this process (:func:`build_snapshot` chooses)."""
    dataset_dir = Path(dataset_dir)
    building = building_folder(root, metadata.name, ident, tag)
    table = None
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        states = source_states(dataset_dir, metadata)
        files, names = {}, list(metadata.tables)
        for i, table in enumerate(names):
            files[table] = f"table-{i}.parquet"

            def step(done: int, total: int, table: str = table, i: int = i) -> None:
                progress(table, i, len(names), done, total)

            write_ranked(dataset_dir, metadata, table, building / files[table], step=step)
        table = None
        if source_states(dataset_dir, metadata) != states:
            raise SourceChanged
        manifest = {"dataset": metadata.name, "version": metadata.version, "preparation": ident,
                    "path": str(dataset_dir.resolve()), "metadata": fingerprint(metadata), "tables": files,
                    "sources": states}
        write_manifest(building, manifest)
        final = snapshot_folder(root, metadata.name, ident)
        try:
            os.rename(building, final)
        except OSError:  # another worker finished this preparation first: its folder is whole
            existing = read_manifest(final)
            if existing is None:
                raise
            shutil.rmtree(building, ignore_errors=True)
            return existing
        return manifest
    except Stopped:
        shutil.rmtree(building, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(building, ignore_errors=True)
        raise Failed(describe(exc, table, metadata.name)) from exc


def remove_building(root: Path, dataset: str, ident: int) -> None:
    for folder in building_folders(root, dataset, ident):
        shutil.rmtree(folder, ignore_errors=True)


def describe(exc: BaseException, table: str | None, dataset: str = "") -> str:
    """What a steward is told about a failed preparation: the cause's kind and the file, never data."""
    which = f"table '{table}'" if table else f"dataset '{dataset}'"
    if isinstance(exc, Failed):
        return str(exc)
    if isinstance(exc, SourceChanged):
        return (f"the files of {which} changed while they were being prepared; register the dataset again "
                "once they are complete")
    if isinstance(exc, QueryError):
        return f"{which}: {exc.problem}"  # the engine's fixed texts
    if isinstance(exc, MemoryError):
        return f"the server ran out of memory preparing {which}"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{which} could not be prepared: {exc.strerror or type(exc).__name__}{where}"
    if isinstance(exc, pl.exceptions.PolarsError):
        return (f"{which} cannot be read as Parquet with the columns and types metadata.json declares "
                f"({type(exc).__name__}); civicdp datasets check names the column")
    return f"{which} could not be prepared ({type(exc).__name__}); the server's log has the details"


def _in_child(dataset_dir: Path, metadata: DatasetMetadata, root: Path, ident: int, tag: str,
              progress: Progress) -> dict[str, Any]:
    job = {"dataset_dir": str(dataset_dir), "metadata": metadata.model_dump_json(), "root": str(root),
           "ident": ident, "tag": tag}
    env = {**os.environ, "_RJEM_MALLOC_CONF": CHILD_MALLOC_CONF}
    child = subprocess.Popen([sys.executable, "-m", "civicdp.server.intake.snapshot"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdin is not None and child.stdout is not None
    outcome: dict[str, Any] = {}
    try:
        child.stdin.write(json.dumps(job))
        child.stdin.close()
        for line in child.stdout:
            message = json.loads(line)
            if "progress" in message:
                progress(*message["progress"])
            else:
                outcome = message
    except BaseException:
        child.kill()
        child.wait()
        remove_building(root, metadata.name, ident)
        raise
    code = child.wait()
    if "manifest" in outcome:
        return outcome["manifest"]
    remove_building(root, metadata.name, ident)
    raise Failed(outcome.get("error") or f"dataset '{metadata.name}' could not be prepared: the preparing "
                 f"process ended with status {code} (out of memory?); the server's log has the details")


def _child_main() -> None:
    job = json.loads(sys.stdin.read())
    out = sys.stdout

    def report(*step: Any) -> None:
        out.write(json.dumps({"progress": list(step)}) + "\n")
        out.flush()

    try:
        manifest = build(Path(job["dataset_dir"]), parse_metadata(json.loads(job["metadata"])), Path(job["root"]),
                         int(job["ident"]), str(job["tag"]), report)
    except Failed as failed:
        traceback.print_exception(failed.__cause__ or failed, file=sys.stderr)  # for the server's log
        out.write(json.dumps({"error": str(failed)}) + "\n")
        raise SystemExit(1) from None
    out.write(json.dumps({"manifest": manifest}) + "\n")


if __name__ == "__main__":
    _child_main()
