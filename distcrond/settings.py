"""A peer's settings, from flags and DISTCRON_* environment variables (see cli.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    jobs_dir: Path = Path("/etc/distcron/jobs.d")
    nodes_dir: Path = Path("/etc/distcron/nodes.d")
    state_dir: Path = Path("/var/lib/distcron")
    bind: str = "127.0.0.1:8080"
    peer_id: str = socket.gethostname()
    api_workers: int = 2
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    # Reports go to Elasticsearch when es_urls is set (a later issue), else to SQLite.
    es_urls: tuple[str, ...] = ()
    # Coordination goes to ZooKeeper when set (a later issue), else to SQLite.
    zookeeper: str | None = None
    max_concurrent_runs: int = 256
    run_retention_hours: float = 24.0

    @property
    def coordination_db(self) -> Path:
        return self.state_dir / "coordination.sqlite3"

    @property
    def reports_db(self) -> Path:
        return self.state_dir / "reports.sqlite3"

    @property
    def api_url(self) -> str:
        return f"http://{self.bind}"
