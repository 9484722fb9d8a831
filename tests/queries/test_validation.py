"""Every invalid spec is refused with a QueryError that names the field and the fix.

No OpenDP, Polars or Pydantic exception may leak, and messages depend only on the
spec and the public metadata, never on the data.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine, LocalDataset
from civicdp.queries.errors import MetadataError, QueryError
from civicdp.queries.metadata import parse_metadata
from civicdp.queries.spec import parse_spec
from tests.conftest import MakeDataset, base_metadata, events_frame

WAIT = {"column": "waiting_minutes"}
EPS = {"epsilon": 0.5}


def _filter(**fields: Any) -> dict[str, Any]:
    return {"aggregate": "count", "epsilon": 0.5, "filters": [fields]}


INVALID: list[tuple[Any, str]] = [
    # what is asked about
    ({"aggregate": "count", "column": "nope", **EPS}, r"^column: unknown column 'nope'\. Use one of \["),
    ({"aggregate": "count", "table": "visits", **EPS}, r"^table: no table 'visits'\. Use one of \['events'\]"),
    ({"aggregate": "sum", "column": "person_id", **EPS}, r"column: 'person_id' is an identifier"),
    ({"aggregate": "sum", **EPS}, r"column: a sum needs a column"),
    ({"aggregate": "median", **EPS}, r"^aggregate: .*'count'.*Use one of count, sum, mean, quantiles, histogram"),
    ({"aggregate": "count", "epsilon": 0.5, "colour": "red"}, r"^colour: Extra inputs are not permitted"),
    ({"dataset": "other", "aggregate": "count", **EPS}, r"dataset: this dataset is 'test-services', not 'other'"),
    # grouping
    ({"aggregate": "count", "group_by": ["remark"], **EPS}, r"group_by\.0: 'remark' has no public key set"),
    ({"aggregate": "count", "group_by": ["nope"], **EPS}, r"group_by\.0: unknown column 'nope'"),
    ({"aggregate": "count", "group_by": ["request_time"], **EPS},
     r"group_by\.0: a time column needs a bucket to group by\. Write e\.g\. 'request_time:day'"),
    ({"aggregate": "count", "group_by": ["request_time:fortnight"], **EPS},
     r"group_by\.0: unknown time bucket 'fortnight'\. Use one of \['hour'"),
    ({"aggregate": "count", "group_by": ["service:hour"], **EPS}, r"'service' is not a time column"),
    ({"aggregate": "count", "group_by": ["service", "service"], **EPS}, r"the same grouping appears twice"),
    # values, bounds and kinds
    ({"aggregate": "sum", "column": "score", **EPS}, r"column: 'score' has no declared bounds"),
    ({"aggregate": "mean", "column": "score", **EPS}, r"column: 'score' has no declared bounds"),
    ({"aggregate": "quantiles", "column": "score", "quantiles": [0.5], **EPS}, r"'score' has no declared bounds"),
    ({"aggregate": "sum", "column": "service", **EPS}, r"column: a sum needs a numeric column"),
    ({"aggregate": "sum", **WAIT, "bounds": [0, 500], **EPS}, r"bounds: must lie within the declared bounds \[0, 100\]"),
    ({"aggregate": "sum", **WAIT, "bounds": [50, 10], **EPS}, r"bounds: bounds must be two finite, increasing numbers"),
    ({"aggregate": "count", "bounds": [0, 10], **EPS}, r"bounds: 'bounds' does not apply to a count"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0, 0.5], **EPS}, r"quantiles: levels must be distinct numbers strictly between 0 and 1"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5, 1.0], **EPS}, r"strictly between 0 and 1"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [1.5], **EPS}, r"strictly between 0 and 1"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5, 0.5], **EPS}, r"levels must be distinct"),
    ({"aggregate": "quantiles", **WAIT, **EPS}, r"quantiles: list the quantile levels"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5], "candidates": [5, 1, 9], **EPS},
     r"candidates: candidates must be finite and strictly increasing"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5], "candidates": [0, 200], **EPS},
     r"candidates: candidates must lie within the bounds \[0, 100\]"),
    ({"aggregate": "histogram", **WAIT, "bins": [0, 50, 20], **EPS}, r"bins: bin edges must be finite and strictly increasing"),
    ({"aggregate": "histogram", **WAIT, "bins": [0, 0, 20], **EPS}, r"bin edges must be finite and strictly increasing"),
    ({"aggregate": "histogram", **WAIT, "bins": [5], **EPS}, r"bins: a histogram needs at least two bin edges"),
    ({"aggregate": "histogram", "column": "remark", "bins": [0, 1], **EPS}, r"column: a histogram needs a numeric column"),
    # privacy loss and accuracy
    ({"aggregate": "count", "epsilon": 0}, r"epsilon: must be a finite number greater than 0, got 0"),
    ({"aggregate": "count", "epsilon": -1}, r"epsilon: must be a finite number greater than 0, got -1"),
    ({"aggregate": "count", "epsilon": math.nan}, r"epsilon: must be a finite number greater than 0, got nan"),
    ({"aggregate": "count", "epsilon": math.inf}, r"epsilon: must be a finite number greater than 0, got inf"),
    ({"aggregate": "count", "epsilon": 11}, r"epsilon: 11\.0 is above the maximum 10\.0 per query"),
    ({"aggregate": "count", "epsilon": "a lot"}, r"^epsilon: Input should be a valid number"),
    ({"aggregate": "count"}, r"epsilon: give a privacy loss 'epsilon' or a target 'accuracy'"),
    ({"aggregate": "count", "epsilon": 0.5, "accuracy": 10}, r"epsilon: give either a privacy loss 'epsilon' or a target 'accuracy', not both"),
    ({"aggregate": "count", "accuracy": 0}, r"accuracy: must be a finite number greater than 0"),
    ({"aggregate": "count", "accuracy": math.inf}, r"accuracy: must be a finite number greater than 0"),
    ({"aggregate": "mean", **WAIT, "accuracy": 5}, r"accuracy: a mean's accuracy depends on how many rows"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5], "accuracy": 5}, r"accuracy: a quantile's accuracy"),
    ({"aggregate": "count", "epsilon": 0.5, "confidence": 1.0}, r"confidence: must be between 0\.5 and 0\.999"),
    # contribution bounds
    ({"aggregate": "count", "epsilon": 0.5, "contributions": 0}, r"contributions: must be between 1 and 20 rows per person, got 0"),
    ({"aggregate": "count", "epsilon": 0.5, "contributions": -3}, r"contributions: must be between 1 and 20 rows per person"),
    ({"aggregate": "count", "epsilon": 0.5, "contributions": 21}, r"contributions: must be between 1 and 20 rows per person, got 21"),
    ({"aggregate": "count", "epsilon": 0.5, "contributions": "lots"}, r'contributions.*Give a whole number of rows per person, or "auto"'),
    ({"aggregate": "count", "accuracy": 5, "contributions": "auto"}, r"contributions: a target accuracy needs a fixed contribution bound"),
    # filters
    (_filter(column="service", op="eq", value="Z"), r"filters\.0\.value: 'Z' is not a public key of 'service'\. Use one of \['A', 'B', 'C'\]"),
    (_filter(column="channel", op="in", values=["web", "fax"]), r"filters\.0\.value: 'fax' is not a public key of 'channel'"),
    (_filter(column="satisfaction", op="eq", value="5"), r"'5' is not a public key of 'satisfaction'"),
    (_filter(column="request_time:hour", op="eq", value=24), r"24 is not a public key of 'request_time:hour'"),
    (_filter(column="remark", op="eq", value="r1"), r"filters\.0: 'remark' is not a public column and cannot be filtered on"),
    (_filter(column="nope", op="eq", value=1), r"filters\.0: unknown column 'nope'"),
    (_filter(column="service", op="in", values=[]), r"filters\.0\.values: an 'in' filter needs a non-empty list"),
    (_filter(column="service", op="eq"), r"filters\.0\.value: an 'eq' filter needs a value"),
    (_filter(column="service", op="like", value="A"), r"filters\.0\.op: Input should be 'eq', 'in' or 'between'"),
    (_filter(column="service", op="between", start="2025-01-01"), r"'between' applies to time columns and 'service' is not one"),
    (_filter(column="request_time", op="between"), r"filters\.0: a time range needs a start, an end, or both"),
    (_filter(column="request_time", op="between", start="2025-03-01", end="2025-02-01"),
     r"filters\.0: the time range starts \(2025-03-01 00:00:00\) at or after it ends \(2025-02-01 00:00:00\)"),
    (_filter(column="request_time", op="between", start="2025-03-01", end="2025-03-01"), r"at or after it ends"),
    (_filter(column="request_time", op="between", start="2026-01-01", end="2026-02-01"),
     r"filters\.0: the time range lies outside the dataset's period 2025-01-01 00:00:00 to 2025-07-01 00:00:00"),
    (_filter(column="request_time", op="between", end="2024-06-01"), r"lies outside the dataset's period"),
    (_filter(column="request_time", op="eq", value="2025-01-01"), r"filters\.0: 'request_time' is a time column\. Filter it with op 'between'"),
    (_filter(column="request_time", op="between", start="yesterday"), r"^filters\.0\.start: Input should be a valid datetime"),
    (_filter(column="satisfaction", op="eq", value=True), r"True is not a public key of 'satisfaction'"),
    (_filter(column="request_time:hour", op="between", start="2025-02-01"), r"^filters\.0: .*'request_time:hour'"),
    ({"aggregate": "quantiles", **WAIT, "quantiles": [0.5], "candidates": [], **EPS}, r"^candidates: "),
    # the document itself
    ([{"aggregate": "count"}], r"^spec: a query must be a JSON object"),
    (42, r"^spec: a query must be a JSON object"),
    ('{"aggregate": "count", ', r"^spec: not valid JSON \(.* at line 1\)\. Send the query as a JSON object"),
    ('["count"]', r"^spec: a query must be a JSON object"),
    ("", r"^spec: not valid JSON"),
]
IDS = [
    "unknown-column", "unknown-table", "identifier-column", "sum-without-column", "unknown-aggregate",
    "extra-field", "other-dataset",
    "group-without-keys", "group-unknown-column", "group-datetime-without-bucket", "unknown-bucket",
    "bucket-on-non-time", "duplicate-grouping",
    "sum-without-bounds", "mean-without-bounds", "quantiles-without-bounds", "sum-of-text",
    "bounds-wider-than-declared", "bounds-decreasing", "bounds-on-count",
    "quantile-zero", "quantile-one", "quantile-above-one", "quantile-duplicate", "quantiles-missing",
    "candidates-decreasing", "candidates-outside-bounds",
    "bins-decreasing", "bins-repeated", "bins-single-edge", "histogram-of-text",
    "epsilon-zero", "epsilon-negative", "epsilon-nan", "epsilon-inf", "epsilon-above-maximum",
    "epsilon-text", "neither-epsilon-nor-accuracy", "both-epsilon-and-accuracy", "accuracy-zero",
    "accuracy-inf", "mean-accuracy", "quantile-accuracy", "confidence-one",
    "contributions-zero", "contributions-negative", "contributions-above-limit", "contributions-text",
    "auto-with-accuracy",
    "filter-unknown-key", "filter-in-unknown-key", "filter-key-of-wrong-type", "filter-hour-out-of-range",
    "filter-non-public", "filter-unknown-column", "filter-in-empty", "filter-eq-without-value",
    "filter-unknown-op", "filter-between-on-keys", "filter-between-unbounded", "filter-start-after-end",
    "filter-empty-range", "filter-after-period", "filter-before-period", "filter-eq-on-time",
    "filter-bad-date", "filter-bool-on-int-keys", "filter-between-on-hour-bucket", "candidates-empty",
    "spec-list", "spec-number", "spec-invalid-json", "spec-json-list", "spec-empty-string",
]
assert len(IDS) == len(INVALID)


def _refusal(engine: Engine, dataset: LocalDataset, spec: Any, match: str) -> QueryError:
    with pytest.raises(QueryError, match=match) as refused:
        engine.run(spec, dataset.metadata, dataset.path)
    error = refused.value
    # A domain error, raised directly: nothing from OpenDP, Polars or Pydantic leaks or hides behind it.
    assert type(error) is QueryError
    assert not _foreign(error.__cause__)
    assert error.__suppress_context__ or not _foreign(error.__context__)
    assert error.field and error.problem
    return error


def _foreign(exc: BaseException | None) -> bool:
    return exc is not None and type(exc).__module__.split(".")[0] in {"opendp", "polars", "pydantic",
                                                                      "pydantic_core", "pyarrow"}


@pytest.mark.parametrize("spec, match", INVALID, ids=IDS)
def test_invalid_spec_is_refused_with_a_helpful_message(dataset: LocalDataset, spec: Any, match: str) -> None:
    """Each invalid spec raises QueryError naming the field, the problem and (mostly) the fix."""
    _refusal(Engine(), dataset, spec, match)


@pytest.mark.parametrize("spec, match", INVALID, ids=IDS)
def test_estimate_refuses_like_run(dataset: LocalDataset, spec: Any, match: str) -> None:
    """The free estimate refuses exactly what a run refuses, with the same message."""
    with pytest.raises(QueryError, match=match):
        dataset.estimate(spec)


@pytest.mark.parametrize("spec, match", INVALID, ids=IDS)
def test_refusals_do_not_depend_on_the_data(make_dataset: MakeDataset, spec: Any, match: str) -> None:
    """The same invalid spec against two datasets with different rows gives the identical message."""
    small = make_dataset(events_frame(people=5, seed=1), name="small")
    large = make_dataset(events_frame(people=200, seed=2), name="large")
    messages = {str(_refusal(Engine(), d, spec, match)) for d in (small, large)}
    assert len(messages) == 1


def test_configured_maximum_epsilon_is_enforced(dataset: LocalDataset) -> None:
    """EngineLimits(max_epsilon=...) lowers the ceiling; a spec just under it passes."""
    engine = Engine(limits=EngineLimits(max_epsilon=1.0))
    assert engine.estimate({"aggregate": "count", "epsilon": 1.0}, dataset.metadata, dataset.path)
    _refusal(engine, dataset, {"aggregate": "count", "epsilon": 1.5},
             r"epsilon: 1\.5 is above the maximum 1\.0 per query\. Ask with a smaller privacy loss")


@pytest.mark.parametrize("max_epsilon, spec", [
    (1.0, {"aggregate": "count", "accuracy": 5}),  # needs epsilon ~1.96
    (10.0, {"aggregate": "count", "accuracy": 1}),  # needs epsilon ~11 with 3 rows per person
    (10.0, {"aggregate": "sum", "column": "waiting_minutes", "accuracy": 0.001}),  # needs ~5e5
], ids=["count-above-1", "count-above-default", "sum-absurd"])
def test_target_accuracy_cannot_exceed_the_maximum_epsilon(dataset: LocalDataset, max_epsilon: float,
                                                           spec: dict[str, Any]) -> None:
    """The per-query ceiling applies to the epsilon derived from a target accuracy too."""
    engine = Engine(limits=EngineLimits(max_epsilon=max_epsilon))
    with pytest.raises(QueryError, match="maximum"):
        engine.estimate(spec, dataset.metadata, dataset.path)


@pytest.mark.parametrize("spec, message", [
    ({"aggregate": "count", "accuracy": 0.5}, r"half-width below 1 \(0\.5\) cannot be promised"),
    ({"aggregate": "sum", "column": "waiting_minutes", "accuracy": 1e-9}, "below the column's resolution"),
], ids=["count-sub-unit", "sum-below-resolution"])
def test_target_accuracy_finer_than_the_answer_is_refused(dataset: LocalDataset, spec: dict[str, Any],
                                                          message: str) -> None:
    """Integer noise cannot promise less than one unit of the released integers."""
    with pytest.raises(QueryError, match=message):
        dataset.estimate(spec)


def test_too_many_cells_are_refused(dataset: LocalDataset) -> None:
    """A grouping whose public key combinations exceed the cell limit is refused before any work."""
    engine = Engine(limits=EngineLimits(max_cells=100))
    _refusal(engine, dataset, {"aggregate": "count", "group_by": ["service", "request_time:day"], "epsilon": 1},
             r"group_by: 543 groups is more than the 100 allowed")


def test_valid_spec_round_trips_through_json() -> None:
    """A valid spec parses from a JSON string and from a dict to the same canonical text."""
    raw = {"aggregate": "count", "group_by": ["service"], "epsilon": 0.1}
    assert parse_spec(raw).canonical() == parse_spec(parse_spec(raw).canonical()).canonical()


# -- metadata ----------------------------------------------------------------------------


def _metadata_with(path: list[str], value: Any) -> dict[str, Any]:
    metadata = base_metadata()
    target = metadata
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return metadata


COLUMNS = ["tables", "events", "columns"]


@pytest.mark.parametrize("metadata, match", [
    (_metadata_with(COLUMNS + ["service"], {"type": "str", "keys": []}), r"keys must not be empty"),
    (_metadata_with(COLUMNS + ["service"], {"type": "str", "keys": ["A", "A"]}), r"keys must be unique"),
    (_metadata_with(COLUMNS + ["waiting_minutes"], {"type": "float", "bounds": [10, 0]}), r"bounds must be increasing"),
    (_metadata_with(COLUMNS + ["request_time"], {"type": "datetime"}), r"a datetime column needs public 'bounds'"),
    (_metadata_with(["max_contributions"], 50), r"max_contributions must not exceed max_contributions_limit"),
    (_metadata_with(["max_contributions"], 0), r"^max_contributions: Input should be greater than or equal to 1"),
    (_metadata_with(["privacy_unit"], "citizen"), r"has no privacy-unit column 'citizen'"),
    (_metadata_with(["tables"], {}), r"declare at least one table"),
    (_metadata_with(["name"], "bad name!"), r"^name: String should match pattern"),
], ids=["empty-keys", "duplicate-keys", "decreasing-bounds", "datetime-without-bounds",
        "default-above-limit", "zero-contributions", "missing-privacy-unit", "no-tables", "bad-name"])
def test_invalid_metadata_is_refused(metadata: dict[str, Any], match: str) -> None:
    """The data steward's declaration is checked too, with a MetadataError naming the field."""
    with pytest.raises(MetadataError, match=match) as refused:
        parse_metadata(metadata)
    assert "Correct the dataset's metadata.json" in str(refused.value)


def test_metadata_with_empty_keys_cannot_be_loaded_as_a_dataset(make_dataset: MakeDataset) -> None:
    """A dataset folder whose metadata declares an empty key set is refused when opened."""
    metadata = _metadata_with(COLUMNS + ["channel"], {"type": "str", "keys": []})
    with pytest.raises(MetadataError, match=r"tables\.events\.columns\.channel.*keys must not be empty"):
        make_dataset(metadata=metadata)


def test_missing_metadata_file_is_a_metadata_error(tmp_path: Any) -> None:
    """Pointing at a folder without metadata.json says so, instead of a FileNotFoundError."""
    with pytest.raises(MetadataError, match="no metadata file at"):
        LocalDataset(tmp_path)
