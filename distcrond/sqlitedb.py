"""One SQLite file shared by threads and processes: the plumbing of the embedded stores.

The coordination database is opened at once by the daemon (which writes runs)
and by every gunicorn API worker (which reads, and queues manual triggers), so
every connection uses WAL (readers never block the writer), a busy timeout
(writers queue instead of failing) and short transactions: writes start with
``BEGIN IMMEDIATE`` so that they take the write lock before reading what they
will change, and a read-modify-write is therefore atomic across processes.

Connections are pooled rather than kept per thread: the executor may use many
short-lived threads, and a pooled connection is closed by ``close()`` whichever
thread used it last.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from distcrond.coordination.base import StoreUnavailable
from distcrond.statedir import private_file

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    """Microseconds since the Unix epoch, exactly (for ordering and indexes)."""
    if value.tzinfo is None:
        raise ValueError("datetimes stored in SQLite must be timezone-aware")
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    """Inverse of :func:`to_us` (UTC)."""
    return _EPOCH + timedelta(microseconds=value)


class SchemaTooNew(Exception):
    """The database file was created by a newer distcrond."""


class SQLiteDatabase:
    """A pool of connections to one SQLite file, with the schema created on open.

    ``schema`` is a list of idempotent statements (``CREATE ... IF NOT EXISTS``);
    they run in one write transaction and ``PRAGMA user_version`` is set to
    ``version``. A file with a newer version raises :class:`SchemaTooNew`.
    Errors from SQLite (busy past the timeout, I/O) surface as
    :class:`StoreUnavailable`.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        schema: Sequence[str],
        version: int,
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
        max_idle: int = 8,
    ) -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer of this process at a time
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_every = 1.0
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._pid = os.getpid()
        self._make_private()
        self._create_schema(schema, version)

    def _make_private(self) -> None:
        """The database, its WAL and shared memory files: mode 0600 (SQLite gives the
        WAL and the shared memory the database's mode when it creates them; those of an
        older version may be 0644 already)."""
        if str(self.path) == ":memory:":
            return
        try:
            private_file(self.path)
            for suffix in ("-wal", "-shm"):
                companion = self.path.with_name(self.path.name + suffix)
                if companion.exists():
                    private_file(companion)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    # -- connections ---------------------------------------------------------
    def open_connection(self) -> sqlite3.Connection:
        """A new connection configured like the pool's; the caller closes it."""
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # No checkpoint inside a commit (it would fsync while this process's writers
            # wait on the write lock); a background thread checkpoints instead.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection in autocommit mode (each statement its own transaction)."""
        conn = self._checkout()
        try:
            yield conn
        except sqlite3.Error as exc:
            self._discard(conn)
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        except BaseException:
            self._checkin(conn)
            raise
        else:
            self._checkin(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on exit, rolled back on error.

        This process's writers take turns on a lock first: SQLite's busy handler makes a
        waiting writer sleep in growing steps (up to 100 ms), so two hundred threads
        contending inside SQLite wait far longer than queueing here, and some hit the
        busy timeout. Other processes (the API workers) still meet the busy timeout.
        """
        self._ensure_checkpointer()
        with self._write_lock, self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement in it sees the same snapshot."""
        with self.connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when returned."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals -----------------------------------------------------------
    def _ensure_checkpointer(self) -> None:
        """Start (once per process that writes) the thread that folds the WAL back into the
        database, PASSIVE so that it never blocks a writer or a reader."""
        with self._lock:
            if self._checkpointer is not None and self._checkpointer.is_alive():
                return
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop,
                name=f"sqlite-checkpoint:{self.path.name}",
                daemon=True,
            )
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._closed:
                time.sleep(self._checkpoint_every)
                try:
                    if conn is None:
                        conn = self.open_connection()
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except (sqlite3.Error, StoreUnavailable):
                    pass  # busy or not there yet: the next round checkpoints
        finally:
            if conn is not None:
                conn.close()

    def _checkout(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{self.path}: the store is closed")
            if os.getpid() != self._pid:
                # Forked (gunicorn without a post-fork open): never share a connection
                # with the parent; abandon the inherited ones without closing them.
                self._pid = os.getpid()
                self._idle = []
            if self._idle:
                return self._idle.pop()
        return self.open_connection()

    def _checkin(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # a bug or an interrupted statement: do not reuse
            self._discard(conn)
            return
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _discard(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _create_schema(self, schema: Sequence[str], version: int) -> None:
        with self.write() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > version:
                raise SchemaTooNew(
                    f"{self.path} has schema version {current}; this distcrond knows {version}"
                )
            for statement in schema:
                conn.execute(statement)
            if current != version:
                conn.execute(f"PRAGMA user_version = {int(version)}")
