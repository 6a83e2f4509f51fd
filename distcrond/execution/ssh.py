"""Run a command on a remote node over SSH, with paramiko: no agent of any kind on the node.

**Connections.** One pool per node in this peer: authenticated transports,
reused across runs, one channel per run. A transport carries at most
``CHANNELS_PER_CONNECTION`` channels at once (below a stock sshd's
``MaxSessions`` of 10: closed channels linger for a moment), and more
transports are opened beyond that; an open that sshd refuses is retried on
another transport. The socket has ``TCP_NODELAY`` (with Nagle, every channel
open waited ~40 ms for a delayed ACK), transports send keepalives, and a dead
one is dropped and replaced. The node's ``max_concurrent_runs`` bounds its runs.

**Host keys** must be known: pinned in the node file (``ssh_host_key``, a key
or a ``SHA256:`` fingerprint), or in ``ssh_known_hosts_file`` (default: the
daemon user's ``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``). An
unknown key is refused unless the node sets ``ssh_trust_on_first_use``; then it
is remembered in the peer's own known-hosts file (``learned_hosts``). A key
that differs from a known one is always refused.

**Private keys** are read only from files nobody else may read (mode 0600 or
stricter), with an optional passphrase from an environment variable named in
the node file. No key material or passphrase is ever logged or reported.

**The remote command.** A stock sshd accepts no environment variables
(``AcceptEnv``), and a command line is visible in the node's process list, so
the run is a small POSIX shell script sent on the channel's stdin to
``exec /bin/sh -s``: it prints its pid (``DISTCRON-PID <pid>`` on stderr, taken
out of the captured output), exports the environment, changes directory, and
``exec``s the argv, every word quoted with :func:`shlex.quote`, with stdin from
``/dev/null``. sshd starts a command in a session of its own, so that pid is
the process group: a timeout or a cancel kills the group through a second
channel (SIGTERM, then SIGKILL after ``kill_grace``), leaving nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import paramiko

from distcrond.clock import Clock
from distcrond.config.durations import format_duration
from distcrond.config.models import NodeSpec, SSHOptions
from distcrond.execution.base import Runner, RunOutcome, RunRequest
from distcrond.execution.capture import BoundedBuffer

log = logging.getLogger("distcrond.ssh")

CHANNELS_PER_CONNECTION = 8
KEEPALIVE_SECONDS = 15
PID_MARKER = b"DISTCRON-PID "
DEFAULT_KNOWN_HOSTS = (Path("~/.ssh/known_hosts"), Path("/etc/ssh/ssh_known_hosts"))
_READ_SIZE = 65536
_POLL = 0.05
_REFUSED_BACKOFF = 0.2
# Host key algorithms paramiko may negotiate for a key type found in known_hosts.
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


class SSHError(Exception):
    """Connecting, verifying the host or authenticating failed: the command never started.
    The message is for people and never holds key material."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key: ``SHA256:<base64 without padding>``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def remote_script(request: RunRequest) -> bytes:
    """The shell script that runs ``request`` on the node (see the module docstring).

    The run's environment is ``request.env`` alone: nothing of the daemon's own
    environment goes to the node (nor to paramiko's ``environment=``), so neither do the
    daemon's secrets (see distcrond/execution/environment.py)."""
    lines = ['echo "DISTCRON-PID $$" >&2']
    lines += [f"export {shlex.quote(f'{k}={v}')}" for k, v in sorted(request.env.items())]
    if request.working_dir:
        lines.append(f"cd -- {shlex.quote(request.working_dir)} || exit 127")
    lines.append("exec " + " ".join(shlex.quote(a) for a in request.argv) + " </dev/null")
    return ("\n".join(lines) + "\n").encode()


def kill_script(pid: int, grace: float) -> str:
    """TERM the run's process group, KILL it after ``grace`` seconds if it is still there."""
    steps = max(1, round(grace / 0.1))
    return (
        f"kill -TERM -- -{pid} 2>/dev/null; i=0; "
        f"while kill -0 -- -{pid} 2>/dev/null; do "
        f"if [ $i -ge {steps} ]; then kill -KILL -- -{pid} 2>/dev/null; break; fi; "
        f"sleep 0.1; i=$((i+1)); done"
    )


# -- keys ------------------------------------------------------------------------------------


