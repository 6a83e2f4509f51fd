"""The `distcrond` command: flags, DISTCRON_* environment variables, and the original's aliases.

Every flag can also be set by an environment variable named in its help
(a flag on the command line wins). The original program's flags
(--jobsDirectory, --nodesDirectory, --esHost, --esPort) keep working.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import ssl
import stat
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from distcrond import __version__
from distcrond.logs import configure_logging
from distcrond.settings import Settings, is_loopback

log = logging.getLogger("distcrond")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"DISTCRON_{name}", default)


def _bind(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return value


def _advertise_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http(s) URL of this peer's API (e.g. http://cron-1:8080)"
        )
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
    return value.rstrip("/")


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def _seconds(value: str) -> float:
    from distcrond.config.durations import parse_duration

    try:
        return (
            float(value)
            if re.fullmatch(r"\d+(\.\d+)?", value)
            else parse_duration(value).total_seconds()
        )
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive duration")
    return seconds


def _zk_root(value: str) -> str:
    if not value.startswith("/") or (value != "/" and value.endswith("/")) or "//" in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a znode path like /distcron")
    return value


def _zk_auth(value: str) -> str:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return value


def _es_index_prefix(value: str) -> str:
    from distcrond.reporting.elasticsearch import check_index_prefix

    try:
        return check_index_prefix(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _allowed_hosts(value: str) -> tuple[str, ...]:
    """An --api-allowed-host value (or DISTCRON_API_ALLOWED_HOST's comma-separated list)."""
    from distcrond.api.hosts import parse_host_pattern

    try:
        return tuple(parse_host_pattern(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _RepeatedOverEnv(argparse.Action):
    """A repeatable flag whose values replace its environment variable's (the string
    default, converted by argparse only when no flag is given) instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        given: tuple[str, ...] = () if current is None or isinstance(current, str) else current
        setattr(namespace, self.dest, (*given, *values))  # type: ignore[misc]


def _flag_env(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _env_pattern(value: str) -> str:
    """A --scrub-env NAME: a variable name or an fnmatch glob of names (``AWS_*``)."""
    value = value.strip()
    if not value or "=" in value or "," in value:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an environment variable name or a glob like AWS_*"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distcrond",
        description="Distributed cron daemon: one peer of a distcrond cluster "
        "(a cluster of one, with its state in SQLite, when no ZooKeeper is given).",
    )
    p.add_argument("--version", action="version", version=f"distcrond {__version__}")
    _add_directory_flags(p)
    _add_peer_flags(p)
    _add_run_flags(p)
    _add_cluster_flags(p)
    _add_elasticsearch_flags(p)
    _add_elasticsearch_auth_flags(p)
    _add_api_security_flags(p)
    return p


def _add_directory_flags(p: argparse.ArgumentParser) -> None:
    """Where the job and node files are, and the state directory."""
    p.add_argument(
        "--jobs-dir",
        "--jobsDirectory",
        dest="jobs_dir",
        type=Path,
        default=Path(_env("JOBS_DIR", "/etc/distcron/jobs.d") or ""),
        help="directory of job files (env DISTCRON_JOBS_DIR; default %(default)s)",
    )
    p.add_argument(
        "--nodes-dir",
        "--nodesDirectory",
        dest="nodes_dir",
        type=Path,
        default=Path(_env("NODES_DIR", "/etc/distcron/nodes.d") or ""),
        help="directory of node files (env DISTCRON_NODES_DIR; default %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        dest="state_dir",
        type=Path,
        default=Path(_env("STATE_DIR", "/var/lib/distcron") or ""),
        help="where the embedded stores keep their files "
        "(env DISTCRON_STATE_DIR; default %(default)s)",
    )


def _add_peer_flags(p: argparse.ArgumentParser) -> None:
    """This peer: its id, the API's address and workers, logging."""
    p.add_argument(
        "--bind",
        type=_bind,
        default=_env("BIND", "127.0.0.1:8080"),
        help="HOST:PORT of the REST API (env DISTCRON_BIND; default %(default)s)",
    )
    p.add_argument(
        "--advertise-url",
        type=_advertise_url,
        default=_env("ADVERTISE_URL", None),
        help="the URL of this peer's API that it publishes to the others (env "
        "DISTCRON_ADVERTISE_URL; default: from --bind, with this host's name for a "
        "wildcard address such as 0.0.0.0)",
    )
    p.add_argument(
        "--peer-id",
        default=_env("PEER_ID", socket.gethostname()),
        help="this peer's id (env DISTCRON_PEER_ID; default: the host name)",
    )
    p.add_argument(
        "--api-workers",
        type=_positive_int,
        default=_env("API_WORKERS", "2") or "2",
        help="gunicorn worker processes for the API "
        "(env DISTCRON_API_WORKERS; default %(default)s)",
    )
    p.add_argument(
        "--api-threads",
        type=_positive_int,
        default=_env("API_THREADS", "16") or "16",
        help="threads of each API worker: a worker serves at most this many connections at "
        "once, slow clients included (env DISTCRON_API_THREADS; default %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=_env("LOG_FORMAT", "text"),
        help="log format on stderr (env DISTCRON_LOG_FORMAT; default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="(env DISTCRON_LOG_LEVEL; default %(default)s)",
    )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """How many runs at once, how long finished records stay, the stop's grace."""
    p.add_argument(
        "--max-concurrent-runs",
        type=_positive_int,
        default=_env("MAX_CONCURRENT_RUNS", "256") or "256",
        help="runs this peer executes at once; more wait (env DISTCRON_MAX_CONCURRENT_RUNS)",
    )
    p.add_argument(
        "--run-retention",
        type=_seconds,
        default=_env("RUN_RETENTION", "15m") or "15m",
        help="how long finished run records stay in the coordination store; history stays in "
        "the report store (env DISTCRON_RUN_RETENTION; default 15m)",
    )
    p.add_argument(
        "--run-retention-count",
        type=_positive_int,
        default=_env("RUN_RETENTION_COUNT", "10000") or "10000",
        help="at most this many finished run records stay in the coordination store, the "
        "newest; older ones go before --run-retention is up "
        "(env DISTCRON_RUN_RETENTION_COUNT; default 10000)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=_env("SHUTDOWN_GRACE", "10s") or "10s",
        help="on SIGTERM, how long running runs may finish before they are stopped "
        "(env DISTCRON_SHUTDOWN_GRACE; default 10s)",
    )


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """ZooKeeper: cluster mode, its session and the leader's stall timeout."""
    p.add_argument(
        "--zookeeper",
        default=_env("ZOOKEEPER"),
        help="HOST:PORT,... of a ZooKeeper ensemble: cluster mode (env DISTCRON_ZOOKEEPER)",
    )
    p.add_argument(
        "--zk-root",
        type=_zk_root,
        default=_env("ZK_ROOT", "/distcron"),
        help="this cluster's znode under which everything lives; several clusters can share "
        "an ensemble (env DISTCRON_ZK_ROOT; default %(default)s)",
    )
    p.add_argument(
        "--zk-session-timeout",
        type=_seconds,
        default=_env("ZK_SESSION_TIMEOUT", "4s") or "4s",
        help="ZooKeeper session timeout: how long a crashed peer (or leader) keeps its runs "
        "(or leadership); the ensemble's tickTime bounds it to 2-20 ticks "
        "(env DISTCRON_ZK_SESSION_TIMEOUT; default 4s)",
    )
    p.add_argument(
        "--leader-stall-timeout",
        type=_positive_seconds,
        default=_env("LEADER_STALL_TIMEOUT", "5s") or "5s",
        help="a leader none of whose scheduler passes completed for this long logs why, gives "
        "leadership up and contends again; every peer's /api/v1/health answers 503 while the "
        "leader's last pass is older (env DISTCRON_LEADER_STALL_TIMEOUT; default 5s)",
    )
    p.add_argument(
        "--zk-auth",
        default=_env("ZK_AUTH"),
        metavar="USER:PASSWORD",
        type=_zk_auth,
        help="ZooKeeper digest auth; everything distcrond creates is then readable and writable "
        "by that identity only. Prefer the environment (DISTCRON_ZK_AUTH): flags show in ps",
    )


def _add_elasticsearch_flags(p: argparse.ArgumentParser) -> None:
    """Reports in Elasticsearch (and the original program's --esHost/--esPort)."""
    p.add_argument(
        "--es-url",
        dest="es_urls",
        action="append",
        default=None,
        help="Elasticsearch URL for run reports; repeatable (env DISTCRON_ES_URL, comma-separated)",
    )
    p.add_argument(
        "--esHost",
        "--es-host",
        dest="es_host",
        default=_env("ES_HOST"),
        help="the original's Elasticsearch host (env DISTCRON_ES_HOST)",
    )
    p.add_argument(
        "--esPort",
        "--es-port",
        dest="es_port",
        type=_positive_int,
        default=_env("ES_PORT", "9200") or "9200",
        help="the original's Elasticsearch port (env DISTCRON_ES_PORT; default 9200)",
    )
    p.add_argument(
        "--es-index-prefix",
        type=_es_index_prefix,
        default=_env("ES_INDEX_PREFIX", "distcron-runs-"),
        help="reports go to indices named PREFIX + the period of the run's slot "
        "(env DISTCRON_ES_INDEX_PREFIX; default %(default)s)",
    )
    p.add_argument(
        "--es-index-period",
        choices=("month", "day"),
        default=_env("ES_INDEX_PERIOD", "month"),
        help="one index per month (PREFIX2026.11) or per day (PREFIX2026.11.27) of the run's "
        "slot; history is dropped by deleting an index (env DISTCRON_ES_INDEX_PERIOD; "
        "default %(default)s)",
    )


def _add_elasticsearch_auth_flags(p: argparse.ArgumentParser) -> None:
    """Elasticsearch credentials and TLS verification."""
    p.add_argument(
        "--es-username",
        default=_env("ES_USERNAME"),
        help="Elasticsearch basic auth user; the password comes from DISTCRON_ES_PASSWORD "
        "(env DISTCRON_ES_USERNAME)",
    )
    p.add_argument(
        "--es-password",
        default=_env("ES_PASSWORD"),
        help="Elasticsearch basic auth password. Prefer the environment (DISTCRON_ES_PASSWORD): "
        "flags show in ps",
    )
    p.add_argument(
        "--es-api-key",
        default=_env("ES_API_KEY"),
        help="Elasticsearch API key (the base64 'id:key' form). Prefer the environment "
        "(DISTCRON_ES_API_KEY): flags show in ps",
    )
    p.add_argument(
        "--es-ca-certs",
        default=_env("ES_CA_CERTS"),
        metavar="PEM_FILE",
        help="CA bundle to verify an https:// Elasticsearch (env DISTCRON_ES_CA_CERTS)",
    )
    p.add_argument(
        "--es-insecure",
        action="store_true",
        default=_flag_env("ES_INSECURE"),
        help="do not verify Elasticsearch's TLS certificate (env DISTCRON_ES_INSECURE=1)",
    )
    p.add_argument(
        "--scrub-env",
        dest="scrub_env",
        action="append",
        type=_env_pattern,
        default=None,
        metavar="NAME",
        help="leave this variable of the daemon out of every run's environment, beyond the "
        "daemon's own secrets; a glob like 'AWS_*' (case-sensitive); repeatable "
        "(env DISTCRON_SCRUB_ENV, comma-separated)",
    )


def _add_api_security_flags(p: argparse.ArgumentParser) -> None:
    """API tokens, the opt-out of them, the environment runs never get, and --check."""
    p.add_argument(
        "--api-tokens",
        type=Path,
        default=_env("API_TOKENS"),
        metavar="FILE",
        help='the API tokens file, {"tokens": [{"name", "role", "sha256"}]}: every '
        "request but the liveness check then needs 'Authorization: Bearer <token>'; reloaded "
        "when it changes (env DISTCRON_API_TOKENS; distcronctl token new makes a token)",
    )
    p.add_argument(
        "--api-insecure",
        action="store_true",
        default=_flag_env("API_INSECURE"),
        help="serve the API without tokens on a --bind that is not loopback, open to anyone "
        "who can reach it (env DISTCRON_API_INSECURE=1; warned about at every start)",
    )
    p.add_argument(
        "--api-allowed-host",
        dest="api_allowed_hosts",
        action=_RepeatedOverEnv,
        type=_allowed_hosts,
        default=_env("API_ALLOWED_HOST"),
        metavar="HOST",
        help="a host name (or *.domain, or an address) the API answers to beyond its --bind "
        "and advertised names and loopback, such as a load balancer's; requests naming "
        "another host get 421; repeatable (env DISTCRON_API_ALLOWED_HOST, comma-separated)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("TLS_CERT"),
        metavar="FILE",
        help="serve the API over HTTPS with this PEM certificate (chain), with --tls-key "
        "(env DISTCRON_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=_env("TLS_KEY"),
        metavar="FILE",
        help="the PEM private key of --tls-cert, unencrypted (env DISTCRON_TLS_KEY)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the job and node files, print any errors, and exit (1 if any)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    es_urls = list(args.es_urls or [u for u in (_env("ES_URL") or "").split(",") if u])
    scrub_env = args.scrub_env or [n.strip() for n in (_env("SCRUB_ENV") or "").split(",")]
    if args.es_host:
        es_urls.append(f"http://{args.es_host}:{args.es_port}")
    return Settings(
        jobs_dir=args.jobs_dir,
        nodes_dir=args.nodes_dir,
        state_dir=args.state_dir,
        bind=args.bind,
        peer_id=args.peer_id,
        api_workers=args.api_workers,
        api_threads=args.api_threads,
        log_format=args.log_format,
        log_level=args.log_level,
        es_urls=tuple(es_urls),
        es_index_prefix=args.es_index_prefix,
        es_index_period=args.es_index_period,
        es_username=args.es_username or None,
        es_password=args.es_password or None,
        es_api_key=args.es_api_key or None,
        es_ca_certs=args.es_ca_certs or None,
        es_verify_certs=not args.es_insecure,
        zookeeper=args.zookeeper or None,
        zk_root=args.zk_root,
        zk_session_timeout=args.zk_session_timeout,
        leader_stall_timeout=args.leader_stall_timeout,
        zk_auth=args.zk_auth or None,
        max_concurrent_runs=args.max_concurrent_runs,
        run_retention_seconds=args.run_retention,
        run_retention_count=args.run_retention_count,
        shutdown_grace=args.shutdown_grace,
        api_tokens=args.api_tokens or None,
        api_insecure=args.api_insecure,
        api_allowed_hosts=tuple(args.api_allowed_hosts or ()),
        advertise_url=args.advertise_url or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        scrub_env=tuple(n for n in scrub_env if n),
    )


def api_exposure(settings: Settings) -> str | None:
    """Why this peer must not start with its API as configured (None: it may), after
    warning about an API that is open to its host or, with --api-insecure, to everyone."""
    if settings.api_tokens is not None:
        return None
    host, _, _ = settings.bind.rpartition(":")
    if settings.api_insecure:
        log.warning(
            "--api-insecure: the API on %s is open to anyone who can reach it, with no token",
            settings.bind,
        )
        return None
    if not is_loopback(host):
        return (
            f"refusing to serve the API on {settings.bind} without --api-tokens: anyone who can "
            "reach it could trigger any job and read every run's output. Give --api-tokens FILE "
            "(distcronctl token new makes a token), bind a loopback address, or pass "
            "--api-insecure to accept that"
        )
    log.warning("the API on %s has no --api-tokens: anyone on this host may use it", settings.bind)
    return None


def tls_problem(settings: Settings) -> str | None:
    """Why the API's TLS files cannot serve (None: they can, or there is no TLS): both
    flags or neither, and the certificate and key must load and match, checked here so
    that the error names the flag instead of failing in gunicorn's workers."""
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        return f"{given} needs {missing} too: HTTPS takes a certificate and its private key"
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            return f"{flag} {path}: no such file"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        return f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its key ({e})"
    except OSError as e:
        return f"--tls-cert {cert} / --tls-key {key}: {e.strerror or e}"
    if key.stat().st_mode & stat.S_IROTH:
        log.warning("--tls-key %s is readable by every user of this host: chmod o-r it", key)
    return None


def check(settings: Settings) -> int:
    """--check: validate the files like the daemon would; errors on stdout, one per line."""
    from distcrond.config.loader import ConfigRegistry

    config = ConfigRegistry(settings.jobs_dir, settings.nodes_dir, settings.api_tokens).reload()
    for e in config.errors:
        print(f"{e.file}: {e.field or '(file)'}: {e.reason}")
    print(f"{len(config.jobs)} jobs, {len(config.nodes)} nodes, {len(config.errors)} errors")
    return 1 if config.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    if args.check:
        return check(settings)
    refusal = tls_problem(settings) or api_exposure(settings)
    if refusal:
        log.error("%s", refusal)
        return 2

    from distcrond.api_process import APIStartError
    from distcrond.coordination.base import StoreUnavailable
    from distcrond.daemon import Daemon
    from distcrond.statedir import StateDirLocked

    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except (StateDirLocked, APIStartError, StoreUnavailable) as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
