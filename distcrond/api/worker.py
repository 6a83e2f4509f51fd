"""The API's gunicorn worker: gthread, with a bound on how long a client may take.

gunicorn's sync worker gives a whole process to a connection until its request
has arrived: three clients sending a header line every 5 s made two workers
unanswerable for half a minute. gthread serves each connection on a thread of
the worker's pool and waits for a connection's first bytes without a thread
(up to 5 s, then in its poller), but once they came, the thread reads the rest
of the request in blocking reads with no limit: a client sending a header line
every few seconds still holds its thread for ever.

:class:`BoundedThreadWorker` adds the bounds:

* a request (head and body) must have arrived :data:`REQUEST_TIMEOUT` seconds
  after its thread took the connection: :class:`ReadDeadlines` then shuts the
  connection's reading side (``shutdown(SHUT_RD)``), the blocked read returns
  end-of-file and gunicorn closes the connection. Only reading is shut: an
  answer the application is still working on is sent all the same.
* writing an answer must finish within :data:`RESPONSE_TIMEOUT` (a socket
  timeout, which bounds a whole ``sendall``): a client that does not read its
  answer does not hold the thread either.

The server (``server.py``) also lets a worker accept no more connections than it
has threads, so that an accepted connection never waits for a thread behind slow
ones: the others wait in the listen backlog for a worker that has one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

log = logging.getLogger(__name__)

# A legitimate client sends its request (at most a small JSON body) in milliseconds.
REQUEST_TIMEOUT = 10.0
# The largest answer (a run's output, up to 1 MiB per stream) at 100 KB/s.
RESPONSE_TIMEOUT = 30.0


class ReadDeadlines:
    """The connections a worker's threads are reading, each with the instant by which its
    request must have arrived; a thread of its own shuts the reading side of the overdue."""

    def __init__(
        self,
        timeout: float = REQUEST_TIMEOUT,
        tick: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._tick = tick
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines: dict[Any, float] = {}  # connection (anything with .sock) -> instant

    @contextlib.contextmanager
    def watching(self, conn: Any) -> Iterator[None]:
        """While the block runs, ``conn`` (with a ``sock`` attribute, which gunicorn may
        replace by its TLS wrapper meanwhile) is cut when its deadline passes."""
        with self._lock:
            self._deadlines[conn] = self._clock() + self.timeout
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(conn, None)

    def cut_overdue(self) -> int:
        """Shut the reading side of every connection past its deadline; how many there were.
        Again at every call while they are watched: harmless, and it catches a socket that
        was being replaced (wrapped in TLS) at the first try."""
        now = self._clock()
        with self._lock:
            overdue = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
        for conn in overdue:
            with contextlib.suppress(OSError, AttributeError):
                # socket.socket's own shutdown: SSLSocket's drops its TLS state, which the
                # answer may still need; this one only shuts the file descriptor's reading.
                socket.socket.shutdown(conn.sock, socket.SHUT_RD)
        return len(overdue)

    def start(self) -> threading.Thread:
        """The thread that cuts the overdue every ``tick`` seconds, for the process's life."""
        thread = threading.Thread(target=self._run, name="api-read-deadlines", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            try:
                if self.cut_overdue():
                    log.debug("cut connections that did not send their request in time")
            except Exception:  # this thread is the bound itself: it must not die
                log.exception("cutting slow connections failed")


class BoundedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with :class:`ReadDeadlines` and a response timeout."""

    def init_process(self) -> None:
        # In the worker, after the fork: a thread started before it would not exist here.
        self.deadlines = ReadDeadlines(REQUEST_TIMEOUT)
        self.deadlines.start()
        super().init_process()

    def handle(self, conn: Any) -> Any:
        with self.deadlines.watching(conn):
            return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        # The head is in; the body and the answer go through this socket from here on.
        conn.sock.settimeout(RESPONSE_TIMEOUT)
        return super().handle_request(req, conn)
