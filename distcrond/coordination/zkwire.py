"""Additions to kazoo's client, each measured to cut a cost on the peers' hot path.

- :class:`MultiRead`: ZooKeeper's ``multiRead`` request (opcode 22, servers 3.6 and
  later), which kazoo 2.11 does not offer: many ``getData``/``getChildren`` reads in one
  request and one answer. A peer reads every run handed to it, and the leader the
  indexes of every peer; one request for all of them, instead of one each, takes
  about one ZooKeeper request per run off the servers. Each read succeeds or fails on
  its own: a missing node gives an error for that read only.
- :class:`AddWatch` and :func:`route_watch_events`: ZooKeeper's persistent recursive
  watches (``addWatch``, opcode 106, servers 3.6 and later), which kazoo 2.11 does not
  offer either. One such watch on a peer's assignment directory tells it of each run
  created or deleted there, by path: no listing of the directory after every change.
  kazoo does not re-register them after a reconnection (its ``SetWatches`` names its
  own watches only), so their owner adds them again, and lists once, on each one.
- :class:`PollHandler`: kazoo's threading handler, with ``select`` on one
  ``poll(2)`` call. kazoo's own builds, registers and closes an epoll selector on
  every call, and its connection loop calls it about four times per request; with
  ``poll`` a request costs the client half the CPU (72 instead of 140 µs per pipelined
  ``get`` on this project's 2-core machine).

- :func:`quick_reconnects`: short waits for a server while reconnecting. A ZooKeeper
  server that is starting listens on its client port ~0.4 s before it answers
  anything (it loads its snapshot meanwhile); kazoo waits for the handshake up to
  session timeout / number of servers (1.3 s for 4 s and three), so a client that
  tried that server during a rolling restart came back ~0.5 s after the others. A
  server that drops connection requests (its machine is gone, a cut link, or a
  stopping server whose backlog is full) is worse: kazoo waits for the TCP connection
  the whole session timeout, and the kernel sends its second SYN only after 1 s. The
  first connect and the first handshake after a drop wait 0.2 s, each one that times
  out doubles its wait up to kazoo's, and one that succeeds resets it: a slow
  ensemble or a far one costs a few tries, never the connection.

They rely on kazoo's request protocol: a request is an object with ``type``,
``serialize()`` and ``deserialize(bytes, offset)``, queued by ``KazooClient._call``
(the path every kazoo request takes), and on its connection handing each watch
event to ``_read_watch_event`` (``kazoo>=2.10,<3`` in pyproject.toml).
"""

from __future__ import annotations

import select
from collections.abc import Callable, Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    EXCEPTIONS,
    ConnectionLoss,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
)
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import (
    Connect,
    GetChildren,
    GetData,
    MultiHeader,
    Watch,
    ZnodeStat,
    int_struct,
    multiheader_struct,
    read_buffer,
    read_string,
    stat_struct,
    write_string,
)

# ZooKeeper's opcodes (ZooDefs.OpCode), watch modes (AddWatchMode) and event types.
MULTI_READ = 22
ADD_WATCH = 106
PERSISTENT_RECURSIVE = 1
NODE_CREATED = 1
NODE_DELETED = 2
_GET_DATA = GetData.type  # 4
_GET_CHILDREN = GetChildren.type  # 8
_ERROR = -1


class MultiRead:
    """A ``multiRead`` request of ``GetData``/``GetChildren`` operations (no watches).

    Its answer, in the operations' order: ``(data, ZnodeStat)`` for a ``GetData``,
    a list of child names for a ``GetChildren``, or the kazoo exception of a read that
    failed (``NoNodeError()`` for a missing node): an instance, not raised.
    """

    type = MULTI_READ

    def __init__(self, operations: Sequence[GetData | GetChildren]) -> None:
        self.operations = tuple(operations)

    def __repr__(self) -> str:
        return f"MultiRead({len(self.operations)} reads)"

    def serialize(self) -> bytearray:
        out = bytearray()
        for op in self.operations:
            if op.watcher is not None:
                raise ValueError("a multiRead sets no watch")
            out += MultiHeader(op.type, False, -1).serialize() + op.serialize()
        return out + multiheader_struct.pack(-1, True, -1)

    @classmethod
    def deserialize(cls, data: bytes, offset: int) -> list[Any]:
        results: list[Any] = []
        header, offset = MultiHeader.deserialize(data, offset)
        while not header.done:
            if header.type == _GET_DATA:
                value, offset = read_buffer(data, offset)
                stat = ZnodeStat._make(stat_struct.unpack_from(data, offset))
                offset += stat_struct.size
                results.append((value, stat))  # as kazoo's get: None for null data
            elif header.type == _GET_CHILDREN:
                count = int_struct.unpack_from(data, offset)[0]
                offset += int_struct.size
                children = []
                for _ in range(max(count, 0)):
                    child, offset = read_string(data, offset)
                    children.append(child)
                results.append(children)
            elif header.type == _ERROR:
                code = int_struct.unpack_from(data, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[code]())
            else:
                raise ValueError(f"multiRead: unexpected result type {header.type}")
            header, offset = MultiHeader.deserialize(data, offset)
        return results


def multi_read_async(client: KazooClient, operations: Sequence[GetData | GetChildren]) -> Any:
    """Send a :class:`MultiRead` of ``operations`` (paths relative to the client's
    chroot); returns kazoo's async result of the answer's list."""
    operations = [op._replace(path=_prefix_root(client.chroot, op.path)) for op in operations]
    return _send(client, MultiRead(operations))


