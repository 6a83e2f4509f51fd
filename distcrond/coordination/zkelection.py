"""The leader's election on ZooKeeper, for :class:`ZooKeeperCoordinationStore`.

kazoo's Lock recipe on ``/election`` elects; the winner takes the next epoch (a
compare-and-set on ``/epoch``, with ``/leader`` rewritten in the same transaction,
checked against its lock node) and holds it on an election thread of its own, which
also tells the leadership listener (whose methods only queue the transition), so that
no watch's reads can delay a change of leader. A suspension does not end the term
(see :meth:`ZooKeeperElection._hold_through_suspensions`); LOST, a stop, a
resignation or a lock node gone do. The store fences each write with
:meth:`ZooKeeperElection.fence_node` (the lock node of the epoch's leader).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, CancelledError, KazooException
from kazoo.protocol.states import KazooState
from kazoo.recipe.lock import Lock

from distcrond.clock import Clock
from distcrond.coordination.base import FencedOut, LeadershipListener, StoreUnavailable
from distcrond.coordination.zkpaths import ZKPaths
from distcrond.coordination.zkwire import RETRYABLE, transaction_failure
from distcrond.runs import format_slot

log = logging.getLogger("distcrond.coordination.zookeeper")

# An election event "resign:<epoch>": give that epoch's leadership up (``resign``).
_RESIGN = "resign:"
# Attempts of one compare-and-set loop before giving up (contention, not outages).
CAS_ATTEMPTS = 50


@dataclass(frozen=True)
class StoreCalls:
    """The store's ZooKeeper helpers the election uses (each retries or bounds its wait
    as the store's own operations do)."""

    retry: Callable[[Callable[[bool], Any]], Any]
    wait: Callable[[Any], Any]
    get: Callable[[str], tuple[bytes, Any] | None]
    delete: Callable[[str], None]
    session: Callable[[], int | None]


@dataclass
class _Election:
    peer_id: str
    listener: LeadershipListener
    events: queue.SimpleQueue[str] = field(default_factory=queue.SimpleQueue)
    stop: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)
    lock: Lock | None = None
    node: str | None = None  # full path of our lock node while we hold the lock
    epoch: int | None = None  # set while leader (listener told establish, not revoke)
    thread: threading.Thread | None = None


