"""A peer's settings, from flags and DISTCRON_* environment variables (see cli.py)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

ZK_AUTH_ENV = "DISTCRON_ZK_AUTH"
ES_PASSWORD_ENV = "DISTCRON_ES_PASSWORD"
ES_API_KEY_ENV = "DISTCRON_ES_API_KEY"
# Settings that are secrets: never in to_json (the API process gets that on argv, which ps
# shows); the daemon hands them to its API process through these environment variables.
SECRET_ENV = {"zk_auth": ZK_AUTH_ENV, "es_password": ES_PASSWORD_ENV, "es_api_key": ES_API_KEY_ENV}
SMTP_PASSWORD_ENV = "DISTCRON_SMTP_PASSWORD"
TOKEN_ENV = "DISTCRON_TOKEN"
# Bind addresses that mean "every interface": no other peer can connect to them.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """Whether a host (a --bind host, a Host header's) is a loopback address: ``localhost``,
    127.0.0.0/8, ``::1`` (brackets allowed) or an IPv4-mapped loopback; no other name is."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# Every environment variable that holds a secret of the daemon: no run ever gets one of
# them (see distcrond/execution/environment.py). A new secret's variable joins this tuple.
SECRET_ENV_NAMES: tuple[str, ...] = (
    ZK_AUTH_ENV,
    ES_PASSWORD_ENV,
    ES_API_KEY_ENV,
    SMTP_PASSWORD_ENV,
    TOKEN_ENV,
)


@dataclass(frozen=True)
class Settings:
    jobs_dir: Path = Path("/etc/distcron/jobs.d")
    nodes_dir: Path = Path("/etc/distcron/nodes.d")
    state_dir: Path = Path("/var/lib/distcron")
    bind: str = "127.0.0.1:8080"
    peer_id: str = socket.gethostname()
    api_workers: int = 2
    # Threads of each API worker (gunicorn's gthread): a worker takes at most this many
    # connections at once, so workers x threads clients may be served (or be slow) at once.
    api_threads: int = 16
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    # Reports go to Elasticsearch when es_urls is set (through the spool), else to SQLite.
    es_urls: tuple[str, ...] = ()
    es_index_prefix: str = "distcron-runs-"
    es_index_period: str = "month"  # month | day: one index per period of the run's slot
    es_username: str | None = None
    es_password: str | None = None  # secret
    es_api_key: str | None = None  # secret
    es_ca_certs: str | None = None
    es_verify_certs: bool = True
    # Coordination goes to ZooKeeper when set (cluster mode), else to SQLite.
    zookeeper: str | None = None
    zk_root: str = "/distcron"
    # Also the failover time after a crash: a dead leader's session must expire first.
    zk_session_timeout: float = 4.0
    # A leader whose scheduler completes no pass for this long resigns (and health is 503).
    leader_stall_timeout: float = 5.0
    # "user:password" for ZooKeeper digest auth; never in to_json (it would show in ps).
    zk_auth: str | None = None
    max_concurrent_runs: int = 256
    # Finished run records leave the coordination store after this (history stays in reports).
    run_retention_seconds: float = 900.0
    # ...and once more than this many are kept, the oldest go sooner: ZooKeeper holds its
    # data tree in memory, so a high run rate must not fill it with history.
    run_retention_count: int = 10_000
    # On SIGTERM, running runs get this long to finish before they are stopped.
    shutdown_grace: float = 10.0
    # Names (fnmatch globs, case-sensitive) left out of every run's environment, beyond
    # SECRET_ENV_NAMES and the nodes' ssh_key_passphrase_env.
    scrub_env: tuple[str, ...] = ()
    # The API URL this peer publishes (None: made from bind; see api_url).
    advertise_url: str | None = None
    # The API tokens file (see distcrond/config/tokens.py); None: the API is open, which the
    # daemon allows on a loopback --bind only, unless api_insecure.
    api_tokens: Path | None = None
    api_insecure: bool = False
    # Host names (or *.domain) the API answers to beyond its own and loopback: a load
    # balancer's name, say (see distcrond/api/hosts.py).
    api_allowed_hosts: tuple[str, ...] = ()
    # PEM files: the API is served over HTTPS (gunicorn's TLS) when both are given.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def coordination_db(self) -> Path:
        return self.state_dir / "coordination.sqlite3"

    @property
    def reports_db(self) -> Path:
        return self.state_dir / "reports.sqlite3"

    @property
    def spool_dir(self) -> Path:
        """Where reports wait for Elasticsearch (see distcrond/reporting/spool.py)."""
        return self.state_dir / "report-spool"

    @property
    def api_tokens_table(self) -> Path:
        """Where the daemon keeps the last good tokens table for its API workers."""
        return self.state_dir / "api-tokens.json"

    def secret_env(self) -> dict[str, str]:
        """The secrets that are set, as the environment variables that carry them."""
        return {env: str(getattr(self, f)) for f, env in SECRET_ENV.items() if getattr(self, f)}

    def with_secrets(self, environ: Mapping[str, str]) -> Settings:
        """These settings with the secrets read from ``environ`` (see :meth:`secret_env`)."""
        secrets: dict[str, Any] = {f: environ.get(env) or None for f, env in SECRET_ENV.items()}
        return replace(self, **secrets)

    @property
    def zk_credentials(self) -> tuple[str, str] | None:
        if not self.zk_auth:
            return None
        user, _, password = self.zk_auth.partition(":")
        return user, password

    @property
    def run_retention(self) -> timedelta:
        return timedelta(seconds=self.run_retention_seconds)

    @property
    def api_url(self) -> str:
        """The API's URL published to the other peers: ``--advertise-url``, else one made
        from ``--bind``, with this host's name for a wildcard address (0.0.0.0, ::), which
        no other peer can connect to."""
        if self.advertise_url:
            return self.advertise_url
        host, _, port = self.bind.rpartition(":")
        if host.strip("[]") in WILDCARD_HOSTS:
            host = socket.getfqdn()
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def tls(self) -> bool:
        """Whether the API is served over HTTPS."""
        return self.tls_cert is not None and self.tls_key is not None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict; passes settings to the API server process."""
        return {
            "jobs_dir": str(self.jobs_dir),
            "nodes_dir": str(self.nodes_dir),
            "state_dir": str(self.state_dir),
            "bind": self.bind,
            "peer_id": self.peer_id,
            "api_workers": self.api_workers,
            "api_threads": self.api_threads,
            "log_format": self.log_format,
            "log_level": self.log_level,
            "es_urls": list(self.es_urls),
            "es_index_prefix": self.es_index_prefix,
            "es_index_period": self.es_index_period,
            "es_username": self.es_username,
            "es_ca_certs": self.es_ca_certs,
            "es_verify_certs": self.es_verify_certs,
            "zookeeper": self.zookeeper,
            "zk_root": self.zk_root,
            "zk_session_timeout": self.zk_session_timeout,
            "leader_stall_timeout": self.leader_stall_timeout,
            "max_concurrent_runs": self.max_concurrent_runs,
            "run_retention_seconds": self.run_retention_seconds,
            "run_retention_count": self.run_retention_count,
            "shutdown_grace": self.shutdown_grace,
            "scrub_env": list(self.scrub_env),
            "api_tokens": str(self.api_tokens) if self.api_tokens else None,
            "api_insecure": self.api_insecure,
            "api_allowed_hosts": list(self.api_allowed_hosts),
            "advertise_url": self.advertise_url,
            "tls_cert": str(self.tls_cert) if self.tls_cert else None,
            "tls_key": str(self.tls_key) if self.tls_key else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(
            jobs_dir=Path(data["jobs_dir"]),
            nodes_dir=Path(data["nodes_dir"]),
            state_dir=Path(data["state_dir"]),
            bind=data["bind"],
            peer_id=data["peer_id"],
            api_workers=int(data["api_workers"]),
            api_threads=int(data.get("api_threads", 16)),
            log_format=data.get("log_format", "text"),
            log_level=data.get("log_level", "INFO"),
            es_urls=tuple(data.get("es_urls", ())),
            es_index_prefix=data.get("es_index_prefix", "distcron-runs-"),
            es_index_period=data.get("es_index_period", "month"),
            es_username=data.get("es_username"),
            es_ca_certs=data.get("es_ca_certs"),
            es_verify_certs=bool(data.get("es_verify_certs", True)),
            zookeeper=data.get("zookeeper"),
            zk_root=data.get("zk_root", "/distcron"),
            zk_session_timeout=float(data.get("zk_session_timeout", 4.0)),
            leader_stall_timeout=float(data.get("leader_stall_timeout", 5.0)),
            max_concurrent_runs=int(data.get("max_concurrent_runs", 256)),
            run_retention_seconds=float(data.get("run_retention_seconds", 900.0)),
            run_retention_count=int(data.get("run_retention_count", 10_000)),
            shutdown_grace=float(data.get("shutdown_grace", 10.0)),
            scrub_env=tuple(data.get("scrub_env", ())),
            api_tokens=Path(data["api_tokens"]) if data.get("api_tokens") else None,
            api_insecure=bool(data.get("api_insecure", False)),
            api_allowed_hosts=tuple(data.get("api_allowed_hosts", ())),
            advertise_url=data.get("advertise_url"),
            tls_cert=Path(data["tls_cert"]) if data.get("tls_cert") else None,
            tls_key=Path(data["tls_key"]) if data.get("tls_key") else None,
        )
