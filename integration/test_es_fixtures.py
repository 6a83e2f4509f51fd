"""The Elasticsearch test node: healthy, usable over plain HTTP, unprivileged, small, loopback.

Run with the fixtures loaded as a plugin::

    .venv/bin/python -m pytest -p integration.es_fixtures integration/test_es_fixtures.py
"""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
import requests

from deploy.services.elasticsearch import USER, Elasticsearch
from integration.es_fixtures import delete_test_indices

pytestmark = pytest.mark.timeout(300)

MAX_HEAP = 512 * 1024 * 1024


def _status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc shows addresses as host-order 32-bit words (little-endian here).
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            if len(words) == 4:
                address = ".".join(str(b) for b in words)
            elif words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
                address = ".".join(str(b) for b in words[12:])
            else:
                address = ":".join(words[i : i + 2].hex() for i in range(0, 16, 2))
            found.add((address, int(hex_port, 16)))
    return found


def test_cluster_is_healthy(es_url: str) -> None:
    health = requests.get(f"{es_url}/_cluster/health", timeout=10).json()
    assert health["status"] in ("green", "yellow"), health
    assert health["number_of_nodes"] == 1


def test_index_and_document_round_trip(es_url: str, es_index_prefix: str) -> None:
    index = f"{es_index_prefix}reports"
    settings = {"settings": {"number_of_replicas": 0}}
    created = requests.put(f"{es_url}/{index}", json=settings, timeout=10)
    assert created.status_code == 200, created.text
    doc = {"job": "backup", "host": "web-1", "exit_code": 0, "at": "2026-01-02T03:04:05Z"}
    put = requests.put(f"{es_url}/{index}/_doc/run-1?refresh=true", json=doc, timeout=10)
    assert put.status_code == 201, put.text

    got = requests.get(f"{es_url}/{index}/_doc/run-1", timeout=10).json()
    assert got["found"] is True
    assert got["_source"] == doc

    query = {"query": {"term": {"job.keyword": "backup"}}}
    hits = requests.post(f"{es_url}/{index}/_search", json=query, timeout=10).json()["hits"]
    assert hits["total"]["value"] == 1
    assert hits["hits"][0]["_id"] == "run-1"


def test_auto_created_index_is_cleaned_between_tests(es_url: str) -> None:
    index = "distcron-test-leftover"
    put = requests.put(f"{es_url}/{index}/_doc/1?refresh=true", json={"a": 1}, timeout=10)
    assert put.status_code == 201, put.text  # action.auto_create_index is left default
    delete_test_indices(es_url)
    assert requests.head(f"{es_url}/{index}", timeout=10).status_code == 404


def test_server_runs_as_unprivileged_user(es_server: Elasticsearch) -> None:
    pid = es_server.pid()
    assert pid is not None
    expected = pwd.getpwnam(USER).pw_uid
    assert expected != 0
    real, effective, saved, fs = (int(u) for u in _status_field(pid, "Uid").split())
    assert real == effective == saved == fs == expected
    launcher = es_server.launcher_pid()
    assert launcher is not None
    assert int(_status_field(launcher, "Uid").split()[1]) == expected


def test_heap_is_at_most_512mb(es_url: str, es_server: Elasticsearch) -> None:
    nodes = requests.get(f"{es_url}/_nodes/stats/jvm", timeout=10).json()["nodes"]
    assert len(nodes) == 1
    mem = next(iter(nodes.values()))["jvm"]["mem"]
    assert 0 < mem["heap_max_in_bytes"] <= MAX_HEAP, mem
    pid = es_server.pid()
    assert pid is not None
    print(
        f"heap max {mem['heap_max_in_bytes'] >> 20} MB, used {mem['heap_used_in_bytes'] >> 20} "
        f"MB; server RSS {_status_field(pid, 'VmRSS')}"
    )


def test_listens_only_on_loopback(es_server: Elasticsearch) -> None:
    pid = es_server.pid()
    assert pid is not None
    listening = _listening_addresses(pid)
    assert {port for _, port in listening} >= {es_server.port, es_server.transport_port}
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening
