"""Where a request may come from: the Host it names, and the site that sent it.

Two browser attacks reach a peer that anyone on its network, or a page in a
browser on its host, can connect to:

* **DNS rebinding.** A page of ``evil.example`` makes its name resolve to the
  peer's address; the browser then treats the peer as ``evil.example`` and lets
  the page read every answer. The browser still sends ``Host: evil.example``,
  so :class:`HostCheck` answers only the names this peer answers to
  (:class:`AllowedHosts`) and refuses the rest with 421 Misdirected Request.
* **Cross-site requests.** A page of another site may send a form POST to the
  peer without asking anyone (no CORS preflight for a form or ``text/plain``
  body): it would trigger a job. :class:`CrossSiteCheck` refuses a request
  that changes something when its ``Origin`` is not this peer's own (403) or
  the browser says it is ``Sec-Fetch-Site: cross-site`` (403), and takes a body
  only as JSON (415), which a page of another site cannot send without a
  preflight that this API never grants.

Both apply with or without API tokens: a peer on loopback without tokens is
the one a browser on its host reaches most easily.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import falcon

from distcrond.settings import WILDCARD_HOSTS, Settings, is_loopback

ALLOWED_HOST_FLAG = "--api-allowed-host"
CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# host[:port], the host a name or an address, an IPv6 address in brackets; nothing
# else (no userinfo, path or spaces: "evil@127.0.0.1" is not a host).
_AUTHORITY = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:/?#@\s\\]+))(?::(?P<port>\d{1,5}))?"
)
_ORIGIN = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")


class HTTPMisdirectedRequest(falcon.HTTPError):
    """421: this peer does not answer to the host the request names (RFC 9110 15.5.20)."""

    def __init__(self, title: str, description: str) -> None:
        super().__init__(falcon.HTTP_421, title=title, description=description)


def split_authority(value: str) -> tuple[str, int | None]:
    """(host, port) of a Host header or an origin's authority, the host lower-case, without
    brackets or a trailing dot; ValueError when it is not ``host[:port]``."""
    match = _AUTHORITY.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not host[:port]")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} is out of range")
    if match["v6"]:
        return str(ipaddress.IPv6Address(match["v6"])), port  # ValueError if it is not one
    return match["name"].lower().rstrip("."), port


def parse_host_pattern(value: str) -> str:
    """An ``--api-allowed-host``: a host name, an address, or ``*.domain`` (any name under
    the domain, not the domain itself), normalised (lower case, no brackets); ValueError
    with the reason when it is none of them."""
    text = value.strip().lower().rstrip(".")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = text[2:] if text.startswith("*.") else text
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(
            f"{value!r} is not a host name, an address or *.domain "
            "(e.g. cron.example.com, *.example.com, 10.0.0.5), without a port or scheme"
        )
    return text


def _same_address(host: str, address: str) -> bool:
    """Whether ``host`` is the IP address ``address`` (a socket's, perhaps IPv4-mapped)."""
    try:
        ours = ipaddress.ip_address(address.partition("%")[0])
        theirs = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ours, ipaddress.IPv6Address) and ours.ipv4_mapped is not None:
        ours = ours.ipv4_mapped
    return ours == theirs


@dataclass(frozen=True)
class AllowedHosts:
    """The hosts this peer answers to: ``names`` it knows itself by (its ``--bind`` host,
    its advertised URL's, this host's names when bound to every interface), loopback,
    and the operator's ``--api-allowed-host`` entries (``allowed``, ``*.domain`` for the
    names under a domain). ``origin`` is its advertised URL's (scheme, host, port)."""

    names: frozenset[str] = frozenset()
    allowed: tuple[str, ...] = ()
    origin: tuple[str, str, int] | None = None

    @classmethod
    def of(cls, settings: Settings) -> AllowedHosts:
        """The hosts a peer with these settings answers to."""
        bind_host, _, _ = settings.bind.rpartition(":")
        bind_host = bind_host.strip("[]").lower()
        names = {bind_host}
        if bind_host in WILDCARD_HOSTS:
            names = {socket.gethostname().lower(), socket.getfqdn().lower()}
        advertised = urlsplit(settings.api_url)
        scheme, host = advertised.scheme, (advertised.hostname or "").rstrip(".")
        names.add(host)
        origin = (scheme, host, advertised.port or DEFAULT_PORTS.get(scheme, 0))
        patterns = tuple(parse_host_pattern(h) for h in settings.api_allowed_hosts)
        return cls(frozenset(n for n in names if n), patterns, origin)

    def operator_allows(self, host: str) -> bool:
        """Whether an ``--api-allowed-host`` entry names ``host``."""
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self.allowed)

    def answers(self, host: str, local_address: str | None = None) -> bool:
        """Whether this peer answers to ``host`` (from :func:`split_authority`); also the
        address the request's connection arrived at (``local_address``): a health check
        that connects to an address of a peer bound to every interface names it."""
        if host in self.names or is_loopback(host) or self.operator_allows(host):
            return True
        return local_address is not None and _same_address(host, local_address)


