"""Cluster benchmark: failover and throughput of three distcrond peers on a ZooKeeper ensemble.

Run from the repository root: ``python -m integration.bench.cluster`` (``make bench`` runs it
after the standalone one). It prints figures and ratios; it is not a test. It starts its own
three-server ZooKeeper ensemble (client ports 2381-2383) and its own three peers, and stops
them all at the end. It exits non-zero only when the ensemble or a peer cannot start. See
README.md beside this file for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from deploy.services.zookeeper import Ensemble, EnsembleError, four_letter_word
from distcrond.coordination.base import LeaderInfo
from distcrond.coordination.zookeeper import ZooKeeperCoordinationStore
from distcrond.runs import RunRecord
from integration.bench.ledger import (
    Entry,
    Figures,
    Ledger,
    SlotKey,
    due_slots,
    measure,
    parse_line,
    percentile,
    read_ledger,
    slot_us,
)
from integration.bench.standalone import (
    COOLDOWN_S,
    Plan,
    Proc,
    cpu_seconds,
    descendants,
    is_job,
    make_plan,
    make_window,
    proc_info,
    read_log,
    run_baseline,
    sleep_until,
    verdict,
)
from integration.cluster import Cluster
from integration.peers import Peer, wait_for

T = TypeVar("T")

ZK_BASE_PORT = 2381  # clients on 2381-2383: never the test ensemble's 2181-2183
SESSION_TIMEOUT_S = 4.0  # the product's default --zk-session-timeout
FAILOVER_JOBS = 50
THROUGHPUT_JOBS = 300
RAMP_UP = (450, 600, 900)  # tried in turn while the step before kept p99 <= 100 ms, none missed
RAMP_DOWN = (200, 150, 100, 75, 50)  # tried in turn when 300 jobs already broke that
RAMP_P99_LIMIT_MS = 100.0
# Each signal is sent this long before a whole second (a slot of every failover job), so that
# a quick handover is not hidden by the wait for the next slot, and a slow one is caught up.
SIGNAL_LEAD_S = 0.3
KILL9_TARGET_S = 5.0
SIGTERM_TARGET_S = 1.0
THROUGHPUT_P99_TARGET_MS = 50.0
ROUND_TIMEOUT_S = 30.0  # for each wait of a failover round: a leader, a dispatch, a settle
KILL9, SIGTERM = "kill -9", "SIGTERM"


class StartFailed(Exception):
    """The ensemble or a peer could not start; the message says which, with its log tail."""


# --- ledgers -------------------------------------------------------------------------------


def failover_command(ledger: Path) -> str:
    """A failover job's command: ledger.py's three fields, then the executing peer and trigger."""
    fields = "$DISTCRON_RUN_ID $DISTCRON_SLOT $(date +%s.%N) $DISTCRON_PEER $DISTCRON_TRIGGER"
    return f'echo "{fields}" >> {shlex.quote(str(ledger))}'


@dataclass(frozen=True)
class Line:
    """One failover ledger line."""

    entry: Entry
    peer: str
    trigger: str


class LedgerTail:
    """A failover ledger read as it grows: only the complete lines appended since last time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines: list[Line] = []
        self.malformed = 0

    def poll(self) -> list[Line]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new: list[Line] = []
        for text in data[:end].decode(errors="replace").splitlines():
            parts = text.split()
            entry = parse_line(" ".join(parts[:3])) if len(parts) == 5 else None
            if entry is None:
                self.malformed += bool(text.strip())
            else:
                new.append(Line(entry, parts[3], parts[4]))
        self.lines += new
        return new


def by_window(ledger: Ledger, plan: Plan, window: tuple[datetime, datetime]) -> Ledger:
    """The ledger's lines of the plan's jobs whose slots fall in the window."""
    lo, hi = slot_us(window[0]), slot_us(window[1])
    kept = tuple(e for e in ledger.entries if e.job_id in plan.jobs and lo <= e.slot_us < hi)
    return Ledger(kept, ledger.malformed, ledger.partial)


# --- processes -------------------------------------------------------------------------------


def start_cluster(cluster: Cluster) -> None:
    try:
        cluster.start()
    except (RuntimeError, AssertionError) as e:
        raise StartFailed(f"the cluster did not start: {e}\n{log_tails(cluster.peers)}") from e


def restart(peer: Peer) -> None:
    """Back as a follower, same id and state directory."""
    try:
        peer.start(wait=True, leader=False)
    except (RuntimeError, AssertionError) as e:
        raise StartFailed(f"{peer.peer_id} did not restart: {e}\n{log_tails([peer])}") from e


def stop_cluster(cluster: Cluster) -> None:
    """SIGTERM every peer at once (leadership does not hop from one to the next as they stop
    in turn), then wait for each and kill what is left."""
    for peer in cluster.alive():
        with contextlib.suppress(ProcessLookupError):
            peer.signal(signal.SIGTERM)
    cluster.stop()


def log_tails(peers: list[Peer], lines: int = 20) -> str:
    return "\n".join(
        f"--- {p.log_path} (last {lines} lines)\n" + "".join(p.log().splitlines(True)[-lines:])
        for p in peers
    )


def peers_cpu(cluster: Cluster) -> dict[tuple[str, Proc], float]:
    """CPU seconds so far of each peer's daemon and API processes (not of its job shells)."""
    found: dict[tuple[str, Proc], float] = {}
    for peer in cluster.alive():
        assert peer.proc is not None
        own = proc_info(peer.proc.pid)
        family = [own[0]] if own else []
        family += [p for p in descendants(peer.proc.pid) if not is_job(p)]
        for p in family:
            if (cpu := cpu_seconds(p.pid)) is not None:
                found[(peer.peer_id, p)] = cpu
    return found


def cpu_used(
    before: dict[tuple[str, Proc], float], after: dict[tuple[str, Proc], float]
) -> dict[str, float]:
    """CPU seconds each peer used between two samples (a process born meanwhile: all of its)."""
    used: dict[str, float] = {}
    for (peer_id, p), cpu in after.items():
        used[peer_id] = used.get(peer_id, 0.0) + cpu - before.get((peer_id, p), 0.0)
    return used


def zookeeper_cpu(ensemble: Ensemble) -> float:
    return sum(
        cpu_seconds(pid) or 0.0 for n in ensemble.ids if (pid := ensemble.pid(n)) is not None
    )


def zookeeper_requests(ensemble: Ensemble) -> float | None:
    """Client requests the servers have received so far (``mntr``'s zk_packets_received,
    summed); None when a server does not answer."""
    total = 0.0
    for n in ensemble.ids:
        reply = four_letter_word(ensemble.client_port(n), "mntr", timeout=5.0) or ""
        values = dict(line.split("\t", 1) for line in reply.splitlines() if "\t" in line)
        if "zk_packets_received" not in values:
            return None
        total += float(values["zk_packets_received"])
    return total


