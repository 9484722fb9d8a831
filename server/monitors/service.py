"""Monitors on the server: define (charge once), append batches, release steps, raise alerts.

Flow of a definition: validate against the dataset's public metadata → in ONE
transaction: store the monitor and its calibration (what its noise was calibrated on:
L, bounds, resolution, group keys, noise scales, the metadata version; see
:mod:`civicdp.queries.monitor_calibration`), charge its total loss for the whole horizon to the
dataset's month and lifetime scopes (conditional update, as for queries), record it.

Flow of a batch (steward): rebuild the monitor from its stored calibration alone, and
refuse the batch if the dataset's current metadata no longer gives that calibration (a
new monitor is needed) → validate its schema, time range and order (refused: nothing
written, nothing changed) → write it atomically into the monitor's folder under
``data_dir/monitors/<id>/`` → release every step the batch completes: bound rows per
person across the whole horizon, draw the tree nodes that end at that step, turn them
into step and running values with intervals, evaluate the alert rules
(post-processing) → in ONE transaction: the batch, nodes, releases, alerts and their
records. Nothing is charged per batch: the tree's noise was calibrated for the whole
horizon, so no number of batches can spend more than the declared total. If anything
fails, the attempt's files are removed and nothing it computed is released; the next
attempt starts from the last committed batch's state (:mod:`civicdp.server.monitors.batch_files`).

Alerts are delivered after the commit: to HTTP callbacks of subscribers (``httpx``,
short timeout, on a background thread, each outcome recorded) and to server-sent-event
streams, which read new alerts from the database.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.queries.errors import QueryError
from civicdp.queries.monitor_calibration import Calibration, frozen_monitor
from civicdp.queries.monitoring import ResolvedMonitor, check_batch, fired, parse_monitor, resolve_monitor
from civicdp.server.state import ledger, registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import Conflict, NotFound
from civicdp.server.state.monitor_models import (
    Monitor, MonitorAlert, MonitorBatch, MonitorCalibration, MonitorNode, MonitorRelease, MonitorSubscription,
)
from civicdp.server.monitors.batch_files import Attempt, release, remove_stale, write_atomic
from civicdp.server.services.query_service import canonical_json, record

MAX_BATCH_BYTES = 512 * 1024 * 1024
#: A batch that lost to one accepted at the same time by another server process: nothing of it was kept.
_CONCURRENT = ("another batch of monitor '{name}' was accepted while this one was being computed (by another "
               "server process); nothing of this batch was kept, released or charged. Read the monitor's "
               "covered_until and send the batch again if its period is not covered yet")
CALLBACK_TIMEOUT = 3.0
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(monitor_id: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(monitor_id, threading.Lock())


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _naive(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def monitor_scopes(now: datetime) -> list[ledger.Scope]:
    """A monitor's loss protects everyone in the dataset: its month and lifetime scopes."""
    return [ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(now)),
            ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)]


