"""The ZooKeeper coordination store beyond the contract: several instances (peers) on one
real ensemble, sessions that expire, connections that drop, ACLs.

Each test gets its own chroot (``zk_hosts``). Waits poll with deadlines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoAuthError, UnimplementedError
from kazoo.protocol.states import KazooState

from distcrond.coordination.base import FencedOut, Finish, PeerInfo, TriggerRequest
from distcrond.coordination.zkpaths import ZKPaths
from distcrond.coordination.zookeeper import ZooKeeperCoordinationStore
from distcrond.runs import RunRecord, RunState, run_id_for
from integration.zk_fixtures import kazoo_client
from tests.contract.test_coordination import Listener, RunEvents

pytestmark = [pytest.mark.zookeeper, pytest.mark.timeout(120)]

T0 = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)
SESSION = 4.0  # seconds: the ensemble's tickTime (500 ms) allows 1-10 s


def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what or predicate}")
        time.sleep(0.005)  # polling a condition with a deadline


def lead(store: ZooKeeperCoordinationStore, peer_id: str) -> int:
    """Stand ``store`` for election as ``peer_id`` and wait until it leads: its epoch."""
    listener = Listener()
    store.start_election(peer_id, listener)
    return listener.epoch()


def run(job_id: str, i: int, peer_id: str) -> RunRecord:
    slot = T0 + timedelta(minutes=i)
    return RunRecord(
        run_id=run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        node_id="n1",
        peer_id=peer_id,
        state=RunState.ASSIGNED,
        created_at=slot,
    )


@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> str:
    """The test's ZooKeeper connection string with its own chroot.

    ``DISTCRON_TEST_ZK=host:port`` points the tests at a developer's server instead
    of the project's ensemble.
    """
    dev_server = os.environ.get("DISTCRON_TEST_ZK")
    if not dev_server:
        return str(request.getfixturevalue("zk_hosts"))
    chroot = f"/distcron-test-{uuid.uuid4().hex}"
    with kazoo_client(dev_server) as client:
        client.ensure_path(chroot)
    return dev_server + chroot


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def make_store(
    hosts: str, stack: ExitStack
) -> Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]]:
    """A store on its own KazooClient (the test may break its connection); closed at the end."""

    def build(
        auth: tuple[str, str] | None = None, op_timeout: float = 10.0
    ) -> tuple[ZooKeeperCoordinationStore, KazooClient]:
        client = KazooClient(
            hosts=hosts,
            timeout=SESSION,
            auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None,
        )
        client.start(timeout=30)
        stack.callback(client.close)
        stack.callback(client.stop)
        store = ZooKeeperCoordinationStore(
            hosts, client=client, auth=auth, session_timeout=op_timeout
        )
        stack.callback(store.close)
        return store, client

    return build


def expire_session(hosts: str, client: KazooClient) -> None:
    """kazoo's harness trick: a second client on the same session id, then closed."""
    states: list[str] = []

    def listen(state: str) -> None:
        states.append(state)

    client.add_listener(listen)
    session_id, password = client.client_id
    for attempt in range(5):
        twin = KazooClient(hosts=hosts, client_id=(session_id, password), timeout=SESSION)
        try:
            twin.start(timeout=30)
        except ConnectionLoss:  # the server may drop the twin's first handshake; try again
            if attempt == 4:
                raise
            continue
        finally:
            twin.stop()
            twin.close()
        break
    eventually(lambda: KazooState.LOST in states, what="the session to be lost")


def caught_up(*clients: KazooClient) -> None:
    """ZooKeeper orders a session's reads after its own writes, not after another
    session's (its server may be a follower a little behind): a client about to check
    what another one wrote first has its server catch up with the leader."""
    for client in clients:
        client.sync("/")


def drop_connection(client: KazooClient) -> None:
    """Cut the TCP connection under kazoo's feet: SUSPENDED, then CONNECTED again in the
    same session (kazoo reconnects at once)."""
    client._connection._socket.shutdown(socket.SHUT_RDWR)


# -- leadership across peers ------------------------------------------------------


