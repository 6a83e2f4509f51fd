"""The OpenAPI document describes exactly the app's routes, and holds together."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon.testing import TestClient

from distcrond.api import openapi
from distcrond.api.app import ROUTES, create_app, route_methods
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.sqlite import SQLiteReportStore

OPERATIONS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def document() -> dict[str, Any]:
    return openapi.document()


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_document_paths_and_methods_are_exactly_the_route_table(
    document: dict[str, Any],
) -> None:
    routes = {path: {m.lower() for m in route_methods(cls)} for path, cls in ROUTES}
    documented = {
        path: {m for m in item if m in OPERATIONS} for path, item in document["paths"].items()
    }
    assert documented == routes


def test_document_is_served_as_json_by_the_app(tmp_path: Path, document: dict[str, Any]) -> None:
    coordination = SQLiteCoordinationStore(tmp_path / "c.sqlite3")
    reports = SQLiteReportStore(tmp_path / "r.sqlite3")
    try:
        result = TestClient(create_app(coordination, reports, "peer-a")).simulate_get(
            "/api/v1/openapi.json"
        )
    finally:
        coordination.close()
        reports.close()
    served = json.loads(result.text)
    assert served == json.loads(json.dumps(document))
    assert served["openapi"].startswith("3.")
    assert served["info"]["title"] and served["info"]["version"]
    assert served["paths"]


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = [n["$ref"] for n in walk(document) if isinstance(n, dict) and "$ref" in n]
    assert refs
    for ref in refs:
        assert resolve(document, ref) is not None


def test_every_operation_has_a_unique_id_responses_and_its_path_parameters(
    document: dict[str, Any],
) -> None:
    ids: list[str] = []
    for path, item in document["paths"].items():
        templated = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            ids.append(operation["operationId"])
            assert operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status)
                if "$ref" in response:
                    response = resolve(document, response["$ref"])
                assert response["description"]
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == templated, (path, method)
            for parameter in operation.get("parameters", []):
                assert parameter["in"] in {"path", "query", "header", "cookie"}
                assert "schema" in parameter
                if parameter["in"] == "path":
                    assert parameter["required"] is True
    assert len(ids) == len(set(ids))


def test_error_responses_use_the_error_schema(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["title", "description"]
    for status in ("400", "404", "500", "503"):
        response = document["components"]["responses"][status]
        assert response["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }


def test_core_shapes_are_components(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("Run", "RunRecord", "JobSummary", "JobSpec", "NodeSpec", "Error", "Health"):
        assert name in schemas


def test_trigger_documents_that_a_disabled_job_may_be_run_by_hand(
    document: dict[str, Any],
) -> None:
    trigger = document["paths"]["/api/v1/jobs/{job_id}/runs"]["post"]
    assert "disabled" in trigger["description"]
    assert "202" in trigger["responses"]


def test_run_schemas_name_exactly_the_fields_the_api_sends(document: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    from distcrond.runs import RunRecord, RunReport, RunState

    slot = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    schemas = document["components"]["schemas"]
    report = RunReport(run_id="j@x", job_id="j", slot=slot, state=RunState.SUCCEEDED)
    record = RunRecord("j@x", "j", slot, None, None, RunState.RUNNING)
    assert set(schemas["Run"]["properties"]) == set(report.to_json())
    assert set(schemas["RunRecord"]["properties"]) == set(record.to_json())
