"""Placement: which node(s) a slot runs on, and which peer executes each.

A pure function of the job's policy, the nodes, the live peers and the runs
in flight, so that it can be tested without a store or a clock.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from distcrond.config.models import ConnectionType, JobSpec, NodeSpec


@dataclass(frozen=True)
class Assignment:
    node_id: str
    peer_id: str


@dataclass(frozen=True)
class Placement:
    """Where one slot runs: the assignments, or why it cannot run anywhere."""

    assignments: tuple[Assignment, ...]
    reason: str = ""  # set when assignments is empty

    @property
    def multi_node(self) -> bool:
        return len(self.assignments) > 1


def _tiebreak(key: str, candidate: str) -> str:
    # Stable across processes (unlike hash()), and different per slot, so that
    # equally busy nodes share the load instead of the first one taking it all.
    return hashlib.sha256(f"{key}\0{candidate}".encode()).hexdigest()


def place(
    job: JobSpec,
    run_key: str,
    nodes: Mapping[str, NodeSpec],
    live_peers: Collection[str],
    node_load: Mapping[str, int],
    peer_load: Mapping[str, int],
    supported_types: Collection[str],
    unhealthy_nodes: Collection[str] = (),
) -> Placement:
    """Choose the nodes and executing peers of one slot.

    ``hosts: any`` picks the least busy eligible node (ties broken by a stable
    hash of ``run_key``), a count N the N least busy, ``all`` every eligible
    node. A node is eligible when it has one of the job's roles (or the job
    names none), its connection type has a runner, it is not unhealthy, and
    some live peer may execute it: a local node pinned to a peer needs that
    peer alive; any other node can be executed by any live peer. ``hosts: all``
    keeps unhealthy nodes (each node's failure is then reported, not hidden).
    """
    if not live_peers:
        return Placement((), "no live peer to execute the run")
    matching = [n for n in nodes.values() if n.matches(job.policy.roles)]
    if not matching:
        roles = ", ".join(job.policy.roles) or "(any)"
        return Placement((), f"no node has any of the roles {roles}")
    eligible: list[NodeSpec] = []
    why_not: list[str] = []
    for node in matching:
        if node.connection_type.value not in supported_types:
            why_not.append(f"{node.id}: no runner for connection_type {node.connection_type.value}")
        elif node.id in unhealthy_nodes and job.policy.hosts != "all":
            why_not.append(f"{node.id}: unhealthy")
        elif (
            node.connection_type is ConnectionType.LOCAL
            and node.peer
            and node.peer not in live_peers
        ):
            why_not.append(f"{node.id}: its peer {node.peer} is not alive")
        else:
            eligible.append(node)
    if not eligible:
        return Placement((), "no eligible node: " + "; ".join(sorted(why_not)))

    eligible.sort(key=lambda n: (node_load.get(n.id, 0), _tiebreak(run_key, n.id)))
    hosts = job.policy.hosts
    if hosts == "any":
        chosen = eligible[:1]
    elif hosts == "all":
        chosen = sorted(eligible, key=lambda n: n.id)
    else:
        if len(eligible) < hosts:
            return Placement(
                (), f"policy needs {hosts} nodes but only {len(eligible)} are eligible"
            )
        chosen = sorted(eligible[:hosts], key=lambda n: n.id)

    load = Counter(peer_load)
    assignments = []
    for node in chosen:
        peer = executing_peer(node, run_key, live_peers, load)
        assert peer is not None  # eligible nodes have one
        load[peer] += 1
        assignments.append(Assignment(node.id, peer))
    return Placement(tuple(assignments))


def executing_peer(
    node: NodeSpec, run_key: str, live_peers: Collection[str], load: Mapping[str, int]
) -> str | None:
    """The peer that executes a run on ``node``: its pinned peer for a pinned local node, else
    the least busy live peer (ties broken stably by ``run_key``); None if no live peer may."""
    if node.connection_type is ConnectionType.LOCAL and node.peer:
        return node.peer if node.peer in live_peers else None
    if not live_peers:
        return None
    return min(live_peers, key=lambda p: (load.get(p, 0), _tiebreak(run_key + node.id, p)))