class AddWatch:
    """An ``addWatch`` request: a watch on ``path`` that stays until removed (or until
    the connection to the server ends); in ``PERSISTENT_RECURSIVE`` mode it fires for
    the creation, deletion and data change of ``path`` and of every node below it."""

    type = ADD_WATCH

    def __init__(self, path: str, mode: int = PERSISTENT_RECURSIVE) -> None:
        self.path = path
        self.mode = mode

    def __repr__(self) -> str:
        return f"AddWatch({self.path!r}, mode={self.mode})"

    def serialize(self) -> bytearray:
        return bytearray(write_string(self.path) + int_struct.pack(self.mode))

    @classmethod
    def deserialize(cls, data: bytes, offset: int) -> bool:
        return True  # the answer carries nothing but its header's error code


def add_watch_async(client: KazooClient, path: str, mode: int = PERSISTENT_RECURSIVE) -> Any:
    """Send an :class:`AddWatch` for ``path`` (relative to the client's chroot); its events
    reach the callbacks given to :func:`route_watch_events`."""
    return _send(client, AddWatch(_prefix_root(client.chroot, path), mode))


def _send(client: KazooClient, request: MultiRead | AddWatch) -> Any:
    """Queue ``request`` on the client's connection, as kazoo's own calls do."""
    result = client.handler.async_result()
    client._call(request, result)
    return result


# Transient failures: retried (the connection comes back, or a new session starts).
RETRYABLE = (ConnectionLoss, OperationTimeoutError, SessionExpiredError)


def transaction_failure(results: Sequence[Any]) -> tuple[int, Exception] | None:
    """The operation that made a transaction fail, and its error; None if it committed
    (kazoo's ``commit`` does not raise: a failed check comes back in the results)."""
    for index, result in enumerate(results):
        if isinstance(result, Exception) and not isinstance(
            result, RolledBackError | RuntimeInconsistency
        ):
            return index, result
    return None


FIRST_WAIT = 0.2  # seconds; see quick_reconnects


class _Patience:
    """A wait that starts at ``first``, doubles after each timeout up to the caller's own
    timeout, and starts at ``first`` again after a success."""

    def __init__(self, first: float) -> None:
        self.first = self.wait = first

    def call(self, timeout: float, attempt: Callable[[float], Any], timed_out: Any) -> Any:
        try:
            result = attempt(min(timeout, self.wait))
        except timed_out:
            self.wait = min(self.wait * 2, timeout)
            raise
        self.wait = self.first
        return result


def quick_reconnects(client: KazooClient, first_wait: float = FIRST_WAIT) -> None:
    """Wait ``first_wait`` for a server's TCP connection and for its handshake answer,
    each doubling after a timeout up to kazoo's own wait (see the module). kazoo opens
    its connections through its handler's ``create_connection`` (with ``timeout=``),
    and calls its connection's ``_invoke`` for the handshake (the ``Connect`` request)
    and for the authentication packets; only the connect's and the handshake's waits
    change."""
    handler = client.handler
    connect = handler.create_connection
    connects = _Patience(first_wait)

    def create_connection(*args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.pop("timeout", None)
        if timeout is None:
            return connect(*args, **kwargs)
        return connects.call(
            timeout, lambda wait: connect(*args, timeout=wait, **kwargs), TimeoutError
        )

    handler.create_connection = create_connection

    connection = client._connection
    invoke = connection._invoke
    handshakes = _Patience(first_wait)

    def handshake(timeout: float, request: Any, xid: int | None = None) -> Any:
        if not isinstance(request, Connect):
            return invoke(timeout, request, xid)
        return handshakes.call(
            timeout, lambda wait: invoke(wait, request, xid), client.handler.timeout_exception
        )

    connection._invoke = handshake


def route_watch_events(client: KazooClient, route: Callable[[int, str], None]) -> None:
    """Call ``route(event type, path)`` (the path relative to the chroot) for every watch
    event the client receives, on its connection thread (``route`` must not block),
    before kazoo hands it to its own one-shot watchers, which it still does."""
    connection = client._connection
    original = connection._read_watch_event

    def read(buffer: bytes, offset: int) -> Any:
        watch, _ = Watch.deserialize(buffer, offset)
        route(watch.type, client.unchroot(watch.path))
        return original(buffer, offset)

    connection._read_watch_event = read


class PollHandler(SequentialThreadingHandler):
    """kazoo's threading handler, its ``select`` one ``poll(2)`` call (see the module)."""

    def select(
        self, rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None
    ) -> tuple[list[Any], list[Any], list[Any]]:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative")
        poller = select.poll()
        masks: dict[int, int] = {}
        for objects, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for obj in objects:
                fd = _fd(obj)
                if fd < 0:
                    raise ValueError("Invalid event mask or fd")
                masks[fd] = masks.get(fd, 0) | mask
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        # An error or a hang-up is reported to both sides: the read or write that follows
        # sees it (as the selectors module reports EPOLLERR/EPOLLHUP).
        problem = select.POLLERR | select.POLLHUP | select.POLLNVAL
        readable = [o for o in rlist if ready.get(_fd(o), 0) & (select.POLLIN | problem)]
        writable = [o for o in wlist if ready.get(_fd(o), 0) & (select.POLLOUT | problem)]
        return readable, writable, []


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())
