"""Routine faults on a busy cluster: after each, runs must start again within a bound.

Three real peers (the `distcrond` command under gunicorn) on the real three-server
ensemble, with the 4 s session of a default deployment and 20 jobs every second
(spread over the second, misfire run_all), each appending its run id to a ledger.
A fault test that only counts duplicates passes on a cluster that has stopped, so
each test measures the time until a run *scheduled after the fault* starts, and
checks the leader's health says it schedules again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deploy.services.zookeeper import Ensemble
from integration.cluster import Cluster, duplicates, ledger_job, wait_scheduled_run
from integration.peers import ledger_lines, wait_for

pytestmark = [pytest.mark.zookeeper, pytest.mark.timeout(240)]

SESSION = 4.0
JOBS = 20
# Runs start again within this long of a ZooKeeper server's loss, or of the end of a
# leader's pause shorter than its session (the bound).
RECOVERY = 1.0


@pytest.fixture
def busy(zk_hosts: str, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    ledger = tmp_path / "ledger"
    cluster = Cluster(tmp_path / "cluster", zk_hosts, session_timeout=SESSION)
    for n in range(JOBS):
        cluster.write_job(
            f"tick-{n:02d}",
            ledger_job(
                ledger,
                schedule={"every": "1s", "fuzzy": True},
                misfire={"policy": "run_all"},
            ),
        )
    cluster.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 2 * JOBS, 30, "the first runs of every job")
    yield cluster, ledger
    cluster.stop()


def assert_schedules(cluster: Cluster) -> None:
    """Every peer's health says a leader completed a pass within the stall timeout."""
    for peer in cluster.alive():
        body = wait_for(
            lambda p=peer: (
                (r := requests.get(f"{p.url}/api/v1/health", timeout=5)).status_code == 200
                and r.json()
            ),
            10,
            f"{peer.peer_id}'s health to say the cluster schedules",
        )
        assert body["scheduler"]["ok"] is True
        assert (
            body["scheduler"]["last_pass_age_seconds"] < body["scheduler"]["stall_timeout_seconds"]
        )


def zookeeper_leader(ensemble: Ensemble) -> int:
    return next(n for n, mode in ensemble.modes().items() if mode == "leader")


def test_runs_start_again_within_a_second_after_the_zookeeper_leader_server_is_killed(
    busy: tuple[Cluster, Path], zk_ensemble: Ensemble
) -> None:
    cluster, ledger = busy
    recoveries = []
    for _ in range(2):
        server = zookeeper_leader(zk_ensemble)
        killed_at = time.time()
        zk_ensemble.kill_server(server)
        line = wait_scheduled_run(ledger, killed_at, killed_at, timeout=SESSION + 30)
        recoveries.append(float(line[2]) - killed_at)
        assert_schedules(cluster)
        zk_ensemble.start_server(server)
        zk_ensemble.wait_serving(zk_ensemble.ids)
        assert_schedules(cluster)

    print(f"runs started again {[round(r, 3) for r in recoveries]} s after the kill")
    assert max(recoveries) < RECOVERY, recoveries
    assert duplicates(ledger) == []


def test_runs_start_again_within_a_second_after_the_leader_is_paused_for_two_seconds(
    busy: tuple[Cluster, Path],
) -> None:
    cluster, ledger = busy
    recoveries = []
    for _ in range(2):
        leader = cluster.leader()
        stopped_at = time.time()
        leader.signal(signal.SIGSTOP)
        try:
            time.sleep(2.0)  # the fault itself: a 2 s pause, under the 4 s session
        finally:
            leader.signal(signal.SIGCONT)
        resumed_at = time.time()
        line = wait_scheduled_run(ledger, stopped_at, resumed_at, timeout=SESSION + 30)
        recoveries.append(float(line[2]) - resumed_at)
        assert_schedules(cluster)

    print(f"runs started again {[round(r, 3) for r in recoveries]} s after SIGCONT")
    assert max(recoveries) < RECOVERY, recoveries
    assert duplicates(ledger) == []


def test_runs_start_again_within_a_second_of_zookeeper_regaining_its_quorum(
    busy: tuple[Cluster, Path], zk_ensemble: Ensemble
) -> None:
    cluster, ledger = busy
    lost = [n for n in zk_ensemble.ids if n != zookeeper_leader(zk_ensemble)]
    for n in lost:  # both followers: the leader server alone has no quorum
        zk_ensemble.kill_server(n)
    stopped_at = time.time()
    time.sleep(SESSION + 2)  # the fault itself: no quorum for longer than the session
    for n in lost:
        zk_ensemble.start_server(n)
    zk_ensemble.wait_quorum()
    serving_at = time.time()

    line = wait_scheduled_run(ledger, stopped_at, serving_at, timeout=SESSION + 30)
    recovery = float(line[2]) - serving_at
    print(f"runs started again {recovery:.3f} s after the quorum came back")
    assert recovery < RECOVERY
    assert_schedules(cluster)
    assert duplicates(ledger) == []


def test_every_peers_health_is_503_while_no_leader_schedules_and_200_once_one_does(
    zk_hosts: str, tmp_path: Path
) -> None:
    cluster = Cluster(
        tmp_path / "cluster",
        zk_hosts,
        session_timeout=SESSION,
        extra_args=["--leader-stall-timeout", "1s"],
    )
    try:
        cluster.write_job("tick", ledger_job(tmp_path / "ledger"))
        cluster.start()
        assert_schedules(cluster)
        old = cluster.leader()
        cluster.kill9(old)  # no leader until its session expires, 4 s > the stall timeout
        for peer in cluster.alive():
            body = wait_for(
                lambda p=peer: (
                    (r := requests.get(f"{p.url}/api/v1/health", timeout=5)).status_code == 503
                    and r.json()
                ),
                SESSION,
                f"{peer.peer_id}'s health to say nothing schedules",
            )
            assert body["scheduler"]["ok"] is False and body["stores"]["coordination"]["ok"]
            metrics = requests.get(f"{peer.url}/metrics", timeout=5).text
            age = next(
                float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith("distcron_scheduler_last_pass_age_seconds ")
            )
            assert age > 1.0
        cluster.leader(other_than=old.peer_id, timeout=SESSION + 10)
        assert_schedules(cluster)
    finally:
        cluster.stop()
