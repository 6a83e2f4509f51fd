"""The embedded coordination store: a cluster of one, its state in one SQLite file.

The daemon's instance writes runs and watches them; every API worker opens its
own instance on the same file to read, and to queue manual triggers. Writes go
through ``BEGIN IMMEDIATE`` transactions, so every compare-and-set (the fence in
``record_runs``, ``claim_run``, ``finish_run``) is atomic across processes.

Notifications:

* A write through this instance notifies this instance's watchers right after
  its commit, by handing the event to the store's dispatch thread (well under a
  millisecond: the scheduler -> executor hand-off goes through it).
* Writes by other processes are found by a poll thread, every
  ``poll_interval`` seconds, which queries only when ``PRAGMA data_version``
  says the file changed.
* Every callback (watches and the leadership listener) runs on the one dispatch
  thread, in order, never under a store lock; an exception is logged.
* A watcher is called once per (run id, event): "assigned to this peer" and
  "cancel requested". A run re-assigned to the peer after it left the
  ``assigned`` state counts as a new assignment.

Leadership is immediate: ``start_election`` takes it at once and bumps the
epoch, which fences every older epoch. A peer deposed by another process's
``start_election`` is told (``revoke_leadership``) by the poll thread, and
takes leadership back when the row is free again.

Only one daemon may use a state directory: :func:`distcrond.statedir.acquire_state_lock`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from distcrond.clock import Clock
from distcrond.coordination.base import (
    ConfigSnapshot,
    CoordinationStore,
    FencedOut,
    LeaderInfo,
    LeadershipListener,
    NodeHealth,
    PeerInfo,
    SchedulerPass,
    StoreStatus,
    StoreUnavailable,
    TriggerRequest,
    cancel_change,
    claimed_record,
    finish_change,
    update_change,
)
from distcrond.runs import ACTIVE_STATES, RunRecord, RunState, format_slot, parse_slot
from distcrond.sqlitedb import SQLiteDatabase, to_us

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        slot_us INTEGER NOT NULL,
        peer_id TEXT,
        state TEXT NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        ended_us INTEGER,            -- terminal runs only (ended_at, else the slot)
        data TEXT NOT NULL           -- RunRecord.to_json()
    )""",
    "CREATE INDEX IF NOT EXISTS runs_peer_state ON runs (peer_id, state)",
    "CREATE INDEX IF NOT EXISTS runs_job_state ON runs (job_id, state)",
    "CREATE INDEX IF NOT EXISTS runs_state_ended ON runs (state, ended_us)",
    "CREATE INDEX IF NOT EXISTS runs_slot ON runs (slot_us, run_id)",
    """CREATE TABLE IF NOT EXISTS cursors (
        job_id TEXT PRIMARY KEY,
        slot_us INTEGER NOT NULL,
        slot TEXT NOT NULL
    )""",
    # One row (id = 1). The epoch outlives the leader: a cleared row keeps it, so
    # that the next leader's epoch is higher than every earlier one.
    """CREATE TABLE IF NOT EXISTS leader (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        peer_id TEXT,
        epoch INTEGER NOT NULL,
        since TEXT
    )""",
    "INSERT OR IGNORE INTO leader (id, peer_id, epoch, since) VALUES (1, NULL, 0, NULL)",
    "CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    # seq (AUTOINCREMENT: never reused) lets a poll tell that a trigger is new.
    """CREATE TABLE IF NOT EXISTS triggers (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        slot TEXT NOT NULL,
        requested_us INTEGER NOT NULL,
        requested_at TEXT NOT NULL,
        requested_by TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS configs (peer_id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS node_health (node_id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    # One row (id = 1): the leader's newest completed scheduler pass (SchedulerPass JSON).
    """CREATE TABLE IF NOT EXISTS scheduler_pass (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        data TEXT NOT NULL
    )""",
)

_TERMINAL = tuple(s.value for s in RunState if s.terminal)
_ACTIVE = tuple(s.value for s in ACTIVE_STATES)

# Event kinds a run watcher is told about once each.
_ASSIGNED = "assigned"
_CANCEL = "cancel"


# -- the store ------------------------------------------------------------------


@dataclass
class _RunWatcher:
    peer_id: str
    callback: Callable[[RunRecord], None]
    seen: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class _Election:
    peer_id: str
    listener: LeadershipListener
    epoch: int | None = None  # set while leader


def _events(record: RunRecord, peer_id: str) -> list[tuple[str, str]]:
    """The watcher events ``record`` represents for ``peer_id``."""
    if record.peer_id != peer_id:
        return []
    events = []
    if record.state == RunState.ASSIGNED:
        events.append((record.run_id, _ASSIGNED))
    if record.cancel_requested and not record.state.terminal:
        events.append((record.run_id, _CANCEL))
    return events


class SQLiteCoordinationStore(CoordinationStore):
    """Coordination state in one SQLite file; thread-safe, and safe across processes.

    ``clock`` stamps leadership; ``poll_interval`` is how often (seconds) writes
    by other processes are looked for, once something is watched. Threads (the
    dispatcher and the poll) start on the first watch or election, so a store
    opened only to read starts none.
    """

    backend = "sqlite"

    def __init__(
        self, path: Path | str, clock: Clock | None = None, poll_interval: float = 0.1
    ) -> None:
        self.path = Path(path)
        self._clock = clock or Clock()
        self._poll_interval = poll_interval
        self._db = SQLiteDatabase(self.path, schema=_SCHEMA, version=SCHEMA_VERSION)
        self._lock = threading.Lock()  # guards the watch state below, never held over I/O
        # Serialises taking, checking and giving up leadership (held over I/O, never
        # over a callback: callbacks run on the dispatch thread).
        self._leadership_lock = threading.Lock()
        self._run_watchers: list[_RunWatcher] = []
        self._trigger_watchers: list[Callable[[], None]] = []
        self._trigger_seq = 0  # newest trigger seq the trigger watchers were told about
        self._election: _Election | None = None
        self._own_peers: set[str] = set()
        self._events: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Stop the threads, drop the peers registered here, close the connections.

        Idempotent. Like a lost session: a leader here abdicates as in
        :meth:`stop_election` (the listener is told before the threads stop).
        """
        if self._db.closed:
            return
        with contextlib.suppress(StoreUnavailable):
            self.stop_election()
        for peer_id in list(self._own_peers):
            with contextlib.suppress(StoreUnavailable):
                self.unregister_peer(peer_id)
        self._stop.set()
        self._wake.set()
        self._events.put(None)
        current = threading.current_thread()
        for thread in (self._poller, self._dispatcher):
            if thread is not None and thread is not current:
                thread.join(timeout=10)
        self._db.close()

    def status(self) -> StoreStatus:
        """ok when the file answers a query now; detail is its path (or the error)."""
        try:
            with self._db.connection() as conn:
                conn.execute("SELECT epoch FROM leader").fetchone()
        except StoreUnavailable as exc:
            return StoreStatus(ok=False, backend=self.backend, detail=str(exc))
        return StoreStatus(ok=True, backend=self.backend, detail=str(self.path))

    # -- membership ----------------------------------------------------------
    def register_peer(self, peer: PeerInfo) -> None:
        """Publish (or replace) a peer's record; ``close()`` removes the ones registered here."""
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO peers (peer_id, data) VALUES (?, ?)",
                (peer.peer_id, json.dumps(peer.to_json())),
            )
        self._own_peers.add(peer.peer_id)

    def unregister_peer(self, peer_id: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,))
        self._own_peers.discard(peer_id)

    def peers(self) -> list[PeerInfo]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT data FROM peers ORDER BY peer_id").fetchall()
        return [PeerInfo.from_json(json.loads(data)) for (data,) in rows]

    # -- leadership ----------------------------------------------------------
    def start_election(self, peer_id: str, listener: LeadershipListener) -> None:
        """Become leader at once with a new epoch (fencing every older one).

        ``listener.establish_leadership(epoch)`` is called on the store's dispatch
        thread, soon after this returns. Raises RuntimeError if this store is
        already standing for election.
        """
        with self._lock:
            if self._election is not None:
                raise RuntimeError("already standing for election; call stop_election first")
            self._election = _Election(peer_id, listener)
        self._ensure_threads()
        try:
            self._take_leadership()
        except BaseException:
            with self._lock:
                self._election = None
            raise

    def stop_election(self) -> None:
        """Abdicate (clearing the leader row if it is still ours) and tell the listener.

        ``revoke_leadership`` is called on the dispatch thread if this peer was
        leader. A no-op when not standing.
        """
        with self._leadership_lock:
            with self._lock:
                election, self._election = self._election, None
            if election is not None:
                self._give_up(election)

    def resign(self, epoch: int) -> None:
        """Give the leader row up (telling the listener), then take it again if it is free:
        with a single daemon on the file, leadership comes back at once with a new epoch."""
        with self._leadership_lock:
            election = self._election
            if election is None or election.epoch != epoch:
                return
            log.warning("peer %s resigns leadership (epoch %d)", election.peer_id, election.epoch)
            self._give_up(election)
        self._take_leadership(only_if_free=True)

    def _give_up(self, election: _Election) -> None:
        """Clear the leader row if it is still ours and tell the listener (leadership lock)."""
        epoch, election.epoch = election.epoch, None
        if epoch is None:
            return
        try:
            with self._db.write() as conn:
                conn.execute(
                    "UPDATE leader SET peer_id = NULL, since = NULL "
                    "WHERE id = 1 AND peer_id = ? AND epoch = ?",
                    (election.peer_id, epoch),
                )
        finally:  # the peer stops acting as leader even if the row could not be cleared
            self._dispatch(election.listener.revoke_leadership)

    def publish_scheduler_pass(self, status: SchedulerPass) -> None:
        try:
            with self._db.write() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO scheduler_pass (id, data) VALUES (1, ?)",
                    (json.dumps(status.to_json()),),
                )
        except StoreUnavailable as exc:
            log.warning("could not publish the scheduler's pass: %s", exc)

    def scheduler_pass(self) -> SchedulerPass | None:
        with self._db.connection() as conn:
            row = conn.execute("SELECT data FROM scheduler_pass WHERE id = 1").fetchone()
        return SchedulerPass.from_json(json.loads(row[0])) if row else None

    def leader(self) -> LeaderInfo | None:
        with self._db.connection() as conn:
            peer_id, epoch, since = conn.execute(
                "SELECT peer_id, epoch, since FROM leader WHERE id = 1"
            ).fetchone()
        if peer_id is None:
            return None
        return LeaderInfo(peer_id=peer_id, epoch=epoch, since=parse_slot(since))

    def _take_leadership(self, *, only_if_free: bool = False) -> None:
        with self._leadership_lock:
            election = self._election
            if election is None or election.epoch is not None:
                return
            with self._db.write() as conn:
                holder, epoch = conn.execute(
                    "SELECT peer_id, epoch FROM leader WHERE id = 1"
                ).fetchone()
                if only_if_free and holder is not None:
                    return
                epoch += 1
                conn.execute(
                    "UPDATE leader SET peer_id = ?, epoch = ?, since = ? WHERE id = 1",
                    (election.peer_id, epoch, format_slot(self._clock.now())),
                )
            election.epoch = epoch
            self._dispatch(lambda: election.listener.establish_leadership(epoch))

    def _check_leadership(self, conn: sqlite3.Connection) -> None:
        """Poll-thread half of leadership: notice being deposed, or a free row to take."""
        with self._leadership_lock:
            election = self._election
            if election is None:
                return
            peer_id, epoch = conn.execute(
                "SELECT peer_id, epoch FROM leader WHERE id = 1"
            ).fetchone()
            if election.epoch is not None and (peer_id, epoch) != (
                election.peer_id,
                election.epoch,
            ):
                election.epoch = None
                log.warning(
                    "leadership of %s lost to %s (epoch %s)", election.peer_id, peer_id, epoch
                )
                self._dispatch(election.listener.revoke_leadership)
                return
            take = election.epoch is None and peer_id is None
        if take:
            self._take_leadership(only_if_free=True)

    # -- run records ---------------------------------------------------------
    def record_runs(
        self,
        epoch: int,
        runs: Sequence[RunRecord],
        cursors: dict[str, datetime] | None = None,
    ) -> list[RunRecord]:
        """Create the runs not recorded yet and move cursors forward, in one transaction.

        The epoch is checked inside the transaction: :class:`FencedOut` (nothing
        written) unless ``epoch`` is the current leader's. Existing run ids, and
        repeated ids within ``runs``, are left as they are and not returned.
        A cursor never moves back. This instance's run watchers hear of the
        created runs at once.
        """
        created: list[RunRecord] = []
        with self._db.write() as conn:
            peer_id, current = conn.execute(
                "SELECT peer_id, epoch FROM leader WHERE id = 1"
            ).fetchone()
            if peer_id is None or current != epoch:
                raise FencedOut(f"epoch {epoch} is not the leader's (current: {current})")
            for record in runs:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO runs "
                    "(run_id, job_id, slot_us, peer_id, state, cancel_requested, ended_us, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    self._run_row(record),
                )
                if cur.rowcount == 1:
                    created.append(record)
            for job_id, slot in (cursors or {}).items():
                conn.execute(
                    "INSERT INTO cursors (job_id, slot_us, slot) VALUES (?, ?, ?) "
                    "ON CONFLICT (job_id) DO UPDATE SET slot_us = excluded.slot_us, "
                    "slot = excluded.slot WHERE excluded.slot_us > cursors.slot_us",
                    (job_id, to_us(slot), format_slot(slot)),
                )
        self._notify_runs(created)
        return created

    def cursors(self) -> dict[str, datetime]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT job_id, slot FROM cursors").fetchall()
        return {job_id: parse_slot(slot) for job_id, slot in rows}

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._db.connection() as conn:
            row = conn.execute("SELECT data FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return RunRecord.from_json(json.loads(row[0])) if row else None

    def runs(
        self,
        *,
        job_id: str | None = None,
        peer_id: str | None = None,
        states: Iterable[RunState] | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, oldest slot first (ties: run id)."""
        where: list[str] = []
        params: list[Any] = []
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if peer_id is not None:
            where.append("peer_id = ?")
            params.append(peer_id)
        if states is not None:
            values = [RunState(s).value for s in states]
            if not values:
                return []
            where.append(f"state IN ({', '.join('?' * len(values))})")
            params.extend(values)
        sql = "SELECT data FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY slot_us, run_id"
        with self._db.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [RunRecord.from_json(json.loads(data)) for (data,) in rows]

    def executing_runs(self) -> set[str]:
        """Running runs of registered peers (a peer that stops unregisters; a crashed one is
        unregistered by the next peer that opens these files)."""
        with self._db.connection() as conn:
            rows = conn.execute(
                "SELECT run_id FROM runs "
                "WHERE state = ? AND peer_id IN (SELECT peer_id FROM peers)",
                (RunState.RUNNING.value,),
            ).fetchall()
        return {run_id for (run_id,) in rows}

    def active_run_ids(self) -> set[str]:
        states = [s.value for s in ACTIVE_STATES]
        with self._db.connection() as conn:
            rows = conn.execute(
                f"SELECT run_id FROM runs WHERE state IN ({', '.join('?' * len(states))})", states
            ).fetchall()
        return {run_id for (run_id,) in rows}

    def claim_run(self, run_id: str, peer_id: str, started_at: datetime) -> RunRecord | None:
        """assigned -> running, if assigned to ``peer_id``; the updated record, else None."""
        return self.claim_runs([run_id], peer_id, started_at).get(run_id)

    claims_in_batches = True

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        """:meth:`claim_run` of many runs in one write transaction: the ones claimed, by id."""
        claimed: dict[str, RunRecord] = {}
        with self._db.write() as conn:
            for run_id in dict.fromkeys(run_ids):
                row = conn.execute("SELECT data FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if row is None:
                    continue
                record = RunRecord.from_json(json.loads(row[0]))
                if record.state != RunState.ASSIGNED or record.peer_id != peer_id:
                    continue
                claimed[run_id] = claimed_record(record, started_at)
            conn.executemany(
                "UPDATE runs SET job_id = ?, slot_us = ?, peer_id = ?, state = ?, "
                "cancel_requested = ?, ended_us = ?, data = ? WHERE run_id = ?",
                [(*self._run_row(r)[1:], r.run_id) for r in claimed.values()],
            )
        self._notify_runs(claimed.values())
        return claimed

    def update_run(
        self, run_id: str, *, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> RunRecord | None:
        """Change fields of an active run; the updated record, or None if unknown or finished.

        ``run_id``, ``job_id`` and ``slot`` cannot change, and a terminal state
        only through :meth:`finish_run` (ValueError). Moving a run (back) to
        ``assigned``, or setting ``cancel_requested``, notifies the run's watchers.
        """
        record, _ = self._modify(run_id, update_change(changes, expect))
        return record

    def finish_run(
        self,
        run_id: str,
        state: RunState,
        *,
        ended_at: datetime,
        exit_code: int | None = None,
        reason: str = "",
        expect: Mapping[str, Any] | None = None,
    ) -> RunRecord | None:
        """Active -> ``state`` (terminal); a finished run is returned as stored; None if unknown."""
        change = finish_change(state, ended_at, exit_code, reason, expect)
        record, existing = self._modify(run_id, change)
        return record or existing

    def request_cancel(self, run_id: str, by: str | None = None) -> bool:
        """Set ``cancel_requested`` on an active run (idempotent); False when it is not active."""

        record, existing = self._modify(run_id, cancel_change(by))
        current = record or existing
        return current is not None and not current.state.terminal

    def watch_runs(self, peer_id: str, callback: Callable[[RunRecord], None]) -> None:
        """Call ``callback`` once for each run assigned to ``peer_id`` and once when a
        cancel is requested for one of its active runs: first those existing now, then
        new ones. Called on the dispatch thread."""
        watcher = _RunWatcher(peer_id, callback)
        with self._lock:
            self._run_watchers.append(watcher)
        self._ensure_threads()
        self._wake.set()  # the poll thread scans what exists now

    def prune_runs(self, finished_before: datetime, keep: int | None = None) -> int:
        """Delete terminal runs that ended before the instant (a terminal run without
        ``ended_at`` counts as ended at its slot) and, with ``keep``, the terminal runs
        beyond the ``keep`` newest (by slot); returns how many."""
        terminal = f"state IN ({', '.join('?' * len(_TERMINAL))})"
        with self._db.write() as conn:
            deleted = conn.execute(
                f"DELETE FROM runs WHERE {terminal} AND ended_us < ?",
                (*_TERMINAL, to_us(finished_before)),
            ).rowcount
            if keep is not None:
                deleted += conn.execute(
                    f"DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs WHERE {terminal} "
                    "ORDER BY slot_us DESC, run_id DESC LIMIT -1 OFFSET ?)",
                    (*_TERMINAL, keep),
                ).rowcount
            return deleted

    def _modify(
        self, run_id: str, change: Callable[[RunRecord], RunRecord | None]
    ) -> tuple[RunRecord | None, RunRecord | None]:
        """Read-modify-write one run in a write transaction: (updated or None, as it was)."""
        with self._db.write() as conn:
            row = conn.execute("SELECT data FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None, None
            existing = RunRecord.from_json(json.loads(row[0]))
            updated = change(existing)
            if updated is None:
                return None, existing
            conn.execute(
                "UPDATE runs SET job_id = ?, slot_us = ?, peer_id = ?, state = ?, "
                "cancel_requested = ?, ended_us = ?, data = ? WHERE run_id = ?",
                (*self._run_row(updated)[1:], run_id),
            )
        self._notify_runs([updated])
        return updated, existing

    @staticmethod
    def _run_row(record: RunRecord) -> tuple[Any, ...]:
        ended_us = None
        if record.state.terminal:
            ended_us = to_us(record.ended_at or record.slot)
        return (
            record.run_id,
            record.job_id,
            to_us(record.slot),
            record.peer_id,
            record.state.value,
            int(record.cancel_requested),
            ended_us,
            json.dumps(record.to_json()),
        )

    # -- manual triggers -----------------------------------------------------
    def request_trigger(self, request: TriggerRequest) -> None:
        """Queue a manual run; a second request for the same run id changes nothing."""
        with self._db.write() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO triggers "
                "(run_id, job_id, slot, requested_us, requested_at, requested_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request.run_id,
                    request.job_id,
                    format_slot(request.slot),
                    to_us(request.requested_at),
                    format_slot(request.requested_at),
                    request.requested_by,
                ),
            )
            seq = cur.lastrowid if cur.rowcount == 1 else None
        if seq is not None:
            self._notify_triggers(seq)

    def pending_triggers(self) -> list[TriggerRequest]:
        """Queued manual runs, oldest request first."""
        with self._db.connection() as conn:
            rows = conn.execute(
                "SELECT run_id, job_id, slot, requested_at, requested_by FROM triggers "
                "ORDER BY requested_us, seq"
            ).fetchall()
        return [
            TriggerRequest(
                run_id=run_id,
                job_id=job_id,
                slot=parse_slot(slot),
                requested_at=parse_slot(requested_at),
                requested_by=requested_by,
            )
            for run_id, job_id, slot, requested_at, requested_by in rows
        ]

    def remove_trigger(self, run_id: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM triggers WHERE run_id = ?", (run_id,))

    def watch_triggers(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the dispatch thread) after each trigger is queued, by any
        process; once at registration too when triggers are already pending."""
        with self._db.connection() as conn:
            pending, newest = conn.execute(
                "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM triggers"
            ).fetchone()
        with self._lock:
            self._trigger_watchers.append(callback)
            self._trigger_seq = max(self._trigger_seq, newest)
        self._ensure_threads()
        if pending:
            self._dispatch(callback)

    # -- loaded configuration ------------------------------------------------
    def publish_config(self, snapshot: ConfigSnapshot) -> None:
        data = {
            "peer_id": snapshot.peer_id,
            "digest": snapshot.digest,
            "jobs": snapshot.jobs,
            "nodes": snapshot.nodes,
            "errors": snapshot.errors,
            "loaded_at": format_slot(snapshot.loaded_at) if snapshot.loaded_at else None,
        }
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO configs (peer_id, data) VALUES (?, ?)",
                (snapshot.peer_id, json.dumps(data)),
            )

    def config(self, peer_id: str) -> ConfigSnapshot | None:
        with self._db.connection() as conn:
            row = conn.execute("SELECT data FROM configs WHERE peer_id = ?", (peer_id,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        return ConfigSnapshot(
            peer_id=data["peer_id"],
            digest=data["digest"],
            jobs=data["jobs"],
            nodes=data["nodes"],
            errors=data["errors"],
            loaded_at=parse_slot(data["loaded_at"]) if data["loaded_at"] else None,
        )

    # -- node health ---------------------------------------------------------
    def set_node_health(self, health: NodeHealth) -> None:
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO node_health (node_id, data) VALUES (?, ?)",
                (health.node_id, json.dumps(health.to_json())),
            )

    def clear_node_health(self, node_id: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM node_health WHERE node_id = ?", (node_id,))

    def node_health(self) -> dict[str, NodeHealth]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT data FROM node_health").fetchall()
        found = (NodeHealth.from_json(json.loads(data)) for (data,) in rows)
        return {h.node_id: h for h in found}

    # -- notification machinery ----------------------------------------------
    def _dispatch(self, call: Callable[[], None]) -> None:
        self._events.put(call)

    def _notify_runs(self, records: Iterable[RunRecord]) -> None:
        """Hand the events of freshly committed records to their watchers (once each)."""
        calls: list[Callable[[], None]] = []
        with self._lock:
            if not self._run_watchers:
                return
            for record in records:
                for watcher in self._run_watchers:
                    events = [e for e in _events(record, watcher.peer_id) if e not in watcher.seen]
                    if events:
                        watcher.seen.update(events)
                        calls.append(_bind(watcher.callback, record))
        for call in calls:
            self._dispatch(call)

    def _notify_triggers(self, seq: int) -> None:
        with self._lock:
            if seq <= self._trigger_seq:
                return
            self._trigger_seq = seq
            callbacks = list(self._trigger_watchers)
        for callback in callbacks:
            self._dispatch(callback)

    def _ensure_threads(self) -> None:
        with self._lock:
            if self._dispatcher is not None or self._stop.is_set():
                return
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop,
                name=f"sqlite-store-events:{self.path.name}",
                daemon=True,
            )
            self._poller = threading.Thread(
                target=self._poll_loop, name=f"sqlite-store-poll:{self.path.name}", daemon=True
            )
        self._dispatcher.start()
        self._poller.start()

    def _dispatch_loop(self) -> None:
        while True:
            call = self._events.get()
            if call is None:
                return
            try:
                call()
            except Exception:
                log.exception("a coordination store callback failed")

    def _poll_loop(self) -> None:
        # A connection of its own: PRAGMA data_version changes when *another*
        # connection (this process's pool included) commits.
        conn = self._db.open_connection()
        last_version: int | None = None
        try:
            while not self._stop.is_set():
                woken = self._wake.is_set()
                self._wake.clear()
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if woken or version != last_version:
                        last_version = version
                        self._poll_once(conn)
                except sqlite3.Error:
                    log.exception("polling %s failed", self.path)
                except StoreUnavailable as exc:
                    log.warning("polling %s: %s", self.path, exc)
                self._wake.wait(self._poll_interval)
        finally:
            conn.close()

    def _poll_once(self, conn: sqlite3.Connection) -> None:
        self._check_leadership(conn)
        self._scan_runs(conn)
        self._scan_triggers(conn)

    def _scan_runs(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            watchers = list(self._run_watchers)
            # Keys seen before the query were committed before it: if the query does
            # not return them, the run has left that state and the key can go.
            snapshots = {id(w): set(w.seen) for w in watchers}
        for peer_id in {w.peer_id for w in watchers}:
            rows = conn.execute(
                "SELECT data FROM runs WHERE peer_id = ? AND "
                "(state = 'assigned' OR (cancel_requested = 1 AND state IN (?, ?)))",
                (peer_id, *_ACTIVE),
            ).fetchall()
            records = [RunRecord.from_json(json.loads(data)) for (data,) in rows]
            current = {e for r in records for e in _events(r, peer_id)}
            calls: list[Callable[[], None]] = []
            with self._lock:
                for watcher in watchers:
                    if watcher.peer_id != peer_id:
                        continue
                    watcher.seen -= snapshots[id(watcher)] - current
                    for record in records:
                        events = [e for e in _events(record, peer_id) if e not in watcher.seen]
                        if events:
                            watcher.seen.update(events)
                            calls.append(_bind(watcher.callback, record))
            for call in calls:
                self._dispatch(call)

    def _scan_triggers(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._trigger_watchers:
                return
        newest = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM triggers").fetchone()[0]
        self._notify_triggers(newest)


def _bind(callback: Callable[[RunRecord], None], record: RunRecord) -> Callable[[], None]:
    return lambda: callback(record)
