"""distcronctl: the command line over the REST API of any peer.

    distcronctl jobs                    every job, its next slot and last run
    distcronctl job ID                  one job in detail
    distcronctl runs ID [--limit N] [--state S[,S]] [--node N] [--cursor C]
    distcronctl run RUN_ID              one run, with its output
    distcronctl trigger ID              run a job now; prints the run id
    distcronctl cancel RUN_ID           end an active run (it ends failed, "cancelled by ...")
    distcronctl cluster                 leader, peers, config drift
    distcronctl errors                  job and node files that failed to load
    distcronctl health                  this peer's stores, and whether the cluster schedules
    distcronctl token new NAME --role R a new API token, and its entry for the tokens file

A peer started with ``--api-tokens`` wants a token: ``--token-file FILE``, or
``DISTCRON_TOKEN`` (``--token`` works too, but shows in ps). A peer serving
HTTPS (``--tls-cert``) is verified against ``--ca-cert FILE`` or
``DISTCRON_CA_CERT``, else the system's CAs.

``--json`` prints the API's answer as it came. Exit status: 0 ok, 1 when the
API answers an error or cannot be reached, 2 for a usage error. Only the
standard library is used, so the tool runs wherever Python does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
API = "/api/v1"

# (method, absolute url, body or None) -> (HTTP status, decoded JSON body or None)
Transport = Callable[[str, str, bytes | None], tuple[int, Any]]


class Unreachable(Exception):
    """The API could not be reached (refused, timed out, DNS...)."""


class APIError(Exception):
    """The API answered with an error status."""

    def __init__(self, status: int, title: str, description: str) -> None:
        super().__init__(f"{status} {title}: {description}")
        self.status = status
        self.title = title
        self.description = description


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def tls_context(ca_cert: str | None) -> ssl.SSLContext:
    """How an https URL is verified: against ``ca_cert`` (a PEM file of the CA, or of a
    peer's self-signed certificate) if given, else against the system's CAs; the host
    name is always checked."""
    return ssl.create_default_context(cafile=ca_cert)


def urllib_transport(
    timeout: float, token: str | None = None, context: ssl.SSLContext | None = None
) -> Transport:
    """The real HTTP transport (urllib, no dependencies), sending ``token`` if given and
    verifying an https peer with ``context`` (default: the system's CAs)."""

    def send(method: str, url: str, body: bytes | None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise Unreachable(
                    f"its TLS certificate is not trusted ({exc.reason.verify_message}); "
                    "give its CA with --ca-cert FILE or $DISTCRON_CA_CERT"
                ) from None
            raise Unreachable(str(exc.reason)) from None
        except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
            raise Unreachable(str(exc) or type(exc).__name__) from None

    return send


class Client:
    """The API's paths and error form, over a transport."""

    def __init__(self, base_url: str, transport: Transport) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
        also_ok: tuple[int, ...] = (),
    ) -> Any:
        url = self.base_url + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        status, payload = self.transport(method, url, data)
        if status >= 400 and status not in also_ok:
            error = payload.get("error") if isinstance(payload, dict) else None
            if isinstance(error, dict):
                raise APIError(
                    status, str(error.get("title", "")), str(error.get("description", ""))
                )
            raise APIError(status, f"HTTP {status}", "the answer is not a distcrond API error")
        if payload is None and status != 204:
            raise APIError(status, "Not JSON", f"{url} did not answer JSON: is it a distcrond API?")
        return payload


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="@:~")


# -- rendering ------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with spaces; the header in capitals."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}".rstrip() for k, v in pairs)


def ts(value: str | None) -> str:
    """A timestamp for people: no 'T', no all-zero microseconds."""
    if not value:
        return "-"
    return value.replace("T", " ").replace(".000000Z", "Z")


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def schedule_text(schedule: Any) -> str:
    if not isinstance(schedule, dict):
        return text(schedule)
    tz = schedule.get("timezone", "UTC")
    where = "" if tz == "UTC" else f" {tz}"
    if "cron" in schedule:
        return f"cron {schedule['cron']}{where}"
    if "every" in schedule:
        return f"every {schedule['every']}{' fuzzy' if schedule.get('fuzzy') else ''}{where}"
    if "interval" in schedule:
        return f"every {schedule['interval']} from {schedule.get('reference', '00:00:00')}{where}"
    return json.dumps(schedule)


def policy_text(policy: Any) -> str:
    if not isinstance(policy, dict):
        return text(policy)
    roles = policy.get("roles") or []
    return f"hosts={policy.get('hosts', 'any')}" + (f" roles={','.join(roles)}" if roles else "")


def duration_text(run: dict[str, Any]) -> str:
    ms = run.get("duration_ms")
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f}s" if ms < 60_000 else f"{ms // 60_000}m{(ms % 60_000) // 1000:02d}s"


def run_rows(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            ts(r.get("slot")),
            text(r.get("state")),
            text(r.get("node_id")),
            text(r.get("peer_id")),
            text(r.get("exit_code")),
            duration_text(r),
            text(r.get("run_id")),
        ]
        for r in runs
    ]


