"""OpenSSH servers on loopback addresses, as separate "hosts", from Debian's ``openssh-server``.

Each host is a plain ``/usr/sbin/sshd -D -e -f sshd_config`` process (no init
scripts, no systemd) bound to its own loopback address (the whole of 127/8 is on
``lo`` on Linux: 127.0.0.2, 127.0.0.3, ... need no configuration), on the same
port (2222 by default, so that it never meets a system sshd on port 22). Each has
its own directory ``DIR/<address>/`` holding ``sshd_config``, its ed25519 host key,
``sshd.pid`` and ``sshd.log``. One client key pair (``DIR/client/id_ed25519``) is
authorized on all of them (``DIR/client/authorized_keys``), and ``DIR/known_hosts``
lists every host's key as ``[127.0.0.2]:2222 ssh-ed25519 AAAA...``.

sshd must run as root here (privilege separation, logging in as root); its config
has no ``AcceptEnv``: a client cannot pass environment variables.

As a script (stdlib only)::

    python deploy/services/sshd.py start|stop|status [--dir DIR] [--port 2222]
        [--addresses 127.0.0.2,127.0.0.3,127.0.0.4]

As a module, :class:`SSHServers` is what the integration fixtures use.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy.services.common import (
    apt_install,
    descendants,
    parents,
    pid_alive,
    port_is_free,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "var" / "services" / "sshd"
DEFAULT_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
DEFAULT_PORT = 2222
DEFAULT_USER = "root"
PACKAGE = "openssh-server"
SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
# sshd refuses to start without its privilege separation directory (Debian's init
# script and systemd unit create it; we run neither).
PRIVSEP_DIR = Path("/run/sshd")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# The PidFile of Debian's own sshd (the one the package would start on port 22).
SYSTEM_PID_FILE = Path("/run/sshd.pid")
MAX_SESSIONS = 10
BANNER_PREFIX = b"SSH-2.0-"

SSHD_CONFIG = """\
# Written by deploy/services/sshd.py: a test "host" on {address}:{port}.
ListenAddress {address}:{port}
AddressFamily inet
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
X11Forwarding no
# Channels per connection: an opening beyond it fails (ChannelException 2).
MaxSessions {max_sessions}
# Tests may open many connections at once: no early random drops (default 10:30:100).
MaxStartups 100:30:200
LogLevel VERBOSE
# No AcceptEnv (clients cannot pass variables) and no Subsystem (no sftp).
"""
# Debian's bash runs /etc/bash.bashrc and ~/.bashrc for a command that sshd starts,
# but only in a top-level shell (SHLVL < 2 once bash has counted itself). Sessions see
# SHLVL=1, so ``bash -c CMD`` counts 2 and skips them: root's ~/.bashrc on the
# project's machines (pyenv init) costs ~0.45 s of CPU per command.
SKIP_BASHRC = "SetEnv SHLVL=1\n"


class SSHServersError(RuntimeError):
    """The servers could not be installed, started or stopped as asked."""


def _say(message: str) -> None:
    print(f"sshd: {message}", flush=True)


# -- small process and network helpers ------------------------------------------------


def ssh_banner(address: str, port: int, timeout: float = 1.0) -> str | None:
    """The server's identification line (``SSH-2.0-OpenSSH_9.2p1 ...``), None if none."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            if data.startswith(BANNER_PREFIX):
                # Answer in kind so that sshd logs a plain disconnect, not a bad banner.
                with contextlib.suppress(OSError):
                    sock.sendall(b"SSH-2.0-distcrond-probe\r\n")
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode(errors="replace") if line.startswith(BANNER_PREFIX) else None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass(frozen=True)
class RemoteProcess:
    """A process that an SSH session on one of the hosts started (see :func:`session_processes`)."""

    pid: int
    ppid: int
    args: str
    ssh_connection: str  # "CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT"


