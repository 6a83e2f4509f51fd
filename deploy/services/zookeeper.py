"""A local ZooKeeper ensemble on loopback, from Debian's ``zookeeper`` package.

Runs each server as a plain ``java ... QuorumPeerMain zoo.cfg`` process (no init
scripts, no systemd), with its own directory ``DIR/zkN/`` holding ``zoo.cfg``,
``data/myid``, ``server.log``, ``gc.log`` (the JVM's collections) and ``zookeeper.pid``.

As a script (stdlib only)::

    python deploy/services/zookeeper.py start|stop|status [--dir DIR] [--servers 3]
        [--base-port 2181] [--tick-ms 500]

As a module, :class:`Ensemble` is what the integration fixtures use.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy.services.common import apt_install, pid_alive, port_is_free, wait_until

# How long a server's client port may stay taken after the server stopped.
PORT_RELEASE_S = 5.0

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "var" / "services" / "zookeeper"
PACKAGE = "zookeeper"
FALLBACK_JRE_PACKAGE = "default-jre"
ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# zookeeper.jar's manifest Class-Path names its dependency jars, but no SLF4J
# binding: without these two the server logs nothing at all (SLF4J's NOP logger).
LOGGING_JARS = (Path("/usr/share/java/slf4j-log4j12.jar"), Path("/usr/share/java/log4j-1.2.jar"))
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
# ZooKeeper keeps its data tree in the heap, and at hundreds of runs a second the run
# records live long enough to be promoted, then die: a stop-the-world collector must
# empty the old generation every 30-60 s, and each pause stalls every client of the
# server (or, on the leader, every write). ZGC collects concurrently (pauses under a
# millisecond); in 256 MB (for a live set near 25 MB) allocations rarely wait for it.
# One concurrent GC thread each: three JVMs share a small machine with the peers.
HEAP = ("-Xms256m", "-Xmx256m")
GC = ("-XX:+UseZGC", "-XX:ConcGCThreads=1")
# A leader election waits for the others' votes 200 ms, then 400, 800... (doubling from
# finalizeWait): a vote lost while the election connections are re-made (seen in a
# rolling restart) made elections take 0.8-0.9 s instead of 0.2. Starting at 50 ms, such
# an election ends ~0.4 s sooner; a distcrond cluster is idle for the whole election.
ELECTION = ("-Dzookeeper.fastleader.minNotificationInterval=50",)
INIT_LIMIT_MS = 5000  # initLimit and syncLimit, whatever the tick
SYNC_LIMIT_MS = 2500
DEFAULT_BASE_PORT = 2181
PEER_PORT_BASE = 2888
ELECTION_PORT_BASE = 3888
SERVING_MODES = ("leader", "follower", "standalone")

LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n
"""


class EnsembleError(RuntimeError):
    """The ensemble could not be installed, started or stopped as asked."""


def _say(message: str) -> None:
    print(f"zookeeper: {message}", flush=True)


