"""DNS rebinding and cross-site requests against the real daemon under gunicorn: a foreign
Host is refused, a form POST from another site triggers nothing, distcronctl still works."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from integration.peers import DISTCRONCTL, Peer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

LIVE = "/api/v1/health/live"
TRIGGER = "/api/v1/jobs/hello/runs"


@pytest.fixture
def behind_a_balancer(peer: Peer) -> Peer:
    """A peer without tokens on loopback (the most exposed to a browser on its host), that
    a load balancer also reaches as cron.example."""
    peer.extra_args += ["--api-allowed-host", "cron.example"]
    peer.write_job("hello", {"schedule": {"interval": "24h"}, "command": ["/bin/echo", "hi"]})
    return peer.start()


def test_a_host_the_peer_does_not_answer_to_is_refused_and_an_allowed_one_answered(
    behind_a_balancer: Peer,
) -> None:
    peer = behind_a_balancer
    url = f"{peer.url}{LIVE}"
    refused = requests.get(url, headers={"Host": f"evil.example:{peer.port}"}, timeout=5)
    assert refused.status_code == 421 and refused.headers["Content-Type"].startswith(
        "application/json"
    )
    description = refused.json()["error"]["description"]
    assert "'evil.example'" in description and "--api-allowed-host" in description
    assert requests.get(url, headers={"Host": "Cron.Example"}, timeout=5).status_code == 200
    assert requests.get(url, timeout=5).status_code == 200  # 127.0.0.1:port, loopback
    rebound = requests.post(
        f"{peer.url}{TRIGGER}", json={}, headers={"Host": "evil.example"}, timeout=5
    )
    assert rebound.status_code == 421


def test_a_cross_site_form_post_triggers_nothing_and_distcronctl_still_does(
    behind_a_balancer: Peer,
) -> None:
    peer = behind_a_balancer
    url = f"{peer.url}{TRIGGER}"
    forged = requests.post(
        url, data={"x": "1"}, headers={"Origin": "http://evil.example"}, timeout=5
    )
    assert forged.status_code == 403, forged.text
    assert forged.json()["error"]["title"] == "Cross-site request"
    marked = requests.post(url, headers={"Sec-Fetch-Site": "cross-site"}, timeout=5)
    assert marked.status_code == 403
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        typed = requests.post(
            url, data="x=1", headers={"Content-Type": content_type, "Origin": peer.url}, timeout=5
        )
        assert typed.status_code == 415, typed.text

    done = subprocess.run(
        [DISTCRONCTL, "--url", peer.url, "trigger", "hello"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.split()[0]
    peer.wait_run(run_id, ("succeeded",))
    # Requests queued before it would have run by now: none was.
    runs = peer.get(TRIGGER).json()
    assert [r["run_id"] for r in runs["runs"]] == [run_id] and runs["active"] == []

    def audited() -> list[tuple[str, int]] | None:
        lines = [
            json.loads(line[line.index("{") :])
            for line in peer.log().splitlines()
            if "distcrond.audit" in line and TRIGGER in line
        ]
        return [(a["method"], a["status"]) for a in lines] if len(lines) >= 5 else None

    statuses = wait_for(audited, 10, "the audit lines of the five POSTs")
    assert statuses == [("POST", 403), ("POST", 403), ("POST", 415), ("POST", 415), ("POST", 202)]
