"""Every ZooKeeper path distcrond uses, in one place.

Layout under the root (``/distcron`` by default)::

    /epoch                        persistent; its data *version* is the fencing token
    /leader                       persistent; JSON {peer_id, epoch, since, node} of the last leader
    /scheduler                    persistent; SchedulerPass JSON: the leader's newest pass
    /election/<lock contender>    kazoo Lock recipe children (ephemeral, sequential)
    /peers/<peer_id>              ephemeral; PeerInfo JSON
    /runs/<job_id>/<run_id>       persistent; RunRecord JSON (one bucket per job)
    /assignments/<peer_id>/<run_id>  persistent, empty; active runs assigned to a peer
    /active/<run_id>              persistent, empty; active runs without a peer (the
                                  scheduler records none: every active run is assigned)
    /cancels/<peer_id>/<run_id>   persistent, empty; cancel requested for a peer's active run
    /heartbeats/<run_id>          ephemeral (the executing peer's session); run is being executed
    /health/<node_id>             persistent; NodeHealth JSON of a node that fails to connect
    /cursors/<job_id>             persistent; the newest slot dealt with (RFC 3339 text)
    /triggers/<run_id>            persistent; TriggerRequest JSON
    /config/<peer_id>             persistent; ConfigSnapshot JSON (zlib-compressed when large)

Run ids (``<job>@<slot>[~<node>]``) hold '@', ':', '.', '~' and '-': all valid
in a znode name; job, peer and node ids are file or host names (no '/').
"""

from __future__ import annotations

_TOP_LEVEL = (
    "election",
    "peers",
    "runs",
    "active",
    "assignments",
    "cancels",
    "heartbeats",
    "health",
    "cursors",
    "triggers",
    "config",
)


def _name(value: str) -> str:
    """A single path component: refuse what would escape its directory."""
    if not value or "/" in value or value in (".", "..") or "\x00" in value:
        raise ValueError(f"{value!r} cannot name a znode")
    return value


class ZKPaths:
    """The paths of one distcrond cluster under ``root``."""

    def __init__(self, root: str = "/distcron") -> None:
        root = "/" + root.strip("/")
        self.root = root.rstrip("/") if root != "/" else ""

    def _join(self, *parts: str) -> str:
        return self.root + "/" + "/".join(parts)

    def top_level(self) -> list[str]:
        """The persistent directories created when a store starts (the root first)."""
        return [self.root or "/", *(self._join(name) for name in _TOP_LEVEL)]

    # -- leadership ----------------------------------------------------------
    @property
    def epoch(self) -> str:
        return self._join("epoch")

    @property
    def leader(self) -> str:
        return self._join("leader")

    @property
    def scheduler(self) -> str:
        return self._join("scheduler")

    @property
    def election(self) -> str:
        return self._join("election")

    def election_node(self, name: str) -> str:
        return self._join("election", _name(name))

    # -- membership and configuration ---------------------------------------
    @property
    def peers(self) -> str:
        return self._join("peers")

    def peer(self, peer_id: str) -> str:
        return self._join("peers", _name(peer_id))

    @property
    def configs(self) -> str:
        return self._join("config")

    def config(self, peer_id: str) -> str:
        return self._join("config", _name(peer_id))

    # -- runs ----------------------------------------------------------------
    @property
    def runs(self) -> str:
        return self._join("runs")

    def run_bucket(self, job_id: str) -> str:
        return self._join("runs", _name(job_id))

    def run(self, job_id: str, run_id: str) -> str:
        return self._join("runs", _name(job_id), _name(run_id))

    @property
    def active(self) -> str:
        return self._join("active")

    def active_run(self, run_id: str) -> str:
        return self._join("active", _name(run_id))

    @property
    def assignments(self) -> str:
        return self._join("assignments")

    def assignments_of(self, peer_id: str) -> str:
        return self._join("assignments", _name(peer_id))

    def assignment(self, peer_id: str, run_id: str) -> str:
        return self._join("assignments", _name(peer_id), _name(run_id))

    def cancels_of(self, peer_id: str) -> str:
        return self._join("cancels", _name(peer_id))

    def cancel(self, peer_id: str, run_id: str) -> str:
        return self._join("cancels", _name(peer_id), _name(run_id))

    @property
    def health(self) -> str:
        return self._join("health")

    def node_health(self, node_id: str) -> str:
        return self._join("health", _name(node_id))

    @property
    def heartbeats(self) -> str:
        return self._join("heartbeats")

    def heartbeat(self, run_id: str) -> str:
        return self._join("heartbeats", _name(run_id))

    # -- scheduler state -----------------------------------------------------
    @property
    def cursors(self) -> str:
        return self._join("cursors")

    def cursor(self, job_id: str) -> str:
        return self._join("cursors", _name(job_id))

    @property
    def triggers(self) -> str:
        return self._join("triggers")

    def trigger(self, run_id: str) -> str:
        return self._join("triggers", _name(run_id))
