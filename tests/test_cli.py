from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from distcrond.cli import build_parser, main, settings_from_args
from distcrond.logs import configure_logging
from distcrond.settings import Settings


def settings(*argv: str):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(list(argv)))


def test_defaults_are_the_original_directories() -> None:
    s = settings()
    assert s.jobs_dir == Path("/etc/distcron/jobs.d")
    assert s.nodes_dir == Path("/etc/distcron/nodes.d")
    assert s.bind == "127.0.0.1:8080" and s.es_urls == () and s.zookeeper is None


def test_the_original_flags_are_aliases() -> None:
    s = settings(
        "--jobsDirectory=/foo/jobs",
        "--nodesDirectory=/foo/nodes",
        "--esHost=es.host",
        "--esPort=9201",
    )
    assert s.jobs_dir == Path("/foo/jobs") and s.nodes_dir == Path("/foo/nodes")
    assert s.es_urls == ("http://es.host:9201",)


def test_environment_variables_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTCRON_JOBS_DIR", "/env/jobs")
    monkeypatch.setenv("DISTCRON_BIND", "0.0.0.0:9000")
    monkeypatch.setenv("DISTCRON_PEER_ID", "from-env")
    monkeypatch.setenv("DISTCRON_SHUTDOWN_GRACE", "1m")
    s = settings("--bind", "127.0.0.1:9001")
    assert s.jobs_dir == Path("/env/jobs") and s.peer_id == "from-env"
    assert s.bind == "127.0.0.1:9001" and s.shutdown_grace == 60.0


def test_the_advertised_api_url_is_the_flag_or_is_made_from_the_bind_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "cron-1.example.org")
    assert settings("--bind", "127.0.0.1:8080").api_url == "http://127.0.0.1:8080"
    assert settings("--bind", "10.1.2.3:9000").api_url == "http://10.1.2.3:9000"
    # A wildcard address is no address another peer can reach: this host's name is.
    assert settings("--bind", "0.0.0.0:8080").api_url == "http://cron-1.example.org:8080"
    assert settings("--bind", "[::]:8080").api_url == "http://cron-1.example.org:8080"
    given = settings("--bind", "0.0.0.0:8080", "--advertise-url", "https://cron.lb:443/")
    assert given.api_url == "https://cron.lb:443"
    monkeypatch.setenv("DISTCRON_ADVERTISE_URL", "http://cron-1:8080")
    from_env = settings()
    assert from_env.api_url == "http://cron-1:8080"
    assert Settings.from_json(from_env.to_json()).api_url == "http://cron-1:8080"


def test_durations_and_seconds_are_accepted_for_time_flags() -> None:
    assert settings("--run-retention", "1h").run_retention_seconds == 3600


def test_the_retention_count_has_a_default_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings().run_retention_count == 10_000
    assert settings("--run-retention-count", "500").run_retention_count == 500
    monkeypatch.setenv("DISTCRON_RUN_RETENTION_COUNT", "700")
    assert settings().run_retention_count == 700
    assert settings("--shutdown-grace", "2.5").shutdown_grace == 2.5


