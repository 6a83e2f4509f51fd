"""Loading the jobs and nodes directories: errors by file and field; the last good version kept."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from distcrond.config.loader import ConfigError, ConfigRegistry, LoadedConfig, load_file
from distcrond.config.models import JobSpec

JOB: dict[str, Any] = {
    "description": "Do something!",
    "owners": [{"name": "Martin Helmich", "email_address": "kontakt@martin-helmich.de"}],
    "policy": {"hosts": "any", "roles": ["web", "db"]},
    "schedule": {"interval": "10m", "reference": "03:10"},
    "command": ["/bin/echo", "hi"],
}
NODE: dict[str, Any] = {"roles": ["web"], "connection_type": "local"}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    jobs, nodes = tmp_path / "jobs.d", tmp_path / "nodes.d"
    jobs.mkdir()
    nodes.mkdir()
    return jobs, nodes


@pytest.fixture
def registry(dirs: tuple[Path, Path]) -> ConfigRegistry:
    return ConfigRegistry(*dirs)


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def only_error(config: LoadedConfig) -> ConfigError:
    assert len(config.errors) == 1, config.errors
    return config.errors[0]


# -- what counts as a file ----------------------------------------------------------


def test_jobs_and_nodes_are_named_by_their_file(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    jobs, nodes = dirs
    write(jobs / "job1.json", JOB)
    write(nodes / "web-1.json", NODE)
    config = registry.reload()
    assert list(config.jobs) == ["job1"]
    assert config.jobs["job1"].id == "job1"
    assert config.jobs["job1"].description == "Do something!"
    assert list(config.nodes) == ["web-1"]
    assert config.errors == ()


@pytest.mark.parametrize(
    "name", [".hidden.json", "job.json~", ".#job.json", ".job.json.swp", "job.json.swp", "job.txt"]
)
def test_hidden_temp_and_non_json_files_are_ignored(
    registry: ConfigRegistry, dirs: tuple[Path, Path], name: str
) -> None:
    write(dirs[0] / name, "{not json")
    config = registry.reload()
    assert config.jobs == {}
    assert config.errors == ()


def test_subdirectories_are_ignored(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "sub.json").mkdir()
    write(dirs[0] / "sub.json" / "inner.json", JOB)
    config = registry.reload()
    assert config.jobs == {}
    assert config.errors == ()


def test_symlinked_file_counts(
    registry: ConfigRegistry, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    target = write(tmp_path / "elsewhere.json", JOB)
    (dirs[0] / "linked.json").symlink_to(target)
    assert list(registry.reload().jobs) == ["linked"]


def test_broken_symlink_is_an_error_and_keeps_the_last_good_job(
    registry: ConfigRegistry, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    target = write(tmp_path / "elsewhere.json", JOB)
    (dirs[0] / "linked.json").symlink_to(target)
    good = registry.reload()
    target.unlink()
    config = registry.reload()
    assert config.jobs == good.jobs
    assert "broken symbolic link" in only_error(config).reason


# -- errors: file, field, reason ----------------------------------------------------


def test_invalid_json_reports_line_and_column(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0] / "job1.json", '{\n  "command": ["x"],\n  oops\n}')
    error = only_error(registry.reload())
    assert error.file == str(path)
    assert error.field == ""
    assert error.reason.startswith("invalid JSON at line 3, column 3")


def test_top_level_must_be_an_object(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", [JOB])
    error = only_error(registry.reload())
    assert (error.field, error.reason) == ("", "must be a JSON object, not an array")


def test_id_in_the_file_is_an_error(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", {**JOB, "id": "job1"})
    config = registry.reload()
    error = only_error(config)
    assert (error.field, error.reason) == ("id", "the id is the file name; remove this field")
    assert config.jobs == {}


def test_file_name_that_is_no_valid_id_is_an_error(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0] / "my job.json", JOB)
    config = registry.reload()
    error = only_error(config)
    assert error.file == str(path)
    assert error.field == ""
    assert "'my job.json' does not give a valid id" in error.reason
    assert config.jobs == {}


def test_undecodable_file_is_reported_as_unreadable(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    (dirs[0] / "job1.json").write_bytes(b"\xff\xfe{}")
    assert only_error(registry.reload()).reason.startswith("cannot read the file")


def test_each_validation_error_is_reported_with_its_dotted_field(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(
        dirs[0] / "job1.json",
        {
            **JOB,
            "owners": [{"name": 7}],
            "schedule": {"interval": "10x"},
            "timeout": "soon",
            "comand": ["x"],
        },
    )
    found = {(e.field, e.reason) for e in registry.reload().errors}
    assert ("owners.0.name", "Input should be a valid string") in found
    assert any(
        f == "schedule.interval" and r.startswith("invalid duration '10x'") for f, r in found
    )
    assert any(f == "timeout" and r.startswith("invalid duration 'soon'") for f, r in found)
    assert ("comand", "Extra inputs are not permitted") in found
    assert len(found) == 4
    assert not any(r.startswith("Value error") for _, r in found)


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        (
            {"schedule": "hourly"},
            "schedule",
            "must be an object with exactly one of 'interval', 'cron' or 'every'",
        ),
        (
            {"schedule": {"interval": "10m", "every": "1m"}},
            "schedule",
            "must have exactly one of 'interval', 'cron' or 'every'",
        ),
        (
            {"command": 42},
            "command",
            'must be an argv list of strings like ["/bin/echo", "hi"], '
            "or a string with shell: true",
        ),
        ({"command": ["/bin/echo", 3]}, "command.1", "Input should be a valid string"),
        (
            {"policy": {"hosts": 0}},
            "policy.hosts",
            "must be 'any', 'all' or a positive count of hosts",
        ),
    ],
)
def test_union_errors_are_one_readable_error(
    registry: ConfigRegistry,
    dirs: tuple[Path, Path],
    changes: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    write(dirs[0] / "job1.json", {**JOB, **changes})
    error = only_error(registry.reload())
    assert (error.field, error.reason) == (field, reason)


def test_node_rule_across_fields_names_the_field(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(dirs[1] / "db1.json", {"connection_type": "ssh"})
    error = only_error(registry.reload())
    assert (error.field, error.reason) == (
        "connection_options",
        "required when connection_type is 'ssh'",
    )


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"command": ["/bin/echo", "a\u0000b"]}, "command", "argument 1 holds a NUL byte"),
        ({"command": "echo a\u0000b", "shell": True}, "command", "the command holds a NUL"),
        ({"env": {"TOKEN": "x\u0000y"}}, "env", "the value of TOKEN holds a NUL byte"),
        ({"command": ["/bin/echo", "x" * 131_072]}, "command", "argument 1 is 131072 bytes"),
        ({"env": {"BIG": "x" * 131_068}}, "env", "the value of BIG is 131072 bytes"),
    ],
)
def test_what_no_exec_can_carry_is_a_bad_file_not_a_failing_job(
    registry: ConfigRegistry,
    dirs: tuple[Path, Path],
    fields: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    jobs, _ = dirs
    write(jobs / "bad.json", {**JOB, **fields})
    error = only_error(registry.reload())
    assert error.file.endswith("bad.json") and error.field == field
    assert reason in error.reason, error.reason


def test_an_argument_just_under_the_kernels_limit_loads(dirs: tuple[Path, Path]) -> None:
    jobs, _ = dirs
    path = write(jobs / "big.json", {**JOB, "command": ["/bin/echo", "x" * 131_071]})
    assert isinstance(load_file(path, JobSpec), JobSpec)


def test_a_file_over_1_mb_is_refused_unparsed(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    jobs, _ = dirs
    (jobs / "huge.json").write_text(json.dumps({**JOB, "description": "x" * (1024 * 1024)}))
    error = only_error(registry.reload())
    assert error.file.endswith("huge.json") and error.field == ""
    assert "over 1048576 bytes" in error.reason


def test_config_error_to_json() -> None:
    error = ConfigError("/etc/jobs.d/a.json", "schedule.interval", "bad")
    assert error.to_json() == {
        "file": "/etc/jobs.d/a.json",
        "field": "schedule.interval",
        "reason": "bad",
    }


def test_load_file_returns_the_spec_or_its_errors(dirs: tuple[Path, Path]) -> None:
    good = load_file(write(dirs[0] / "a.json", JOB), JobSpec)
    assert isinstance(good, JobSpec) and good.id == "a"
    bad = load_file(write(dirs[0] / "b.json", {}), JobSpec)
    assert isinstance(bad, list)
    assert {e.field for e in bad} == {"schedule", "command"}


# -- the key rule: the last good version is kept --------------------------------------


def test_bad_edit_keeps_last_good_job(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", JOB)
    write(dirs[0] / "job2.json", {**JOB, "description": "other"})
    good = registry.reload()
    write(dirs[0] / "job1.json", {**JOB, "schedule": {"interval": "never"}})
    config = registry.reload()
    assert config.jobs["job1"] == good.jobs["job1"]
    assert config.jobs["job2"] == good.jobs["job2"]
    assert only_error(config).field == "schedule.interval"
    assert config.digest == good.digest


def test_fixing_the_file_replaces_the_kept_version(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0] / "job1.json", JOB)
    registry.reload()
    write(dirs[0] / "job1.json", "{broken")
    registry.reload()
    write(dirs[0] / "job1.json", {**JOB, "description": "fixed"})
    config = registry.reload()
    assert config.jobs["job1"].description == "fixed"
    assert config.errors == ()


def test_bad_new_file_has_no_entry(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", "{broken")
    config = registry.reload()
    assert config.jobs == {}
    assert only_error(config).file.endswith("job1.json")


def test_bad_edit_keeps_last_good_node(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[1] / "web-1.json", NODE)
    good = registry.reload()
    write(dirs[1] / "web-1.json", {"connection_type": "telnet"})
    config = registry.reload()
    assert config.nodes == good.nodes
    assert only_error(config).field == "connection_type"


def test_removed_file_drops_its_job(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", JOB)
    write(dirs[0] / "job2.json", JOB)
    registry.reload()
    (dirs[0] / "job1.json").unlink()
    assert list(registry.reload().jobs) == ["job2"]


def test_removed_bad_file_drops_the_kept_version_and_its_error(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0] / "job1.json", JOB)
    registry.reload()
    write(dirs[0] / "job1.json", "{broken")
    registry.reload()
    (dirs[0] / "job1.json").unlink()
    config = registry.reload()
    assert config.jobs == {}
    assert config.errors == ()


def test_missing_directory_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "nodes.d").mkdir()
    write(tmp_path / "nodes.d" / "n1.json", NODE)
    registry = ConfigRegistry(tmp_path / "absent", tmp_path / "nodes.d")
    config = registry.reload()
    error = only_error(config)
    assert (error.file, error.field, error.reason) == (
        str(tmp_path / "absent"),
        "",
        "directory does not exist",
    )
    assert config.jobs == {}
    assert list(config.nodes) == ["n1"]


def test_directory_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "jobs.d", "x")
    (tmp_path / "nodes.d").mkdir()
    registry = ConfigRegistry(tmp_path / "jobs.d", tmp_path / "nodes.d")
    assert only_error(registry.reload()).reason == "not a directory"


# -- the config value --------------------------------------------------------------------


def test_current_is_empty_before_the_first_reload(registry: ConfigRegistry) -> None:
    assert registry.current.jobs == {}
    assert registry.current.errors == ()


def test_current_is_the_last_reload(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", JOB)
    config = registry.reload()
    assert registry.current is config


def test_loaded_config_cannot_be_changed(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    write(dirs[0] / "job1.json", JOB)
    config = registry.reload()
    with pytest.raises(TypeError):
        config.jobs["job2"] = config.jobs["job1"]  # type: ignore[index]


def test_same_files_give_the_same_digest_on_every_peer(tmp_path: Path) -> None:
    digests = []
    for peer, order in (("a", ["job1", "job2"]), ("b", ["job2", "job1"])):
        jobs, nodes = tmp_path / peer / "jobs", tmp_path / peer / "nodes"
        jobs.mkdir(parents=True)
        nodes.mkdir()
        for name in order:
            write(jobs / f"{name}.json", {**JOB, "description": name})
        write(nodes / "n1.json", NODE)
        digests.append(ConfigRegistry(jobs, nodes).reload().digest)
    assert digests[0] == digests[1]
    assert len(digests[0]) == 64


def test_digest_changes_with_any_definition(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0] / "job1.json", JOB)
    before = registry.reload().digest
    write(dirs[0] / "job1.json", {**JOB, "timeout": "5s"})
    assert registry.reload().digest != before


def test_equivalent_spellings_give_the_same_digest(
    registry: ConfigRegistry, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0] / "job1.json", {**JOB, "retries": 2})
    before = registry.reload().digest
    write(dirs[0] / "job1.json", {**JOB, "retries": {"count": 2}})
    assert registry.reload().digest == before


def test_concurrent_reloads_are_safe(registry: ConfigRegistry, dirs: tuple[Path, Path]) -> None:
    for i in range(20):
        write(dirs[0] / f"job{i}.json", JOB)
    results: list[LoadedConfig] = []
    threads = [threading.Thread(target=lambda: results.append(registry.reload())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {len(r.jobs) for r in results} == {20}
    assert len({r.digest for r in results}) == 1


# -- logging ------------------------------------------------------------------------------


def test_each_error_is_logged_once_not_on_every_reload(
    registry: ConfigRegistry, dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    write(dirs[0] / "job1.json", "{broken")
    with caplog.at_level(logging.INFO, logger="distcrond.config"):
        registry.reload()
        registry.reload()
        registry.reload()
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1
    assert "job1.json" in logged[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distcrond.config"):
        write(dirs[0] / "job1.json", JOB)
        registry.reload()
    assert any("resolved" in r.getMessage() for r in caplog.records)