def session_processes(address: str, port: int) -> list[RemoteProcess]:
    """Live processes that sshd started for sessions on ``address:port``, and their children.

    All "hosts" are this machine, so this reads /proc (as ``ps -eo pid,args`` would) and
    keeps the processes whose environment holds ``SSH_CONNECTION=... ADDRESS PORT``: sshd
    sets it for the command of every session and descendants inherit it (unless a command
    clears its environment). sshd's own per-connection processes do not have it.
    """
    found: list[RemoteProcess] = []
    me = os.getpid()
    for pid, ppid in parents().items():
        if pid == me:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if not var.startswith(b"SSH_CONNECTION="):
                continue
            value = var.split(b"=", 1)[1].decode(errors="replace")
            fields = value.split()
            if len(fields) == 4 and fields[2] == address and fields[3] == str(port):
                args = " ".join(_cmdline(pid))
                if args:  # a process that just exited has an empty command line
                    found.append(RemoteProcess(pid, ppid, args, value))
            break
    return sorted(found, key=lambda p: p.pid)


# -- installing Debian's package ------------------------------------------------------


def _system_sshd_pid() -> int | None:
    """The pid of a system sshd (PidFile /run/sshd.pid), if one runs."""
    try:
        pid = int(SYSTEM_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and "sshd" in " ".join(_cmdline(pid)) else None


@contextlib.contextmanager
def _services_never_start() -> Iterator[None]:
    """A policy-rc.d that forbids starting services, for the duration of an install.

    An existing policy (Debian's docker images ship one that says 101, "forbidden") is
    left as it is; one created here is removed afterwards.
    """
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(
        "#!/bin/sh\n# deploy/services/sshd.py, during apt-get install\nexit 101\n"
    )
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def install() -> Path:
    """Make sure Debian's openssh-server is installed (without a system sshd left running).

    Installs with ``apt-get install openssh-server`` under a policy-rc.d that forbids
    starting services, so the package's own sshd on 0.0.0.0:22 does not start; should
    one have started all the same (a policy that allows it), it is stopped. Returns
    sshd's path.
    """
    if SSHD.exists():
        return SSHD
    _say(f"{SSHD} is missing: installing {PACKAGE} with apt-get")
    system_before = _system_sshd_pid()
    with _services_never_start():
        apt_install([PACKAGE], _say, SSHServersError)
    started = _system_sshd_pid()
    if started is not None and started != system_before:
        _say(f"stopping the system sshd (pid {started}) that the package started")
        _signal(started, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(started), 10.0):
            _signal(started, signal.SIGKILL)
    if not SSHD.exists():
        raise SSHServersError(f"after installing {PACKAGE}, still no {SSHD}")
    return SSHD


# -- the servers -----------------------------------------------------------------------


def _public_key(pub_file: Path) -> str:
    """``ssh-ed25519 AAAA...`` from a .pub file (its comment left off)."""
    key_type, blob = pub_file.read_text().split()[:2]
    return f"{key_type} {blob}"


def fingerprint(public_key: str) -> str:
    """``SHA256:...`` of an ``ssh-ed25519 AAAA...`` key, as ``ssh-keygen -lf`` prints it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def known_hosts_name(address: str, port: int) -> str:
    """How ssh and paramiko name a host in known_hosts: ``[addr]:port``, or ``addr`` on 22."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass(frozen=True)
class SSHHost:
    """Everything a client needs to reach one host, as root, by key, checking its host key."""

    address: str
    port: int
    user: str
    client_key: Path  # private key (mode 0600) authorized on every host
    known_hosts: Path  # a known_hosts file listing every host
    host_key: str  # the host's public key: "ssh-ed25519 AAAA..."
    fingerprint: str  # "SHA256:..." as ssh-keygen -lf prints it

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.address}"

    @property
    def known_hosts_line(self) -> str:
        return f"{known_hosts_name(self.address, self.port)} {self.host_key}"

    def node_file(self, roles: list[str] | None = None, **options: Any) -> dict[str, Any]:
        """A distcrond node file (as JSON data) for this host: SSH as this user, with the
        client key and known_hosts (roles: ``worker`` unless given); ``options`` go into
        its ``connection_options``."""
        return {
            "roles": ["worker"] if roles is None else roles,
            "connection_type": "ssh",
            "connection_options": {
                "ssh_user": self.user,
                "ssh_host": f"{self.address}:{self.port}",
                "ssh_private_key_file": str(self.client_key),
                "ssh_known_hosts_file": str(self.known_hosts),
                **options,
            },
        }

    def ssh_command(self, *remote: str, known_hosts: Path | None = None) -> list[str]:
        """An OpenSSH ``ssh`` command line that runs ``remote`` on this host.

        It reads no user or system ssh config, offers only the client key and refuses a
        host whose key is not the one in ``known_hosts`` (default: the true one).
        """
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=5",
            "-p",
            str(self.port),
            self.destination,
            *remote,
        ]


