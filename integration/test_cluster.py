"""Three real peers on the real three-server ZooKeeper ensemble: election, dispatch, failover.

Every peer is the `distcrond` command with its gunicorn API, started as a
process; the tests act on them only through signals, files and HTTP. Jobs
prove where and when they ran by appending their run id and peer to a ledger.
The session timeout is 2 s (the test ensemble's tickTime of 500 ms allows 1-10 s).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from kazoo.exceptions import NoAuthError

from deploy.services.zookeeper import Ensemble
from distcrond.coordination.zookeeper import ZooKeeperCoordinationStore
from distcrond.runs import run_id_for, split_run_id
from integration.cluster import Cluster, duplicates, ledger_job, wait_new_lines
from integration.peers import descendants, ledger_lines, wait_for
from integration.zk_fixtures import kazoo_client

pytestmark = [pytest.mark.zookeeper, pytest.mark.timeout(240)]

SESSION = 2.0


@pytest.fixture
def cluster(zk_hosts: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", zk_hosts, session_timeout=SESSION)
    yield c
    c.stop()


def leaders_by_health(cluster: Cluster) -> list[str]:
    return [
        p.peer_id
        for p in cluster.alive()
        if requests.get(f"{p.url}/api/v1/health", timeout=5).json()["is_leader"]
    ]


def run_view(peer_url: str, run_id: str) -> dict[str, object]:
    r = requests.get(f"{peer_url}/api/v1/runs/{run_id}", timeout=5)
    return r.json() if r.status_code == 200 else {}


def test_three_peers_elect_one_leader_and_every_peer_tells_the_same_story(
    cluster: Cluster, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    cluster.write_job("tick", ledger_job(ledger))
    cluster.start()

    leader = cluster.leader()
    assert leaders_by_health(cluster) == [leader.peer_id]
    views = [cluster.cluster_view(p) for p in cluster.peers]
    assert all(v["leader"] == views[0]["leader"] for v in views)
    assert all(v["epoch"] == views[0]["epoch"] is not None for v in views)
    for view in views:
        assert [p["peer_id"] for p in view["peers"]] == ["peer-1", "peer-2", "peer-3"]
        assert view["drift"] == []

    lines = wait_for(
        lambda: ledger_lines(ledger)[:12] if len(ledger_lines(ledger)) >= 12 else None,
        30,
        "12 runs",
    )
    assert duplicates(ledger) == []
    assert len({peer for _, peer, _ in lines}) >= 2, "runs are spread over the peers"
    run_id, ran_on, _ = lines[0]
    for peer in cluster.peers:
        view = wait_for(
            lambda p=peer: (
                run_view(p.url, run_id).get("state") == "succeeded" and run_view(p.url, run_id)
            ),
            10,
            f"{run_id} on {peer.peer_id}",
        )
        assert view["peer_id"] == ran_on

    follower = next(p for p in cluster.peers if p is not leader)
    r = follower.post("/api/v1/jobs/tick/runs")
    assert r.status_code == 202
    manual = r.json()["run_id"]
    third = next(p for p in cluster.peers if p not in (leader, follower))
    third.wait_run(manual, ("succeeded",))
    assert [line[0] for line in ledger_lines(ledger)].count(manual) == 1


def test_a_peer_with_other_files_is_reported_as_config_drift(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.write_job("tick", ledger_job(tmp_path / "ledger", every="1h"))
    cluster.start()
    leader = cluster.leader()
    odd = next(p for p in cluster.peers if p is not leader)
    odd.write_job("extra", ledger_job(tmp_path / "extra", every="1h"))

    for peer in cluster.peers:
        wait_for(
            lambda p=peer: cluster.cluster_view(p)["drift"] == [odd.peer_id],
            10,
            f"{peer.peer_id} to report the drift of {odd.peer_id}",
        )


def test_a_killed_leader_is_replaced_within_the_session_timeout_and_no_slot_runs_twice(
    cluster: Cluster, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    cluster.write_job("tick", ledger_job(ledger, misfire={"policy": "run_all"}))
    cluster.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 3, 30, "the first runs")

    failovers = []
    for _ in range(3):
        old = cluster.leader()
        killed_at = time.time()
        cluster.kill9(old)
        first = wait_new_lines(ledger, killed_at, SESSION + 10, not_peer=old.peer_id)
        failovers.append(float(first[2]) - killed_at)
        new = cluster.leader(other_than=old.peer_id)
        assert new is not old
        old.start(leader=False)  # back as a follower, same id, for the next round

    print(f"failover after kill -9: {[round(f, 3) for f in failovers]} s")
    assert max(failovers) < SESSION + 1.0, f"failover took {failovers}"
    assert duplicates(ledger) == []

    # misfire run_all: every slot from the first to the last has a run, executed at most once.
    ran = {line[0] for line in ledger_lines(ledger)}
    slots = sorted(split_run_id(run_id)[1] for run_id in ran)
    observer = cluster.leader()
    slot = slots[0]
    missing = []
    while slot <= slots[-1]:
        run_id = run_id_for("tick", slot)
        state = run_view(observer.url, run_id).get("state")
        if run_id not in ran and state != "unknown":
            missing.append((run_id, state))
        slot += timedelta(seconds=1)
    assert missing == []


def test_sigterm_on_the_leader_hands_over_in_under_a_second(cluster: Cluster) -> None:
    cluster.start()
    for _ in range(3):
        old = cluster.leader()
        started = time.monotonic()
        old.signal(signal.SIGTERM)
        new = cluster.leader(other_than=old.peer_id, timeout=10)
        handover = time.monotonic() - started
        assert handover < 1.0, f"handover took {handover:.3f}s"
        assert old.proc is not None and old.proc.wait(30) == 0
        old.start(leader=False)
        assert new is not old


def test_a_leader_paused_past_its_session_is_fenced_and_dispatches_nothing_after(
    cluster: Cluster, zk_hosts: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    cluster.write_job("tick", ledger_job(ledger, every="500ms", misfire={"policy": "run_all"}))
    cluster.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 3, 30, "the first runs")
    old = cluster.leader()
    old_epoch = cluster.cluster_view(old)["epoch"]

    old.signal(signal.SIGSTOP)
    try:
        new = cluster.leader(other_than=old.peer_id, timeout=SESSION + 10)
        new_epoch = cluster.cluster_view(new)["epoch"]
        assert new_epoch > old_epoch
        wait_new_lines(ledger, time.time(), 10, not_peer=old.peer_id)
    finally:
        old.signal(signal.SIGCONT)
    resumed_at = time.time()
    # The old leader wakes up believing it leads: its writes are fenced out.
    wait_for(
        lambda: "fenced out" in old.log() or "leadership of epoch" in old.log(),
        15,
        "the old leader to learn it was deposed",
    )
    wait_new_lines(ledger, resumed_at + 2, 10)

    assert duplicates(ledger) == []
    views = [cluster.cluster_view(p) for p in cluster.peers]
    assert {(v["leader"] or {}).get("peer_id") for v in views} == {new.peer_id}
    store = ZooKeeperCoordinationStore(zk_hosts, session_timeout=SESSION)
    try:
        late = [
            r
            for r in store.runs(job_id="tick")
            if r.created_at and r.created_at.timestamp() > resumed_at
        ]
    finally:
        store.close()
    assert late, "runs were recorded after the old leader resumed"
    assert all(r.epoch >= new_epoch for r in late), [(r.run_id, r.epoch) for r in late]


def test_the_cluster_carries_on_when_one_zookeeper_server_stops(
    cluster: Cluster, zk_ensemble: Ensemble, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    cluster.write_job("tick", ledger_job(ledger, misfire={"policy": "run_all"}))
    cluster.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 2, 30, "the first runs")

    zk_ensemble.stop_server(1)
    stopped_at = time.time()
    wait_for(
        lambda: len([line for line in ledger_lines(ledger) if float(line[2]) > stopped_at]) >= 5,
        30,
        "five runs with one ZooKeeper server down",
    )
    cluster.leader()
    assert duplicates(ledger) == []


def test_a_run_whose_peer_dies_ends_unknown_but_an_at_least_once_run_runs_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    slow = {
        "shell": True,
        "command": f'echo "$DISTCRON_RUN_ID $DISTCRON_PEER" >> {starts}; sleep 3',
    }
    cluster.write_job("once", {"schedule": {"interval": "24h"}, **slow})
    cluster.write_job(
        "again", {"schedule": {"interval": "24h"}, "delivery": "at_least_once", **slow}
    )
    cluster.start()
    leader = cluster.leader()
    for job_id in ("once", "again"):
        run_id = leader.post(f"/api/v1/jobs/{job_id}/runs").json()["run_id"]
        (first,) = wait_for(
            lambda r=run_id: [line for line in ledger_lines(starts) if line[0] == r],
            15,
            f"{run_id} to start",
        )
        victim = cluster.peer(first[1])
        cluster.kill9(victim)
        observer = cluster.leader(other_than=victim.peer_id, timeout=SESSION + 10)
        if job_id == "once":
            run = observer.wait_run(run_id, ("unknown",), timeout=SESSION + 15)
            assert victim.peer_id in str(run["reason"])
            assert [line[0] for line in ledger_lines(starts)].count(run_id) == 1
        else:
            observer.wait_run(run_id, ("succeeded",), timeout=SESSION + 20)
            runs = [line for line in ledger_lines(starts) if line[0] == run_id]
            assert len(runs) == 2 and runs[1][1] != victim.peer_id
        victim.start(leader=False)


def test_finished_run_records_are_pruned_so_zookeeper_stays_bounded(
    zk_hosts: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    single = Cluster(tmp_path / "c", zk_hosts, size=1, extra_args=["--run-retention", "2s"])
    try:
        single.write_job("tick", ledger_job(ledger, every="200ms", concurrency="allow"))
        single.start()
        wait_for(lambda: len(ledger_lines(ledger)) >= 40, 60, "40 runs")
        with kazoo_client(zk_hosts) as client:
            kept = client.get_children("/distcron/runs/tick")
    finally:
        single.stop()
    # 5 runs/s kept 2 s, pruned every second: about 15 records, never the 40 that ran.
    assert len(kept) <= 25, f"{len(kept)} run records kept"


def test_with_digest_auth_the_cluster_works_and_its_znodes_refuse_others(
    zk_hosts: str, tmp_path: Path
) -> None:
    single = Cluster(tmp_path / "c", zk_hosts, size=1, extra_args=["--zk-auth", "ops:s3cret"])
    try:
        single.write_job("tick", ledger_job(tmp_path / "ledger", every="1h"))
        single.start()
        peer = single.peers[0]
        run_id = peer.post("/api/v1/jobs/tick/runs").json()["run_id"]
        peer.wait_run(run_id, ("succeeded",))  # the API workers read with the same identity
        assert peer.proc is not None
        argvs = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(peer.proc.pid)]
        assert argvs and not any(b"s3cret" in argv for argv in argvs)  # not shown by ps
        with kazoo_client(zk_hosts) as client, pytest.raises(NoAuthError):
            client.get_children("/distcron/runs")
    finally:
        single.stop()
