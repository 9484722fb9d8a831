"""What a monitor was calibrated on, frozen when it is defined and charged.

A monitor's loss is charged once, at definition, for trees whose noise was calibrated
on the dataset's metadata of that moment: the contribution bound ``L`` over the
horizon, the measured column's bounds and resolution (hence the quantised ``unit`` of
one value), the group column's public keys, the privacy-unit column, and the noise
scales that follow. A :class:`Calibration` keeps all of it, with the metadata version
and a fingerprint. Batches rebuild the trees only from it (the stored noise scales
included, nothing refitted), so re-registering the dataset can never make a monitor
keep more rows per person, or noise sums in other units, than its charge assumed.

A batch is still refused when the dataset's current metadata differs in anything the
calibration depends on (:func:`frozen_monitor`): the batch would come from data the
monitor was not calibrated for, and a new monitor is needed. Changes the calibration
does not depend on (a description, another column's keys, a longer time range) do not
stop a monitor. Everything here is public: it is derived from the metadata and the
definition, never from data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from civicdp.privacy.accounting import PURE, Accounting
from civicdp.privacy.continual import TreeCounter
from civicdp.privacy.errors import PrivacyError
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata, TableMeta
from civicdp.queries.monitor_spec import MonitorSpec, ResolvedMonitor
from civicdp.queries.monitoring import resolve_monitor

FORMAT = 1
_NEW = "Define a new monitor for the dataset's current version (its loss is charged anew)"


def _canonical(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _columns(monitor: ResolvedMonitor, metadata: DatasetMetadata) -> dict[str, dict[str, Any]]:
    """The declarations of the columns the monitor reads, as far as its calibration depends on them."""
    spec, table = monitor.spec, metadata.tables[monitor.spec.table]
    out: dict[str, dict[str, Any]] = {}
    for name in (monitor.unit_column, spec.time, spec.group_by):
        if name is not None:
            out[name] = {"type": table.columns[name].type, "nullable": table.columns[name].nullable}
    if spec.column is not None:  # its bounds and resolution are the calibration's own entries
        out[spec.column] = {"type": table.columns[spec.column].type, "nullable": table.columns[spec.column].nullable}
    return out


@dataclass(frozen=True)
class Calibration:
    """A monitor's frozen calibration (a JSON document; see the module docstring)."""

    document: dict[str, Any]

    @classmethod
    def of(cls, monitor: ResolvedMonitor, metadata: DatasetMetadata) -> Calibration:
        document = {"format": FORMAT, "dataset": metadata.name, "metadata_version": metadata.version,
                    "table": monitor.spec.table, "privacy_unit": monitor.unit_column,
                    "contributions": monitor.contributions, "keys": list(monitor.keys),
                    "lower": monitor.lower, "upper": monitor.upper, "resolution": monitor.resolution,
                    "unit": monitor.unit, "columns": _columns(monitor, metadata),
                    "trees": {name: tree.as_dict() for name, tree in monitor.trees.items()}}
        return cls(json.loads(_canonical(document)))  # exactly what a stored copy reads back as

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise QueryError("monitor", "the monitor's stored calibration is in an unknown format", _NEW)
        return cls(document)

    def to_json(self) -> str:
        return _canonical(self.document)

    @property
    def metadata_version(self) -> str:
        return str(self.document["metadata_version"])

    def basis(self) -> dict[str, Any]:
        """What a batch's data must still fit: all but the version label and the fitted noise scales."""
        basis = {k: v for k, v in self.document.items() if k != "metadata_version"}
        basis["trees"] = {name: {k: v for k, v in tree.items() if k != "scale"}
                          for name, tree in self.document["trees"].items()}
        return basis

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(self.basis()).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """For the audit log: what the charge assumed (keys only counted, they may be many)."""
        d = self.document
        return {"metadata_version": d["metadata_version"], "fingerprint": self.fingerprint,
                "contributions": d["contributions"], "groups": len(d["keys"]), "lower": d["lower"],
                "upper": d["upper"], "resolution": d["resolution"], "unit": d["unit"],
                "scales": {name: tree["scale"] for name, tree in d["trees"].items()}}

    def differences(self, other: Calibration) -> list[str]:
        """Plain words for what differs between this calibration's basis and ``other``'s."""
        if self.fingerprint == other.fingerprint:
            return []
        mine, theirs = self.basis(), other.basis()
        out = []
        for key in sorted(set(mine) | set(theirs)):
            a, b = mine.get(key), theirs.get(key)
            if a == b:
                continue
            if key == "contributions":
                out.append(f"contributions per person (L) {a} -> {b}")
            elif key == "keys":
                out.append(f"the public keys of the group column ({len(a or [])} -> {len(b or [])} keys)")
            elif key == "lower" or (key == "upper" and mine.get("lower") == theirs.get("lower")):
                out.append(f"the measured column's bounds [{mine['lower']:g}, {mine['upper']:g}] -> "
                           f"[{theirs['lower']:g}, {theirs['upper']:g}]")
            elif key == "resolution":
                out.append(f"the measured column's resolution {a:g} -> {b:g}")
            elif key == "columns":
                changed = sorted(n for n in set(a or {}) | set(b or {}) if (a or {}).get(n) != (b or {}).get(n))
                out.append(f"the declaration of column(s) {changed}")
            elif key not in ("unit", "trees"):  # both follow from the differences above
                out.append(f"{key} {a!r} -> {b!r}")
        return out or ["the noise calibration"]

    def monitor(self, spec: MonitorSpec, table: TableMeta, charged_micro: int,
                accounting: Accounting = PURE) -> ResolvedMonitor:
        """The monitor rebuilt from this calibration alone; refused if it would spend beyond ``charged_micro``.

        ``table`` (the dataset's current declaration) serves only to check a batch's schema.
        """
        d = self.document
        try:
            trees = {name: TreeCounter.restore(**tree) for name, tree in d["trees"].items()}
        except (PrivacyError, TypeError) as exc:
            raise QueryError("monitor", f"the monitor's stored calibration is not usable ({exc})", _NEW) from None
        expected_units = {"counts": 1, "above": 1, "sums": d["unit"]}
        if any(t.horizon != spec.horizon or t.contributions != d["contributions"]
               or t.unit != expected_units.get(name) for name, t in trees.items()):
            raise QueryError("monitor", "the monitor's stored calibration does not match its definition", _NEW)
        monitor = ResolvedMonitor(spec, table, d["privacy_unit"], tuple(d["keys"]), d["contributions"], trees,
                                  float(d["lower"]), float(d["upper"]), float(d["resolution"]), int(d["unit"]))
        if not trees or accounting.charge_of(monitor.loss) > charged_micro:
            raise QueryError("monitor", f"the monitor's stored calibration would spend more than the "
                             f"{accounting.shown(charged_micro)['epsilon']:g} epsilon it was charged", _NEW)
        return monitor


def frozen_monitor(spec: MonitorSpec, calibration: Calibration, metadata: DatasetMetadata,
                   charged_micro: int) -> ResolvedMonitor:
    """The monitor as it was charged, for a batch of the dataset as it is now registered.

    Refused (QueryError, nothing read) when the current metadata no longer gives the same
    calibration: the monitor's charge covers only the data it was calibrated for.
    """
    version = calibration.metadata_version
    was = f"monitor '{spec.name}' was defined and charged on version {version} of dataset '{spec.dataset}'"
    try:
        now = Calibration.of(resolve_monitor(spec, metadata), metadata)
    except QueryError as exc:
        raise QueryError("dataset", f"{was}; on version {metadata.version} its definition no longer fits "
                         f"({exc.field}: {exc.problem}), so no batch is accepted", _NEW) from None
    differences = calibration.differences(now)
    if now.fingerprint != calibration.fingerprint:
        raise QueryError("dataset", f"{was}; version {metadata.version} changed what the monitor was "
                         f"calibrated on ({'; '.join(differences)}), so no batch is accepted: the data no "
                         "longer fits the calibration its loss was charged for", _NEW)
    return calibration.monitor(spec, metadata.tables[spec.table], charged_micro, metadata.accounting.rule)
