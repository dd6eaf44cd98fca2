"""End-to-end tests of the HTTP API (`loom-ops serve`): httpx against the real FastAPI app served
by uvicorn on a free 127.0.0.1 port, over a real SQLite file: SSE through an approval,
Last-Event-ID reconnects, lost wake-ups, client disconnects, auth (an empty token is none),
limits and errors, listing and metrics, schemathesis, SIGTERM with a stream open, and a server
restart that resumes a run a killed server left."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.errors import ServingRefused
from agent.frontends import http_api, serving
from agent.records import Decision
from agent.service.runs import RunService
from agent.settings import SecretStr, Settings
from agent.store import JournalWatch
from tests.cli_helpers import LOOM_OPS, Cli, assert_usage_error
from tests.http_harness import (
    ServeProcess,
    SseComment,
    SseEvent,
    assert_well_formed,
    free_port,
    poll_run,
    read_stream,
    served,
    sse_events,
    sse_items,
    wait_for_approval,
    wait_for_run,
)
from tests.support import DISK, LATENCY, SLOW_RUNBOOK, allow, lines, write_runbook

ONCALL = "cli:oncall"  # in the group the shipped runbooks name (the tests' people file)
APPROVERS = "group:approvers"
STREAM_TIMEOUT = 20  # seconds: a stream that never closes fails the test instead of hanging it


@pytest.fixture
def oncall(settings: Settings) -> Settings:
    """Settings whose API decisions are recorded as an approver of the shipped runbooks."""
    return settings.model_copy(update={"api_user": ONCALL})


async def finished_supervised_run(service: RunService, run_id: str) -> None:
    """A supervised run through its approval to the end, driven by the service directly."""
    await service.start(run_id, LATENCY, role="supervisor")
    await service.decide(run_id, Decision.APPROVE, ONCALL)
    assert (await service.get(run_id)).status == "succeeded"


def assert_error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    """The response has `status` (one of) and a JSON body `{"error": "<text>"}`; returns the
    text."""
    expected = status if isinstance(status, tuple) else (status,)
    assert response.status_code in expected, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


# -- the full flow ------------------------------------------------------------------------------


async def test_supervise_streams_through_an_approval_and_closes_after_the_end(
    oncall: Settings,
) -> None:
    async with served(oncall) as s:
        events: list[SseEvent] = []
        decision = None
        body = {"message": LATENCY, "run_id": "inc-1"}
        async with (
            asyncio.timeout(STREAM_TIMEOUT),
            s.client.stream("POST", "/supervise", json=body) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            async for event in sse_events(response):
                events.append(event)
                if event.event == "approval_requested":
                    assert decision is None, "a second approval request"
                    decision = await s.client.post("/runs/inc-1/approve", json={"note": "LGTM"})
        # The loop ended: the server closed the stream by itself.

        assert decision is not None and decision.status_code == 200, decision
        assert decision.json()["message"] == f"approved by {ONCALL}"
        assert_well_formed(events)
        kinds = [e.event for e in events]
        assert kinds.index("approval_requested") < kinds.index("approval_decided")
        decided = events[kinds.index("approval_decided")]
        assert decided.data["data"]["decided_by"] == ONCALL
        assert decided.data["data"]["note"] == "LGTM"
        # The stream ends with the root's final event, and nothing of the tree is missing.
        last = events[-1]
        assert (last.event, last.data["run_id"], last.data["data"]["status"]) == (
            "run_finished",
            "inc-1",
            "succeeded",
        )
        journal = await s.service.store.list_tree_events("inc-1", 0, 10_000)
        assert [e.seq for e in events] == [e.seq for e in journal]
        assert {e.data["run_id"] for e in events} == {
            "inc-1",
            "inc-1:sub:planner",
            "inc-1:sub:executor",
            "inc-1:sub:verifier",
        }

        run = (await s.client.get("/runs/inc-1")).json()
        assert run["status"] == "succeeded" and run["approval"] is None
        assert run["requested_by"] == ONCALL and run["role"] == "supervisor"
        [approval] = await s.service.store.list_approvals("inc-1:sub:executor")
        assert approval.decided_by == ONCALL


async def test_post_runs_answers_json_at_once_and_the_events_stream_follows(
    oncall: Settings,
) -> None:
    async with served(oncall) as s:
        response = await s.client.post(
            "/runs", json={"message": DISK, "run_id": "disk-1", "role": "runbook"}
        )
        assert response.status_code == 201, response.text
        assert response.json()["run_id"] == "disk-1"
        assert response.json()["status"] in ("queued", "running", "waiting_approval")
        approval = await wait_for_approval(s.client, "disk-1")
        assert approval["step_id"] == "vacuum-journal" and APPROVERS in approval["deciders"]
        assert (await s.client.post("/runs/disk-1/approve")).status_code == 200
        events = await read_stream(s.client, "/runs/disk-1/events")
        assert_well_formed(events)
        assert (
            events[-1].event == "run_finished" and events[-1].data["data"]["status"] == "succeeded"
        )
        assert (await s.client.get("/runs/disk-1")).json()["status"] == "succeeded"


async def test_every_sse_event_names_the_run_that_wrote_it(settings: Settings) -> None:
    """A tree's stream carries each event's own run id and time in its envelope: the event's
    data (which has fields of the same names) must not overwrite them."""
    async with served(settings) as s:
        await finished_supervised_run(s.service, "done")
        events = await read_stream(s.client, "/runs/done/events")
        journal = await s.service.store.list_tree_events("done", 0, 10_000)
        assert [e.seq for e in events] == [j.seq for j in journal]
        wrong = [
            (e.seq, e.event, e.data["run_id"], j.run_id)
            for e, j in zip(events, journal, strict=True)
            if e.data["run_id"] != j.run_id or e.data["ts"] != j.ts
        ]
        assert wrong == [], wrong


# -- reconnects ---------------------------------------------------------------------------------


async def test_last_event_id_reconnect_to_a_finished_run_has_no_gap_and_no_duplicate(
    settings: Settings,
) -> None:
    async with served(settings) as s:
        await finished_supervised_run(s.service, "done")
        whole = await read_stream(s.client, "/runs/done/events")
        assert_well_formed(whole)
        assert len(whole) > 20 and whole[-1].event == "run_finished"

        for cut in (1, 7, len(whole) // 2, len(whole) - 1):
            first = await read_stream(s.client, "/runs/done/events", limit=cut)
            assert first == whole[:cut]
            rest = await read_stream(
                s.client, "/runs/done/events", headers={"Last-Event-ID": first[-1].id or ""}
            )
            assert first + rest == whole, cut
            # `?after=` is the same cursor for clients that cannot set headers.
            after = await read_stream(s.client, f"/runs/done/events?after={first[-1].id}")
            assert after == rest

        # Reconnecting after the very last event of the ended run: 204 No Content, the one
        # answer that stops an EventSource's reconnects (an empty 200 restarts them).
        response = await s.client.get(
            "/runs/done/events", headers={"Last-Event-ID": whole[-1].id or ""}
        )
        assert response.status_code == 204 and response.content == b""


async def test_last_event_id_reconnect_while_waiting_then_approve_delivers_the_rest(
    oncall: Settings,
) -> None:
    async with served(oncall) as s:
        assert (await s.client.post("/runs", json={"message": LATENCY, "run_id": "w"})).is_success
        # First connection: read up to the approval request, then hang up.
        first: list[SseEvent] = []
        async with (
            asyncio.timeout(STREAM_TIMEOUT),
            s.client.stream("GET", "/runs/w/events") as response,
        ):
            async for event in sse_events(response):
                first.append(event)
                if event.event == "approval_requested":
                    break
        assert (await s.client.get("/runs/w")).json()["status"] == "waiting_children"

        # Second connection resumes after the last event seen; the approval goes in while it
        # is open, and it delivers everything from there to the root's end, then closes.
        rest: list[SseEvent] = []
        headers = {"Last-Event-ID": first[-1].id or ""}
        async with (
            asyncio.timeout(STREAM_TIMEOUT),
            s.client.stream("GET", "/runs/w/events", headers=headers) as response,
        ):
            assert response.status_code == 200
            assert (await s.client.post("/runs/w/approve")).status_code == 200
            async for event in sse_events(response):
                rest.append(event)
        assert rest and rest[0].seq > first[-1].seq
        assert "approval_decided" in [e.event for e in rest]
        assert rest[-1].event == "run_finished" and rest[-1].data["run_id"] == "w"

        whole = await read_stream(s.client, "/runs/w/events")
        assert first + rest == whole
        assert_well_formed(whole)
        assert (await s.client.get("/runs/w")).json()["status"] == "succeeded"


async def test_an_idle_stream_gets_keep_alive_comments(
    oncall: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_api, "KEEP_ALIVE", 0.1)
    async with served(oncall) as s:
        await s.client.post("/runs", json={"message": DISK, "run_id": "idle", "role": "runbook"})
        await wait_for_approval(s.client, "idle")
        comments = 0
        async with (
            asyncio.timeout(STREAM_TIMEOUT),
            s.client.stream("GET", "/runs/idle/events") as response,
        ):
            async for item in sse_items(response):
                if isinstance(item, SseComment):
                    comments += 1
                    if comments == 2:
                        break
        assert comments == 2
        assert (await s.client.post("/runs/idle/reject", json={"note": "no"})).status_code == 200
        assert (await wait_for_run(s.client, "idle"))["status"] == "rejected"


async def test_an_event_committed_just_before_the_stream_waits_is_sent_at_once(
    oncall: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit between a stream's look (nothing new) and its wait must wake it at once, not
    after STREAM_SAFETY_POLL (30 s in production, 3 s here) with the event in the journal: the
    stream registers its waiter before it looks."""
    monkeypatch.setattr(http_api, "STREAM_SAFETY_POLL", 3.0)
    async with served(oncall) as s:
        body = {"message": DISK, "run_id": "w", "role": "runbook"}
        assert (await s.client.post("/runs", json=body)).status_code == 201
        await wait_for_approval(s.client, "w")
        original = JournalWatch.wait
        raced: list[float] = []

        async def commit_then_wait(watch: JournalWatch, timeout: float) -> None:
            if not raced:  # another task's commit lands between the look and the wait, once
                await s.service.decide("w", Decision.REJECT, ONCALL, "written in the window")
                raced.append(time.monotonic())
            await original(watch, timeout)

        monkeypatch.setattr(JournalWatch, "wait", commit_then_wait)
        note: SseEvent | None = None
        async with asyncio.timeout(10), s.client.stream("GET", "/runs/w/events") as response:
            async for event in sse_events(response):
                if event.event == "approval_decided":
                    note = event
                    break
        assert note is not None and raced
        delay = time.monotonic() - raced[0]
        assert delay < 1.0, f"the event reached the client {delay:.1f} s after its commit"
        await s.client.post("/runs/w/cancel")


