"""A run's event stream read by third-party SSE clients against the real app on 127.0.0.1:
httpx-sse (the text/event-stream parser of httpx users) through an approval, resuming with
Last-Event-ID, and a 204 once the run has ended and everything was delivered; and a real
browser's EventSource (headless Chromium), which must get named events through
`addEventListener` and stop reconnecting after the end."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.events import EventType
from agent.frontends.openapi import stream_events
from agent.settings import Settings
from tests.http_harness import served, wait_for_approval, wait_for_run
from tests.support import DISK

httpx_sse = pytest.importorskip("httpx_sse", reason="httpx-sse is in the dev extra")

ONCALL = "cli:oncall"  # an approver of the shipped runbooks
TIMEOUT = 20  # seconds: a stream that never closes fails the test instead of hanging it


@pytest.fixture
def oncall(settings: Settings) -> Settings:
    """Settings whose API decisions are recorded as an approver of the shipped runbooks."""
    return settings.model_copy(update={"api_user": ONCALL})


async def read_sse(
    client: httpx.AsyncClient, path: str, *, headers: dict[str, str] | None = None, until: str = ""
) -> tuple[int, list[Any]]:
    """GET an event stream with httpx-sse: its status and the events read until the server
    ends it (or through the first event named `until`, then hang up)."""
    events: list[Any] = []
    async with (
        asyncio.timeout(TIMEOUT),
        httpx_sse.aconnect_sse(client, "GET", path, headers=headers or {}) as source,
    ):
        if source.response.status_code != 200:
            return source.response.status_code, events
        async for event in source.aiter_sse():
            events.append(event)
            if event.event == until:
                break
    return 200, events


async def test_httpx_sse_reads_resumes_with_last_event_id_and_gets_204_after_the_end(
    oncall: Settings,
) -> None:
    async with served(oncall) as s:
        body = {"message": DISK, "run_id": "disk-1", "role": "runbook"}
        assert (await s.client.post("/runs", json=body)).status_code == 201
        await wait_for_approval(s.client, "disk-1")

        # First connection: up to the approval request, then the client hangs up.
        status, first = await read_sse(s.client, "/runs/disk-1/events", until="approval_requested")
        assert status == 200 and first[-1].event == "approval_requested"
        assert (await s.client.post("/runs/disk-1/approve")).status_code == 200

        # Reconnect as EventSource does: Last-Event-ID is the last id seen; the rest follows,
        # with no gap and no repeat, and the stream ends after the run's last event.
        status, rest = await read_sse(
            s.client, "/runs/disk-1/events", headers={"Last-Event-ID": first[-1].id}
        )
        assert status == 200 and rest
        assert int(rest[0].id) > int(first[-1].id)
        assert rest[-1].event == "run_finished"
        assert rest[-1].json()["data"]["status"] == "succeeded"
        journal = await s.service.store.list_tree_events("disk-1", 0, 10_000)
        assert [int(e.id) for e in first + rest] == [e.seq for e in journal]
        for event in first + rest:  # every event is named, and `data` says the name again
            assert event.event in stream_events(), event.event
            assert event.json()["type"] == event.event and event.json()["seq"] == int(event.id)

        # The run ended and everything was delivered: a reconnect is told to stop (before the
        # fix: 200 with an empty stream, and EventSource retried every ~3 s forever).
        last = rest[-1].id
        for reconnect in (
            {"headers": {"Last-Event-ID": last}},
            {"headers": {"Last-Event-ID": str(int(last) + 1000)}},
        ):
            async with httpx_sse.aconnect_sse(
                s.client, "GET", "/runs/disk-1/events", **reconnect
            ) as source:
                assert source.response.status_code == 204, reconnect
                assert await source.response.aread() == b""
                with pytest.raises(httpx_sse.SSEError):  # no stream: nothing to iterate
                    [e async for e in source.aiter_sse()]
        assert (await s.client.get(f"/runs/disk-1/events?after={last}")).status_code == 204

        # A first request on the finished run (no cursor), or one from the middle, still
        # gets its events, then the stream ends.
        status, whole = await read_sse(s.client, "/runs/disk-1/events")
        assert status == 200 and [e.id for e in whole] == [e.id for e in first + rest]
        status, tail = await read_sse(
            s.client, "/runs/disk-1/events", headers={"Last-Event-ID": first[-1].id}
        )
        assert status == 200 and [e.id for e in tail] == [e.id for e in rest]


async def test_a_stream_of_a_live_run_is_never_204(oncall: Settings) -> None:
    """A run that waits has no more events yet, but will: the stream stays open (keep-alive),
    where a 204 would have the client give up on a run that is not over."""
    async with served(oncall) as s:
        body = {"message": DISK, "run_id": "w", "role": "runbook"}
        assert (await s.client.post("/runs", json=body)).status_code == 201
        await wait_for_approval(s.client, "w")
        status, events = await read_sse(s.client, "/runs/w/events", until="approval_requested")
        assert status == 200
        async with httpx_sse.aconnect_sse(
            s.client, "GET", "/runs/w/events", headers={"Last-Event-ID": events[-1].id}
        ) as source:
            assert source.response.status_code == 200
            assert (await s.client.post("/runs/w/reject", json={"note": "no"})).status_code == 200
            rest = [e async for e in source.aiter_sse()]
        assert rest[-1].event == "run_finished" and rest[-1].json()["data"]["status"] == "rejected"


# -- a real browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# An EventSource that listens for every documented name (a plain `onmessage` would get none:
# the events are named) and counts its connections: `open` fires on each (re)connection, and
# `readyState` CLOSED (2) is how a browser says it stopped reconnecting.
LISTENER = """
window.seen = []; window.opened = 0;
const source = new EventSource(arguments[0]);
source.onopen = () => { window.opened += 1; };
source.onmessage = (e) => window.seen.push("message:" + e.data);
for (const name of arguments[1]) {
  source.addEventListener(name, (e) => window.seen.push(name + ":" + e.lastEventId));
}
window.source = source;
"""


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
async def test_a_browser_eventsource_gets_named_events_and_stops_after_the_end(
    oncall: Settings,
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    async with served(oncall) as s:
        body = {"message": DISK, "run_id": "done", "role": "runbook"}
        assert (await s.client.post("/runs", json=body)).status_code == 201
        await wait_for_approval(s.client, "done")
        assert (await s.client.post("/runs/done/approve")).status_code == 200
        await wait_for_run(s.client, "done")
        journal = await s.service.store.list_tree_events("done", 0, 10_000)

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            options.add_argument(flag)

        def in_browser() -> tuple[list[str], int, int]:
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            try:
                # Same origin as the stream: the page is the API's own /healthz.
                driver.get(f"{s.url}/healthz")
                driver.execute_script(LISTENER, f"{s.url}/runs/done/events", list(EventType))
                deadline = time.monotonic() + TIMEOUT
                while driver.execute_script("return window.source.readyState") != 2:
                    assert time.monotonic() < deadline, "EventSource never stopped reconnecting"
                    time.sleep(0.1)
                # CLOSED is final (the spec never reopens it): what it saw is all it will.
                return (
                    driver.execute_script("return window.seen"),
                    driver.execute_script("return window.opened"),
                    driver.execute_script("return window.source.readyState"),
                )
            finally:
                driver.quit()

        seen, opened, state = await asyncio.to_thread(in_browser)
        assert seen == [f"{e.type}:{e.seq}" for e in journal]  # every event, by its name
        assert opened == 1 and state == 2, (opened, state)  # the 204 closed it for good
