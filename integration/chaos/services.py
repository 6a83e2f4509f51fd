"""Setup and teardown: the suite's own ZooKeeper, Elasticsearch, sshd hosts and peers.

:class:`Services` starts, on ports no test or benchmark uses, a 3-server ensemble
(client ports 2481-2483, tick 500 ms), an Elasticsearch node (HTTP 9550, 512 MB
heap), two sshd hosts (127.0.0.6 and 127.0.0.7 port 2622) and three peers
(``integration.cluster.Cluster``) with ``--zk-session-timeout S`` and
``--es-url``. Each peer is moved into its own cgroup as soon as it is spawned
(``partition.py``); the ``clock-step`` peer runs under libfaketime (``clock.py``).
:meth:`Services.close` stops every process and removes the nft table and the
cgroups, whatever state the run is in; it is safe to call more than once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests

from deploy.services.common import apt_install, descendants, pid_alive, port_is_free
from deploy.services.elasticsearch import DEFAULT_DIST_DIR, TRANSPORT_OFFSET, Elasticsearch
from deploy.services.sshd import SSHServers
from deploy.services.zookeeper import Ensemble
from integration.chaos.clock import FakeClock
from integration.chaos.partition import Partitioner
from integration.cluster import Cluster
from integration.peers import Peer

ZK_BASE_PORT = 2481
# ZooKeeper expires a session at the first tick after its timeout: with 500 ms ticks a
# lost leader's session outlives its timeout by up to half a second more, with 250 ms by
# up to a quarter (the README's failure modes say so, for operators' own ensembles).
TICK_MS = 250
ES_PORT = 9550
SSH_ADDRESSES = ("127.0.0.6", "127.0.0.7")
SSH_PORT = 2622
PEERS = 3


class SetupFailed(Exception):
    """A service could not start (exit status 2)."""


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``extra`` set while the block runs (a Popen inherits it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def taken_ports() -> list[str]:
    wanted = [("127.0.0.1", ZK_BASE_PORT + n) for n in range(3)]
    wanted += [("127.0.0.1", ES_PORT), ("127.0.0.1", ES_PORT + TRANSPORT_OFFSET)]
    wanted += [(a, SSH_PORT) for a in SSH_ADDRESSES]
    return [f"{h}:{p}" for h, p in wanted if not port_is_free(p, h)]


def peer_family(peer: Peer) -> list[int]:
    """The daemon's pid and its live descendants (API process, job shells)."""
    if peer.proc is None or peer.proc.poll() is not None:
        return []
    return [peer.proc.pid, *descendants(peer.proc.pid)]


def signal_family(peer: Peer, signum: int, pids: list[int] | None = None) -> list[int]:
    """Send ``signum`` to the peer's process tree (or to ``pids``); returns the pids."""
    family = pids if pids is not None else peer_family(peer)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return family


# What the nemeses need from Debian, by the file that proves it is there.
TOOLS = {
    "/usr/sbin/nft": "nftables",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1": "libfaketime",
    "/usr/bin/gcc": "gcc",
}


def install_tools() -> None:
    """apt-get install the nemeses' Debian packages that are missing (root, like CI)."""
    missing = [package for path, package in TOOLS.items() if not Path(path).exists()]
    if missing:
        apt_install(missing, lambda m: print(f"chaos: {m}", flush=True), SetupFailed)


class Services:
    """Every process of one chaos run, in ``workdir``."""

    def __init__(self, workdir: Path, session_s: float, clock_peer: str) -> None:
        self.workdir = workdir
        self.session_s = session_s
        self.clock_peer = clock_peer
        self.ensemble = Ensemble(workdir / "zookeeper", 3, base_port=ZK_BASE_PORT, tick_ms=TICK_MS)
        self.es = Elasticsearch(workdir / "elasticsearch", port=ES_PORT, dist_dir=DEFAULT_DIST_DIR)
        self.sshd = SSHServers(workdir / "sshd", addresses=SSH_ADDRESSES, port=SSH_PORT)
        self.cluster: Cluster | None = None
        self.partitioner: Partitioner | None = None
        self.clock = FakeClock(workdir / "faketime.rc")

    def start(self) -> Cluster:
        """Start everything; SetupFailed says what did not start."""
        taken = taken_ports()
        if taken:
            raise SetupFailed(f"ports already in use: {', '.join(taken)}")
        self.workdir.chmod(0o755)  # the Elasticsearch user must reach its directory
        try:
            install_tools()
            self.clock.prepare()
            self.ensemble.start(timeout=90)
            self.sshd.start(timeout=30)
            self.es.start(timeout=180)
        except Exception as e:
            raise SetupFailed(f"a service did not start: {e}") from e
        cluster = Cluster(
            self.workdir / "peers",
            self.ensemble.hosts,
            size=PEERS,
            session_timeout=self.session_s,
            extra_args=["--es-url", self.es.url],
        )
        self.cluster = cluster
        ports = [ZK_BASE_PORT + n for n in range(3)] + [p.port for p in cluster.peers]
        self.partitioner = Partitioner(ports)
        try:
            self.partitioner.setup()
            self.partitioner.verify()
        except Exception as e:
            raise SetupFailed(f"the partition mechanism does not work here: {e}") from e
        return cluster

    def start_peers(self) -> None:
        assert self.cluster is not None
        for peer in self.cluster.peers:
            self.spawn(peer)
        try:
            for peer in self.cluster.peers:
                peer.wait_healthy(timeout=60, leader=False)
            self.cluster.leader(timeout=60)
        except (AssertionError, RuntimeError) as e:
            raise SetupFailed(f"the peers did not start: {e}") from e

    def spawn(self, peer: Peer) -> None:
        """Start ``peer`` (not waiting), in its cgroup, on the fake clock if it is the one."""
        assert self.partitioner is not None
        env = self.clock.environment() if peer.peer_id == self.clock_peer else {}
        with environment(env):
            peer.start(wait=False)
        assert peer.proc is not None
        self.partitioner.attach(peer.peer_id, [peer.proc.pid])

    def restart(self, peer: Peer) -> None:
        self.spawn(peer)
        peer.wait_healthy(timeout=60, leader=False)

    def in_cgroup(self, peer: Peer) -> bool:
        """Whether the peer's whole process tree is in its cgroup."""
        assert self.partitioner is not None
        return set(peer_family(peer)) <= set(self.partitioner.members(peer.peer_id))

    def close(self) -> None:
        """Stop everything we started and remove the nft table and cgroups."""
        if self.cluster is not None:
            for peer in self.cluster.peers:
                signal_family(peer, signal.SIGCONT)  # a stopped peer cannot handle SIGTERM
            for peer in self.cluster.alive():
                with contextlib.suppress(ProcessLookupError):
                    peer.signal(signal.SIGTERM)
            self.cluster.stop()
        for step in (self.ensemble.stop, self.es.stop, self.sshd.stop):
            with contextlib.suppress(Exception):
                step()
        if self.partitioner is not None:
            self.partitioner.close()
        self.clock.reset()

    def clock_offset(self) -> str:
        """The fake-clock peer's wall clock minus ours, from its API's Date header (1 s
        resolution), as text; "?" when it does not answer."""
        assert self.cluster is not None
        peer = self.cluster.peer(self.clock_peer)
        try:
            reply = peer.get("/api/v1/health")
            theirs = parsedate_to_datetime(reply.headers["Date"]).timestamp()
        except (requests.RequestException, KeyError, TypeError, ValueError):
            return "?"
        return f"{theirs - time.time():+.0f} s (±1)"

    def es_alive(self) -> bool:
        pid = self.es.pid()
        return pid is not None and pid_alive(pid)