def four_letter_word(port: int, word: str = "srvr", timeout: float = 1.0) -> str | None:
    """Send a four-letter word to 127.0.0.1:``port``; the reply, or None if nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(word.encode())
            chunks: list[bytes] = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace")


def parse_mode(srvr_reply: str | None) -> str | None:
    """``leader``/``follower``/``standalone`` from a ``srvr`` reply; None if not serving."""
    for line in (srvr_reply or "").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def _dpkg_installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def _jre_package() -> str:
    """The JRE package that Debian's zookeeper depends on (``default-jre`` on bookworm)."""
    result = subprocess.run(
        ["apt-cache", "depends", PACKAGE], capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "Depends" and "jre" in value:
            return value.strip().strip("<>")
    return FALLBACK_JRE_PACKAGE


def install() -> str:
    """Make sure Debian's zookeeper package and a java are installed; return java's path."""
    if _dpkg_installed(PACKAGE) and ZOOKEEPER_JAR.exists():
        _say(f"package {PACKAGE} is installed")
    else:
        _say(f"package {PACKAGE} is not installed: installing it with apt-get")
        apt_install([PACKAGE], _say, EnsembleError)
    java = shutil.which("java")
    if java is None:
        jre = _jre_package()
        _say(f"no java on PATH: installing {jre}")
        apt_install([jre], _say, EnsembleError)
        java = shutil.which("java")
    if java is None or not ZOOKEEPER_JAR.exists():
        raise EnsembleError(f"after installing, still no java or no {ZOOKEEPER_JAR}")
    return java


def classpath() -> str:
    """The server's classpath: zookeeper.jar (its manifest brings its deps) + a log binding."""
    return ":".join(str(p) for p in (ZOOKEEPER_JAR, *LOGGING_JARS) if p.exists())


class Ensemble:
    """``servers`` ZooKeeper servers on 127.0.0.1, client ports ``base_port`` … upwards.

    Server ``n`` (1-based) listens for clients on ``base_port + n - 1`` and lives in
    ``root/zkN``. ``start()`` is idempotent: servers already running are kept.
    """

    def __init__(
        self,
        root: Path = DEFAULT_DIR,
        servers: int = 3,
        base_port: int = DEFAULT_BASE_PORT,
        tick_ms: int = 500,
    ) -> None:
        if servers < 1:
            raise ValueError("an ensemble needs at least one server")
        self.root = Path(root)
        self.servers = servers
        self.base_port = base_port
        self.tick_ms = tick_ms
        self._java: str | None = None
        # Children started by this process, so that they can be reaped when stopped.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- layout ---------------------------------------------------------------------

    @property
    def ids(self) -> range:
        return range(1, self.servers + 1)

    def client_port(self, n: int) -> int:
        return self.base_port + n - 1

    @property
    def hosts(self) -> str:
        """Connection string for every server: ``127.0.0.1:2181,127.0.0.1:2182,…``."""
        return ",".join(f"127.0.0.1:{self.client_port(n)}" for n in self.ids)

    def server_dir(self, n: int) -> Path:
        return self.root / f"zk{n}"

    def _pid_file(self, n: int) -> Path:
        return self.server_dir(n) / "zookeeper.pid"

    def log_file(self, n: int) -> Path:
        return self.server_dir(n) / "server.log"

    def gc_log_file(self, n: int) -> Path:
        """The JVM's log of its collections: setup, each cycle, each pause (kept ~10 MB)."""
        return self.server_dir(n) / "gc.log"

    # -- install and configure ------------------------------------------------------

    def install(self) -> None:
        """Install Debian's zookeeper package (and java) if missing."""
        self._java = install()

    def _quorum_ports(self) -> list[tuple[int, int]]:
        """(peer, election) ports per server: 2888+N / 3888+N for base port 2181.

        They move with the base port, so two ensembles on distinct client ports never
        share them (only the leader binds its peer port, so a free-port check alone
        would not see another ensemble's followers). A port found taken now is
        skipped, 100 up.
        """
        taken = {self.client_port(n) for n in self.ids}
        chosen: list[tuple[int, int]] = []
        for n in self.ids:
            pair = []
            for base in (PEER_PORT_BASE, ELECTION_PORT_BASE):
                port = base + (self.base_port - DEFAULT_BASE_PORT) + n
                while port in taken or not port_is_free(port):
                    port += 100
                taken.add(port)
                pair.append(port)
            chosen.append((pair[0], pair[1]))
        return chosen

    def write_configs(self) -> None:
        """Write zoo.cfg, myid and log4j.properties for every server (all must be stopped)."""
        peers = self._quorum_ports()
        server_lines = [
            f"server.{n}=127.0.0.1:{peer}:{election}"
            for n, (peer, election) in zip(self.ids, peers, strict=True)
        ]
        for n in self.ids:
            data = self.server_dir(n) / "data"
            data.mkdir(parents=True, exist_ok=True)
            (data / "myid").write_text(f"{n}\n")
            lines = [
                f"tickTime={self.tick_ms}",
                # In ticks: 5 s to sync with the leader on start, 2.5 s to stay in sync.
                f"initLimit={math.ceil(INIT_LIMIT_MS / self.tick_ms)}",
                f"syncLimit={math.ceil(SYNC_LIMIT_MS / self.tick_ms)}",
                f"dataDir={data}",
                f"clientPort={self.client_port(n)}",
                "clientPortAddress=127.0.0.1",
                "admin.enableServer=false",
                "4lw.commands.whitelist=ruok,srvr,stat,mntr",
                "autopurge.purgeInterval=1",
                "autopurge.snapRetainCount=3",
            ]
            if self.servers > 1:
                lines += server_lines
            (self.server_dir(n) / "zoo.cfg").write_text("\n".join(lines) + "\n")
            (self.server_dir(n) / "log4j.properties").write_text(LOG4J_PROPERTIES)

    # -- processes --------------------------------------------------------------------

    def pid(self, n: int) -> int | None:
        """The live server process ``n``, from its pid file (a stale file is removed)."""
        pid_file = self._pid_file(n)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid_alive(pid) and self._is_our_server(pid, n):
            return pid
        self._reap(pid)
        pid_file.unlink(missing_ok=True)
        return None

    def _is_our_server(self, pid: int, n: int) -> bool:
        """Guard against a recycled pid: the process must run this server's zoo.cfg."""
        proc = self._children.get(pid)
        if proc is not None:  # started by this object: its own handle is the truth
            return proc.poll() is None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.server_dir(n) / "zoo.cfg").encode() in argv

    def running(self) -> list[int]:
        return [n for n in self.ids if self.pid(n) is not None]

    def start_server(self, n: int) -> None:
        """Start server ``n`` unless it runs already (does not wait for it to serve)."""
        if self.pid(n) is not None:
            return
        port = self.client_port(n)
        # A server just stopped leaves its port unbindable for a moment (seen in the chaos
        # suite's rolling restart: its clients' sockets outlive it, briefly): wait a little.
        if not wait_until(lambda: port_is_free(port), PORT_RELEASE_S, interval=0.05):
            raise EnsembleError(f"client port {port} for server {n} is taken by another process")
        if self._java is None:
            self._java = shutil.which("java") or install()
        server_dir = self.server_dir(n)
        cmd = [
            self._java,
            *HEAP,
            *GC,
            *ELECTION,
            # Quoted: a path may hold a colon, -Xlog's separator.
            f'-Xlog:gc,gc+init,gc+phases:file="{self.gc_log_file(n)}":time,uptime,tags'
            ":filecount=2,filesize=5m",
            f"-Dlog4j.configuration=file:{server_dir / 'log4j.properties'}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            classpath(),
            MAIN_CLASS,
            str(server_dir / "zoo.cfg"),
        ]
        with open(self.log_file(n), "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=server_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        self._pid_file(n).write_text(f"{proc.pid}\n")

    def stop_server(self, n: int, timeout: float = 15.0) -> None:
        """Stop server ``n`` (SIGTERM, then SIGKILL) and wait until it is gone."""
        self._signal_and_wait(n, signal.SIGTERM, timeout)

    def kill_server(self, n: int) -> None:
        """``kill -9`` server ``n`` and wait until it is gone."""
        self._signal_and_wait(n, signal.SIGKILL, 5.0)

    def _signal_and_wait(self, n: int, sig: signal.Signals, timeout: float) -> None:
        pid = self.pid(n)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        gone = wait_until(lambda: self._gone(pid), timeout, interval=0.05)
        if not gone and sig != signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            gone = wait_until(lambda: self._gone(pid), 5.0, interval=0.05)
        if not gone:
            raise EnsembleError(f"server {n} (pid {pid}) did not exit")
        self._pid_file(n).unlink(missing_ok=True)

    def _gone(self, pid: int) -> bool:
        self._reap(pid)
        return not pid_alive(pid)

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:
            del self._children[pid]

    # -- whole ensemble ---------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Install if needed, start every server not running, wait until all serve."""
        running = self.running()
        if len(running) == self.servers and self._all_serving():
            _say(f"already running: {self.hosts}")
            return
        self.install()
        to_start = [n for n in self.ids if n not in running]
        taken = [self.client_port(n) for n in to_start if not port_is_free(self.client_port(n))]
        if taken:
            raise EnsembleError(f"client port(s) {taken} are taken by other processes")
        if not running:
            self.write_configs()
        started = time.monotonic()
        for n in to_start:
            self.start_server(n)
        try:
            try:
                self.wait_serving(self.ids, timeout)
            except EnsembleError as first:
                # A JVM that dies at once (seen rarely, right after a previous ensemble
                # stopped) gets one more start before the ensemble is declared broken.
                _say(f"retrying once: {str(first).splitlines()[0]}")
                for n in to_start:
                    self.start_server(n)
                self.wait_serving(self.ids, timeout)
        except EnsembleError:
            # Leave no half-started ensemble behind; the logs stay for a look.
            for n in to_start:
                self.kill_server(n)
            raise
        _say(f"{self.servers} servers serving in {time.monotonic() - started:.1f}s: {self.hosts}")

    def stop(self) -> None:
        """Stop every server (those already stopped are skipped)."""
        for n in self.ids:
            self.stop_server(n)

    def modes(self) -> dict[int, str | None]:
        """Each server's mode (leader/follower/standalone), None where it does not serve."""
        return {n: parse_mode(four_letter_word(self.client_port(n))) for n in self.ids}

    def _all_serving(self) -> bool:
        return all(mode in SERVING_MODES for mode in self.modes().values())

    def wait_serving(self, servers: Iterable[int], timeout: float = 60.0) -> None:
        """Wait until the given servers all serve (leader or follower); fail with logs."""
        wanted = list(servers)

        def ready() -> bool:
            dead = [n for n in wanted if self.pid(n) is None]
            if dead:
                raise EnsembleError(f"server(s) {dead} exited\n{self.log_tails(dead)}")
            modes = self.modes()
            return all(modes[n] in SERVING_MODES for n in wanted)

        if not wait_until(ready, timeout, interval=0.1):
            raise EnsembleError(
                f"servers {wanted} not serving after {timeout}s (modes {self.modes()})\n"
                + self.log_tails(wanted)
            )

    def wait_quorum(self, timeout: float = 60.0) -> None:
        """Wait until a leader and a majority of all servers serve."""

        def ready() -> bool:
            modes = list(self.modes().values())
            serving = sum(mode in SERVING_MODES for mode in modes)
            has_leader = "leader" in modes or "standalone" in modes
            return has_leader and serving > self.servers // 2

        if not wait_until(ready, timeout, interval=0.1):
            raise EnsembleError(
                f"no quorum after {timeout}s (modes {self.modes()})\n"
                + self.log_tails(list(self.ids))
            )

    def log_tails(self, servers: Iterable[int], lines: int = 20) -> str:
        out = []
        for n in servers:
            try:
                tail = self.log_file(n).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = ["(no log)"]
            out.append(f"--- {self.log_file(n)} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: %(default)s")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--tick-ms", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=60.0, help="start deadline, seconds")
    args = parser.parse_args(argv)
    ensemble = Ensemble(args.dir, args.servers, args.base_port, args.tick_ms)
    try:
        if args.command == "start":
            ensemble.start(timeout=args.timeout)
        elif args.command == "stop":
            ensemble.stop()
            _say(f"stopped ({args.dir})")
        else:
            modes = ensemble.modes()
            for n in ensemble.ids:
                pid = ensemble.pid(n)
                state = modes[n] or ("not serving" if pid else "stopped")
                _say(f"server {n} 127.0.0.1:{ensemble.client_port(n)} pid={pid or '-'} {state}")
            return 0 if all(mode in SERVING_MODES for mode in modes.values()) else 3
    except EnsembleError as e:
        print(f"zookeeper: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
