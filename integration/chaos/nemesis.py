"""The nemesis: faults injected one at a time, each healed before the next.

:func:`run_nemesis` picks kinds at random (``random.Random(seed)``: a shuffled
cycle of the selected kinds, so each comes up), spaced :data:`GAP_S` apart, while
the fault still fits in the time left; every fault is recorded as a
:class:`~integration.chaos.faults.Fault` with its target, start and heal instants.
One function per kind family does the injecting (see README.md for what each
does); each heals in a ``finally``, so an error while injecting still heals.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from integration.chaos.faults import EXTRA_S, SHORT_PAUSE_S, Fault
from integration.chaos.services import Services, peer_family, signal_family
from integration.cluster import Cluster
from integration.peers import Peer

GAP_S = 4.0  # between a heal and the next fault
PEER_DOWN_S = 3.0  # a killed peer, a killed ZooKeeper server stay down this long
ES_DOWN_S = 30.0
CLOCK_STEP_S = 4.0  # each of +30 s, -30 s and the slew lasts this long
ROLLING_DOWN_S = 1.5  # a server stopped in a rolling restart starts again this long after
ROLLING_SETTLE_S = 2.0  # after the quorum is whole again, before the next server stops


@dataclass
class Nemesis:
    """What the faults act on, and the faults recorded so far."""

    services: Services
    rng: random.Random
    say: Callable[[str], None]
    faults: list[Fault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cluster(self) -> Cluster:
        assert self.services.cluster is not None
        return self.services.cluster

    @property
    def session_s(self) -> float:
        return self.services.session_s

    def target(self, role: str) -> Peer:
        """The leader, or a random live follower."""
        leader = self.cluster.leader(timeout=30)
        if role == "leader":
            return leader
        followers = [p for p in self.cluster.alive() if p is not leader]
        return self.rng.choice(followers)

    def record(self, kind: str, target: str, start: float, end: float, note: str = "") -> None:
        fault = Fault(kind, target, start, end, note)
        self.faults.append(fault)
        self.say(f"  {kind} {target}: {start:.3f} .. {end:.3f} ({end - start:.1f} s) {note}")


def kill_peer(nem: Nemesis, kind: str) -> None:
    peer = nem.target(kind.split("-")[1])
    start = time.time()
    peer.kill9()
    try:
        time.sleep(PEER_DOWN_S)
    finally:
        end = time.time()
        nem.services.restart(peer)
    nem.record(kind, peer.peer_id, start, end)


def pause_peer(nem: Nemesis, kind: str) -> None:
    peer = nem.target(kind.split("-")[1])
    length = SHORT_PAUSE_S if kind.endswith("short") else nem.session_s + EXTRA_S
    start = time.time()
    stopped = signal_family(peer, signal.SIGSTOP)
    try:
        time.sleep(length)
    finally:
        signal_family(peer, signal.SIGCONT, stopped + peer_family(peer))
        end = time.time()
    nem.record(kind, peer.peer_id, start, end, f"SIGSTOP {len(stopped)} processes")


def partition_peer(nem: Nemesis, kind: str) -> None:
    peer = nem.target(kind.split("-")[1])
    partitioner = nem.services.partitioner
    assert partitioner is not None
    if not nem.services.in_cgroup(peer):
        nem.say(f"  ! {peer.peer_id}'s processes are not all in its cgroup")
    start = time.time()
    partitioner.cut(peer.peer_id)
    try:
        time.sleep(nem.session_s + EXTRA_S)
    finally:
        counters = partitioner.counters()
        partitioner.heal()
        end = time.time()
    dropped = sum(int(x) for x in re.findall(r"packets (\d+)", counters))
    nem.record(kind, peer.peer_id, start, end, f"{dropped} packets dropped")


def zk_server(nem: Nemesis, mode: str) -> int:
    ensemble = nem.services.ensemble
    ensemble.wait_serving(ensemble.ids, timeout=30)
    modes = ensemble.modes()
    return nem.rng.choice([n for n, m in modes.items() if m == mode])


def zk_kill(nem: Nemesis, kind: str) -> None:
    ensemble = nem.services.ensemble
    n = zk_server(nem, "leader" if kind == "zk-kill-leader" else "follower")
    start = time.time()
    ensemble.kill_server(n)
    try:
        time.sleep(PEER_DOWN_S)
    finally:
        end = time.time()
        ensemble.start_server(n)
        ensemble.wait_serving([n], timeout=60)
    nem.record(kind, f"zk{n}", start, end)


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection (closed by us at once: a close by
    the server would leave it a TIME_WAIT socket that keeps it from binding again)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def zk_rolling_restart(nem: Nemesis, kind: str) -> None:
    """Each server in turn: SIGTERM, and back. A stopped server keeps its clients while it
    shuts down (~0.3 s), and closes their connections with its listening socket: the
    fault starts when its client port refuses connections, the moment the cluster loses
    the server. It starts again ROLLING_DOWN_S later, not at once: a JVM's start takes
    1-2 s of a core, and on this shared 2-core machine it would land in the recovery
    window of the very loss being measured (on a real ensemble each server starts on a
    machine of its own). The next server stops ROLLING_SETTLE_S after the quorum is
    whole again, for the same reason."""
    ensemble = nem.services.ensemble
    for n in ensemble.ids:
        ensemble.wait_serving(ensemble.ids, timeout=60)
        mode = ensemble.modes()[n]
        stopping = threading.Thread(target=ensemble.stop_server, args=(n,), daemon=True)
        asked = time.time()
        stopping.start()
        while accepts(ensemble.client_port(n)) and time.time() - asked < 30:
            time.sleep(0.005)  # polling the port, not synchronising
        start = time.time()
        stopping.join(60)
        time.sleep(max(0.0, start + ROLLING_DOWN_S - time.time()))
        ensemble.start_server(n)
        ensemble.wait_serving([n], timeout=60)
        ensemble.wait_quorum(timeout=60)
        end = time.time()
        note = f"was {mode}; stopped serving {start - asked:.2f} s after SIGTERM"
        nem.record(kind, f"zk{n}", start, end, note)
        time.sleep(ROLLING_SETTLE_S)


def es_kill(nem: Nemesis, kind: str) -> None:
    es = nem.services.es
    pid = es.pid()
    start = time.time()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    try:
        es.stop(timeout=10)  # reaps the launcher; the server is gone already
        time.sleep(ES_DOWN_S)
    finally:
        es.start(timeout=180)
        end = time.time()
    nem.record(kind, "elasticsearch", start, end)


def clock_step(nem: Nemesis, kind: str) -> None:
    clock = nem.services.clock
    role = "leader" if nem.target("leader").peer_id == nem.services.clock_peer else "follower"
    start = time.time()
    try:
        for spec in ("+30", "-30", "+0 x1.25"):
            clock.set(spec)
            time.sleep(CLOCK_STEP_S)
    finally:
        clock.reset()
        end = time.time()
    offset = nem.services.clock_offset()
    note = f"{role}; +30 s, -30 s, x1.25, +0; offset after heal {offset}"
    nem.record(kind, nem.services.clock_peer, start, end, note)


INJECT: dict[str, Callable[[Nemesis, str], None]] = {
    "kill-leader": kill_peer,
    "kill-follower": kill_peer,
    "pause-leader-short": pause_peer,
    "pause-follower-short": pause_peer,
    "pause-leader-long": pause_peer,
    "pause-follower-long": pause_peer,
    "zk-kill-leader": zk_kill,
    "zk-kill-follower": zk_kill,
    "zk-rolling-restart": zk_rolling_restart,
    "partition-leader": partition_peer,
    "partition-follower": partition_peer,
    "es-kill": es_kill,
    "clock-step": clock_step,
}


def expected_duration(kind: str, session_s: float) -> float:
    """Roughly how long a fault takes, heal included (to decide whether it still fits)."""
    if kind.startswith("kill-"):
        return PEER_DOWN_S + 8.0
    if kind.startswith("pause-"):
        return SHORT_PAUSE_S if kind.endswith("short") else session_s + EXTRA_S
    if kind.startswith("partition-"):
        return session_s + EXTRA_S
    if kind == "zk-rolling-restart":
        return 20.0
    if kind.startswith("zk-"):
        return PEER_DOWN_S + 2.0
    if kind == "es-kill":
        return ES_DOWN_S + 30.0
    return 3 * CLOCK_STEP_S


def heal_all(services: Services) -> None:
    """Undo whatever a fault may have left: cuts, stopped or dead peers, a stepped clock,
    ZooKeeper servers or Elasticsearch down."""
    if services.partitioner is not None:
        services.partitioner.heal()
    services.clock.reset()
    cluster = services.cluster
    if cluster is not None:
        for peer in cluster.peers:
            signal_family(peer, signal.SIGCONT)
        for peer in cluster.peers:
            if peer not in cluster.alive():
                services.restart(peer)
    ensemble = services.ensemble
    for n in ensemble.ids:
        if ensemble.pid(n) is None:
            ensemble.start_server(n)
    ensemble.wait_serving(ensemble.ids, timeout=60)
    if not services.es_alive():
        services.es.start(timeout=180)


def pick(queue: list[str], kinds: list[str], fitting: list[str], rng: random.Random) -> str:
    """The next kind of the shuffled cycle that fits (refilled when empty)."""
    for _ in range(2):
        for kind in queue:
            if kind in fitting:
                queue.remove(kind)
                return kind
        queue[:] = rng.sample(kinds, len(kinds))
    return rng.choice(fitting)


def run_nemesis(nem: Nemesis, kinds: list[str], seconds: float) -> None:
    """Faults, one at a time, until ``seconds`` have passed (a fault must fit in what is left)."""
    deadline = time.time() + seconds
    queue: list[str] = []
    for number in range(1, 10_000):
        time.sleep(GAP_S)
        left = deadline - time.time()
        fitting = [k for k in kinds if expected_duration(k, nem.session_s) <= left]
        if not fitting:
            return
        kind = pick(queue, kinds, fitting, nem.rng)
        nem.say(f"fault {number}: {kind} ({left:.0f} s left)")
        try:
            INJECT[kind](nem, kind)
        except Exception as e:  # recorded, healed below, and the run goes on
            nem.notes.append(f"{kind} could not be injected or healed: {e!r}")
            nem.say(f"  ! {nem.notes[-1]}")
        heal_all(nem.services)
