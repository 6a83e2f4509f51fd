"""The falcon app: one route table, collaborators passed in, errors mapped to JSON in one place.

Every error leaves as ``{"error": {"title": ..., "description": ...}}`` with
its status: falcon's own (404 for an unknown route, 405, 400 for a bad query
parameter or body), ours (404 unknown job or run), 503 when a store is
unavailable, 401/403 for a missing or too weak token (see auth.py), 421 for a
Host this peer does not answer to, 403/415 for a cross-site request (see
hosts.py), and 500 for anything unexpected, logged with its traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import falcon

from distcrond.api import resources
from distcrond.api.auth import Authorization, TokenSource
from distcrond.api.hosts import AllowedHosts, CrossSiteCheck, HostCheck
from distcrond.api.limits import BodyLimit
from distcrond.api.metrics import Metrics
from distcrond.api.resources import API_PREFIX, APIContext
from distcrond.clock import Clock
from distcrond.coordination.base import CoordinationStore, StoreUnavailable
from distcrond.reporting.base import ReportStore

log = logging.getLogger(__name__)

# The one route table: create_app adds these, and the OpenAPI document must describe exactly these.
ROUTES: tuple[tuple[str, type[Any]], ...] = (
    (f"{API_PREFIX}/health", resources.Health),
    (f"{API_PREFIX}/health/live", resources.Live),
    (f"{API_PREFIX}/health/ready", resources.Ready),
    (f"{API_PREFIX}/cluster", resources.Cluster),
    (f"{API_PREFIX}/jobs", resources.Jobs),
    (f"{API_PREFIX}/jobs/{{job_id}}", resources.Job),
    (f"{API_PREFIX}/jobs/{{job_id}}/runs", resources.JobRuns),
    (f"{API_PREFIX}/runs", resources.Runs),
    (f"{API_PREFIX}/runs/{{run_id}}", resources.Run),
    (f"{API_PREFIX}/runs/{{run_id}}/cancel", resources.RunCancel),
    (f"{API_PREFIX}/nodes", resources.Nodes),
    (f"{API_PREFIX}/config/errors", resources.ConfigErrors),
    (f"{API_PREFIX}/openapi.json", resources.OpenAPI),
    ("/metrics", Metrics),
)

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def route_methods(resource: type[Any]) -> list[str]:
    """The HTTP methods a resource class answers (its ``on_<method>`` responders)."""
    return [m for m in HTTP_METHODS if callable(getattr(resource, f"on_{m.lower()}", None))]


def create_app(
    coordination: CoordinationStore,
    reports: ReportStore,
    peer_id: str,
    clock: Clock | None = None,
    spool_dir: Path | None = None,
    stall_timeout: float = 5.0,
    tokens: TokenSource | None = None,
    hosts: AllowedHosts | None = None,
) -> falcon.App:
    """The API over the given stores, answering as peer ``peer_id`` (whose report spool,
    if its reports go to Elasticsearch, is ``spool_dir``); with ``tokens``, only to the
    holders of a token with the role each route needs (see :mod:`distcrond.api.auth`);
    with ``hosts``, only to requests naming one of them (the server always gives the
    peer's, :meth:`AllowedHosts.of`; without, the Host is not checked). Cross-site
    requests that would change something are refused either way (:mod:`.hosts`)."""
    ctx = APIContext(coordination, reports, peer_id, clock or Clock(), spool_dir, stall_timeout)
    middleware: list[Any] = [HostCheck(hosts)] if hosts is not None else []
    # In this order: the body's size before anything reads it, where the request comes
    # from once its route is known (so that its refusal is audited), then the token.
    middleware += [BodyLimit(), CrossSiteCheck(hosts), Authorization(tokens, peer_id)]
    app = falcon.App(media_type=falcon.MEDIA_JSON, middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    for template, resource in ROUTES:
        app.add_route(template, resource(ctx))
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(StoreUnavailable, _store_unavailable)
    app.add_error_handler(Exception, _unexpected_error)
    return app


def _serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    description = error.description
    if description is None:
        if isinstance(error, falcon.HTTPMethodNotAllowed):
            description = f"{req.method} is not allowed on {req.path}."
        elif isinstance(error, falcon.HTTPNotFound):
            description = f"There is no resource at {req.path}; see {API_PREFIX}/openapi.json."
        else:
            description = ""
    resp.content_type = falcon.MEDIA_JSON
    resp.media = {"error": {"title": error.title, "description": description}}


def _store_unavailable(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]
) -> None:
    log.warning("store unavailable during %s %s: %s", req.method, req.path, ex)
    raise falcon.HTTPServiceUnavailable(
        title="Store unavailable",
        description=str(ex) or "A store this request needs cannot be reached now.",
        retry_after=5,
    )


def _unexpected_error(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]
) -> None:
    log.error("unexpected error in %s %s", req.method, req.path, exc_info=ex)
    raise falcon.HTTPInternalServerError(
        title="Internal error",
        description=f"{type(ex).__name__} in {req.method} {req.path}; see the peer's log.",
    )
