"""The kazoo additions of distcrond.coordination.zkwire, byte by byte and socket by socket
(their use against a real ensemble is in integration/test_zookeeper_store.py)."""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.protocol.serialization import GetChildren, GetData, ZnodeStat

from distcrond.coordination.zkwire import (
    MULTI_READ,
    NODE_CREATED,
    PERSISTENT_RECURSIVE,
    AddWatch,
    MultiRead,
    PollHandler,
    quick_reconnects,
    route_watch_events,
)

pytestmark = pytest.mark.timeout(10)

STAT = ZnodeStat(1, 2, 3, 4, 5, 6, 7, 0, 3, 0, 1)


def header(op_type: int, done: bool = False, err: int = -1) -> bytes:
    return struct.pack("!iBi", op_type, 1 if done else 0, err)


def string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!i", len(data)) + data


def stat_bytes(stat: ZnodeStat) -> bytes:
    return struct.pack("!qqqqiiiqiiq", *stat)


def test_a_multi_read_is_sent_as_zookeeper_frames_its_operations():
    request = MultiRead([GetData("/a", None), GetChildren("/b", None)])

    assert request.type == MULTI_READ == 22
    assert bytes(request.serialize()) == (
        header(4) + string("/a") + b"\0" + header(8) + string("/b") + b"\0" + header(-1, True)
    )


def test_a_multi_read_sets_no_watch():
    with pytest.raises(ValueError, match="no watch"):
        MultiRead([GetData("/a", lambda event: None)]).serialize()


def test_the_answer_is_read_in_the_operations_order_with_each_failure_on_its_own():
    answer = (
        header(4, err=0)
        + struct.pack("!i", 3)
        + b"abc"
        + stat_bytes(STAT)
        + header(-1, err=NoNodeError.code)
        + struct.pack("!i", NoNodeError.code)
        + header(8, err=0)
        + struct.pack("!i", 2)
        + string("x")
        + string("y")
        + header(4, err=0)
        + struct.pack("!i", -1)  # a node without data
        + stat_bytes(STAT)
        + header(-1, err=NoAuthError.code)
        + struct.pack("!i", NoAuthError.code)
        + header(-1, True)
    )
    prefix = b"ignored"

    results = MultiRead.deserialize(prefix + answer, len(prefix))

    assert results[0] == (b"abc", STAT)
    assert isinstance(results[1], NoNodeError)
    assert results[2] == ["x", "y"]
    assert results[3] == (None, STAT)  # as kazoo's get answers it
    assert isinstance(results[4], NoAuthError)
    assert len(results) == 5


def test_an_answer_of_an_unexpected_kind_is_an_error():
    with pytest.raises(ValueError, match="unexpected result type 5"):
        MultiRead.deserialize(header(5, err=0) + header(-1, True), 0)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_poll_select_waits_at_most_its_timeout_when_nothing_is_ready(pair):
    a, _ = pair
    started = time.monotonic()

    assert PollHandler().select([a], [], [], 0.05) == ([], [], [])
    assert time.monotonic() - started >= 0.04


def test_poll_select_names_the_objects_ready_for_reading_and_writing(pair):
    a, b = pair
    b.send(b"x")

    readable, writable, _ = PollHandler().select([a, b.fileno()], [a], [], 1.0)

    assert readable == [a] and writable == [a]  # b has nothing to read; a can write


def test_poll_select_reports_a_closed_peer_as_readable(pair):
    a, b = pair
    b.close()

    assert PollHandler().select([a], [], [], 1.0)[0] == [a]  # the read then sees the end


def test_poll_select_refuses_a_negative_timeout_or_a_closed_socket(pair):
    a, b = pair
    with pytest.raises(ValueError):
        PollHandler().select([a], [], [], -1)
    b.close()
    with pytest.raises(ValueError):
        PollHandler().select([b], [], [], 0)


