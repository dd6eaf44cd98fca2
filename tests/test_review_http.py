"""Review of the HTTP API (`loom-ops serve`): defects found, each pinned by a failing test.

Every test here is `xfail(strict=True)`: it fails today for the reason it names, and starts
passing (so the marker must go) once the defect is fixed."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from agent.errors import ServingRefused
from agent.frontends import http_api, serving
from agent.records import Decision
from agent.settings import Settings
from agent.store import JournalWatch
from tests.cli_helpers import Cli
from tests.http_harness import (
    ServeProcess,
    SseEvent,
    free_port,
    poll_run,
    read_stream,
    served,
    sse_events,
    wait_for_approval,
)
from tests.support import DISK, LATENCY, allow, write_runbook

ONCALL = "cli:oncall"  # an approver of the shipped runbooks


@pytest.fixture
def oncall(settings: Settings) -> Settings:
    """Settings whose API decisions are recorded as an approver of the shipped runbooks."""
    return settings.model_copy(update={"api_user": ONCALL})


# -- 1. an empty token is "a token" to the bind check and "no token" to the auth check ----------


def test_an_empty_api_token_does_not_let_serve_expose_an_open_api(
    tmp_path: Path, workspace: Path
) -> None:
    """`LOOM_OPS_API_TOKEN=` (an empty line in .env, an unset CI secret) must not count as a
    token: it used to pass the public-bind check (SecretStr('') is not None) while turning
    the bearer check off (SecretStr('') is falsy)."""
    settings = Settings(
        _env_file=None, db=str(tmp_path / "ops.sqlite"), workspace=workspace, api_token=" "
    )
    assert settings.api_token is None and settings.bearer_token() is None
    with pytest.raises(ServingRefused):
        serving.check_http(settings, serving.HttpEndpoint("0.0.0.0", 8766))


async def test_with_an_empty_token_the_api_answers_without_auth(settings: Settings) -> None:
    """Companion: an empty token that slips past validation (model_copy) means no token, the
    same to the auth check as to the public-bind check, which refuses to expose it."""
    empty = settings.model_copy(update={"api_token": SecretStr("")})
    async with served(empty) as s:
        assert (await s.client.get("/runs")).status_code == 200
        assert (await s.client.get("/metrics")).status_code == 200
    with pytest.raises(ServingRefused):
        serving.check_http(empty, serving.HttpEndpoint("0.0.0.0", 8766))


# -- 2. the 429 cap is a check-then-act race ----------------------------------------------------

SLOW_RUNBOOK = """\
id: slow-drill
title: Slow drill
description: One long live step, to keep a run running.
triggers: [slow drill]
approvers: [cli:oncall]
steps:
  - id: slow
    title: Take a while
    run: "{python} append.py slow 30"
    timeout: 60
"""


async def test_concurrent_starts_cannot_exceed_max_active_runs(
    settings: Settings, workspace: Path
) -> None:
    write_runbook(workspace, "slow-drill", SLOW_RUNBOOK)
    allow(workspace, "append.py", "slow", "30")
    one = settings.model_copy(update={"max_active_runs": 1, "allow_shell": True})
    async with served(one) as s:
        answers = await asyncio.gather(
            *(
                s.client.post(
                    "/runs", json={"message": "slow drill", "run_id": f"r{n}", "role": "runbook"}
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


# -- 3. a stream can sleep through an event (lost wake-up) --------------------------------------


async def test_an_event_committed_just_before_the_stream_waits_is_sent_at_once(
    oncall: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit between a stream's look (nothing new) and its wait must wake it: it used to
    register its waiter only when it began to wait, and slept up to STREAM_SAFETY_POLL (30 s
    in production) with the event in the journal."""
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


# -- 4. the SSE envelope is overwritten by the event's own data ---------------------------------


async def test_every_sse_event_names_the_run_that_wrote_it(settings: Settings) -> None:
    async with served(settings) as s:
        await s.service.start("done", LATENCY, role="supervisor")
        await s.service.decide("done", Decision.APPROVE, ONCALL)
        assert (await s.service.get("done")).status == "succeeded"
        events = await read_stream(s.client, "/runs/done/events")
        journal = await s.service.store.list_tree_events("done", 0, 10_000)
        assert [e.seq for e in events] == [j.seq for j in journal]
        wrong = [
            (e.seq, e.event, e.data["run_id"], j.run_id)
            for e, j in zip(events, journal, strict=True)
            if e.data["run_id"] != j.run_id or e.data["ts"] != j.ts
        ]
        assert wrong == [], wrong


# -- 5. SIGTERM with an open stream is not a clean shutdown -------------------------------------


async def test_sigterm_with_an_open_event_stream_ends_it_cleanly(
    tmp_path: Path, workspace: Path
) -> None:
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


# -- 6. `serve --port` out of range is a traceback ----------------------------------------------


def test_serve_with_a_port_out_of_range_is_one_line(tmp_path: Path, workspace: Path) -> None:
    result = Cli(workspace, tmp_path / "ops.sqlite")("serve", "--port", "70000", timeout=30)
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines()) == 1, result.describe()
    assert "port" in result.stderr, result.describe()
