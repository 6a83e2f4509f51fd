"""Node health: a node that cannot be reached is marked unhealthy for the whole cluster.

An executing peer whose run could not connect to an SSH node (refused, timed
out, host key or key refused) records the node unhealthy in the coordination
store, with the reason, since when, and when to try again (backoff doubling
from 1 s to 60 s). The leader's placement skips unhealthy nodes for ``hosts:
any`` and counts; ``hosts: all`` still tries every node, so that each node's
result is reported. Every peer probes the unhealthy nodes that are due (a
connection and authentication, no command) and clears the mark when one
answers; a run that reaches the node clears it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import ConnectionType, NodeSpec
from distcrond.coordination.base import CoordinationStore, NodeHealth, StoreUnavailable

log = logging.getLogger("distcrond.health")

FIRST_BACKOFF = timedelta(seconds=1)
MAX_BACKOFF = timedelta(seconds=60)
CHECK_EVERY = 0.5  # seconds between looks at the unhealthy nodes


def backoff(failures: int) -> timedelta:
    return min(FIRST_BACKOFF * 2 ** max(0, failures - 1), MAX_BACKOFF)


class NodeHealthTracker:
    """This peer's view of node health, and its share of the probing. Thread-safe."""

    def __init__(
        self,
        coordination: CoordinationStore,
        probe: Callable[[NodeSpec], str | None],
        config: Callable[[], LoadedConfig],
        peer_id: str,
        clock: Clock,
    ) -> None:
        self._coordination = coordination
        self._probe = probe
        self._config = config
        self._peer_id = peer_id
        self._clock = clock
        self._lock = threading.Lock()
        self._unhealthy: dict[str, NodeHealth] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def unhealthy(self) -> set[str]:
        """The nodes known unhealthy (as of the last look, at most CHECK_EVERY old)."""
        with self._lock:
            return set(self._unhealthy)

    def failed(self, node_id: str, reason: str) -> None:
        """A connection to the node failed: record it (or its next failure) for everybody."""
        now = self._clock.now()
        existing = self._coordination.node_health().get(node_id)
        failures = existing.failures + 1 if existing else 1
        health = NodeHealth(
            node_id=node_id,
            reason=reason,
            since=existing.since if existing else now,
            failures=failures,
            reported_by=self._peer_id,
            next_check=now + backoff(failures),
        )
        self._coordination.set_node_health(health)
        with self._lock:
            self._unhealthy[node_id] = health
        if existing is None:
            log.warning("node %s is unhealthy: %s", node_id, reason)

    def succeeded(self, node_id: str) -> None:
        """The node answered: clear its mark, if this peer knows of one."""
        with self._lock:
            known = self._unhealthy.pop(node_id, None)
        if known is not None:
            self._coordination.clear_node_health(node_id)
            log.info("node %s is healthy again (unhealthy since %s)", node_id, known.since)

    # -- the probing loop --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="node-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(CHECK_EVERY):
            try:
                self.check()
            except StoreUnavailable as e:
                log.warning("node health: the coordination store is unavailable: %s", e)
            except Exception:
                log.exception("node health check failed")

    def check(self) -> None:
        """One look: refresh the view, probe the nodes that are due, forget removed ones."""
        current = self._coordination.node_health()
        with self._lock:
            self._unhealthy = dict(current)
        nodes = self._config().nodes
        now = self._clock.now()
        for node_id, health in current.items():
            node = nodes.get(node_id)
            if node is None or node.connection_type is not ConnectionType.SSH:
                self._coordination.clear_node_health(node_id)  # no longer an SSH node
                with self._lock:
                    self._unhealthy.pop(node_id, None)
                continue
            if health.next_check is not None and health.next_check > now:
                continue
            reason = self._probe(node)
            if reason is None:
                self.succeeded(node_id)
            else:
                self.failed(node_id, reason)