def count_znodes(hosts: str, root: str) -> dict[str, int]:
    """Znodes under ``root``, by its top-level child (and "total", ``root`` itself included)."""
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30)
    try:
        counts: Counter[str] = Counter(total=1)
        level = [(f"{root}/{child}", child) for child in client.get_children(root)]
        while level:
            replies = [(path, top, client.get_children_async(path)) for path, top in level]
            level = []
            for path, top, reply in replies:
                counts[top] += 1
                counts["total"] += 1
                with contextlib.suppress(NoNodeError):  # pruned meanwhile
                    level += [(f"{path}/{child}", top) for child in reply.get(timeout=30)]
        return dict(counts)
    finally:
        client.stop()
        client.close()


@contextlib.contextmanager
def observer(hosts: str, root: str) -> Iterator[ZooKeeperCoordinationStore]:
    """A store of our own on the cluster's root, to read leaders and run records."""
    store = ZooKeeperCoordinationStore(hosts, root=root, session_timeout=SESSION_TIMEOUT_S)
    try:
        yield store
    finally:
        store.close()


def prune_scan(store: ZooKeeperCoordinationStore, znodes: int) -> tuple[int, float]:
    """How long one pass of the store's prune takes over what the cluster holds now, with a
    cutoff that deletes nothing: the leader runs such a pass on a thread of its own when
    it takes over and every minute after."""
    began = time.monotonic()
    store.prune_runs(datetime.fromtimestamp(0, UTC))
    return znodes, time.monotonic() - began


def poll(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.01
) -> T | None:
    """``wait_for``, but None on timeout (the benchmark reports it instead of failing)."""
    try:
        return wait_for(condition, timeout, what, interval)
    except AssertionError as e:
        print(f"    ! {e}", flush=True)
        return None


# --- failover --------------------------------------------------------------------------------


@dataclass
class Round:
    kind: str
    n: int
    old_leader: str
    old_epoch: int
    signalled: float  # epoch seconds, just before the signal
    new_leader: str | None = None
    new_epoch: int | None = None
    elected_s: float | None = None  # the new leader's `since` minus the signal
    dispatch_s: float | None = None  # the first run the new leader recorded: its start - signal
    dispatch_trigger: str | None = None
    recorded_s: float | None = None  # that run's record: created_at (its pass began) - signal
    claimed_s: float | None = None  # and started_at (its executing peer began the claim) - signal
    old_dispatches: int = 0  # runs of slots after the signal that the old leader still recorded
    exit_code: int | None = None  # SIGTERM: the old peer's exit status
    exit_s: float | None = None  # SIGTERM: from the signal until the old peer exited
    restart_s: float | None = None  # the old peer's restart until its API answered
    settle_s: float | None = None  # from the restart until steady again (see settled())


class Epochs:
    """Which leader's epoch recorded a run, read once per run from ZooKeeper."""

    def __init__(self, store: ZooKeeperCoordinationStore) -> None:
        self.store = store
        self.records: dict[str, RunRecord | None] = {}

    def __call__(self, run_id: str) -> int | None:
        if run_id not in self.records:
            self.records[run_id] = self.store.get_run(run_id)
        record = self.records[run_id]
        return record.epoch if record is not None else None


def first_dispatch(lines: list[Line], rnd: Round, epochs: Epochs) -> tuple[Line | None, int]:
    """The first run the new leader recorded after the signal (a slot due after it, or a
    misfire catch-up), and how many runs of later slots the old leader recorded before it."""
    candidates = sorted(
        (
            line
            for line in lines
            if line.entry.started >= rnd.signalled
            and (line.entry.slot_us / 1e6 > rnd.signalled or line.trigger == "misfire")
        ),
        key=lambda line: line.entry.started,
    )
    old = 0
    for line in candidates:
        epoch = epochs(line.entry.run_id)
        if epoch is not None and epoch > rnd.old_epoch:
            return line, old
        old += epoch == rnd.old_epoch
    return None, old


def leader_info(
    store: ZooKeeperCoordinationStore, peer_id: str | None = None, after: int = 0
) -> LeaderInfo | None:
    """/leader, if it names ``peer_id`` (any peer if None) with an epoch above ``after``."""
    info = store.leader()
    if info is None or info.epoch <= after or peer_id not in (None, info.peer_id):
        return None
    return info


def next_signal_time() -> float:
    now = time.time()
    at = math.floor(now) + 1 - SIGNAL_LEAD_S
    return at if at - now > 0.05 else at + 1


def failover_round(
    cluster: Cluster, store: ZooKeeperCoordinationStore, tail: LedgerTail, kind: str, n: int
) -> Round:
    old = cluster.leader(timeout=ROUND_TIMEOUT_S)
    info = wait_for(lambda: leader_info(store, old.peer_id), ROUND_TIMEOUT_S, "/leader")
    assert info is not None  # wait_for returns only something truthy
    time.sleep(max(0.0, next_signal_time() - time.time()))
    rnd = Round(kind, n, old.peer_id, info.epoch, time.time())
    if kind == KILL9:
        cluster.kill9(old)  # SIGKILL after listing its descendants: a few ms after `signalled`
    else:
        old.signal(signal.SIGTERM)
    epochs = Epochs(store)
    new = poll(lambda: leader_info(store, after=rnd.old_epoch), ROUND_TIMEOUT_S, "a new leader")
    if new is not None:
        rnd.new_leader, rnd.new_epoch = new.peer_id, new.epoch
        rnd.elected_s = new.since.timestamp() - rnd.signalled
        poll(
            lambda: tail.poll() is not None and first_dispatch(tail.lines, rnd, epochs)[0],
            ROUND_TIMEOUT_S,
            "the new leader's first dispatch",
        )
    assert old.proc is not None
    if kind == SIGTERM:
        try:
            rnd.exit_code = old.proc.wait(ROUND_TIMEOUT_S)
            rnd.exit_s = time.time() - rnd.signalled
        except subprocess.TimeoutExpired:
            print(f"    ! {old.peer_id} still runs {ROUND_TIMEOUT_S:g} s after SIGTERM: killed")
            cluster.kill9(old)
    began = time.time()
    restart(old)
    healthy = time.time()
    rnd.restart_s = healthy - began
    seen = len(tail.lines)

    def settled() -> bool:
        """The live peers agree on a leader, the restarted peer has run something, and every
        job has run a scheduled slot due after the restart: the next round starts steady."""
        tail.poll()
        jobs_by_slot: dict[int, set[str]] = {}
        ran_here = False
        for line in tail.lines[seen:]:
            ran_here |= line.peer == old.peer_id
            if line.trigger == "schedule" and line.entry.slot_us / 1e6 >= healthy:
                jobs_by_slot.setdefault(line.entry.slot_us, set()).add(line.entry.job_id)
        full = any(len(jobs) == FAILOVER_JOBS for jobs in jobs_by_slot.values())
        return ran_here and full and cluster.leader(timeout=0.5) is not None

    if poll(settled, ROUND_TIMEOUT_S, "the cluster to settle") is not None:
        rnd.settle_s = time.time() - began
    first, rnd.old_dispatches = first_dispatch(tail.lines, rnd, epochs)  # all lines are in now
    if first is not None:
        rnd.dispatch_s = first.entry.started - rnd.signalled
        rnd.dispatch_trigger = first.trigger
        record = epochs.records.get(first.entry.run_id)
        if record is not None and record.created_at is not None:
            rnd.recorded_s = record.created_at.timestamp() - rnd.signalled
        if record is not None and record.started_at is not None:
            rnd.claimed_s = record.started_at.timestamp() - rnd.signalled
    return rnd


