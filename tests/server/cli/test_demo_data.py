"""Tests for the synthetic demo-data generator (synthetic/demo_data.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from civicdp.synthetic.demo_data import CHANNELS, COLUMNS, DemoSummary, generate

PEOPLE = 5_000
SEED = 7

EVENTS_SCHEMA = {
    "event_id": pl.Int64, "person_id": pl.Int64, "service_id": pl.String,
    "department": pl.String, "centre": pl.String, "channel": pl.String,
    "request_time": pl.Datetime("us"), "waiting_minutes": pl.Float64,
    "duration_hours": pl.Float64, "satisfaction": pl.Int64,
}
STEPS_SCHEMA = {
    "event_id": pl.Int64, "step": pl.Int64, "department": pl.String,
    "started": pl.Datetime("us"), "ended": pl.Datetime("us"),
}
SERVICES_SCHEMA = {
    "service_id": pl.String, "name": pl.String, "department": pl.String,
    "complexity": pl.Int64, "target_hours": pl.Float64,
}
FILES = ("events.parquet", "services.parquet", "service_steps.parquet", "steps.parquet",
         "bundles.json", "ground_truth.json", "metadata.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, Path]:
    """One small dataset shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo")
    return generate(PEOPLE, out, seed=SEED), out


def _read(out: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return (pl.read_parquet(out / "events.parquet"), pl.read_parquet(out / "steps.parquet"),
            pl.read_parquet(out / "services.parquet"))


def _people_with_bundle(events: pl.DataFrame, services: list[str], days: int) -> int:
    """People having every service of ``services`` within one ``days``-day window."""
    b = events.filter(pl.col("service_id").is_in(services)).select(
        "person_id", "service_id", "request_time")
    anchors = b.select("person_id", pl.col("request_time").alias("t0")).unique()
    hits = anchors.join(b, on="person_id").filter(
        pl.col("request_time").is_between(pl.col("t0"), pl.col("t0") + pl.duration(days=days)))
    full = hits.group_by("person_id", "t0").agg(pl.col("service_id").n_unique().alias("k"))
    return full.filter(pl.col("k") == len(services))["person_id"].n_unique()


def test_files_columns_and_dtypes(demo: tuple[DemoSummary, Path]) -> None:
    summary, out = demo
    assert all((out / f).is_file() for f in FILES)
    assert {p.name for p in summary.paths.values()} == set(FILES)
    events, steps, services = _read(out)
    assert dict(events.schema) == EVENTS_SCHEMA
    assert dict(steps.schema) == STEPS_SCHEMA
    assert dict(services.schema) == SERVICES_SCHEMA
    assert (summary.people, summary.events, summary.steps) == (
        PEOPLE, events.height, steps.height)
    assert 4.5 * PEOPLE < events.height < 5.5 * PEOPLE
    assert events["event_id"].sort().to_list() == list(range(events.height))
    assert events["person_id"].n_unique() == PEOPLE
    assert services.height == 300 and services["service_id"].is_unique().all()
    assert services["name"].is_unique().all()
    assert services["department"].n_unique() == 40
    assert services["complexity"].is_between(1, 5).all()
    assert (services["target_hours"] > 0).all()
    # every service is used, and popularity is skewed
    counts = events["service_id"].value_counts()["count"]
    assert counts.len() == 300
    assert counts.max() > 20 * counts.median()
    # department comes from the catalogue
    joined = events.join(services, on="service_id")
    assert (joined["department"] == joined["department_right"]).all()


def test_deterministic_for_seed(demo: tuple[DemoSummary, Path], tmp_path: Path) -> None:
    _, out = demo
    generate(PEOPLE, tmp_path / "same", seed=SEED)
    generate(PEOPLE, tmp_path / "other", seed=SEED + 1)
    for a, b in zip(_read(out), _read(tmp_path / "same")):
        assert a.equals(b)
    for name in ("bundles.json", "ground_truth.json", "metadata.json"):
        assert (out / name).read_text() == (tmp_path / "same" / name).read_text()
    assert not _read(out)[0].equals(_read(tmp_path / "other")[0])


def test_channels_and_waiting_pattern(demo: tuple[DemoSummary, Path]) -> None:
    events, _, _ = _read(demo[1])
    shares = events["channel"].value_counts(normalize=True)
    share = dict(zip(shares["channel"], shares["proportion"]))
    assert set(share) == set(CHANNELS)
    for channel, target in zip(CHANNELS, (0.30, 0.35, 0.20, 0.10, 0.05)):
        assert abs(share[channel] - target) < 0.05, channel
    queued = events["channel"].is_in(["counter", "kiosk"])
    assert (events["waiting_minutes"].is_not_null() == queued).all()
    wait = events["waiting_minutes"].drop_nulls()
    assert (wait >= 0).all()
    assert ((wait * 60 - (wait * 60).round()).abs() < 1e-6).all()  # whole seconds
    assert 8 <= wait.median() <= 15
    assert 0 < (wait > 240).mean() < 0.01
    sat = events["satisfaction"]
    assert 0.35 < sat.null_count() / sat.len() < 0.45
    assert sat.drop_nulls().is_between(1, 5).all()
    mean_sat = events.group_by(pl.col("waiting_minutes") > 30).agg(pl.col("satisfaction").mean())
    by_wait = dict(zip(mean_sat["waiting_minutes"], mean_sat["satisfaction"]))
    assert by_wait[True] < by_wait[False] - 0.3  # long waits are rated worse


def test_daily_and_weekly_seasonality(demo: tuple[DemoSummary, Path]) -> None:
    events, _, _ = _read(demo[1])
    t = pl.col("request_time")
    counter = events.filter(pl.col("channel") == "counter")
    assert counter.select(t.dt.hour().is_between(8, 17).all()).item()
    assert counter.select((t.dt.weekday() >= 6).mean()).item() < 0.05
    web = events.filter(pl.col("channel") == "web")
    evening = web.select(t.dt.hour().is_between(19, 21).mean()).item()
    morning = web.select(t.dt.hour().is_between(8, 10).mean()).item()
    assert evening > morning > 0
    assert web.select((t.dt.weekday() >= 6).mean()).item() > 0.15


def test_steps_are_consecutive_and_sum_to_duration(demo: tuple[DemoSummary, Path]) -> None:
    events, steps, services = _read(demo[1])
    steps = steps.sort("event_id", "step")
    assert steps["step"].is_between(1, 6).all()
    per_event = steps.group_by("event_id").agg(
        pl.len().alias("k"), pl.col("step").max().alias("last"),
        pl.col("started").first().alias("first_start"),
        pl.col("ended").last().alias("last_end"),
        ((pl.col("ended") - pl.col("started")).dt.total_microseconds().sum()
         / 3.6e9).alias("hours"),
        (pl.col("started").slice(1) == pl.col("ended").slice(0, pl.len() - 1))
        .all().alias("consecutive"),
    )
    j = events.join(per_event, on="event_id", how="left")
    assert j["k"].null_count() == 0
    assert (j["k"] == j["last"]).all()
    assert j["consecutive"].all()
    assert (j["first_start"] == j["request_time"]).all()
    assert ((j["hours"] - j["duration_hours"]).abs() < 1e-6).all()
    span = (j["last_end"] - j["request_time"]).dt.total_microseconds() / 3.6e9
    assert ((span - j["duration_hours"]).abs() < 1e-6).all()
    assert (steps["ended"] > steps["started"]).all()
    # more complex services have more steps
    k = j.join(services, on="service_id").group_by("complexity").agg(pl.col("k").mean())
    assert k.sort("complexity")["k"].is_sorted()
    assert 0 < (events["duration_hours"] > 720).mean() < 0.02


def test_metadata_matches_data(demo: tuple[DemoSummary, Path]) -> None:
    out = demo[1]
    events, steps, services = _read(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["name"] == "civic-demo" and meta["version"] == f"{SEED}-{PEOPLE}"
    assert meta["privacy_unit"] == "person_id" and meta["max_contributions"] == 10
    assert meta["catalogue"] == {"path": "services.parquet", "steps_path": "service_steps.parquet"}
    assert meta["tables"]["steps"]["privacy_unit_via"] == {"table": "events", "on": "event_id"}
    for table, df in (("events", events), ("steps", steps)):
        cols = meta["tables"][table]["columns"]
        assert meta["tables"][table]["path"] == f"{table}.parquet"
        assert list(cols) == df.columns
        for name, spec in cols.items():
            col = df[name]
            assert spec.get("nullable", False) or col.null_count() == 0, name
            if "keys" in spec:
                assert col.drop_nulls().is_in(spec["keys"]).all(), name
            if "bounds" in spec and spec["type"] == "datetime":
                lo, hi = (datetime.fromisoformat(b) for b in spec["bounds"])
                assert lo <= col.min() and col.max() < hi, name
    ev = meta["tables"]["events"]["columns"]
    assert ev["service_id"]["keys"] == services["service_id"].to_list()
    assert ev["department"]["keys"] == sorted(services["department"].unique())
    assert ev["centre"]["keys"] == [f"C{i:03d}" for i in range(1, 101)]
    assert ev["channel"]["keys"] == list(CHANNELS)
    assert ev["satisfaction"] == {"type": "int", "keys": [1, 2, 3, 4, 5],
                                  "bounds": [1, 5], "nullable": True}


def test_planted_bundles_are_present(demo: tuple[DemoSummary, Path]) -> None:
    out = demo[1]
    events, _, _ = _read(out)
    bundles = json.loads((out / "bundles.json").read_text())
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["bundles"] == bundles
    assert 15 <= len(bundles) <= 25
    for bundle in bundles:
        assert 2 <= len(bundle["services"]) <= 4 and bundle["window_days"] == 30
        assert 0.005 * PEOPLE <= bundle["people"] <= 0.05 * PEOPLE
        found = _people_with_bundle(events, bundle["services"], bundle["window_days"])
        assert found >= bundle["people"], bundle


def test_lagged_services_and_steps(demo: tuple[DemoSummary, Path]) -> None:
    out = demo[1]
    events, steps, services = _read(out)
    truth = json.loads((out / "ground_truth.json").read_text())
    lagged = [x["service_id"] for x in truth["lagged_services"]]
    assert len(set(lagged)) == 15
    ratio = events.join(services, on="service_id").with_columns(
        (pl.col("duration_hours") / pl.col("target_hours")).alias("r"),
        pl.col("service_id").is_in(lagged).alias("lagged"),
    ).group_by("lagged").agg(pl.col("r").median())
    r = dict(zip(ratio["lagged"], ratio["r"]))
    assert r[True] > 2.5 and 0.7 < r[False] < 1.5
    assert truth["lagged_steps"]
    shares = steps.join(events.select("event_id", "service_id"), on="event_id").with_columns(
        ((pl.col("ended") - pl.col("started")).dt.total_seconds() / 3600).alias("h"))
    for lag in truth["lagged_steps"]:
        mine = shares.filter(pl.col("service_id") == lag["service_id"])
        per_step = mine.group_by("step").agg(pl.col("h").median()).sort("h")
        assert per_step["step"][-1] == lag["step"], lag  # the slowest step ...
        assert per_step["h"][-1] > 2 * per_step["h"][-2], lag  # ... by far


@pytest.mark.slow
def test_heavy_tail_calibration(tmp_path: Path) -> None:
    """At 200k people: mean ~5 requests, capping at 10 drops 17-21 % of events."""
    summary = generate(200_000, tmp_path, seed=0)
    events = pl.read_parquet(tmp_path / "events.parquet", columns=["person_id"])
    n = events.group_by("person_id").len()["len"].to_numpy().astype(np.int64)
    assert 900_000 < summary.events < 1_100_000
    assert 4.7 <= n.mean() <= 5.3
    loss = np.maximum(n - 10, 0).sum() / n.sum()
    assert 0.17 <= loss <= 0.21
    assert 150 <= n.max() <= 1000
    assert np.mean(n <= 5) > 0.6


# -- the second profile: data of another shape --------------------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, Path]:
    """The ``other`` profile at the same size and seed as the demo fixture."""
    out = tmp_path_factory.mktemp("other")
    return generate(PEOPLE, out, seed=SEED, profile="other"), out


def test_other_profile_renames_columns_and_declares_them(other: tuple[DemoSummary, Path]) -> None:
    summary, out = other
    names = COLUMNS["other"]
    assert names == {"person_id": "resident_id", "waiting_minutes": "queue_minutes",
                     "duration_hours": "handling_hours"}
    events = pl.read_parquet(out / "events.parquet")
    assert events.columns == [names.get(c, c) for c in EVENTS_SCHEMA]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["privacy_unit"] == "resident_id" and meta["version"] == f"{SEED}-{PEOPLE}-other"
    cols = meta["tables"]["events"]["columns"]
    assert list(cols) == events.columns
    assert cols["queue_minutes"] == {"type": "float", "bounds": [0, 240], "nullable": True}
    assert cols["handling_hours"] == {"type": "float", "bounds": [0, 720]}
    assert events["resident_id"].n_unique() == PEOPLE and summary.events == events.height
    assert 4.5 * PEOPLE < events.height < 5.5 * PEOPLE


def test_other_profile_waits_are_continuous_with_an_atom_at_zero(other: tuple[DemoSummary, Path]) -> None:
    events = pl.read_parquet(other[1] / "events.parquet")
    queued = events["channel"].is_in(["counter", "kiosk"])
    assert (events["queue_minutes"].is_not_null() == queued).all()
    wait = events["queue_minutes"].drop_nulls()
    assert 0.28 < (wait == 0).mean() < 0.38  # the atom
    positive = wait.filter(wait > 0)
    assert ((positive * 60 - (positive * 60).round()).abs() > 1e-3).mean() > 0.9  # not whole seconds
    assert positive.n_unique() > 0.99 * positive.len()


def test_other_profile_durations_sit_near_the_top_of_their_bounds(other: tuple[DemoSummary, Path]) -> None:
    events = pl.read_parquet(other[1] / "events.parquet")
    hours = events["handling_hours"]
    assert 0.25 < (hours > 720).mean() < 0.5  # clipped at the upper bound
    means = events.group_by("department").agg(pl.col("handling_hours").clip(0, 720).mean())["handling_hours"]
    assert means.min() > 480  # the bounds' middle is 360
    demo = pl.read_parquet(_demo_events(other[1].parent))
    assert demo["duration_hours"].clip(0, 720).mean() < 150  # the demo profile's sit low


def _demo_events(folder: Path) -> Path:
    out = folder / "demo-for-comparison"
    if not (out / "events.parquet").exists():
        generate(PEOPLE, out, seed=SEED)
    return out / "events.parquet"


def test_other_profile_has_a_heavier_tail_of_requests(other: tuple[DemoSummary, Path]) -> None:
    def loss(path: Path, person: str, bound: int) -> float:
        n = pl.read_parquet(path, columns=[person]).group_by(person).len()["len"].to_numpy().astype(np.int64)
        return float(np.maximum(n - bound, 0).sum() / n.sum())

    other_events = other[1] / "events.parquet"
    demo_events = _demo_events(other[1].parent)
    # about as many rows beyond 10 per person, but far more beyond 40 and 100 (demo: 4.4%, 0.7%)
    assert abs(loss(other_events, "resident_id", 10) - loss(demo_events, "person_id", 10)) < 0.05
    assert loss(other_events, "resident_id", 40) > 1.4 * loss(demo_events, "person_id", 40)
    assert loss(other_events, "resident_id", 100) > 2 * loss(demo_events, "person_id", 100)


def test_profiles_are_checked_and_the_command_takes_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from civicdp.server.entry import app

    with pytest.raises(ValueError, match="unknown profile"):
        generate(10, tmp_path / "x", profile="nope")
    runner = CliRunner()
    result = runner.invoke(app, ["demo-data", "--people", "200", "--out", str(tmp_path / "o"),
                                 "--profile", "other"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "metadata.json").read_text())["privacy_unit"] == "resident_id"
    refused = runner.invoke(app, ["demo-data", "--people", "200", "--out", str(tmp_path / "p"),
                                  "--profile", "nope"])
    assert refused.exit_code != 0 and "unknown profile" in refused.output


# -- the continuous profile: skewed waits and durations with no rounding ----------------------


@pytest.fixture(scope="module")
def continuous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("continuous")
    generate(PEOPLE, out, seed=SEED, profile="continuous")
    return out


def test_continuous_profile_waits_are_skewed_unrounded_with_an_atom(continuous: Path) -> None:
    events = pl.read_parquet(continuous / "events.parquet")
    assert dict(events.schema) == EVENTS_SCHEMA  # the demo's names and types
    wait = events["waiting_minutes"].drop_nulls()
    assert 0.17 < (wait == 0).mean() < 0.23  # the atom
    positive = wait.filter(wait > 0)
    assert ((positive * 60 - (positive * 60).round()).abs() > 1e-3).mean() > 0.9  # not whole seconds
    assert positive.n_unique() > 0.99 * positive.len()
    assert positive.mean() > 1.5 * positive.median()  # a long right tail


def test_continuous_profile_durations_are_not_whole_seconds(continuous: Path) -> None:
    events = pl.read_parquet(continuous / "events.parquet")
    seconds = events["duration_hours"] * 3600
    assert ((seconds - seconds.round()).abs() > 1e-3).mean() > 0.9
    assert events["duration_hours"].n_unique() > 0.99 * events.height
    steps = pl.read_parquet(continuous / "steps.parquet")
    lasted = (steps["ended"] - steps["started"]).dt.total_microseconds()
    assert (lasted % 1_000_000 != 0).mean() > 0.99
    demo = pl.read_parquet(_demo_events(continuous.parent))["duration_hours"] * 3600
    assert ((demo - demo.round()).abs() < 1e-6).all()  # the demo's stay in whole seconds
