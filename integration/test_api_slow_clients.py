"""Slow clients against the real daemon under gunicorn: 20 connections that send a header
line every 5 s never make the API unanswerable, and the server closes them in time."""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from distcrond.api.worker import REQUEST_TIMEOUT
from integration.peers import Peer, wait_for
from integration.tls import make_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SLOW_CLIENTS = 20
LINE_EVERY = 5.0
LIVE = "/api/v1/health/live"


@dataclass(eq=False)
class SlowClient:
    """One connection sending its request head a line at a time and never finishing it."""

    sock: socket.socket
    opened: float
    next_line: float
    lines: int = 0
    closed: float | None = None  # when the server closed it


class SlowLoris:
    """Keeps SLOW_CLIENTS such connections to ``port`` on a thread, noting when each closes."""

    def __init__(self, port: int) -> None:
        self.clients: list[SlowClient] = []
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            now = time.monotonic()
            client = SlowClient(sock, opened=now, next_line=now)
            self._send(client, f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            self.clients.append(client)
            self._selector.register(sock, selectors.EVENT_READ, client)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def open(self) -> int:
        return sum(1 for c in self.clients if c.closed is None)

    def _send(self, client: SlowClient, data: bytes) -> None:
        try:
            client.sock.send(data)
            client.lines += 1
            client.next_line = time.monotonic() + LINE_EVERY
        except OSError:  # reset or broken pipe: the server closed it
            self._closed(client)

    def _closed(self, client: SlowClient) -> None:
        if client.closed is None:
            client.closed = time.monotonic()
            self._selector.unregister(client.sock)

    def _run(self) -> None:
        while not self._stop.is_set() and self.open():
            now = time.monotonic()
            for client in self.clients:
                if client.closed is None and client.next_line <= now:
                    self._send(client, f"X-Slow-{client.lines}: still here\r\n".encode())
            for key, _ in self._selector.select(timeout=0.05):
                client = key.data
                try:
                    data = client.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # end of file: closed by the server
                    self._closed(client)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for client in self.clients:
            client.sock.close()
        self._selector.close()


def test_twenty_slow_clients_never_keep_the_api_from_answering_and_are_closed_in_time(
    peer: Peer,
) -> None:
    peer.start()
    assert "workers of 16 threads" in peer.log()  # this worktree's server, its default
    loris = SlowLoris(peer.port)
    try:
        probes: list[tuple[float, int]] = []  # (seconds to answer, slow clients open then)
        started = time.monotonic()
        while time.monotonic() - started < 9.0:
            open_then = loris.open()
            before = time.monotonic()
            answer = requests.get(f"{peer.url}{LIVE}", timeout=10)
            probes.append((time.monotonic() - before, open_then))
            assert answer.status_code == 200
            time.sleep(0.75)  # pacing the probes, not waiting for anything
        assert len(probes) >= 8
        assert all(seconds < 1.0 for seconds, _ in probes), probes
        # The probes were answered while all the slow clients held their connections.
        assert all(open_then == SLOW_CLIENTS for _, open_then in probes[:6]), probes

        wait_for(lambda: loris.open() == 0, REQUEST_TIMEOUT + 5, "the slow clients to be closed")
        lifetimes = [c.closed - c.opened for c in loris.clients if c.closed is not None]
        assert all(REQUEST_TIMEOUT - 1 <= t <= REQUEST_TIMEOUT + 2 for t in lifetimes), lifetimes
        assert all(c.lines >= 2 for c in loris.clients)  # they were sending, slowly
    finally:
        loris.stop()
    assert requests.get(f"{peer.url}{LIVE}", timeout=5).status_code == 200


def test_a_slow_client_over_tls_is_closed_in_time_too(make_peer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cut shuts the socket under gunicorn's TLS wrapper; the TLS peer still answers."""
    peer: Peer = make_peer()
    peer.tls = make_tls_files(tmp_path / "tls")
    peer.start()
    context = ssl.create_default_context(cafile=str(peer.tls.ca))
    raw = socket.create_connection(("127.0.0.1", peer.port), timeout=REQUEST_TIMEOUT + 5)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        opened = time.monotonic()
        sock.sendall(f"GET {LIVE} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())  # and no more
        live = requests.get(f"{peer.url}{LIVE}", timeout=5, verify=peer.verify)
        assert live.status_code == 200
        # Closed without a TLS close_notify (an error) or with one (b""): closed either way.
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            assert sock.recv(4096) == b""
        lifetime = time.monotonic() - opened
    assert REQUEST_TIMEOUT - 1 <= lifetime <= REQUEST_TIMEOUT + 2, lifetime