def records_by_slot(
    store: ZooKeeperCoordinationStore, job_ids: Iterable[str]
) -> dict[SlotKey, RunRecord]:
    """Every run record of the jobs still in ZooKeeper (within the retention), by slot."""
    found: dict[SlotKey, RunRecord] = {}
    for job_id in job_ids:
        for record in store.runs(job_id=job_id):
            found.setdefault((record.job_id, slot_us(record.slot)), record)
    return found


def state_of(records: dict[SlotKey, RunRecord], key: SlotKey) -> str:
    record = records.get(key)
    return record.state.value if record is not None else "absent"


@dataclass
class FailoverSlots:
    window: tuple[datetime, datetime]
    due: int
    ran: int
    duplicated: int  # run ids in the ledger more than once (anywhere)
    missed: int  # due, no ledger line, not recorded unknown
    missed_by_state: dict[str, int]  # what ZooKeeper says of those ("absent": no record)
    missed_after: dict[str, int]  # those by the kind of the last signal before their slot
    unknown: int  # due slots recorded unknown (their peer was killed mid-run), ran or not
    unknown_not_run: int
    unexpected: int  # ledger slots in the window that were never due
    malformed_lines: int
    examples: list[str]  # a few missed slots with their state


def failover_slots(
    plan: Plan,
    tail: LedgerTail,
    store: ZooKeeperCoordinationStore,
    window: tuple[datetime, datetime],
    rounds: list[Round],
) -> FailoverSlots:
    due = due_slots(plan.specs(), window)
    ran = {line.entry.key for line in tail.lines}
    counts = Counter(line.entry.run_id for line in tail.lines)
    records = records_by_slot(store, plan.jobs)
    unknown = {k for k in due if state_of(records, k) == "unknown"}
    missed = sorted((k for k in due if k not in ran and k not in unknown), key=lambda k: k[1])

    def after(key: SlotKey) -> str:
        kinds = [r.kind for r in rounds if r.signalled <= key[1] / 1e6]
        return f"after {kinds[-1]}" if kinds else "before the first signal"

    lo, hi = slot_us(window[0]), slot_us(window[1])
    return FailoverSlots(
        window=window,
        due=len(due),
        ran=len(due & ran),
        duplicated=sum(1 for n in counts.values() if n > 1),
        missed=len(missed),
        missed_by_state=dict(Counter(state_of(records, k) for k in missed)),
        missed_after=dict(Counter(after(k) for k in missed)),
        unknown=len(unknown),
        unknown_not_run=len(unknown - ran),
        unexpected=sum(1 for k in ran if lo <= k[1] < hi and k not in due),
        malformed_lines=tail.malformed,
        examples=[
            f"{k[0]}@{datetime.fromtimestamp(k[1] / 1e6, UTC):%H:%M:%S} {state_of(records, k)}"
            for k in missed[:4]
        ],
    )


@dataclass
class FailoverResult:
    rounds: list[Round] = field(default_factory=list)
    slots: FailoverSlots | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    aborted: str | None = None
    prune_scan: tuple[int, float] | None = None  # (znodes under /runs, seconds)


def failover_plan(workdir: Path) -> Plan:
    ledger = workdir / "failover.ledger"
    body = {
        "description": "bench failover",
        "policy": {"hosts": "any"},
        "schedule": {"interval": "1s"},
        "misfire": {"policy": "run_all"},
        "shell": True,
        "command": failover_command(ledger),
    }
    return Plan("failover", {f"fo-{i:02d}": body for i in range(FAILOVER_JOBS)}, ledger)


def new_cluster(ensemble: Ensemble, root: Path, zk_root: str) -> Cluster:
    """Three peers on the product's default session timeout, logging JSON, under ``zk_root``."""
    return Cluster(
        root,
        ensemble.hosts,
        session_timeout=SESSION_TIMEOUT_S,
        extra_args=["--zk-root", zk_root, "--log-format", "json"],
    )


def run_failover(ensemble: Ensemble, workdir: Path, kills: int) -> FailoverResult:
    zk_root = "/bench-failover"
    plan = failover_plan(workdir)
    cluster = new_cluster(ensemble, workdir / "failover", zk_root)
    for job_id, body in plan.jobs.items():
        cluster.write_job(job_id, body)
    result = FailoverResult()
    tail = LedgerTail(plan.ledger)
    try:
        start_cluster(cluster)
        with observer(ensemble.hosts, zk_root) as store:
            if not poll(
                lambda: (
                    tail.poll() is not None
                    and {line.entry.job_id for line in tail.lines} >= set(plan.jobs)
                ),
                ROUND_TIMEOUT_S,
                "a first run of every failover job",
                interval=0.1,
            ):
                raise StartFailed(f"the peers ran nothing\n{log_tails(cluster.peers)}")
            start = datetime.fromtimestamp(math.floor(time.time()) + 1, UTC)
            print(f"  failover: {FAILOVER_JOBS} jobs running on 3 peers", flush=True)
            try:
                for kind in (KILL9, SIGTERM):
                    for n in range(1, kills + 1):
                        result.rounds.append(failover_round(cluster, store, tail, kind, n))
                        print(f"  {describe(result.rounds[-1])}", flush=True)
            except AssertionError as e:  # no agreed leader: the phase cannot go on
                result.aborted = str(e)
                print(f"  ! failover aborted: {e}", flush=True)
            end = datetime.fromtimestamp(math.floor(time.time()), UTC)
            sleep_until(end + timedelta(seconds=COOLDOWN_S))
            tail.poll()
            result.slots = failover_slots(plan, tail, store, (start, end), result.rounds)
            result.prune_scan = prune_scan(store, count_znodes(ensemble.hosts, zk_root)["runs"])
    finally:
        stop_cluster(cluster)
        result.logs = peer_logs(cluster)
    return result