def test_the_leader_stall_timeout_has_a_default_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distcrond.settings import Settings

    assert settings().leader_stall_timeout == 5.0
    assert settings("--leader-stall-timeout", "2.5s").leader_stall_timeout == 2.5
    monkeypatch.setenv("DISTCRON_LEADER_STALL_TIMEOUT", "8")
    assert settings().leader_stall_timeout == 8.0
    # The API process gets it too: its health check's bound before a leader publishes one.
    assert Settings.from_json(settings().to_json()).leader_stall_timeout == 8.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--bind", "nope"],
        ["--api-workers", "0"],
        ["--log-format", "xml"],
        ["--zk-root", "distcron"],
        ["--zk-root", "/distcron/"],
        ["--zk-auth", "no-password"],
        ["--zk-session-timeout", "soon"],
        ["--run-retention-count", "0"],
        ["--leader-stall-timeout", "0"],
        ["--leader-stall-timeout", "soon"],
        ["--scrub-env", "A=B"],
        ["--scrub-env", " "],
        ["--advertise-url", "cron-1:8080"],
        ["--advertise-url", "ftp://cron-1:8080"],
        ["--advertise-url", "http://cron-1:99999"],
        ["--advertise-url", "http://cron-1:8080/?x=1"],
    ],
)
def test_bad_flags_exit_with_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "flag"),
    [
        ("DISTCRON_API_WORKERS", "--api-workers"),
        ("DISTCRON_MAX_CONCURRENT_RUNS", "--max-concurrent-runs"),
        ("DISTCRON_RUN_RETENTION", "--run-retention"),
        ("DISTCRON_RUN_RETENTION_COUNT", "--run-retention-count"),
        ("DISTCRON_SHUTDOWN_GRACE", "--shutdown-grace"),
        ("DISTCRON_ZK_SESSION_TIMEOUT", "--zk-session-timeout"),
        ("DISTCRON_LEADER_STALL_TIMEOUT", "--leader-stall-timeout"),
        ("DISTCRON_ES_PORT", "--es-port"),
    ],
)
def test_a_bad_environment_variable_is_a_usage_error_naming_its_flag(
    variable: str, flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a traceback: the value is checked like the flag's own."""
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "bogus" in err


def test_check_reports_bad_files_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "nodes").mkdir()
    (tmp_path / "jobs" / "bad.json").write_text('{"schedule": {"every": "1x"}, "command": ["x"]}')
    code = main(
        ["--check", "--jobs-dir", str(tmp_path / "jobs"), "--nodes-dir", str(tmp_path / "nodes")]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "bad.json: schedule.every:" in out


def test_json_logs_are_one_object_per_line_with_extra_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    try:
        logging.getLogger("distcrond.test").info("ran %s", "x", extra={"run_id": "j@t"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["msg"] == "ran x" and entry["run_id"] == "j@t" and entry["level"] == "info"
    finally:
        configure_logging("text", "WARNING")


def test_cluster_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTCRON_ZOOKEEPER", "zk1:2181,zk2:2181")
    monkeypatch.setenv("DISTCRON_ZK_AUTH", "ops:pa:ss")
    s = settings("--zk-root", "/team-a/distcron", "--zk-session-timeout", "6s")
    assert s.zookeeper == "zk1:2181,zk2:2181" and s.zk_root == "/team-a/distcron"
    assert s.zk_session_timeout == 6.0 and s.zk_credentials == ("ops", "pa:ss")
    assert settings().zk_session_timeout == 4.0 and settings().zk_root == "/distcron"


def test_the_zookeeper_password_is_never_in_the_settings_passed_on_argv() -> None:
    s = settings("--zookeeper", "zk:2181", "--zk-auth", "ops:secret")
    assert "secret" not in json.dumps(s.to_json())
    assert type(s).from_json(s.to_json()).zk_auth is None


def test_elasticsearch_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTCRON_ES_URL", "http://es1:9200,http://es2:9200")
    monkeypatch.setenv("DISTCRON_ES_INDEX_PERIOD", "day")
    monkeypatch.setenv("DISTCRON_ES_INSECURE", "1")
    s = settings("--es-index-prefix", "ops-runs-", "--es-username", "distcron")
    assert s.es_urls == ("http://es1:9200", "http://es2:9200")
    assert (s.es_index_prefix, s.es_index_period) == ("ops-runs-", "day")
    assert s.es_username == "distcron" and s.es_verify_certs is False
    restored = type(s).from_json(json.loads(json.dumps(s.to_json())))
    assert restored.es_urls == s.es_urls and restored.es_index_period == "day"
    assert restored.es_verify_certs is False and restored.es_username == "distcron"


def test_scrub_env_is_repeatable_comes_from_the_environment_and_reaches_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings().scrub_env == ()
    assert settings("--scrub-env", "AWS_*", "--scrub-env", "VAULT_TOKEN").scrub_env == (
        "AWS_*",
        "VAULT_TOKEN",
    )
    monkeypatch.setenv("DISTCRON_SCRUB_ENV", "MY_SECRET_*, OTHER_TOKEN,,")
    assert settings().scrub_env == ("MY_SECRET_*", "OTHER_TOKEN")
    assert settings("--scrub-env", "ONLY_THIS").scrub_env == ("ONLY_THIS",)  # the flag wins
    s = settings()
    assert type(s).from_json(json.loads(json.dumps(s.to_json()))).scrub_env == s.scrub_env


@pytest.mark.parametrize("prefix", ["Runs-", "-runs", "runs*", "my runs", "a,b", ""])
def test_a_bad_index_prefix_is_refused_with_the_reason(
    prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings("--es-index-prefix", prefix)
    assert "--es-index-prefix" in capsys.readouterr().err


def test_secrets_are_never_in_the_settings_passed_on_argv_but_reach_the_api_by_env() -> None:
    s = settings(
        "--zk-auth", "ops:zk-secret", "--es-password", "es-secret", "--es-api-key", "key-secret"
    )
    passed_on = type(s).from_json(s.to_json())
    assert "secret" not in json.dumps(s.to_json())
    assert (passed_on.zk_auth, passed_on.es_password, passed_on.es_api_key) == (None, None, None)
    env = s.secret_env()
    assert env == {
        "DISTCRON_ZK_AUTH": "ops:zk-secret",
        "DISTCRON_ES_PASSWORD": "es-secret",
        "DISTCRON_ES_API_KEY": "key-secret",
    }
    restored = passed_on.with_secrets(env)
    assert (restored.zk_auth, restored.es_password, restored.es_api_key) == (
        "ops:zk-secret",
        "es-secret",
        "key-secret",
    )


def test_the_api_tokens_flags_and_their_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert settings().api_tokens is None and settings().api_insecure is False
    s = settings("--api-tokens", str(tmp_path / "t.json"), "--api-insecure")
    assert s.api_tokens == tmp_path / "t.json" and s.api_insecure
    monkeypatch.setenv("DISTCRON_API_TOKENS", "/etc/distcron/tokens.json")
    monkeypatch.setenv("DISTCRON_API_INSECURE", "1")
    s = settings()
    assert s.api_tokens == Path("/etc/distcron/tokens.json") and s.api_insecure
    again = type(s).from_json(json.loads(json.dumps(s.to_json())))
    assert again.api_tokens == s.api_tokens and again.api_insecure


@pytest.mark.parametrize("bind", ["0.0.0.0:8080", "192.0.2.7:8080", "[::]:8080", "api.example:80"])
def test_a_peer_on_a_non_loopback_address_without_tokens_refuses_to_start(
    bind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--bind", bind, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "--api-tokens" in err and bind in err and "--api-insecure" in err
    assert not (tmp_path / "state").exists()  # refused before anything was started


@pytest.mark.parametrize(
    ("argv", "starts", "warning"),
    [
        (["--bind", "127.0.0.1:8080"], True, "has no --api-tokens"),
        (["--bind", "[::1]:8080"], True, "has no --api-tokens"),
        (["--bind", "localhost:8080"], True, "has no --api-tokens"),
        (["--bind", "0.0.0.0:8080", "--api-insecure"], True, "--api-insecure"),
        (["--bind", "0.0.0.0:8080", "--api-tokens", "t.json"], True, None),
    ],
)
def test_loopback_or_an_explicit_opt_out_starts_with_a_warning(
    argv: list[str], starts: bool, warning: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    from distcrond.cli import api_exposure

    caplog.set_level(logging.WARNING, logger="distcrond")
    assert (api_exposure(settings(*argv)) is None) is starts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0]


def test_the_tls_flags_their_environment_variables_and_the_https_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert settings().tls is False
    s = settings("--tls-cert", "/etc/distcron/api.pem", "--tls-key", "/etc/distcron/api.key")
    assert s.tls and s.tls_cert == Path("/etc/distcron/api.pem")
    assert s.api_url == "https://127.0.0.1:8080"  # the default bind, over TLS
    assert settings("--tls-cert", "c.pem").api_url.startswith("http://")  # one file: no TLS
    monkeypatch.setenv("DISTCRON_TLS_CERT", str(tmp_path / "c.pem"))
    monkeypatch.setenv("DISTCRON_TLS_KEY", str(tmp_path / "k.pem"))
    s = settings("--bind", "10.1.2.3:8443")
    assert (s.tls_cert, s.tls_key) == (tmp_path / "c.pem", tmp_path / "k.pem")
    assert s.api_url == "https://10.1.2.3:8443"
    again = type(s).from_json(json.loads(json.dumps(s.to_json())))
    assert (again.tls_cert, again.tls_key, again.api_url) == (s.tls_cert, s.tls_key, s.api_url)


def test_tls_files_that_cannot_serve_are_refused_naming_the_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from distcrond.cli import tls_problem
    from integration.tls import make_tls_files

    files = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other")
    cert, key = str(files.cert), str(files.key)
    assert tls_problem(settings()) is None
    assert tls_problem(settings("--tls-cert", cert, "--tls-key", key)) is None
    cases = {
        ("--tls-cert", cert): "--tls-cert needs --tls-key",
        ("--tls-key", key): "--tls-key needs --tls-cert",
        ("--tls-cert", str(tmp_path / "no.pem"), "--tls-key", key): "no.pem: no such file",
        ("--tls-cert", cert, "--tls-key", str(other.key)): "not a PEM certificate and its key",
        ("--tls-cert", key, "--tls-key", key): "not a PEM certificate and its key",
    }
    for argv, reason in cases.items():
        problem = tls_problem(settings(*argv))
        assert problem is not None and reason in problem, (argv, problem)
    caplog.set_level(logging.WARNING, logger="distcrond")
    files.key.chmod(0o644)
    assert tls_problem(settings("--tls-cert", cert, "--tls-key", key)) is None
    assert any("readable by every user" in r.getMessage() for r in caplog.records)


def test_a_bad_tls_flag_stops_the_daemon_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["--tls-cert", str(tmp_path / "c.pem"), "--state-dir", str(state)]) == 2
    assert "--tls-cert needs --tls-key" in capsys.readouterr().err
    assert not state.exists()


def test_the_api_threads_flag_its_environment_variable_and_a_bad_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settings().api_threads == 16
    assert settings("--api-threads", "4").api_threads == 4
    monkeypatch.setenv("DISTCRON_API_THREADS", "8")
    s = settings()
    assert s.api_threads == 8
    assert type(s).from_json(json.loads(json.dumps(s.to_json()))).api_threads == 8
    monkeypatch.setenv("DISTCRON_API_THREADS", "0")
    with pytest.raises(SystemExit):
        settings()
    assert "--api-threads" in capsys.readouterr().err


def test_allowed_hosts_repeat_come_from_the_environment_and_the_flags_replace_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings().api_allowed_hosts == ()
    given = settings("--api-allowed-host", "LB.example", "--api-allowed-host", "*.svc.example")
    assert given.api_allowed_hosts == ("lb.example", "*.svc.example")
    monkeypatch.setenv("DISTCRON_API_ALLOWED_HOST", "lb.example, [2001:db8::7],")
    s = settings()
    assert s.api_allowed_hosts == ("lb.example", "2001:db8::7")
    assert type(s).from_json(json.loads(json.dumps(s.to_json()))).api_allowed_hosts == (
        "lb.example",
        "2001:db8::7",
    )
    assert settings("--api-allowed-host", "other.example").api_allowed_hosts == ("other.example",)


@pytest.mark.parametrize("value", ["lb.example:8080", "http://lb.example", "*", "a b"])
def test_a_bad_allowed_host_is_a_usage_error_naming_the_flag_and_the_value(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        settings("--api-allowed-host", value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--api-allowed-host" in err and repr(value) in err and "without a port" in err
    monkeypatch.setenv("DISTCRON_API_ALLOWED_HOST", f"ok.example,{value}")
    with pytest.raises(SystemExit):
        settings()
    assert "--api-allowed-host" in capsys.readouterr().err
