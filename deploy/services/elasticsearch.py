"""A local single-node Elasticsearch on loopback, from Maven Central's integ-test-zip.

The distribution is ``org.elasticsearch.distribution.integ-test-zip:elasticsearch``
(type ``zip``), fetched with ``mvn dependency:copy`` (Maven's configured settings
decide the registry; no URL is written here). The zip and its unpacked tree are
cached in ``DIST_DIR`` (default ``var/services/elasticsearch/dist/``), so only the
first run downloads (~98 MB) and unpacks.

Version: 8.19.9, the newest 8.x that Maven resolved here (8.19.10-8.19.12 did
not resolve; 8.19.8 and 8.19.2 did). 8.x because it runs on the machine's
default Java 17; 9.x needs Java 21+. The integ-test-zip bundles no JDK: java is
taken from ``ES_JAVA_HOME``, else ``JAVA_HOME``, else the ``java`` on PATH.
It ships the x-pack-core and x-pack-security modules, so
``xpack.security.enabled: false`` is accepted (and needed: plain HTTP, no auth).

Elasticsearch refuses to run as root, so when started by root it runs as the
unprivileged system user ``distcron-es`` (created if missing, with ``useradd
--system --no-create-home``) through ``setpriv``; its node directory (config
copy, data, logs, tmp) is chowned to that user. Each node directory ``ROOT``
holds ``config/``, ``data/``, ``logs/``, ``tmp/``, ``console.log`` (stdout and
stderr), ``elasticsearch.pid`` (the server JVM, written by Elasticsearch) and
``launcher.pid`` (the ``bin/elasticsearch`` CLI process, the server's parent).

Single node (``discovery.type: single-node``), HTTP on 127.0.0.1:PORT, transport
on 127.0.0.1:PORT+100, heap 512 MB, disk watermarks off. Loopback + single-node
means development mode: bootstrap checks only warn.

As a script (stdlib only)::

    python deploy/services/elasticsearch.py start|stop|status [--dir DIR] [--port 9200]
        [--dist-dir DIR] [--version 8.19.9]

As a module, :class:`Elasticsearch` is what the integration fixtures use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy.services.common import pid_alive, port_is_free, wait_until

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "var" / "services" / "elasticsearch"
DIST_DIR_ENV = "DISTCRON_ES_DIST_DIR"
DEFAULT_DIST_DIR = Path(os.environ.get(DIST_DIR_ENV, str(DEFAULT_DIR / "dist")))
ARTIFACT = "org.elasticsearch.distribution.integ-test-zip:elasticsearch"
DEFAULT_VERSION = "8.19.9"
MIN_JAVA = 17  # Elasticsearch 8.x; 9.x needs 21
DEFAULT_PORT = 9200
TRANSPORT_OFFSET = 100  # transport port = HTTP port + 100 (9300 for 9200, as ES does)
USER = "distcron-es"
HEAP = "-Xms512m -Xmx512m"
HOST = "127.0.0.1"


class ElasticsearchError(RuntimeError):
    """Elasticsearch could not be installed, started or stopped as asked."""


def _say(message: str) -> None:
    print(f"elasticsearch: {message}", flush=True)


def http_json(
    url: str, method: str = "GET", body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """(status, decoded JSON body) of a request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


# -- java, user, distribution ---------------------------------------------------------