def _local_address(req: falcon.Request) -> str | None:
    """The address this request's connection arrived at (gunicorn hands its socket over)."""
    sock: Any = req.env.get("gunicorn.socket")
    try:
        return str(sock.getsockname()[0]) if sock is not None else None
    except (OSError, AttributeError, IndexError):
        return None


def _shown(value: str) -> str:
    """A header value quoted in an answer: bounded, so an answer never grows with it."""
    return repr(value if len(value) <= 100 else value[:100] + "...")


class HostCheck:
    """falcon middleware: every request must name a host this peer answers to (421 if
    not). A request without a Host header (HTTP/1.0) passes: a browser always sends one,
    and rebinding needs a browser."""

    def __init__(self, hosts: AllowedHosts) -> None:
        self._hosts = hosts

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        header = req.get_header("Host")
        if header is None:
            return
        try:
            host, _ = split_authority(header)
        except ValueError:
            raise falcon.HTTPBadRequest(
                title="Invalid Host header",
                description=f"The Host header {_shown(header)} is not host[:port].",
            ) from None
        if not self._hosts.answers(host, _local_address(req)):
            raise HTTPMisdirectedRequest(
                title="Misdirected request",
                description=f"This peer does not answer to the host {_shown(host)} (the Host "
                "header): it answers to its --bind and advertised names and to loopback. If "
                f"it is a name of this peer (a load balancer's, say), add {ALLOWED_HOST_FLAG} "
                f"{host}.",
            )


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin header; None for ``null`` or anything else."""
    match = _ORIGIN.fullmatch(value.strip())
    if match is None:
        return None
    scheme = match["scheme"].lower()
    try:
        host, port = split_authority(match["authority"])
    except ValueError:
        return None
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, 0)


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == falcon.MEDIA_JSON or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class CrossSiteCheck:
    """falcon middleware: a request that changes something (POST, PUT, PATCH, DELETE) must
    come from this peer's own origin, if it names one, and carry a body only as JSON.

    Its own origins: the advertised URL's, the request's own (its scheme and Host: the
    page was served by this peer under that name), and any on an ``--api-allowed-host``.
    It runs once the route is known, so that the audit trail records its refusals.
    """

    def __init__(self, hosts: AllowedHosts | None) -> None:
        self._hosts = hosts or AllowedHosts()

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        if req.method not in CHANGING_METHODS:
            return
        if (req.get_header("Sec-Fetch-Site") or "").strip().lower() == "cross-site":
            raise falcon.HTTPForbidden(
                title="Cross-site request",
                description="The browser sent this request for a page of another site "
                f"(Sec-Fetch-Site: cross-site); such a page may not {req.method} here.",
            )
        origin = req.get_header("Origin")
        if origin is not None and not self._own(origin, req):
            raise falcon.HTTPForbidden(
                title="Cross-site request",
                description=f"A {req.method} from the origin {_shown(origin)} is refused: "
                "only this peer's own origin, or one on an "
                f"{ALLOWED_HOST_FLAG}, may change something here.",
            )
        _check_body_type(req)

    def _own(self, value: str, req: falcon.Request) -> bool:
        origin = parse_origin(value)
        if origin is None:
            return False
        if origin == self._hosts.origin or self._hosts.operator_allows(origin[1]):
            return True
        host = req.get_header("Host")
        try:
            name, port = split_authority(host) if host else ("", None)
        except ValueError:
            return False
        scheme = req.scheme.lower()
        return origin == (scheme, name, port if port is not None else DEFAULT_PORTS.get(scheme, 0))


def _check_body_type(req: falcon.Request) -> None:
    """415 unless the request declares JSON or sends no body at all: the types a page of
    another site may send without a preflight (forms, text/plain) are never JSON."""
    content_type = req.get_header("Content-Type")
    if content_type is None and not req.content_length:
        return
    if content_type is not None and _is_json(content_type):
        return
    raise falcon.HTTPUnsupportedMediaType(
        title="Unsupported media type",
        description=f"A {req.method} body must be JSON (Content-Type: application/json), "
        f"not {_shown(content_type) if content_type else 'without a Content-Type'}; or send "
        "no body.",
    )
