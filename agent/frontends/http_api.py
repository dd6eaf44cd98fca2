"""The HTTP API (`loom-ops serve`): start runs, stream their journal as Server-Sent Events,
decide approvals, explain, trace, health and metrics, over the one RunService.

Runs are not tied to a connection: a start returns (or starts streaming) at once and the run
is driven by the service; a client that goes away stops only its stream. Every error is a
JSON body `{"error": "..."}`: a refusal's status is its kind's (`STATUS`), its text the
refuser's; a 4xx for anything the client sent. Each route declares the errors it sends, and
the OpenAPI document (`agent.frontends.openapi`) says how each looks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.errors import ErrorKind, LoomOpsError, ServiceError, kind_of
from agent.frontends import openapi
from agent.frontends.openapi import errors, event_stream
from agent.frontends.same_site import SameSiteOnly, server_names
from agent.records import ApprovalRecord, Decision, Origin, RunRecord, RunStatus
from agent.runbook.request import MAX_REQUEST_BYTES
from agent.service.runs import (
    MAX_NOTE_BYTES,
    RUN_ID_PATTERN,
    RunService,
    validate_text,
)
from agent.views.explain import explain_tree
from agent.views.metrics import CONTENT_TYPE, render_metrics
from agent.views.trace import render_trace, trace_of

log = logging.getLogger(__name__)

RUN_ID = RUN_ID_PATTERN.pattern
# Seconds between keep-alive comments on an idle event stream (proxies drop silent ones).
KEEP_ALIVE = 15
# Streams are woken by the writes of their own runs (or another process's writes); this is
# only how long an idle stream goes without looking for itself.
STREAM_SAFETY_POLL = 30.0
RETRY_AFTER_SECONDS = 5
# Ids and journal cursors fit SQLite's 64-bit integers with room to spare.
MAX_ID = 10**15
EVENT_ID = re.compile(r"^[0-9]{1,15}$")

# One answer for a missing, unknown and revoked token: which it was is nobody's business.
NO_TOKEN = "missing or wrong bearer token"

RunIdPath = Annotated[str, Path(pattern=RUN_ID, max_length=128)]

# Reads the Authorization header and declares the bearer scheme in the OpenAPI document; it
# refuses nothing itself (auto_error=False): a missing token is our 401, in our error shape.
BEARER = HTTPBearer(
    scheme_name="bearer",
    description="A person's token (`loom-ops tokens create`; decisions are recorded as that "
    "person) or LOOM_OPS_API_TOKEN, as `Authorization: Bearer <token>`; needed only when the "
    "server has LOOM_OPS_API_TOKEN set.",
    auto_error=False,
)

# The status of each kind of refusal; the body is the refusal's own one line.
STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 422,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.BUSY: 429,
}


# -- bodies ------------------------------------------------------------------------------------


def _text_within(limit: int) -> Callable[[str | None], str | None]:
    """A validator: UTF-8 text of at most `limit` bytes, without NUL."""

    def check(value: str | None) -> str | None:
        if value is not None:
            try:
                validate_text("text", value, limit)
            except ServiceError as exc:
                raise ValueError(str(exc)) from None  # pydantic's way: a 422
        return value

    return check


class StartRun(BaseModel):
    """What starts a run: the incident message, optionally its id, a step budget, and
    whether a live run may start from the runbook its words match."""

    # A field this API does not know is a mistake to say, not to ignore: `{"skip": true}` on
    # an older server would otherwise run a step again that the client meant to skip.
    model_config = ConfigDict(extra="forbid")

    message: Annotated[
        str,
        Field(min_length=1, max_length=MAX_REQUEST_BYTES),
        AfterValidator(_text_within(MAX_REQUEST_BYTES)),
    ]
    run_id: str | None = Field(None, pattern=RUN_ID, max_length=128)
    max_steps: int | None = Field(None, ge=1, le=100_000)
    role: Literal["supervisor", "runbook"] = Field(
        "supervisor", description="supervisor: the planner/executor/verifier team"
    )
    yes: StrictBool = Field(  # a confirmation: `true`, never a string that coerces to it
        False,
        description=(
            "With a live switch on (LOOM_OPS_ALLOW_SHELL=1, LOOM_OPS_ALLOW_MCP=1), start from "
            "the runbook the message's words match; without it a live run starts only from a "
            "runbook the message names (its id first, or runbook=<id>), else 422. Dry runs "
            "ignore it."
        ),
    )


class DecisionBody(BaseModel):
    """A decision on a run's pending approval request."""

    model_config = ConfigDict(extra="forbid")  # unknown fields are a 422 (see StartRun)

    note: Annotated[
        str | None,
        Field(max_length=MAX_NOTE_BYTES),
        AfterValidator(_text_within(MAX_NOTE_BYTES)),
    ] = None
    approval: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="the request's number in the run (#1, #2): needed once a run had several",
    )
    skip: bool = Field(
        False,
        description="approve only, on a step that may or may not have run (in doubt): it ran, "
        "treat it as done instead of running it again",
    )


