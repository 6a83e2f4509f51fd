"""What the service launchers (zookeeper.py, sshd.py, elasticsearch.py) share: ports,
processes from /proc, polling with a deadline, and installing Debian packages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``host:port`` can be bound (a listener on 0.0.0.0:port also takes it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (PID 1 here may never reap ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parents() -> dict[int, int]:
    """pid -> parent pid for every live process (zombies excluded), from /proc."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(entry)] = int(fields[1])
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_logged(cmd: list[str], say: Callable[[str], None]) -> subprocess.CompletedProcess[str]:
    say("running: " + " ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env, text=True, capture_output=True, check=False)


def apt_install(packages: list[str], say: Callable[[str], None], error: type[Exception]) -> None:
    """``apt-get install`` the packages (root only), updating the lists when needed; raises
    ``error`` with apt's output when it fails."""
    if os.geteuid() != 0:
        raise error(f"{' '.join(packages)} not installed and not root: install it with apt")
    if shutil.which("apt-get") is None:
        raise error(f"{' '.join(packages)} not installed and no apt-get on this machine")
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        # Wait for another apt (someone else's install) instead of failing at once.
        "-o",
        "DPkg::Lock::Timeout=300",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        *packages,
    ]
    # A fresh machine may have no package lists (or stale ones): update once and retry.
    if run_logged(["apt-cache", "show", packages[0]], say).returncode != 0:
        run_logged(["apt-get", "update", "-q"], say)
    result = run_logged(install, say)
    if result.returncode != 0:
        run_logged(["apt-get", "update", "-q"], say)
        result = run_logged(install, say)
    if result.returncode != 0:
        raise error(f"apt-get install failed:\n{result.stdout[-2000:]}{result.stderr}")
