"""The daemon: the one place that starts and stops a peer's components, in order.

Start: state lock → stores → config (+ watcher) → runners → node health → executor →
membership → API process → election (the scheduler runs while leader). Before the
executor starts, the objects built so far are frozen out of the garbage collector's way.
Stop: the reverse, so that leadership is handed over first and the stores
close last.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import ExitStack
from types import FrameType

from distcrond import __version__
from distcrond.api_process import APIProcess, APIStartError
from distcrond.clock import Clock
from distcrond.config.loader import ConfigRegistry, LoadedConfig
from distcrond.config.tokens import TokenTable, write_table
from distcrond.config.watcher import ConfigWatcher
from distcrond.coordination.base import ConfigSnapshot, CoordinationStore, PeerInfo
from distcrond.execution.base import Runner
from distcrond.execution.environment import RunEnvironment
from distcrond.execution.executor import Executor
from distcrond.execution.health import NodeHealthTracker
from distcrond.execution.local import LocalRunner
from distcrond.execution.ssh import SSHRunner
from distcrond.leadership import LeadershipMonitor
from distcrond.reporting.base import ReportStore
from distcrond.scheduling.scheduler import Scheduler
from distcrond.settings import Settings
from distcrond.statedir import acquire_state_lock, private_dir
from distcrond.stores import open_coordination, open_reports

log = logging.getLogger("distcrond.daemon")

SWITCH_INTERVAL = 0.0005  # seconds
# How often, at most, the main thread wakes to run the signal handlers Python has queued.
SIGNAL_CHECK = 0.25


def freeze_heap() -> int:
    """Collect, then move every object still alive to the collector's permanent
    generation (``gc.freeze``); the number of objects frozen.

    Python's full collections (generation 2) walk every object tracked, and hold the
    interpreter while they do: measured on a peer of the 300 runs/s benchmark (about
    73,000 objects, 67,000 of them modules, classes, clients and config built at
    start), each took 55-85 ms, every minute or so, and no run was spawned meanwhile.
    Frozen, the objects that live as long as the process are no longer walked (9.6 ms
    at p50, 33 ms at most). Objects still come free when nothing refers to them; only
    a reference cycle among frozen objects is never collected, and those are built
    once, at start."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def snapshot_of(peer_id: str, config: LoadedConfig) -> ConfigSnapshot:
    """The JSON form of a loaded config, as published for the API and the other peers."""
    return ConfigSnapshot(
        peer_id=peer_id,
        digest=config.digest,
        jobs={k: v.model_dump(mode="json") for k, v in config.jobs.items()},
        nodes={k: v.model_dump(mode="json") for k, v in config.nodes.items()},
        errors=[e.to_json() for e in config.errors],
        loaded_at=config.loaded_at,
    )


