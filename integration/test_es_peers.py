"""Real peers reporting to the real Elasticsearch: the spool, outages, restarts, the API.

Every peer is the `distcrond` command with its gunicorn API; Elasticsearch is the
session's real node (integration/es_fixtures.py), stopped and started again by
the outage test. Jobs prove that they ran by appending their run id to a ledger;
the tests then count, by run id, what Elasticsearch holds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.services.elasticsearch import Elasticsearch, http_json
from integration.cluster import Cluster, duplicates, ledger_job
from integration.peers import Peer, free_port, ledger_lines, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.elasticsearch, pytest.mark.timeout(300)]

OUTAGE_S = 20.0
ES_START_TIMEOUT = 120.0


def es_docs(url: str, prefix: str) -> list[dict[str, Any]]:
    """Every report document under ``prefix`` (after a refresh), as stored."""
    http_json(f"{url}/{prefix}*/_refresh?allow_no_indices=true", method="POST")
    status, body = http_json(
        f"{url}/{prefix}*/_search?allow_no_indices=true",
        method="POST",
        body={"size": 10000, "query": {"match_all": {}}, "_source": ["run_id", "peer_id", "state"]},
    )
    assert status == 200, body
    return [hit["_source"] | {"_id": hit["_id"]} for hit in body["hits"]["hits"]]


def es_counts(url: str, prefix: str) -> Counter[str]:
    """How many documents Elasticsearch holds per run id."""
    return Counter(doc["run_id"] for doc in es_docs(url, prefix))


def ledger_ids(ledger: Path) -> set[str]:
    return {line[0] for line in ledger_lines(ledger)}


def es_args(url: str, prefix: str) -> list[str]:
    return ["--es-url", url, "--es-index-prefix", prefix]


def spooled(peer: Peer) -> int:
    """Reports waiting in the peer's spool, as its health endpoint tells."""
    body = peer.get("/api/v1/health").json()
    return int(body["report_spool"]["reports"])


def spool_segments(peer: Peer) -> list[Path]:
    return sorted((peer.state_dir / "report-spool").glob("*.ndjson"))


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.kill()


def test_a_peer_killed_with_reports_in_its_spool_delivers_them_after_restart(
    es_url: str, es_index_prefix: str, tmp_path: Path, peers: list[Peer]
) -> None:
    ledger = tmp_path / "ledger"
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens: Elasticsearch is "down"
    peer = Peer(tmp_path / "peer", extra_args=es_args(unreachable, es_index_prefix))
    peers.append(peer)
    peer.write_node("local", {"roles": [], "connection_type": "local"})
    peer.write_job("tick", ledger_job(ledger, "1s"))
    # Its reports cannot be delivered, so the store is "degraded": do not wait for a 200.
    peer.start(wait=False)
    wait_for(lambda: peer.get("/api/v1/health").status_code in (200, 503), 30, "the API")
    wait_for(lambda: spooled(peer) >= 3, 30, "three reports in the spool")
    health = peer.get("/api/v1/health").json()
    assert health["stores"]["reports"]["ok"] is False
    assert health["report_spool"]["last_error"]
    assert health["report_spool"]["oldest_age_s"] > 0
    metrics = peer.get("/metrics").text
    assert "distcron_report_spool_reports" in metrics

    peer.kill9()
    before_kill = ledger_ids(ledger)
    assert len(before_kill) >= 3
    assert spool_segments(peer), "the spool's files are gone with the process"
    assert es_counts(es_url, es_index_prefix) == Counter()

    peer.extra_args = es_args(es_url, es_index_prefix)
    peer.start(wait=True)

    def delivered() -> bool:
        return before_kill <= set(es_counts(es_url, es_index_prefix))

    wait_for(delivered, 60, "the spooled reports to reach Elasticsearch")
    counts = es_counts(es_url, es_index_prefix)
    assert all(counts[run_id] == 1 for run_id in before_kill)
    wait_for(lambda: spooled(peer) == 0, 30, "the spool to drain")
    assert peer.get("/api/v1/health").json()["report_spool"]["last_error"] == ""


