"""The neighbouring-data harness (issue 11): D, and D plus one adversarial person.

SECURITY.md promises that adding or removing one person changes every released answer's
distribution by at most ``exp(epsilon)``, *whatever the data holds*. This module builds
the datasets and the instrument that check it:

- **D** is the small service-events dataset of ``tests/queries/perf_data.py`` (events,
  processing steps and the public catalogue, written as Parquet + metadata.json);
- **D'** is D plus one new person whose rows are adversarial (:data:`ADVERSARIES`):
  NaN, +inf, -inf, values far outside the declared bounds, values that maximise the
  worst-case sum, key values that spell a boolean, keys outside the public key set,
  1,000 rows, event ids that other people's rows already use, and 1,000 rows without a
  person id;
- :class:`NoiseRemoved` replaces the only noise in civicdp — the ``release`` methods of
  ``civicdp.privacy.mechanisms.LaplaceVector`` and ``NoisyMin`` — by the exact input (Laplace)
  and a deterministic argmin (selections), and records every call: the mechanism's
  declared sensitivity and scale and the exact vector it would have noised.

Run on D, then on D' **coupled** to D: in the D' run every mechanism returns what the
same call returned on D (its input is still recorded). That is the coupling of the
adaptive-composition proof: a later mechanism whose calibration depends on an earlier
release (a privately chosen contribution bound, the levels of a quantile's interval
endpoints, the chosen pairs per person) sees the same earlier release on both datasets,
so its two inputs can be compared. :func:`compare` then checks, for every mechanism, that
the inputs on D and D' differ by at most its declared sensitivity — L1 for discrete
Laplace, L-infinity for permute-and-flip — summed over the calls that share one charge
(the cells of a quantile level, the nodes of a monitor's tree), and that both runs made
the same calls (the same mechanisms, in the same order, on vectors of the same length).

:func:`harness_table` runs every query of :data:`QUERIES` against every adversary and
returns the rows (query, adversary, part, observed change, declared sensitivity) for a
closing note; the tests in ``tests/privacy/test_neighbouring.py`` assert them.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.continual import TreeCounter
from civicdp.privacy.mechanisms import LaplaceVector, NoisyMin
from civicdp.queries.analyses.bundles import BundlesPlan
from civicdp.queries.analyses.lagged import LaggedPlan
from civicdp.queries.analyses.performance import ReportPlan
from civicdp.queries.analyses.scores import ScoresPlan
from civicdp.queries.engine import Engine, Plan
from civicdp.queries.kinds import KINDS
from civicdp.queries.metadata import load_metadata
from tests.queries import perf_data

PEOPLE = 300
SEED = 11
ADVERSARY_ID = 9_000_000  # a person id no one in D has
EVENT_ID_START = 9_000_000  # event ids no one in D has
INT64_MAX = 2**63 - 1

# -- the questions ----------------------------------------------------------------------

#: One question per aggregate kind and per analysis, every one within an analyst's
#: per-query cap (epsilon 0.5), so the HTTP tests can ask them too.
QUERIES: dict[str, dict[str, Any]] = {
    # count: the example's privately chosen contribution bound (examples/count_by_service.json)
    "count": {"aggregate": "count", "group_by": ["service_id"], "epsilon": 0.3, "contributions": "auto"},
    "sum": {"aggregate": "sum", "column": "duration_hours", "group_by": ["department"], "epsilon": 0.3},
    "mean": {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["channel"], "epsilon": 0.3},
    "quantiles": {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5, 0.9],
                  "candidates": {"start": 0, "stop": 240, "step": 0.5}, "group_by": ["channel"],
                  "epsilon": 0.3, "contributions": 3},
    "histogram": {"aggregate": "histogram", "column": "duration_hours", "bins": [0, 4, 8, 16, 48, 720],
                  "group_by": ["channel"], "epsilon": 0.3},
    # a count by a time bucket, with filters (re-ranking after the filter), at a target accuracy
    "count_filtered_by_month": {"aggregate": "count", "group_by": ["request_time:month"],
                                "filters": [{"column": "channel", "op": "in", "values": ["counter", "web"]},
                                            {"column": "request_time", "op": "between", "start": "2025-01-01",
                                             "end": "2025-07-01"}],
                                "accuracy": 100, "confidence": 0.95, "contributions": 10},
    # examples/performance_report.json at the analyst's cap: a period, so every part re-ranks
    "performance_report": {"analysis": "performance_report", "epsilon": 0.5,
                           "period": {"start": "2025-01-01T00:00:00", "end": "2025-07-01T00:00:00"}},
    "lagged_points": {"analysis": "lagged_points", "epsilon": 0.5, "statistic": "median", "target_factor": 1.5},
    "department_scores": {"analysis": "department_scores", "epsilon": 0.5, "contributions": 3,
                          "expected": "target"},
    "bundles": {"analysis": "bundles", "window_days": 30, "top_k": 20, "epsilon": 0.5},
    "bundles_top_pairs": {"analysis": "bundles", "window_days": 30, "top_k": 10, "epsilon": 0.5,
                          "max_pairs_rule": "top_pairs"},
    "bundle_changes": {"analysis": "bundle_changes", "window_days": 30, "top_k": 20, "epsilon": 0.5,
                       "baseline": {"start": "2025-01-01", "end": "2025-07-01"},
                       "period": {"start": "2025-07-01", "end": "2026-01-01"}},
}

#: Queries that read a table linked to its person through another (steps through events).
READS_LINKED_TABLE = frozenset({"lagged_points"})

# -- the adversarial person -------------------------------------------------------------


@dataclass(frozen=True)
class Adversary:
    """What the one added person's rows hold.

    ``service`` None: the rows cycle through the public catalogue (so the person has
    every pair); ``department`` None: the service's own. ``step_end`` gives the end of
    each processing step: ``"normal"`` (40% / 100% of the duration after the request),
    ``"null"``, or a fixed (absurd) time.
    """

    name: str
    text: str
    rows: int = perf_data.MAX_CONTRIBUTIONS + 2  # more than L, so bounding has work to do
    duration: float = 5.0
    waiting: float | None = 10.0
    satisfaction: int | None = 3
    service: str | None = None
    department: str | None = None
    channel: str = "counter"
    step_end: str | datetime = "normal"
    shared_event_ids: bool = False
    person_id: int | None = ADVERSARY_ID


UPPER_DURATION = 720.0  # perf_data: duration_hours bounds [0, 720]
UPPER_WAITING = 240.0  # waiting_minutes bounds [0, 240]

ADVERSARIES: dict[str, Adversary] = {a.name: a for a in [
    Adversary("nan", "NaN in every float column (a null satisfaction, no step end)",
              duration=math.nan, waiting=math.nan, satisfaction=None, step_end="null"),
    Adversary("pos_inf", "+inf in every float column, the largest int64 satisfaction, steps ending in 2200",
              duration=math.inf, waiting=math.inf, satisfaction=INT64_MAX, step_end=datetime(2200, 1, 1)),
    Adversary("neg_inf", "-inf in every float column, the smallest int64 satisfaction, steps ending in 1900",
              duration=-math.inf, waiting=-math.inf, satisfaction=-INT64_MAX - 1, step_end=datetime(1900, 1, 1)),
    Adversary("far_out_of_bounds", "1e300 hours, -1e300 minutes, satisfaction 10^12, steps ending in 3000",
              duration=1e300, waiting=-1e300, satisfaction=10**12, step_end=datetime(3000, 1, 1)),
    Adversary("worst_case_sum", "every row in one cell at the upper bounds (720 h, 240 min, satisfaction 5)",
              duration=UPPER_DURATION, waiting=UPPER_WAITING, satisfaction=5, service="S1"),
    Adversary("boolean_key", "key columns holding booleans' spellings ('True', 'False', 'true'), satisfaction 0",
              service="True", department="False", channel="true", satisfaction=0),
    Adversary("key_outside_key_set", "service S999, department D99, channel 'fax', satisfaction 9",
              service="S999", department="D99", channel="fax", satisfaction=9),
    Adversary("thousand_rows", "1,000 rows at the upper bounds, over every service within a week",
              rows=1000, duration=UPPER_DURATION, waiting=UPPER_WAITING, satisfaction=5),
    Adversary("event_ids_of_others", "ordinary rows whose event ids are other people's (identifiers are "
              "not checked for uniqueness)", shared_event_ids=True),
    Adversary("null_person_id", "1,000 rows at the upper bounds whose person id is missing (one person, "
              "unidentified)", rows=1000, duration=UPPER_DURATION, waiting=UPPER_WAITING, satisfaction=5,
              person_id=None),
]}


#: D' datasets outside the domain the guarantee covers, which are refused at registration (and
#: by the engine, should their files change afterwards): events reusing other people's event
#: ids make the owner key of steps ambiguous, so a step would count for two people
#: (``queries/integrity.py``). Queries that do not read the linked table are unaffected.
OUTSIDE_DOMAIN = frozenset({"event_ids_of_others"})


def outside_domain(query: str, adversary: str) -> bool:
    """Whether ``query`` on ``adversary``'s D' must be refused rather than answered."""
    return adversary in OUTSIDE_DOMAIN and query in READS_LINKED_TABLE


def adversary_rows(adversary: Adversary, events: pl.DataFrame, steps: pl.DataFrame) -> tuple[pl.DataFrame,
                                                                                               pl.DataFrame]:
    """The added person's events and steps, in the schemas of ``events`` and ``steps``."""
    n = adversary.rows
    services = ([adversary.service] * n if adversary.service is not None
                else [perf_data.SERVICES[i % len(perf_data.SERVICES)] for i in range(n)])
    departments = ([adversary.department] * n if adversary.department is not None
                   else [perf_data.department_of(s) if s in perf_data.SERVICES else "D1" for s in services])
    if adversary.shared_event_ids:
        # one event id of each of n different people of D
        ids = events.group_by("person_id").agg(pl.col("event_id").min()).sort("person_id")["event_id"][:n]
        event_ids = ids.to_numpy().astype(np.int64)
    else:
        event_ids = np.arange(EVENT_ID_START, EVENT_ID_START + n, dtype=np.int64)
    start = datetime(2025, 3, 3, 8)
    times = [start + timedelta(minutes=10 * i) for i in range(n)]  # 1,000 rows span a week
    rows = pl.DataFrame({
        "event_id": event_ids,
        "person_id": pl.Series([adversary.person_id] * n, dtype=pl.Int64),
        "service_id": services,
        "department": departments,
        "channel": [adversary.channel] * n,
        "request_time": pl.Series(times, dtype=pl.Datetime("us")),
        "waiting_minutes": pl.Series([adversary.waiting] * n, dtype=pl.Float64),
        "duration_hours": pl.Series([adversary.duration] * n, dtype=pl.Float64),
        "satisfaction": pl.Series([adversary.satisfaction] * n, dtype=pl.Int64),
    }).select(events.columns).cast(dict(events.schema))  # type: ignore[arg-type]
    if adversary.step_end == "normal":
        hours = adversary.duration if math.isfinite(adversary.duration) else 5.0
        middle = [t + timedelta(hours=0.4 * hours) for t in times]
        end: list[datetime | None] = [t + timedelta(hours=hours) for t in times]
    elif adversary.step_end == "null":
        middle, end = [None] * n, [None] * n
    else:
        middle = end = [adversary.step_end] * n  # type: ignore[list-item]
    first = pl.DataFrame({"event_id": event_ids, "step": np.ones(n, dtype=np.int64),
                          "started": pl.Series(times, dtype=pl.Datetime("us")),
                          "ended": pl.Series(middle, dtype=pl.Datetime("us"))})
    second = pl.DataFrame({"event_id": event_ids, "step": np.full(n, 2, dtype=np.int64),
                           "started": pl.Series(middle, dtype=pl.Datetime("us")),
                           "ended": pl.Series(end, dtype=pl.Datetime("us"))})
    return rows, pl.concat([first, second]).select(steps.columns).cast(dict(steps.schema))  # type: ignore[arg-type]


