"""The API's gunicorn worker and options: slow clients are cut, workers never queue a
connection behind slow ones. Sockets here are socketpairs (no network)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from gunicorn.workers.gthread import ThreadWorker

from distcrond.api.server import APIServer
from distcrond.api.worker import BoundedThreadWorker, ReadDeadlines
from distcrond.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)  # hashed by identity, as gunicorn's TConn
class Conn:
    """What ReadDeadlines needs of gunicorn's TConn: its socket."""

    sock: socket.socket


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def blocked_read(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    """A thread blocked in recv on ``sock``, as a worker thread reading a request is."""
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(sock.recv(100)), daemon=True)
    thread.start()
    return thread, got


def test_a_connection_past_its_deadline_stops_being_read_but_can_still_be_answered(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    clock = Clock()
    deadlines = ReadDeadlines(timeout=10.0, clock=clock)
    with deadlines.watching(Conn(server)):
        thread, got = blocked_read(server)
        clock.now += 9.9
        assert deadlines.cut_overdue() == 0
        thread.join(0.2)
        assert thread.is_alive()  # still reading: not overdue yet
        clock.now += 0.1
        assert deadlines.cut_overdue() == 1
        thread.join(5)
        assert not thread.is_alive() and got == [b""]  # end of file: gunicorn closes it
        server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # only reading was shut
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_a_connection_no_longer_watched_is_never_cut(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    clock = Clock()
    deadlines = ReadDeadlines(timeout=1.0, clock=clock)
    with deadlines.watching(Conn(server)):
        pass
    clock.now += 60
    assert deadlines.cut_overdue() == 0
    client.sendall(b"next")
    assert server.recv(100) == b"next"


def test_a_closed_or_replaced_socket_does_not_stop_the_cutting(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    clock = Clock()
    deadlines = ReadDeadlines(timeout=1.0, clock=clock)
    gone = socket.socket()
    gone.close()
    with deadlines.watching(Conn(gone)), deadlines.watching(Conn(server)):
        thread, got = blocked_read(server)
        clock.now += 1
        assert deadlines.cut_overdue() == 2
        thread.join(5)
        assert got == [b""]


def test_the_api_serves_with_the_bounded_gthread_worker_and_a_thread_per_connection() -> None:
    server = APIServer(Settings(api_workers=3, api_threads=7))
    cfg = server.cfg
    assert cfg.worker_class is BoundedThreadWorker and issubclass(cfg.worker_class, ThreadWorker)
    assert (cfg.workers, cfg.threads) == (3, 7)
    # A worker never accepts a connection it has no thread for; no idle keep-alive.
    assert cfg.worker_connections == 7 and cfg.keepalive == 0
    assert (cfg.limit_request_line, cfg.limit_request_fields) == (4094, 50)
