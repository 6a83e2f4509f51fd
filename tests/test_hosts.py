"""The Host check (DNS rebinding) and the cross-site checks, through falcon's TestClient
on create_app over real SQLite stores (no network)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import falcon
import pytest
from falcon.testing import Result, TestClient

from distcrond.api import create_app
from distcrond.api.auth import TokenSource
from distcrond.api.hosts import AllowedHosts, parse_host_pattern, split_authority
from distcrond.clock import FakeClock
from distcrond.config.models import JobSpec
from distcrond.config.tokens import new_token, token_digest
from distcrond.coordination.base import ConfigSnapshot
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.settings import Settings

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
LIVE = "/api/v1/health/live"
TRIGGER = "/api/v1/jobs/backup/runs"
OWN = "http://127.0.0.1:8080"  # the advertised URL of the default --bind


@pytest.fixture
def coordination(tmp_path: Path) -> Iterator[SQLiteCoordinationStore]:
    store = SQLiteCoordinationStore(tmp_path / "coordination.sqlite3")
    spec = JobSpec.model_validate(
        {"id": "backup", "schedule": {"cron": "0 3 * * *"}, "command": ["/bin/true"]}
    )
    store.publish_config(
        ConfigSnapshot(
            peer_id="peer-a",
            digest="d",
            jobs={"backup": spec.model_dump(mode="json")},
            nodes={},
            errors=[],
            loaded_at=NOW,
        )
    )
    yield store
    store.close()


@pytest.fixture
def reports(tmp_path: Path) -> Iterator[SQLiteReportStore]:
    store = SQLiteReportStore(tmp_path / "reports.sqlite3")
    yield store
    store.close()


def client_for(
    coordination: SQLiteCoordinationStore,
    reports: SQLiteReportStore,
    settings: Settings | None = None,
    tokens: TokenSource | None = None,
) -> TestClient:
    hosts = AllowedHosts.of(settings or Settings())
    app = create_app(coordination, reports, "peer-a", FakeClock(NOW), tokens=tokens, hosts=hosts)
    return TestClient(app, headers={"Host": "127.0.0.1:8080"})  # not falcon's default host


@pytest.fixture
def client(coordination: SQLiteCoordinationStore, reports: SQLiteReportStore) -> TestClient:
    return client_for(coordination, reports)


def error(result: Result, status: str) -> dict[str, Any]:
    assert result.status == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = result.json["error"]
    return body


def get(client: TestClient, host: str, **kwargs: Any) -> Result:
    return client.simulate_get(LIVE, headers={"Host": host}, **kwargs)


# -- Host --------------------------------------------------------------------------


def test_a_host_the_peer_does_not_answer_to_is_421_naming_the_host_and_the_flag(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    for path in (LIVE, "/api/v1/jobs", "/metrics", "/api/v1/nowhere"):  # everything
        refused = client.simulate_get(path, headers={"Host": "evil.example:8080"})
        description = error(refused, falcon.HTTP_421)["description"]
        assert "'evil.example'" in description and "--api-allowed-host" in description
    post = client.simulate_post(TRIGGER, json={}, headers={"Host": "evil.example"})
    assert error(post, falcon.HTTP_421)
    assert coordination.pending_triggers() == []


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8080", "127.0.0.1", "localhost:8080", "LocalHost", "localhost.", "127.9.9.9",
     "[::1]:8080", "[::1]"],
)  # fmt: skip
def test_loopback_and_the_bind_address_are_answered(client: TestClient, host: str) -> None:
    assert get(client, host).status == falcon.HTTP_200


def test_the_advertised_name_and_the_allowed_hosts_are_answered_and_nothing_else(
    coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    settings = Settings(
        bind="10.0.0.5:8080",
        advertise_url="https://cron-1.example:8443",
        api_allowed_hosts=("lb.example", "*.svc.example", "2001:db8::7"),
    )
    client = client_for(coordination, reports, settings)
    answered = ["10.0.0.5:8080", "cron-1.example", "CRON-1.example:443", "lb.example:80",
                "a.svc.example", "x.y.svc.example", "[2001:db8::7]:8080", "localhost"]  # fmt: skip
    for host in answered:
        assert get(client, host).status == falcon.HTTP_200, host
    refused = ["10.0.0.6", "svc.example", "evilsvc.example", "lb.example.evil.example",
               "cron-1.example.evil.example", "[2001:db8::8]"]  # fmt: skip
    for host in refused:
        assert error(get(client, host), falcon.HTTP_421), host


class FakeSocket:
    """What gunicorn hands over as ``gunicorn.socket``: the connection's own address."""

    def __init__(self, address: str) -> None:
        self._address = address

    def getsockname(self) -> tuple[str, int]:
        return self._address, 8080


