"""Who may call the API: bearer tokens with roles, and the audit trail of what changes.

With ``--api-tokens`` every request but the liveness check carries
``Authorization: Bearer <token>``: none, or one not in the table, is 401; one
whose role is below what the route needs is 403 (both JSON errors, like every
other). A resource says what each method needs in ``REQUIRED_ROLES``
(method → role, None for open); without an entry, reading (GET, HEAD) needs
``read`` and anything else ``admin``, so a route added later is closed until
it says otherwise. Without ``--api-tokens`` nothing is checked (the daemon
allows that on loopback only, or with ``--api-insecure``).

The workers read the table from the file the daemon writes
(``<state_dir>/api-tokens.json``, see ``Daemon``), re-reading it when its
size, mtime or inode change: a stat per request, so a change of the
operator's file is in force as soon as the daemon's watcher has re-read it.

Every request that is not a read (trigger, cancel, ...) leaves one JSON line
on the logger ``distcrond.audit``: time, peer, token name, client address,
method, path and outcome (status), refused ones included.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import falcon

from distcrond.config.tokens import Role, TokenEntry, TokensFile, TokenTable

audit_log = logging.getLogger("distcrond.audit")
log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def required_role(resource: object, method: str) -> Role | None:
    """The role ``method`` on ``resource`` needs (None: open to anyone)."""
    roles: Mapping[str, Role | None] = getattr(resource, "REQUIRED_ROLES", {})
    if method in roles:
        return roles[method]
    return Role.READ if method in READ_METHODS else Role.ADMIN


class TokenSource:
    """The table in a file the daemon keeps, re-read when the file changes (thread-safe).

    A file that is missing or unreadable is an empty table: nobody gets in (the daemon
    writes the file before the API starts, so that only happens when something is wrong).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._table = TokenTable()

    def table(self) -> TokenTable:
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        with self._lock:
            if seen != self._seen:
                self._table = self._read() if seen is not None else TokenTable()
                self._seen = seen
            return self._table

    def _read(self) -> TokenTable:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return TokenTable(TokensFile.model_validate(data).tokens)
        except (OSError, ValueError):
            log.error("cannot read the API tokens from %s: refusing every token", self.path)
            return TokenTable()


ANONYMOUS = "anonymous"


def requester(req: falcon.Request) -> str:
    """Who sent the request, as runs and reports record it: the token's name, or
    ``anonymous`` on a peer without tokens."""
    return getattr(req.context, "token_name", None) or ANONYMOUS


def has_role(req: falcon.Request, role: Role) -> bool:
    """Whether the request's token has ``role`` or more (False without a token, and on
    a peer without tokens: what only a role may see is shown to nobody there)."""
    level: Role | None = getattr(req.context, "token_level", None)
    return level is not None and level >= role


def bearer_token(req: falcon.Request) -> str | None:
    header = req.get_header("Authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authorization:
    """falcon middleware: authenticates and authorises each request, and audits changes."""

    def __init__(self, tokens: TokenSource | None, peer_id: str) -> None:
        self._tokens = tokens
        self._peer_id = peer_id

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.token_name = None
        req.context.token_level = None

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        needed = required_role(resource, req.method)
        if needed is None or self._tokens is None:
            return
        entry = self._authenticate(req)
        req.context.token_name = entry.name
        req.context.token_level = entry.level
        if entry.level < needed:
            raise falcon.HTTPForbidden(
                title="Forbidden",
                description=f"{req.method} {req.path} needs the role {needed.label!r}; "
                f"the token {entry.name!r} has {entry.role!r}.",
            )

    def _authenticate(self, req: falcon.Request) -> TokenEntry:
        assert self._tokens is not None
        token = bearer_token(req)
        challenge = 'Bearer realm="distcrond"'
        if token is None:
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="This peer needs an API token: send 'Authorization: Bearer <token>'.",
                challenges=[challenge],
            )
        entry = self._tokens.table().authenticate(token)
        if entry is None:
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="The token is not one this peer knows.",
                challenges=[challenge],
            )
        return entry

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if req.method in READ_METHODS or resource is None:
            return
        audit_log.info(
            json.dumps(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "peer": self._peer_id,
                    "token": getattr(req.context, "token_name", None),
                    "client": req.remote_addr,
                    "method": req.method,
                    "path": req.path,
                    "status": int(resp.status_code),
                },
                sort_keys=True,
            )
        )