class Daemon:
    """One peer. ``run()`` blocks until ``request_stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self._stop = threading.Event()
        self._started_at = self.clock.now()
        self._coordination: CoordinationStore | None = None
        self._registry = ConfigRegistry(settings.jobs_dir, settings.nodes_dir, settings.api_tokens)
        self._scheduler: Scheduler | None = None
        self._ssh: SSHRunner | None = None
        self._tokens_written: TokenTable | None = None

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        # Runs' threads (capture, store writes) hold the GIL in bursts; a waiting thread
        # gets it only at the switch interval (5 ms by default), which is pure lateness
        # for the scheduler and for the thread about to spawn a due run.
        sys.setswitchinterval(SWITCH_INTERVAL)
        s = self.settings
        with ExitStack() as stack:
            stack.enter_context(acquire_state_lock(private_dir(s.state_dir)))
            coordination = open_coordination(s)
            stack.callback(coordination.close)
            self._coordination = coordination
            reports = open_reports(s, writer=True)
            stack.callback(reports.close)

            config = self._load_config()
            runners, ssh = self._runners(stack)
            self._ssh = ssh
            self._start_executor(stack, coordination, reports, runners, ssh)

            self._publish(config)
            stack.callback(coordination.unregister_peer, s.peer_id)

            api = APIProcess(s)
            api.start()
            stack.callback(api.stop)
            log.info("API listening on http://%s/api/v1/ (peer %s)", s.bind, s.peer_id)

            self._start_scheduling(stack, coordination, reports, runners)

            # A timed wait: a signal that the kernel hands to another thread leaves the main
            # thread's untimed lock wait asleep, and Python runs handlers on the main thread
            # only (seen: a SIGTERM ignored until SIGKILL while runs were being spawned).
            while not self._stop.wait(SIGNAL_CHECK):
                pass
            log.info("stopping peer %s", s.peer_id)
        log.info("peer %s stopped", s.peer_id)
        return 0

    def _current_config(self) -> LoadedConfig:
        """The config in force (the watcher replaces it)."""
        return self._registry.current

    def _load_config(self) -> LoadedConfig:
        """The first load of the job, node and tokens files (a bad tokens file stops us)."""
        config = self._registry.reload()
        for error in config.errors:
            log.warning("config error in %s: %s: %s", error.file, error.field or "-", error.reason)
        log.info("loaded %d jobs and %d nodes", len(config.jobs), len(config.nodes))
        self._write_tokens(config)
        return config

    def _start_executor(
        self,
        stack: ExitStack,
        coordination: CoordinationStore,
        reports: ReportStore,
        runners: dict[str, Runner],
        ssh: SSHRunner,
    ) -> None:
        """Node health checks and the executor, each stopped when ``stack`` unwinds."""
        s = self.settings
        current = self._current_config
        health = NodeHealthTracker(coordination, ssh.probe, current, s.peer_id, self.clock)
        health.start()
        stack.callback(health.stop)
        executor = Executor(
            coordination,
            reports,
            runners,
            current,
            s.peer_id,
            self.clock,
            s.max_concurrent_runs,
            health,
        )
        if not s.zookeeper:
            self._forget_dead_peers(coordination)
        # Before any run arrives: the collection this takes delays no run.
        log.info("froze %d objects built at start out of the collector's way", freeze_heap())
        executor.start()
        stack.callback(executor.stop, s.shutdown_grace)

    def _start_scheduling(
        self,
        stack: ExitStack,
        coordination: CoordinationStore,
        reports: ReportStore,
        runners: dict[str, Runner],
    ) -> None:
        """The scheduler, the config watcher and the stand for leadership; unwinding
        ``stack`` stops scheduling before abdicating, so no pass is fenced out mid-way."""
        s = self.settings
        scheduler = Scheduler(
            coordination,
            reports,
            self._current_config,
            self.clock,
            supported_types=runners.keys(),
            retention=s.run_retention,
            retention_count=s.run_retention_count,
            # Deposed mid-pass: that term ends (the store's election decides what next).
            on_fenced=lambda epoch: monitor.fenced(epoch),
        )
        self._scheduler = scheduler
        coordination.watch_triggers(scheduler.triggers_queued)

        watcher = ConfigWatcher(self._registry, self._on_config)
        watcher.start()
        stack.callback(watcher.stop)

        monitor = LeadershipMonitor(
            scheduler, coordination, s.peer_id, self.clock, s.leader_stall_timeout
        )
        monitor.start()
        coordination.start_election(s.peer_id, monitor)
        stack.callback(coordination.stop_election)
        stack.callback(monitor.close)

    def _runners(self, stack: ExitStack) -> tuple[dict[str, Runner], SSHRunner]:
        """The runners by connection type (and the SSH one, whose probe node health uses),
        each closed when ``stack`` unwinds."""
        s = self.settings
        # Runs never see the daemon's secrets; the nodes' passphrase variables are those of
        # the config in force (a cheap lookup: RunEnvironment caches per config).
        environment = RunEnvironment(
            patterns=s.scrub_env, nodes=lambda: self._registry.current.nodes
        )
        local = LocalRunner(clock=self.clock, environment=environment)
        stack.callback(local.close)
        ssh = SSHRunner(clock=self.clock, learned_hosts=s.state_dir / "ssh_known_hosts")
        stack.callback(ssh.close)
        return {"local": local, "ssh": ssh}, ssh

    def _forget_dead_peers(self, coordination: CoordinationStore) -> None:
        """Standalone: the state lock proves no other peer uses these files, so every other
        peer on record is gone (a peer id changed across a crash): unregister them, and the
        scheduler settles their runs like those of any lost peer."""
        for peer in coordination.peers():
            if peer.peer_id != self.settings.peer_id:
                log.warning("peer %s is gone; its unfinished runs will be settled", peer.peer_id)
                coordination.unregister_peer(peer.peer_id)

    def _on_config(self, config: LoadedConfig) -> None:
        log.info(
            "config reloaded: %d jobs, %d nodes, %d errors",
            len(config.jobs),
            len(config.nodes),
            len(config.errors),
        )
        self._publish(config)
        self._write_tokens(config)
        if self._ssh is not None:  # a removed node file's connections go
            self._ssh.keep_only(config.nodes.keys())
        if self._scheduler is not None:
            self._scheduler.config_changed()

    def _write_tokens(self, config: LoadedConfig) -> None:
        """Hand the tokens in force to the API's workers (they re-read the file on change).
        At start, a tokens file that is not usable stops the peer: there is no last good
        table, and an API that lets nobody in (or everybody) is not what was asked for."""
        s = self.settings
        if s.api_tokens is None:
            return
        if config.tokens is None:  # only at start: later, the last good table stays
            reasons = "; ".join(str(e) for e in config.errors if e.file == str(s.api_tokens))
            raise APIStartError(f"cannot use the API tokens file (--api-tokens): {reasons}")
        if config.tokens == self._tokens_written:
            return
        write_table(config.tokens, s.api_tokens_table)
        self._tokens_written = config.tokens
        log.info("API tokens in force: %d (%s)", len(config.tokens.entries), s.api_tokens)

    def _publish(self, config: LoadedConfig) -> None:
        assert self._coordination is not None
        s = self.settings
        self._coordination.publish_config(snapshot_of(s.peer_id, config))
        self._coordination.register_peer(
            PeerInfo(
                peer_id=s.peer_id,
                api_url=s.api_url,
                started_at=self._started_at,
                version=__version__,
                config_digest=config.digest,
                pid=os.getpid(),
                host=socket.gethostname(),
            )
        )
