"""Several real distcrond peers on one ZooKeeper ensemble, for the cluster tests and benchmarks.

Each peer is a :class:`~integration.peers.Peer` (the real console script, its
real gunicorn API) with its own config and state directories; ``write_job``
and ``write_node`` write the same file to every peer, as a config sync tool
would. Jobs prove where and when they ran by appending a line to a ledger
(:func:`ledger_job`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from distcrond.runs import split_run_id
from integration.peers import Peer, ledger_lines, wait_for

# Slots are recorded up to this long before they are due (the scheduler's lookahead and
# pass span, with a margin): a run of a later slot was scheduled after that instant.
RECORDED_AHEAD = 0.1  # seconds


def ledger_job(ledger: Path, every: str = "1s", **fields: Any) -> dict[str, Any]:
    """A job that appends "<run id> <peer> <epoch seconds>" to ``ledger`` each time it runs."""
    spec: dict[str, Any] = {
        "schedule": {"interval": every},
        "shell": True,
        "command": f'echo "$DISTCRON_RUN_ID $DISTCRON_PEER $(date +%s.%N)" >> {ledger}',
    }
    spec.update(fields)
    return spec


def duplicates(ledger: Path) -> list[str]:
    """Run ids the ledger holds more than once (a slot executed twice)."""
    counts = Counter(line[0] for line in ledger_lines(ledger))
    return sorted(run_id for run_id, n in counts.items() if n > 1)


@dataclass
class Cluster:
    """``size`` peers (peer-1, peer-2...) on ``zk_hosts``; none is started by the constructor."""

    root: Path
    zk_hosts: str
    size: int = 3
    session_timeout: float = 2.0
    api_workers: int = 1
    extra_args: list[str] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)

    def __post_init__(self) -> None:
        for n in range(1, self.size + 1):
            peer_id = f"peer-{n}"
            self.peers.append(
                Peer(
                    self.root / peer_id,
                    peer_id=peer_id,
                    extra_args=[
                        "--zookeeper",
                        self.zk_hosts,
                        "--zk-session-timeout",
                        f"{self.session_timeout}",
                        "--api-workers",
                        str(self.api_workers),
                        *self.extra_args,
                    ],
                )
            )
        self.write_node("local", {"roles": ["worker"], "connection_type": "local"})

    # -- config ------------------------------------------------------------------
    def write_job(self, job_id: str, spec: dict[str, Any]) -> None:
        for peer in self.peers:
            peer.write_job(job_id, spec)

    def write_node(self, node_id: str, spec: dict[str, Any]) -> None:
        for peer in self.peers:
            peer.write_node(node_id, spec)

    # -- processes -----------------------------------------------------------------
    def start(self) -> Cluster:
        for peer in self.peers:
            peer.start(wait=False)
        for peer in self.peers:
            peer.wait_healthy(timeout=30, leader=False)
        self.leader()
        return self

    def peer(self, peer_id: str) -> Peer:
        return next(p for p in self.peers if p.peer_id == peer_id)

    def alive(self) -> list[Peer]:
        return [p for p in self.peers if p.proc is not None and p.proc.poll() is None]

    def cluster_view(self, peer: Peer) -> dict[str, Any]:
        r = requests.get(f"{peer.url}/api/v1/cluster", timeout=5)
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def leader(self, timeout: float = 30.0, other_than: str | None = None) -> Peer:
        """The leader every live peer agrees on (polls until they do)."""

        def agreed() -> Peer | None:
            views = [self.cluster_view(p) for p in self.alive() if p.peer_id != other_than]
            leaders = {(v["leader"] or {}).get("peer_id") for v in views}
            if len(leaders) != 1:
                return None
            (leader_id,) = leaders
            if leader_id is None or leader_id == other_than:
                return None
            leader = self.peer(leader_id)
            return leader if leader in self.alive() else None

        return wait_for(agreed, timeout, "the live peers to agree on a leader", interval=0.02)

    def kill9(self, peer: Peer) -> None:
        """SIGKILL the daemon and everything it started (a crashed host takes its runs too)."""
        peer.kill9()

    def stop(self) -> None:
        for peer in self.peers:
            peer.kill()


def wait_new_lines(ledger: Path, after: float, timeout: float, not_peer: str = "") -> list[str]:
    """The first ledger line written at or after ``after`` (epoch seconds) by a peer other
    than ``not_peer``; polls every 5 ms."""

    def found() -> list[str] | None:
        for line in ledger_lines(ledger):
            if float(line[2]) >= after and line[1] != not_peer:
                return line
        return None

    return wait_for(found, timeout, f"a run after {after}", interval=0.005)


def wait_scheduled_run(
    ledger: Path, scheduled_after: float, started_after: float, timeout: float
) -> list[str]:
    """The first ledger line of a run that was scheduled after ``scheduled_after`` (its
    slot is later than that instant + RECORDED_AHEAD) and started at or after
    ``started_after`` (epoch seconds): proof that the cluster schedules again after a
    fault, which a run recorded before it is not. Polls every 5 ms."""

    def found() -> list[str] | None:
        for line in ledger_lines(ledger):
            slot = split_run_id(line[0])[1].timestamp()
            if slot > scheduled_after + RECORDED_AHEAD and float(line[2]) >= started_after:
                return line
        return None

    return wait_for(found, timeout, f"a run scheduled after {scheduled_after}", interval=0.005)
