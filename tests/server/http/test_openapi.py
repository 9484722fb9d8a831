"""The generated openapi.json documents every body and answer with a type a reader can use.

Walks the document the server serves: every JSON request body is a named schema (``$ref``) with an
example; every 2xx answer has a schema, and a JSON one is a named schema or a list of them (never a
bare ``object``, shown by Swagger UI as ``additionalProp1``); no schema anywhere is an object open
to any key without declared properties. Exceptions, each argued where it is listed:
``BINARY_BODIES`` (bodies that are files, not JSON) and ``OPEN_ON_PURPOSE`` (objects whose keys
depend on something the document cannot know).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.api_fixtures import Api, api, dataset_folder  # noqa: F401 - fixtures

#: Bodies that are a file, not JSON: a Parquet batch is bytes, documented as a binary string.
BINARY_BODIES = {("post", "/v1/monitors/{name}/batches"): "application/octet-stream"}
#: An audit entry's ``detail`` holds what its action recorded: its fields depend on the action (dozens
#: of them, each documented where it is recorded), and the entry is served exactly as hashed.
OPEN_ON_PURPOSE = {"AuditEntryOut/properties/entry/properties/detail"}
#: Routes whose bodies or answers are not typed yet (none now; list one here rather than hide it).
NOT_TYPED_YET: set[str] = set()
JSON = "application/json"


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from civicdp.server.http.app import create_app
    from civicdp.server.state.settings import Settings

    return create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi"))).openapi()


def _operations(schema: dict[str, Any], everything: bool = False) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if everything or path not in NOT_TYPED_YET:
                yield method, path, operation


def _component(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    return schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]


def _open_objects(node: Any, where: str) -> Iterator[str]:
    """Where ``node`` has an object schema that takes any key and declares none."""
    if isinstance(node, dict):
        extra = node.get("additionalProperties")
        untyped = extra is True or extra == {} or (node.get("type") == "object" and extra is None)
        if untyped and not node.get("properties") and "$ref" not in node:
            yield where
        for key, value in node.items():
            yield from _open_objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _open_objects(value, f"{where}/{index}")


def test_the_served_document_is_this_one(api: Api, schema: dict[str, Any]) -> None:  # noqa: F811
    served = api.get(None, "/openapi.json").json()
    assert sorted(served["paths"]) == sorted(schema["paths"])
    assert NOT_TYPED_YET <= set(schema["paths"]), "a route listed as not typed yet is gone: remove it"


def test_every_json_body_is_a_named_schema_with_an_example(schema: dict[str, Any]) -> None:
    problems = []
    for method, path, operation in _operations(schema):
        body = operation.get("requestBody")
        if body is None:
            continue
        if (method, path) in BINARY_BODIES:
            media = body["content"][BINARY_BODIES[method, path]]["schema"]
            assert media.get("type") == "string", (method, path, media)
            continue
        media = body["content"].get(JSON)
        if media is None or "$ref" not in media.get("schema", {}):
            problems.append(f"{method} {path}: body is not a named JSON schema: {body}")
            continue
        named = _component(schema, media["schema"])
        if not any(key in place for place in (media, named) for key in ("example", "examples")):
            problems.append(f"{method} {path}: {media['schema']['$ref']} has no example")
    assert problems == []


def _typed(schema: dict[str, Any], node: dict[str, Any]) -> bool:
    """A named schema, a list of typed values, or a plain JSON value (not an object)."""
    if "$ref" in node:
        return True
    if node.get("type") == "array":
        return _typed(schema, node.get("items", {}))
    return node.get("type") in ("string", "integer", "number", "boolean")


def test_every_2xx_answer_has_a_typed_schema(schema: dict[str, Any]) -> None:
    problems = []
    for method, path, operation in _operations(schema):
        for code, answer in operation["responses"].items():
            if not code.startswith("2"):
                continue
            content = answer.get("content")
            if not content:
                problems.append(f"{method} {path} {code}: no content documented")
                continue
            for kind, media in content.items():
                node = media.get("schema", {})
                if kind == JSON and not _typed(schema, node):
                    problems.append(f"{method} {path} {code}: JSON answer is not a named schema: {node}")
                elif kind != JSON and node.get("type") != "string":
                    problems.append(f"{method} {path} {code}: {kind} answer has no string schema: {node}")
    assert problems == []


def test_no_schema_takes_any_key_undeclared(schema: dict[str, Any]) -> None:
    found = [where for name, node in schema["components"]["schemas"].items()
             for where in _open_objects(node, name)]
    found += [where for method, path, operation in _operations(schema)
              for where in _open_objects(operation, f"{method} {path}")]
    assert sorted(set(found) - OPEN_ON_PURPOSE) == []
    assert OPEN_ON_PURPOSE <= set(found), "an exception listed here is no longer needed: remove it"


def test_422_answers_are_documented_as_the_servers_errors(schema: dict[str, Any]) -> None:
    """The server answers invalid input with ErrorOut (server/http/errors.py), not FastAPI's shape."""
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for method, path, operation in _operations(schema, everything=True):
        answer = operation["responses"].get("422")
        if answer is not None:
            assert answer["content"][JSON]["schema"]["$ref"].endswith("/ErrorOut"), (method, path)


def _validator(schema: dict[str, Any], name: str) -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for({"components": schema["components"], "$ref": f"#/components/schemas/{name}"})


def test_every_example_matches_its_schema(schema: dict[str, Any]) -> None:
    checked = 0
    for name, node in schema["components"]["schemas"].items():
        for example in node.get("examples", []):
            errors = [error.message for error in _validator(schema, name).iter_errors(example)]
            assert errors == [], (name, example)
            checked += 1
    assert checked >= 15
    assert not _validator(schema, "AccountCreate").is_valid({"name": "x", "agency": "y", "extra": 1}), "checks nothing"


def test_answers_documented_but_not_validated_match_their_schemas(api: Api, schema: dict[str, Any]) -> None:  # noqa: F811
    """Plans answer the planner's dicts, documented by models FastAPI does not check: check them here."""
    from tests.server.api_fixtures import ANALYST, DATASET

    plan = {"dataset": DATASET, "total": {"epsilon": 0.5}, "parts": [
        {"name": "by_channel", "aggregate": "count", "group_by": ["channel"], "accuracy": {"half_width": 60}},
        {"name": "all", "aggregate": "count", "weight": 1}]}
    created = api.post(ANALYST, "/v1/plans", json=plan)
    assert created.status_code == 200, created.text
    plan_id = created.json()["id"]
    answers = {"PlanOut": [created.json(), api.get(ANALYST, f"/v1/plans/{plan_id}").json()],
               "PlanRunOut": [api.post(ANALYST, f"/v1/plans/{plan_id}/run").json()]}
    for name, values in answers.items():
        for value in values:
            errors = [f"{error.instance_path}: {error.message}" for error in _validator(schema, name).iter_errors(value)]
            assert errors == [], (name, errors)
    assert not _validator(schema, "PlanRunOut").is_valid({**answers["PlanRunOut"][0], "parts": [{"name": 1}]})