def test_an_add_watch_is_sent_as_zookeeper_frames_it():
    request = AddWatch("/a/b")

    assert request.type == 106
    assert bytes(request.serialize()) == string("/a/b") + struct.pack("!i", PERSISTENT_RECURSIVE)
    assert AddWatch.deserialize(struct.pack("!i", 0), 0) is True


class FakeConnection:
    def __init__(self) -> None:
        self.read: list[tuple[bytes, int]] = []

    def _read_watch_event(self, buffer: bytes, offset: int) -> None:
        self.read.append((buffer, offset))


class FakeClient:
    """What route_watch_events uses of a KazooClient: its connection and unchroot."""

    def __init__(self) -> None:
        self._connection = FakeConnection()

    def unchroot(self, path: str) -> str:
        return path.removeprefix("/chroot")


def test_watch_events_are_routed_then_handed_to_kazoo():
    client = FakeClient()
    connection = client._connection
    routed: list[tuple[int, str]] = []
    route_watch_events(client, lambda kind, path: routed.append((kind, path)))  # type: ignore[arg-type]
    event = struct.pack("!ii", NODE_CREATED, 3) + string("/chroot/assignments/e/r1")

    client._connection._read_watch_event(b"xx" + event, 2)

    assert routed == [(NODE_CREATED, "/assignments/e/r1")]
    assert connection.read == [(b"xx" + event, 2)]  # kazoo's own watchers still see it


def test_a_server_that_accepts_but_never_answers_is_given_up_quickly_then_more_patiently():
    """A ZooKeeper server that is starting accepts connections before it answers them.
    kazoo would wait for its handshake the whole session timeout (one server); with
    quick_reconnects it tries again after 0.2 s, then 0.4 s, then 0.8 s..."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[float] = []
    kept: list[socket.socket] = []

    def accept() -> None:
        while len(accepted) < 4:
            conn, _ = silent.accept()
            accepted.append(time.monotonic())
            kept.append(conn)  # open, and silent

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    port = silent.getsockname()[1]
    client = KazooClient(
        hosts=f"127.0.0.1:{port}",
        timeout=4.0,
        connection_retry={"max_tries": -1, "delay": 0.01, "backoff": 1, "max_jitter": 0},
    )
    quick_reconnects(client)
    try:
        with pytest.raises(client.handler.timeout_exception):
            client.start(timeout=2.0)
        listener.join(1.0)
    finally:
        client.stop()
        client.close()
        for conn in kept:
            conn.close()
        silent.close()
    gaps = [b - a for a, b in itertools.pairwise(accepted)]
    assert len(gaps) >= 2, f"handshakes tried: {len(accepted)} (kazoo alone: one, for 4 s)"
    assert 0.15 < gaps[0] < 0.4, gaps
    assert 0.35 < gaps[1] < 0.7, gaps


def test_a_server_that_drops_connection_requests_is_given_up_quickly_then_more_patiently():
    """A server whose backlog is full (a stopping one), or whose machine is gone, answers
    no SYN: kazoo would wait for the TCP connection the whole session timeout (and the
    kernel sends its second SYN only after 1 s); with quick_reconnects the connect gives
    up after 0.2 s, then 0.4 s, and starts at 0.2 s again after one that succeeds."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # one connection fills its queue; it is never accepted
    queued = socket.create_connection(full.getsockname(), timeout=1.0)
    open_server = socket.create_server(("127.0.0.1", 0))
    client = KazooClient(hosts="127.0.0.1:1", timeout=4.0)
    quick_reconnects(client)
    connected: list[socket.socket] = []

    def give_up_after() -> float:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            client.handler.create_connection(address=full.getsockname(), timeout=4.0)
        return time.monotonic() - began

    try:
        first, second = give_up_after(), give_up_after()
        connected.append(
            client.handler.create_connection(address=open_server.getsockname(), timeout=4.0)
        )
        after_success = give_up_after()
    finally:
        for sock in (*connected, queued, full, open_server):
            sock.close()
        client.close()
    assert 0.15 < first < 0.35, first
    assert 0.35 < second < 0.6, second
    assert 0.15 < after_success < 0.35, after_success