# -- runs outlive connections -------------------------------------------------------------------


async def test_a_client_that_disconnects_mid_run_does_not_stop_the_run(
    oncall: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with served(oncall) as s:
        seen: list[SseEvent] = []
        async with (
            asyncio.timeout(STREAM_TIMEOUT),
            s.client.stream(
                "POST", "/supervise", json={"message": LATENCY, "run_id": "gone"}
            ) as response,
        ):
            async for event in sse_events(response):
                seen.append(event)
                if len(seen) == 2:
                    break  # hang up after two events, long before the approval
        assert [e.seq for e in seen] == [1, 2]

        approval = await wait_for_approval(s.client, "gone")
        assert approval["run_id"] == "gone:sub:executor"
        assert (await s.client.post("/runs/gone/approve")).status_code == 200
        assert (await wait_for_run(s.client, "gone"))["status"] == "succeeded"

        # The server goes on answering, and a new stream of the run plays it to the end.
        assert (await s.client.get("/healthz")).json() == {"status": "ok"}
        replay = await read_stream(s.client, "/runs/gone/events")
        assert replay[:2] == seen and replay[-1].event == "run_finished"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- auth ---------------------------------------------------------------------------------------


async def test_a_bearer_token_is_required_when_configured(settings: Settings) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr("s3cret")})
    async with served(guarded) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for method, path in (("GET", "/runs"), ("GET", "/metrics"), ("GET", "/runs/x")):
                response = await s.client.request(method, path, headers=headers)
                assert_error(response, 401)
                assert response.headers["www-authenticate"] == "Bearer"
            response = await s.client.post("/runs", json={"message": DISK}, headers=headers)
            assert_error(response, 401)
        assert await s.service.store.list_runs() == []  # nothing started without the token

        good = {"Authorization": "Bearer s3cret"}
        assert (await s.client.get("/runs", headers=good)).status_code == 200
        assert (await s.client.get("/metrics", headers=good)).status_code == 200
        response = await s.client.post(
            "/runs", json={"message": DISK, "run_id": "ok", "role": "runbook"}, headers=good
        )
        assert response.status_code == 201, response.text
        assert (await s.client.get("/healthz")).status_code == 200  # no token needed
        await wait_for_run(s.client, "ok", lambda r: r["approval"] is not None, headers=good)