class ApprovalOut(BaseModel):
    """An approval request as the API shows it."""

    id: int
    number: int = Field(description="the request's number in its run (#1, #2): what to decide")
    run_id: str
    kind: str
    step_id: str | None
    action: str
    reason: str
    rollback: str | None
    deciders: list[str]
    status: str
    decided_by: str | None
    deadline_at: float
    mode: str | None = Field(None, description="live or dry-run")
    runs_on: str | None = Field(None, description="where the action runs")
    evidence: list[str] = Field(default_factory=list, description="what earlier steps found")


class RunOut(BaseModel):
    """A run as the API shows it, with the approval request it waits for, if any."""

    run_id: str
    parent_id: str | None
    role: str
    status: str
    runbook_id: str | None
    params: dict[str, Any]
    requested_by: str
    summary: str | None
    error: str | None
    created_at: float
    finished_at: float | None
    approval: ApprovalOut | None = None


class RunList(BaseModel):
    """A page of runs, newest first."""

    runs: list[RunOut]
    next_offset: int | None


class DecisionOut(BaseModel):
    """What a decision did: a request that needs several people stays pending (the run
    waits) until `required` of them approved."""

    message: str = Field(
        description="e.g. `approved by api:sam`, or `recorded: 1 of 2 approvals, waiting for "
        "one more`"
    )
    run: RunOut
    approved_by: list[str] = Field(
        default_factory=list,
        description="who approved the request so far, in order (approvals that still count)",
    )
    required: int = Field(1, description="approvals by distinct people the request needs")


def _approval_out(approval: ApprovalRecord | None) -> ApprovalOut | None:
    if approval is None:
        return None
    return ApprovalOut(
        id=approval.id,
        number=approval.number,
        run_id=approval.run_id,
        kind=str(approval.kind),
        step_id=approval.step_id,
        action=approval.action,
        reason=approval.reason,
        rollback=approval.rollback,
        deciders=approval.deciders,
        status=str(approval.status),
        decided_by=approval.decided_by,
        deadline_at=approval.deadline_at,
        mode=approval.mode,
        runs_on=approval.runs_on,
        evidence=approval.evidence,
    )


def _run_out(run: RunRecord, approval: ApprovalRecord | None = None) -> RunOut:
    return RunOut(
        run_id=run.id,
        parent_id=run.parent_id,
        role=run.role,
        status=str(run.status),
        runbook_id=run.runbook_id,
        params=run.params,
        requested_by=run.requested_by,
        summary=run.summary,
        error=run.error,
        created_at=run.created_at,
        finished_at=run.finished_at,
        approval=_approval_out(approval),
    )


class Caller(BaseModel):
    """Who a request acts as: a person's token's identity (`api:<token name>`), or
    LOOM_OPS_API_USER for the service token (`service`) or a server without a token."""

    identity: str
    service: bool = False


async def authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Caller:
    """Who the request acts as (a guarded route's dependency): 401 for a missing token when
    the server has one, and for any token that is neither it nor a person's live token."""
    service: RunService = request.app.state.service
    settings = service.settings
    token = settings.bearer_token()
    if credentials is None:
        if token is None:  # a loopback server without a token: as before tokens
            return Caller(identity=settings.api_user)
        raise HTTPException(401, NO_TOKEN, {"WWW-Authenticate": "Bearer"})
    given = credentials.credentials
    if token is not None and hmac.compare_digest(given.encode(), token.encode()):
        return Caller(identity=settings.api_user, service=True)
    person = await service.authenticate(given)
    if person is None:  # unknown, revoked, or its person left the people file
        raise HTTPException(401, NO_TOKEN, {"WWW-Authenticate": "Bearer"})
    return Caller(identity=person.identity)