# -- the datasets -----------------------------------------------------------------------


def write_base(folder: Path, name: str = "nb-base") -> Path:
    """D: perf_data's dataset with :data:`PEOPLE` people, named ``name``."""
    perf_data.write(folder, people=PEOPLE, seed=SEED)
    _rename(folder, name)
    return folder


def write_neighbour(base: Path, folder: Path, adversary: Adversary, name: str | None = None) -> Path:
    """D' = the dataset in ``base`` plus the adversary's rows, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for catalogue in ("services.parquet", "service_steps.parquet"):
        shutil.copy(base / catalogue, folder / catalogue)
    events = pl.read_parquet(base / "events.parquet")
    steps = pl.read_parquet(base / "steps.parquet")
    extra_events, extra_steps = adversary_rows(adversary, events, steps)
    pl.concat([events, extra_events]).write_parquet(folder / "events.parquet")
    pl.concat([steps, extra_steps]).write_parquet(folder / "steps.parquet")
    metadata = json.loads((base / "metadata.json").read_text())
    metadata["name"] = name or f"nb-{adversary.name.replace('_', '-')}"
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return folder


def _rename(folder: Path, name: str) -> None:
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["name"] = name
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))


# -- noise removed, calls recorded ----------------------------------------------------------


@dataclass
class Call:
    """One mechanism call: what it would have noised, and what it returned."""

    label: str
    kind: str  # "laplace" (L1) or "selection" (L-infinity)
    sensitivity: int
    scale: float
    values: list[int]
    output: Any
    endpoint: bool = False  # an interval endpoint's selection, calibrated at release time for its level


@dataclass
class Recording:
    """Every mechanism call of one run, and how the run ended."""

    calls: list[Call] = field(default_factory=list)
    error: BaseException | None = None
    result: Any = None
    mismatches: list[str] = field(default_factory=list)  # replayed calls that did not match
    per_call: bool = False  # each call is charged on its own (see charged_per_call)


class NoiseRemoved:
    """Patch every mechanism's ``release``: no noise, each call recorded (optionally replaying).

    ``labels`` maps ``id(mechanism)`` to a part name (see :func:`mechanism_labels`);
    mechanisms created while the answer is computed (a calibration for a privately chosen
    bound, an interval endpoint's selection, a monitor's trees) are named when they are
    created or first used. With ``replay`` (an earlier recording), call ``i`` returns what
    call ``i`` of the earlier run returned.
    """

    def __init__(self, labels: dict[int, str] | None = None, replay: Recording | None = None,
                 fallback: str = "run-time mechanism") -> None:
        self.labels = dict(labels or {})
        self.replay = replay
        self.fallback = fallback
        self.recording = Recording()
        self._keep: list[Any] = []  # mechanisms named here stay alive, so their ids stay theirs
        self._endpoints: set[int] = set()
        self._unnamed = 0
        self._calibrations = 0
        self._patch: pytest.MonkeyPatch | None = None

    def name(self, mechanism: Any, label: str) -> None:
        self.labels.setdefault(id(mechanism), label)
        self._keep.append(mechanism)

    def _label(self, mechanism: Any) -> str:
        if id(mechanism) not in self.labels:
            self._unnamed += 1
            self.name(mechanism, f"{self.fallback} #{self._unnamed}")
        return self.labels[id(mechanism)]

    def _record(self, mechanism: Any, kind: str, values: list[int], output: Any) -> Any:
        index = len(self.recording.calls)
        call = Call(self._label(mechanism), kind, int(mechanism.sensitivity), float(mechanism.scale), values, output,
                    endpoint=id(mechanism) in self._endpoints)
        if self.replay is not None:
            if index < len(self.replay.calls):
                paired = self.replay.calls[index]
                if (paired.label, paired.kind, len(paired.values)) == (call.label, call.kind, len(call.values)):
                    call.output = paired.output
                else:
                    self.recording.mismatches.append(
                        f"call {index}: D made {paired.kind} '{paired.label}' on {len(paired.values)} values, "
                        f"D' made {call.kind} '{call.label}' on {len(call.values)}")
            else:
                self.recording.mismatches.append(f"call {index}: D' made an extra call ({call.kind} '{call.label}')")
        self.recording.calls.append(call)
        return call.output

    def __enter__(self) -> NoiseRemoved:
        harness = self
        self._patch = patch = pytest.MonkeyPatch()

        def laplace(mechanism: LaplaceVector, values: Any) -> list[int]:
            exact = [int(v) for v in values]  # as the real release converts them
            return list(harness._record(mechanism, "laplace", exact, list(exact)))

        def select(mechanism: NoisyMin, scores: Any) -> int:
            exact = [int(s) for s in scores]
            if not exact:
                raise ValueError("selection needs at least one candidate")
            best = min(range(len(exact)), key=exact.__getitem__)  # the first lowest score
            return int(harness._record(mechanism, "selection", exact, best))

        tree_release = TreeCounter.release

        def tree(counter: TreeCounter, exact: Any) -> list[int]:
            harness.name(counter.mechanism, f"tree nodes (unit {counter.unit})")
            return tree_release(counter, exact)

        patch.setattr(LaplaceVector, "release", laplace)
        patch.setattr(NoisyMin, "release", select)
        patch.setattr(TreeCounter, "release", tree)
        for kind in KINDS.values():
            # Calibrations this harness did not see planned (a bound chosen at run time, the
            # server's own plans) are named by kind, role and order: the same on D and D'.
            original = kind.calibrate

            def calibrate(ctx: Any, contributions: int, epsilon: float | None, _original: Any = original,
                          _kind: str = kind.name) -> Any:
                calibration = _original(ctx, contributions, epsilon)
                harness._calibrations += 1
                for role, mechanism in calibration.mechanisms.items():
                    harness.name(mechanism, f"{_kind} {role} (calibration {harness._calibrations})")
                return calibration

            patch.setattr(kind, "calibrate", calibrate)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._patch is not None
        self._patch.undo()


def mechanism_labels(plan: Any) -> tuple[dict[int, str], str]:
    """Part names of a plan's mechanisms (by id) and the name of those made at run time."""
    labels: dict[int, str] = {}
    fallback = "run-time mechanism"

    def calibration(prefix: str, cal: Any) -> None:
        for role, mechanism in cal.mechanisms.items():
            labels[id(mechanism)] = f"{prefix}{role}"

    if isinstance(plan, Plan):
        calibration("", plan.calibration)
        if plan.selector is not None:
            labels[id(plan.selector)] = "contribution bound"
    elif isinstance(plan, ReportPlan):
        for part in plan.parts:
            calibration(f"{part.by}: {part.metric}: ", part.plan.calibration)
    elif isinstance(plan, LaggedPlan):
        for level in plan.levels:
            labels[id(level.mechanism)] = f"{level.name}: cases above / not above"
    elif isinstance(plan, ScoresPlan):
        labels[id(plan.observed_mechanism)] = "observed hours"
        labels[id(plan.expected_mechanism)] = "expected hours"
    elif isinstance(plan, BundlesPlan):
        labels[id(plan.item_mechanism)] = "item counts and people"
        if plan.pair_mechanism is not None:
            labels[id(plan.pair_mechanism)] = "pair counts"
        if plan.selector is not None:
            labels[id(plan.selector)] = "pairs per person"
        fallback = "pair counts (max_pairs chosen at run time)"
    return labels, fallback


