"""HTTPS against the real daemon under gunicorn: --tls-cert/--tls-key serve it, the
published URL says https, distcronctl verifies it with --ca-cert, and nothing is served
in clear on that port."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests

from integration.peers import DISTCRONCTL, DISTCROND, Peer, free_port
from integration.tls import make_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
def https_peer(make_peer, tmp_path: Path) -> Peer:  # type: ignore[no-untyped-def]
    peer: Peer = make_peer()
    peer.tls = make_tls_files(tmp_path / "tls")
    peer.write_node("local", {"connection_type": "local"})
    peer.write_job("hello", {"schedule": {"interval": "1h"}, "command": ["/bin/echo", "hello"]})
    return peer.start()


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISTCRON_")}
    return subprocess.run(
        [DISTCRONCTL, *args], capture_output=True, text=True, timeout=30, env=environ | (env or {})
    )


def test_the_api_is_served_over_https_and_publishes_an_https_url(https_peer: Peer) -> None:
    assert https_peer.url.startswith("https://")
    jobs = https_peer.get("/api/v1/jobs")
    assert jobs.status_code == 200 and [j["id"] for j in jobs.json()["jobs"]] == ["hello"]
    trigger = https_peer.post("/api/v1/jobs/hello/runs")
    assert trigger.status_code == 202
    assert https_peer.wait_run(trigger.json()["run_id"], ("succeeded",))["state"] == "succeeded"
    peers = https_peer.get("/api/v1/cluster").json()["peers"]
    assert [p["api_url"] for p in peers] == [f"https://127.0.0.1:{https_peer.port}"]


def test_nothing_is_served_in_clear_on_the_https_port(https_peer: Peer) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{https_peer.port}/api/v1/health/live", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):  # and no client trusts it blindly
        requests.get(f"{https_peer.url}/api/v1/health/live", timeout=5)
    assert https_peer.get("/api/v1/health/live").status_code == 200  # still serving


def test_distcronctl_verifies_the_peer_with_its_ca_and_refuses_an_unknown_one(
    https_peer: Peer, tmp_path: Path
) -> None:
    assert https_peer.tls is not None
    url = https_peer.url
    ok = ctl("--url", url, "--ca-cert", str(https_peer.tls.ca), "jobs")
    assert ok.returncode == 0, ok.stderr
    assert "hello" in ok.stdout
    by_env = ctl("--url", url, "jobs", env={"DISTCRON_CA_CERT": str(https_peer.tls.ca)})
    assert by_env.returncode == 0, by_env.stderr

    other_ca = make_tls_files(tmp_path / "other").ca
    for args in (["--url", url, "jobs"], ["--url", url, "--ca-cert", str(other_ca), "jobs"]):
        refused = ctl(*args)
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "TLS certificate is not trusted" in lines[0] and "--ca-cert" in lines[0]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert needs --tls-key"),
        (["--tls-key", "{key}"], "--tls-key needs --tls-cert"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing}: no such file"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], "not a PEM certificate and its key"),
    ],
)
def test_bad_tls_flags_stop_the_peer_at_start_naming_the_flag(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    files = make_tls_files(tmp_path / "tls")
    values = {"cert": str(files.cert), "key": str(files.key), "missing": str(tmp_path / "no.pem")}
    argv = [
        DISTCROND,
        "--jobs-dir", str(tmp_path), "--nodes-dir", str(tmp_path),
        "--state-dir", str(tmp_path / "state"), "--bind", f"127.0.0.1:{free_port()}",
        *(f.format(**values) for f in flags),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert named.format(**values) in done.stderr