def test_stop_election_hands_over_in_well_under_a_second_and_fences_the_old_leader(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (a, client_a), (b, _) = make_store(), make_store()
    la, lb = Listener(), Listener()
    a.start_election("a", la)
    old = la.epoch()
    b.start_election("b", lb)
    assert lb.count("establish") == 0

    started = time.monotonic()
    a.stop_election()
    new = lb.epoch()
    handover = time.monotonic() - started

    assert handover < 1.0, f"handover took {handover:.3f}s"
    assert new > old
    assert la.count("revoke") == 1
    caught_up(client_a)
    leader = a.leader()
    assert leader is not None and (leader.peer_id, leader.epoch) == ("b", new)
    with pytest.raises(FencedOut):
        a.record_runs(old, [run("backup", 0, "a")])
    with pytest.raises(FencedOut):
        b.record_runs(old, [run("backup", 0, "a")])
    assert b.record_runs(new, [run("backup", 0, "b")]) == [run("backup", 0, "b")]
    caught_up(client_a)
    assert a.get_run(run("backup", 0, "b").run_id) == run("backup", 0, "b")


def test_an_expired_leader_is_revoked_fenced_and_contends_again(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (a, client_a), (b, _) = make_store(), make_store()
    la, lb = Listener(), Listener()
    a.start_election("a", la)
    old = la.epoch()
    b.start_election("b", lb)

    expire_session(hosts, client_a)

    # SUSPENDED may come first (and a brief re-establish before LOST): what counts is
    # that a ends revoked and b leads.
    eventually(
        lambda: la.count("revoke") >= 1 and la.events[-1][0] == "revoke",
        what="a to be revoked",
    )
    new = lb.epoch()
    assert new > old
    with pytest.raises(FencedOut):
        a.record_runs(old, [run("backup", 0, "a")])
    assert b.get_run(run("backup", 0, "a").run_id) is None

    # a is back in the election with its new session: it leads when b withdraws.
    eventually(lambda: client_a.state == KazooState.CONNECTED, what="a to reconnect")
    established = la.count("establish")
    b.stop_election()
    eventually(lambda: la.count("establish") > established, what="a to lead again")
    assert la.epoch() > new


def test_a_leader_reconnected_in_its_session_keeps_its_epoch_and_is_never_revoked(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    """A ZooKeeper server's loss suspends every client for a moment. The leader's lock
    node is still its own when it reconnects in the same session, so it goes on leading
    the same epoch: no revoke, no new epoch, no scheduler restart (which cost the cluster
    a few hundred milliseconds of scheduling after every such loss)."""
    store, client = make_store()
    listener = Listener()
    store.start_election("a", listener)
    first = listener.epoch()
    suspended = threading.Event()
    reconnected = threading.Event()

    def states(state: str) -> None:
        if state == KazooState.SUSPENDED:
            suspended.set()
        elif suspended.is_set() and state == KazooState.CONNECTED:
            reconnected.set()

    client.add_listener(states)
    session = client.client_id
    assert store.reconnected_at() is None
    cut = datetime.now(UTC)
    drop_connection(client)  # suspended, then connected again in the same session

    eventually(reconnected.is_set, what="SUSPENDED, then CONNECTED again")
    assert client.client_id == session
    eventually(lambda: store.reconnected_at() is not None, what="the reconnection noted")
    came_back = store.reconnected_at()
    assert came_back is not None and came_back >= cut
    assert store.record_runs(first, [run("backup", 0, "a")]) == [run("backup", 0, "a")]
    leader = store.leader()
    assert leader is not None and (leader.peer_id, leader.epoch) == ("a", first)
    assert [kind for kind, _ in listener.events] == ["establish"]


def test_wait_connected_follows_the_connection(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    """The scheduler starts no pass while the connection is away (wait_connected False),
    and starts one as soon as it is back."""
    store, client = make_store()
    assert store.wait_connected(0)
    away = threading.Event()
    back = threading.Event()

    def states(state: str) -> None:
        if state == KazooState.SUSPENDED:
            away.set()
        elif away.is_set() and state == KazooState.CONNECTED:
            back.set()

    client.add_listener(states)
    store._on_state(KazooState.SUSPENDED)  # what kazoo tells its listeners on a drop
    began = time.monotonic()
    assert not store.wait_connected(0.2)
    assert time.monotonic() - began >= 0.2  # it waited, for nothing
    drop_connection(client)  # a real drop: suspended, then connected again
    eventually(back.is_set, what="SUSPENDED, then CONNECTED again")
    assert store.wait_connected(5)


def test_a_watch_callback_that_blocks_delays_no_change_of_leader(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    store, _ = make_store()
    release = threading.Event()
    blocked = threading.Event()

    def stuck(_record: RunRecord) -> None:  # a watch callback that does not return
        blocked.set()
        release.wait(30)

    listener = Listener()
    try:
        store.watch_runs("a", stuck)
        store.start_election("a", listener)
        first = listener.epoch()
        store.record_runs(first, [run("backup", 0, "a")])
        assert blocked.wait(10), "the watch callback was called"

        store.resign(first)  # a change of leader: revoke, then lead again (alone)

        eventually(lambda: listener.count("revoke") == 1, what="revoke on resigning")
        eventually(lambda: listener.count("establish") == 2, what="leadership again")
        assert listener.epoch() > first
    finally:
        release.set()


def test_resign_hands_leadership_to_the_next_peer_at_once_and_queues_behind_it(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (a, _), (b, _) = make_store(), make_store()
    la, lb = Listener(), Listener()
    a.start_election("a", la)
    old = la.epoch()
    b.start_election("b", lb)

    started = time.monotonic()
    a.resign(old)
    new = lb.epoch()
    handover = time.monotonic() - started

    assert handover < 1.0, f"handover took {handover:.3f}s"
    assert la.count("revoke") == 1 and la.count("establish") == 1  # a waits behind b
    with pytest.raises(FencedOut):
        a.record_runs(old, [run("backup", 0, "a")])
    b.stop_election()
    eventually(lambda: la.count("establish") == 2, what="a to lead after b")
    assert la.epoch() > new


def test_claim_refuses_while_the_session_is_not_connected(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    from distcrond.coordination.base import StoreUnavailable

    store, client = make_store()
    listener = Listener()
    store.start_election("a", listener)
    store.record_runs(listener.epoch(), [run("backup", 0, "a")])
    client.stop()  # CLOSED: as good as suspended for the claim

    with pytest.raises(StoreUnavailable):
        store.claim_run(run("backup", 0, "a").run_id, "a", T0)


# -- membership, heartbeats -----------------------------------------------------------


def peer(peer_id: str) -> PeerInfo:
    return PeerInfo(peer_id=peer_id, api_url=f"http://{peer_id}:8080", started_at=T0, version="1")


def test_a_peer_record_vanishes_with_its_session_and_comes_back_after_expiry(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (a, client_a), (b, client_b) = make_store(), make_store()
    a.register_peer(peer("a"))
    b.register_peer(peer("b"))
    caught_up(client_b)
    assert [p.peer_id for p in b.peers()] == ["a", "b"]

    expire_session(hosts, client_a)
    eventually(lambda: [p.peer_id for p in b.peers()] == ["a", "b"], what="a re-registered")

    a.close()
    client_a.stop()
    eventually(lambda: [p.peer_id for p in b.peers()] == ["b"], what="a's record to vanish")


def test_a_claim_keeps_an_ephemeral_heartbeat_until_the_run_finishes(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, client_l), (executor, client_e) = make_store(), make_store()
    epoch = lead(leader, "l")
    first, second = run("backup", 0, "e"), run("backup", 1, "e")
    leader.record_runs(epoch, [first, second])
    caught_up(client_e)
    paths = ZKPaths()
    with kazoo_client(hosts) as observer:
        assert executor.claim_run(first.run_id, "e", T0) is not None
        assert executor.claim_run(second.run_id, "e", T0) is not None
        caught_up(observer)
        assert observer.exists(paths.heartbeat(first.run_id)) is not None

        executor.finish_run(first.run_id, RunState.SUCCEEDED, ended_at=T0, exit_code=0)
        caught_up(observer, client_l)
        assert observer.exists(paths.heartbeat(first.run_id)) is None
        assert observer.get_children(paths.assignments_of("e")) == [second.run_id]
        assert observer.get_children(paths.active) == []  # only for runs without a peer

        assert leader.executing_runs() == {second.run_id}

        client_e.stop()  # the executing peer dies: its heartbeat goes with its session
        eventually(lambda: observer.exists(paths.heartbeat(second.run_id)) is None)
        caught_up(client_l)
        assert leader.executing_runs() == set()
        assert leader.get_run(second.run_id).state is RunState.RUNNING  # type: ignore[union-attr]


def test_runs_claimed_in_a_lost_session_stay_lost_in_the_next_one(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, client_l), (executor, client_e) = make_store(), make_store()
    epoch = lead(leader, "l")
    before, after = run("backup", 0, "e"), run("backup", 1, "e")
    leader.record_runs(epoch, [before, after])
    caught_up(client_e)
    executor.register_peer(peer("e"))
    assert executor.claim_run(before.run_id, "e", T0) is not None

    expire_session(hosts, client_e)
    eventually(lambda: "e" in [p.peer_id for p in leader.peers()], what="e re-registered")
    caught_up(client_l)
    assert before.run_id not in leader.executing_runs()

    assert executor.claim_run(after.run_id, "e", T0) is not None
    caught_up(client_l)
    assert leader.executing_runs() == {after.run_id}


# -- writes without reads: remembered record versions ------------------------------------


@dataclass
class Pair:
    """A leader and an executing peer "e" watching its runs, each on its own session."""

    leader: ZooKeeperCoordinationStore
    leader_client: KazooClient
    executor: ZooKeeperCoordinationStore
    executor_client: KazooClient
    epoch: int
    events: RunEvents


def leader_and_executor(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> Pair:
    (leader, client_l), (executor, client_e) = make_store(), make_store()
    epoch = lead(leader, "l")
    events = RunEvents()
    executor.watch_runs("e", events)
    return Pair(leader, client_l, executor, client_e, epoch, events)


class Sent:
    """The request types a real KazooClient sends (all of them go through ``_call``); with
    ``refuse``, requests of those types are answered with the error instead of being sent
    (until ``refuse_until``, a time.monotonic() instant), as a server that does not know
    them, or an unreachable one, answers."""

    def __init__(
        self,
        client: KazooClient,
        refuse: tuple[tuple[str, ...], Exception] | None = None,
        refuse_until: float = float("inf"),
    ):
        self.types: Counter[str] = Counter()
        original = client._call

        def call(request: Any, async_object: Any) -> object:
            name = type(request).__name__
            self.types[name] += 1
            if refuse is not None and name in refuse[0] and time.monotonic() < refuse_until:
                async_object.set_exception(refuse[1])
                return False
            return original(request, async_object)

        client._call = call  # type: ignore[method-assign]


def lose_the_first_reply(client: KazooClient, kind: str = "Transaction") -> list[str]:
    """Send the first request of ``kind`` for real, and answer its caller ConnectionLoss
    once the server has answered: a reply lost after the server committed."""
    original = client._call
    lost: list[str] = []

    def call(request: Any, async_object: Any) -> object:
        if type(request).__name__ != kind or lost:
            return original(request, async_object)
        lost.append(kind)
        real = client.handler.async_result()
        real.rawlink(lambda _done: async_object.set_exception(ConnectionLoss()))
        return original(request, real)

    client._call = call  # type: ignore[method-assign]
    return lost


def test_runs_an_attempt_recorded_before_its_reply_was_lost_are_this_calls_and_once(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    """After a lost reply the store reads which runs exist: those with its own payload
    were created by the attempt whose reply was lost, so this call created them."""
    store, client = make_store()
    epoch = lead(store, "l")
    # Run 5 makes the parents of l's runs: the next transaction is the one that records.
    store.record_runs(epoch, [run("backup", 5, "l")])
    lost = lose_the_first_reply(client)
    runs = [run("backup", 1, "l"), run("backup", 2, "l")]

    created = store.record_runs(epoch, runs)

    assert lost == ["Transaction"]  # committed, and its caller saw a ConnectionLoss
    assert created == runs
    assert store.get_runs([r.run_id for r in runs]) == runs
    assert store.record_runs(epoch, runs) == []  # recorded once: not again


def test_runs_handed_to_a_peer_are_claimed_and_finished_in_one_transaction_each_without_reads(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    pair = leader_and_executor(make_store)
    leader, executor, events = pair.leader, pair.executor, pair.events
    runs = [run("backup", i, "e") for i in range(20)]
    leader.record_runs(pair.epoch, runs)
    eventually(lambda: events.run_ids() == {r.run_id for r in runs}, what="the watch")
    sent = Sent(pair.executor_client)

    claimed = executor.claim_runs([r.run_id for r in runs], "e", T0)
    finished = executor.finish_runs([Finish(r.run_id, RunState.SUCCEEDED, T0, 0) for r in runs])

    assert sent.types == {"Transaction": 2}  # no read: the watch read the records
    caught_up(pair.leader_client)
    assert sorted(claimed) == sorted(finished) == sorted(r.run_id for r in runs)
    assert all(leader.get_run(r.run_id).state is RunState.SUCCEEDED for r in runs)  # type: ignore[union-attr]
    assert leader.active_run_ids() == set() and leader.executing_runs() == set()


def test_a_prune_deletes_the_records_a_hundred_to_a_transaction(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    store, client = make_store()
    epoch = lead(store, "l")
    runs = [run("backup", i, "e") for i in range(150)]
    store.record_runs(epoch, runs)
    store.finish_runs([Finish(r.run_id, RunState.SUCCEEDED, T0, 0) for r in runs])
    sent = Sent(client)

    assert store.prune_runs(T0, keep=0) == 150

    assert sent.types["Transaction"] == 2 and sent.types["Delete"] == 1  # the empty bucket
    assert store.runs() == []


def test_a_record_changed_by_another_peer_since_it_was_remembered_is_read_again(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    pair = leader_and_executor(make_store)
    leader, executor, events = pair.leader, pair.executor, pair.events
    cancelled, plain = run("backup", 0, "e"), run("backup", 1, "e")
    leader.record_runs(pair.epoch, [cancelled, plain])
    eventually(lambda: events.run_ids() == {cancelled.run_id, plain.run_id}, what="the watch")
    assert leader.request_cancel(cancelled.run_id)  # its version moves on
    caught_up(pair.executor_client)

    claimed = executor.claim_runs([cancelled.run_id, plain.run_id], "e", T0)
    caught_up(pair.leader_client)

    assert claimed[cancelled.run_id].cancel_requested  # claimed from a fresh read
    assert leader.get_run(cancelled.run_id) == claimed[cancelled.run_id]
    assert leader.request_cancel(plain.run_id)
    finished = executor.finish_runs(
        [Finish(r.run_id, RunState.FAILED, T0, None, "asked") for r in (cancelled, plain)]
    )
    caught_up(pair.leader_client)
    for r in (cancelled, plain):
        record = leader.get_run(r.run_id)
        assert record is not None and finished[r.run_id] == record
        assert (record.state, record.cancel_requested) == (RunState.FAILED, True)
    assert leader.active_run_ids() == set() and leader.executing_runs() == set()


def test_a_run_put_back_to_assigned_after_this_peer_claimed_it_can_be_claimed_again(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    """The executor remembers the runs it claimed as running: a refusal to claim one is
    only trusted from a fresh read."""
    (leader, client_l), (executor, client_e) = make_store(), make_store()
    epoch = lead(leader, "l")
    one, batch = run("backup", 0, "e"), [run("report", i, "e") for i in range(3)]
    leader.record_runs(epoch, [one, *batch])
    caught_up(client_e)
    assert executor.claim_run(one.run_id, "e", T0) is not None
    assert len(executor.claim_runs([r.run_id for r in batch], "e", T0)) == 3
    caught_up(client_l)
    for r in (one, *batch):  # as the recovery of an at_least_once run does
        expect = {"state": RunState.RUNNING, "peer_id": "e"}
        assert leader.update_run(r.run_id, expect=expect, state=RunState.ASSIGNED) is not None

    again = executor.claim_run(one.run_id, "e", T0)
    batch_again = executor.claim_runs([r.run_id for r in batch], "e", T0)

    assert again is not None and again.state is RunState.RUNNING
    assert sorted(batch_again) == sorted(r.run_id for r in batch)
    caught_up(client_l)
    assert leader.executing_runs() == {one.run_id} | {r.run_id for r in batch}


# -- reads: multiRead, and the persistent watch on a peer's assignments ---------------


def test_the_runs_handed_to_a_peer_are_read_together_without_listing_its_directory(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    pair = leader_and_executor(make_store)
    sent = Sent(pair.executor_client)
    runs = [run("backup", i, "e") for i in range(20)]

    pair.leader.record_runs(pair.epoch, runs)  # one transaction: 20 events, one by one

    eventually(lambda: pair.events.run_ids() == {r.run_id for r in runs}, what="the watch")
    # The persistent watch names each run: no listing of the directory, and no read per
    # run: the events of one transaction are read together (a busy machine may split them).
    assert sent.types["GetChildren"] == 0
    assert set(sent.types) <= {"MultiRead", "GetData"} and sum(sent.types.values()) <= 4
    assert sorted(pair.events.records, key=lambda r: r.run_id) == sorted(
        runs, key=lambda r: r.run_id
    )


def test_runs_assigned_around_a_cut_connection_reach_the_peers_watch_once(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    """The server forgets a persistent watch with the connection: the store arms it
    again and lists what changed meanwhile."""
    pair = leader_and_executor(make_store)
    leader, events = pair.leader, pair.events
    before, during, after = (run("backup", i, "e") for i in range(3))
    leader.record_runs(pair.epoch, [before])
    eventually(lambda: events.has(before.run_id, "assigned"), what="the first run")

    drop_connection(pair.executor_client)
    leader.record_runs(pair.epoch, [during])
    eventually(lambda: events.has(during.run_id, "assigned"), what="the run assigned meanwhile")
    leader.record_runs(pair.epoch, [after])

    eventually(lambda: events.has(after.run_id, "assigned"), what="a run assigned after")
    assert not events.duplicate.is_set()


def test_runs_assigned_across_an_expired_session_reach_the_peers_watch(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    pair = leader_and_executor(make_store)
    leader, events = pair.leader, pair.events

    expire_session(hosts, pair.executor_client)
    runs = [run("backup", i, "e") for i in range(2)]
    for r in runs:
        leader.record_runs(pair.epoch, [r])

    eventually(lambda: events.run_ids() == {r.run_id for r in runs}, what="both runs")
    assert not events.duplicate.is_set()


def test_runs_whose_read_failed_reach_the_watch_when_the_directory_is_listed_again(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, _), (executor, client_e) = make_store(), make_store(op_timeout=2.0)
    epoch = lead(leader, "l")
    events = RunEvents()
    executor.watch_runs("e", events)
    runs = [run("backup", i, "e") for i in range(2)]
    # Reads fail for longer than the store retries them (its 2 s).
    Sent(client_e, (("MultiRead", "GetData"), ConnectionLoss()), time.monotonic() + 3)

    leader.record_runs(epoch, runs)

    eventually(lambda: events.run_ids() == {r.run_id for r in runs}, what="both runs")
    assert not events.duplicate.is_set()


def test_a_read_of_new_runs_cut_short_by_closing_the_store_is_no_warning(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stopping peer closes its store while its watch may be reading the runs just
    handed to it: that read's failure is the stop, not a fault to warn about."""
    caplog.set_level(logging.INFO, logger="distcrond.coordination.zookeeper")
    (leader, _), (executor, client_e) = make_store(), make_store(op_timeout=2.0)
    epoch = lead(leader, "l")
    executor.watch_runs("e", RunEvents())
    sent = Sent(client_e, (("MultiRead", "GetData"), ConnectionLoss()))

    leader.record_runs(epoch, [run("backup", 0, "e")])
    eventually(lambda: sent.types["MultiRead"] + sent.types["GetData"], what="a read refused")
    executor.close()

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    eventually(lambda: said("stopped reading new runs: the store closed"), what="the read given up")
    assert said("could not read new runs") == []


def test_servers_without_persistent_watches_get_children_watches(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, _), (executor, client_e) = make_store(), make_store()
    epoch = lead(leader, "l")
    sent = Sent(client_e, refuse=(("AddWatch",), UnimplementedError()))
    events = RunEvents()
    executor.watch_runs("e", events)
    executor.watch_runs("f", events)
    runs = [run("backup", 0, "e"), run("backup", 1, "f")]

    leader.record_runs(epoch, runs)

    eventually(lambda: events.run_ids() == {r.run_id for r in runs}, what="the children watches")
    assert sent.types["AddWatch"] == 1  # asked once, then never again
    assert sent.types["GetChildren"] >= 4  # each directory listed, then again on the change


def test_a_multi_read_answers_each_read_on_its_own(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, client) = make_store()
    epoch = lead(leader, "l")
    runs = [run("backup", 0, "e"), run("report", 1, "f")]
    leader.record_runs(epoch, runs)
    missing = run("backup", 5, "e").run_id  # its bucket exists; "nojob"'s does not
    sent = Sent(client)

    found = leader.get_runs([runs[0].run_id, missing, "nojob@2026-11-27T03:10:00Z", runs[1].run_id])
    active = leader.active_run_ids()  # lists every peer's index and /active together

    assert found == runs
    assert active == {r.run_id for r in runs}
    assert sent.types == {"MultiRead": 2, "GetChildren": 1}  # and the list of the peers


def test_reads_are_sent_one_by_one_to_servers_without_multi_read(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, _), (reader, client) = make_store(), make_store()
    epoch = lead(leader, "l")
    runs = [run("backup", i, "e") for i in range(3)]
    leader.record_runs(epoch, runs)
    caught_up(client)
    sent = Sent(client, refuse=(("MultiRead",), UnimplementedError()))

    first = reader.get_runs([r.run_id for r in runs])
    second = reader.get_runs([r.run_id for r in runs])

    assert first == second == runs
    assert sent.types == {"MultiRead": 1, "GetData": 6}  # asked once, then never again


# -- watches across instances -------------------------------------------------------


def test_runs_recorded_by_the_leader_reach_the_assigned_peers_watch(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    pair = leader_and_executor(make_store)
    leader, executor, events = pair.leader, pair.executor, pair.events

    mine, other = run("backup", 0, "e"), run("backup", 1, "x")
    leader.record_runs(pair.epoch, [mine, other])
    eventually(lambda: events.has(mine.run_id, "assigned"))

    assert executor.claim_run(mine.run_id, "e", T0) is not None
    assert leader.request_cancel(mine.run_id)
    eventually(lambda: events.has(mine.run_id, "cancel"))
    assert not events.duplicate.wait(0.3)
    assert events.run_ids() == {mine.run_id}


def test_a_run_moved_to_another_peer_reaches_that_peers_watch(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (leader, _), (executor, _) = make_store(), make_store()
    listener = Listener()
    leader.start_election("l", listener)
    record = run("backup", 0, "dead")
    leader.record_runs(listener.epoch(), [record])
    events = RunEvents()
    executor.watch_runs("e", events)

    leader.update_run(record.run_id, peer_id="e")

    eventually(lambda: events.has(record.run_id, "assigned"))
    assert executor.runs(peer_id="dead", states=[RunState.ASSIGNED]) == []
    assert [r.run_id for r in executor.runs(peer_id="e", states=[RunState.ASSIGNED])] == [
        record.run_id
    ]


def test_a_trigger_queued_on_one_peer_wakes_the_others_watch(
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    (api, _), (leader, _) = make_store(), make_store()
    calls: list[int] = []
    leader.watch_triggers(lambda: calls.append(1))

    api.request_trigger(
        TriggerRequest(run_id=run_id_for("backup", T0), job_id="backup", slot=T0, requested_at=T0)
    )

    eventually(lambda: calls)
    assert [t.job_id for t in leader.pending_triggers()] == ["backup"]


# -- ACLs ---------------------------------------------------------------------------


def test_with_digest_auth_only_that_identity_reads_or_writes(
    hosts: str,
    make_store: Callable[..., tuple[ZooKeeperCoordinationStore, KazooClient]],
) -> None:
    store, _ = make_store(auth=("distcron", "s3cret"))
    listener = Listener()
    store.start_election("a", listener)
    store.record_runs(listener.epoch(), [run("backup", 0, "a")])
    store.register_peer(peer("a"))
    paths = ZKPaths()

    with kazoo_client(hosts) as anonymous:
        for path in (paths.runs, paths.run_bucket("backup"), paths.epoch, paths.peer("a")):
            with pytest.raises(NoAuthError):
                anonymous.get(path)
        with pytest.raises(NoAuthError):
            anonymous.set(paths.epoch, b"")

    other, _ = make_store(auth=("distcron", "s3cret"))
    assert [r.run_id for r in other.runs()] == [run("backup", 0, "a").run_id]