RUN_HEADERS = ("SLOT", "STATE", "NODE", "PEER", "EXIT", "DURATION", "RUN ID")


def render_jobs(data: dict[str, Any]) -> str:
    jobs = data.get("jobs", [])
    if not jobs:
        return "no jobs loaded"
    rows = []
    for job in jobs:
        last = job.get("last_run") or {}
        rows.append(
            [
                text(job.get("id")),
                text(job.get("enabled")),
                schedule_text(job.get("schedule")),
                ts(job.get("next_slot")),
                text(last.get("state")),
                ts(last.get("slot")),
                text(last.get("exit_code")),
            ]
        )
    return table(("ID", "ENABLED", "SCHEDULE", "NEXT SLOT", "LAST", "LAST SLOT", "EXIT"), rows)


def render_job(data: dict[str, Any]) -> str:
    job = data.get("job", {})
    last = data.get("last_run")
    command = job.get("command")
    pairs = [
        ("id", text(job.get("id"))),
        ("description", text(job.get("description") or None)),
        ("enabled", text(job.get("enabled", True))),
        ("schedule", schedule_text(job.get("schedule"))),
        ("policy", policy_text(job.get("policy"))),
        ("command", " ".join(command) if isinstance(command, list) else text(command)),
        ("next slot", ts(data.get("next_slot"))),
        (
            "last run",
            f"{last['state']} at {ts(last.get('slot'))} (exit {text(last.get('exit_code'))})"
            if last
            else "-",
        ),
    ]
    out = [fields(pairs)]
    active = data.get("active_runs") or []
    if active:
        out += ["", "active runs:", table(RUN_HEADERS, run_rows(active))]
    errors = data.get("errors") or []
    if errors:
        out += ["", "file errors:", render_errors({"errors": errors})]
    return "\n".join(out)


def render_runs(data: dict[str, Any]) -> str:
    runs = [*(data.get("active") or []), *(data.get("runs") or [])]
    out = [table(RUN_HEADERS, run_rows(runs)) if runs else f"no runs of {data.get('job_id')}"]
    if data.get("next_cursor"):
        out.append(f"more: distcronctl runs {data.get('job_id')} --cursor {data['next_cursor']}")
    return "\n".join(out)


def render_search(data: dict[str, Any]) -> str:
    runs = data.get("runs") or []
    out = [table(RUN_HEADERS, run_rows(runs)) if runs else "no runs found"]
    if data.get("next_cursor"):
        out.append(f"more: add --cursor {data['next_cursor']}")
    return "\n".join(out)


def render_run(data: dict[str, Any]) -> str:
    if "runs" in data:  # one slot run on several nodes
        return "\n".join(
            [f"{data.get('run_id')}: one run per node", table(RUN_HEADERS, run_rows(data["runs"]))]
        )
    pairs = [
        ("run", text(data.get("run_id"))),
        ("job", text(data.get("job_id"))),
        ("slot", ts(data.get("slot"))),
        ("state", text(data.get("state"))),
    ]
    if data.get("source") != "triggers":
        pairs += [
            ("node", text(data.get("node_id"))),
            ("peer", text(data.get("peer_id"))),
            ("trigger", text(data.get("trigger"))),
            ("started", ts(data.get("started_at"))),
            ("ended", ts(data.get("ended_at"))),
            ("duration", duration_text(data)),
            ("exit code", text(data.get("exit_code"))),
            ("reason", text(data.get("reason") or None)),
        ]
    pairs.append(("source", text(data.get("source"))))
    out = [fields(pairs)]
    for stream in ("stdout", "stderr"):
        content = data.get(stream)
        if content is None:
            continue
        out += [f"--- {stream} ---", content.rstrip("\n") if content else "(empty)"]
    if data.get("output_truncated"):
        out.append("(output truncated)")
    return "\n".join(out)


def render_trigger(data: dict[str, Any]) -> str:
    return text(data.get("run_id"))


def render_cancel(data: dict[str, Any]) -> str:
    who = data.get("cancelled_by")
    return f"{text(data.get('run_id'))}: being cancelled" + (f" (by {who})" if who else "")


