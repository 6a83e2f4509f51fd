"""The API server as a child process of the daemon, kept alive.

gunicorn's arbiter forks workers and installs signal handlers, and the
daemon's kazoo/paramiko/watchdog threads would not survive a fork, so the API
runs in its own process (``python -m distcrond.api.server``), which reads the
stores and never the daemon's memory. The daemon restarts it if it dies.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from distcrond.settings import Settings

log = logging.getLogger("distcrond.api_process")


class APIStartError(Exception):
    """The API server exited at once (port in use, bad bind address...)."""


def _host_port(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def check_bindable(bind: str, patience: float = 5.0) -> None:
    """Fail fast, with the address, when the API address cannot be bound (in use, not local).

    An address in use is retried for ``patience`` seconds: after a crash, the previous
    API server may still be on its way out (it is told to stop when the daemon dies).
    """
    host, port = _host_port(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + patience
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            try:
                probe.bind((host, port))
                return
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise APIStartError(
                        f"cannot listen on {bind} for the API: {e.strerror}"
                    ) from None
        time.sleep(0.1)


def _accepting(bind: str) -> bool:
    host, port = _host_port(bind)
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class APIProcess:
    """Starts the API server and restarts it with backoff when it exits unexpectedly."""

    def __init__(self, settings: Settings, startup_timeout: float = 30.0) -> None:
        self._settings = settings
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "distcrond.api.server",
            "--settings",
            json.dumps(self._settings.to_json()),
            "--parent-pid",
            str(os.getpid()),
        ]
        # Secrets go by the environment, not argv (ps shows argv).
        env = dict(os.environ) | self._settings.secret_env()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises APIStartError when the address cannot be bound or the server exits or
        does not answer within the startup timeout.
        """
        check_bindable(self._settings.bind)
        proc = self._proc = self._spawn()
        deadline = time.monotonic() + self._startup_timeout
        while not _accepting(self._settings.bind):
            if proc.poll() is not None:
                raise APIStartError(
                    f"the API server on {self._settings.bind} exited at start with status "
                    f"{proc.returncode} (see the messages above)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise APIStartError(f"the API server did not answer on {self._settings.bind}")
            time.sleep(0.05)
        self._thread = threading.Thread(target=self._supervise, name="api-supervisor", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            while proc.poll() is None:
                if self._stop.wait(0.5):
                    return
            if self._stop.is_set():
                return
            log.error(
                "API server exited with status %s; restarting in %.0fs", proc.returncode, backoff
            )
            if self._stop.wait(backoff):
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            self._proc = self._spawn()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (gunicorn's graceful stop on SIGTERM, SIGKILL after ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("API server did not stop within %.0fs; killing it", timeout)
            proc.kill()
            proc.wait()