def test_an_empty_api_token_does_not_let_serve_expose_an_open_api(
    tmp_path: Path, workspace: Path
) -> None:
    """`LOOM_OPS_API_TOKEN=` (an empty line in .env, an unset CI secret) is no token: it must
    neither pass the public-bind check nor count as a bearer token."""
    settings = Settings(
        _env_file=None, db=str(tmp_path / "ops.sqlite"), workspace=workspace, api_token=" "
    )
    assert settings.api_token is None and settings.bearer_token() is None
    with pytest.raises(ServingRefused):
        serving.check_http(settings, serving.HttpEndpoint("0.0.0.0", 8766))


async def test_with_an_empty_token_the_api_answers_without_auth(settings: Settings) -> None:
    """An empty token that slips past validation (model_copy) means no token, the same to the
    auth check as to the public-bind check, which refuses to expose it."""
    empty = settings.model_copy(update={"api_token": SecretStr("")})
    async with served(empty) as s:
        assert (await s.client.get("/runs")).status_code == 200
        assert (await s.client.get("/metrics")).status_code == 200
    with pytest.raises(ServingRefused):
        serving.check_http(empty, serving.HttpEndpoint("0.0.0.0", 8766))


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path, workspace: Path) -> None:
    cli = Cli(workspace, tmp_path / "ops.sqlite")
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert_usage_error(result, "0.0.0.0", "LOOM_OPS_API_TOKEN")