class MonitorService:
    """Monitors of registered datasets; state in the database and under ``state_dir``."""

    def __init__(self, db: DbEngine, state_dir: Path, caps: ledger.CapDefaults) -> None:
        self.db = db
        self.state_dir = Path(state_dir)
        self.caps = caps

    # -- reading -----------------------------------------------------------------------

    def _get(self, session: Session, name: str) -> Monitor:
        row = session.exec(select(Monitor).where(Monitor.name == name)).first()
        if row is None:
            raise NotFound(f"no monitor named '{name}'; list them with GET /v1/monitors")
        return row

    def _frozen(self, session: Session, row: Monitor) -> ResolvedMonitor:
        """The monitor as charged, rebuilt from its stored calibration; refused if the data no longer fits it."""
        stored = session.get(MonitorCalibration, row.id)
        if stored is None:
            raise QueryError("monitor", f"monitor '{row.name}' has no stored calibration (it was defined before "
                             "calibrations were kept), so what its charge covered is unknown and no batch is "
                             "accepted", "Define a new monitor")
        spec = parse_monitor(json.loads(row.definition_json))
        metadata = registry.metadata_of(registry.get(session, row.dataset))
        return frozen_monitor(spec, Calibration.from_json(stored.calibration_json), metadata, row.loss_micro)

    def get(self, name: str) -> Monitor:
        with Session(reader(self.db)) as session:
            return self._get(session, name)

    def list(self, agency: str | None = None) -> list[Monitor]:
        with Session(reader(self.db)) as session:
            query = select(Monitor).order_by(Monitor.id)
            if agency is not None:
                query = query.where(Monitor.agency == agency)
            return list(session.exec(query))

    def releases(self, name: str, after_step: int = -1) -> list[MonitorRelease]:
        with Session(reader(self.db)) as session:
            row = self._get(session, name)
            return list(session.exec(select(MonitorRelease).where(MonitorRelease.monitor_id == row.id,
                                                                  MonitorRelease.step > after_step)
                                     .order_by(MonitorRelease.step)))

    def alerts(self, name: str, after_id: int = 0) -> list[MonitorAlert]:
        with Session(reader(self.db)) as session:
            row = self._get(session, name)
            return list(session.exec(select(MonitorAlert).where(MonitorAlert.monitor_id == row.id,
                                                                MonitorAlert.id > after_id)
                                     .order_by(MonitorAlert.id)))

    def is_subscribed(self, name: str, account: str) -> bool:
        with Session(reader(self.db)) as session:
            row = self._get(session, name)
            return session.exec(select(MonitorSubscription).where(
                MonitorSubscription.monitor_id == row.id, MonitorSubscription.account == account)).first() is not None

    # -- defining ----------------------------------------------------------------------

    def define(self, caller: Caller, raw: Any) -> Monitor:
        spec = parse_monitor(raw)
        now = datetime.now(timezone.utc)
        with session_scope(self.db) as session:
            metadata = registry.metadata_of(registry.get(session, spec.dataset))
            monitor = resolve_monitor(spec, metadata)
            calibration = Calibration.of(monitor, metadata)
            if session.exec(select(Monitor).where(Monitor.name == spec.name)).first() is not None:
                raise Conflict(f"a monitor named '{spec.name}' exists already; choose another name")
            loss = metadata.accounting.rule.charge_of(monitor.loss)  # the dataset's ledger unit
            row = Monitor(name=spec.name, dataset=spec.dataset, agency=spec.agency or caller.agency,
                          definition_json=canonical_json(spec.canonical()), start=_aware(monitor.start),
                          step_seconds=monitor.step_seconds, horizon=spec.horizon, loss_micro=loss,
                          created_by=caller.name)
            session.add(row)
            session.flush()
            session.add(MonitorCalibration(monitor_id=row.id or 0, metadata_version=calibration.metadata_version,
                                           fingerprint=calibration.fingerprint,
                                           calibration_json=calibration.to_json()))
            try:
                charges = ledger.charge(session, spec.dataset, monitor_scopes(now), loss, defaults=self.caps,
                                        account_id=caller.account_id)
            except ledger.BudgetRefused as refused:
                refusal = refused
            else:
                refusal = None
                record(session, caller, Action.MONITOR_MANAGE.value, f"monitor:{spec.name}", dataset=spec.dataset,
                       event="monitor.define", definition=spec.canonical(), loss_micro=loss,
                       levels={k: t.levels for k, t in monitor.trees.items()}, calibration=calibration.summary(),
                       ledger=[{"budget_id": c.budget_id, "before_micro": c.spent_before_micro,
                                "after_micro": c.spent_after_micro} for c in charges])
            if refusal is not None:
                raise refusal
        return self.get(spec.name)

    def record_refusal(self, caller: Caller, name: str, reason: str, event: str) -> None:
        with session_scope(self.db) as session:
            record(session, caller, Action.MONITOR_MANAGE.value, f"monitor:{name}", "refused", reason=reason,
                   event=event)

    def subscribe(self, caller: Caller, name: str, callback_url: str | None) -> dict[str, Any]:
        with session_scope(self.db) as session:
            row = self._get(session, name)
            existing = session.exec(select(MonitorSubscription).where(
                MonitorSubscription.monitor_id == row.id, MonitorSubscription.account == caller.name)).first()
            sub = existing or MonitorSubscription(monitor_id=row.id or 0, account=caller.name)
            sub.callback_url = callback_url
            session.add(sub)
            record(session, caller, Action.MONITOR_SUBSCRIBE.value, f"monitor:{name}", event="monitor.subscribe",
                   callback=bool(callback_url))
            return {"monitor": name, "account": caller.name, "callback_url": callback_url}

    def deactivate(self, caller: Caller, name: str) -> Monitor:
        with session_scope(self.db) as session:
            row = self._get(session, name)
            row.active = False
            session.add(row)
            record(session, caller, Action.MONITOR_MANAGE.value, f"monitor:{name}", event="monitor.deactivate")
        return self.get(name)

    # -- batches -----------------------------------------------------------------------

    def folder(self, monitor_id: int) -> Path:
        return self.state_dir / "monitors" / str(monitor_id)

    def append(self, caller: Caller, name: str, data: bytes, start: datetime, end: datetime) -> dict[str, Any]:
        """Accept one batch and release the steps it completes; raises QueryError on a bad batch."""
        if len(data) > MAX_BATCH_BYTES:
            raise QueryError("batch", f"a batch may have at most {MAX_BATCH_BYTES} bytes", "Split it")
        try:
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - any unreadable body is the same refusal
            raise QueryError("batch", "the body is not a readable Parquet file",
                             "Send the batch as Parquet bytes (Content-Type: application/octet-stream)") from None
        with Session(reader(self.db)) as session:
            row = self._get(session, name)
        assert row.id is not None
        with _lock(row.id):
            with Session(reader(self.db)) as session:
                row = self._get(session, name)  # fresh: covered_until may have moved
                if not row.active:
                    raise QueryError("monitor", f"monitor '{name}' is no longer active", "Define a new monitor")
                monitor = self._frozen(session, row)
            check_batch(monitor, frame, start, end, _naive(row.covered_until))
            return self._accept(caller, row, monitor, frame, data, _naive(start), _naive(end))  # type: ignore[arg-type]

    def _accept(self, caller: Caller, row: Monitor, monitor: ResolvedMonitor, frame: pl.DataFrame, data: bytes,
                start: datetime, end: datetime) -> dict[str, Any]:
        folder = self.folder(row.id or 0)
        with Session(reader(self.db)) as session:
            batches = list(session.exec(select(MonitorBatch).where(MonitorBatch.monitor_id == row.id)
                                        .order_by(MonitorBatch.seq)))
            nodes = {(n.level, n.index): json.loads(n.values_json) for n in session.exec(
                select(MonitorNode).where(MonitorNode.monitor_id == row.id))}
        seq = len(batches) + 1
        committed = [(b.seq, b.path) for b in batches]
        remove_stale(folder, committed)  # e.g. an attempt killed before a retry committed its seq
        attempt = Attempt.new(folder, seq)
        path = attempt.batch
        try:
            write_atomic(path, data)
            first, last = row.released_steps, monitor.complete_steps(end) - 1
            released, new_nodes = release(monitor, batches, attempt, first, last, nodes)
            with session_scope(self.db) as session:
                # Another server process may have accepted a batch since this one read the monitor (the
                # lock above holds in this process only): the row is locked (PostgreSQL; SQLite's write
                # lock holds already) and must still be what the batch was checked and computed against.
                stored = session.exec(select(Monitor).where(Monitor.id == row.id).with_for_update()).one()
                if (_naive(stored.covered_until) != _naive(row.covered_until)
                        or stored.released_steps != row.released_steps or not stored.active):
                    raise Conflict(_CONCURRENT.format(name=row.name))
                batch = MonitorBatch(monitor_id=row.id or 0, seq=seq, start=_aware(start), end=_aware(end),  # type: ignore[arg-type]
                                     rows=frame.height, path=str(path), sha256=hashlib.sha256(data).hexdigest())
                session.add(batch)
                for (level, index), values in new_nodes.items():
                    session.add(MonitorNode(monitor_id=row.id or 0, level=level, index=index,
                                            values_json=canonical_json(values)))
                alerts: list[MonitorAlert] = []
                for step, rows in released:
                    session.add(MonitorRelease(monitor_id=row.id or 0, step=step,
                                               step_start=_aware(monitor.step_start(step)),  # type: ignore[arg-type]
                                               rows_json=canonical_json(rows)))
                    for index, rule, hit in fired(monitor, rows):
                        value = hit["value"] if rule.on == "step" else hit["running_value"]
                        low = hit["ci_low"] if rule.on == "step" else hit["running_ci_low"]
                        high = hit["ci_high"] if rule.on == "step" else hit["running_ci_high"]
                        alerts.append(MonitorAlert(monitor_id=row.id or 0, step=step,
                                                   step_start=_aware(monitor.step_start(step)),  # type: ignore[arg-type]
                                                   rule=index, rule_text=rule.text(monitor.spec.metric),
                                                   group=str(hit["group"]), value=float(value), ci_low=float(low),
                                                   ci_high=float(high)))
                session.add_all(alerts)
                stored.covered_until = _aware(end)
                stored.released_steps = max(stored.released_steps, last + 1)
                if stored.released_steps >= stored.horizon:
                    stored.active = False
                session.add(stored)
                session.flush()
                target = f"monitor:{row.name}"
                # One entry for the request: the batch, each step it released and each alert.
                record(session, caller, Action.MONITOR_MANAGE.value, target, event="monitor.batch",
                       dataset=row.dataset, seq=seq, start=start.isoformat(), end=end.isoformat(),
                       sha256=batch.sha256, loss_micro=0,
                       releases=[{"step": step, "result_hash": hashlib.sha256(canonical_json(rows).encode()).hexdigest()}
                                 for step, rows in released],
                       alerts=[{"step": a.step, "rule_index": a.rule, "rule_text": a.rule_text, "group": a.group,
                                "value": a.value, "ci_low": a.ci_low, "ci_high": a.ci_high} for a in alerts])
                alert_out = [alert_dict(a, row.name) for a in alerts]
        except IntegrityError:  # the same batch number committed by another process first
            attempt.remove()
            raise Conflict(_CONCURRENT.format(name=row.name)) from None
        except Exception:
            attempt.remove()  # the batch was not accepted: leave no file of this attempt behind
            if self._taken(row.id or 0, seq):  # its files were removed as stale by the process that won
                raise Conflict(_CONCURRENT.format(name=row.name)) from None
            raise
        except BaseException:
            attempt.remove()
            raise
        remove_stale(folder, [*committed, (seq, str(path))])  # e.g. the files of a killed attempt at this seq
        self._deliver(row, alert_out)
        return {"monitor": row.name, "seq": seq, "rows": frame.height, "released_steps": [s for s, _ in released],
                "alerts": alert_out}

    def _taken(self, monitor_id: int, seq: int) -> bool:
        """Whether batch ``seq`` of the monitor has been committed (by another attempt)."""
        with Session(reader(self.db)) as session:
            return session.exec(select(MonitorBatch.id).where(MonitorBatch.monitor_id == monitor_id,
                                                              MonitorBatch.seq == seq)).first() is not None

    # -- delivery ----------------------------------------------------------------------

    def _deliver(self, row: Monitor, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        with Session(reader(self.db)) as session:
            targets = [(s.account, s.callback_url) for s in session.exec(
                select(MonitorSubscription).where(MonitorSubscription.monitor_id == row.id)) if s.callback_url]
        if targets:
            threading.Thread(target=self._post_all, args=(row.name, targets, alerts), daemon=True).start()

    def _post_all(self, name: str, targets: list[tuple[str, str]], alerts: list[dict[str, Any]]) -> None:
        import httpx

        for account, url in targets:
            try:
                response = httpx.post(url, json={"monitor": name, "alerts": alerts}, timeout=CALLBACK_TIMEOUT)
                outcome, detail = ("allowed", {"status": response.status_code}) if response.status_code < 400 else (
                    "error", {"status": response.status_code})
            except httpx.HTTPError as exc:
                outcome, detail = "error", {"reason": type(exc).__name__}
            try:
                with session_scope(self.db) as session:
                    record(session, None, Action.MONITOR_SUBSCRIBE.value, f"monitor:{name}", outcome,
                           event="monitor.alert_delivery", account=account, alerts=len(alerts), **detail)
            except Exception:  # noqa: BLE001 - delivery bookkeeping never breaks the server
                pass


def alert_dict(alert: MonitorAlert, monitor: str) -> dict[str, Any]:
    return {"id": alert.id, "monitor": monitor, "step": alert.step,
            "step_start": _aware(alert.step_start).isoformat(),  # type: ignore[union-attr]
            "rule": alert.rule, "rule_text": alert.rule_text, "group": alert.group,
            "value": alert.value, "ci_low": alert.ci_low, "ci_high": alert.ci_high}


def monitor_dict(row: Monitor) -> dict[str, Any]:
    return {"name": row.name, "dataset": row.dataset, "agency": row.agency,
            "definition": json.loads(row.definition_json),
            "loss": {"epsilon": row.loss_micro / 1_000_000, "delta": 0.0},
            "start": _aware(row.start).isoformat(), "step_seconds": row.step_seconds,  # type: ignore[union-attr]
            "horizon": row.horizon, "released_steps": row.released_steps,
            "covered_until": _aware(row.covered_until).isoformat() if row.covered_until else None,
            "active": row.active, "created_by": row.created_by,
            "created_at": _aware(row.created_at).isoformat()}  # type: ignore[union-attr]


def release_dict(release: MonitorRelease) -> dict[str, Any]:
    return {"step": release.step, "step_start": _aware(release.step_start).isoformat(),  # type: ignore[union-attr]
            "rows": json.loads(release.rows_json)}


__all__ = ["MonitorService", "alert_dict", "monitor_dict", "release_dict"]
