"""schemathesis against the real peer under gunicorn: every operation of the served
OpenAPI document, fuzzed from it, with an admin token and without one. Its checks: no
5xx, every answer's body matches the documented schema, its status code is documented,
and its content type is the documented one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distcrond.config.tokens import new_token, token_digest
from integration.peers import Peer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
    ]
)
ADMIN = new_token()


@pytest.fixture
def fuzzed(make_peer, tmp_path: Path) -> Peer:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "api-tokens.json"
    entry = {"name": "fuzzer", "role": "admin", "sha256": token_digest(ADMIN)}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    peer: Peer = make_peer(extra_args=["--api-tokens", str(tokens)])
    peer.write_node("local", {"connection_type": "local", "roles": ["web"]})
    peer.write_job("hello", {"schedule": {"interval": "1h"}, "command": ["/bin/echo", "hi"]})
    peer.write_job("daily", {"schedule": {"cron": "10 3 * * *"}, "command": ["/bin/true"]})
    peer.write_job("broken", {"schedule": {"interval": "soon"}, "command": []})  # an error
    peer.token = ADMIN
    return peer.start()


def schemathesis(peer: Peer, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # The document itself needs a token (every GET but the liveness check does): read it
    # with one, then let schemathesis call the peer with or without, as ``extra`` says.
    document = tmp_path / "openapi.json"
    document.write_text(peer.get("/api/v1/openapi.json").text)
    argv = [
        SCHEMATHESIS,
        "--no-color",
        "run",
        str(document),
        "--url",
        peer.url,
        "--checks",
        CHECKS,
        "--max-examples",
        "40",
        "--seed",
        "1",  # the same cases on every run: a failure found is one that reproduces
        "--report-dir",
        str(tmp_path / "report"),
        *extra,
    ]
    env = os.environ | {"SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=540, env=env)
    print(done.stdout[-4000:])  # the summary: what it tried and found (-s shows it)
    return done


def test_schemathesis_finds_nothing_with_an_admin_token(fuzzed: Peer, tmp_path: Path) -> None:
    done = schemathesis(fuzzed, tmp_path, "--header", f"Authorization: Bearer {ADMIN}")
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "Tested: " in done.stdout and " passed" in done.stdout
    assert fuzzed.proc is not None and fuzzed.proc.poll() is None  # the peer still runs
    assert fuzzed.get("/api/v1/health/live").status_code == 200


def test_schemathesis_finds_nothing_without_a_token(fuzzed: Peer, tmp_path: Path) -> None:
    """Every operation but the liveness check answers 401, as documented."""
    done = schemathesis(fuzzed, tmp_path)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