def charged_per_call(plan: Any) -> bool:
    """Whether each call of a mechanism is charged on its own (bundle changes: once per period)."""
    return isinstance(plan, BundlesPlan)


def record_run(spec: dict[str, Any], dataset_dir: Path, replay: Recording | None = None,
               engine: Engine | None = None) -> Recording:
    """Plan ``spec`` on the dataset, then execute it with the noise removed; the recording."""
    engine = engine or Engine()
    plan = engine.plan(spec, load_metadata(dataset_dir), Path(dataset_dir))
    labels, fallback = mechanism_labels(plan)
    with NoiseRemoved(labels, replay, fallback) as harness:
        try:
            harness.recording.result = engine.execute(plan)
        except Exception as exc:  # noqa: BLE001 - an error on one side is what the harness reports
            harness.recording.error = exc
    harness.recording.per_call = charged_per_call(plan)
    return harness.recording


@dataclass(frozen=True)
class PartChange:
    """How much one part's exact input moved between D and D', against what it may move."""

    part: str
    kind: str
    calls: int
    observed: float  # L1 (Laplace) or L-infinity (selection) change, summed over the part's calls
    declared: int  # the mechanism's sensitivity (the largest, if its calls differ: see compare)

    @property
    def within(self) -> bool:
        return self.observed <= self.declared


