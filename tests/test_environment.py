"""A run's environment: the daemon's without its secrets, plus the job's own (real processes).

The same against a real daemon and a real sshd: integration/test_run_environment.py.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

import pytest

from distcrond.config.models import NodeSpec
from distcrond.execution.base import RunRequest
from distcrond.execution.environment import RunEnvironment, passphrase_env_names
from distcrond.execution.local import LocalRunner
from distcrond.execution.ssh import remote_script
from distcrond.settings import SECRET_ENV, SECRET_ENV_NAMES

pytestmark = pytest.mark.timeout(60)

# One distinct value per secret, so that the output can be searched for the values too.
SECRETS = {name: f"secret-value-{i}-of-the-daemon" for i, name in enumerate(SECRET_ENV_NAMES)}
JOB_ENV = {"DISTCRON_RUN_ID": "job@x", "DISTCRON_JOB": "job"}


def request(env: Mapping[str, str] | None = None, node: NodeSpec | None = None) -> RunRequest:
    return RunRequest(
        run_id="job@x",
        job_id="job",
        node_id="n1",
        peer_id="p1",
        slot=datetime(2026, 1, 1, tzinfo=UTC),
        argv=("env",),
        env=dict(JOB_ENV if env is None else env),
        node=node,
    )


def ssh_node(node_id: str, passphrase_env: str | None) -> NodeSpec:
    options = {"ssh_user": "root", "ssh_host": "10.0.0.7", "ssh_private_key_file": "/k"}
    if passphrase_env:
        options["ssh_key_passphrase_env"] = passphrase_env
    return NodeSpec.model_validate(
        {"id": node_id, "connection_type": "ssh", "connection_options": options}
    )


def env_of_run(runner: LocalRunner, req: RunRequest) -> tuple[dict[str, str], str]:
    """The variables the run's `env` printed (by name), and its raw output."""
    outcome = runner.run(req)
    assert outcome.ok, outcome
    names = dict(line.partition("=")[::2] for line in outcome.stdout.splitlines())
    return names, outcome.stdout


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The daemon's environment holds every secret, a passphrase, an operator's secrets and an
    ordinary variable (set before any RunEnvironment is made: it reads it once)."""
    extra = {
        "ORDINARY_SETTING": "plain-value",
        "NODE_KEY_PASSPHRASE": "passphrase-of-the-key",
        "MY_SECRET_X": "operator-secret-x",
        "MY_SECRET_Y": "operator-secret-y",
        "my_secret_lower": "kept: globs are case-sensitive",
        "NOT_MY_SECRET_Z": "kept: globs match the whole name",
    }
    for name, value in {**SECRETS, **extra}.items():
        monkeypatch.setenv(name, value)
    return extra


@pytest.fixture
def make_runner() -> Iterator[Callable[..., LocalRunner]]:
    runners: list[LocalRunner] = []

    def make(environment: RunEnvironment | None = None) -> LocalRunner:
        runner = LocalRunner(kill_grace=0.5, output_grace=0.3, environment=environment)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


def test_a_local_run_sees_none_of_the_daemons_secrets_but_its_ordinary_variables(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    names, output = env_of_run(make_runner(), request())  # the default environment
    for name, value in SECRETS.items():
        assert name not in names and value not in output
    assert names["ORDINARY_SETTING"] == "plain-value"
    assert names["DISTCRON_RUN_ID"] == "job@x"


def test_a_run_without_variables_of_its_own_is_scrubbed_too(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    """Not the inherited environment (Popen's env=None) when the request has no env."""
    names, output = env_of_run(make_runner(), request(env={}))
    assert not set(SECRETS) & set(names) and "secret-value" not in output
    assert "ORDINARY_SETTING" in names


def test_scrub_env_globs_leave_out_the_names_they_match_case_sensitively(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    runner = make_runner(RunEnvironment(patterns=("MY_SECRET_*", "ORDINARY_SETTING")))
    names, output = env_of_run(runner, request())
    assert "MY_SECRET_X" not in names and "MY_SECRET_Y" not in names
    assert "operator-secret" not in output and "ORDINARY_SETTING" not in names
    assert names["my_secret_lower"] == daemon_env["my_secret_lower"]
    assert names["NOT_MY_SECRET_Z"] == daemon_env["NOT_MY_SECRET_Z"]
    assert not set(SECRETS) & set(names)  # the daemon's own secrets stay out as well


def test_the_nodes_passphrase_variables_are_left_out_as_the_config_changes(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    with_passphrase = types.MappingProxyType({"n1": ssh_node("n1", "NODE_KEY_PASSPHRASE")})
    without = types.MappingProxyType({"n1": ssh_node("n1", None)})
    config = {"nodes": with_passphrase}
    environment = RunEnvironment(nodes=lambda: config["nodes"])
    runner = make_runner(environment)

    names, output = env_of_run(runner, request())
    assert "NODE_KEY_PASSPHRASE" not in names and "passphrase-of-the-key" not in output
    assert environment.inherited() is environment.inherited()  # made once per config

    config["nodes"] = without  # a reload: the passphrase is no longer the daemon's secret
    names, _ = env_of_run(runner, request())
    assert names["NODE_KEY_PASSPHRASE"] == "passphrase-of-the-key"


def test_a_jobs_own_env_may_set_a_scrubbed_name_with_its_own_value(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    runner = make_runner(RunEnvironment(patterns=("MY_SECRET_*",)))
    names, output = env_of_run(runner, request({**JOB_ENV, "MY_SECRET_X": "set-by-the-job"}))
    assert names["MY_SECRET_X"] == "set-by-the-job"
    assert "operator-secret-x" not in output and "MY_SECRET_Y" not in names


def test_the_daemon_keeps_its_secrets_for_itself(
    daemon_env: dict[str, str], make_runner: Callable[..., LocalRunner]
) -> None:
    """Scrubbing copies: the SSH runner still reads passphrases from os.environ."""
    env_of_run(make_runner(RunEnvironment(patterns=("MY_SECRET_*",))), request())
    assert os.environ["MY_SECRET_X"] == "operator-secret-x"
    assert all(os.environ[name] == value for name, value in SECRETS.items())


def test_an_ssh_runs_script_carries_the_requests_variables_and_nothing_of_the_daemons(
    daemon_env: dict[str, str],
) -> None:
    script = remote_script(request({**JOB_ENV, "FROM_THE_JOB": "job-value"})).decode()
    assert "FROM_THE_JOB=job-value" in script and "DISTCRON_RUN_ID=job@x" in script
    for name, value in {**SECRETS, **daemon_env}.items():
        assert name not in script and value not in script


def test_every_secret_setting_and_the_reserved_ones_are_secret_names() -> None:
    assert set(SECRET_ENV.values()) <= set(SECRET_ENV_NAMES)
    assert {
        "DISTCRON_ES_PASSWORD",
        "DISTCRON_ES_API_KEY",
        "DISTCRON_ZK_AUTH",
        "DISTCRON_SMTP_PASSWORD",
        "DISTCRON_TOKEN",
    } <= set(SECRET_ENV_NAMES)


def test_scrubbed_names_the_rule_for_one_variable() -> None:
    environment = RunEnvironment(environ={}, patterns=("AWS_*",))
    nodes = {"a": ssh_node("a", "KEY_A"), "b": ssh_node("b", None)}
    assert passphrase_env_names(nodes) == {"KEY_A"}
    assert environment.scrubbed("DISTCRON_ZK_AUTH") and environment.scrubbed("AWS_SECRET")
    assert environment.scrubbed("KEY_A", nodes) and not environment.scrubbed("KEY_A")
    assert not environment.scrubbed("aws_secret") and not environment.scrubbed("PATH")