def describe(rnd: Round) -> str:
    text = (
        f"{rnd.kind} #{rnd.n}: {rnd.old_leader} -> {rnd.new_leader or '?'}, elected after "
        f"{secs(rnd.elected_s)} s, first dispatch after {secs(rnd.dispatch_s)} s "
        f"({rnd.dispatch_trigger or '-'})"
    )
    if rnd.kind == SIGTERM:
        text += f", old peer exited {rnd.exit_code} after {secs(rnd.exit_s)} s"
    if rnd.old_dispatches:
        text += f", old leader recorded {rnd.old_dispatches} runs after the signal"
    return text + f"; restarted in {secs(rnd.restart_s)} s, settled in {secs(rnd.settle_s)} s"


def peer_logs(cluster: Cluster) -> dict[str, Any]:
    """Per peer: log records by level, and its most frequent warnings and errors."""
    found: dict[str, Any] = {}
    for peer in cluster.peers:
        if peer.log_path.exists():
            log = read_log(peer.log_path)
            found[peer.peer_id] = {
                "levels": dict(log.levels),
                "problems": dict(log.problems.most_common(5)),
                "log": str(peer.log_path),
            }
    return found


# --- throughput ------------------------------------------------------------------------------


@dataclass
class Stages:
    """Where lateness goes, from the run records (p50, p99 in ms, over the window's runs)."""

    woke_ms: tuple[float, float]  # record's created_at - slot: the leader's pass began
    claim_ms: tuple[float, float]  # started_at - created_at: recorded, seen, claim begun
    spawn_ms: tuple[float, float]  # the shell's start - started_at: claimed and spawned
    missed_by_state: dict[str, int]  # what ZooKeeper says of the window's missed slots


@dataclass(frozen=True)
class ZooKeeperGC:
    """The three servers' collections in a window, from their ``gc.log``."""

    pauses: int
    longest_pause_ms: float
    stalls: int  # allocations that waited for a collection
    longest_stall_ms: float


# gc.log lines (-Xlog decorations time,uptime,tags) that stop a thread: a pause, or a stall.
_GC_WAIT = re.compile(
    r"^\[(?P<time>[^\]]+)\]\[[^\]]*\]\[[^\]]*\] "
    r"(?:GC\(\d+\) (?P<pause>Pause) .*|Allocation Stall \(.*\)) (?P<ms>[\d.]+)ms$"
)


