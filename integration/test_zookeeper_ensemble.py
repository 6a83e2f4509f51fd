"""The project's own ZooKeeper ensemble: what the coordination tests rely on."""

# The fixtures are imported, so test parameters "redefine" them:

from __future__ import annotations

from collections.abc import Callable

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError

from deploy.services.zookeeper import Ensemble
from integration.peers import wait_for
from integration.zk_fixtures import kazoo_client

pytestmark = [pytest.mark.zookeeper, pytest.mark.timeout(120)]


def leader_of(ensemble: Ensemble) -> int:
    """The one server that reports itself leader (waits through an election)."""

    def single_leader() -> int:  # 0 (falsy: keep polling) until there is exactly one
        leaders = [n for n, mode in ensemble.modes().items() if mode == "leader"]
        return leaders[0] if len(leaders) == 1 else 0

    return wait_for(single_leader, timeout=30, what="exactly one leader")


def test_ensemble_has_one_leader_and_two_followers(zk_ensemble: Ensemble) -> None:
    zk_ensemble.wait_serving(zk_ensemble.ids, timeout=60)

    modes = sorted(mode or "not serving" for mode in zk_ensemble.modes().values())

    assert modes == ["follower", "follower", "leader"]


def test_client_on_all_servers_writes_and_reads(zk_hosts: str) -> None:
    with kazoo_client(zk_hosts) as client:
        client.create("/jobs/backup", b"every 5 minutes", makepath=True)
        client.set("/jobs/backup", b"every minute")

        data, stat = client.get("/jobs/backup")

    assert data == b"every minute"
    assert stat.version == 1


def create_idempotently(client: KazooClient, path: str, value: bytes) -> None:
    """Create ``path``; NodeExists counts as success when it holds our value (a retried create)."""
    try:
        client.create(path, value)
    except NodeExistsError:
        assert client.get(path)[0] == value


def _stop(ensemble: Ensemble, n: int) -> None:
    ensemble.stop_server(n)


def _kill(ensemble: Ensemble, n: int) -> None:
    ensemble.kill_server(n)


@pytest.mark.parametrize(
    ("role", "take_down"),
    [("leader", _stop), ("follower", _kill)],
    ids=["leader-stopped", "follower-killed"],
)
def test_quorum_serves_writes_with_one_server_down_and_it_rejoins(
    zk_ensemble: Ensemble,
    zk_hosts: str,
    role: str,
    take_down: Callable[[Ensemble, int], None],
) -> None:
    leader = leader_of(zk_ensemble)
    victim = leader if role == "leader" else next(n for n in zk_ensemble.ids if n != leader)
    chroot = zk_hosts[len(zk_ensemble.hosts) :]
    try:
        with kazoo_client(zk_hosts) as client:
            client.create("/before", b"1")
            take_down(zk_ensemble, victim)
            zk_ensemble.wait_quorum(timeout=30)

            # The client may have been on the server that went away: retry through reconnection.
            client.retry(create_idempotently, client, "/during", b"2")

            assert zk_ensemble.modes()[victim] is None
            assert sorted(client.get_children("/")) == ["before", "during"]

        zk_ensemble.start_server(victim)
        zk_ensemble.wait_serving([victim], timeout=60)
        # The server that was down has caught up: ask it alone.
        with kazoo_client(f"127.0.0.1:{zk_ensemble.client_port(victim)}{chroot}") as alone:
            assert alone.get("/during")[0] == b"2"
        assert sorted(m or "-" for m in zk_ensemble.modes().values()) == [
            "follower",
            "follower",
            "leader",
        ]
    finally:
        zk_ensemble.start_server(victim)
        zk_ensemble.wait_serving(zk_ensemble.ids, timeout=60)


_chroots_seen: list[str] = []


@pytest.mark.parametrize("test_number", [1, 2])
def test_each_test_gets_its_own_empty_chroot(zk_hosts: str, test_number: int) -> None:
    chroot = zk_hosts.split("/", 1)[1]
    assert chroot.startswith("distcron-test-")
    assert chroot not in _chroots_seen
    _chroots_seen.append(chroot)

    with kazoo_client(zk_hosts) as client:
        assert client.get_children("/") == []
        # The same absolute name in every test: it would collide without the chroot.
        client.create("/election/lock", str(test_number).encode(), makepath=True)
        assert client.get("/election/lock")[0] == str(test_number).encode()


def test_chroot_data_lives_under_its_own_path(zk_ensemble: Ensemble, zk_hosts: str) -> None:
    chroot = zk_hosts[len(zk_ensemble.hosts) :]
    with kazoo_client(zk_hosts) as client:
        client.create("/secret", b"mine")

    with kazoo_client(zk_ensemble.hosts) as root:
        assert root.get(f"{chroot}/secret")[0] == b"mine"
        assert not root.exists("/secret")


def test_servers_collect_concurrently_in_a_256mb_heap(zk_ensemble: Ensemble) -> None:
    # A stop-the-world collection of a server stalls every peer's runs (see the
    # architecture doc): each JVM must say, in its own GC log, that it runs ZGC, capped.
    for n in zk_ensemble.ids:
        log = zk_ensemble.gc_log_file(n).read_text()
        assert "Using The Z Garbage Collector" in log, f"server {n}: {log[:2000]}"
        assert "Max Capacity: 256M" in log, f"server {n}: {log[:2000]}"
