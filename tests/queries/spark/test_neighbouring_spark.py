"""The neighbouring-data harness (tests/privacy/neighbours.py) on the Spark backend.

D and D plus one adversarial person, noise removed and D' coupled to D: every mechanism's
exact input moves by at most its declared sensitivity, both runs are the same computation,
and the answer is post-processing of the noised values — computed by Spark. The queries are
a privately bounded count against a 1,000-row person, NaN everywhere and 1,000 rows
without a person id; quantiles (the grid measure) and the performance report (~24
aggregates in one job) against the 1,000-row person. (Polars runs every query against every adversary in tests/privacy.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from civicdp.queries.engine import Engine
from civicdp.queries.spark_backend import SparkBackend
from tests.privacy.neighbours import (ADVERSARIES, QUERIES, Recording, compare, record_run, released_differences,
                                      structure_differences, write_neighbour)

SPARK_ADVERSARIES = ["thousand_rows", "nan", "null_person_id"]
#: (query, adversary) pairs: every adversary on the privately bounded count, the heavy person on the rest
#: (each pair is a few Spark jobs; the Polars harness runs the full matrix).
PAIRS = [("count", a) for a in SPARK_ADVERSARIES] + [("quantiles", "thousand_rows"),
                                                      ("performance_report", "thousand_rows")]


@pytest.fixture(scope="module")
def neighbours(spark_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spark-neighbours")
    base = spark_folders["perf"]
    return {name: write_neighbour(base, root / name, ADVERSARIES[name]) for name in SPARK_ADVERSARIES}


@pytest.fixture(scope="module")
def on_base(spark_folders: dict[str, Path], spark_backend: SparkBackend) -> dict[str, Recording]:
    cache: dict[str, Recording] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, query: str) -> Recording:
            cache[query] = record_run(QUERIES[query], spark_folders["perf"], engine=Engine(backend=spark_backend))
            self[query] = cache[query]
            return cache[query]

    return Lazy()


@pytest.mark.parametrize(("query", "adversary"), PAIRS)
def test_one_more_person_moves_spark_inputs_within_sensitivity(query: str, adversary: str,
                                                                neighbours: dict[str, Path],
                                                                on_base: dict[str, Any],
                                                                spark_backend: SparkBackend) -> None:
    d = on_base[query]
    d2 = record_run(QUERIES[query], neighbours[adversary], replay=d, engine=Engine(backend=spark_backend))
    problems = structure_differences(d, d2)
    assert not problems, "\n".join(problems)
    changes = compare(d, d2)
    assert changes, "no mechanism was called: the harness compared nothing"
    over = [c for c in changes if not c.within]
    assert not over, f"{query} + {adversary}: " + "; ".join(f"{c.part} moved {c.observed} > {c.declared}"
                                                            for c in over)
    if adversary == "thousand_rows":  # (NaN rows are missing values; rows without a person count for no one)
        assert any(c.observed > 0 for c in changes), "the adversary was not seen"
    assert not released_differences(d, d2)