def java_home() -> Path:
    """The JDK for Elasticsearch: ES_JAVA_HOME, JAVA_HOME, or the ``java`` on PATH."""
    for var in ("ES_JAVA_HOME", "JAVA_HOME"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            if (home / "bin" / "java").exists():
                return home
    java = shutil.which("java")
    if java is None:
        raise ElasticsearchError("no java: install a JDK >= 17 or set ES_JAVA_HOME")
    return Path(os.path.realpath(java)).parents[1]


def java_major(home: Path) -> int:
    result = subprocess.run(
        [str(home / "bin" / "java"), "-XshowSettings:properties", "-version"],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in result.stderr.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "java.specification.version":
            return int(value.strip().split(".")[-1] if value.strip().startswith("1.") else value)
    raise ElasticsearchError(f"cannot tell the version of {home}/bin/java:\n{result.stderr}")


def ensure_user(name: str = USER) -> pwd.struct_passwd:
    """The unprivileged system user Elasticsearch runs as; created if missing (root only)."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    if os.geteuid() != 0:
        raise ElasticsearchError(f"user {name} does not exist and not root to create it")
    _say(f"creating system user {name}")
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise ElasticsearchError(f"useradd {name} failed: {result.stderr.strip()}")
    return pwd.getpwnam(name)


def _unzip(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target`` keeping the files' Unix modes (bin/ scripts)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, target))
            mode = (info.external_attr >> 16) & 0o7777
            if mode and not stat.S_ISLNK(info.external_attr >> 16):
                path.chmod(mode)


def fetch_distribution(version: str, dist_dir: Path = DEFAULT_DIST_DIR) -> Path:
    """The unpacked ``elasticsearch-VERSION`` home in ``dist_dir``; fetched with mvn if needed."""
    dist_dir = Path(dist_dir)
    home = dist_dir / f"elasticsearch-{version}"
    if (home / "bin" / "elasticsearch").exists():
        return home
    dist_dir.mkdir(parents=True, exist_ok=True)
    archive = dist_dir / f"elasticsearch-{version}.zip"
    if not archive.exists():
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ElasticsearchError("no mvn on PATH: install Maven to fetch Elasticsearch")
        cmd = [
            mvn,
            "-q",
            "-B",
            "dependency:copy",
            f"-Dartifact={ARTIFACT}:{version}:zip",
            f"-DoutputDirectory={dist_dir}",
        ]
        _say("running: " + " ".join(cmd))
        started = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=dist_dir)
        if result.returncode != 0 or not archive.exists():
            raise ElasticsearchError(
                f"mvn could not fetch {ARTIFACT}:{version}:zip (exit {result.returncode}):\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        size = archive.stat().st_size / 1e6
        _say(f"fetched {archive.name} ({size:.1f} MB) in {time.monotonic() - started:.1f}s")
    _say(f"unpacking {archive.name}")
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dist_dir))
    try:
        _unzip(archive, staging)
        unpacked = staging / home.name
        if not (unpacked / "bin" / "elasticsearch").exists():
            raise ElasticsearchError(f"{archive} holds no {home.name}/bin/elasticsearch")
        with contextlib.suppress(OSError):  # a concurrent unpack may have won: keep that one
            unpacked.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dist_dir.chmod(dist_dir.stat().st_mode | 0o755)  # readable by the unprivileged user
    return home


# -- the node ---------------------------------------------------------------------------


class Elasticsearch:
    """One Elasticsearch node on 127.0.0.1:``port``, state in ``root``.

    ``start()`` is idempotent: a node already running from ``root`` is kept.
    """

    def __init__(
        self,
        root: Path = DEFAULT_DIR / "node",
        port: int = DEFAULT_PORT,
        version: str = DEFAULT_VERSION,
        dist_dir: Path = DEFAULT_DIST_DIR,
        user: str = USER,
        heap: str = HEAP,
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.transport_port = port + TRANSPORT_OFFSET
        self.version = version
        self.dist_dir = Path(dist_dir)
        self.user = user
        self.heap = heap
        self.home = self.dist_dir / f"elasticsearch-{version}"
        self._java_home: Path | None = None
        self._launcher: subprocess.Popen[bytes] | None = None

    # -- layout -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def log_file(self) -> Path:
        """stdout/stderr of the launcher and the server (the server also logs to logs/)."""
        return self.root / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "elasticsearch.pid"

    @property
    def launcher_pid_file(self) -> Path:
        return self.root / "launcher.pid"

    # -- install and configure ----------------------------------------------------------

    def install(self) -> None:
        """Check java, create the user (as root), fetch and unpack the distribution."""
        home = java_home()
        major = java_major(home)
        if major < MIN_JAVA:
            raise ElasticsearchError(
                f"{home}/bin/java is Java {major}; Elasticsearch {self.version} needs "
                f">= {MIN_JAVA}: set ES_JAVA_HOME"
            )
        self._java_home = home
        if os.geteuid() == 0:
            ensure_user(self.user)
        self.home = fetch_distribution(self.version, self.dist_dir)

    def write_config(self) -> None:
        """A private copy of the distribution's config/ with our elasticsearch.yml."""
        if self.config_dir.exists():
            shutil.rmtree(self.config_dir)
        shutil.copytree(self.home / "config", self.config_dir)
        for sub in ("data", "logs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        settings = {
            "cluster.name": f"distcron-test-{self.port}",
            "node.name": f"distcron-es-{self.port}",
            "path.data": str(self.root / "data"),
            "path.logs": str(self.root / "logs"),
            "network.host": HOST,
            "http.port": str(self.port),
            "transport.port": str(self.transport_port),
            "discovery.type": "single-node",
            "xpack.security.enabled": "false",
            "cluster.routing.allocation.disk.threshold_enabled": "false",
            # Tests clean up with DELETE /distcron-test-* (8.x refuses wildcards by default).
            "action.destructive_requires_name": "false",
        }
        (self.config_dir / "elasticsearch.yml").write_text(
            "".join(f"{key}: {value}\n" for key, value in settings.items())
        )

    def _chown(self) -> None:
        if os.geteuid() != 0:
            return
        account = pwd.getpwnam(self.user)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, account.pw_uid, account.pw_gid)
        # The user must be able to reach root: every parent needs o+x (a 0700 parent,
        # like pytest's /tmp/pytest-of-root, would make the node directory unreachable).
        for parent in self.root.resolve().parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise ElasticsearchError(
                    f"{parent} is not searchable by others: {self.user} cannot reach {self.root}"
                )

    # -- processes ----------------------------------------------------------------------

    def _read_pid(self, path: Path) -> int | None:
        try:
            return int(path.read_text().strip())  # ES writes its pid without a newline
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """Guard against a recycled pid: the process must be a JVM of this node's config."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        config = str(self.config_dir).encode()
        return config in argv or b"ES_PATH_CONF=" + config in environ.split(b"\0")

    def pid(self) -> int | None:
        """The live server JVM, from Elasticsearch's pid file (a stale file is ignored)."""
        pid = self._read_pid(self.pid_file)
        if pid is not None and pid_alive(pid) and self._is_ours(pid):
            return pid
        return None

    def launcher_pid(self) -> int | None:
        pid = self._read_pid(self.launcher_pid_file)
        if pid is not None and pid_alive(pid) and self._is_ours(pid):
            return pid
        return None

    def running(self) -> bool:
        """True if this node's server JVM (or its launcher, while starting) is alive."""
        self._reap()
        return self.pid() is not None or self.launcher_pid() is not None

    def health(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """``_cluster/health`` once yellow or green; None if the node does not answer so."""
        try:
            status, body = http_json(
                f"{self.url}/_cluster/health?wait_for_status=yellow&timeout=1s", timeout=timeout
            )
        except OSError:
            return None
        if status == 200 and isinstance(body, dict) and body.get("status") in ("yellow", "green"):
            return body
        return None

    def start(self, timeout: float = 120.0) -> float:
        """Install if needed, start the node, wait until it is yellow; return seconds taken."""
        if self.running() and self.health() is not None:
            _say(f"already running: {self.url} (pid {self.pid()})")
            return 0.0
        if self.running():
            raise ElasticsearchError(
                f"a node runs from {self.root} but does not answer on {self.url}"
            )
        for port in (self.port, self.transport_port):
            if not port_is_free(port):
                raise ElasticsearchError(f"port {HOST}:{port} is taken by another process")
        self.install()
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.pid_file.unlink(missing_ok=True)
        self._chown()
        assert self._java_home is not None
        env = {
            **os.environ,
            "ES_JAVA_HOME": str(self._java_home),
            "ES_PATH_CONF": str(self.config_dir),
            "ES_JAVA_OPTS": self.heap,
            "ES_TMPDIR": str(self.root / "tmp"),
        }
        env.pop("JAVA_HOME", None)  # ES warns about it; ES_JAVA_HOME wins anyway
        cmd = [str(self.home / "bin" / "elasticsearch"), "-p", str(self.pid_file)]
        if os.geteuid() == 0:
            account = pwd.getpwnam(self.user)
            env.update(HOME=str(self.root), USER=self.user, LOGNAME=self.user)
            cmd = [
                "setpriv",
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--init-groups",
                "--",
                *cmd,
            ]
        started = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self._launcher = subprocess.Popen(
                cmd,
                cwd=self.root,  # the JVM's relative gc.log and hs_err files land here
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.launcher_pid_file.write_text(f"{self._launcher.pid}\n")
        try:
            self.wait_ready(timeout)
        except ElasticsearchError:
            self.stop(timeout=10.0)
            raise
        took = time.monotonic() - started
        _say(f"serving in {took:.1f}s: {self.url} (pid {self.pid()}, user {self.user})")
        return took

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the cluster is yellow; fail with the log tail if the node dies."""

        def ready() -> bool:
            if self._launcher is not None and self._launcher.poll() is not None:
                raise ElasticsearchError(
                    f"elasticsearch exited with {self._launcher.returncode}\n{self.log_tail()}"
                )
            return self.health() is not None

        if not wait_until(ready, timeout, interval=0.5):
            raise ElasticsearchError(f"{self.url} not yellow after {timeout}s\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server JVM (and its launcher), SIGKILL after ``timeout``; wait."""
        pids = [p for p in (self.pid(), self.launcher_pid()) if p is not None]
        if self._launcher is not None and self._launcher.poll() is None:
            pids.append(self._launcher.pid)
        pids = list(dict.fromkeys(pids))
        if not pids:
            self._cleanup_pid_files()
            return
        # Only the server: the launcher exits once the server has (signalling it too
        # makes it report "exited unexpectedly"). No server yet: the launcher then.
        server = self.pid()
        for pid in [server] if server is not None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: self._all_gone(pids), timeout, interval=0.1):
            _say(f"not stopped after {timeout}s: SIGKILL {pids}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not wait_until(lambda: self._all_gone(pids), 10.0, interval=0.1):
                raise ElasticsearchError(f"elasticsearch (pids {pids}) did not exit")
        self._cleanup_pid_files()

    def _all_gone(self, pids: list[int]) -> bool:
        self._reap()
        return not any(pid_alive(pid) for pid in pids)

    def _reap(self) -> None:
        if self._launcher is not None and self._launcher.poll() is not None:
            self._launcher = None

    def _cleanup_pid_files(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.launcher_pid_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of console.log (and of the server log, if it has one)."""
        out = []
        for path in (self.log_file, self.root / "logs" / f"distcron-test-{self.port}.log"):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out) or f"(no log in {self.root})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR / "node", help="node state; default: %(default)s"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port")
    parser.add_argument("--dist-dir", type=Path, default=DEFAULT_DIST_DIR, help="zip cache")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--timeout", type=float, default=120.0, help="start deadline, seconds")
    args = parser.parse_args(argv)
    node = Elasticsearch(args.dir, args.port, args.version, args.dist_dir)
    try:
        if args.command == "start":
            node.start(timeout=args.timeout)
        elif args.command == "stop":
            node.stop()
            _say(f"stopped ({args.dir})")
        else:
            health = node.health()
            state = (
                health["status"] if health else ("not answering" if node.running() else "stopped")
            )
            _say(f"{node.url} pid={node.pid() or '-'} {state}")
            return 0 if health else 3
    except ElasticsearchError as e:
        print(f"elasticsearch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