def load_private_key(path: str, passphrase_env: str | None) -> paramiko.PKey:
    """Read a private key from a file only its owner can read; SSHError says why not."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SSHError(f"private key file {path}: {(e.strerror or str(e)).lower()}") from None
    if st.st_mode & 0o077:
        raise SSHError(
            f"private key file {path} is accessible by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): refused; chmod 600 it"
        )
    passphrase: str | None = None
    if passphrase_env:
        passphrase = os.environ.get(passphrase_env)
        if passphrase is None:
            raise SSHError(
                f"the passphrase of {path} is to be in ${passphrase_env}, which is not set"
            )
    try:
        # paramiko annotates ``password`` as str, but cryptography wants bytes.
        secret = passphrase.encode() if passphrase else None
        return paramiko.PKey.from_path(path, password=secret)
    except (paramiko.PasswordRequiredException, TypeError) as e:
        if isinstance(e, TypeError) and "password" not in str(e).lower():
            raise SSHError(f"cannot read private key file {path}: {e}") from None
        if passphrase is not None:
            raise SSHError(f"cannot read private key file {path}: wrong passphrase") from None
        raise SSHError(
            f"private key file {path} is encrypted: name the variable that holds its "
            "passphrase in ssh_key_passphrase_env"
        ) from None
    except (paramiko.SSHException, ValueError, OSError) as e:
        # paramiko's messages name the problem, never the key's bytes.
        raise SSHError(f"cannot read private key file {path}: {e}") from None


class _KeyCache:
    """Private keys by (path, passphrase variable), reloaded when the file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str | None], tuple[tuple[int, int], paramiko.PKey]] = {}

    def get(self, path: str, passphrase_env: str | None) -> paramiko.PKey:
        try:
            st = os.stat(path)
            version = (st.st_mtime_ns, st.st_size)
        except OSError:
            version = (0, 0)
        with self._lock:
            cached = self._keys.get((path, passphrase_env))
            if cached is not None and cached[0] == version:
                return cached[1]
        key = load_private_key(path, passphrase_env)
        with self._lock:
            self._keys[(path, passphrase_env)] = (version, key)
        return key


# -- host keys -------------------------------------------------------------------------------


class HostKeyPolicy:
    """Decides whether a server's host key is the node's; remembers trust-on-first-use keys."""

    def __init__(self, learned_hosts: Path | None) -> None:
        self._learned = learned_hosts
        self._lock = threading.Lock()

    def _files(self, options: SSHOptions) -> list[Path]:
        if options.ssh_known_hosts_file:
            files = [Path(options.ssh_known_hosts_file)]
        else:
            files = [p.expanduser() for p in DEFAULT_KNOWN_HOSTS]
        if options.ssh_trust_on_first_use and self._learned is not None:
            files.append(self._learned)
        return files

    def known(self, options: SSHOptions) -> dict[str, paramiko.PKey]:
        """The keys known for the node's host, by key type (empty when none)."""
        keys = paramiko.HostKeys()
        for path in self._files(options):
            if path.is_file():
                try:
                    keys.load(str(path))
                except (OSError, paramiko.SSHException) as e:
                    raise SSHError(f"known hosts file {path}: {e}") from None
        entry = keys.lookup(known_hosts_name(options.host, options.port))
        return dict(entry) if entry else {}

    def algorithms(self, options: SSHOptions, known: dict[str, paramiko.PKey]) -> list[str] | None:
        """Host key algorithms to ask for, so that the server shows the key type we know
        (``known``: what :meth:`known` found for the node)."""
        if options.ssh_host_key and not options.ssh_host_key.startswith("SHA256:"):
            types = [options.ssh_host_key.split()[0]]
        else:
            types = list(known) if not options.ssh_host_key else []
        if not types:
            return None
        return [alg for t in types for alg in _ALGORITHMS.get(t, (t,))]

    def verify(
        self,
        options: SSHOptions,
        key: paramiko.PKey,
        known: dict[str, paramiko.PKey] | None = None,
    ) -> None:
        """Refuse (SSHError) a host key that is not the node's; ``known`` as read by
        :meth:`known` (read here when not given)."""
        name = known_hosts_name(options.host, options.port)
        shown = f"{key.get_name()} {fingerprint(key)}"
        pinned = options.ssh_host_key
        if pinned:
            if pinned.startswith("SHA256:"):
                ok = pinned.rstrip("=") == fingerprint(key)
            else:
                kind, blob = pinned.split()[:2]
                ok = kind == key.get_name() and blob == key.get_base64()
            if not ok:
                raise SSHError(f"host key of {name} is {shown}, not the pinned ssh_host_key")
            return
        if known is None:
            known = self.known(options)
        if known:
            if known.get(key.get_name()) == key:
                return
            raise SSHError(
                f"host key of {name} has CHANGED (now {shown}); refused. If the change is "
                "expected, replace its line in the known hosts file"
            )
        if not options.ssh_trust_on_first_use or self._learned is None:
            files = ", ".join(str(p) for p in self._files(options))
            raise SSHError(
                f"host key of {name} ({shown}) is unknown; refused. Add it to {files}, "
                "pin it with ssh_host_key, or set ssh_trust_on_first_use"
            )
        with self._lock:
            self._learned.parent.mkdir(parents=True, exist_ok=True)
            with self._learned.open("a") as f:
                f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        log.warning("trusting the host key of %s on first use: %s", name, shown)