class SSHServers:
    """One sshd per loopback address in ``addresses``, all on ``port``, for logins as ``user``.

    Host ``address`` lives in ``root/<address>``. ``start()`` is idempotent: hosts already
    running are kept. Keys are made once and kept across restarts (known_hosts stays valid).

    Unless ``source_bashrc``, the shell that runs a command skips the bashrc files (see
    ``SKIP_BASHRC``): commands see sshd's own PATH and environment, plus ``SHLVL=2``.
    """

    def __init__(
        self,
        root: Path = DEFAULT_DIR,
        addresses: Sequence[str] = DEFAULT_ADDRESSES,
        port: int = DEFAULT_PORT,
        user: str = DEFAULT_USER,
        source_bashrc: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("no addresses")
        for address in addresses:
            if not ipaddress.ip_address(address).is_loopback:
                raise ValueError(f"{address} is not a loopback address")
        self.root = Path(root).resolve()
        if any(ch.isspace() for ch in str(self.root)):
            raise ValueError(f"sshd_config cannot name a path with spaces: {self.root}")
        self.addresses = tuple(addresses)
        self.port = port
        self.user = user
        self.source_bashrc = source_bashrc
        self._sshd: Path | None = None
        # sshd masters started by this object, so that they can be reaped when stopped.
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- layout ---------------------------------------------------------------------

    def _check(self, address: str) -> str:
        if address not in self.addresses:
            raise SSHServersError(f"{address} is not one of {list(self.addresses)}")
        return address

    def host_dir(self, address: str) -> Path:
        return self.root / self._check(address)

    def config_file(self, address: str) -> Path:
        return self.host_dir(address) / "sshd_config"

    def host_key_file(self, address: str) -> Path:
        """The host's private key (its public half is next to it, ``.pub``)."""
        return self.host_dir(address) / "ssh_host_ed25519_key"

    def pid_file(self, address: str) -> Path:
        return self.host_dir(address) / "sshd.pid"

    def log_file(self, address: str) -> Path:
        return self.host_dir(address) / "sshd.log"

    @property
    def client_key(self) -> Path:
        """The tests' private key (ed25519, mode 0600); ``.pub`` next to it."""
        return self.root / "client" / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "client" / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file with every host: ``[127.0.0.2]:2222 ssh-ed25519 AAAA...``."""
        return self.root / "known_hosts"

    # -- keys and configs -------------------------------------------------------------

    def install(self) -> None:
        """Install Debian's openssh-server if missing."""
        self._sshd = install()

    @staticmethod
    def _keygen(path: Path, comment: str) -> None:
        if path.exists() and path.with_suffix(".pub").exists():
            return
        path.unlink(missing_ok=True)
        path.with_suffix(".pub").unlink(missing_ok=True)
        cmd = [SSH_KEYGEN, "-q", "-N", "", "-t", "ed25519", "-C", comment, "-f", str(path)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SSHServersError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
        path.chmod(0o600)

    def prepare(self) -> None:
        """Make the keys that are missing; write authorized_keys, known_hosts, sshd_configs."""
        self.client_key.parent.mkdir(parents=True, exist_ok=True)
        self._keygen(self.client_key, "distcrond-tests")
        client_pub = _public_key(self.client_key.with_suffix(".pub"))
        self.authorized_keys.write_text(f"{client_pub} distcrond-tests\n")
        for address in self.addresses:
            self.host_dir(address).mkdir(parents=True, exist_ok=True)
            self._keygen(self.host_key_file(address), f"host@{address}")
            self.config_file(address).write_text(
                SSHD_CONFIG.format(
                    address=address,
                    port=self.port,
                    host_key=self.host_key_file(address),
                    pid_file=self.pid_file(address),
                    authorized_keys=self.authorized_keys,
                    user=self.user,
                    max_sessions=MAX_SESSIONS,
                )
                + ("" if self.source_bashrc else SKIP_BASHRC)
            )
        self.known_hosts.write_text(
            "".join(self.known_hosts_line(a) + "\n" for a in self.addresses)
        )

    def host_key(self, address: str) -> str:
        """The host's public key, ``ssh-ed25519 AAAA...``."""
        return _public_key(self.host_key_file(address).with_suffix(".pub"))

    def fingerprint(self, address: str) -> str:
        """The host key's ``SHA256:...`` fingerprint (as ``ssh-keygen -lf`` prints it)."""
        return fingerprint(self.host_key(address))

    def known_hosts_line(self, address: str) -> str:
        return f"{known_hosts_name(address, self.port)} {self.host_key(address)}"

    def host(self, address: str) -> SSHHost:
        return SSHHost(
            address=self._check(address),
            port=self.port,
            user=self.user,
            client_key=self.client_key,
            known_hosts=self.known_hosts,
            host_key=self.host_key(address),
            fingerprint=self.fingerprint(address),
        )

    @property
    def hosts(self) -> list[SSHHost]:
        return [self.host(address) for address in self.addresses]

    # -- processes --------------------------------------------------------------------

    def pid(self, address: str) -> int | None:
        """The live sshd of ``address`` (started here, or found by its pid file), else None."""
        proc = self._children.get(address)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            del self._children[address]
        try:
            pid = int(self.pid_file(address).read_text().strip())
        except (OSError, ValueError):
            return None
        # The listener rewrites its title ("sshd: /usr/sbin/sshd -D -e -f CONFIG [listener]
        # ..."), so the config's path is looked for in the whole command line.
        if pid_alive(pid) and str(self.config_file(address)) in " ".join(_cmdline(pid)):
            return pid
        # A stale pid file (or a recycled pid): not ours.
        self.pid_file(address).unlink(missing_ok=True)
        return None

    def running(self) -> list[str]:
        return [address for address in self.addresses if self.pid(address) is not None]

    def serving(self, address: str) -> bool:
        """True if ``address:port`` answers with an SSH-2.0 banner."""
        return ssh_banner(self._check(address), self.port) is not None

    def start_server(self, address: str, timeout: float = 15.0, wait: bool = True) -> None:
        """Start the host's sshd unless it runs; with ``wait``, until it answers SSH."""
        if self.pid(address) is None:
            self._spawn(address)
        if wait:
            self.wait_serving([address], timeout)

    def _spawn(self, address: str) -> None:
        if not port_is_free(self.port, address):
            raise SSHServersError(
                f"{address}:{self.port} is taken by another process (not by our sshd)"
            )
        if self._sshd is None:
            self._sshd = install()
        if not self.config_file(address).exists():
            self.prepare()
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        config = str(self.config_file(address))
        check = subprocess.run(
            [str(self._sshd), "-t", "-f", config], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise SSHServersError(
                f"sshd -t -f {config} rejects the config:\n{check.stderr.strip()}"
            )
        cmd = [str(self._sshd), "-D", "-e", "-f", config]
        with open(self.log_file(address), "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=self.host_dir(address),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[address] = proc
        # sshd writes its PidFile itself once it listens; the Popen handle covers until then.

    def stop_server(self, address: str, drop_sessions: bool = True, timeout: float = 10.0) -> None:
        """Stop the host's sshd, so that new connections are refused.

        With ``drop_sessions`` (the default, like a host going down) its open connections
        and the commands they run are killed too; without, they carry on (sshd's own
        behaviour on SIGTERM) until they end.
        """
        pid = self.pid(address)
        if pid is not None:
            if drop_sessions:
                self._drop_sessions(address, pid)
            _signal(pid, signal.SIGTERM)
            _signal(pid, signal.SIGCONT)
            if not wait_until(lambda: self._gone(address, pid), timeout):
                _signal(pid, signal.SIGKILL)
                if not wait_until(lambda: self._gone(address, pid), 5.0):
                    raise SSHServersError(f"sshd for {address} (pid {pid}) did not exit")
            self.pid_file(address).unlink(missing_ok=True)
        if drop_sessions:  # orphans of dropped clients, or of a stop without dropping
            self.kill_remote_processes(address)

    def _drop_sessions(self, address: str, master: int) -> None:
        """Kill the master's per-connection sshd processes and everything they started.

        The master is stopped first so that it forks nothing new, then its descendants
        (each connection is its own session, so no process group covers them) are
        stopped until none is left running, then all are killed.
        """
        _signal(master, signal.SIGSTOP)
        frozen: list[int] = []
        for _ in range(50):
            new = [pid for pid in descendants(master) if pid not in frozen]
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            frozen.extend(new)
        frozen.extend(p.pid for p in self.remote_processes(address) if p.pid not in frozen)
        self._kill_all(frozen)

    @staticmethod
    def _kill_all(pids: list[int]) -> None:
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5.0)

    def _gone(self, address: str, pid: int) -> bool:
        proc = self._children.get(address)
        if proc is not None and proc.pid == pid:
            if proc.poll() is None:
                return False
            del self._children[address]
            return True
        return not pid_alive(pid)

    def remote_processes(self, address: str) -> list[RemoteProcess]:
        """Processes that sessions on this host started (see :func:`session_processes`)."""
        return session_processes(self._check(address), self.port)

    def kill_remote_processes(self, address: str) -> list[RemoteProcess]:
        """SIGKILL every process that sessions on this host started; return them.

        OpenSSH's sshd does not signal a command run without a pty when its client goes
        away: the command carries on, orphaned. Tests clean up after such commands here.
        """
        found = self.remote_processes(address)
        self._kill_all([p.pid for p in found])
        return found

    # -- all hosts --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Install if needed, start every host not running, wait until all answer SSH."""
        running = self.running()
        if len(running) == len(self.addresses) and all(map(self.serving, self.addresses)):
            _say(f"already running: {self.describe()}")
            return
        to_start = [a for a in self.addresses if a not in running]
        taken = [f"{a}:{self.port}" for a in to_start if not port_is_free(self.port, a)]
        if taken:
            raise SSHServersError(f"{', '.join(taken)} taken by other processes")
        self.install()
        self.prepare()
        started = time.monotonic()
        try:
            for address in to_start:
                self._spawn(address)
            self.wait_serving(self.addresses, timeout)
        except SSHServersError:
            for address in to_start:  # leave nothing half-started; the logs stay
                self.stop_server(address)
            raise
        took = time.monotonic() - started
        _say(f"{len(to_start)} sshd started in {took:.2f}s: {self.describe()}")

    def stop(self) -> None:
        """Stop every host and drop its sessions (those already stopped are skipped)."""
        for address in self.addresses:
            self.stop_server(address)

    def describe(self) -> str:
        return ", ".join(f"{a}:{self.port}" for a in self.addresses)

    def wait_serving(self, addresses: Iterable[str], timeout: float = 15.0) -> None:
        """Wait until the given hosts answer SSH; fail with their log tails."""
        wanted = list(addresses)

        def ready() -> bool:
            dead = [a for a in wanted if self.pid(a) is None]
            if dead:
                raise SSHServersError(f"sshd for {dead} exited\n{self.log_tails(dead)}")
            return all(self.serving(a) for a in wanted)

        if not wait_until(ready, timeout):
            raise SSHServersError(
                f"sshd for {wanted} not answering after {timeout}s\n{self.log_tails(wanted)}"
            )

    def log_tail(self, address: str, lines: int = 20) -> str:
        try:
            tail = self.log_file(address).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log)"]
        return f"--- {self.log_file(address)} (last {lines} lines)\n" + "\n".join(tail)

    def log_tails(self, addresses: Iterable[str], lines: int = 20) -> str:
        return "\n".join(self.log_tail(a, lines) for a in addresses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: %(default)s")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--addresses", default=",".join(DEFAULT_ADDRESSES), help="default: %(default)s"
    )
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--timeout", type=float, default=30.0, help="start deadline, seconds")
    args = parser.parse_args(argv)
    try:
        servers = SSHServers(args.dir, args.addresses.split(","), args.port, args.user)
        if args.command == "start":
            servers.start(timeout=args.timeout)
            first = servers.host(servers.addresses[0])
            _say("try: " + " ".join(first.ssh_command("'echo $SSH_CONNECTION'")))
        elif args.command == "stop":
            servers.stop()
            _say(f"stopped ({args.dir})")
        else:
            serving = {}
            for address in servers.addresses:
                pid = servers.pid(address)
                serving[address] = servers.serving(address)
                state = "serving" if serving[address] else ("not serving" if pid else "stopped")
                _say(f"{address}:{servers.port} pid={pid or '-'} {state}")
            return 0 if all(serving.values()) else 3
    except (SSHServersError, ValueError) as e:
        print(f"sshd: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
