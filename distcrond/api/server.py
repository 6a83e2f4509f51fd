"""The API under gunicorn, in a process of its own.

The daemon spawns ``python -m distcrond.api.server --settings '<json>'
--parent-pid <pid>``. The gunicorn arbiter forks its workers and installs its
own signal handlers, which is why it does not live in the daemon process (the
daemon's kazoo and paramiko threads would not survive a fork). Each worker
opens its own stores after the fork (SQLite connections must not cross one),
shared by its threads: every store is thread-safe (docs/architecture.md).

The process ends with the daemon: SIGTERM from the daemon stops it gracefully,
and if the daemon dies without a word (kill -9) the kernel sends the SIGTERM
itself (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import falcon
from gunicorn.app.base import BaseApplication

from distcrond.api.app import create_app
from distcrond.api.auth import TokenSource
from distcrond.api.hosts import AllowedHosts
from distcrond.api.worker import BoundedThreadWorker
from distcrond.coordination.base import CoordinationStore
from distcrond.logs import configure_logging, logging_config
from distcrond.reporting.base import ReportStore
from distcrond.settings import Settings
from distcrond.stores import open_coordination, open_reports

# Not __name__: under "python -m" that is "__main__".
log = logging.getLogger("distcrond.api.server")

PR_SET_PDEATHSIG = 1


class APIServer(BaseApplication):
    """gunicorn embedded (as in its examples/standalone_app.py), serving :func:`create_app`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stores: list[CoordinationStore | ReportStore] = []
        super().__init__()

    def gunicorn_options(self) -> dict[str, Any]:
        threads = self.settings.api_threads
        return {
            "bind": self.settings.bind,
            "workers": self.settings.api_workers,
            # gthread, bounded (see worker.py): a slow client holds one thread for at most
            # REQUEST_TIMEOUT, never a whole worker.
            "worker_class": BoundedThreadWorker,
            "threads": threads,
            # A worker accepts no more connections than it has threads: an accepted
            # connection never queues behind slow ones for a thread; the others wait in the
            # listen backlog for a worker with one free.
            "worker_connections": threads,
            # No keep-alive: an idle connection would count against worker_connections
            # (distcronctl and health checks make one request per connection anyway).
            "keepalive": 0,
            # HTTP/1.1 only (gunicorn's default, pinned): the request deadline is per
            # connection, and an HTTP/2 connection carries many requests for long.
            "http_protocols": "h1",
            # The arbiter restarts a worker whose main loop is silent this long.
            "timeout": 30,
            "graceful_timeout": 5,
            # A request head is at most 4 KiB of request line and 50 fields of 8 KiB: what
            # one slow client can make a worker hold.
            "limit_request_line": 4094,
            "limit_request_fields": 50,
            "limit_request_field_size": 8190,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": self.settings.log_level.lower(),
            # Stores are opened in each worker (load), never in the arbiter before the fork.
            "preload_app": False,
            "proc_name": f"distcrond-api[{self.settings.peer_id}]",
            "worker_exit": self._worker_exit,
            # gunicorn >= 25 opens a control socket at one fixed path per user: several
            # peers on one host would fight over it, and nothing here uses it.
            "control_socket_disable": True,
            # gunicorn's own messages go through the root handler configure_logging set
            # up, so that --log-format json makes every line of the peer JSON.
            "logconfig_dict": logging_config(self.settings.log_format, self.settings.log_level),
        }

    def tls_options(self) -> dict[str, Any]:
        """HTTPS by gunicorn itself (its certfile and keyfile), when the flags give files."""
        if not self.settings.tls:
            return {}
        return {"certfile": str(self.settings.tls_cert), "keyfile": str(self.settings.tls_key)}

    def load_config(self) -> None:
        for key, value in (self.gunicorn_options() | self.tls_options()).items():
            if key in self.cfg.settings:  # options an older gunicorn lacks are skipped
                self.cfg.set(key, value)

    def load(self) -> falcon.App:
        # Runs in the worker, after the fork.
        coordination = open_coordination(self.settings)
        reports = open_reports(self.settings)
        self._stores = [coordination, reports]
        spool_dir = self.settings.spool_dir if self.settings.es_urls else None
        tokens = TokenSource(self.settings.api_tokens_table) if self.settings.api_tokens else None
        return create_app(
            coordination,
            reports,
            self.settings.peer_id,
            spool_dir=spool_dir,
            stall_timeout=self.settings.leader_stall_timeout,
            tokens=tokens,
            hosts=AllowedHosts.of(self.settings),
        )

    def _worker_exit(self, server: Any, worker: Any) -> None:
        for store in self._stores:
            try:
                store.close()
            except Exception:
                log.warning("closing the %s store failed", store.backend, exc_info=True)
        self._stores = []


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux only; else nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distcrond.api.server", description="Serve the distcrond API under gunicorn."
    )
    parser.add_argument("--settings", required=True, help="Settings.to_json() as a JSON string")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit at once unless this is still the parent's pid (the daemon's)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    # First of all: die with the daemon, then check it did not die before we could ask.
    die_with_parent()
    args = parse_args(argv)
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        sys.stderr.write(f"distcrond API: parent {args.parent_pid} is gone; exiting\n")
        sys.exit(1)
    settings = Settings.from_json(json.loads(args.settings))
    settings = settings.with_secrets(os.environ)
    configure_logging(settings.log_format, settings.log_level)
    log.info(
        "serving the API on %s://%s with %d workers of %d threads",
        "https" if settings.tls else "http",
        settings.bind,
        settings.api_workers,
        settings.api_threads,
    )
    APIServer(settings).run()


if __name__ == "__main__":
    main()
