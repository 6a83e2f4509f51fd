"""Real distcrond peers as subprocesses, for the integration tests and benchmarks.

A :class:`Peer` is the real `distcrond` console script (with its real gunicorn
API and real SQLite files) on a temporary config; tests talk to it only
through its HTTP API, its files, and signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

from deploy.services.common import descendants, pid_alive
from integration.tls import TLSFiles

T = TypeVar("T")
DISTCROND = str(Path(sys.executable).with_name("distcrond"))
DISTCRONCTL = str(Path(sys.executable).with_name("distcronctl"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the condition may fail while things start up
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}"
            )
        time.sleep(interval)


@dataclass
class Peer:
    """One distcrond daemon on a private config and state directory."""

    root: Path
    peer_id: str = "peer-a"
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # The API token its requests carry (a peer started with --api-tokens wants one).
    token: str | None = None
    # Given: the peer serves HTTPS with these files, and its requests trust their CA.
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        for d in (self.jobs_dir, self.nodes_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs.d"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes.d"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.peer_id}.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> str | bool:
        """What requests verifies an https answer against: the test CA."""
        return str(self.tls.ca) if self.tls else True

    def write_job(self, job_id: str, spec: dict[str, Any] | str) -> Path:
        """Write a job file atomically (as config sync tools do): temp file, then rename."""
        return self._write(self.jobs_dir, job_id, spec)

    def write_node(self, node_id: str, spec: dict[str, Any] | str) -> Path:
        return self._write(self.nodes_dir, node_id, spec)

    @staticmethod
    def _write(directory: Path, name: str, spec: dict[str, Any] | str) -> Path:
        path = directory / f"{name}.json"
        tmp = directory / f".{name}.json.tmp"
        tmp.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        tmp.rename(path)
        return path

    def start(self, wait: bool = True, leader: bool = True) -> Peer:
        """Start the daemon; with ``wait``, until its API answers (and, with ``leader``, until
        it says it leads: a standalone peer always does)."""
        argv = [
            DISTCROND,
            "--jobs-dir",
            str(self.jobs_dir),
            "--nodes-dir",
            str(self.nodes_dir),
            "--state-dir",
            str(self.state_dir),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--peer-id",
            self.peer_id,
            "--api-workers",
            "2",
            *self.extra_args,
        ]
        if self.tls:
            argv += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        if wait:
            self.wait_healthy(leader=leader)
        return self

    def wait_healthy(self, timeout: float = 20.0, leader: bool = True) -> dict[str, Any]:
        def healthy() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"distcrond exited with {self.proc.returncode}:\n{self.log()}")
            r = requests.get(
                f"{self.url}/api/v1/health", headers=self.headers, timeout=2, verify=self.verify
            )
            ok = r.status_code == 200 and (r.json().get("is_leader") or not leader)
            return r.json() if ok else None

        what = f"{self.peer_id} to be healthy" + (" and leader" if leader else "")
        return wait_for(healthy, timeout, what)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(
            f"{self.url}{path}", params=params, headers=self.headers, timeout=5, verify=self.verify
        )

    def post(self, path: str, body: Any = None) -> requests.Response:
        return requests.post(
            f"{self.url}{path}", json=body, headers=self.headers, timeout=5, verify=self.verify
        )

    def run_state(self, run_id: str) -> str | None:
        r = self.get(f"/api/v1/runs/{run_id}")
        return r.json().get("state") if r.status_code == 200 else None

    def wait_run(
        self, run_id: str, states: tuple[str, ...], timeout: float = 15.0
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            r = self.get(f"/api/v1/runs/{run_id}")
            body = r.json() if r.status_code == 200 else {}
            return body if body.get("state") in states else None

        return wait_for(reached, timeout, f"run {run_id} to reach {states}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        """SIGKILL the daemon and everything it started (a crashed host takes its runs too)."""
        assert self.proc is not None
        family = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not any(pid_alive(pid) for pid in family), 10, f"{self.peer_id} to die")

    def kill(self) -> None:
        """Stop everything this peer started, whatever state it is in (fixture teardown)."""
        if self.proc is None:
            return
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in family:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def ledger_lines(path: Path) -> list[list[str]]:
    """The complete lines a job appended to ``path``, split on spaces."""
    if not path.exists():
        return []
    text = path.read_text()
    return [line.split() for line in text.splitlines()[: text.count("\n")] if line.strip()]