def render_cluster(data: dict[str, Any]) -> str:
    leader = data.get("leader")
    head = (
        f"leader: {leader['peer_id']} (epoch {leader['epoch']}, since {ts(leader.get('since'))})"
        if leader
        else "leader: none"
    )
    rows = [
        [
            text(p.get("peer_id")),
            text(p.get("is_leader")),
            text(p.get("version")),
            text(p.get("api_url")),
            ts(p.get("started_at")),
            "DRIFT" if p.get("config_drift") else "ok",
        ]
        for p in data.get("peers", [])
    ]
    out = [head, table(("PEER", "LEADER", "VERSION", "API", "STARTED", "CONFIG"), rows)]
    if data.get("drift"):
        out.append("config differs from the leader's on: " + ", ".join(data["drift"]))
    return "\n".join(out)


def render_errors(data: dict[str, Any]) -> str:
    errors = data.get("errors") or []
    if not errors:
        return "no config errors"
    rows = [[text(e.get("file")), text(e.get("field")), text(e.get("reason"))] for e in errors]
    return table(("FILE", "FIELD", "REASON"), rows)


def render_health(data: dict[str, Any]) -> str:
    stores = data.get("stores", {})
    pairs = [
        ("status", text(data.get("status"))),
        ("peer", text(data.get("peer_id"))),
        ("leader", text(data.get("leader_id"))),
        ("epoch", text(data.get("epoch"))),
        ("version", text(data.get("version"))),
    ]
    for name in ("coordination", "reports"):
        s = stores.get(name, {})
        state = "ok" if s.get("ok") else f"FAILING {s.get('detail', '')}".rstrip()
        pairs.append((name, f"{s.get('backend', '?')} {state}"))
    scheduler = data.get("scheduler")
    if scheduler is not None:
        state = "ok" if scheduler.get("ok") else "STALLED"
        pairs.append(("scheduler", f"{state}: {scheduler.get('detail', '')}".rstrip(": ")))
    spool = data.get("report_spool")
    if spool is not None:
        age = spool.get("oldest_age_s")
        waiting = f"{spool.get('reports', 0)} waiting"
        if age is not None:
            waiting += f", oldest {age:.0f}s"
        waiting += f", {spool.get('dead_letters', 0)} dead letters"
        if spool.get("last_error"):
            waiting += f"; last error: {spool['last_error']}"
        pairs.append(("report spool", waiting))
    return fields(pairs)


# -- commands -------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace], tuple[Any, Callable[[Any], str]]]