def _distance(kind: str, a: list[int], b: list[int]) -> int:
    # Python integers: a garbage value such as -2**63 must not wrap around.
    gaps = [abs(int(x) - int(y)) for x, y in zip(a, b)]
    if not gaps:
        return 0
    return sum(gaps) if kind == "laplace" else max(gaps)


def structure_differences(d: Recording, d2: Recording) -> list[str]:
    """Why the two runs are not the same private computation (empty when they are)."""
    problems = []
    for which, rec in (("D", d), ("D'", d2)):
        if rec.error is not None:
            problems.append(f"{which} raised {type(rec.error).__name__}: {rec.error}")
    if len(d.calls) != len(d2.calls):
        problems.append(f"D made {len(d.calls)} mechanism calls, D' made {len(d2.calls)}")
    problems.extend(d2.mismatches)
    for i, (a, b) in enumerate(zip(d.calls, d2.calls)):
        if (a.label, a.kind, len(a.values), a.sensitivity, a.scale) != (b.label, b.kind, len(b.values),
                                                                          b.sensitivity, b.scale):
            problems.append(f"call {i}: {a.kind} '{a.label}' ({len(a.values)} values, sensitivity {a.sensitivity},"
                            f" scale {a.scale:g}) on D but {b.kind} '{b.label}' ({len(b.values)} values, "
                            f"sensitivity {b.sensitivity}, scale {b.scale:g}) on D'")
    return list(dict.fromkeys(problems))


