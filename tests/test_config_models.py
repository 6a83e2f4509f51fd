"""The job and node models: the original formats, every extension, and why bad values fail."""

from __future__ import annotations

from datetime import time, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from distcrond.config.models import (
    Concurrency,
    ConnectionType,
    CronSchedule,
    Delivery,
    EverySchedule,
    IntervalSchedule,
    JobSpec,
    MisfirePolicy,
    NodeSpec,
)

# The examples of the original distcrond's README, verbatim.
README_JOB: dict[str, Any] = {
    "description": "Do something!",
    "owners": [{"name": "Martin Helmich", "email_address": "kontakt@martin-helmich.de"}],
    "policy": {"hosts": "any", "roles": ["web", "db"]},
    "schedule": {"interval": "10m", "reference": "03:10"},
    "command": ["/usr/bin/rm", "-r", "-f", "/"],
}
README_SSH_NODE: dict[str, Any] = {
    "roles": ["role1", "role2"],
    "connection_type": "ssh",
    "connection_options": {
        "ssh_user": "mhelmich",
        "ssh_host": "your.remote.host:22",
        "ssh_private_key_file": "/home/mhelmich/.ssh/id_rsa",
    },
}
README_LOCAL_NODE: dict[str, Any] = {"roles": ["role1", "role2"], "connection_type": "local"}


def job(**changes: Any) -> JobSpec:
    return JobSpec.model_validate({**README_JOB, "id": "job1", **changes})