class ZooKeeperElection:
    """One store's candidacy: at most one at a time (see the module)."""

    def __init__(
        self,
        client: KazooClient,
        paths: ZKPaths,
        clock: Clock,
        op_timeout: float,
        calls: StoreCalls,
    ) -> None:
        self._client = client
        self._paths = paths
        self._clock = clock
        self._op_timeout = op_timeout
        self._calls = calls
        self._lock = threading.Lock()  # guards the state below, never held over I/O
        self._closed = False
        self._current: _Election | None = None
        self._revoked_epochs: set[int] = set()

    def close(self) -> None:
        """Refuse to stand again, and withdraw."""
        with self._lock:
            self._closed = True
        self.stop_election()

    def on_state(self, state: str) -> None:
        """A connection state (kazoo's listener thread): handed to the election thread."""
        with self._lock:
            election = self._current
        if election is not None:
            election.events.put(state)

    def fence_node(self, epoch: int) -> str | None:
        """The lock node of this peer's term of ``epoch``, None if this peer does not lead
        it (the store then reads ``/leader``); FencedOut if that term was revoked here."""
        with self._lock:
            if epoch in self._revoked_epochs:
                raise FencedOut(f"epoch {epoch} was revoked")
            election = self._current
            if election is not None and election.epoch == epoch and election.node is not None:
                return election.node
        return None

    def start_election(self, peer_id: str, listener: LeadershipListener) -> None:
        """Contend for leadership (kazoo's Lock recipe on ``/election``) on a thread of
        its own; ``listener`` hears ``establish_leadership(epoch)`` and
        ``revoke_leadership()`` on that election thread. RuntimeError if already standing.
        """
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            if self._current is not None:
                raise RuntimeError("already standing for election; call stop_election first")
            election = _Election(peer_id, listener)
            self._current = election
        election.thread = threading.Thread(
            target=self._run_election, args=(election,), name=f"zk-election:{peer_id}", daemon=True
        )
        election.thread.start()

    def stop_election(self) -> None:
        """Withdraw: the lock node is deleted at once (the next contender takes over),
        then the listener is told ``revoke_leadership`` if this peer was leader.
        A no-op when not standing."""
        with self._lock:
            election, self._current = self._current, None
        if election is None:
            return
        with election.mutex:
            election.stop.set()
            if election.lock is not None:
                election.lock.cancel()
        election.events.put("stop")
        thread = election.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._op_timeout + 5)
        self._revoke(election)  # in case the thread could not (it is stuck on I/O)

    def resign(self, epoch: int) -> None:
        """Ask the election thread to hand the leadership of ``epoch`` over (if it still
        holds it): it deletes its lock node, tells the listener, and contends again."""
        with self._lock:
            election = self._current
        if election is not None:
            log.warning("peer %s resigns leadership (epoch %d)", election.peer_id, epoch)
            election.events.put(f"{_RESIGN}{epoch}")

    def _run_election(self, election: _Election) -> None:
        """The election thread: contend, lead, and contend again after a session loss."""
        try:
            while not election.stop.is_set():
                if self._client.state != KazooState.CONNECTED:
                    self._next_event(election, timeout=0.5)
                    continue
                lock = self._client.Lock(self._paths.election, identifier=election.peer_id)
                with election.mutex:
                    if election.stop.is_set():
                        break
                    election.lock = lock
                try:
                    acquired = lock.acquire()
                except CancelledError:
                    break
                except KazooException as exc:
                    log.warning("election: could not contend (%r); trying again", exc)
                    election.stop.wait(0.2)
                    continue
                if not acquired:
                    continue
                election.node = f"{self._paths.election}/{lock.node}"
                if self._lead(election):
                    break
                election.node = None  # lost with the session: contend again
        except Exception:
            log.exception("election thread failed")
        finally:
            self._revoke(election)
            self._abdicate(election)

    def _lead(self, election: _Election) -> bool:
        """Hold leadership until it ends; True when it ended by ``stop_election``."""
        node = election.node
        assert node is not None
        while not election.stop.is_set():
            while True:  # events from before this (re)establishment say nothing now
                try:
                    if election.events.get_nowait() == "stop":
                        return True
                except queue.Empty:
                    break
            epoch: int | None = None
            if self._client.state == KazooState.CONNECTED:
                try:
                    epoch = self._take_epoch(election, node)
                except StoreUnavailable as exc:
                    log.warning("election: could not take an epoch (%s)", exc)
                else:
                    if epoch is None:
                        log.warning("election: lock node %s is gone; contending again", node)
                        return False
            if epoch is not None:
                with self._lock:
                    election.epoch = epoch
                log.info("peer %s is leader (epoch %d)", election.peer_id, epoch)
                _tell(election.listener.establish_leadership, epoch)
                outcome = self._hold_through_suspensions(election, node, epoch)
                self._revoke(election)
                if outcome == "stop":
                    return True
                if outcome == "resign":  # hand over at once, and contend again behind the others
                    self._abdicate(election)
                    return False
                if outcome in ("lost", "gone"):
                    return False
            # Not connected, or connected again without telling whether the lock node is
            # still ours: lead again (with a new epoch) once it is, in the same session.
            outcome = self._await_reconnection(election)
            if outcome == "stop":
                return True
            if outcome == "lost":
                return False
            try:
                if not self._node_is_ours(node):
                    return False
            except StoreUnavailable:
                continue
        return True

    def _hold_through_suspensions(self, election: _Election, node: str, epoch: int) -> str:
        """Lead ``epoch`` until it ends: "stop", "resign", "lost", "gone", or "suspended"
        (connected again, but our lock node could not be read).

        A suspension does not end it. While the connection is down the scheduler's
        writes fail (and are retried); every one of them is fenced by the epoch, so if
        the session expired meanwhile and another peer leads, none lands. Connected again
        in the same session, our lock node is still ours and nobody else can have led:
        the term goes on, scheduler and all, with no new epoch to take.
        """
        while True:
            outcome = self._hold(election, node, epoch)
            if outcome != "suspended":
                return outcome
            log.warning(
                "peer %s: ZooKeeper connection suspended while leading epoch %d; "
                "still leader while the session lasts (every write is fenced)",
                election.peer_id,
                epoch,
            )
            outcome = self._await_reconnection(election, epoch)
            if outcome != "connected":
                return outcome
            try:
                if not self._node_is_ours(node):
                    return "gone"
            except StoreUnavailable:
                return "suspended"
            log.info(
                "peer %s: reconnected in the same session; still leader (epoch %d)",
                election.peer_id,
                epoch,
            )

    def _hold(self, election: _Election, node: str, epoch: int) -> str:
        """Wait while leader of ``epoch``: "stop", "resign", "suspended", "lost" or "gone"
        (our lock node vanished)."""
        self._watch_node(election, node)
        if self._client.state != KazooState.CONNECTED:
            return "suspended"
        while True:
            event = election.events.get()
            if event == "stop":
                return "stop"
            if event == f"{_RESIGN}{epoch}":
                return "resign"
            if event == KazooState.SUSPENDED:
                return "suspended"
            if event == KazooState.LOST:
                return "lost"
            if event == "node":
                try:
                    if not self._node_is_ours(node):
                        return "gone"
                except StoreUnavailable:
                    return "suspended"
                self._watch_node(election, node)

    def _await_reconnection(self, election: _Election, epoch: int | None = None) -> str:
        """Wait for the connection: "connected", "stop", "lost", or (while leading
        ``epoch``) "resign"."""
        while True:
            if self._client.state == KazooState.CONNECTED:
                return "connected"
            event = self._next_event(election, timeout=None)
            if event == "stop":
                return "stop"
            if event == KazooState.LOST:
                return "lost"
            if epoch is not None and event == f"{_RESIGN}{epoch}":
                return "resign"

    def _next_event(self, election: _Election, timeout: float | None) -> str | None:
        try:
            return election.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _watch_node(self, election: _Election, node: str) -> None:
        with contextlib.suppress(Exception):
            self._client.exists_async(node, watch=lambda _event: election.events.put("node"))

    def _node_is_ours(self, node: str) -> bool:
        try:
            stat = self._calls.wait(self._client.exists_async(node))
        except RETRYABLE as exc:
            raise StoreUnavailable(f"ZooKeeper: {exc!r}") from exc
        return stat is not None and stat.ephemeralOwner == self._calls.session()

    def _take_epoch(self, election: _Election, node: str) -> int | None:
        """Bump /epoch and rewrite /leader, if we still hold ``node``: the new epoch, or None."""

        def attempt(lost: bool) -> int | None:
            for _ in range(CAS_ATTEMPTS):
                got = self._calls.get(self._paths.epoch)
                if got is None:
                    raise StoreUnavailable(f"{self._paths.epoch} is missing")
                version = got[1].version
                if lost:  # did the attempt whose reply was lost commit?
                    leader = self._calls.get(self._paths.leader)
                    if leader is not None and leader[0]:
                        data = json.loads(leader[0])
                        if data.get("node") == node and data.get("epoch") == version:
                            return version
                info = {
                    "peer_id": election.peer_id,
                    "epoch": version + 1,
                    "since": format_slot(self._clock.now()),
                    "node": node,
                }
                txn = self._client.transaction()
                txn.check(node, 0)
                txn.set_data(self._paths.epoch, b"", version=version)
                txn.set_data(self._paths.leader, json.dumps(info).encode())
                failed = transaction_failure(self._calls.wait(txn.commit_async()))
                if failed is None:
                    return version + 1
                if failed[0] == 0:
                    return None  # our lock node is gone (or was never ours)
                if not isinstance(failed[1], BadVersionError):
                    raise StoreUnavailable(f"taking an epoch failed: {failed[1]!r}")
            raise StoreUnavailable("taking an epoch: too much contention")

        return self._calls.retry(attempt)

    def _revoke(self, election: _Election) -> None:
        """Tell the listener leadership ended (once per establish) and fence that epoch here."""
        with self._lock:
            epoch, election.epoch = election.epoch, None
            if epoch is not None:
                self._revoked_epochs.add(epoch)
        if epoch is not None:
            log.info("peer %s: leadership of epoch %d ends", election.peer_id, epoch)
            _tell(election.listener.revoke_leadership)

    def _abdicate(self, election: _Election) -> None:
        """Delete our lock node (the handover) and clear /leader if it still names us."""
        with election.mutex:
            lock, election.lock = election.lock, None
        node, election.node = election.node, None
        if lock is not None:
            with contextlib.suppress(Exception):
                lock.cancel()
        if node is None:
            return
        with contextlib.suppress(StoreUnavailable, KazooException):
            self._calls.retry(lambda _lost: self._calls.delete(node))
        with contextlib.suppress(Exception):
            if lock is not None:
                lock.is_acquired = False  # the node is deleted: nothing left to release
                lock.node = None
        with contextlib.suppress(StoreUnavailable, KazooException):
            got = self._calls.get(self._paths.leader)
            if got is not None and got[0] and json.loads(got[0]).get("node") == node:
                self._calls.wait(
                    self._client.set_async(self._paths.leader, b"", version=got[1].version)
                )


def _tell(call: Callable[..., None], *args: Any) -> None:
    """Tell the leadership listener, on the election thread (its methods never block)."""
    try:
        call(*args)
    except Exception:
        log.exception("the leadership listener failed")