def compare(d: Recording, d2: Recording, per_call: bool | None = None) -> list[PartChange]:
    """Per part: the change of its exact inputs from D to D' (coupled runs), and its sensitivity.

    Calls of one mechanism share one charge (a quantile level's cells, a tree's nodes), so
    their changes add up against one sensitivity; with ``per_call`` (bundle changes, whose
    periods are charged one by one) each call stands alone. When a part's calls have
    different sensitivities (an interval endpoint's selections, calibrated per cell for
    their level), each call's change counts in proportion: ``sum(change_i * s_max / s_i)``
    against ``s_max``, the same condition as ``sum(change_i / s_i) <= 1``.
    """
    per_call = d.per_call if per_call is None else per_call
    groups: dict[str, list[tuple[Call, Call]]] = {}
    seen: dict[str, int] = {}
    for a, b in zip(d.calls, d2.calls):
        if a.label != b.label or a.kind != b.kind or a.sensitivity != b.sensitivity:
            continue  # a structural difference: structure_differences() reports it
        key = a.label
        if per_call:
            seen[key] = seen.get(key, 0) + 1
            key = f"{key} [call {seen[key]}]"
        groups.setdefault(key, []).append((a, b))
    out = []
    for key, pairs in groups.items():
        top = max(a.sensitivity for a, _ in pairs)
        observed = sum(_distance(a.kind, a.values, b.values) * top / a.sensitivity for a, b in pairs)
        out.append(PartChange(key, pairs[0][0].kind, len(pairs), observed, top))
    return out