def gc_waits(lines: Iterable[str], lo: float, hi: float) -> ZooKeeperGC:
    """Pauses and allocation stalls logged between the timestamps ``lo`` and ``hi``."""
    pauses: list[float] = []
    stalls: list[float] = []
    for line in lines:
        m = _GC_WAIT.match(line.rstrip())
        if m is None:
            continue
        t = datetime.strptime(m["time"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        if lo <= t < hi:
            (pauses if m["pause"] else stalls).append(float(m["ms"]))
    return ZooKeeperGC(len(pauses), max(pauses, default=0.0), len(stalls), max(stalls, default=0.0))


def zookeeper_gc(ensemble: Ensemble, window: tuple[datetime, datetime]) -> ZooKeeperGC:
    def lines() -> Iterator[str]:
        for n in ensemble.ids:
            log = ensemble.gc_log_file(n)
            for path in sorted(log.parent.glob(log.name + "*")):  # and the rotated ones
                yield from path.read_text(errors="replace").splitlines()

    return gc_waits(lines(), window[0].timestamp(), window[1].timestamp())


@dataclass
class Step:
    jobs: int
    figures: Figures
    started: int  # runs whose shell started inside the window (whatever their slot)
    cpu_s_per_run: float | None  # the three peers' daemon + API processes, per started run
    zk_cpu_s_per_run: float | None  # the three ZooKeeper servers, per started run
    ready_s: float | None  # from writing the job files until every job had run
    bursts: list[tuple[str, int, float]]  # slots over 1 s late: (first second, seconds, worst ms)
    cpu_pct: dict[str, float]  # per peer (daemon + API processes), % of one core in the window
    zk_cpu_pct: float  # the three ZooKeeper servers together, % of one core
    leader: str | None  # the leader just after the window
    stages: Stages | None = None
    zk_requests_per_run: float | None = None  # client requests the servers received, per run
    zk_gc: ZooKeeperGC | None = None

    @property
    def passed(self) -> bool:
        return self.figures.p99_ms <= RAMP_P99_LIMIT_MS and self.figures.missed == 0


@dataclass
class ThroughputResult:
    steps: list[Step] = field(default_factory=list)
    znodes: dict[str, int] = field(default_factory=dict)
    duplicated: int = 0  # over the whole phase
    baseline: Figures | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    prune_scan: tuple[int, float] | None = None  # (znodes under /runs, seconds)
    warmup: Step | None = None  # the same load before the first window, not judged


def set_jobs(cluster: Cluster, plan: Plan) -> None:
    """Make every peer's jobs directory hold exactly the plan's jobs (as a sync tool would)."""
    for peer in cluster.peers:
        for path in peer.jobs_dir.glob("*.json"):
            if path.stem not in plan.jobs:
                path.unlink()
    for job_id, body in plan.jobs.items():
        if not (cluster.peers[0].jobs_dir / f"{job_id}.json").exists():
            cluster.write_job(job_id, body)


def stages(
    store: ZooKeeperCoordinationStore, plan: Plan, ledger: Ledger, due: set[SlotKey]
) -> Stages:
    records = records_by_slot(store, plan.jobs)
    first: dict[SlotKey, float] = {}
    for e in ledger.entries:
        first[e.key] = min(e.started, first.get(e.key, e.started))
    woke, claim, spawn = [], [], []
    for key in due & first.keys():
        r = records.get(key)
        if r is None or r.created_at is None or r.started_at is None:
            continue
        woke.append((r.created_at - r.slot).total_seconds() * 1000)
        claim.append((r.started_at - r.created_at).total_seconds() * 1000)
        spawn.append((first[key] - r.started_at.timestamp()) * 1000)
    # A slot recorded succeeded with no ledger line ran after the ledger was read.
    missed = Counter(
        "succeeded later" if (state := state_of(records, k)) == "succeeded" else state
        for k in due - first.keys()
    )
    return Stages(p50_p99(woke), p50_p99(claim), p50_p99(spawn), dict(missed))


def bursts(ledger: Ledger, over_ms: float = 1000.0) -> list[tuple[str, int, float]]:
    """Runs of consecutive seconds whose slots started more than ``over_ms`` late: the first
    second (UTC), how many seconds, the worst lateness. Periodic ones point at a stall."""
    worst: dict[int, float] = {}
    for e in ledger.entries:
        second = e.slot_us // 1_000_000
        worst[second] = max(worst.get(second, 0.0), e.lateness_ms)
    found: list[list[Any]] = []
    for second in sorted(s for s, ms in worst.items() if ms > over_ms):
        if found and found[-1][0] + found[-1][1] == second:
            found[-1][1] += 1
            found[-1][2] = max(found[-1][2], worst[second])
        else:
            found.append([second, 1, worst[second]])
    return [(f"{datetime.fromtimestamp(s, UTC):%H:%M:%S}", n, ms) for s, n, ms in found]


# Where the lateness goes is read from the run records of the window's last seconds: the
# leader keeps the newest 10,000 finished records (--run-retention-count), some 30 s at
# 300 runs/s, and prunes older ones.
STAGES_SECONDS = 20.0


def recent(due: set[SlotKey], window: tuple[datetime, datetime]) -> set[SlotKey]:
    """The due slots of the window's last STAGES_SECONDS."""
    since = slot_us(window[1] - timedelta(seconds=STAGES_SECONDS))
    return {key for key in due if key[1] >= since}


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), percentile(ordered, 99)


def throughput_step(
    cluster: Cluster,
    ensemble: Ensemble,
    workdir: Path,
    jobs: int,
    seconds: float,
    store: ZooKeeperCoordinationStore | None = None,
) -> Step:
    """Run ``jobs`` jobs; measure a window of ``seconds`` (with ``store``: where lateness goes)."""
    plan = make_plan("spread", workdir, "cluster", jobs)
    written = time.time()
    set_jobs(cluster, plan)

    def all_ran() -> bool:
        ran = {e.job_id for e in read_ledger(plan.ledger).entries if e.slot_us / 1e6 >= written}
        return ran >= set(plan.jobs)

    ready = poll(all_ran, 60, f"every one of {jobs} jobs to run", interval=0.5)
    ready_s = time.time() - written if ready else None
    window = make_window(seconds)
    sleep_until(window[0])
    cpu0, zk0, req0 = peers_cpu(cluster), zookeeper_cpu(ensemble), zookeeper_requests(ensemble)
    sleep_until(window[1])
    cpu1, zk1, req1 = peers_cpu(cluster), zookeeper_cpu(ensemble), zookeeper_requests(ensemble)
    sleep_until(window[1] + timedelta(seconds=COOLDOWN_S))
    full = read_ledger(plan.ledger)
    lo, hi = window[0].timestamp(), window[1].timestamp()
    started = sum(1 for e in full.entries if lo <= e.started < hi)
    ledger, due = by_window(full, plan, window), due_slots(plan.specs(), window)
    figures = measure("cluster", "spread", ledger, due, window)
    used = cpu_used(cpu0, cpu1)
    cpu = sum(used.values())
    try:
        leader: str | None = cluster.leader(timeout=10).peer_id
    except AssertionError:
        leader = None
    return Step(
        jobs,
        figures,
        started,
        cpu / started if started else None,
        (zk1 - zk0) / started if started else None,
        ready_s,
        bursts(ledger),
        {peer_id: 100.0 * used[peer_id] / seconds for peer_id in sorted(used)},
        100.0 * (zk1 - zk0) / seconds,
        leader,
        stages(store, plan, ledger, recent(due, window)) if store is not None else None,
        (req1 - req0) / started if started and req0 is not None and req1 is not None else None,
        zookeeper_gc(ensemble, window),
    )


def run_throughput(
    ensemble: Ensemble, workdir: Path, seconds: float, ramp_seconds: float, warmup: float
) -> ThroughputResult:
    zk_root = "/bench-throughput"
    result = ThroughputResult()
    cluster = new_cluster(ensemble, workdir / "throughput", zk_root)
    set_jobs(cluster, make_plan("spread", workdir, "cluster", THROUGHPUT_JOBS))
    try:
        start_cluster(cluster)
        if warmup > 0:  # the servers' JIT compiles under this load (see the README)
            result.warmup = throughput_step(cluster, ensemble, workdir, THROUGHPUT_JOBS, warmup)
            print(f"  warm-up, not judged: {describe_step(result.warmup)}", flush=True)
        with observer(ensemble.hosts, zk_root) as store:
            first = throughput_step(cluster, ensemble, workdir, THROUGHPUT_JOBS, seconds, store)
            result.znodes = count_znodes(ensemble.hosts, zk_root)
            result.prune_scan = prune_scan(store, result.znodes.get("runs", 0))
        result.steps.append(first)
        print(f"  {describe_step(first)}; {result.znodes.get('total')} znodes", flush=True)
        for jobs in RAMP_UP if first.passed else RAMP_DOWN:
            step = throughput_step(cluster, ensemble, workdir, jobs, ramp_seconds)
            result.steps.append(step)
            print(f"  {describe_step(step)}", flush=True)
            if step.passed != first.passed:
                break
        entries = read_ledger(make_plan("spread", workdir, "cluster", 0).ledger).entries
        result.duplicated = sum(1 for n in Counter(e.key for e in entries).values() if n > 1)
    finally:
        stop_cluster(cluster)
        result.logs = peer_logs(cluster)
    # With the peers stopped: the minimal loop, the same jobs, the same window length.
    result.baseline = run_baseline("spread", seconds, workdir, THROUGHPUT_JOBS, THROUGHPUT_JOBS)
    print(f"  ran baseline: {THROUGHPUT_JOBS} jobs, {seconds:g} s", flush=True)
    return result


def describe_step(step: Step) -> str:
    f = step.figures
    return (
        f"{step.jobs} jobs, {f.window_s:g} s: p50 {f.p50_ms:.1f} ms, p99 {f.p99_ms:.1f} ms, "
        f"{f.missed} missed, {f.runs_per_s:.1f} runs/s"
        + (" (p99 <= 100 ms, none missed)" if step.passed else " (p99 > 100 ms or missed)")
    )


# --- report ----------------------------------------------------------------------------------


def secs(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def opt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def p50_max(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), (ordered[-1] if ordered else float("nan"))


def failover_summary(result: FailoverResult) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for kind in (KILL9, SIGTERM):
        rounds = [r for r in result.rounds if r.kind == kind]
        if rounds:
            elected = p50_max([r.elected_s for r in rounds if r.elected_s is not None])
            dispatch = p50_max([r.dispatch_s for r in rounds if r.dispatch_s is not None])
            summary[kind] = {
                "rounds": len(rounds),
                "elected_p50_s": elected[0],
                "elected_max_s": elected[1],
                "dispatch_p50_s": dispatch[0],
                "dispatch_max_s": dispatch[1],
                "no_dispatch": sum(1 for r in rounds if r.dispatch_s is None),
            }
    return summary


def print_failover(result: FailoverResult, summary: dict[str, dict[str, Any]]) -> None:
    print(
        f"failover: {FAILOVER_JOBS} jobs `interval: 1s`, misfire run_all; each signal "
        f"{SIGNAL_LEAD_S:g} s before a slot; session timeout {SESSION_TIMEOUT_S:g} s"
    )
    print(
        f"{'kind':<8} {'#':>2} {'old -> new':<16} {'elected s':>9} {'pass s':>6} "
        f"{'claim s':>7} {'dispatch s':>10} {'by':<8} {'exit':>4} {'exit s':>6} "
        f"{'restart s':>9} {'settle s':>8}"
    )
    for r in result.rounds:
        print(
            f"{r.kind:<8} {r.n:2d} {r.old_leader + ' -> ' + (r.new_leader or '?'):<16} "
            f"{secs(r.elected_s):>9} {secs(r.recorded_s):>6} {secs(r.claimed_s):>7} "
            f"{secs(r.dispatch_s):>10} {r.dispatch_trigger or '-':<8} "
            f"{'-' if r.exit_code is None else r.exit_code:>4} {secs(r.exit_s):>6} "
            f"{secs(r.restart_s):>9} {secs(r.settle_s):>8}"
        )
    print()
    print(
        f"{'kind':<8} {'rounds':>6} {'elected p50':>11} {'max':>6} {'dispatch p50':>12} "
        f"{'max':>6} {'no dispatch':>11} {'dispatch / session timeout':>26}"
    )
    for kind, s in summary.items():
        print(
            f"{kind:<8} {s['rounds']:6d} {s['elected_p50_s']:11.3f} {s['elected_max_s']:6.3f} "
            f"{s['dispatch_p50_s']:12.3f} {s['dispatch_max_s']:6.3f} {s['no_dispatch']:11d} "
            f"{'p50 ' + ratio(s['dispatch_p50_s']) + ', max ' + ratio(s['dispatch_max_s']):>26}"
        )
    late = [r for r in result.rounds if r.old_dispatches]
    if late:
        print(f"  note: the old leader recorded runs after the signal in {len(late)} rounds")
    slots = result.slots
    if slots is not None:
        w0, w1 = slots.window
        print(
            f"slots due {w0:%H:%M:%S}-{w1:%H:%M:%S} UTC: {slots.due}, ran {slots.ran}; "
            f"duplicated {slots.duplicated}; missed {slots.missed}; unknown {slots.unknown} "
            f"({slots.unknown_not_run} of them never started)"
        )
        if slots.missed:
            print(f"  missed by state in ZooKeeper: {fmt_counts(slots.missed_by_state)}")
            print(
                f"  missed by the last signal before their slot: {fmt_counts(slots.missed_after)}"
            )
            print(f"  e.g. {', '.join(slots.examples)}")
        if slots.unexpected or slots.malformed_lines:
            print(
                f"  note: {slots.unexpected} runs of slots that were not due, "
                f"{slots.malformed_lines} malformed ledger lines"
            )
    if result.prune_scan is not None:
        print(prune_text(result.prune_scan))
    if result.aborted:
        print(f"  ! aborted: {result.aborted}")


def prune_text(scan: tuple[int, float]) -> str:
    return (
        f"one prune pass (as the leader runs on its pruning thread on taking over and every "
        f"60 s) over the {scan[0]} znodes under runs/ took {scan[1]:.2f} s"
    )


def ratio(seconds: float) -> str:
    return f"{seconds / SESSION_TIMEOUT_S:.2f}x"


def fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def baseline_cpu_s_per_run(b: Figures) -> float | None:
    return b.cpu_pct / 100.0 * b.window_s / b.ran if b.cpu_pct is not None and b.ran else None


def highest_passing(result: ThroughputResult) -> Step | None:
    passing = [s for s in result.steps if s.passed]
    return max(passing, key=lambda s: s.figures.runs_per_s) if passing else None


def print_throughput(result: ThroughputResult) -> None:
    print(
        "throughput: fuzzy `every: 1s` jobs; lateness = the shell's start - its slot; "
        "CPU per run started in the window"
    )
    print(
        f"{'runner':<9} {'jobs':>5} {'window s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'missed':>6} {'dup':>4} {'runs/s':>7} {'CPU s/run':>9} {'ZK CPU s/run':>12} "
        f"{'ready s':>7}"
    )

    def row(runner: str, jobs: int, f: Figures, cpu: str, zk: str, ready: str) -> None:
        print(
            f"{runner:<9} {jobs:5d} {f.window_s:8g} {f.p50_ms:8.1f} {f.p99_ms:8.1f} "
            f"{f.max_ms:8.1f} {f.missed:6d} {f.duplicated:4d} {f.runs_per_s:7.1f} {cpu:>9} "
            f"{zk:>12} {ready:>7}"
        )

    for s in result.steps:
        cpu, zk = opt(s.cpu_s_per_run, ".4f"), opt(s.zk_cpu_s_per_run, ".4f")
        row("cluster", s.jobs, s.figures, cpu, zk, opt(s.ready_s, ".1f"))
    if result.baseline is not None:
        b = result.baseline
        row("baseline", THROUGHPUT_JOBS, b, opt(baseline_cpu_s_per_run(b), ".4f"), "-", "-")
    for s in result.steps:
        if s.figures.unexpected or s.figures.malformed_lines:
            print(
                f"  note: {s.jobs} jobs: {s.figures.unexpected} runs of slots that were not due, "
                f"{s.figures.malformed_lines} malformed ledger lines"
            )
    for s in result.steps:
        if s.bursts:
            print(
                f"  {s.jobs} jobs: slots over 1 s late from "
                + ", ".join(f"{t} for {n} s (worst {ms / 1000:.1f} s)" for t, n, ms in s.bursts[:4])
                + (f" and {len(s.bursts) - 4} more" if len(s.bursts) > 4 else "")
            )
    peer_ids = sorted({peer_id for s in result.steps for peer_id in s.cpu_pct})
    if peer_ids:
        print("CPU % of one core in each window (daemon + API processes; * the leader):")
        print(f"{'jobs':>6} " + " ".join(f"{p:>8}" for p in peer_ids) + f" {'ZooKeeper':>10}")
        for s in result.steps:
            cells = [
                f"{s.cpu_pct.get(p, 0.0):7.0f}{'*' if p == s.leader else ' '}" for p in peer_ids
            ]
            print(f"{s.jobs:6d} " + " ".join(cells) + f" {s.zk_cpu_pct:10.0f}")
        print(
            "ZooKeeper client requests per run (mntr zk_packets_received, the three servers): "
            + ", ".join(f"{s.jobs} jobs {opt(s.zk_requests_per_run, '.2f')}" for s in result.steps)
        )
    if any(s.zk_gc is not None for s in result.steps):
        print("ZooKeeper collections in each window (the three servers' gc.log):")
        for s in result.steps:
            if (g := s.zk_gc) is not None:
                print(
                    f"  {s.jobs} jobs: {g.pauses} pauses, longest {g.longest_pause_ms:.2f} ms; "
                    f"{g.stalls} allocation stalls, longest {g.longest_stall_ms:.1f} ms"
                )
    first = result.steps[0] if result.steps else None
    if first is not None and first.stages is not None:
        st = first.stages
        print(
            f"where the {first.jobs}-job window's lateness goes (its last {STAGES_SECONDS:.0f} s, "
            "p50 / p99 ms): leader's pass "
            f"began {st.woke_ms[0]:.1f} / {st.woke_ms[1]:.1f}; recorded, seen and claim begun "
            f"{st.claim_ms[0]:.1f} / {st.claim_ms[1]:.1f}; claimed and spawned "
            f"{st.spawn_ms[0]:.1f} / {st.spawn_ms[1]:.1f}"
        )
        if st.missed_by_state:
            print(f"  missed by state in ZooKeeper: {fmt_counts(st.missed_by_state)}")
    if result.znodes:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(result.znodes.items()) if k != "total")
        print(f"znodes after the {THROUGHPUT_JOBS}-job window: {result.znodes['total']} ({parts})")
    if result.prune_scan is not None:
        print(prune_text(result.prune_scan))
    best = highest_passing(result)
    print(
        f"highest rate with p99 <= {RAMP_P99_LIMIT_MS:g} ms and none missed: "
        + (f"{best.figures.runs_per_s:.1f} runs/s ({best.jobs} jobs)" if best else "none")
        + (
            f"; baseline at {THROUGHPUT_JOBS} jobs: {result.baseline.runs_per_s:.1f} runs/s, "
            f"p99 {result.baseline.p99_ms:.1f} ms"
            if result.baseline
            else ""
        )
    )
    if first is not None and result.baseline is not None and result.baseline.p99_ms > 0:
        b = result.baseline
        print(
            f"at {THROUGHPUT_JOBS} jobs: cluster / baseline p99 = "
            f"{first.figures.p99_ms / b.p99_ms:.2f}x, runs/s = "
            f"{first.figures.runs_per_s / b.runs_per_s:.2f}x"
            + (
                f", CPU per run = {first.cpu_s_per_run / base:.1f}x (peers only)"
                if first.cpu_s_per_run is not None and (base := baseline_cpu_s_per_run(b))
                else ""
            )
        )
    print(f"duplicated slots over the whole throughput phase: {result.duplicated}")


def print_logs(phase: str, logs: dict[str, Any]) -> bool:
    """Each peer's log records by level and its top problems; True if any logged an error."""
    trouble = False
    for peer_id, log in logs.items():
        levels = ", ".join(f"{n} {lvl}" for lvl, n in sorted(log["levels"].items())) or "nothing"
        print(f"  {phase}/{peer_id}: logged {levels}")
        for problem, n in list(log["problems"].items())[:4]:
            print(f"    {n:5d} x {problem}")
        trouble |= bool(log["levels"].get("error") or log["levels"].get("critical"))
    return trouble


@dataclass
class Target:
    name: str
    figure: str
    met: bool
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.name, "value": self.value, "met": self.met}


