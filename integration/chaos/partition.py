"""Network partitions of one peer on loopback: a cgroup v2 per peer, nftables rules on it.

Each peer's daemon is moved into its own cgroup (``<cgroup2 mount>/distcron-chaos-<pid>-<peer>``)
right after it is spawned, before it opens any socket: a socket belongs to the cgroup
of the process that created it, so every socket of the daemon, its API process and
its job shells is in that cgroup. :meth:`Partitioner.cut` adds two rules to our own
table ``inet distcron_chaos``: on output, packets of sockets in that cgroup to the
ZooKeeper client ports and the other peers' API ports are dropped; on input, packets
from those ports to such sockets are dropped (``socket cgroupv2 level 1 "<path>"``:
nft names the cgroup relative to ``/sys/fs/cgroup``). :meth:`heal` flushes the
rules. :meth:`verify` proves the mechanism on a probe connection before it is used.
:meth:`close` deletes the table and the cgroups (moving what is left to the root
cgroup); it is safe to call twice and is called at exit whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

CGROUP2 = Path("/sys/fs/cgroup/unified")
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")  # nft resolves cgroupv2 paths from here
TABLE = "distcron_chaos"


class PartitionError(RuntimeError):
    """The partition mechanism is not available or does not work here."""


def nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nft", *args], input=stdin, capture_output=True, text=True, check=False, timeout=10
    )


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (the hybrid ``unified`` mount, or ``/sys/fs/cgroup``)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise PartitionError("no cgroup2 file system is mounted")


class Partitioner:
    """One cgroup per peer, and the nft table that cuts a peer's cgroup off."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.mount = cgroup2_mount()
        if not self.mount.is_relative_to(NFT_CGROUP_BASE):
            raise PartitionError(f"cgroup2 at {self.mount}: nft cannot name its cgroups")
        self.prefix = f"distcron-chaos-{os.getpid()}"
        self.ports = sorted(set(ports))
        self.cgroups: dict[str, Path] = {}
        self.cut_peers: set[str] = set()

    def setup(self) -> None:
        """Create our table (an old one of this name, from a crashed run, is replaced)."""
        nft("delete", "table", "inet", TABLE)
        script = (
            f"table inet {TABLE} {{\n"
            "  chain out { type filter hook output priority 0; policy accept; }\n"
            "  chain in { type filter hook input priority 0; policy accept; }\n"
            "}\n"
        )
        result = nft("-f", "-", stdin=script)
        if result.returncode != 0:
            raise PartitionError(f"nft could not create table {TABLE}: {result.stderr}")

    def cgroup(self, name: str) -> Path:
        """The cgroup of ``name`` (created on first use)."""
        if name not in self.cgroups:
            path = self.mount / f"{self.prefix}-{name}"
            path.mkdir(exist_ok=True)
            self.cgroups[name] = path
        return self.cgroups[name]

    def attach(self, name: str, pids: Iterable[int]) -> None:
        """Move processes into ``name``'s cgroup (those gone meanwhile are skipped)."""
        procs = self.cgroup(name) / "cgroup.procs"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, OSError):
                procs.write_text(f"{pid}\n")

    def members(self, name: str) -> list[int]:
        text = (self.cgroup(name) / "cgroup.procs").read_text()
        return [int(x) for x in text.split()]

    def _match(self, name: str) -> str:
        path = self.cgroup(name).relative_to(NFT_CGROUP_BASE)
        level = len(self.cgroup(name).relative_to(self.mount).parts)
        return f'socket cgroupv2 level {level} "{path}"'

    def cut(self, name: str, ports: Iterable[int] | None = None) -> None:
        """Drop ``name``'s traffic to and from ``ports`` (default: the ports given at start)."""
        wanted = sorted(set(ports if ports is not None else self.ports))
        port_set = "{ " + ", ".join(str(p) for p in wanted) + " }"
        match = self._match(name)
        for chain, field in (("out", "dport"), ("in", "sport")):
            rule = f"{match} tcp {field} {port_set} counter drop"
            result = nft("add", "rule", "inet", TABLE, chain, *rule.split(" "))
            if result.returncode != 0:
                raise PartitionError(f"nft add rule {rule!r} failed: {result.stderr}")
        self.cut_peers.add(name)

    def heal(self) -> None:
        """Remove every cut (the table and its chains stay)."""
        for chain in ("out", "in"):
            nft("flush", "chain", "inet", TABLE, chain)
        self.cut_peers.clear()

    def counters(self) -> str:
        return nft("list", "table", "inet", TABLE).stdout

    def verify(self) -> None:
        """A probe process in a cgroup of its own connects to a listener of ours: it must
        connect without a cut and time out with one; PartitionError otherwise."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = int(listener.getsockname()[1])
            if not self._probe(port):
                raise PartitionError("probe could not connect with no cut")
            self.cut("probe", [port])
            try:
                if self._probe(port):
                    raise PartitionError("probe still connects through the cut")
            finally:
                self.heal()

    def _probe(self, port: int) -> bool:
        procs = self.cgroup("probe") / "cgroup.procs"
        code = (
            "import socket,sys\n"
            f"open({str(procs)!r},'w').write(str(__import__('os').getpid()))\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1',{port}),timeout=1.5).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], check=False, timeout=15)
        return result.returncode == 0

    def close(self) -> None:
        """Delete the table and the cgroups (their processes go back to the root cgroup)."""
        nft("delete", "table", "inet", TABLE)
        root = self.mount / "cgroup.procs"
        for path in self.cgroups.values():
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        root.write_text(f"{pid}\n")
            with contextlib.suppress(OSError):
                path.rmdir()
        self.cgroups.clear()