def errors_of(data: dict[str, Any], model: type[JobSpec] | type[NodeSpec] = JobSpec) -> list[str]:
    """'dotted.loc: message' of each error."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in info.value.errors()]


def bad_job(**changes: Any) -> str:
    return "\n".join(errors_of({**README_JOB, "id": "job1", **changes}))


# -- the original formats ------------------------------------------------------


def test_readme_job_validates_with_the_original_meaning() -> None:
    spec = job()
    assert spec.id == "job1"
    assert spec.description == "Do something!"
    assert spec.owners[0].name == "Martin Helmich"
    assert spec.owners[0].email_address == "kontakt@martin-helmich.de"
    assert spec.policy.hosts == "any"
    assert spec.policy.roles == ("web", "db")
    assert spec.schedule == IntervalSchedule(
        interval=timedelta(minutes=10), reference=time(3, 10), timezone="UTC"
    )
    assert spec.command == ("/usr/bin/rm", "-r", "-f", "/")
    assert spec.argv == ("/usr/bin/rm", "-r", "-f", "/")


def test_readme_ssh_node_validates() -> None:
    node = NodeSpec.model_validate({**README_SSH_NODE, "id": "node_remote"})
    assert node.connection_type is ConnectionType.SSH
    assert node.connection_options is not None
    assert node.connection_options.ssh_user == "mhelmich"
    assert node.connection_options.host == "your.remote.host"
    assert node.connection_options.port == 22
    assert node.connection_options.ssh_private_key_file == "/home/mhelmich/.ssh/id_rsa"
    assert node.matches(("role2", "other"))
    assert not node.matches(("web",))


def test_readme_local_node_validates() -> None:
    node = NodeSpec.model_validate({**README_LOCAL_NODE, "id": "node_local"})
    assert node.connection_type is ConnectionType.LOCAL
    assert node.connection_options is None
    assert node.roles == ("role1", "role2")


def test_ssh_host_without_port_defaults_to_22() -> None:
    options = {**README_SSH_NODE["connection_options"], "ssh_host": "db1.example"}
    node = NodeSpec.model_validate({**README_SSH_NODE, "id": "n", "connection_options": options})
    assert node.connection_options is not None
    assert (node.connection_options.host, node.connection_options.port) == ("db1.example", 22)


def test_job_defaults_are_the_safe_ones() -> None:
    spec = job()
    assert spec.shell is False
    assert spec.timeout is None
    assert spec.retries.count == 0
    assert spec.concurrency is Concurrency.FORBID
    assert spec.enabled is True
    assert spec.misfire.policy is MisfirePolicy.RUN_ONCE
    assert spec.delivery is Delivery.AT_MOST_ONCE


# -- policy ----------------------------------------------------------------------


@pytest.mark.parametrize(("hosts", "expected"), [("any", "any"), ("all", "all"), (3, 3), ("2", 2)])
def test_policy_hosts_is_any_all_or_a_count(hosts: Any, expected: Any) -> None:
    assert job(policy={"hosts": hosts}).policy.hosts == expected


@pytest.mark.parametrize("hosts", [0, -1, "some", True, 1.5])
def test_policy_hosts_rejects_other_values(hosts: Any) -> None:
    assert "policy.hosts" in bad_job(policy={"hosts": hosts})


# -- schedules -------------------------------------------------------------------


def test_interval_schedule_takes_go_durations_and_seconds_in_the_reference() -> None:
    schedule = job(schedule={"interval": "1h30m", "reference": "03:10:05"}).schedule
    assert schedule == IntervalSchedule(
        interval=timedelta(hours=1, minutes=30), reference=time(3, 10, 5)
    )


def test_cron_schedule_accepts_five_or_six_fields() -> None:
    assert job(schedule={"cron": "*/5 * * * *"}).schedule == CronSchedule(cron="*/5 * * * *")
    six = job(schedule={"cron": "*/10  * * * * *", "timezone": "Europe/Berlin"}).schedule
    assert six == CronSchedule(cron="*/10 * * * * *", timezone="Europe/Berlin")


def test_every_schedule_with_fuzzy() -> None:
    assert job(schedule={"every": "1h", "fuzzy": True}).schedule == EverySchedule(
        every=timedelta(hours=1), fuzzy=True
    )


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [
        ({"interval": "10x"}, "schedule.interval: Value error, invalid duration '10x'"),
        ({"interval": "50ms"}, "schedule.interval: Value error, must be at least 100ms"),
        (
            {"interval": "10m", "reference": "25:00"},
            "schedule.reference: Value error, must be a time",
        ),
        (
            {"interval": "10m", "reference": "3pm"},
            "schedule.reference: Value error, must be a time",
        ),
        ({"interval": "10m", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "* * *"}, "schedule.cron: Value error, must have 5 or 6 fields"),
        ({"cron": "61 * * * *"}, "is not a valid cron expression"),
        ({"cron": "0 0 30 2 *"}, "never matches a date"),
        ({"every": "0s"}, "schedule.every: Value error, must be at least 100ms"),
        ({"interval": "10m", "cron": "* * * * *"}, "exactly one of 'interval', 'cron' or 'every'"),
        ({"when": "hourly"}, "exactly one of 'interval', 'cron' or 'every'"),
        ({"interval": "10m", "refrence": "03:10"}, "schedule.refrence: Extra inputs"),
    ],
)
def test_bad_schedule_names_the_field_and_reason(schedule: dict[str, Any], fragment: str) -> None:
    assert fragment in bad_job(schedule=schedule)


# -- command and shell -----------------------------------------------------------


def test_shell_job_runs_its_string_through_sh() -> None:
    spec = job(shell=True, command="echo hi | wc -c")
    assert spec.argv == ("/bin/sh", "-c", "echo hi | wc -c")


def test_string_command_without_shell_is_rejected() -> None:
    assert "set shell: true" in bad_job(command="echo hi")


def test_shell_job_needs_a_string_command() -> None:
    assert "with shell: true, command must be a non-empty string" in bad_job(
        shell=True, command=["echo"]
    )


def test_empty_argv_is_rejected() -> None:
    assert "non-empty argv list" in bad_job(command=[])


# -- extensions --------------------------------------------------------------------


def test_timeout_is_a_duration_or_seconds() -> None:
    assert job(timeout="1m30s").timeout == timedelta(seconds=90)
    assert job(timeout=45).timeout == timedelta(seconds=45)
    assert "timeout: Value error, invalid duration" in bad_job(timeout="soon")
    assert "timeout: Value error, must not be negative" in bad_job(timeout=-1)


def test_retries_is_a_count_or_an_object() -> None:
    assert job(retries=3).retries.count == 3
    full = job(retries={"count": 2, "backoff": "5s", "max_backoff": "1m"}).retries
    assert (full.count, full.backoff, full.max_backoff) == (
        2,
        timedelta(seconds=5),
        timedelta(minutes=1),
    )
    assert "retries.count" in bad_job(retries=-1)
    assert "retries.count" in bad_job(retries=101)
    assert "retries.backoff" in bad_job(retries={"count": 1, "backoff": "x"})


@pytest.mark.parametrize("value", ["forbid", "allow", "replace"])
def test_concurrency_modes(value: str) -> None:
    assert job(concurrency=value).concurrency == Concurrency(value)


def test_unknown_concurrency_is_rejected() -> None:
    assert "concurrency: Input should be 'forbid', 'allow' or 'replace'" in bad_job(
        concurrency="queue"
    )


def test_env_holds_variables() -> None:
    assert job(env={"PATH": "/bin", "_X1": "y"}).env == {"PATH": "/bin", "_X1": "y"}


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"1BAD": "x"}, "'1BAD' is not a valid environment variable name"),
        ({"A-B": "x"}, "not a valid environment variable name"),
        ({"DISTCRON_JOB": "x"}, "DISTCRON_* variables are set by distcrond"),
        ({"A": 1}, "env.A: Input should be a valid string"),
    ],
)
def test_bad_env_is_rejected(env: dict[str, Any], fragment: str) -> None:
    assert fragment in bad_job(env=env)


def test_working_dir_enabled_and_max_output_bytes() -> None:
    spec = job(working_dir="/srv", enabled=False, max_output_bytes=4096)
    assert (spec.working_dir, spec.enabled, spec.max_output_bytes) == ("/srv", False, 4096)
    assert "max_output_bytes: Input should be greater than or equal to 1024" in bad_job(
        max_output_bytes=10
    )
    assert "enabled: Input should be a valid boolean" in bad_job(enabled="sometimes")


def test_misfire_is_a_policy_name_or_an_object() -> None:
    assert job(misfire="skip").misfire.policy is MisfirePolicy.SKIP
    full = job(misfire={"policy": "run_all", "grace": "10m"}).misfire
    assert (full.policy, full.grace) == (MisfirePolicy.RUN_ALL, timedelta(minutes=10))
    assert "misfire.policy: Input should be 'skip', 'run_once' or 'run_all'" in bad_job(
        misfire="later"
    )


@pytest.mark.parametrize("value", ["at_most_once", "at_least_once"])
def test_delivery_modes(value: str) -> None:
    assert job(delivery=value).delivery == Delivery(value)


def test_unknown_delivery_is_rejected() -> None:
    assert "delivery: Input should be" in bad_job(delivery="exactly_once")


def test_unknown_field_is_rejected_by_name() -> None:
    assert "comand: Extra inputs are not permitted" in bad_job(comand=["x"])


@pytest.mark.parametrize("job_id", ["", "-x", "a b", "a/b", "x" * 129])
def test_bad_job_id_is_rejected(job_id: str) -> None:
    assert "id: Value error, must start with a letter or digit" in "\n".join(
        errors_of({**README_JOB, "id": job_id})
    )


def test_job_spec_is_immutable() -> None:
    spec = job()
    with pytest.raises(ValidationError):
        spec.enabled = False


# -- nodes -------------------------------------------------------------------------


def test_ssh_node_needs_connection_options() -> None:
    assert "connection_options: required when connection_type is 'ssh'" in "\n".join(
        errors_of({"id": "n", "connection_type": "ssh"}, NodeSpec)
    )


def test_local_node_takes_no_connection_options() -> None:
    data = {**README_SSH_NODE, "id": "n", "connection_type": "local"}
    assert "only for connection_type 'ssh'" in "\n".join(errors_of(data, NodeSpec))


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        (":22", "must be 'host' or 'host:port'"),
        ("h:99999", "port '99999'"),
        ("h:ssh", "port 'ssh'"),
    ],
)
def test_bad_ssh_host_is_rejected(host: str, fragment: str) -> None:
    options = {**README_SSH_NODE["connection_options"], "ssh_host": host}
    data = {**README_SSH_NODE, "id": "n", "connection_options": options}
    assert fragment in "\n".join(errors_of(data, NodeSpec))


def test_unknown_connection_type_is_rejected() -> None:
    assert "connection_type: Input should be 'local' or 'ssh'" in "\n".join(
        errors_of({"id": "n", "connection_type": "telnet"}, NodeSpec)
    )


def test_local_node_may_be_pinned_to_a_peer() -> None:
    assert NodeSpec.model_validate({"id": "n", "peer": "peer-2"}).peer == "peer-2"