def check_neighbours(spec: dict[str, Any], base: Path, neighbour: Path,
                     base_recording: Recording | None = None) -> tuple[list[PartChange], list[str], Recording]:
    """Run ``spec`` on D (or reuse its recording) and, coupled, on D': (changes, problems, D's recording)."""
    d = base_recording or record_run(spec, base)
    d2 = record_run(spec, neighbour, replay=d)
    return compare(d, d2), structure_differences(d, d2), d


def _plain(value: Any) -> Any:
    """A released value in a comparable form (NaN equal to NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def released(result: Any) -> dict[str, Any]:
    """Everything an answer releases (tables, notes, mechanisms, bound), not its run time."""
    return _plain({"table": result.table.to_dicts(), "columns": result.table.columns,
                   "tables": {name: {"columns": t.columns, "rows": t.to_dicts()} for name, t in result.tables.items()},
                   "notes": list(result.notes), "mechanisms": result.mechanisms,
                   "contributions": result.contributions, "loss": str(result.loss.epsilon)})


def released_differences(d: Recording, d2: Recording) -> list[str]:
    """What the coupled D' answer releases that D's does not (empty: post-processing only).

    In the coupled run every mechanism hands D' the values it handed D, so an answer that
    is computed from the mechanisms' outputs and public metadata alone is identical on D
    and D'. A difference is a value that reached the answer around the noise.
    """
    if d.result is None or d2.result is None:
        return []
    a, b = released(d.result), released(d2.result)
    out = []
    for key in a:
        if a[key] != b[key]:
            out.append(f"{key}: {str(a[key])[:200]} on D, {str(b[key])[:200]} on D'")
    return out


def stated_sensitivities(recording: Recording) -> list[str]:
    """Called mechanisms whose sensitivity the answer's ``mechanisms`` rows do not state."""
    result = recording.result
    if result is None:
        return []
    stated = [int(m["sensitivity"]) for m in result.mechanisms if "sensitivity" in m]
    missing = []
    for call in recording.calls:
        if call.sensitivity in stated:
            continue
        if call.endpoint and call.sensitivity <= max(stated, default=0):
            continue  # an interval endpoint: its row states the largest sensitivity any level has
        missing.append(f"{call.label}: sensitivity {call.sensitivity} is not among the stated {sorted(set(stated))}")
    return list(dict.fromkeys(missing))


