"""The HTTP API's OpenAPI document: what FastAPI derives from the routes, completed with what it
cannot see.

- Errors: every handler answers `{"error": "..."}` as JSON, whatever the route's own media
  type; FastAPI would declare a text route's errors as text (a generated client then crashes
  on the JSON it gets), so each route declares its error statuses with `errors()`, as JSON.
- Event streams: the routes return an sse-starlette response, which FastAPI cannot look into;
  `event_stream()` declares `text/event-stream`, the event names (`x-events`, one entry each)
  and, under `components/schemas`, the JSON each event's `data:` line carries, built from the
  journal's own event classes so the two cannot drift apart.
- The bearer token: the routes depend on FastAPI's `HTTPBearer`, which declares the
  `securitySchemes` entry and applies it to every guarded operation (all but `/healthz`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter

from agent.events import KNOWN, EventType

REF = "#/components/schemas/{model}"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"


class ErrorOut(BaseModel):
    """Every error answer: one line for a human."""

    error: str


# Why each error status is sent; a route lists the ones it can send.
WHY: dict[int, str] = {
    401: "No or a wrong bearer token (only when LOOM_OPS_API_TOKEN is set); "
    "`WWW-Authenticate: Bearer`.",
    403: "The decider (LOOM_OPS_API_USER) may not decide: not among the runbook's approvers, "
    "or four eyes.",
    404: "No run (or approval request) has that id.",
    409: "The state forbids it now: the run id exists, the run already ended, the request is "
    "decided, this person's approval is already counted, or several requests are open and "
    "`approval` names none.",
    413: "The request body is over LOOM_OPS_MAX_BODY_BYTES (LOOM_OPS_MAX_ALERT_BODY_BYTES for "
    "the alert routes).",
    422: "Invalid input: a body, path, query or header value; the text names it.",
    429: "LOOM_OPS_MAX_ACTIVE_RUNS runs are active; try again after `Retry-After` seconds.",
    500: "A bug; the traceback is in the server's log.",
    503: "The store (database) does not answer; try again.",
}


# The headers an error comes with, besides its body.
HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}}},
    429: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status as the JSON `ErrorOut` body it is sent with."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(statuses):
        responses[status] = {
            "description": WHY[status],
            "content": {JSON: {"schema": {"$ref": REF.format(model="ErrorOut")}}},
        }
        if status in HEADERS:
            responses[status]["headers"] = HEADERS[status]
    return responses


# -- event streams -------------------------------------------------------------------------------

STREAM_DESCRIPTION = """\
Server-Sent Events, one per journal event of the run and the runs below it, in journal order.
Each event is **named** after the journal event's type (`event: tool_intent`), so a browser's
`EventSource` receives it through `addEventListener("tool_intent", …)`, not `onmessage`
(which only sees unnamed events); the names are listed under `x-events`, and a client should
ignore names it does not know (a newer server may add some). `id:` is the journal sequence
(`seq`): a reconnect with `Last-Event-ID` (or `?after=`) goes on with no gap and no repeat.
`data:` is one JSON object, `StreamEvent`: `seq`, `run_id` (the run that wrote it: the root
or a child), `ts` (Unix seconds), `type` (the event's name again) and `data` (the event's own
payload, one schema per name). Comment lines (`: ping`) keep an idle stream alive. The stream
ends after the root run's last event (`run_finished` whose `run_id` is the root); `GET
/runs/{run_id}/events` answers a reconnect after that with 204, which stops an EventSource.
"""


def _title(event_type: str) -> str:
    return KNOWN[event_type].__name__


def _payload_schemas() -> dict[str, dict[str, Any]]:
    """`components/schemas` entries: each event's payload, and its envelope on the stream."""
    schemas: dict[str, dict[str, Any]] = {}
    for event_type, cls in KNOWN.items():
        name = _title(event_type)
        payload = TypeAdapter(cls).json_schema(ref_template=REF)
        # The payload is open: a newer server may add fields, and this schema must not
        # make a client refuse them.
        payload.pop("additionalProperties", None)
        schemas.update(payload.pop("$defs", {}))  # nested records, if one ever has them
        schemas[name] = payload
        schemas[f"{name}Event"] = {
            "title": f"{name}Event",
            "description": f"The `{event_type}` event on a stream: {_doc(cls)}",
            "type": "object",
            "properties": {
                "seq": {"type": "integer", "description": "Journal sequence; the SSE `id:`."},
                "run_id": {"type": "string", "description": "The run that wrote the event."},
                "ts": {"type": "number", "description": "When, in Unix seconds."},
                "type": {"type": "string", "enum": [event_type]},
                "data": {"$ref": REF.format(model=name)},
            },
            "required": ["seq", "run_id", "ts", "type", "data"],
        }
    schemas["StreamEvent"] = {
        "title": "StreamEvent",
        "description": "The JSON of an event stream's `data:` line; `type` is the SSE event "
        "name and says which payload `data` holds.",
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "run_id": {"type": "string"},
            "ts": {"type": "number"},
            "type": {"type": "string", "enum": sorted(KNOWN)},
            "data": {"type": "object", "additionalProperties": True},
        },
        "required": ["seq", "run_id", "ts", "type", "data"],
    }
    return schemas


def _doc(cls: type) -> str:
    """The first paragraph of an event class's docstring, on one line."""
    text = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(text.split())


def stream_events() -> dict[str, dict[str, Any]]:
    """The event names of a stream: for each, what it means and the schema of its `data:`
    line."""
    return {
        str(event_type): {
            "description": _doc(KNOWN[event_type]),
            "schema": {"$ref": REF.format(model=f"{_title(event_type)}Event")},
        }
        for event_type in EventType
    }


def event_stream(description: str, *, ends_with_204: bool = False) -> dict[int | str, Any]:
    """`responses=` for a route that streams a run tree's journal as SSE."""
    # The names in prose too: documentation renderers show a description, not `x-events`.
    names = "\n".join(f"- `{name}`: {e['description']}" for name, e in stream_events().items())
    responses: dict[int | str, Any] = {
        200: {
            "description": f"{description}\n\n{STREAM_DESCRIPTION}\nEvents:\n\n{names}",
            "content": {
                EVENT_STREAM: {
                    "schema": {"type": "string", "description": "text/event-stream"},
                    "x-events": stream_events(),
                }
            },
        }
    }
    if ends_with_204:
        responses[204] = {
            "description": "The run has ended and every event after the cursor "
            "(`Last-Event-ID` or `?after=`) was delivered already: nothing more will come, "
            "so an EventSource stops reconnecting."
        }
    return responses


# -- the document -------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Serve FastAPI's document completed with the error and event schemas (built once)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorOut"] = ErrorOut.model_json_schema(ref_template=REF)
            schemas.update(_payload_schemas())
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