# -- connections -------------------------------------------------------------------------------


@dataclass
class _Connection:
    transport: paramiko.Transport
    channels: int = 0
    refused_until: float = 0.0

    @property
    def alive(self) -> bool:
        return self.transport.is_active()


@dataclass
class _Pool:
    """The transports of one node, and the runs it may have at once."""

    options: SSHOptions
    slots: threading.BoundedSemaphore
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: list[_Connection] = field(default_factory=list)
    retired: bool = False
    opened: int = 0  # transports opened so far (for figures and tests)


class SSHRunner(Runner):
    """Runs a :class:`RunRequest` on its SSH node; never raises for the command's failure.

    Outcomes are those of the local runner: exit code, bounded stdout/stderr,
    ``timed out after 30s`` / ``cancelled`` (the remote process group is killed),
    and ``not_started`` with the reason when connecting, verifying the host key
    or authenticating failed (``ssh root@10.0.0.7:22: connection refused``).
    """

    connection_type = "ssh"

    def __init__(
        self,
        clock: Clock | None = None,
        learned_hosts: Path | None = None,
        kill_grace: float = 5.0,
        output_grace: float = 1.0,
        pooled: bool = True,
    ) -> None:
        self._clock = clock if clock is not None else Clock()
        self._policy = HostKeyPolicy(learned_hosts)
        self._keys = _KeyCache()
        self._kill_grace = kill_grace
        self._output_grace = output_grace
        self._pooled = pooled  # False: a new connection per run (the benchmark's reference)
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self._closed = False

    # -- pools -------------------------------------------------------------------------
    def _pool(self, node: NodeSpec) -> _Pool:
        options = node.connection_options
        assert options is not None
        with self._lock:
            pool = self._pools.get(node.id)
            if pool is not None and pool.options == options:
                return pool
            new = _Pool(options, threading.BoundedSemaphore(options.max_concurrent_runs))
            self._pools[node.id] = new
        if pool is not None:  # the node file changed: the old transports go when idle
            self._retire(pool)
        return new

    def _retire(self, pool: _Pool) -> None:
        with pool.lock:
            pool.retired = True
            idle = [c for c in pool.connections if c.channels == 0]
            pool.connections = [c for c in pool.connections if c.channels > 0]
        for conn in idle:
            conn.transport.close()

    def keep_only(self, node_ids: Collection[str]) -> None:
        """Close the pooled connections of every node not in ``node_ids`` (its file was
        removed): idle ones now, busy ones when their runs end."""
        with self._lock:
            gone = [self._pools.pop(n) for n in list(self._pools) if n not in node_ids]
        for pool in gone:
            self._retire(pool)

    def connections(self, node_id: str) -> int:
        """Open transports to a node (for tests and figures)."""
        with self._lock:
            pool = self._pools.get(node_id)
        if pool is None:
            return 0
        with pool.lock:
            return sum(1 for c in pool.connections if c.alive)

    def opened(self, node_id: str) -> int:
        """Transports opened to a node since its pool was made."""
        with self._lock:
            pool = self._pools.get(node_id)
        return pool.opened if pool else 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            with pool.lock:
                conns, pool.connections = pool.connections, []
            for conn in conns:
                conn.transport.close()

    def _connect(self, pool: _Pool, timeout: float) -> _Connection:
        o = pool.options
        where = f"{o.host}:{o.port}"
        try:
            sock = socket.create_connection((o.host, o.port), timeout=timeout)
        except TimeoutError:
            raise SSHError(f"connect to {where}: timed out after {timeout:g}s") from None
        except OSError as e:
            raise SSHError(f"connect to {where}: {(e.strerror or str(e)).lower()}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            known = {} if o.ssh_host_key else self._policy.known(o)  # one read per connect
            algorithms = self._policy.algorithms(o, known)
            if algorithms:
                supported = transport.get_security_options().key_types
                wanted = [a for a in algorithms if a in supported]
                if wanted:
                    transport.get_security_options().key_types = wanted
            transport.start_client(timeout=timeout)
            self._policy.verify(o, transport.get_remote_server_key(), known)
            key = self._keys.get(o.ssh_private_key_file, o.ssh_key_passphrase_env)
            try:
                transport.auth_publickey(o.ssh_user, key)
            except paramiko.AuthenticationException:
                raise SSHError(
                    f"{where} refused the key {o.ssh_private_key_file} for user {o.ssh_user}"
                ) from None
            transport.set_keepalive(KEEPALIVE_SECONDS)
        except SSHError:
            transport.close()
            raise
        except (paramiko.SSHException, EOFError, OSError) as e:
            transport.close()
            raise SSHError(f"ssh handshake with {where}: {e or type(e).__name__}") from None
        with pool.lock:
            pool.opened += 1
        return _Connection(transport)

    def _open_channel(
        self, pool: _Pool, deadline: float, cancel: threading.Event
    ) -> tuple[_Connection, paramiko.Channel]:
        """A new session channel on a pooled transport (a new transport when all are busy)."""
        timeout = pool.options.connect_timeout.total_seconds()
        while True:
            now = self._clock.monotonic()
            conn: _Connection | None = None
            with pool.lock:
                pool.connections = [c for c in pool.connections if c.alive or c.channels > 0]
                if self._pooled:
                    for c in pool.connections:
                        if (
                            c.alive
                            and c.channels < CHANNELS_PER_CONNECTION
                            and c.refused_until <= now
                        ):
                            conn = c
                            break
                if conn is not None:
                    conn.channels += 1
            if conn is None:
                conn = self._connect(pool, min(timeout, max(0.1, deadline - now)))
                conn.channels = 1
                with pool.lock:
                    pool.connections.append(conn)
            try:
                channel = conn.transport.open_session(timeout=max(0.1, deadline - now))
                return conn, channel
            except paramiko.ChannelException:
                # sshd refused (MaxSessions, or closed channels not yet torn down).
                self._release(pool, conn, refused=True)
            except (paramiko.SSHException, EOFError, OSError):
                self._release(pool, conn, broken=True)
            if self._clock.monotonic() > deadline or cancel.is_set():
                raise SSHError(
                    f"{pool.options.host}:{pool.options.port}: no channel could be opened"
                )
            time.sleep(0.01)

    def _release(
        self, pool: _Pool, conn: _Connection, refused: bool = False, broken: bool = False
    ) -> None:
        with pool.lock:
            conn.channels -= 1
            if refused:
                conn.refused_until = self._clock.monotonic() + _REFUSED_BACKOFF
            drop = (
                broken
                or not conn.alive
                or ((pool.retired or not self._pooled) and conn.channels == 0)
            )
            if drop and conn in pool.connections:
                pool.connections.remove(conn)
        if drop and conn.channels == 0:
            conn.transport.close()

    def probe(self, node: NodeSpec) -> str | None:
        """Connect, verify and authenticate to the node, then hang up: None when that worked,
        else why not (the node health checks' question)."""
        if node.connection_options is None:
            return f"node {node.id} has no SSH options"
        pool = self._pool(node)
        try:
            conn = self._connect(pool, pool.options.connect_timeout.total_seconds())
        except SSHError as e:
            o = pool.options
            return f"ssh {o.ssh_user}@{o.host}:{o.port}: {e}"
        conn.transport.close()
        return None

    # -- running -------------------------------------------------------------------------
    def run(self, request: RunRequest) -> RunOutcome:
        started_at = self._clock.now()
        node = request.node
        if node is None or node.connection_options is None:
            return self._not_started(started_at, f"node {request.node_id} has no SSH options")
        options = node.connection_options
        target = f"ssh {options.ssh_user}@{options.host}:{options.port}"
        pool = self._pool(node)
        while not pool.slots.acquire(timeout=_POLL):
            if request.cancel.is_set():
                return self._not_started(started_at, "cancelled before it started", cancelled=True)
        try:
            deadline = self._clock.monotonic() + options.connect_timeout.total_seconds()
            try:
                conn, channel = self._open_channel(pool, deadline, request.cancel)
            except SSHError as e:
                log.warning("run %s: %s: %s", request.run_id, target, e)
                return self._not_started(started_at, f"{target}: {e}")
            try:
                return self._run_on(pool, channel, request, started_at)
            finally:
                channel.close()
                self._release(pool, conn)
        finally:
            pool.slots.release()

    def _not_started(
        self, started_at: datetime, reason: str, cancelled: bool = False
    ) -> RunOutcome:
        return RunOutcome(
            ok=False,
            exit_code=None,
            started_at=started_at,
            ended_at=self._clock.now(),
            reason=reason,
            not_started=True,
            cancelled=cancelled,
        )

    def _run_on(
        self, pool: _Pool, channel: paramiko.Channel, request: RunRequest, started_at: datetime
    ) -> RunOutcome:
        out = BoundedBuffer(request.max_output_bytes)
        err = BoundedBuffer(request.max_output_bytes)
        preamble = bytearray()  # stderr until the pid line is complete
        pid: int | None = None
        timeout = request.timeout.total_seconds() if request.timeout else None
        began = self._clock.monotonic()
        deadline = began + timeout if timeout is not None else None
        timed_out = cancelled = False
        stop_by: float | None = None  # after a kill: how long to wait for the end
        lost = ""
        try:
            channel.exec_command("exec /bin/sh -s")
            channel.sendall(remote_script(request))
            channel.shutdown_write()
        except (paramiko.SSHException, EOFError, OSError) as e:
            return self._not_started(started_at, f"ssh: starting the command failed: {e}")
        fd = channel.fileno()
        exited_at: float | None = None
        while True:
            select.select([fd], [], [], _POLL)
            while channel.recv_ready():
                out.feed(channel.recv(_READ_SIZE))
            while channel.recv_stderr_ready():
                data = channel.recv_stderr(_READ_SIZE)
                if pid is None and data:
                    preamble += data
                    line, sep, rest = bytes(preamble).partition(b"\n")
                    if not sep and len(preamble) < 64:
                        continue
                    if line.startswith(PID_MARKER) and line[len(PID_MARKER) :].isdigit():
                        pid = int(line[len(PID_MARKER) :])
                        err.feed(rest)
                    else:
                        pid = 0  # not our script's first line: keep everything
                        err.feed(bytes(preamble))
                    preamble.clear()
                elif data:
                    err.feed(data)
            now = self._clock.monotonic()
            if (
                channel.eof_received
                and not channel.recv_ready()
                and not channel.recv_stderr_ready()
            ):
                break
            if channel.exit_status_ready():
                exited_at = exited_at or now
                if now - exited_at > self._output_grace:
                    break  # a background process holds the output open: stop reading
            if channel.closed or not channel.get_transport().is_active():
                lost = "the connection to the node was lost"
                break
            if stop_by is not None:
                if now > stop_by:
                    break
                continue
            if deadline is not None and now >= deadline:
                timed_out = True
            elif request.cancel.is_set():
                cancelled = True
            if timed_out or cancelled:
                self._kill(pool, pid, request)
                stop_by = now + self._kill_grace + 2.0
        if not lost and not channel.status_event.wait(
            self._output_grace if stop_by is None else 0.5
        ):
            lost = "" if stop_by is not None else "no exit status from the node"
        if not timed_out and not cancelled and exited_at is not None and not channel.eof_received:
            self._kill(pool, pid, request)  # the leftovers that held the output open
        exit_code = (
            channel.exit_status
            if channel.exit_status_ready() and channel.exit_status >= 0
            else None
        )
        if timed_out:
            assert request.timeout is not None
            reason = f"timed out after {format_duration(request.timeout)}"
        elif cancelled:
            reason = "cancelled"
        elif lost:
            reason = lost
        elif exit_code is None:
            reason = "killed by a signal"
        elif exit_code != 0:
            reason = f"exited with code {exit_code}"
        else:
            reason = ""
        stdout, out_cut = out.result()
        stderr, err_cut = err.result()
        return RunOutcome(
            ok=exit_code == 0 and not timed_out and not cancelled,
            exit_code=None if (timed_out or cancelled) and exit_code is None else exit_code,
            started_at=started_at,
            ended_at=self._clock.now(),
            stdout=stdout,
            stderr=stderr,
            output_truncated=out_cut or err_cut,
            reason=reason,
            timed_out=timed_out,
            cancelled=cancelled,
        )

    def _kill(self, pool: _Pool, pid: int | None, request: RunRequest) -> None:
        """Kill the run's remote process group through a channel of its own."""
        if not pid:
            log.warning("run %s: its remote pid is unknown; closing its channel", request.run_id)
            return
        deadline = self._clock.monotonic() + pool.options.connect_timeout.total_seconds()
        try:
            conn, channel = self._open_channel(pool, deadline, threading.Event())
        except SSHError as e:
            log.warning("run %s: cannot kill remote process group %d: %s", request.run_id, pid, e)
            return
        try:
            channel.exec_command(kill_script(pid, self._kill_grace))
            channel.shutdown_write()
            channel.status_event.wait(self._kill_grace + 5.0)
        except (paramiko.SSHException, EOFError, OSError) as e:
            log.warning(
                "run %s: killing remote process group %d failed: %s", request.run_id, pid, e
            )
        finally:
            with contextlib.suppress(Exception):
                channel.close()
            self._release(pool, conn)