Row = tuple[str, str, str, float | str, int | str]  # query, adversary, part, observed change, sensitivity


def format_table(rows: list[Row]) -> str:
    """The harness table as Markdown."""
    lines = ["| query | adversarial person | part | observed change | declared sensitivity |",
             "|---|---|---|---:|---:|"]
    for query, adversary, part, observed, declared in rows:
        shown = f"{observed:.6g}" if isinstance(observed, float) else str(observed)
        lines.append(f"| {query} | {adversary} | {part} | {shown} | {declared} |")
    return "\n".join(lines)


def harness_table(queries: list[str] | None = None, adversaries: list[str] | None = None,
                  folder: Path | None = None, parts: str = "worst") -> list[Row]:
    """Rows (query, adversary, part, observed max change, declared sensitivity) on the current code.

    ``parts="worst"`` keeps each (query, adversary)'s part with the largest change relative
    to its sensitivity; ``"all"`` keeps every part. A run that fails, or whose D' run is not
    the same computation as D's, gets one row with the reason as its observed change.
    Print it with ``print(format_table(harness_table()))``.
    """
    own = folder is None
    root = Path(tempfile.mkdtemp(prefix="civicdp-neighbours-")) if own else Path(folder)  # type: ignore[arg-type]
    try:
        base = write_base(root / "base")
        rows: list[Row] = []
        neighbours = {name: write_neighbour(base, root / name, ADVERSARIES[name])
                      for name in (adversaries or list(ADVERSARIES))}
        for query in queries or list(QUERIES):
            d = record_run(QUERIES[query], base)
            for name, folder_d2 in neighbours.items():
                if outside_domain(query, name):
                    rows.append((query, name, "(outside the domain: refused at registration)", "refused", "-"))
                    continue
                changes, problems, _ = check_neighbours(QUERIES[query], base, folder_d2, d)
                if problems:
                    rows.append((query, name, "(structure)", "; ".join(problems)[:300], "-"))
                    continue
                chosen = changes if parts == "all" else sorted(
                    changes, key=lambda c: c.observed / c.declared, reverse=True)[:1]
                rows.extend((query, name, c.part, c.observed, c.declared) for c in chosen)
        return rows
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def iter_cases() -> Iterator[tuple[str, str]]:
    """Every (query, adversary) pair, for parametrised tests."""
    for query in QUERIES:
        for adversary in ADVERSARIES:
            yield query, adversary
