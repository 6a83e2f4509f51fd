"""JSON Schemas of the job and node files, generated from their models.

The schemas describe the files as written: without ``id`` (the file name is
the id), with durations as Go duration strings ("30s", "1h30m"), and with the
shorthand forms the models accept (``"retries": 3``, ``"misfire": "skip"``).
Rules that span fields (``shell`` against ``command``, SSH options against
``connection_type``) are checked by the loader, not by the schema.

``python -m distcrond.config.schema docs/schema`` writes ``job.schema.json``
and ``node.schema.json``; a test keeps the committed files equal to these.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from distcrond.config.durations import format_duration
from distcrond.config.models import JobSpec, NodeSpec

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# One or more Go duration terms ("1h30m", "1.5h", "250ms"), or a bare 0.
GO_DURATION_PATTERN = r"^\s*\+?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d))+)\s*$"


class _FileSchema(GenerateJsonSchema):
    """Pydantic's generator, with durations as Go duration strings rather than ISO 8601."""

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> JsonSchemaValue:
        return {
            "type": "string",
            "pattern": GO_DURATION_PATTERN,
            "description": "A Go duration: a number and a unit (ns, us, ms, s, m, h, d), "
            "possibly several: '30s', '1h30m', '1.5h', '250ms'.",
        }

    def time_schema(self, schema: core_schema.TimeSchema) -> JsonSchemaValue:
        # Not "format": "time": that is RFC 3339 with an offset, and references are wall times.
        return {
            "type": "string",
            "pattern": r"^\s*\d{1,2}:\d{2}(:\d{2})?\s*$",
            "description": "A wall-clock time of day, 'HH:MM' or 'HH:MM:SS'.",
        }

    def encode_default(self, dflt: Any) -> Any:
        if isinstance(dflt, timedelta):
            return format_duration(dflt)
        return super().encode_default(dflt)


def _file_schema(model: type[BaseModel], title: str, description: str) -> dict[str, Any]:
    schema = model.model_json_schema(schema_generator=_FileSchema)
    schema["properties"].pop("id", None)
    required = [name for name in schema.get("required", []) if name != "id"]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)
    return {"$schema": JSON_SCHEMA_DIALECT, **schema, "title": title, "description": description}


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job file (``<jobs_dir>/<id>.json``)."""
    schema = _file_schema(
        JobSpec,
        "distcrond job",
        "One job file; its id is the file name without '.json'.",
    )
    props = schema["properties"]
    # The shorthands the model's before-validators accept.
    props["retries"] = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 100, "description": "retry count"},
            {"$ref": "#/$defs/Retries"},
        ],
        "default": props["retries"].get("default"),
    }
    props["misfire"] = {
        "anyOf": [{"$ref": "#/$defs/MisfirePolicy"}, {"$ref": "#/$defs/Misfire"}],
        "default": props["misfire"].get("default"),
    }
    props["schedule"]["description"] = (
        "Exactly one of: an interval with a daily reference time, a cron expression, "
        "or an elapsed-time period ('every')."
    )
    props["command"]["description"] = (
        "An argv list; a string run through /bin/sh -c only with shell: true."
    )
    return schema


def node_schema() -> dict[str, Any]:
    """The JSON Schema of a node file (``<nodes_dir>/<id>.json``)."""
    schema = _file_schema(
        NodeSpec,
        "distcrond node",
        "One node file; its id is the file name without '.json'.",
    )
    schema["properties"]["connection_options"]["description"] = (
        "Required with connection_type 'ssh', not allowed with 'local'."
    )
    return schema


def render(schema: dict[str, Any]) -> str:
    """The text of a schema file, as committed: indented, key order kept, newline-terminated."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write job.schema.json and node.schema.json into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in (("job.schema.json", job_schema()), ("node.schema.json", node_schema())):
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the JSON Schemas of job and node files.")
    parser.add_argument("directory", type=Path, help="where to write them, e.g. docs/schema")
    args = parser.parse_args(argv)
    for path in write_schemas(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