As = Annotated[Caller, Depends(authorized)]  # the caller of a guarded route


# -- the app -----------------------------------------------------------------------------------


def create_app(service: RunService, bind_host: str | None = None) -> FastAPI:
    """The FastAPI application over `service`, served at `bind_host` (default: the
    setting): its name, loopback and LOOM_OPS_PUBLIC_HOSTS are the hosts it answers."""
    settings = service.settings
    # Set when the server stops: open event streams end cleanly instead of being cut.
    shutdown = asyncio.Event()

    app = FastAPI(
        title="loom-ops",
        summary="Durable runbook runs: start, stream, decide, explain.",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        # Operation ids are the handlers' names (`start_run`, `events`): what a generated
        # client names its functions, rather than FastAPI's path-and-method compounds.
        generate_unique_id_function=lambda route: route.name,
    )
    openapi.install(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        alert_max_bytes=settings.max_alert_body_bytes,
    )
    # Outermost: another site's request is refused before anything reads it.
    app.add_middleware(
        SameSiteOnly,
        names=server_names(bind_host or settings.host, settings.public_hosts),
        open_paths=("/healthz",),
        hint=" (a name it is served by goes in LOOM_OPS_PUBLIC_HOSTS)",
    )
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(LoomOpsError, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    guarded = [Depends(authorized)]

    def sends(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """The errors a guarded route sends: its own, and the token's, the cross-site
        refusal's, the body limit's, the store's and a bug's, which any guarded route may
        send."""
        return errors(401, 403, 413, 500, 503, *statuses)

    starts = sends(403, 409, 422, 429)

    async def start(body: StartRun, role: str, caller: Caller) -> RunRecord:
        run_id = body.run_id or f"run-{secrets.token_hex(4)}"
        return await service.start(
            run_id,
            body.message,
            role=role,
            requested_by=caller.identity,
            origin=Origin(kind="http"),
            max_steps=body.max_steps,
            wait=False,
            capped=True,
            guess_confirmed=body.yes,
        )

    @app.post("/runs", status_code=201, dependencies=guarded, responses=starts)
    async def start_run(body: StartRun, caller: As) -> RunOut:
        """Start a run; it goes on whatever happens to this connection."""
        return _run_out(await start(body, body.role, caller))

    @app.post(
        "/supervise",
        dependencies=guarded,
        response_class=EventSourceResponse,
        responses={**event_stream("The new run's tree, from its first event."), **starts},
    )
    async def supervise(body: StartRun, request: Request, caller: As) -> EventSourceResponse:
        """Start a supervised run and stream its tree's journal (seed-compatible)."""
        run = await start(body, "supervisor", caller)
        return _stream(service, run.id, 0, shutdown)

    @app.post(
        "/runbook",
        dependencies=guarded,
        response_class=EventSourceResponse,
        responses={**event_stream("The new run's journal, from its first event."), **starts},
    )
    async def runbook(body: StartRun, request: Request, caller: As) -> EventSourceResponse:
        """Start a single runbook run and stream its journal (seed-compatible)."""
        run = await start(body, "runbook", caller)
        return _stream(service, run.id, 0, shutdown)

    @app.get("/runs", dependencies=guarded, responses=sends(422))
    async def list_runs(
        status: RunStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> RunList:
        """Runs, newest first, optionally of one status."""
        runs = await service.list(status, limit, offset)
        next_offset = offset + len(runs) if len(runs) == limit else None
        return RunList(runs=[_run_out(r) for r in runs], next_offset=next_offset)

    @app.get("/runs/{run_id}", dependencies=guarded, responses=sends(404, 422))
    async def show_run(run_id: RunIdPath) -> RunOut:
        """One run and the approval request it waits for."""
        run = await service.get(run_id)
        return _run_out(run, await service.pending_approval(run.id))

    @app.get(
        "/runs/{run_id}/events",
        dependencies=guarded,
        response_class=EventSourceResponse,
        responses={
            **event_stream(
                "The run's tree after the cursor (all of it without one).", ends_with_204=True
            ),
            **sends(404, 422),
        },
    )
    async def events(
        run_id: RunIdPath,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    ) -> Response:
        """The journal of the run and the runs below it as SSE; `id:` is the journal sequence,
        so a reconnect with Last-Event-ID goes on with no gap and no repeat. 204 once the run
        has ended and nothing is left after the cursor."""
        run = await service.get(run_id)
        resume_from = after or 0
        if last_event_id:
            if not EVENT_ID.match(last_event_id):
                raise HTTPException(422, "Last-Event-ID must be an event id from this stream")
            resume_from = int(last_event_id)
        # An EventSource reconnects whenever a stream ends, even after the run's last event; an
        # empty 200 would have it retry every few seconds forever, a 204 makes it stop. The
        # status is read before the events: a run that has ended writes nothing more, so
        # nothing can land after this look.
        if run.status.is_terminal and not await service.tree_events(run_id, resume_from, 1):
            return Response(status_code=204)
        return _stream(service, run_id, resume_from, shutdown)

    async def decide(
        run_id: str, body: DecisionBody, decision: Decision, caller: Caller
    ) -> DecisionOut:
        if body.skip:
            if decision != Decision.APPROVE:
                raise HTTPException(422, "skip goes with approve: reject aborts the run")
            decision = Decision.SKIP
        run = await service.get(run_id)
        if run.status.is_terminal:
            raise HTTPException(409, f"run {run_id} is already {run.status}; nothing to decide")
        if caller.service:
            service.check_service_decider(caller.identity)
        result = await service.decide(
            run_id,
            decision,
            caller.identity,
            note=body.note,
            approval_number=body.approval,
            wait=False,
        )
        if not result.changed:
            raise HTTPException(409, result.message)
        # Still waiting (a request short of approvals, the next gate): the run as GET shows it.
        waits = None if result.run.status.is_terminal else await service.pending_approval(run_id)
        return DecisionOut(
            message=result.message,
            run=_run_out(result.run, waits),
            approved_by=result.approved_by,
            required=result.approval.required,
        )

    @app.post("/runs/{run_id}/approve", dependencies=guarded, responses=sends(403, 404, 409, 422))
    async def approve(
        run_id: RunIdPath, caller: As, body: DecisionBody | None = None
    ) -> DecisionOut:
        """Approve the run's pending request (as the token's person, else LOOM_OPS_API_USER);
        the run resumes. On a step in doubt, approve runs it again, and approve with `skip`
        treats it as done."""
        return await decide(run_id, body or DecisionBody(), Decision.APPROVE, caller)

    @app.post("/runs/{run_id}/reject", dependencies=guarded, responses=sends(403, 404, 409, 422))
    async def reject(
        run_id: RunIdPath, caller: As, body: DecisionBody | None = None
    ) -> DecisionOut:
        """Reject the run's pending request (as the token's person, else LOOM_OPS_API_USER);
        on a step in doubt, this aborts the run."""
        return await decide(run_id, body or DecisionBody(), Decision.REJECT, caller)

    @app.post("/runs/{run_id}/cancel", dependencies=guarded, responses=sends(404, 409, 422))
    async def cancel(run_id: RunIdPath, caller: As) -> RunOut:
        """Cancel the run and the runs below it."""
        run = await service.get(run_id)
        if run.status.is_terminal:
            raise HTTPException(409, f"run {run_id} is already {run.status}")
        return _run_out(await service.cancel(run_id, caller.identity, wait=False))

    @app.get(
        "/runs/{run_id}/explain",
        dependencies=guarded,
        response_class=PlainTextResponse,
        responses=sends(404, 422),
    )
    async def explain(run_id: RunIdPath) -> PlainTextResponse:
        """The timeline of the run and the runs below it, as text."""
        tree = await service.run_tree(run_id, calls=False, events=True)
        return PlainTextResponse(explain_tree(tree))

    @app.get(
        "/runs/{run_id}/trace",
        dependencies=guarded,
        response_class=HTMLResponse,
        responses=sends(404, 422),
    )
    async def trace(run_id: RunIdPath) -> HTMLResponse:
        """The self-contained HTML trace of the run tree."""
        tree = await service.run_tree(run_id, calls=False, events=True)
        return HTMLResponse(render_trace(trace_of(tree)))

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", responses=errors(403, 413, 500, 503))
    async def healthz() -> dict[str, str]:
        """200 while the store answers (HEAD too, for load balancers), else 503."""
        await service.schema_version()
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse, responses=sends())
    async def metrics() -> Response:
        """Prometheus text: counters of runs, tool, MCP and LLM calls, approvals and chat
        deliveries, and gauges of what is unfinished now (agent/views/metrics.py)."""
        return Response(render_metrics(await service.metrics()), media_type=CONTENT_TYPE)

    # Alert intake (POST /alerts/...); imported here, as that module builds on this one.
    from agent.frontends.alerts import install as install_alerts
    from agent.service.alerts import AlertService

    install_alerts(app, AlertService(service))

    app.state.shutdown = shutdown
    app.state.service = service  # for `authorized`
    return app


def _stream(
    service: RunService, run_id: str, after_seq: int, shutdown: asyncio.Event
) -> EventSourceResponse:
    return EventSourceResponse(
        _journal_events(service, run_id, after_seq, shutdown),
        ping=KEEP_ALIVE,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _journal_events(
    service: RunService, run_id: str, after_seq: int, shutdown: asyncio.Event
) -> AsyncIterator[ServerSentEvent]:
    """Every journal event of the tree after `after_seq`; ends after the root's final event,
    or when the server shuts down (the client reconnects with Last-Event-ID)."""
    # Watched from before the first look to the end, so no write falls between a look and
    # a wait; a child run joins the watch when its first event shows up.
    with service.watch_journal([run_id]) as watch:
        while not shutdown.is_set():
            batch = await service.tree_events(run_id, after_seq)
            for event in batch:
                watch.add(event.run_id)
                envelope = {
                    "seq": event.seq,
                    "run_id": event.run_id,
                    "ts": event.ts,
                    "type": event.type,
                    "data": event.data,
                }
                yield ServerSentEvent(
                    data=json.dumps(envelope, ensure_ascii=False, default=str),
                    event=event.type,
                    id=str(event.seq),
                )
                after_seq = event.seq
            if batch:
                continue
            if (await service.get(run_id)).status.is_terminal:
                if not await service.tree_events(run_id, after_seq, 1):
                    return  # everything up to the run's end was sent
                continue
            waiting = asyncio.ensure_future(watch.wait(STREAM_SAFETY_POLL))
            stopping = asyncio.ensure_future(shutdown.wait())
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            stopping.cancel()


# -- errors and limits -------------------------------------------------------------------------


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def _refused(request: Request, exc: LoomOpsError) -> JSONResponse:
    """A refusal from any layer: its kind's status, its own text."""
    if exc.kind == ErrorKind.UNAVAILABLE:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.kind == ErrorKind.BUSY else None
    return JSONResponse({"error": str(exc)}, STATUS[exc.kind], headers=headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """The machine's failure (disk, network, a database driver's error): its kind's status,
    its type and first line; anything else is a bug: 500, and the traceback in the log."""
    kind = kind_of(exc)  # a LoomOpsError never gets here: `_refused` answered it
    if kind is not None:
        detail = (str(exc).strip().splitlines() or [""])[0]
        return JSONResponse({"error": f"{type(exc).__name__}: {detail}"}, STATUS[kind])
    log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse({"error": "internal error; it is logged"}, 500)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        # Its location is a character offset, not a field: say what it is.
        at = first.get("loc", ())[-1:] or ("?",)
        why = first.get("ctx", {}).get("error", "JSON decode error")
        return JSONResponse({"error": f"the body is not JSON: {why} at character {at[0]}"}, 422)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return JSONResponse({"error": f"{where}: {first['msg']}" if where else first["msg"]}, 422)


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (the alert routes': `alert_max_bytes`) with
    413, by Content-Length or as they stream.

    The body is read here first (bodies are small: an incident message; an alert storm's
    notification is bounded on its own) and handed on whole, so an over-long chunked body is
    refused before any endpoint sees it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, alert_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.alert_max_bytes = alert_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        alerts = path == "/alerts" or path.startswith("/alerts/")
        limit = self.alert_max_bytes if alerts else self.max_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"error": f"request body over {limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that gives `messages` first, then what the client sends (a disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
