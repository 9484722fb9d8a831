"""A monitor's working files and the release of the steps a batch completes.

Every attempt at a batch writes files of its own, named ``batch-<seq>-<token>`` under
the monitor's folder: the batch itself and the state after it — ``.used.parquet`` (the
rows each person has used over the horizon) and ``.leaves.npz`` (the exact leaf
vectors: microdata aggregates, kept like the data). An attempt starts from the state of
the last *committed* batch (the path its ``MonitorBatch`` row names), so the files of an
attempt that failed, or that lost a race with another server process for the same
``seq``, are never read: they are removed, and a retry starts again from committed
state, never from use or leaves the failed attempt wrote. The noise is drawn in
:func:`release` and nothing of it leaves the process unless the batch's transaction
commits.

An attempt whose process was killed removes nothing: :func:`remove_stale` does, at the
next batch of the monitor (before it starts and once it has committed) -- every
``batch-<seq>-*`` file of a ``seq`` already committed that no committed row names. Such
an attempt can never commit (one batch per ``seq``), whether its process is dead or still
finishing; the files of a ``seq`` not committed yet may be another process's live attempt
and wait until that ``seq`` is committed.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from civicdp.queries.monitor_batches import add_vectors, exact_total
from civicdp.queries.monitoring import ResolvedMonitor, step_rows, step_vectors
from civicdp.server.state.monitor_models import MonitorBatch

Released = list[tuple[int, list[dict[str, Any]]]]
Nodes = dict[tuple[int, int], dict[str, list[int]]]


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


@dataclass(frozen=True)
class Attempt:
    """The files one attempt at batch ``seq`` writes (a fresh token: no two attempts share a name)."""

    batch: Path

    @classmethod
    def new(cls, folder: Path, seq: int) -> Attempt:
        return cls(folder / f"batch-{seq:06d}-{secrets.token_hex(6)}.parquet")

    @property
    def used(self) -> Path:
        return self.batch.with_suffix(".used.parquet")

    @property
    def leaves(self) -> Path:
        return self.batch.with_suffix(".leaves.npz")

    def remove(self) -> None:
        for path in (self.batch, self.used, self.leaves):
            path.unlink(missing_ok=True)


#: Files of an attempt, and the temporary files :func:`write_atomic` writes them through.
_ATTEMPT_FILE = re.compile(r"^\.?batch-(\d+)-")


def remove_stale(folder: Path, committed: list[tuple[int, str]]) -> list[Path]:
    """Remove the files of attempts at an already committed ``seq`` that no committed batch names.

    ``committed`` holds each committed batch's ``seq`` and ``path``. Returns what was removed.
    """
    if not folder.is_dir():
        return []
    kept: set[str] = set()
    for _, path in committed:
        attempt = Attempt(Path(path))
        kept.update((attempt.batch.name, attempt.used.name, attempt.leaves.name))
    done = max((seq for seq, _ in committed), default=0)
    removed = []
    for path in folder.iterdir():
        match = _ATTEMPT_FILE.match(path.name)
        if match is None or path.name in kept or int(match.group(1)) > done:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_state(previous: MonitorBatch | None) -> tuple[dict[Any, int], dict[str, np.ndarray]]:
    """Per-person use and exact leaves after the last committed batch (empty before the first)."""
    if previous is None:
        return {}, {}
    committed = Attempt(Path(previous.path))
    if not (committed.used.exists() and committed.leaves.exists()):
        raise RuntimeError(f"the state files of monitor batch {previous.seq} are missing")
    table = pl.read_parquet(committed.used)
    used = dict(zip(table["unit"].to_list(), table["used"].to_list()))
    with np.load(committed.leaves) as stored:
        leaves = {k: stored[k] for k in stored.files}
    return used, leaves


def save_state(attempt: Attempt, used: dict[Any, int], leaves: dict[str, np.ndarray]) -> None:
    write_atomic(attempt.used, parquet_bytes(pl.DataFrame([pl.Series("unit", list(used)),
                                                           pl.Series("used", list(used.values()), dtype=pl.Int64)])))
    buffer = io.BytesIO()
    np.savez(buffer, **leaves)
    write_atomic(attempt.leaves, buffer.getvalue())


def _columns(monitor: ResolvedMonitor) -> list[str]:
    spec = monitor.spec
    return list(dict.fromkeys(c for c in (monitor.unit_column, spec.time, spec.group_by, spec.column) if c))


def release(monitor: ResolvedMonitor, batches: list[MonitorBatch], attempt: Attempt, first: int, last: int,
            nodes: Nodes) -> tuple[Released, Nodes]:
    """Save the state after the new batch and release steps ``first .. last`` (none if ``last < first``).

    ``batches`` are the committed ones, in order; the new batch's file is ``attempt.batch``.
    Returns each released step's rows and the new tree nodes.
    """
    used, leaves = load_state(batches[-1] if batches else None)
    if last < first:
        save_state(attempt, used, leaves)
        return [], {}
    begin, stop = monitor.step_start(first), monitor.step_start(last + 1)
    time = pl.col(monitor.spec.time).cast(pl.Datetime("us"))
    sources = [Path(b.path) for b in batches if _naive(b.end) > begin and _naive(b.start) < stop]
    sources.append(attempt.batch)  # always: the frame keeps its schema even when no row falls in the steps
    columns = _columns(monitor)
    rows = pl.concat([pl.read_parquet(p, columns=columns).filter((time >= begin) & (time < stop)) for p in sources],
                     how="vertical_relaxed")
    exact, used = step_vectors(monitor, rows, first, last, used)
    for name, vectors in exact.items():
        previous = leaves.get(name, np.zeros((0, vectors.shape[1]), dtype=np.int64))
        leaves[name] = np.concatenate([previous[:first], vectors])
    save_state(attempt, used, leaves)
    new_nodes: Nodes = {}
    released: Released = []
    all_nodes = dict(nodes)
    tree0 = next(iter(monitor.trees.values()))
    for step in range(first, last + 1):
        for name, tree in monitor.trees.items():
            for node in tree.completed_by(step):
                key = (node.level, node.index)
                all_nodes.setdefault(key, {})[name] = tree.release(exact_total(leaves[name][node.first:node.last + 1]))
                new_nodes.setdefault(key, {})[name] = all_nodes[key][name]
        leaf = {name: all_nodes[(0, step)][name] for name in monitor.trees}
        running = {name: add_vectors([all_nodes[(n.level, n.index)][name] for n in tree0.prefix(step)])
                   for name in monitor.trees}
        released.append((step, step_rows(monitor, step, leaf, running)))
    return released, new_nodes
