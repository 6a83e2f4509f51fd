"""The OpenAPI 3.1 document of the API, served at ``/api/v1/openapi.json``.

Written by hand next to the resources, and held to them by
``tests/test_openapi.py``: its paths and methods must be exactly the app's
route table. The job and node definitions are the file models' own JSON
Schemas (pydantic), so they cannot drift from what the files accept.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic.json_schema import models_json_schema

import distcrond
from distcrond.config.models import ID_PATTERN, JobSpec, NodeSpec
from distcrond.runs import RunState

JSON = "application/json"
Schema = dict[str, Any]

TIMESTAMP: Schema = {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339 in UTC with microseconds, e.g. 2026-11-27T03:10:00.000000Z",
}
TERMINAL_STATES = [s.value for s in RunState if s.terminal]
ALL_STATES = [s.value for s in RunState]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: dict[str, Schema],
    *,
    extra: bool = False,
    description: str = "",
    optional: dict[str, Schema] | None = None,
) -> Schema:
    """An object with exactly ``properties`` (all required) and the ``optional`` ones."""
    out: Schema = {
        "type": "object",
        "properties": properties | (optional or {}),
        "required": list(properties),
        "additionalProperties": extra,
    }
    if description:
        out["description"] = description
    return out


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


# A page of finished runs: what a job's runs and a search share.
_PAGE_OF_RUNS: dict[str, Schema] = {
    "runs": array(ref("Run")) | {"description": "Finished runs, newest slot first."},
    "next_cursor": nullable({"type": "string"})
    | {"description": "Pass as `cursor` for the next page; null on the last."},
}


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}

_RUN_RECORD_PROPS: dict[str, Schema] = {
    "run_id": STRING,
    "job_id": STRING,
    "slot": TIMESTAMP,
    "node_id": nullable(STRING),
    "peer_id": nullable(STRING),
    "state": {"type": "string", "enum": ALL_STATES},
    "trigger": {"type": "string", "enum": ["schedule", "manual", "misfire"]},
    "attempt": INTEGER,
    "epoch": INTEGER,
    "created_at": nullable(TIMESTAMP),
    "started_at": nullable(TIMESTAMP),
    "ended_at": nullable(TIMESTAMP),
    "exit_code": nullable(INTEGER),
    "reason": STRING,
    "at_least_once": BOOLEAN,
    "cancel_requested": BOOLEAN,
    "triggered_by": nullable(STRING),
    "cancelled_by": nullable(STRING),
}

_RUN_PROPS: dict[str, Schema] = {
    "run_id": STRING,
    "job_id": STRING,
    "slot": TIMESTAMP,
    "state": {"type": "string", "enum": ALL_STATES},
    "node_id": nullable(STRING),
    "peer_id": nullable(STRING),
    "trigger": {"type": "string", "enum": ["schedule", "manual", "misfire"]},
    "attempts": INTEGER,
    "started_at": nullable(TIMESTAMP),
    "ended_at": nullable(TIMESTAMP),
    "duration_ms": nullable(INTEGER),
    "exit_code": nullable(INTEGER),
    "reason": STRING,
    "stdout": STRING,
    "stderr": STRING,
    "output_truncated": BOOLEAN,
    "triggered_by": nullable(STRING)
    | {"description": "Who ran it by hand: the API token's name (`anonymous` without tokens)."},
    "cancelled_by": nullable(STRING) | {"description": "Who cancelled it: the API token's name."},
    "extra": {"type": "object"},
}


def _schemas() -> dict[str, Schema]:
    _, defs = models_json_schema(
        [(JobSpec, "serialization"), (NodeSpec, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Schema] = dict(defs["$defs"])
    store_status = obj({"ok": BOOLEAN, "backend": STRING, "detail": STRING})
    config_error = obj(
        {"file": STRING, "field": STRING, "reason": STRING},
        extra=True,
        description="A job or node file that failed to load; the last good version keeps running.",
    )
    last_run = nullable(
        obj(
            {
                "run_id": STRING,
                "state": {"type": "string", "enum": ALL_STATES},
                "slot": TIMESTAMP,
                "exit_code": nullable(INTEGER),
                "ended_at": nullable(TIMESTAMP),
            },
            description="The newest finished run in the report store.",
        )
    )
    next_slot = nullable(TIMESTAMP) | {
        "description": "The next scheduled slot; null when disabled."
    }
    schemas.update(
        {
            "Error": obj(
                {"error": obj({"title": STRING, "description": STRING})},
                description="Every 4xx and 5xx answer has this body.",
            ),
            "StoreStatus": store_status,
            "Liveness": obj(
                {"status": {"type": "string", "enum": ["ok"]}, "peer_id": STRING},
                description="This peer's API answers.",
            ),
            "Health": obj(
                {
                    "status": {"type": "string", "enum": ["ok", "degraded"]},
                    "peer_id": STRING,
                    "is_leader": BOOLEAN,
                    "leader_id": nullable(STRING),
                    "epoch": nullable(INTEGER),
                    "version": STRING,
                    "stores": obj(
                        {"coordination": ref("StoreStatus"), "reports": ref("StoreStatus")}
                    ),
                    "scheduler": nullable(ref("SchedulerHealth"))
                    | {"description": "null when the coordination store does not answer."},
                },
                optional={
                    "report_spool": ref("SpoolStats")
                    | {"description": "Only when reports go to Elasticsearch: what waits for it."}
                },
            ),
            "SchedulerHealth": obj(
                {
                    "ok": BOOLEAN
                    | {"description": "A leader completed a pass within the stall timeout."},
                    "last_pass": nullable(TIMESTAMP)
                    | {"description": "The current leader's newest completed pass."},
                    "last_pass_epoch": nullable(INTEGER),
                    "last_pass_age_seconds": nullable({"type": "number"})
                    | {
                        "description": "Seconds the current leader has gone without a pass "
                        "(since it took over, before its first; with no leader, since the "
                        "last leader's newest pass); null when none is known."
                    },
                    "stall_timeout_seconds": {"type": "number"},
                    "detail": STRING,
                },
                description="Whether the cluster schedules.",
            ),
            "SpoolStats": obj(
                {
                    "reports": INTEGER | {"description": "Reports not yet accepted."},
                    "bytes": INTEGER,
                    "oldest_age_s": nullable({"type": "number"})
                    | {"description": "Seconds since the oldest waiting report was spooled."},
                    "dead_letters": INTEGER
                    | {"description": "Reports refused for good, kept in dead-letters.ndjson."},
                    "last_error": STRING
                    | {"description": "The last delivery error; empty once one works."},
                }
            ),
            "RunSearch": obj(
                {
                    **_PAGE_OF_RUNS,
                }
            ),
            "Leader": obj({"peer_id": STRING, "epoch": INTEGER, "since": TIMESTAMP}),
            "Peer": obj(
                {
                    "peer_id": STRING,
                    "api_url": STRING,
                    "started_at": TIMESTAMP,
                    "version": STRING,
                    "roles": array(STRING),
                    "config_digest": STRING,
                    "pid": INTEGER,
                    "host": STRING,
                    "is_leader": BOOLEAN,
                    "config_drift": {
                        "type": "boolean",
                        "description": "Its config digest differs from the leader's.",
                    },
                }
            ),
            "Cluster": obj(
                {
                    "leader": nullable(ref("Leader")),
                    "epoch": nullable(INTEGER),
                    "peers": array(ref("Peer")),
                    "drift": {
                        "type": "array",
                        "items": STRING,
                        "description": "Ids of peers whose config differs from the leader's.",
                    },
                }
            ),
            "LastRun": last_run,
            "Schedule": JobSpec.model_json_schema(
                mode="serialization", ref_template="#/components/schemas/{model}"
            )["properties"]["schedule"],
            "JobSummary": obj(
                {
                    "id": STRING,
                    "description": STRING,
                    "enabled": BOOLEAN,
                    "schedule": ref("Schedule"),
                    "policy": ref("Policy"),
                    "next_slot": next_slot,
                    "last_run": ref("LastRun"),
                }
            ),
            "JobList": obj({"jobs": array(ref("JobSummary"))}),
            "JobDetail": obj(
                {
                    "job": ref("JobSpec"),
                    "next_slot": next_slot,
                    "last_run": ref("LastRun"),
                    "active_runs": array(ref("RunRecord")),
                    "errors": array(ref("ConfigError")),
                }
            ),
            "RunRecord": obj(
                _RUN_RECORD_PROPS,
                description="A run as the coordination store records it: live state, no output.",
            ),
            "Run": obj(
                _RUN_PROPS,
                description="A finished run as the report store keeps it, with its output.",
            ),
            "RunList": obj(
                {
                    "job_id": STRING,
                    "active": {
                        "type": "array",
                        "items": ref("RunRecord"),
                        "description": "Assigned and running runs; on the first page only.",
                    },
                    **_PAGE_OF_RUNS,
                }
            ),
            "TriggerBody": {
                "type": "object",
                "description": "Reserved for options; send nothing or {}.",
            },
            "Readiness": obj(
                {
                    "status": {"type": "string", "enum": ["ready", "not ready"]},
                    "peer_id": STRING,
                    "is_leader": BOOLEAN,
                    "reasons": array(STRING),
                }
            ),
            "TriggerAccepted": obj(
                {"run_id": STRING, "job_id": STRING, "slot": TIMESTAMP, "status_url": STRING}
            ),
            "CancelAccepted": obj(
                {
                    "run_id": STRING,
                    "state": {"type": "string", "enum": ALL_STATES},
                    "cancel_requested": {"const": True},
                    "cancelled_by": nullable(STRING)
                    | {"description": "Who asked first (a second request changes nothing)."},
                    "status_url": STRING,
                }
            ),
            "FinishedRun": obj(
                _RUN_PROPS | {"source": {"const": "reports"}},
                description="A finished run, from the report store.",
            ),
            "ActiveRun": obj(
                _RUN_RECORD_PROPS
                | {
                    "stdout": {"type": "null"},
                    "stderr": {"type": "null"},
                    "source": {"const": "coordination"},
                },
                description="A run not reported yet (active, or finished moments ago).",
            ),
            "QueuedRun": obj(
                {
                    "run_id": STRING,
                    "job_id": STRING,
                    "slot": TIMESTAMP,
                    "state": {"const": "queued"},
                    "source": {"const": "triggers"},
                },
                description="A manual run the leader has not recorded yet.",
            ),
            "RunGroup": obj(
                {
                    "run_id": STRING,
                    "job_id": STRING,
                    "slot": TIMESTAMP,
                    "source": {"const": "nodes"},
                    "runs": array({"anyOf": [ref("FinishedRun"), ref("ActiveRun")]}),
                },
                description="A slot its policy ran on several nodes: each node's run "
                "(ids '<run_id>~<node>').",
            ),
            "RunLookup": {
                "oneOf": [ref("FinishedRun"), ref("ActiveRun"), ref("QueuedRun"), ref("RunGroup")],
            },
            "Node": {
                "allOf": [
                    ref("NodeSpec"),
                    {
                        "type": "object",
                        "properties": {
                            "active_runs": INTEGER,
                            "healthy": BOOLEAN,
                            "health": nullable(ref("NodeHealth")),
                        },
                        "required": ["id", "active_runs", "healthy", "health"],
                    },
                ]
            },
            "NodeList": obj({"nodes": array(ref("Node"))}),
            "NodeHealth": obj(
                {
                    "node_id": STRING,
                    "reason": STRING,
                    "since": TIMESTAMP,
                    "failures": INTEGER,
                    "reported_by": STRING,
                    "next_check": nullable(TIMESTAMP),
                },
                description="Why a node is unhealthy (it failed to connect) and since when.",
            ),
            "ConfigError": config_error,
            "ConfigErrors": obj(
                {
                    "peer_id": nullable(STRING)
                    | {"description": "Whose config this is: the leader's, else this peer's."},
                    "errors": array(ref("ConfigError")),
                }
            ),
        }
    )
    # NodeSpec forbids extra keys, which would reject "active_runs" inside the allOf.
    schemas["NodeSpec"] = {
        k: v for k, v in schemas["NodeSpec"].items() if k != "additionalProperties"
    }
    return schemas


def _ok(description: str, schema: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {JSON: {"schema": ref(schema)}}}}


def _errors(*statuses: str) -> dict[str, Any]:
    every = ("401", "421", "500", "503")
    return {s: {"$ref": f"#/components/responses/{s}"} for s in (*every, *statuses)}


def _param(name: str, where: str, schema: Schema, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


# The ids' forms (config/models.py ID_PATTERN; runs.py run_id_for), so that a client, and a
# fuzzer, knows what can name a job or a run at all.
ID = ID_PATTERN.pattern.strip("^$")
SLOT = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})"
JOB_ID = _param(
    "job_id",
    "path",
    {"type": "string", "pattern": f"^{ID}$"},
    "The job's id: its file name without .json.",
)
RUN_FILTERS = [
    _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
        "Finished runs per page.",
    ),
    _param("cursor", "query", STRING, "`next_cursor` of the previous page."),
    _param(
        "state",
        "query",
        array({"type": "string", "enum": ALL_STATES}),
        "Only runs in these states (comma-separated).",
    )
    | {"style": "form", "explode": False},
    _param("node", "query", STRING, "Only runs on this node."),
    _param("since", "query", TIMESTAMP, "Only slots at or after this instant."),
    _param("until", "query", TIMESTAMP, "Only slots before this instant."),
    _param(
        "q",
        "query",
        STRING,
        "Only runs whose stdout or stderr contains every word of this (case-insensitive).",
    ),
]
RUN_ID = _param(
    "run_id",
    "path",
    {"type": "string", "pattern": f"^{ID}@{SLOT}(~{ID})?$"},
    "'<job>@<slot>' (slot in RFC 3339), or '<job>@<slot>~<node>' for one node's run.",
)


def _paths() -> dict[str, Any]:
    return {
        "/api/v1/health": {
            "get": {
                "operationId": "getHealth",
                "summary": "Whether this peer's stores answer and the cluster schedules",
                "tags": ["cluster"],
                "responses": {
                    **_ok("Both stores answer; the leader's last pass is recent.", "Health"),
                    "503": {
                        "description": "A store does not answer, or no leader completed a "
                        "scheduler pass within the stall timeout (same body, status degraded).",
                        "content": {JSON: {"schema": ref("Health")}},
                    },
                    "401": {"$ref": "#/components/responses/401"},
                    "421": {"$ref": "#/components/responses/421"},
                    "500": {"$ref": "#/components/responses/500"},
                },
            }
        },
        "/api/v1/health/live": {
            "get": {
                "operationId": "getLiveness",
                "summary": "Liveness: 200 while this peer's API answers (no token needed)",
                "description": "Reads no store: a store's outage does not make a peer look dead.",
                "tags": ["cluster"],
                "security": [],
                "responses": {
                    **_ok("This peer answers.", "Liveness"),
                    "421": {"$ref": "#/components/responses/421"},
                },
            }
        },
        "/api/v1/health/ready": {
            "get": {
                "operationId": "getReadiness",
                "summary": "Readiness: 200 when this peer's stores answer and, if it leads, "
                "its scheduler passes",
                "description": "503, with the same body, when not; `reasons` says why. A "
                "follower stays ready while the leader stalls (see `/api/v1/health`).",
                "tags": ["cluster"],
                "responses": {
                    **_ok("Ready.", "Readiness"),
                    "503": {
                        "description": "Not ready.",
                        "content": {JSON: {"schema": ref("Readiness")}},
                    },
                    **{k: v for k, v in _errors().items() if k != "503"},
                },
            }
        },
        "/api/v1/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "The leader, the live peers and config drift",
                "tags": ["cluster"],
                "responses": {**_ok("The cluster.", "Cluster"), **_errors()},
            }
        },
        "/api/v1/jobs": {
            "get": {
                "operationId": "listJobs",
                "summary": "Every loaded job, with its next slot and last run",
                "description": "The leader's loaded config; this peer's when there is no leader "
                "or it has published none.",
                "tags": ["jobs"],
                "responses": {**_ok("Jobs, sorted by id.", "JobList"), **_errors()},
            }
        },
        "/api/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "One job: definition, next slot, last and active runs, file errors",
                "tags": ["jobs"],
                "parameters": [JOB_ID],
                "responses": {**_ok("The job.", "JobDetail"), **_errors("404")},
            }
        },
        "/api/v1/jobs/{job_id}/runs": {
            "get": {
                "operationId": "listJobRuns",
                "summary": "A job's runs: active ones, then finished ones newest first",
                "description": "Keyset pagination: pass `next_cursor` back as `cursor` with the "
                "same filters. History of a job no longer loaded is still served.",
                "tags": ["runs"],
                "parameters": [JOB_ID, *RUN_FILTERS],
                "responses": {**_ok("One page of runs.", "RunList"), **_errors("400", "404")},
            },
            "post": {
                "operationId": "triggerJob",
                "summary": "Run a job now",
                "description": "Queues a manual run with slot = now; the leader records and "
                "assigns it. A disabled job may still be triggered by hand: the explicit request "
                "wins over `enabled: false`. Follow `status_url` (also the Location header).",
                "tags": ["runs"],
                "parameters": [JOB_ID],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": ref("TriggerBody")}},
                },
                "responses": {
                    "202": {
                        "description": "Queued.",
                        "headers": {
                            "Location": {
                                "description": "The run's status URL.",
                                "schema": STRING,
                            }
                        },
                        "content": {JSON: {"schema": ref("TriggerAccepted")}},
                    },
                    **_errors("400", "403", "404", "411", "413", "415"),
                },
            },
        },
        "/api/v1/runs": {
            "get": {
                "operationId": "searchRuns",
                "summary": "Finished runs of every job, newest first; `q` searches their output",
                "description": "The report store's history across jobs, with the filters of a "
                "job's runs plus `job`. Keyset pagination as there.",
                "tags": ["runs"],
                "parameters": [
                    _param("job", "query", STRING, "Only this job's runs."),
                    *RUN_FILTERS,
                ],
                "responses": {**_ok("One page of runs.", "RunSearch"), **_errors("400")},
            }
        },
        "/api/v1/runs/{run_id}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run, wherever it is now",
                "description": "Looked up in the report store (finished, with output), then the "
                "coordination store (active), then the queued manual runs; a slot-level id of a "
                "slot run on several nodes answers each node's run. `source` says which.",
                "tags": ["runs"],
                "parameters": [RUN_ID],
                "responses": {**_ok("The run.", "RunLookup"), **_errors("400", "404")},
            }
        },
        "/api/v1/runs/{run_id}/cancel": {
            "post": {
                "operationId": "cancelRun",
                "summary": "End an active run",
                "description": "The peer executing the run ends the command's whole process "
                "group (locally or on the SSH node); a run not started yet never starts. The run "
                'ends `failed`, reason "cancelled by <token name>". Needs the role `operate`.',
                "tags": ["runs"],
                "parameters": [RUN_ID],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": ref("TriggerBody")}},
                },
                "responses": {
                    "202": {
                        "description": "Being ended.",
                        "headers": {
                            "Location": {
                                "description": "The run's status URL.",
                                "schema": STRING,
                            }
                        },
                        "content": {JSON: {"schema": ref("CancelAccepted")}},
                    },
                    **_errors("400", "403", "404", "409", "411", "413", "415"),
                },
            }
        },
        "/api/v1/nodes": {
            "get": {
                "operationId": "listNodes",
                "summary": "The loaded nodes, with their active run counts",
                "tags": ["nodes"],
                "responses": {**_ok("Nodes, sorted by id.", "NodeList"), **_errors()},
            }
        },
        "/api/v1/config/errors": {
            "get": {
                "operationId": "listConfigErrors",
                "summary": "Job and node files that failed to load",
                "tags": ["config"],
                "responses": {**_ok("The errors.", "ConfigErrors"), **_errors()},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "This peer's figures for Prometheus",
                "description": "Gauges read at scrape time: store up, leader, active runs and, "
                "with Elasticsearch reports, the report spool's size, age and dead letters.",
                "tags": ["meta"],
                "responses": {
                    "200": {
                        "description": "The Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": STRING}},
                    },
                    **_errors(),
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This document",
                "tags": ["meta"],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    },
                    **_errors(),
                },
            }
        },
    }


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("Error")}}}


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "distcrond API",
            "version": distcrond.__version__,
            "description": "Every peer serves the same API over the shared stores: any peer "
            "answers any question about the cluster. A peer started with --api-tokens wants "
            "'Authorization: Bearer <token>' on every request but the liveness check: reading "
            "needs the role read, triggering a run operate.",
        },
        "paths": _paths(),
        "security": [{"bearer": []}],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of the peer's --api-tokens file.",
                }
            },
            "responses": {
                "401": _error_response("No token, or one this peer does not know."),
                "403": _error_response(
                    "The token's role is too low for this request, or it is a cross-site "
                    "request (a foreign Origin, Sec-Fetch-Site: cross-site) that would change "
                    "something."
                ),
                "400": _error_response("A bad parameter, body or run id."),
                "404": _error_response("No such job, run or route."),
                "409": _error_response("The run has ended, or is queued and not assigned yet."),
                "411": _error_response("A body without Content-Length (chunked)."),
                "413": _error_response("A body over 1 MiB."),
                "415": _error_response("A body that is not JSON (Content-Type)."),
                "421": _error_response(
                    "The Host header names a host this peer does not answer to "
                    "(see --api-allowed-host)."
                ),
                "500": _error_response("An unexpected error (logged by the peer)."),
                "503": _error_response("A store cannot be reached now."),
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
