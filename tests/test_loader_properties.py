"""Generated job and node files against the loader: nothing escapes it, and every
rejection names the file, the field and the reason."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distcrond.config.loader import ConfigError, ConfigRegistry, load_file
from distcrond.config.models import JobSpec, NodeSpec

JOB: dict[str, Any] = {
    "description": "nightly",
    "owners": [{"name": "Ops", "email_address": "ops@example.org"}],
    "policy": {"hosts": "any", "roles": ["web"]},
    "schedule": {"interval": "10m"},
    "command": ["/bin/echo", "hi"],
    "env": {"A": "b"},
    "timeout": "5m",
}
NODE: dict[str, Any] = {"roles": ["web"], "connection_type": "local"}

# Any JSON value, with the awkward corners: huge and negative numbers, non-finite
# floats (Python's json writes and reads NaN), NUL bytes and surrogates in strings.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "0", "-1s", "1h", "* * * * *", "@daily", "\x00", "99999999999d"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def near(valid: dict[str, Any]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A valid spec with one top-level field replaced (or added) by any JSON value."""
    keys = st.sampled_from([*valid, "schedule.cron", "unknown_field"])
    return st.tuples(keys, json_values).map(lambda kv: (kv[0], {**valid, kv[0]: kv[1]}))


def load(text: str | bytes, model: type[JobSpec] | type[NodeSpec]) -> tuple[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "generated.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return str(path), load_file(path, model)


def assert_named(file: str, result: Any) -> list[ConfigError]:
    """Either a spec, or a non-empty list of errors, each naming this file and a reason."""
    if isinstance(result, JobSpec | NodeSpec):
        return []
    assert isinstance(result, list) and result, result
    for error in result:
        assert isinstance(error, ConfigError)
        assert error.file == file
        assert isinstance(error.field, str)
        assert error.reason.strip(), error
    return result


@pytest.mark.timeout(120)
@PROPERTY
@given(value=json_values)
def test_any_json_value_as_a_job_or_node_file_is_loaded_or_rejected_by_name(value: Any) -> None:
    text = json.dumps(value)
    for model in (JobSpec, NodeSpec):
        assert_named(*load(text, model))


@pytest.mark.timeout(120)
@PROPERTY
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_file_are_rejected_by_name_never_raised(raw: bytes) -> None:
    for model in (JobSpec, NodeSpec):
        assert_named(*load(raw, model))


@pytest.mark.timeout(120)
@settings(max_examples=30, deadline=None)
@given(depth=st.integers(min_value=1, max_value=5000), brackets=st.sampled_from(["[]", '{"a":}']))
def test_a_file_nested_any_depth_is_loaded_or_rejected_by_name(depth: int, brackets: str) -> None:
    opening, closing = (brackets[0], "]") if brackets == "[]" else ('{"a":', "}")
    text = opening * depth + "1" + closing * depth
    for model in (JobSpec, NodeSpec):
        assert_named(*load(text, model))


@pytest.mark.timeout(120)
@PROPERTY
@given(data=st.data())
@pytest.mark.parametrize(("model", "valid"), [(JobSpec, JOB), (NodeSpec, NODE)])
def test_a_spec_with_one_field_changed_is_loaded_or_the_error_names_that_field(
    model: type[JobSpec] | type[NodeSpec], valid: dict[str, Any], data: st.DataObject
) -> None:
    key, spec = data.draw(near(valid))
    errors = assert_named(*load(json.dumps(spec), model))
    if errors:
        fields = [e.field for e in errors]
        assert any(f == key or f.startswith(f"{key}.") for f in fields), (key, errors)


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None)
@given(jobs=st.lists(json_values, min_size=1, max_size=5))
def test_a_directory_of_generated_files_reloads_without_raising(jobs: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        jobs_dir, nodes_dir = Path(d) / "jobs.d", Path(d) / "nodes.d"
        jobs_dir.mkdir()
        nodes_dir.mkdir()
        for i, value in enumerate(jobs):
            (jobs_dir / f"job-{i}.json").write_text(json.dumps(value))
        (jobs_dir / "good.json").write_text(json.dumps(JOB))
        config = ConfigRegistry(jobs_dir, nodes_dir).reload()
        assert "good" in config.jobs  # the good file loads whatever lies beside it
        named = {Path(e.file).name for e in config.errors}
        loaded = {f"{job_id}.json" for job_id in config.jobs}
        on_disk = {p.name for p in jobs_dir.iterdir()}
        assert named | loaded == on_disk  # every file either loaded or reported