def test_bound_to_every_interface_the_host_names_and_the_address_connected_to_are_answered(
    coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    client = client_for(coordination, reports, Settings(bind="0.0.0.0:8080"))
    assert get(client, socket.gethostname()).status == falcon.HTTP_200
    assert get(client, socket.getfqdn()).status == falcon.HTTP_200
    # A load balancer's health check names the address it connected to.
    for local in ("10.1.2.3", "::ffff:10.1.2.3"):
        extras = {"gunicorn.socket": FakeSocket(local)}
        assert get(client, "10.1.2.3:8080", extras=extras).status == falcon.HTTP_200
        assert error(get(client, "10.1.2.4:8080", extras=extras), falcon.HTTP_421)
    assert error(get(client, "0.0.0.0:8080"), falcon.HTTP_421)  # the wildcard is no name


def test_a_request_without_a_host_header_is_answered(client: TestClient) -> None:
    """HTTP/1.0 has no Host; rebinding needs a browser, and a browser always sends one."""
    assert client.simulate_get(LIVE, http_version="1.0").status == falcon.HTTP_200


@pytest.mark.parametrize(
    "host", ["evil.example@127.0.0.1", "127.0.0.1 evil", "[::1", "127.0.0.1:99999", "a/b", ""]
)
def test_a_malformed_host_header_is_400_naming_it(client: TestClient, host: str) -> None:
    assert "Host header" in error(get(client, host), falcon.HTTP_400)["description"]


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [("Cron.Example.:80", "cron.example", 80), ("[::1]", "::1", None), ("x", "x", None)],
)
def test_split_authority_normalises_host_and_port(value: str, host: str, port: int | None) -> None:
    assert split_authority(value) == (host, port)


def test_allowed_host_patterns_are_names_addresses_or_subdomain_wildcards() -> None:
    assert parse_host_pattern("LB.Example.") == "lb.example"
    assert parse_host_pattern("*.Svc.Example") == "*.svc.example"
    assert parse_host_pattern("[2001:DB8::7]") == "2001:db8::7"
    for bad in ("lb.example:80", "http://lb.example", "*", "a.*.example", "a b", "", "*."):
        with pytest.raises(ValueError, match="host name"):
            parse_host_pattern(bad)


# -- cross-site ----------------------------------------------------------------------


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",  # a sandboxed page, a file:// page
        "http://127.0.0.1:3000",  # another server on this host
        "https://127.0.0.1:8080",  # another scheme
        "http://localhost:8080",  # another name than the Host the request names
        "http://lb.example.evil.example",
    ],
)
def test_a_form_post_from_a_foreign_origin_is_403_and_queues_no_run(
    client: TestClient, coordination: SQLiteCoordinationStore, origin: str
) -> None:
    result = client.simulate_post(
        TRIGGER, body="x=1", headers={**FORM, "Origin": origin, "Host": "127.0.0.1:8080"}
    )
    assert "cross-site" in error(result, falcon.HTTP_403)["title"].lower()
    # Not even a JSON POST: a page may send one with fetch(), preflighted or not.
    json_post = client.simulate_post(
        TRIGGER, json={}, headers={"Origin": origin, "Host": "127.0.0.1:8080"}
    )
    assert error(json_post, falcon.HTTP_403)
    assert coordination.pending_triggers() == []