def targets(
    failover: FailoverResult | None,
    summary: dict[str, dict[str, Any]],
    throughput: ThroughputResult | None,
) -> list[Target]:
    found: list[Target] = []
    for kind, limit in ((KILL9, KILL9_TARGET_S), (SIGTERM, SIGTERM_TARGET_S)):
        if kind in summary:
            s = summary[kind]
            worst = s["dispatch_max_s"] if not s["no_dispatch"] else math.inf
            what = "failover" if kind == KILL9 else "handover"
            found.append(
                Target(
                    f"{kind} {what} max < {limit:g} s",
                    f"{worst:.3f} s",
                    worst < limit,
                    worst,
                )
            )
    if failover is not None and failover.slots is not None:
        slots = failover.slots
        found.append(
            Target(
                "failover: duplicated slots == 0",
                str(slots.duplicated),
                not slots.duplicated,
                slots.duplicated,
            )
        )
        found.append(
            Target("failover: missed slots == 0", str(slots.missed), not slots.missed, slots.missed)
        )
    if throughput is not None and throughput.steps:
        f = throughput.steps[0].figures
        found.append(
            Target(
                f"p99 < {THROUGHPUT_P99_TARGET_MS:g} ms at {THROUGHPUT_JOBS} runs/s",
                f"{f.p99_ms:.1f} ms at {f.runs_per_s:.1f} runs/s",
                f.p99_ms < THROUGHPUT_P99_TARGET_MS and f.runs_per_s >= THROUGHPUT_JOBS * 0.99,
                f.p99_ms,
            )
        )
        bad = f.missed + f.duplicated
        found.append(
            Target(
                f"{THROUGHPUT_JOBS} jobs: zero missed, zero duplicated",
                f"{f.missed} missed, {f.duplicated} duplicated",
                bad == 0,
                bad,
            )
        )
    return found