def test_output_is_stored_bounded_and_valid_and_searchable_from_the_api(
    es_url: str, es_index_prefix: str, tmp_path: Path, peers: list[Peer]
) -> None:
    peer = Peer(tmp_path / "peer", extra_args=es_args(es_url, es_index_prefix))
    peers.append(peer)
    peer.write_node("local", {"roles": [], "connection_type": "local"})
    # 10 MB of output with bytes that are not UTF-8 (0xff, 0xfe, a lone 0xc3); the job lets
    # the runner keep 16 MiB of it, more than the report store takes.
    chunk = r"zebra \377\376 caf\303\251 \303 "
    peer.write_job(
        "noisy",
        {
            "schedule": {"interval": "24h", "reference": "00:00"},
            "shell": True,
            "command": f"yes \"$(printf '{chunk}')\" | head -c 10485760",
            "max_output_bytes": 16 * 1024 * 1024,
        },
    )
    peer.write_job(
        "quiet",
        {
            "schedule": {"interval": "24h", "reference": "00:00"},
            "command": ["echo", "nothing to see"],
        },
    )
    peer.start()

    noisy = peer.post("/api/v1/jobs/noisy/runs").json()["run_id"]
    quiet = peer.post("/api/v1/jobs/quiet/runs").json()["run_id"]
    peer.wait_run(noisy, ("succeeded",), timeout=60)
    peer.wait_run(quiet, ("succeeded",), timeout=30)

    def reported(run_id: str) -> dict[str, Any] | None:
        view: dict[str, Any] = peer.get(f"/api/v1/runs/{run_id}").json()
        return view if view.get("source") == "reports" else None

    # The record is final at once; the report reaches Elasticsearch through the spool.
    view = wait_for(lambda: reported(noisy), 30, "the report in Elasticsearch")
    wait_for(lambda: reported(quiet), 30, "the report in Elasticsearch")

    # The document as Elasticsearch holds it: valid JSON, bounded, the bad bytes replaced.
    index = f"{es_index_prefix}{view['slot'][:7].replace('-', '.')}"
    status, raw = http_json(f"{es_url}/{index}/_doc/{noisy}")
    assert status == 200, raw
    stdout = raw["_source"]["stdout"]
    assert len(stdout.encode()) <= 1024 * 1024 + 200  # the store's 1 MiB bound, plus its marker
    assert "\ufffd" in stdout and "zebra" in stdout
    assert raw["_source"]["output_truncated"] is True
    json.dumps(raw["_source"], ensure_ascii=False).encode("utf-8")  # no lone surrogate left

    def search(**params: str) -> list[str]:
        return [r["run_id"] for r in peer.get("/api/v1/runs", **params).json()["runs"]]

    # Searches see a document after the index's next refresh (within about a second).
    wait_for(lambda: search(q="zebra") == [noisy], 10, "the search to find the noisy run")
    assert search(q="nothing see") == [quiet]
    assert search(q="zebra", job="quiet") == []


@pytest.mark.zookeeper
def test_a_cluster_loses_no_report_through_a_20s_elasticsearch_outage(
    es_server: Elasticsearch,
    es_url: str,
    es_index_prefix: str,
    zk_hosts: str,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger"
    cluster = Cluster(
        tmp_path / "cluster",
        zk_hosts,
        session_timeout=2.0,
        extra_args=es_args(es_url, es_index_prefix),
    )
    cluster.write_job("tick", ledger_job(ledger, "1s", misfire={"policy": "run_all"}))
    try:
        cluster.start()
        wait_for(lambda: len(es_counts(es_url, es_index_prefix)) >= 3, 30, "reports in ES")

        es_server.stop()
        stopped = time.monotonic()
        try:
            leader = cluster.leader()
            victim = next(p for p in cluster.peers if p is not leader)
            # Runs go on; their reports wait in the spools, one of which dies with its peer.
            wait_for(lambda: spooled(victim) >= 1, 30, f"a report in {victim.peer_id}'s spool")
            cluster.kill9(victim)
            assert spool_segments(victim)
            wait_for(lambda: time.monotonic() - stopped >= OUTAGE_S, OUTAGE_S + 5, "the outage")
            waiting = sum(spooled(p) for p in cluster.alive())
            assert waiting > 0
        finally:
            es_server.start(timeout=ES_START_TIMEOUT)
        victim.start(wait=True, leader=False)

        def all_delivered() -> bool:
            return ledger_ids(ledger) <= set(es_counts(es_url, es_index_prefix))

        wait_for(all_delivered, 90, "every executed run's report in Elasticsearch")
        for peer in cluster.peers:
            wait_for(lambda p=peer: spooled(p) == 0, 60, f"{peer.peer_id}'s spool to drain")
        # Every peer's API reads the same history from Elasticsearch.
        victim_runs = sorted(line[0] for line in ledger_lines(ledger) if line[1] == victim.peer_id)
        assert victim_runs
        for peer in cluster.peers:
            view = peer.get(f"/api/v1/runs/{victim_runs[0]}").json()
            assert (view["source"], view["peer_id"]) == ("reports", victim.peer_id), peer.peer_id
    finally:
        cluster.stop()

    executed = ledger_ids(ledger)
    counts = es_counts(es_url, es_index_prefix)
    assert duplicates(ledger) == []
    assert executed <= set(counts)
    assert [run_id for run_id, n in counts.items() if n != 1] == []
    # The victim's own reports came from its spool after the restart: nobody else writes them.
    docs = {doc["run_id"]: doc for doc in es_docs(es_url, es_index_prefix)}
    assert all(docs[r]["peer_id"] == victim.peer_id for r in victim_runs)