def cmd_jobs(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("GET", f"{API}/jobs"), render_jobs


def cmd_job(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("GET", f"{API}/jobs/{_quote(args.id)}"), render_job


def cmd_runs(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    params = {"limit": args.limit, "state": args.state, "node": args.node, "cursor": args.cursor}
    return client.request("GET", f"{API}/jobs/{_quote(args.id)}/runs", params), render_runs


def cmd_search(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    params = {
        "q": " ".join(args.words),
        "job": args.job,
        "state": args.state,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    return client.request("GET", f"{API}/runs", params), render_search


def cmd_run(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("GET", f"{API}/runs/{_quote(args.run_id)}"), render_run


def cmd_trigger(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("POST", f"{API}/jobs/{_quote(args.id)}/runs", body={}), render_trigger


def cmd_cancel(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    path = f"{API}/runs/{_quote(args.run_id)}/cancel"
    return client.request("POST", path, body={}), render_cancel


def cmd_cluster(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("GET", f"{API}/cluster"), render_cluster


def cmd_errors(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    return client.request("GET", f"{API}/config/errors"), render_errors


def cmd_health(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    # A degraded peer answers 503 with the same body: show it (main exits 1).
    return client.request("GET", f"{API}/health", also_ok=(503,)), render_health


TOKEN_ROLES = ("read", "operate", "admin")


def cmd_token_new(client: Client, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    # Made here, not asked of a peer: the token never crosses the network. The same recipe
    # as distcrond.config.tokens (which this standard-library-only tool does not import).
    token = secrets.token_urlsafe(32)
    entry = {"name": args.name, "role": args.role, "sha256": _sha256(token)}
    return {"token": token, "entry": entry}, render_token


def _token_name(text: str) -> str:
    # distcrond.config.tokens.TOKEN_NAME_PATTERN
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            "a letter or digit, then letters, digits, '.', '_', '@' or '-' (at most 64)"
        )
    return text


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def render_token(data: dict[str, Any]) -> str:
    return (
        f"token (shown this once; give it to {data['entry']['name']}, keep it secret):\n"
        f"  {data['token']}\n"
        'add this entry to the peers\' --api-tokens file (its "tokens" list):\n'
        f"  {json.dumps(data['entry'])}"
    )


def read_token(args: argparse.Namespace) -> str | None:
    """The token to send: --token-file, else --token, else $DISTCRON_TOKEN (None: none)."""
    path = getattr(args, "token_file", None)
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return getattr(args, "token", None) or os.environ.get("DISTCRON_TOKEN") or None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes: they work before or after the command; SUPPRESS
    keeps a subcommand from overwriting a value given before it with its default."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the API of any peer (default: $DISTCRON_URL, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw JSON answer"
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to wait for the API (default 10)",
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="the API token (default: $DISTCRON_TOKEN); shows in ps, prefer --token-file",
    )
    common.add_argument(
        "--ca-cert",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="verify an https peer against this PEM CA certificate "
        "(default: $DISTCRON_CA_CERT, else the system's CAs)",
    )
    common.add_argument(
        "--token-file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="read the API token from FILE",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="distcronctl",
        description="Ask a distcrond cluster about its jobs and runs.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(func=func)
        return sub

    add("jobs", cmd_jobs, "list the jobs, their next slot and last run")
    add("job", cmd_job, "show one job").add_argument("id", help="job id")
    runs = add("runs", cmd_runs, "list a job's runs, newest first")
    runs.add_argument("id", help="job id")
    runs.add_argument("--limit", type=_positive, default=20, help="runs per page (default 20)")
    runs.add_argument("--state", help="only these states, comma-separated (e.g. failed,unknown)")
    runs.add_argument("--node", help="only runs on this node")
    runs.add_argument("--cursor", help="continue after a previous page")
    search = add("search", cmd_search, "find finished runs whose output has every word")
    search.add_argument("words", nargs="+", help="words that stdout or stderr contains")
    search.add_argument("--job", help="only this job's runs")
    search.add_argument("--state", help="only these states, comma-separated")
    search.add_argument("--limit", type=_positive, default=20, help="runs per page (default 20)")
    search.add_argument("--cursor", help="continue after a previous page")
    add("run", cmd_run, "show one run with its output").add_argument("run_id", help="<job>@<slot>")
    add("trigger", cmd_trigger, "run a job now and print its run id").add_argument(
        "id", help="job id"
    )
    add("cancel", cmd_cancel, "end an active run (it ends failed)").add_argument(
        "run_id", help="<job>@<slot>[~<node>]"
    )
    add("cluster", cmd_cluster, "show the leader, the peers and config drift")
    add("errors", cmd_errors, "show job and node files that failed to load")
    add("health", cmd_health, "show whether the peer's stores answer")
    _add_token_commands(commands, common)
    return parser


def _add_token_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """``token new NAME --role ROLE``: made locally, no API call."""
    token = commands.add_parser("token", help="API tokens", description="API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    new = token_commands.add_parser(
        "new",
        help="make a new random token; prints it once, and its entry for the tokens file",
        parents=[common],
    )
    new.set_defaults(func=cmd_token_new)
    new.add_argument("name", type=_token_name, help="who holds it (shown in the audit log)")
    new.add_argument("--role", choices=TOKEN_ROLES, required=True, help="what it may do")


def main(argv: Sequence[str] | None = None, transport: Transport | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    url = getattr(args, "url", None) or os.environ.get("DISTCRON_URL") or DEFAULT_URL
    as_json = getattr(args, "json", False)
    try:
        token = read_token(args)
    except OSError as exc:
        print(f"distcronctl: cannot read the token file: {exc}", file=sys.stderr)
        return 1
    ca_cert = getattr(args, "ca_cert", None) or os.environ.get("DISTCRON_CA_CERT") or None
    if transport is None:
        try:
            context = tls_context(ca_cert)
        except (OSError, ssl.SSLError) as exc:
            print(f"distcronctl: --ca-cert {ca_cert}: cannot load it: {exc}", file=sys.stderr)
            return 1
        transport = urllib_transport(getattr(args, "timeout", 10.0), token, context)
    client = Client(url, transport)
    try:
        data, render = args.func(client, args)
    except Unreachable as exc:
        print(f"distcronctl: cannot reach the distcrond API at {url}: {exc}", file=sys.stderr)
        return 1
    except APIError as exc:
        hint = ""
        if exc.status == 401:
            hint = " (give a token: --token-file FILE or $DISTCRON_TOKEN)"
        print(f"distcronctl: {exc.title} ({exc.status}): {exc.description}{hint}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if as_json else render(data))
    if args.command == "health" and isinstance(data, dict) and data.get("status") != "ok":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