def test_the_peers_own_origins_may_post(
    coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    settings = Settings(advertise_url="https://cron-1.example", api_allowed_hosts=("lb.example",))
    client = client_for(coordination, reports, settings)
    for origin, host in [
        ("https://cron-1.example", "127.0.0.1:8080"),  # the advertised URL
        ("https://cron-1.example:443", "127.0.0.1:8080"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),  # the request's own scheme and Host
        ("http://localhost", "localhost"),
        ("https://lb.example:8443", "lb.example"),  # an --api-allowed-host, on any port
    ]:
        result = client.simulate_post(TRIGGER, json={}, headers={"Origin": origin, "Host": host})
        assert result.status == falcon.HTTP_202, (origin, result.text)
    assert coordination.pending_triggers() != []


def test_a_browser_saying_cross_site_is_403_even_without_an_origin(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    refused = client.simulate_post(TRIGGER, headers={"Sec-Fetch-Site": "cross-site"})
    assert "Sec-Fetch-Site" in error(refused, falcon.HTTP_403)["description"]
    assert coordination.pending_triggers() == []
    for site in ("same-origin", "none"):
        assert client.simulate_post(TRIGGER, headers={"Sec-Fetch-Site": site}).status_code == 202


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", "x=1"),
        ("multipart/form-data; boundary=b", "--b--"),
        ("text/plain", '{"looks": "like json"}'),
        ("text/plain", ""),  # a form with no fields says what it is
        (None, "{}"),  # a body must say it is JSON
    ],
)
def test_a_body_that_is_not_declared_json_is_415_even_from_the_peers_own_origin(
    client: TestClient, coordination: SQLiteCoordinationStore, content_type: str | None, body: str
) -> None:
    headers = {"Origin": OWN, "Host": "127.0.0.1:8080"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    result = client.simulate_post(TRIGGER, body=body, headers=headers)
    assert "application/json" in error(result, falcon.HTTP_415)["description"]
    assert coordination.pending_triggers() == []


def test_a_json_body_or_none_at_all_is_taken(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    assert client.simulate_post(TRIGGER).status_code == 202
    typed = {"Content-Type": "application/json; charset=utf-8"}
    assert client.simulate_post(TRIGGER, body="{}", headers=typed).status_code == 202
    assert coordination.pending_triggers() != []


def test_reads_from_a_foreign_origin_are_answered_without_letting_the_page_read_them(
    client: TestClient,
) -> None:
    result = client.simulate_get("/api/v1/jobs", headers={"Origin": "http://evil.example"})
    assert result.status == falcon.HTTP_200
    assert "access-control-allow-origin" not in result.headers  # the browser hides it


def test_the_cross_site_checks_hold_without_a_host_check_and_with_a_valid_token(
    coordination: SQLiteCoordinationStore, reports: SQLiteReportStore, tmp_path: Path
) -> None:
    token = new_token()
    table = tmp_path / "api-tokens.json"
    entry = {"name": "ops", "role": "operate", "sha256": token_digest(token)}
    table.write_text(json.dumps({"tokens": [entry]}))
    app = create_app(coordination, reports, "peer-a", tokens=TokenSource(table))  # no hosts
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}
    foreign = client.simulate_post(TRIGGER, json={}, headers={**auth, "Origin": "http://e.x"})
    assert error(foreign, falcon.HTTP_403)
    assert error(
        client.simulate_post(TRIGGER, body="x=1", headers={**auth, **FORM}),
        "415 Unsupported Media Type",
    )
    assert coordination.pending_triggers() == []
    assert client.simulate_post(TRIGGER, json={}, headers=auth).status_code == 202


def test_a_refused_cross_site_request_is_audited(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distcrond.audit")
    client.simulate_post(TRIGGER, json={}, headers={"Origin": "http://evil.example"})
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "distcrond.audit"]
    assert [(a["method"], a["path"], a["status"]) for a in audited] == [("POST", TRIGGER, 403)]
