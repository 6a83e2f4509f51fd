"""The ZooKeeper coordination store: a real cluster's shared state, through kazoo.

Paths come from :mod:`distcrond.coordination.zkpaths` (the layout is described
there). The essentials:

* **Fencing.** The token is the data *version* of ``/epoch``. A new leader bumps
  it with a compare-and-set, in one transaction with a ``check`` of its own lock
  node and the rewrite of ``/leader``. Every fenced write (``record_runs``) is one
  transaction that starts with ``check(/epoch, version=epoch)`` and
  ``check(<the leader's lock node>, version=0)``: a deposed leader's transaction
  fails as a whole, and so does the write of a leader whose session died before
  anybody else took over (its ephemeral lock node is gone).
  ``transaction().commit()`` does not raise: every result list is inspected.
* **The run lock** is the create of ``/runs/<job>/<run>``: ZooKeeper refuses a
  second create, so a slot is recorded once. Indexes (``/assignments/<peer>``,
  ``/cancels/<peer>``, and ``/active`` for an active run without a peer, which the
  scheduler never records) change in the same transaction as
  the record, so they always match it; every record change is a compare-and-set
  on the record's version.
* **Idempotency.** Every operation is retried on connection loss from a fresh
  read; a retry that finds its own earlier write (same bytes) counts it as done.
  ``NodeExists`` on a create of ours and ``NoNode`` on a delete count as success.
* **Connection states** (kazoo's): SUSPENDED means "the session may be gone":
  ``claim_run`` refuses; other requests wait in kazoo's queue for the connection
  (retried up to the session timeout). The leader stays leader: its writes are
  fenced by the epoch, so none lands if the session expired and another peer leads.
  A reconnection within the session goes on with the same epoch (the lock node is
  still ours, so nobody else can have led): a ZooKeeper server's loss costs the
  scheduler only the reconnection. LOST (session expired) revokes the leadership
  and means contending again, and re-creating this instance's
  peer records; the heartbeats of the runs it had claimed are not re-created
  (those runs are lost: see ``executing_runs``).
* **Callbacks** (run and trigger watches) run on one dispatch thread of this store,
  in order, never on kazoo's threads; an exception is logged. The leadership
  listener is told on the election thread (its methods only queue the transition),
  so that no watch's reads can delay a change of leader. The work a reconnection
  brings (re-arming watches, re-creating peer records) runs on an upkeep thread,
  behind which no callback waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import queue
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import methodcaller
from typing import Any, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    KazooException,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    UnimplementedError,
)
from kazoo.protocol.serialization import GetChildren, GetData
from kazoo.protocol.states import KazooState
from kazoo.security import make_digest_acl

from distcrond.clock import Clock
from distcrond.coordination.base import (
    ClaimInterrupted,
    ConfigSnapshot,
    CoordinationStore,
    FencedOut,
    Finish,
    LeaderInfo,
    LeadershipListener,
    NodeHealth,
    PeerInfo,
    SchedulerPass,
    SchedulingView,
    StoreStatus,
    StoreUnavailable,
    TriggerRequest,
    cancel_change,
    claimed_record,
    finish_change,
    update_change,
)
from distcrond.coordination.zkelection import CAS_ATTEMPTS, StoreCalls, ZooKeeperElection
from distcrond.coordination.zkpaths import ZKPaths
from distcrond.coordination.zkwire import (
    NODE_CREATED,
    NODE_DELETED,
    RETRYABLE,
    PollHandler,
    add_watch_async,
    multi_read_async,
    quick_reconnects,
    route_watch_events,
    transaction_failure,
)
from distcrond.runs import (
    ACTIVE_STATES,
    RunRecord,
    RunState,
    format_slot,
    parse_slot,
    split_run_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_DAWN = datetime.min.replace(tzinfo=UTC)
_ASSIGNED = "assigned"
_CANCEL = "cancel"
# A znode holds at most jute.maxbuffer (1 MB by default) of data: big config
# snapshots are compressed; beyond that the server refuses the write.
_COMPRESS_ABOVE = 512 * 1024
_ZLIB_PREFIX = b"zlib:"
# Runs claimed or finished in one transaction at most (each adds two to four operations
# and up to ~1 KB to it).
_BATCH = 100
# Run records remembered with their version (see ``_versions``): beyond, the memory starts
# afresh (entries of runs finished by another peer are otherwise dropped at their finish).
_VERSIONS_MAX = 10_000
# A persistent watch that could not be armed, or whose new runs could not be read, is
# armed (and its directory listed) again this much later.
_RELIST_AFTER = 1.0  # seconds
# A persistent watch's first event waits this long for the others of its transaction.
_DRAIN_GATHER = 0.002  # seconds
# Reconnection attempts (each a round over every server): when the ensemble's leader dies,
# the others drop every client and re-elect (0.2-0.6 s); kazoo's default backoff (0.1 s,
# doubling, and up to 1 s here before) reconnected the peers 0.4-0.7 s after the loss; this
# one tries again every ~0.05 s (±40% jitter), so a peer is back within ~0.07 s of a server
# serving again. A few refused connections a second costs the ensemble nothing.
_CONNECTION_RETRY = {"max_tries": -1, "delay": 0.02, "backoff": 1.5, "max_delay": 0.05}


def _encode(record: RunRecord) -> bytes:
    return json.dumps(record.to_stored_json(), separators=(",", ":"), sort_keys=True).encode()


def _decode(data: bytes) -> RunRecord:
    return RunRecord.from_json(json.loads(data))


def _job_of(run_id: str) -> str | None:
    try:
        return split_run_id(run_id)[0]
    except ValueError:
        return None


def _slot_key(run_id: str) -> tuple[datetime, str]:
    """A run id's sort key: oldest slot first (one that does not parse, first of all: a
    prune takes it as old)."""
    try:
        return split_run_id(run_id)[1], run_id
    except ValueError:
        return _DAWN, run_id


def _sort_key(record: RunRecord) -> tuple[datetime, str]:
    return (record.slot, record.run_id)


def _events(record: RunRecord, peer_id: str) -> list[tuple[str, str]]:
    """The watcher events ``record`` represents for ``peer_id``."""
    if record.peer_id != peer_id or record.state.terminal:
        return []
    events = []
    if record.state == RunState.ASSIGNED:
        events.append((record.run_id, _ASSIGNED))
    if record.cancel_requested:
        events.append((record.run_id, _CANCEL))
    return events


@dataclass
class _RunWatcher:
    peer_id: str
    callback: Callable[[RunRecord], None]
    seen: set[tuple[str, str]] = field(default_factory=set)
    children: dict[str, set[str]] = field(default_factory=dict)  # kind -> known child names
    # A persistent watch on the assignments: the changes its events told, not yet handed
    # to the dispatch thread; while the directory is being listed, the events in order.
    arrived: set[str] = field(default_factory=set)
    departed: set[str] = field(default_factory=set)
    draining: bool = False
    listing: list[tuple[str, bool]] | None = None


class ZooKeeperCoordinationStore(CoordinationStore):
    """Coordination state in a ZooKeeper ensemble; thread-safe, one instance per process.

    ``hosts`` is a kazoo connection string (it may end with a chroot, created if
    missing); ``root`` is the cluster's directory in it. ``session_timeout``
    (seconds) is also the longest a call waits for an unreachable ensemble before
    raising :class:`StoreUnavailable`. With ``auth=(user, password)`` the client
    authenticates with digest and every node is created readable and writable by
    that identity only. ``client``: a KazooClient to use instead of making one
    (started here if it is not; never closed here).
    """

    backend = "zookeeper"

    def __init__(
        self,
        hosts: str,
        root: str = "/distcron",
        session_timeout: float = 10.0,
        clock: Clock | None = None,
        auth: tuple[str, str] | None = None,
        client: KazooClient | None = None,
    ) -> None:
        self._hosts = hosts
        self._paths = ZKPaths(root)
        self._clock = clock or Clock()
        self._op_timeout = max(session_timeout, 2.0)
        self._auth = auth
        self._acl = [make_digest_acl(auth[0], auth[1], all=True)] if auth else None
        auth_data = [("digest", f"{auth[0]}:{auth[1]}")] if auth else None
        self._owns_client = client is None
        if client is None:
            client = KazooClient(
                hosts=hosts,
                handler=PollHandler(),
                timeout=session_timeout,
                auth_data=auth_data,
                default_acl=self._acl,
                connection_retry=_CONNECTION_RETRY,
            )
        else:
            if auth:
                client.add_auth("digest", f"{auth[0]}:{auth[1]}")
                client.default_acl = self._acl
        self._client = client
        self._lock = threading.Lock()  # guards the state below, never held over I/O
        self._closed = False
        self._run_watchers: list[_RunWatcher] = []
        self._own_peers: dict[str, PeerInfo] = {}
        self._heartbeats: set[str] = set()  # runs claimed here and not finished
        # Active run records as this instance last read or wrote them, with their znode
        # version: the claim of a run handed to this peer, and the finish of a run it
        # claimed, then write without reading the record first. A stale entry fails its
        # compare-and-set, and the record is read again. Taken out when used.
        self._versions: dict[str, tuple[RunRecord, int]] = {}
        self._ensured: set[str] = set()  # parent nodes known to exist
        self._multi_read = True  # until the servers answer that they do not have it
        self._persistent_watches = True  # likewise
        # Assignment directories under a persistent watch -> their watcher.
        self._watched: dict[str, _RunWatcher] = {}
        # Cursor (slot, znode version) as last read or written here; checked on every write.
        self._cursor_cache: dict[str, tuple[datetime, int]] = {}
        self._session_id: int | None = None
        self._reconnected_at: datetime | None = None
        calls = StoreCalls(self._retry, self._wait, self._get, self._delete, self._current_session)
        self._election = ZooKeeperElection(
            client, self._paths, self._clock, self._op_timeout, calls
        )
        self._events: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, args=(self._events,), name="zk-store-events", daemon=True
        )
        self._dispatcher.start()
        # Re-arming watches and re-creating ephemeral nodes after a reconnection wait on the
        # servers (up to the session timeout when they flap): on a thread of their own, so
        # that no callback waits behind them.
        self._upkeep: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._upkeeper = threading.Thread(
            target=self._dispatch_loop, args=(self._upkeep,), name="zk-store-upkeep", daemon=True
        )
        self._upkeeper.start()
        self._connected = threading.Event()  # set while the client is connected
        client.add_listener(self._on_state)
        route_watch_events(client, self._on_watch_event)
        if self._owns_client:
            quick_reconnects(client)
        try:
            if not client.connected:
                with warnings.catch_warnings():  # "No chroot path exists": created below
                    warnings.filterwarnings("ignore", "No chroot path exists")
                    client.start(timeout=self._op_timeout)
            if client.connected:  # a client given connected: no CONNECTED event comes
                self._connected.set()
            self._session_id = self._current_session()
            self._ensure_chroot()
            self._ensure_layout()
        except Exception as exc:
            self._shutdown_threads()
            if self._owns_client:
                with contextlib.suppress(Exception):
                    client.stop()
                    client.close()
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"ZooKeeper {hosts}: {exc!r}") from exc

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Abdicate if leader, stop the threads and watches, close the session (idempotent).

        Ephemeral nodes (peer records, heartbeats) go with the session; with a
        client that is not ours, they are deleted explicitly.
        """
        with self._lock:
            if self._closed:
                return
        with contextlib.suppress(StoreUnavailable):
            self._election.close()
        with self._lock:
            self._closed = True
            peers = list(self._own_peers)
            heartbeats = list(self._heartbeats)
            self._own_peers.clear()
            self._heartbeats.clear()
            self._run_watchers.clear()
        self._client.remove_listener(self._on_state)
        if self._owns_client:
            with contextlib.suppress(Exception):
                self._client.stop()
                self._client.close()
        else:
            for path in [self._paths.peer(p) for p in peers] + [
                self._paths.heartbeat(r) for r in heartbeats
            ]:
                with contextlib.suppress(Exception):
                    self._delete(path)
        self._shutdown_threads()

    def _shutdown_threads(self) -> None:
        for events, thread in ((self._upkeep, self._upkeeper), (self._events, self._dispatcher)):
            events.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def status(self) -> StoreStatus:
        """ok while the session is connected; detail names the ensemble, root and state."""
        state = "CLOSED" if self._closed else self._client.state
        detail = f"{self._hosts} root={self._paths.root or '/'} state={state}"
        return StoreStatus(ok=state == KazooState.CONNECTED, backend=self.backend, detail=detail)

    # -- membership ----------------------------------------------------------
    def reconnected_at(self) -> datetime | None:
        return self._reconnected_at

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def register_peer(self, peer: PeerInfo) -> None:
        """Publish (or update) a peer's ephemeral record, owned by this session.

        A record left by another (dying) session is replaced, so that it does not
        vanish when that session expires. It is re-created after a session loss.
        """
        with self._lock:
            self._own_peers[peer.peer_id] = peer
        self._retry(
            lambda _lost: self._put_ephemeral(self._paths.peer(peer.peer_id), _peer_data(peer))
        )

    def unregister_peer(self, peer_id: str) -> None:
        with self._lock:
            self._own_peers.pop(peer_id, None)
        self._retry(lambda _lost: self._delete(self._paths.peer(peer_id)))

    def peers(self) -> list[PeerInfo]:
        def read(_lost: bool) -> list[PeerInfo]:
            names = self._children(self._paths.peers)
            found = self._get_many([self._paths.peer(n) for n in names])
            return [PeerInfo.from_json(json.loads(got[0])) for got in found if got is not None]

        return sorted(self._retry(read), key=lambda p: p.peer_id)

    # -- leadership ----------------------------------------------------------
    def start_election(self, peer_id: str, listener: LeadershipListener) -> None:
        """Contend for leadership on a thread of the election's (see zkelection.py);
        ``listener`` hears ``establish_leadership(epoch)`` and ``revoke_leadership()``
        on that thread. RuntimeError if already standing."""
        self._election.start_election(peer_id, listener)

    def stop_election(self) -> None:
        """Withdraw: the lock node is deleted at once (the next contender takes over),
        then the listener is told ``revoke_leadership`` if this peer was leader.
        A no-op when not standing."""
        self._election.stop_election()

    def resign(self, epoch: int) -> None:
        """Hand the leadership of ``epoch`` over (if this peer still holds it), and
        contend again."""
        self._election.resign(epoch)

    def publish_scheduler_pass(self, status: SchedulerPass) -> None:
        """One asynchronous set of ``/scheduler`` (not waited for: a pass never waits on it)."""
        data = json.dumps(status.to_json()).encode()

        def done(result: Any) -> None:  # kazoo's thread
            if not result.successful():
                log.warning("could not publish the scheduler's pass: %r", result.exception)

        try:
            self._client.set_async(self._paths.scheduler, data).rawlink(done)
        except Exception as exc:  # closed or not connected: the next pass publishes again
            log.warning("could not publish the scheduler's pass: %r", exc)

    def scheduler_pass(self) -> SchedulerPass | None:
        """The pass published last, ``at`` on the ensemble's clock (see SchedulerPass)."""

        def read(_lost: bool) -> SchedulerPass | None:
            got = self._get(self._paths.scheduler)
            if got is None or not got[0]:
                return None
            status = SchedulerPass.from_json(json.loads(got[0]))
            at = _server_time(got[1]) - timedelta(seconds=status.published_after)
            return dataclasses.replace(status, at=at)

        return self._retry(read)

    def leader(self) -> LeaderInfo | None:
        """The leader named in ``/leader``, if its lock node is still in the election.

        A ``sync`` first: the server this client talks to may lag behind the ensemble's
        leader, and a peer asked right after a handover must not answer "no leader".
        """

        def read(_lost: bool) -> LeaderInfo | None:
            self._wait(self._client.sync_async(self._paths.leader))
            got = self._get(self._paths.leader)
            if got is None or not got[0]:
                return None
            data = json.loads(got[0])
            if self._wait(self._client.exists_async(data["node"])) is None:
                return None
            return LeaderInfo(
                peer_id=data["peer_id"], epoch=int(data["epoch"]), since=_server_time(got[1])
            )

        return self._retry(read)

    # -- run records ---------------------------------------------------------
    def record_runs(
        self,
        epoch: int,
        runs: Sequence[RunRecord],
        cursors: dict[str, datetime] | None = None,
    ) -> list[RunRecord]:
        """Create the runs not recorded yet and move cursors forward, in one fenced transaction.

        :class:`FencedOut` (nothing written) unless ``epoch`` is the current
        leader's and that leader still holds its lock. Existing run ids, and
        repeated ids within ``runs``, are left as they are and not returned. A
        cursor never moves back.
        """
        unique: dict[str, RunRecord] = {}
        for record in runs:
            unique.setdefault(record.run_id, record)
        wanted = list(unique.values())
        payloads = {r.run_id: _encode(r) for r in wanted}
        cursors = dict(cursors or {})

        def attempt(lost: bool) -> list[RunRecord]:
            # Optimistic: the transaction creates every run not known to exist; a create that
            # fails (NodeExists) names the run, which is then left out and the rest retried.
            # Cursor versions come from this instance's cache (the leader is their only
            # writer); a stale one fails the check and is read again.
            existing, ours = self._recorded_before(wanted, payloads) if lost else (set(), set())
            for _ in range(CAS_ATTEMPTS):
                node = self._fence_node(epoch)
                new = [r for r in wanted if r.run_id not in existing]
                current = self._cursor_versions(list(cursors))
                parents = {self._paths.run_bucket(r.job_id) for r in new}
                for r in new:
                    parents |= {_parent(p) for p in self._index(r)}
                self._ensure_parents(parents)

                txn = self._client.transaction()
                txn.check(self._paths.epoch, epoch)
                txn.check(node, 0)
                owners: list[RunRecord | str | None] = [None, None]  # what each op writes
                for r in new:
                    txn.create(self._paths.run(r.job_id, r.run_id), payloads[r.run_id], self._acl)
                    owners.append(r)
                    for index_path in sorted(self._index(r)):
                        txn.create(index_path, b"", self._acl)
                        owners.append(r)
                moved: dict[str, tuple[datetime, int]] = {}
                for job_id, slot in cursors.items():
                    text = format_slot(slot).encode()
                    known = current.get(job_id)
                    if known is None:
                        txn.create(self._paths.cursor(job_id), text, self._acl)
                        moved[job_id] = (slot, 0)
                    elif slot > known[0]:
                        txn.set_data(self._paths.cursor(job_id), text, version=known[1])
                        moved[job_id] = (slot, known[1] + 1)
                    else:
                        continue
                    owners.append(job_id)
                if not new and not moved:
                    # Nothing to write: the fence still has to hold now.
                    txn = self._client.transaction()
                    txn.check(self._paths.epoch, epoch)
                    txn.check(node, 0)
                failed = transaction_failure(self._wait(txn.commit_async()))
                if failed is None:
                    with self._lock:
                        self._cursor_cache.update(moved)
                    created = {r.run_id for r in new} | ours
                    return [r for r in wanted if r.run_id in created]
                index, error = failed
                if index < 2:
                    raise FencedOut(f"epoch {epoch} is not the current leader's ({error!r})")
                owner = owners[index] if index < len(owners) else None
                if isinstance(error, NoNodeError):
                    with self._lock:
                        self._ensured -= parents  # a bucket was pruned meanwhile
                elif isinstance(error, NodeExistsError) and isinstance(owner, RunRecord):
                    run_path = self._paths.run(owner.job_id, owner.run_id)
                    if self._exists_many([run_path])[0] is not None:
                        existing.add(owner.run_id)  # recorded before: the run lock held
                    else:  # a stray index node without its run: clear it and retry
                        stray = [p for p in sorted(self._index(owner))]
                        for path in stray:
                            with contextlib.suppress(NoNodeError):
                                self._wait(self._client.delete_async(path))
                elif isinstance(error, NodeExistsError | BadVersionError):
                    with self._lock:  # another writer moved a cursor: read them again
                        self._cursor_cache.clear()
                else:
                    raise StoreUnavailable(f"recording runs failed: {error!r}")
            raise StoreUnavailable("recording runs: too much contention")

        return self._retry(attempt)

    def _recorded_before(
        self, wanted: Sequence[RunRecord], payloads: dict[str, bytes]
    ) -> tuple[set[str], set[str]]:
        """After a lost reply (an earlier attempt may have committed), in one read: the
        runs that exist, and those among them with our payload (that attempt's, ours)."""
        found = self._get_many([self._paths.run(r.job_id, r.run_id) for r in wanted])
        recorded = [(r, got) for r, got in zip(wanted, found, strict=True) if got]
        existing = {r.run_id for r, _ in recorded}
        return existing, {r.run_id for r, got in recorded if got[0] == payloads[r.run_id]}

    def _cursor_versions(self, job_ids: list[str]) -> dict[str, tuple[datetime, int]]:
        """(slot, znode version) of the jobs' cursors that exist, from the cache or read."""
        with self._lock:
            known = {j: self._cursor_cache[j] for j in job_ids if j in self._cursor_cache}
        missing = [j for j in job_ids if j not in known]
        if missing:
            found = self._get_many([self._paths.cursor(j) for j in missing])
            read = {
                j: (parse_slot(got[0].decode()), got[1].version)
                for j, got in zip(missing, found, strict=True)
                if got is not None
            }
            with self._lock:
                self._cursor_cache.update(read)
            known.update(read)
        return known

    def _fence_node(self, epoch: int) -> str:
        """The lock node of the leader of ``epoch``; FencedOut when it is not the leader's."""
        node = self._election.fence_node(epoch)
        if node is not None:
            return node
        got = self._get(self._paths.leader)
        data = json.loads(got[0]) if got is not None and got[0] else None
        if data is None or data.get("epoch") != epoch:
            raise FencedOut(f"epoch {epoch} is not the current leader's")
        return str(data["node"])

    def cursors(self) -> dict[str, datetime]:
        def read(_lost: bool) -> dict[str, datetime]:
            names = self._children(self._paths.cursors)
            found = self._get_many([self._paths.cursor(n) for n in names])
            return {
                name: parse_slot(got[0].decode())
                for name, got in zip(names, found, strict=True)
                if got is not None
            }

        return self._retry(read)

    def get_run(self, run_id: str) -> RunRecord | None:
        job_id = _job_of(run_id)
        if job_id is None:
            return None
        got = self._retry(lambda _lost: self._get(self._paths.run(job_id, run_id)))
        return _decode(got[0]) if got is not None else None

    def get_runs(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The records, read together (one multiRead)."""
        paths = [self._paths.run(j, r) for r in run_ids if (j := _job_of(r)) is not None]
        found = self._retry(lambda _lost: self._get_many(paths))
        return [_decode(got[0]) for got in found if got is not None]

    def runs(
        self,
        *,
        job_id: str | None = None,
        peer_id: str | None = None,
        states: Iterable[RunState] | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, oldest slot first (ties: run id).

        Active states are read from the indexes (see :meth:`active_run_ids`, or the
        peer's assignments), a job's runs from its bucket; anything else reads every
        bucket.
        """
        wanted = None if states is None else {RunState(s) for s in states}
        if wanted is not None and not wanted:
            return []

        def read(_lost: bool) -> list[RunRecord]:
            if wanted is not None and wanted <= set(ACTIVE_STATES):
                if peer_id is not None:
                    ids = self._children(self._paths.assignments_of(peer_id))
                else:
                    ids = sorted(self._active_ids())
                paths = [self._paths.run(j, i) for i in ids if (j := _job_of(i)) is not None]
            elif job_id is not None:
                bucket = self._paths.run_bucket(job_id)
                paths = [f"{bucket}/{i}" for i in self._children(bucket)]
            else:
                paths = self._all_run_paths()
            found = self._get_many(paths)
            return [_decode(got[0]) for got in found if got is not None]

        records = [
            r
            for r in self._retry(read)
            if (job_id is None or r.job_id == job_id)
            and (peer_id is None or r.peer_id == peer_id)
            and (wanted is None or r.state in wanted)
        ]
        return sorted(records, key=_sort_key)

    def active_run_ids(self) -> set[str]:
        """The assignment indexes of every peer (and ``/active``), read together."""
        return self._retry(lambda _lost: self._active_ids())

    def scheduling_view(self) -> SchedulingView:
        """Two multiReads: the three directories' listings, then the assignment indexes
        and every peer's and unhealthy node's record."""

        def read(_lost: bool) -> SchedulingView:
            paths = self._paths
            tops = [paths.assignments, paths.peers, paths.health]
            assignees, peers, unhealthy = self._children_many(tops)
            indexes = [paths.active, *(paths.assignments_of(p) for p in assignees)]
            records = [paths.peer(n) for n in peers] + [paths.node_health(n) for n in unhealthy]
            found = self._read_many(
                [GetChildren(i, None) for i in indexes] + [GetData(r, None) for r in records]
            )
            listings, data = found[: len(indexes)], found[len(indexes) :]
            peer_data, health_data = data[: len(peers)], data[len(peers) :]
            return SchedulingView(
                active_run_ids={run_id for listing in listings for run_id in listing or ()},
                peers=sorted(
                    (PeerInfo.from_json(json.loads(g[0])) for g in peer_data if g is not None),
                    key=lambda p: p.peer_id,
                ),
                node_health={
                    h.node_id: h
                    for h in (
                        NodeHealth.from_json(json.loads(g[0])) for g in health_data if g is not None
                    )
                },
            )

        return self._retry(read)

    def _active_ids(self) -> set[str]:
        peers = self._children(self._paths.assignments)
        listings = self._children_many(
            [self._paths.active, *(self._paths.assignments_of(p) for p in peers)]
        )
        return {run_id for listing in listings for run_id in listing}

    def _remember_version(self, record: RunRecord, version: int) -> None:
        with self._lock:
            if record.state.terminal:
                self._versions.pop(record.run_id, None)
                return
            if len(self._versions) >= _VERSIONS_MAX and record.run_id not in self._versions:
                self._versions.clear()
            self._versions[record.run_id] = (record, version)

    def _recall_version(self, run_id: str) -> tuple[RunRecord, int] | None:
        with self._lock:
            return self._versions.pop(run_id, None)

    def _read_record(self, path: str) -> tuple[RunRecord, int] | None:
        """A run record and its znode version, read now; None if it does not exist."""
        got = self._get(path)
        return (_decode(got[0]), got[1].version) if got is not None else None

    def _read_versions(
        self, run_ids: Sequence[str], lost: bool
    ) -> dict[str, tuple[RunRecord, int]]:
        """The runs that exist, with their versions: remembered ones (unless ``lost``: a retry
        after a lost reply reads what its first attempt may have written), the others read."""
        found: dict[str, tuple[RunRecord, int]] = {}
        for run_id in run_ids:
            remembered = self._recall_version(run_id)
            if remembered is not None and not lost:
                found[run_id] = remembered
        unread = [r for r in run_ids if r not in found]
        paths = [self._paths.run(_job_of(r) or "", r) for r in unread]
        for run_id, got in zip(unread, self._get_many(paths), strict=True):
            if got is not None:
                found[run_id] = (_decode(got[0]), got[1].version)
        return found

    def _transact(self, plans: Mapping[str, Sequence[methodcaller]]) -> tuple[set[str], set[str]]:
        """Commit every run's (or node's) operations (calls of a kazoo transaction's
        methods) in one transaction. A run whose operation makes it fail is left out, and
        the others are tried again (up to three runs left out; then all the rest are).
        (committed, left)."""
        pending = dict(plans)
        left: set[str] = set()
        while pending and len(left) < 3:
            txn = self._client.transaction()
            owners: list[str] = []
            for run_id, operations in pending.items():
                for operation in operations:
                    operation(txn)
                    owners.append(run_id)
            failed = transaction_failure(self._wait(txn.commit_async()))
            if failed is None:
                return set(pending), left
            index = failed[0]
            culprit = owners[index] if index < len(owners) else next(iter(pending))
            left.add(culprit)
            del pending[culprit]
        return set(), left | set(pending)

    def claim_run(self, run_id: str, peer_id: str, started_at: datetime) -> RunRecord | None:
        """assigned -> running for ``peer_id``: one transaction of a compare-and-set on the
        record's version and the create of the run's ephemeral heartbeat, so that a running
        record without a heartbeat always means its claimer's session ended. None if not
        claimable.

        Raises :class:`StoreUnavailable` unless the session is connected now: a
        peer whose session is suspended may already be considered dead.
        """
        if self._client.state != KazooState.CONNECTED:
            raise StoreUnavailable(f"ZooKeeper session is {self._client.state}: not claiming")
        job_id = _job_of(run_id)
        if job_id is None:
            return None
        path = self._paths.run(job_id, run_id)
        heartbeat = self._paths.heartbeat(run_id)

        def attempt(lost: bool) -> RunRecord | None:
            remembered = None if lost else self._recall_version(run_id)
            for _ in range(CAS_ATTEMPTS):
                fresh = remembered is None
                current, remembered = remembered or self._read_record(path), None
                if current is None:
                    return None
                record, version = current
                claimed = claimed_record(record, started_at)
                if lost and record == claimed and record.peer_id == peer_id:
                    return record  # the attempt whose reply was lost did commit
                if record.state != RunState.ASSIGNED or record.peer_id != peer_id:
                    if not fresh:
                        continue  # maybe stale: a refusal is only trusted from a fresh read
                    return None
                txn = self._client.transaction()
                txn.set_data(path, _encode(claimed), version=version)
                txn.create(heartbeat, b"", self._acl, ephemeral=True)
                failed = transaction_failure(self._wait(txn.commit_async()))
                if failed is None:
                    self._remember_version(claimed, version + 1)
                    return claimed
                index, error = failed
                if index == 0 and isinstance(error, BadVersionError):
                    continue  # changed meanwhile: look again
                if index == 0 and isinstance(error, NoNodeError):
                    return None
                if index == 1 and isinstance(error, NodeExistsError):
                    # Left by a session that re-created it after the run was taken from it.
                    with contextlib.suppress(NoNodeError):
                        self._wait(self._client.delete_async(heartbeat))
                    continue
                raise StoreUnavailable(f"claiming run {run_id} failed: {error!r}")
            raise StoreUnavailable("claiming: too much contention")

        claimed = self._retry(attempt)
        if claimed is not None:
            with self._lock:
                self._heartbeats.add(run_id)
        return claimed

    claims_in_batches = True

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        """:meth:`claim_run` of many runs in one multi-operation transaction (each run's
        compare-and-set and heartbeat create), _BATCH runs at most per transaction.
        When a transaction fails (a run changed meanwhile, a heartbeat was left over), its
        runs are claimed one by one, which sorts out each case."""
        if self._client.state != KazooState.CONNECTED:
            raise StoreUnavailable(f"ZooKeeper session is {self._client.state}: not claiming")
        ids = [r for r in dict.fromkeys(run_ids) if _job_of(r) is not None]
        claimed: dict[str, RunRecord] = {}
        try:
            self._claim_chunks(ids, peer_id, started_at, claimed)
        except StoreUnavailable as e:
            if claimed:
                raise ClaimInterrupted(e, claimed) from e
            raise
        return claimed

    def _claim_chunks(
        self, ids: list[str], peer_id: str, started_at: datetime, claimed: dict[str, RunRecord]
    ) -> None:
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            one_by_one: list[str] = chunk
            if len(chunk) > 1:

                def attempt(
                    lost: bool, chunk: list[str] = chunk
                ) -> tuple[dict[str, RunRecord], list[str]]:
                    return self._claim_batch(chunk, peer_id, started_at, lost)

                done, one_by_one = self._retry(attempt)
                with self._lock:
                    self._heartbeats.update(done)
                claimed.update(done)
            for run_id in one_by_one:
                record = self.claim_run(run_id, peer_id, started_at)
                if record is not None:
                    claimed[run_id] = record

    def _claim_batch(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime, lost: bool
    ) -> tuple[dict[str, RunRecord], list[str]]:
        """One attempt: (the runs claimed, the runs left to claim one by one)."""
        claimed: dict[str, RunRecord] = {}
        planned: dict[str, tuple[RunRecord, int]] = {}
        plans: dict[str, list[methodcaller]] = {}
        current = self._read_versions(run_ids, lost)
        # Not claimable as read (maybe from memory): left to claim_run, which reads afresh.
        stale: set[str] = set()
        for run_id in run_ids:
            if run_id not in current:
                continue
            record, version = current[run_id]
            mine = claimed_record(record, started_at)
            if lost and record == mine and record.peer_id == peer_id:
                claimed[run_id] = record  # an attempt whose reply was lost did commit
                continue
            if record.state != RunState.ASSIGNED or record.peer_id != peer_id:
                stale.add(run_id)
                continue
            path, data, heartbeat = (
                self._paths.run(record.job_id, run_id),
                _encode(mine),
                self._paths.heartbeat(run_id),
            )
            plans[run_id] = [
                methodcaller("set_data", path, data, version=version),
                methodcaller("create", heartbeat, b"", self._acl, ephemeral=True),
            ]
            planned[run_id] = (mine, version)
        committed, left = self._transact(plans) if plans else (set(), set())
        for run_id in committed:
            mine, version = planned[run_id]
            self._remember_version(mine, version + 1)
            claimed[run_id] = mine
        return claimed, sorted(left | stale)

    def executing_runs(self) -> set[str]:
        """The runs with a heartbeat: claimed by a session that is still alive."""
        return set(self._retry(lambda _lost: self._children(self._paths.heartbeats)))

    def update_run(
        self, run_id: str, *, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> RunRecord | None:
        """Change fields of an active run; the updated record, or None if unknown or finished.

        ``run_id``, ``job_id`` and ``slot`` cannot change, and a terminal state
        only through :meth:`finish_run` (ValueError). The indexes follow a change
        of peer or state; a run moved (back) to ``assigned`` is a new assignment
        for its peer's watchers.
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
        """Active -> ``state`` (terminal), dropping its index entries and (if this instance
        holds it) its heartbeat in the same transaction; a finished run is returned as
        stored; None if unknown."""
        change = finish_change(state, ended_at, exit_code, reason, expect)
        record, existing = self._modify(run_id, change)
        if existing is not None and (record or existing).state.terminal:
            with self._lock:
                held = run_id in self._heartbeats
                self._heartbeats.discard(run_id)
            if held and record is None:  # finished by somebody else: drop our heartbeat
                with contextlib.suppress(StoreUnavailable):
                    self._retry(lambda _lost: self._delete(self._paths.heartbeat(run_id)))
        return record or existing

    def finish_runs(self, finishes: Sequence[Finish]) -> dict[str, RunRecord | None]:
        """:meth:`finish_run` of many runs in one multi-operation transaction (each run's
        compare-and-set and the deletes of its index nodes and heartbeat), _BATCH runs at
        most per transaction. A run whose operation fails (it changed meanwhile, an index
        node was gone) is finished alone by :meth:`finish_run`, which sorts out each case."""
        wanted = list({f.run_id: f for f in finishes}.values())
        done: dict[str, RunRecord | None] = {}
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start : start + _BATCH]

            def attempt(lost: bool, chunk: list[Finish] = chunk) -> dict[str, RunRecord]:
                # After a lost reply, each run is finished alone: a finish is idempotent.
                return {} if lost else self._finish_batch(chunk)

            done.update(self._retry(attempt))
            for f in chunk:
                if f.run_id not in done:
                    done[f.run_id] = self._finish_one(f)
        return done

    def _finish_batch(self, chunk: Sequence[Finish]) -> dict[str, RunRecord]:
        """One attempt: the runs finished (the others are left to finish_run)."""
        current = self._read_versions([f.run_id for f in chunk if _job_of(f.run_id)], False)
        with self._lock:
            held = self._heartbeats & current.keys()
        plans: dict[str, list[methodcaller]] = {}
        finished: dict[str, RunRecord] = {}
        for f in chunk:
            if f.run_id not in current:
                continue
            existing, version = current[f.run_id]
            change = finish_change(f.state, f.ended_at, f.exit_code, f.reason, None)
            updated = change(existing)
            if updated is None:
                continue
            path, data = self._paths.run(existing.job_id, f.run_id), _encode(updated)
            doomed = self._index(existing)
            if existing.state == RunState.RUNNING and f.run_id in held:
                doomed.add(self._paths.heartbeat(f.run_id))
            plans[f.run_id] = [methodcaller("set_data", path, data, version=version)]
            plans[f.run_id] += [methodcaller("delete", p) for p in sorted(doomed)]
            finished[f.run_id] = updated
        committed, _left = self._transact(plans) if plans else (set(), set())
        with self._lock:
            self._heartbeats -= committed
        return {run_id: finished[run_id] for run_id in committed}

    def request_cancel(self, run_id: str, by: str | None = None) -> bool:
        """Set ``cancel_requested`` on an active run and index it under its peer's
        ``/cancels`` (idempotent); False when the run is not active."""

        record, existing = self._modify(run_id, cancel_change(by))
        current = record or existing
        return current is not None and not current.state.terminal

    def _index(self, record: RunRecord) -> set[str]:
        """The index nodes that exist while the run is as ``record`` says."""
        if record.state.terminal:
            return set()
        if not record.peer_id:
            return {self._paths.active_run(record.run_id)}
        paths = {self._paths.assignment(record.peer_id, record.run_id)}
        if record.cancel_requested:
            paths.add(self._paths.cancel(record.peer_id, record.run_id))
        return paths

    def _modify(
        self, run_id: str, change: Callable[[RunRecord], RunRecord | None]
    ) -> tuple[RunRecord | None, RunRecord | None]:
        """Compare-and-set one run and its index nodes: (updated or None, as it was)."""
        job_id = _job_of(run_id)
        if job_id is None:
            return None, None
        path = self._paths.run(job_id, run_id)

        def attempt(lost: bool) -> tuple[RunRecord | None, RunRecord | None]:
            # A retry re-reads and re-applies ``change``: after a lost reply that did
            # commit, ``change`` sees its own result (finished, cancelled...) and is a no-op.
            skip_delete: set[str] = set()
            remembered = None if lost else self._recall_version(run_id)
            for _ in range(CAS_ATTEMPTS):
                fresh = remembered is None
                current, remembered = remembered or self._read_record(path), None
                if current is None:
                    return None, None
                existing, version = current
                updated = change(existing)
                if updated is None:
                    if not fresh:
                        continue  # maybe stale: a refusal is only trusted from a fresh read
                    return None, existing
                before, after = self._index(existing), self._index(updated)
                if existing.state == RunState.RUNNING and updated.state.terminal:
                    with self._lock:
                        ours = run_id in self._heartbeats
                    if ours:  # the heartbeat goes in the same transaction as the finish
                        before.add(self._paths.heartbeat(run_id))
                self._ensure_parents({_parent(p) for p in after - before})
                txn = self._client.transaction()
                txn.set_data(path, _encode(updated), version=version)
                deletes = sorted(before - after - skip_delete)
                creates = sorted(after - before)
                for index_path in deletes:
                    txn.delete(index_path)
                for index_path in creates:
                    txn.create(index_path, b"", self._acl)
                failed = transaction_failure(self._wait(txn.commit_async()))
                if failed is None:
                    self._remember_version(updated, version + 1)
                    return updated, existing
                index, error = failed
                if index == 0 and isinstance(error, BadVersionError | NoNodeError):
                    continue  # the record changed (or went) meanwhile
                if 1 <= index <= len(deletes) and isinstance(error, NoNodeError):
                    skip_delete.add(deletes[index - 1])  # already gone: fine
                    continue
                if index > len(deletes) and isinstance(error, NodeExistsError):
                    stray = creates[index - 1 - len(deletes)]
                    with contextlib.suppress(NoNodeError):
                        self._wait(self._client.delete_async(stray))
                    continue
                if isinstance(error, NoNodeError):
                    with self._lock:
                        self._ensured.clear()
                    continue
                raise StoreUnavailable(f"updating run {run_id} failed: {error!r}")
            raise StoreUnavailable(f"updating run {run_id}: too much contention")

        updated, existing = self._retry(attempt)
        if updated is not None and existing is not None:
            if updated.state != RunState.RUNNING and existing.state == RunState.RUNNING:
                with self._lock:
                    self._heartbeats.discard(run_id)
                if not updated.state.terminal:
                    with contextlib.suppress(StoreUnavailable):
                        self._retry(lambda _lost: self._delete(self._paths.heartbeat(run_id)))
            if (
                updated.state == RunState.ASSIGNED
                and existing.state != RunState.ASSIGNED
                and updated.peer_id == existing.peer_id
            ):
                self._notify_reassigned(updated)
        return updated, existing

    def watch_runs(self, peer_id: str, callback: Callable[[RunRecord], None]) -> None:
        """Call ``callback`` once for each run assigned to ``peer_id`` and once when a
        cancel is requested for one of its active runs: first those existing now, then
        new ones. The peer's ``/assignments`` are under a persistent recursive watch
        (whose events name each run created or deleted there), or, on servers without
        those, a kazoo children watch like its ``/cancels``. Called on the dispatch thread."""
        watcher = _RunWatcher(peer_id, callback)
        with self._lock:
            self._run_watchers.append(watcher)
        assignments = self._paths.assignments_of(peer_id)
        cancels = self._paths.cancels_of(peer_id)
        self._ensure_parents({assignments, cancels})
        if not self._watch_persistently(watcher, assignments):
            self._client.ChildrenWatch(assignments, self._children_watch(watcher, _ASSIGNED))
        self._client.ChildrenWatch(cancels, self._children_watch(watcher, _CANCEL))

    def _children_watch(
        self, watcher: _RunWatcher, kind: str
    ) -> Callable[[list[str]], bool | None]:
        def on_children(children: list[str]) -> bool | None:  # on kazoo's thread: no I/O
            with self._lock:
                if self._closed or watcher not in self._run_watchers:
                    return False
                new, gone = self._listed(watcher, kind, set(children))
            if new or gone:
                self._dispatch(lambda: self._check_runs(watcher, kind, sorted(new), gone))
            return None

        return on_children

    @staticmethod
    def _listed(watcher: _RunWatcher, kind: str, current: set[str]) -> tuple[set[str], set[str]]:
        """(new, gone) children of a directory listed again; the listing is now known.
        Under the lock."""
        known = watcher.children.setdefault(kind, set())
        new, gone = current - known, known - current
        known.clear()
        known.update(current)
        return new, gone

    def _watch_persistently(self, watcher: _RunWatcher, directory: str) -> bool:
        """Put ``directory`` under a persistent recursive watch, then list it (reporting
        what it holds); False where the servers have no such watches."""
        if not self._persistent_watches:
            return False
        with self._lock:
            self._watched[directory] = watcher
        try:
            self._arm(directory)
        except UnimplementedError:
            log.info("ZooKeeper %s has no persistent watches: children watches", self._hosts)
            self._persistent_watches = False
            with self._lock:
                self._watched.pop(directory, None)
            return False
        except StoreUnavailable as exc:
            log.warning("watch of %s: not armed yet (%s); trying again", directory, exc)
            self._rearm_later(directory)
        return True

    def _arm(self, directory: str) -> None:
        """Add the persistent watch on ``directory`` (again, after a reconnection: the
        server forgot it with the connection), then list the directory: the runs created
        or deleted while it was not watched. The events received meanwhile are replayed,
        in order, over the listing (a listing answered before them may miss them)."""
        with self._lock:
            watcher = self._watched.get(directory)
            if watcher is None:
                return
            watcher.listing = []

        def watch_and_list(_lost: bool) -> list[str]:
            self._wait(add_watch_async(self._client, directory))
            return self._children(directory)

        try:
            children = self._retry(watch_and_list)
        except BaseException:
            with self._lock:
                watcher.listing = None
            raise
        with self._lock:
            current = set(children)
            for name, created in watcher.listing or ():
                (current.add if created else current.discard)(name)
            watcher.listing = None
            schedule = self._to_drain(watcher, *self._listed(watcher, _ASSIGNED, current))
        if schedule:
            self._dispatch(lambda: self._drain(watcher))

    def _rearm(self, directory: str) -> None:
        """Upkeep thread: :meth:`_arm`, tried again later while it fails."""
        if self._closed:
            return
        try:
            self._arm(directory)
        except (StoreUnavailable, KazooException) as exc:
            log.warning("watch of %s: not armed again (%r); trying again", directory, exc)
            self._rearm_later(directory)

    def _rearm_later(self, directory: str) -> None:
        """Arm (and list) ``directory`` again in ``_RELIST_AFTER``, on the upkeep thread."""
        rearm = functools.partial(self._rearm, directory)
        timer = threading.Timer(_RELIST_AFTER, self._upkeep.put, (rearm,))
        timer.daemon = True
        timer.start()

    def _on_watch_event(self, event_type: int, path: str) -> None:
        """Every watch event the client receives (its connection thread: no I/O)."""
        if event_type not in (NODE_CREATED, NODE_DELETED):
            return
        directory, _, name = path.rpartition("/")
        created = event_type == NODE_CREATED
        with self._lock:
            watcher = self._watched.get(directory)
            if watcher is None or self._closed or not name:
                return
            if watcher.listing is not None:  # replayed over the listing
                watcher.listing.append((name, created))
                return
            known = watcher.children.setdefault(_ASSIGNED, set())
            if created == (name in known):
                return  # already known so
            (known.add if created else known.discard)(name)
            new, gone = ({name}, set()) if created else (set(), {name})
            schedule = self._to_drain(watcher, new, gone)
        if schedule:
            self._dispatch(lambda: self._drain(watcher))

    @staticmethod
    def _to_drain(watcher: _RunWatcher, new: set[str], gone: set[str]) -> bool:
        """Under the lock: note the runs that arrived and left for the next drain; True
        when a drain is to be dispatched (none is pending yet)."""
        watcher.arrived = (watcher.arrived - gone) | new
        watcher.departed = (watcher.departed - new) | gone
        if watcher.draining or not (new or gone):
            return False
        watcher.draining = True
        return True

    def _drain(self, watcher: _RunWatcher) -> None:
        """Dispatch thread: the runs a persistent watch saw arrive and leave since the last
        drain, all together (one read of the new records). The events of one transaction
        come one by one: the drain lets them all arrive first (_DRAIN_GATHER)."""
        time.sleep(_DRAIN_GATHER)  # gathering events, not synchronisation
        with self._lock:
            new, gone = sorted(watcher.arrived), set(watcher.departed)
            watcher.arrived.clear()
            watcher.departed.clear()
            watcher.draining = False
        self._check_runs(watcher, _ASSIGNED, new, gone)

    def _check_runs(
        self, watcher: _RunWatcher, kind: str, run_ids: list[str], gone: set[str]
    ) -> None:
        """Dispatch thread: forget runs that left the index, report the new ones."""
        with self._lock:
            watcher.seen -= {(r, kind) for r in gone}
        if not run_ids:
            return
        paths = [self._paths.run(j, r) for r in run_ids if (j := _job_of(r)) is not None]
        try:
            found = self._retry(lambda _lost: self._get_many(paths))
        except StoreUnavailable as exc:
            if self._closed:  # closing (a stopping peer): its session may be going first
                log.info("watch of %s: stopped reading new runs: the store closed", watcher.peer_id)
                return
            log.warning("watch of %s: could not read new runs: %s", watcher.peer_id, exc)
            # Forget them so that the next listing reports them again: a children watch
            # lists after the next change; a persistent watch is listed again in a second.
            with self._lock:
                watcher.children.get(kind, set()).difference_update(run_ids)
                again = [d for d, w in self._watched.items() if w is watcher and kind == _ASSIGNED]
            for directory in again:
                self._rearm_later(directory)
            return
        for got in found:
            if got is not None:
                record = _decode(got[0])
                if record.peer_id == watcher.peer_id:
                    self._remember_version(record, got[1].version)
                self._report(watcher, record)

    def _report(self, watcher: _RunWatcher, record: RunRecord) -> None:
        with self._lock:
            events = [e for e in _events(record, watcher.peer_id) if e not in watcher.seen]
            watcher.seen.update(events)
        if events:
            watcher.callback(record)  # on the dispatch thread; the loop logs exceptions

    def _notify_reassigned(self, record: RunRecord) -> None:
        """This instance moved a run back to ``assigned`` for the same peer (its index
        node did not change): a new assignment for that peer's watchers."""

        def check() -> None:
            with self._lock:
                watchers = [w for w in self._run_watchers if w.peer_id == record.peer_id]
                for w in watchers:
                    w.seen.discard((record.run_id, _ASSIGNED))
            for w in watchers:
                self._report(w, record)

        self._dispatch(check)

    def prune_runs(self, finished_before: datetime, keep: int | None = None) -> int:
        """Delete terminal runs that ended before the instant (a terminal run without
        ``ended_at`` counts as ended at its slot) and, with ``keep``, the terminal runs
        beyond the ``keep`` newest (by slot); then empty buckets. Returns how many.
        The records go 100 to a transaction (a delete per transaction made a prune of
        thousands of records a burst of thousands of writes)."""

        def prune(_lost: bool) -> int:
            # Only records that can be pruned are read: not active (the index changes with
            # the record, in one transaction) and, unless beyond ``keep``, with a slot before
            # the instant (a run ends after its slot). A prune with nothing to do reads none.
            active = self._active_ids()
            done = sorted(
                (_slot_key(name), path)
                for path in self._all_run_paths()
                if (name := path.rpartition("/")[2]) not in active
            )
            surplus = max(0, len(done) - keep) if keep is not None else 0
            candidates = [  # (path, beyond ``keep``)
                (path, index < surplus)
                for index, ((slot, _), path) in enumerate(done)
                if index < surplus or slot < finished_before
            ]
            paths = [path for path, _ in candidates]
            doomed: list[tuple[str, int]] = []
            for (path, beyond), got in zip(candidates, self._get_many(paths), strict=True):
                if got is None:
                    continue
                record = _decode(got[0])
                if record.state.terminal and (
                    beyond or (record.ended_at or record.slot) < finished_before
                ):
                    doomed.append((path, got[1].version))
            deleted = 0
            for i in range(0, len(doomed), _BATCH):
                # A record changed or gone since it was read is left (the next prune sees it).
                committed, _left = self._transact(
                    {p: [methodcaller("delete", p, version=v)] for p, v in doomed[i : i + _BATCH]}
                )
                deleted += len(committed)
            buckets = {_parent(p) for p, _ in doomed}
            for bucket in buckets:
                with contextlib.suppress(NotEmptyError, NoNodeError):
                    self._wait(self._client.delete_async(bucket))
                    with self._lock:
                        self._ensured.discard(bucket)
            return deleted

        return self._retry(prune)

    def _all_run_paths(self) -> list[str]:
        buckets = [self._paths.run_bucket(b) for b in self._children(self._paths.runs)]
        listings = self._children_many(buckets)
        return [
            f"{bucket}/{name}"
            for bucket, names in zip(buckets, listings, strict=True)
            for name in names
        ]

    # -- manual triggers -----------------------------------------------------
    def request_trigger(self, request: TriggerRequest) -> None:
        """Queue a manual run; a second request for the same run id changes nothing."""
        data = json.dumps(
            {
                "run_id": request.run_id,
                "job_id": request.job_id,
                "slot": format_slot(request.slot),
                "requested_at": format_slot(request.requested_at),
                "requested_by": request.requested_by,
            }
        ).encode()

        def create(_lost: bool) -> None:
            with contextlib.suppress(NodeExistsError):
                self._wait(
                    self._client.create_async(self._paths.trigger(request.run_id), data, self._acl)
                )

        self._retry(create)

    def pending_triggers(self) -> list[TriggerRequest]:
        """Queued manual runs, oldest request first (ties: the order they were queued)."""

        def read(_lost: bool) -> list[tuple[TriggerRequest, int]]:
            names = self._children(self._paths.triggers)
            found = self._get_many([self._paths.trigger(n) for n in names])
            out = []
            for got in found:
                if got is None:
                    continue
                data = json.loads(got[0])
                request = TriggerRequest(
                    run_id=data["run_id"],
                    job_id=data["job_id"],
                    slot=parse_slot(data["slot"]),
                    requested_at=parse_slot(data["requested_at"]),
                    requested_by=data.get("requested_by", ""),
                )
                out.append((request, got[1].czxid))
            return out

        pending = sorted(self._retry(read), key=lambda t: (t[0].requested_at, t[1]))
        return [request for request, _ in pending]

    def remove_trigger(self, run_id: str) -> None:
        self._retry(lambda _lost: self._delete(self._paths.trigger(run_id)))

    def watch_triggers(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the dispatch thread) after a trigger is queued, by any
        peer; once at registration too when triggers are already pending."""
        known: set[str] = set()

        def on_children(children: list[str]) -> bool | None:  # kazoo's thread: no I/O
            with self._lock:
                if self._closed:
                    return False
                new = set(children) - known
                known.clear()
                known.update(children)
            if new:
                self._dispatch(callback)
            return None

        self._client.ChildrenWatch(self._paths.triggers, on_children)

    # -- loaded configuration ------------------------------------------------
    def publish_config(self, snapshot: ConfigSnapshot) -> None:
        data = json.dumps(
            {
                "peer_id": snapshot.peer_id,
                "digest": snapshot.digest,
                "jobs": snapshot.jobs,
                "nodes": snapshot.nodes,
                "errors": snapshot.errors,
                "loaded_at": format_slot(snapshot.loaded_at) if snapshot.loaded_at else None,
            }
        ).encode()
        if len(data) > _COMPRESS_ABOVE:
            data = _ZLIB_PREFIX + zlib.compress(data)
        self._put(self._paths.config(snapshot.peer_id), data)

    def _put(self, path: str, data: bytes) -> None:
        """Write a persistent node's data, creating it if needed (idempotent)."""

        def put(_lost: bool) -> None:
            try:
                self._wait(self._client.set_async(path, data))
            except NoNodeError:
                with contextlib.suppress(NodeExistsError):
                    self._wait(self._client.create_async(path, data, self._acl))
                    return
                self._wait(self._client.set_async(path, data))

        self._retry(put)

    def config(self, peer_id: str) -> ConfigSnapshot | None:
        got = self._retry(lambda _lost: self._get(self._paths.config(peer_id)))
        if got is None:
            return None
        raw = got[0]
        if raw.startswith(_ZLIB_PREFIX):
            raw = zlib.decompress(raw[len(_ZLIB_PREFIX) :])
        data = json.loads(raw)
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
        self._put(self._paths.node_health(health.node_id), json.dumps(health.to_json()).encode())

    def clear_node_health(self, node_id: str) -> None:
        self._retry(lambda _lost: self._delete(self._paths.node_health(node_id)))

    def node_health(self) -> dict[str, NodeHealth]:
        def read(_lost: bool) -> list[NodeHealth]:
            names = self._children(self._paths.health)
            found = self._get_many([self._paths.node_health(n) for n in names])
            return [NodeHealth.from_json(json.loads(got[0])) for got in found if got is not None]

        return {h.node_id: h for h in self._retry(read)}

    # -- ZooKeeper plumbing --------------------------------------------------
    def _retry(self, call: Callable[[bool], T]) -> T:
        """Run ``call(lost)``, again after a connection loss (``lost`` is then True: an
        earlier attempt may have committed), until ``session_timeout`` has passed."""
        deadline = time.monotonic() + self._op_timeout
        delay = 0.02
        lost = False
        while True:
            try:
                return call(lost)
            except RETRYABLE as exc:
                lost = True
                if self._closed or time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"ZooKeeper {self._hosts}: {exc!r}") from exc
                time.sleep(delay)  # back-off before retrying, not synchronisation
                delay = min(delay * 2, 0.5)
            except ConnectionClosedError as exc:
                raise StoreUnavailable(f"ZooKeeper {self._hosts}: the client is closed") from exc

    def _wait(self, result: Any) -> Any:
        """The value of a kazoo async result, waiting at most ``session_timeout``."""
        try:
            return result.get(timeout=self._op_timeout)
        except self._client.handler.timeout_exception as exc:
            raise StoreUnavailable(
                f"ZooKeeper {self._hosts}: no answer within {self._op_timeout}s"
            ) from exc

    def _get(self, path: str) -> tuple[bytes, Any] | None:
        try:
            got: tuple[bytes, Any] = self._wait(self._client.get_async(path))
            return got
        except NoNodeError:
            return None

    def _get_many(self, paths: Sequence[str]) -> list[tuple[bytes, Any] | None]:
        """Many gets at once: None for a path that does not exist."""
        return self._read_many([GetData(p, None) for p in paths])

    def _exists_many(self, paths: Sequence[str]) -> list[Any]:
        pending = [self._client.exists_async(p) for p in paths]
        return [self._wait(result) for result in pending]

    def _children(self, path: str) -> list[str]:
        try:
            return list(self._wait(self._client.get_children_async(path)))
        except NoNodeError:
            return []

    def _children_many(self, paths: Sequence[str]) -> list[list[str]]:
        """Many listings at once: [] for a path that does not exist."""
        return [list(c or ()) for c in self._read_many([GetChildren(p, None) for p in paths])]

    def _read_many(self, operations: Sequence[GetData | GetChildren]) -> list[Any]:
        """The answers of many reads (None for a node that does not exist): one multiRead
        request per ``_BATCH`` of them (see zkwire), or, where the servers do not have it
        (before 3.6), a request each, pipelined."""
        answers: list[Any] = []
        if self._multi_read and len(operations) > 1:
            chunks = [operations[i : i + _BATCH] for i in range(0, len(operations), _BATCH)]
            pending = [multi_read_async(self._client, chunk) for chunk in chunks]
            try:
                for result in pending:
                    answers += self._wait(result)
            except UnimplementedError:
                log.info("ZooKeeper %s has no multiRead: reads are pipelined", self._hosts)
                self._multi_read = False
                return self._read_many(operations)
        else:
            pending = [
                self._client.get_async(op.path)
                if isinstance(op, GetData)
                else self._client.get_children_async(op.path)
                for op in operations
            ]
            for result in pending:
                try:
                    answers.append(self._wait(result))
                except NoNodeError as e:
                    answers.append(e)
        for i, answer in enumerate(answers):
            if isinstance(answer, NoNodeError):
                answers[i] = None
            elif isinstance(answer, Exception):
                raise answer
        return answers

    def _delete(self, path: str) -> None:
        """Delete ``path``; already gone counts as done."""
        with contextlib.suppress(NoNodeError):
            self._wait(self._client.delete_async(path))

    def _put_ephemeral(self, path: str, data: bytes) -> None:
        """Create (or update) an ephemeral node owned by this session."""
        for _ in range(CAS_ATTEMPTS):
            try:
                self._wait(self._client.create_async(path, data, self._acl, ephemeral=True))
                return
            except NodeExistsError:
                pass
            stat = self._wait(self._client.exists_async(path))
            if stat is None:
                continue
            if stat.ephemeralOwner == self._current_session():
                with contextlib.suppress(BadVersionError, NoNodeError):
                    self._wait(self._client.set_async(path, data, version=stat.version))
                    return
                continue
            # Left by another session (ours, before a crash or a session loss):
            # replace it, or it vanishes when that session expires.
            with contextlib.suppress(BadVersionError, NoNodeError):
                self._wait(self._client.delete_async(path, version=stat.version))
        raise StoreUnavailable(f"could not write {path}: too much contention")

    def _ensure_parents(self, paths: Iterable[str]) -> None:
        """Create persistent directories that may be missing (cached: each is made once)."""
        with self._lock:
            missing = sorted(set(paths) - self._ensured)
        if not missing:
            return
        pending = [self._client.create_async(p, b"", self._acl) for p in missing]
        for path, result in zip(missing, pending, strict=True):
            try:
                self._wait(result)
            except NodeExistsError:
                pass
            except NoNodeError:  # its own parent is missing (a deleted root?): slow path
                self._wait(self._client.ensure_path_async(path, self._acl))
        with self._lock:
            self._ensured.update(missing)

    def _ensure_layout(self) -> None:
        def ensure(_lost: bool) -> None:
            for path in self._paths.top_level():
                self._wait(self._client.ensure_path_async(path, self._acl))
            for path in (self._paths.epoch, self._paths.leader, self._paths.scheduler):
                with contextlib.suppress(NodeExistsError):
                    self._wait(self._client.create_async(path, b"", self._acl))

        self._retry(ensure)
        with self._lock:
            self._ensured.update(self._paths.top_level())

    def _ensure_chroot(self) -> None:
        """Create the connection string's chroot if it does not exist (kazoo cannot)."""
        chroot = self._client.chroot
        if not chroot or not self._owns_client:
            return
        if self._wait(self._client.exists_async("/")) is not None:
            return
        hosts = self._hosts[: self._hosts.index("/")]
        bootstrap = KazooClient(
            hosts=hosts,
            timeout=self._op_timeout,
            auth_data=[("digest", f"{self._auth[0]}:{self._auth[1]}")] if self._auth else None,
            default_acl=self._acl,
        )
        bootstrap.start(timeout=self._op_timeout)
        try:
            bootstrap.ensure_path(chroot)
        finally:
            bootstrap.stop()
            bootstrap.close()

    def _current_session(self) -> int | None:
        client_id = self._client.client_id
        return int(client_id[0]) if client_id else None

    # -- connection states and the dispatch thread ---------------------------
    def _on_state(self, state: str) -> bool | None:
        """kazoo's connection listener (its thread: only hand events on)."""
        with self._lock:
            if self._closed:
                return True  # remove this listener
        self._election.on_state(state)
        if state == KazooState.CONNECTED:
            self._connected.set()
            if self._session_id is not None:  # not the first connection
                self._reconnected_at = self._clock.now()
            self._upkeep.put(self._after_reconnection)
        elif state == KazooState.LOST:
            self._connected.clear()
            log.warning("ZooKeeper session lost: ephemeral nodes are gone")
        else:
            self._connected.clear()
            log.warning("ZooKeeper connection suspended")
        return None

    def _after_reconnection(self) -> None:
        """Upkeep thread: after any reconnection, arm the persistent watches again;
        in a new session, also re-create this instance's peer records.

        Heartbeats are not re-created: the runs claimed in the lost session are
        over for the cluster (the leader settles them as ``unknown``, or re-runs an
        ``at_least_once`` one); whatever the process still does is not theirs.
        """
        with self._lock:
            directories = list(self._watched)
        for directory in directories:
            self._rearm(directory)
        session = self._current_session()
        if session is None or self._session_id is None or session == self._session_id:
            return  # the first connection (the constructor records it), or the same session
        log.warning("new ZooKeeper session: re-creating peer records; runs claimed before are lost")
        self._session_id = session
        with self._lock:
            peers = list(self._own_peers.values())
            self._heartbeats.clear()
        try:
            for peer in peers:
                self._retry(
                    lambda _lost, p=peer: self._put_ephemeral(
                        self._paths.peer(p.peer_id), _peer_data(p)
                    )  # type: ignore[misc]
                )
        except (StoreUnavailable, KazooException) as exc:
            log.warning("re-creating ephemeral nodes failed (%r); next reconnection retries", exc)
            self._session_id = -1  # differs from every session: the next connection retries

    def _dispatch(self, call: Callable[[], None]) -> None:
        self._events.put(call)

    @staticmethod
    def _dispatch_loop(events: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            call = events.get()
            if call is None:
                return
            try:
                call()
            except Exception:
                log.exception("a coordination store callback failed")


def _server_time(stat: Any) -> datetime:
    """When a znode was last written, by the clock of the ensemble's leader server."""
    return datetime.fromtimestamp(stat.mtime / 1000, UTC)


def _peer_data(peer: PeerInfo) -> bytes:
    return json.dumps(peer.to_json()).encode()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]