def print_summary(
    summary: dict[str, dict[str, Any]],
    failover: FailoverResult | None,
    throughput: ThroughputResult | None,
) -> None:
    rows: list[tuple[str, str]] = []
    for kind, s in summary.items():
        rows.append(
            (
                f"{kind}: signal -> first dispatch",
                f"p50 {s['dispatch_p50_s']:.3f} s, max {s['dispatch_max_s']:.3f} s "
                f"({ratio(s['dispatch_p50_s'])} / {ratio(s['dispatch_max_s'])} of the session "
                f"timeout); elected p50 {s['elected_p50_s']:.3f} s",
            )
        )
    if failover is not None and failover.slots is not None:
        sl = failover.slots
        rows.append(
            (
                "failover: slots",
                f"{sl.due} due, {sl.duplicated} duplicated, {sl.missed} missed "
                f"({fmt_counts(sl.missed_by_state) or '-'}), {sl.unknown} unknown",
            )
        )
    if throughput is not None and throughput.steps:
        first = throughput.steps[0]
        f = first.figures
        rows.append(
            (
                f"throughput: {first.jobs} jobs, {f.window_s:g} s",
                f"p50 {f.p50_ms:.1f} ms, p99 {f.p99_ms:.1f} ms, {f.runs_per_s:.1f} runs/s, "
                f"{f.missed} missed, {f.duplicated} duplicated",
            )
        )
        rows.append(
            (
                "throughput: cost",
                f"{opt(first.cpu_s_per_run, '.4f')} CPU s/run in the peers, "
                f"{opt(first.zk_cpu_s_per_run, '.4f')} in ZooKeeper; "
                f"{opt(first.zk_requests_per_run, '.1f')} ZooKeeper requests/run; "
                f"{throughput.znodes.get('total', '-')} znodes; a prune pass "
                + (f"{throughput.prune_scan[1]:.2f} s" if throughput.prune_scan else "-"),
            )
        )
        best = highest_passing(throughput)
        rows.append(
            (
                "throughput: highest rate, p99 <= 100 ms",
                f"{best.figures.runs_per_s:.1f} runs/s ({best.jobs} jobs)" if best else "none",
            )
        )
        if throughput.baseline is not None:
            b = throughput.baseline
            rows.append(
                (
                    f"baseline: {THROUGHPUT_JOBS} jobs, minimal loop",
                    f"p50 {b.p50_ms:.1f} ms, p99 {b.p99_ms:.1f} ms, {b.runs_per_s:.1f} runs/s, "
                    f"{b.missed} missed",
                )
            )
    width = max((len(name) for name, _ in rows), default=0)
    print("summary")
    for name, figure in rows:
        print(f"  {name:<{width}}  {figure}")


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("failover", "throughput"), help="run one part only")
    parser.add_argument("--kills", type=int, default=10, help="rounds of each kind of stop")
    args = parser.parse_args(argv)
    seconds = float(os.environ.get("BENCH_SECONDS", "60"))
    ramp_seconds = float(os.environ.get("BENCH_RAMP_SECONDS", "20"))
    warmup = float(os.environ.get("BENCH_WARMUP_SECONDS", "60"))
    keep = bool(os.environ.get("BENCH_KEEP"))
    workdir = Path(tempfile.mkdtemp(prefix="distcrond-cluster-bench-"))
    # A SIGTERM to the benchmark still runs the finally blocks below (no process left behind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(
        f"distcrond cluster benchmark: 3 peers on 3 ZooKeeper servers (127.0.0.1:{ZK_BASE_PORT}-"
        f"{ZK_BASE_PORT + 2}), session timeout {SESSION_TIMEOUT_S:g} s; failover: "
        f"{FAILOVER_JOBS} jobs at 1 s, {args.kills} x kill -9 then {args.kills} x SIGTERM "
        f"on the leader; throughput: {THROUGHPUT_JOBS} fuzzy jobs for {warmup:g} s of warm-up, "
        f"{seconds:g} s measured, then {ramp_seconds:g} s steps; {os.cpu_count()} CPUs",
        flush=True,
    )
    ensemble = Ensemble(workdir / "zookeeper", servers=3, base_port=ZK_BASE_PORT, tick_ms=500)
    failover: FailoverResult | None = None
    throughput: ThroughputResult | None = None
    try:
        ensemble.start(timeout=90)
        if args.only != "throughput":
            failover = run_failover(ensemble, workdir, args.kills)
        if args.only != "failover":
            throughput = run_throughput(ensemble, workdir, seconds, ramp_seconds, warmup)
    except (StartFailed, EnsembleError) as e:
        print(f"could not start: {e}")
        print(f"logs kept in {workdir}")
        return 2
    except Exception:  # a bug here or in the product: say so, after stopping everything
        traceback.print_exc()
        print(f"the benchmark failed; ledgers and logs kept in {workdir}")
        return 1
    finally:
        with contextlib.suppress(EnsembleError):
            ensemble.stop()
    print()
    summary = failover_summary(failover) if failover is not None else {}
    trouble = False
    if failover is not None:
        print_failover(failover, summary)
        print()
        s = failover.slots
        trouble |= bool(failover.aborted or s is None or s.missed or s.duplicated)
    if throughput is not None:
        print_throughput(throughput)
        print()
        trouble |= any(s.figures.missed or s.figures.duplicated for s in throughput.steps)
    print("peer logs (levels; most frequent warnings and errors, run ids and numbers masked):")
    for phase, result in (("failover", failover), ("throughput", throughput)):
        if result is not None:
            trouble |= print_logs(phase, result.logs)
    print()
    found = targets(failover, summary, throughput)
    for t in found:
        print(f"target: {t.name} ({t.figure}): {verdict(t.met)}")
    print()
    print_summary(summary, failover, throughput)
    if out := os.environ.get("BENCH_OUT"):
        report = {
            "bench": "cluster",
            "cpus": os.cpu_count(),
            "session_timeout_s": SESSION_TIMEOUT_S,
            "signal_lead_s": SIGNAL_LEAD_S,
            "seconds": seconds,
            "ramp_seconds": ramp_seconds,
            "warmup_seconds": warmup,
            "kills": args.kills,
            "failover": failover_json(failover, summary),
            "throughput": throughput_json(throughput),
            "targets": [t.as_dict() for t in found],
        }
        Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {out}")
    if trouble or keep:
        print(f"ledgers and peer logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def failover_json(
    result: FailoverResult | None, summary: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    if result is None:
        return None
    slots = None
    if result.slots is not None:
        slots = {**asdict(result.slots), "window": [w.isoformat() for w in result.slots.window]}
    return {
        "rounds": [asdict(r) for r in result.rounds],
        "summary": summary,
        "slots": slots,
        "aborted": result.aborted,
        "prune_scan": result.prune_scan,
        "logs": result.logs,
    }


def throughput_json(result: ThroughputResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    best = highest_passing(result)
    return {
        "warmup": None
        if result.warmup is None
        else {**asdict(result.warmup), "figures": result.warmup.figures.as_dict()},
        "steps": [
            {**asdict(s), "figures": s.figures.as_dict(), "passed": s.passed} for s in result.steps
        ],
        "highest_passing": None
        if best is None
        else {"jobs": best.jobs, "runs_per_s": best.figures.runs_per_s},
        "znodes": result.znodes,
        "duplicated": result.duplicated,
        "prune_scan": result.prune_scan,
        "baseline": None if result.baseline is None else result.baseline.as_dict(),
        "logs": result.logs,
    }


if __name__ == "__main__":
    sys.exit(main())