def test_serve_on_a_busy_port_exits_with_one_line(tmp_path: Path, workspace: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = Cli(workspace, tmp_path / "ops.sqlite")(
            "serve", "--host", "127.0.0.1", "--port", str(port), timeout=30
        )
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines()) == 1, result.describe()
    assert str(port) in result.stderr and result.stdout == "", result.describe()


def test_serve_with_a_port_out_of_range_is_one_line(tmp_path: Path, workspace: Path) -> None:
    result = Cli(workspace, tmp_path / "ops.sqlite")("serve", "--port", "70000", timeout=30)
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines()) == 1, result.describe()
    assert "port" in result.stderr, result.describe()


# -- limits and errors --------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_by_content_length(settings: Settings) -> None:
    async with served(settings) as s:
        limit = settings.max_body_bytes
        text = json.dumps({"message": "disk " + "x" * limit}).encode()
        response = await s.client.post(
            "/runs", content=text, headers={"content-type": "application/json"}
        )
        assert "over" in assert_error(response, 413)
        assert await s.service.store.list_runs() == []


async def test_a_streamed_body_over_the_limit_is_413(settings: Settings) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"message": "disk '
        for _ in range(settings.max_body_bytes // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    async with served(settings) as s:
        response = await s.client.post(
            "/runs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers  # really chunked
        assert_error(response, 413)


async def test_a_message_over_4096_bytes_is_422(settings: Settings) -> None:
    async with served(settings) as s:
        for message in ("disk " + "x" * 4092, "disk " + "é" * 2046):  # 4097 chars; 4097 bytes
            assert len(message.encode()) > 4096
            response = await s.client.post("/runs", json={"message": message, "run_id": "big"})
            assert "4096" in assert_error(response, 422)
        assert await s.service.store.list_runs() == []
        # Exactly 4096 bytes is still accepted.
        fits = "disk " + "x" * 4091
        response = await s.client.post("/runs", json={"message": fits, "role": "runbook"})
        assert response.status_code == 201, response.text


async def test_bad_input_is_4xx_with_a_json_error(oncall: Settings) -> None:
    async with served(oncall) as s:
        c = s.client
        # Invalid run ids, in the path and in the body.
        for bad in ("-leading-dash", "a%20b", "x" * 129, "%C3%A9"):
            assert_error(await c.get(f"/runs/{bad}"), 422)
            assert_error(await c.post(f"/runs/{bad}/approve"), 422)
        for bad in ("-x", "a b", "x" * 129, "é", ""):
            response = await c.post("/runs", json={"message": DISK, "run_id": bad})
            assert "run_id" in assert_error(response, 422)
        # Invalid JSON and invalid bodies.
        for content in (b'{"message": ', b"[1, 2]", b'{"message": 42}', b'{"max_steps": 3}'):
            response = await c.post(
                "/runs", content=content, headers={"content-type": "application/json"}
            )
            assert_error(response, 422)
        assert_error(await c.post("/runs", json={"message": DISK, "max_steps": 0}), 422)
        assert_error(await c.post("/runs", json={"message": DISK, "role": "root"}), 422)
        assert_error(await c.post("/runs", json={"message": "no runbook fits zzz"}), 422)
        assert_error(await c.get("/runs?status=bogus"), 422)
        assert_error(await c.get("/runs?limit=0"), 422)
        assert_error(await c.get("/runs?offset=-1"), 422)
        # Unknown runs: 404 everywhere.
        for method, path in (
            ("GET", "/runs/nope"),
            ("GET", "/runs/nope/events"),
            ("GET", "/runs/nope/explain"),
            ("GET", "/runs/nope/trace"),
            ("POST", "/runs/nope/approve"),
            ("POST", "/runs/nope/reject"),
            ("POST", "/runs/nope/cancel"),
        ):
            assert "nope" in assert_error(await c.request(method, path), 404), path
        assert_error(await c.get("/no/such/path"), 404)
        assert_error(await c.delete("/runs"), 405)
        # Nothing of the above started a run.
        assert await s.service.store.list_runs() == []

        # Duplicate run id: 409, for each way of starting.
        body = {"message": DISK, "run_id": "dup", "role": "runbook"}
        assert (await c.post("/runs", json=body)).status_code == 201
        assert "dup" in assert_error(await c.post("/runs", json=body), 409)
        assert_error(await c.post("/supervise", json=body), 409)
        assert_error(await c.post("/runbook", json=body), 409)
        await wait_for_approval(c, "dup")
        # An approval id that does not exist decides nothing.
        assert_error(await c.post("/runs/dup/approve", json={"approval": 999}), (404, 409))
        assert_error(await c.post("/runs/dup/approve", json={"approval": 0}), 422)
        assert_error(await c.post("/runs/dup/approve", json={"note": "n" * 1001}), 422)
        assert (await c.get("/runs/dup")).json()["status"] == "waiting_approval"

        # A decision (or a cancel) on a finished run: 409.
        assert (await c.post("/runs/dup/approve")).status_code == 200
        assert (await wait_for_run(c, "dup"))["status"] == "succeeded"
        for action in ("approve", "reject", "cancel"):
            assert "succeeded" in assert_error(await c.post(f"/runs/dup/{action}"), 409)

        # A cancel of a waiting run works once.
        await c.post("/runs", json={"message": DISK, "run_id": "cx", "role": "runbook"})
        await wait_for_approval(c, "cx")
        response = await c.post("/runs/cx/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert_error(await c.post("/runs/cx/cancel"), 409)
        assert_error(await c.post("/runs/cx/approve"), 409)


async def test_approve_by_an_api_user_not_among_the_approvers_is_403(settings: Settings) -> None:
    assert settings.api_user == "api:http"  # not in the shipped runbooks' approvers
    async with served(settings) as s:
        await s.client.post("/runs", json={"message": DISK, "run_id": "gate", "role": "runbook"})
        await wait_for_approval(s.client, "gate")
        for action in ("approve", "reject"):
            text = assert_error(await s.client.post(f"/runs/gate/{action}"), 403)
            assert "api:http" in text and APPROVERS in text
        run = (await s.client.get("/runs/gate")).json()
        assert run["status"] == "waiting_approval" and run["approval"]["status"] == "pending"


async def test_max_active_runs_then_429_with_retry_after(
    settings: Settings, workspace: Path
) -> None:
    write_runbook(workspace, "slow-drill", SLOW_RUNBOOK)
    allow(workspace, "append.py", "slow", "60")
    one = settings.model_copy(update={"max_active_runs": 1, "allow_shell": True})
    async with served(one) as s:
        body = {"message": "slow-drill", "run_id": "a", "role": "runbook"}
        assert (await s.client.post("/runs", json=body)).status_code == 201
        await wait_for_run(s.client, "a", lambda r: lines(workspace) == ["slow"])
        assert (await s.client.get("/runs/a")).json()["status"] == "running"
        for path in ("/runs", "/supervise", "/runbook"):
            response = await s.client.post(path, json={"message": DISK, "run_id": "b", "yes": True})
            assert "active" in assert_error(response, 429)
            assert int(response.headers["retry-after"]) > 0
        assert "b" not in {r.id for r in await s.service.store.list_runs()}

        # Once it is over (cancelled here), the slot is free again.
        assert (await s.client.post("/runs/a/cancel")).json()["status"] == "cancelled"
        response = await s.client.post("/runs", json={"message": DISK, "run_id": "b", "yes": True})
        assert response.status_code == 201, response.text


async def test_a_live_start_names_its_runbook_or_confirms_the_guess(settings: Settings) -> None:
    """With a live switch on, a message that only describes the incident is a 422 naming the
    runbook it matched and the message that runs exactly that, and nothing is stored; the
    runbook's id first, or `"yes": true`, starts it. (The CLI's --yes, the chat's card.)"""
    live = settings.model_copy(update={"allow_shell": True})
    async with served(live) as s:
        for path in ("/runs", "/supervise", "/runbook"):
            error = assert_error(await s.client.post(path, json={"message": DISK}), 422)
            assert "LOOM_OPS_ALLOW_SHELL=1" in error and "from a guess" in error
            assert "matched runbook disk-almost-full" in error
            assert "make the message 'disk-almost-full" in error and '"yes": true' in error
        stringly = {"message": DISK, "yes": "true"}  # a confirmation is a JSON true
        assert "yes" in assert_error(await s.client.post("/runs", json=stringly), 422)
        assert await s.service.store.list_runs() == []

        named = {"message": "disk-almost-full", "run_id": "named", "role": "runbook"}
        confirmed = {"message": DISK, "run_id": "confirmed", "role": "runbook", "yes": True}
        for body in (named, confirmed):
            response = await s.client.post("/runs", json=body)
            assert response.status_code == 201, response.text
            assert response.json()["run_id"] == body["run_id"]
            await s.client.post(f"/runs/{body['run_id']}/cancel")


async def test_concurrent_starts_cannot_exceed_max_active_runs(
    settings: Settings, workspace: Path
) -> None:
    """Six starts at the same moment with one slot: one 201, five 429 (the count and the start
    are one step, not a check-then-act race)."""
    write_runbook(workspace, "slow-drill", SLOW_RUNBOOK)
    allow(workspace, "append.py", "slow", "60")
    one = settings.model_copy(update={"max_active_runs": 1, "allow_shell": True})
    async with served(one) as s:
        answers = await asyncio.gather(
            *(
                s.client.post(
                    "/runs", json={"message": "slow-drill", "run_id": f"r{n}", "role": "runbook"}
                )
                for n in range(6)
            )
        )
        started = [f"r{n}" for n, a in enumerate(answers) if a.status_code == 201]
        try:
            codes = sorted(a.status_code for a in answers)
            assert codes == [201, 429, 429, 429, 429, 429], codes
        finally:
            for run_id in started:
                await s.client.post(f"/runs/{run_id}/cancel")


# -- out-of-range cursors and ids, refusals, and the slots of waiting runs ----------------------


async def test_a_superscript_last_event_id_is_422_not_500(settings: Settings) -> None:
    async with served(settings) as s:
        await finished_supervised_run(s.service, "done")
        response = await s.client.get("/runs/done/events", headers={"Last-Event-ID": b"\xb2"})
        assert_error(response, 422)


async def test_an_event_cursor_beyond_sqlite_integers_is_422(settings: Settings) -> None:
    async with served(settings) as s:
        await finished_supervised_run(s.service, "done")
        huge = str(2**63)
        for kwargs in ({"params": {"after": huge}}, {"headers": {"Last-Event-ID": huge}}):
            try:
                response = await s.client.get("/runs/done/events", **kwargs)
            except httpx.RemoteProtocolError as exc:
                raise AssertionError(f"the stream broke off: {exc}") from exc
            assert_error(response, 422)


async def test_an_approval_id_beyond_sqlite_integers_is_4xx(oncall: Settings) -> None:
    async with served(oncall) as s:
        await s.client.post("/runs", json={"message": DISK, "run_id": "big", "role": "runbook"})
        await wait_for_approval(s.client, "big")
        response = await s.client.post("/runs/big/approve", json={"approval": 2**63})
        assert_error(response, (404, 409, 422))


async def test_an_invalid_decision_note_is_422(oncall: Settings) -> None:
    async with served(oncall) as s:
        await s.client.post("/runs", json={"message": DISK, "run_id": "note", "role": "runbook"})
        await wait_for_approval(s.client, "note")
        for note in ("é" * 600, "a\x00b"):
            assert_error(await s.client.post("/runs/note/approve", json={"note": note}), 422)


async def test_a_four_eyes_refusal_is_403(oncall: Settings) -> None:
    async with served(oncall) as s:
        body = {"message": "failed deploy of checkout-api", "run_id": "fe", "role": "runbook"}
        await s.client.post("/runs", json=body)
        approval = await wait_for_approval(s.client, "fe")
        assert APPROVERS in approval["deciders"]  # ONCALL is one, but also the requester
        assert "four eyes" in assert_error(await s.client.post("/runs/fe/approve"), 403)


async def test_a_supervised_run_waiting_for_a_human_holds_no_slot(settings: Settings) -> None:
    one = settings.model_copy(update={"max_active_runs": 1})
    async with served(one) as s:
        assert (await s.client.post("/runs", json={"message": LATENCY, "run_id": "a"})).is_success
        await wait_for_approval(s.client, "a")
        response = await s.client.post("/runs", json={"message": DISK, "run_id": "b"})
        assert response.status_code == 201, response.text


# -- listing, explain, trace, metrics, OpenAPI --------------------------------------------------


async def test_list_explain_trace_metrics_and_openapi(oncall: Settings) -> None:
    async with served(oncall) as s:
        c = s.client
        for n in range(3):
            body = {"message": DISK, "run_id": f"wait-{n}", "role": "runbook"}
            assert (await c.post("/runs", json=body)).status_code == 201
            await wait_for_approval(c, f"wait-{n}")
        await finished_supervised_run(s.service, "done")

        # Pagination of one status, newest first, with next_offset until the last page.
        pages, offset = [], 0
        while offset is not None:
            response = await c.get(f"/runs?status=waiting_approval&limit=2&offset={offset}")
            assert response.status_code == 200
            page = response.json()
            pages.append([r["run_id"] for r in page["runs"]])
            assert all(r["status"] == "waiting_approval" for r in page["runs"])
            offset = page["next_offset"]
        assert pages == [["wait-2", "wait-1"], ["wait-0"]]
        done = (await c.get("/runs?status=succeeded&limit=50")).json()
        assert {r["run_id"] for r in done["runs"]} == {
            "done",
            "done:sub:planner",
            "done:sub:executor",
            "done:sub:verifier",
        }
        assert done["next_offset"] is None
        everything = (await c.get("/runs?limit=1000")).json()["runs"]
        assert len(everything) == 7
        created = [r["created_at"] for r in everything]
        assert created == sorted(created, reverse=True)

        explain = await c.get("/runs/done/explain")
        assert explain.status_code == 200
        assert explain.headers["content-type"].startswith("text/plain")
        assert "Run done — role supervisor — status succeeded" in explain.text
        assert "Run done:sub:executor" in explain.text
        assert f"approved by {ONCALL}" in explain.text

        trace = await c.get("/runs/done/trace")
        assert trace.status_code == 200
        assert trace.headers["content-type"].startswith("text/html")
        assert trace.text.lstrip().lower().startswith("<!doctype html")
        assert "done:sub:executor" in trace.text

        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        values = dict(
            line.rsplit(" ", 1) for line in metrics.text.splitlines() if not line.startswith("#")
        )
        assert float(values['loom_ops_runs_finished_total{status="succeeded"}']) == 4
        assert float(values['loom_ops_runs{status="waiting_approval"}']) == 3
        assert any(k.startswith("loom_ops_tool_call_duration_seconds_bucket{") for k in values)
        assert float(values['loom_ops_tool_call_duration_seconds_count{tool="execute_step"}']) > 0
        assert any(k.startswith("loom_ops_approval_wait_seconds_bucket{") for k in values)
        assert float(values['loom_ops_llm_calls_total{policy="mock"}']) > 0

        spec = (await c.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        assert {
            "/runs",
            "/runs/{run_id}",
            "/runs/{run_id}/events",
            "/runs/{run_id}/approve",
            "/runs/{run_id}/reject",
            "/runs/{run_id}/cancel",
            "/runs/{run_id}/explain",
            "/runs/{run_id}/trace",
            "/supervise",
            "/runbook",
            "/healthz",
            "/metrics",
        } <= set(spec["paths"])


# -- schemathesis -------------------------------------------------------------------------------

SCHEMATHESIS_CONFIG = """\
# Point path run ids at runs that exist, so operations get past 404.
[dictionaries.runs]
values = ["done", "done:sub:executor", "gone"]

[parameters]
"path.run_id" = { dictionary = "runs", probability = 0.6 }
"""


def test_schemathesis_finds_no_server_error(tmp_path: Path, workspace: Path) -> None:
    server = ServeProcess(workspace, tmp_path / "ops.sqlite", free_port(), LOOM_OPS_API_USER=ONCALL)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            # Runs to aim at: one finished, one cancelled (a live one would keep its event
            # stream open for the whole request timeout).
            c.post("/runs", json={"message": DISK, "run_id": "done", "role": "runbook"})
            c.post("/runs", json={"message": DISK, "run_id": "gone", "role": "runbook"})
            for run_id in ("done", "gone"):
                poll_run(c, run_id, lambda r: r["approval"] is not None)
            assert c.post("/runs/done/approve").status_code == 200
            assert c.post("/runs/gone/cancel").status_code == 200
            assert poll_run(c, "done")["status"] == "succeeded"

        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        reports = tmp_path / "reports"
        done = subprocess.run(
            [
                str(Path(LOOM_OPS).parent / "schemathesis"),
                "--config-file",
                str(config),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--seed",
                "20261125",
                "--workers",
                "1",
                "--request-timeout",
                "5",
                "--report",
                "json",
                "--report-dir",
                str(reports),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = done.stdout + done.stderr
        [report_file] = reports.glob("*.json")
        report = json.loads(report_file.read_text())
        assert report["failures"] == [] and report["errors"] == [], output
        assert done.returncode == 0, output
        assert report["operations"]["tested"] == report["operations"]["total"] >= 13, output
        assert report["test_cases"]["generated"] > 300, output
        assert "Traceback" not in server.output() and "internal error" not in output
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/healthz").status_code == 200
    finally:
        server.stop()


# -- stopping and restarting: SIGTERM closes streams, a restart resumes runs --------------------


async def test_sigterm_with_an_open_event_stream_ends_it_cleanly(
    tmp_path: Path, workspace: Path
) -> None:
    """SIGTERM while a client follows an idle stream: the server closes the stream at once and
    exits 0, without a traceback or an error in its log."""
    server = ServeProcess(workspace, tmp_path / "ops.sqlite", free_port(), LOOM_OPS_API_USER=ONCALL)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            body = {"message": DISK, "run_id": "w", "role": "runbook"}
            assert c.post("/runs", json=body).status_code == 201
            poll_run(c, "w", lambda r: r["approval"] is not None)
        ending = "closed by the server"
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
            client.stream("GET", "/runs/w/events") as response,
        ):
            assert response.status_code == 200
            try:
                async for event in sse_events(response):
                    if event.event == "approval_requested":  # caught up: now idle
                        assert server.proc is not None
                        server.proc.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
            except httpx.HTTPError as exc:
                ending = f"broken off: {exc!r}"
        took = time.monotonic() - sent
        code = await asyncio.to_thread(server.wait_exit)
    finally:
        server.stop()
    output = server.output()
    assert code == 0, output
    assert "Traceback" not in output and " ERROR " not in output, output
    assert ending == "closed by the server", ending
    assert took < 1.5, f"the stream stayed open {took:.1f} s after SIGTERM"


def test_a_restarted_server_resumes_a_run_its_killed_predecessor_left(
    tmp_path: Path, workspace: Path
) -> None:
    db = tmp_path / "ops.sqlite"
    server = ServeProcess(
        workspace,
        db,
        free_port(),
        LOOM_OPS_LEASE_TTL="2",
        LOOM_OPS_API_USER="cli:approver",  # the crash drill's approver
        LOOM_OPS_ALLOW_SHELL="1",  # its steps really append to out.txt
    )
    # The 4th tool outcome the kernel records is the approved step's: the process kills
    # itself (SIGKILL) right after it, before the run has finished.
    server.start(LOOM_OPS_FAILPOINT="after_outcome:4")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            body = {"message": "crash-drill", "run_id": "drill", "role": "runbook"}
            assert c.post("/runs", json=body).status_code == 201
            # The run and its request are read one after the other: wait for both to show.
            run = poll_run(
                c,
                "drill",
                lambda r: r["approval"] is not None and r["status"] == "waiting_approval",
            )
            assert run["approval"]["step_id"] == "append-two"
            with contextlib.suppress(httpx.TransportError):  # the kill may beat the answer
                c.post("/runs/drill/approve")
        assert server.wait_exit() == -signal.SIGKILL, server.output()
    finally:
        server.stop()

    with sqlite3.connect(db) as conn:
        status, owner = conn.execute(
            "SELECT status, lease_owner FROM runs WHERE id = 'drill'"
        ).fetchone()
        decided = conn.execute(
            "SELECT status, decided_by FROM approvals WHERE run_id = 'drill'"
        ).fetchall()
    assert (status, decided) == ("running", [("approved", "cli:approver")]), (status, decided)
    assert owner is not None  # the dead server still holds the lease
    assert (workspace / "out.txt").read_text().splitlines() == ["one", "two"]

    restarted = ServeProcess(
        workspace, db, free_port(), LOOM_OPS_LEASE_TTL="2", LOOM_OPS_ALLOW_SHELL="1"
    ).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=10) as c:
            run = poll_run(c, "drill")
            assert run["status"] == "succeeded", (run, restarted.output())
            events = c.get("/runs/drill/explain").text
    finally:
        restarted.stop()
    # Each side effect happened exactly once, and the journal shows the takeover.
    assert (workspace / "out.txt").read_text().splitlines() == ["one", "two"]
    assert re.search(r"taken over from \S+", events), events
    assert "Traceback" not in restarted.output()
