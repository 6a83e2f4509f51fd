"""The committed JSON Schemas are what the code generates, and describe the original files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from distcrond.config.models import JobSpec, NodeSpec
from distcrond.config.schema import job_schema, main, node_schema, render

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"

# The examples of the original distcrond's README, verbatim.
README_JOB: dict[str, Any] = {
    "description": "Do something!",
    "owners": [{"name": "Martin Helmich", "email_address": "kontakt@martin-helmich.de"}],
    "policy": {"hosts": "any", "roles": ["web", "db"]},
    "schedule": {"interval": "10m", "reference": "03:10"},
    "command": ["/usr/bin/rm", "-r", "-f", "/"],
}
README_NODES: list[dict[str, Any]] = [
    {
        "roles": ["role1", "role2"],
        "connection_type": "ssh",
        "connection_options": {
            "ssh_user": "mhelmich",
            "ssh_host": "your.remote.host:22",
            "ssh_private_key_file": "/home/mhelmich/.ssh/id_rsa",
        },
    },
    {"roles": ["role1", "role2"], "connection_type": "local"},
]
FULL_JOB: dict[str, Any] = {
    **README_JOB,
    "schedule": {"cron": "*/10 * * * * *", "timezone": "Europe/Berlin"},
    "timeout": "1m30s",
    "retries": 3,
    "concurrency": "allow",
    "env": {"A": "b"},
    "working_dir": "/srv",
    "enabled": False,
    "max_output_bytes": 4096,
    "misfire": "skip",
    "delivery": "at_least_once",
}


def conforms(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> bool:
    """A small JSON Schema check: the keywords the generated schemas use (no jsonschema here)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return conforms(instance, root["$defs"][name], root)
    if "anyOf" in schema:
        return any(conforms(instance, s, root) for s in schema["anyOf"])
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None and not checks[kind](instance):
        return False
    if "enum" in schema and instance not in schema["enum"]:
        return False
    if "pattern" in schema and not re.search(schema["pattern"], instance):
        return False
    if "minimum" in schema and instance < schema["minimum"]:
        return False
    if "maximum" in schema and instance > schema["maximum"]:
        return False
    if isinstance(instance, list) and "items" in schema:
        return all(conforms(item, schema["items"], root) for item in instance)
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        if any(name not in instance for name in schema.get("required", [])):
            return False
        for key, value in instance.items():
            if key in props:
                sub = props[key]
            elif isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            elif schema.get("additionalProperties") is False:
                return False
            else:
                continue
            if not conforms(value, sub, root):
                return False
    return True


@pytest.mark.parametrize(
    ("name", "generate"), [("job.schema.json", job_schema), ("node.schema.json", node_schema)]
)
def test_committed_schema_is_what_the_code_generates(name: str, generate: Any) -> None:
    committed = (SCHEMA_DIR / name).read_text(encoding="utf-8")
    assert committed == render(generate()), (
        f"docs/schema/{name} is stale: run python -m distcrond.config.schema docs/schema"
    )


def test_schema_command_writes_both_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 0
    assert json.loads((tmp_path / "job.schema.json").read_text()) == job_schema()
    assert json.loads((tmp_path / "node.schema.json").read_text()) == node_schema()
    assert "job.schema.json" in capsys.readouterr().out


def test_schemas_leave_out_the_id_which_is_the_file_name() -> None:
    for schema in (job_schema(), node_schema()):
        assert "id" not in schema["properties"]
        assert "id" not in schema.get("required", [])


def test_durations_are_go_duration_strings() -> None:
    schema = job_schema()
    interval = schema["$defs"]["IntervalSchedule"]["properties"]["interval"]
    assert interval["type"] == "string"
    assert "format" not in interval
    assert re.search(interval["pattern"], "1h30m")
    assert not re.search(interval["pattern"], "PT1H")
    assert schema["$defs"]["Misfire"]["properties"]["grace"]["default"] == "1h"
    assert schema["properties"]["retries"]["default"]["backoff"] == "10s"


def test_readme_job_validates_against_the_models_and_the_schema() -> None:
    JobSpec.model_validate({**README_JOB, "id": "job1"})
    schema = job_schema()
    assert conforms(README_JOB, schema, schema)


@pytest.mark.parametrize("node", README_NODES)
def test_readme_nodes_validate_against_the_models_and_the_schema(node: dict[str, Any]) -> None:
    NodeSpec.model_validate({**node, "id": "node1"})
    schema = node_schema()
    assert conforms(node, schema, schema)


def test_job_with_every_extension_conforms_to_the_schema() -> None:
    JobSpec.model_validate({**FULL_JOB, "id": "job1"})
    schema = job_schema()
    assert conforms(FULL_JOB, schema, schema)


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "job1"},
        {"comand": ["x"]},
        {"schedule": {"interval": "PT10M"}},
        {"schedule": {"interval": "10m", "reference": "3pm"}},
        {"policy": {"hosts": 0}},
        {"misfire": "later"},
    ],
)
def test_schema_rejects_what_the_models_reject(changes: dict[str, Any]) -> None:
    schema = job_schema()
    assert not conforms({**README_JOB, **changes}, schema, schema)
