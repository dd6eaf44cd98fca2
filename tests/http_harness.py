"""Helpers for the HTTP API tests: the real app served by uvicorn on a free loopback port (in
the test's event loop, or as a `loom-ops serve` process), and a small SSE reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.frontends.http_api import create_app
from agent.http_server import HttpServer
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import LOOM_OPS, cli_env

TERMINAL = frozenset({"succeeded", "failed", "rejected", "cancelled", "expired"})


# -- SSE -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    """One Server-Sent Event as a client sees it (`data` is the parsed JSON payload)."""

    id: str | None
    event: str
    data: Any

    @property
    def seq(self) -> int:
        """The journal sequence number the payload carries."""
        return int(self.data["seq"])


@dataclass(frozen=True)
class SseComment:
    """A comment line (`: ...`), e.g. a keep-alive ping."""

    text: str


async def sse_items(response: httpx.Response) -> AsyncIterator[SseEvent | SseComment]:
    """Events and comments of an SSE body as they arrive, parsed by the text/event-stream rules
    (`field: value` lines, a blank line ends an event, `:` starts a comment)."""
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(event_id, event_type, json.loads("\n".join(data)))
            event_id, event_type, data = None, "message", []
            continue
        if line.startswith(":"):
            yield SseComment(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
    if data:  # a body that ends without the final blank line
        yield SseEvent(event_id, event_type, json.loads("\n".join(data)))


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Only the events of an SSE body (comments skipped)."""
    async for item in sse_items(response):
        if isinstance(item, SseEvent):
            yield item


async def read_stream(
    client: httpx.AsyncClient,
    path: str,
    headers: dict[str, str] | None = None,
    limit: int | None = None,
    timeout: float = 15,
) -> list[SseEvent]:
    """GET an event stream and read it until the server closes it (or `limit` events, then
    hang up)."""
    events: list[SseEvent] = []
    async with asyncio.timeout(timeout), client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            events.append(event)
            if limit is not None and len(events) >= limit:
                break
    return events


def assert_well_formed(events: Iterable[SseEvent]) -> None:
    """Every event's `id:` is its journal sequence, and ids strictly increase."""
    ids = []
    for event in events:
        assert event.id is not None, event
        assert event.id == str(event.data["seq"]), event
        ids.append(int(event.id))
    assert ids == sorted(set(ids)), ids


# -- in-process server ------------------------------------------------------------------------


@dataclass
class Served:
    """The app over one service, served on a free port, and a client for it."""

    service: RunService
    server: HttpServer
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        """The server's root URL."""
        return self.server.url


@asynccontextmanager
async def served(settings: Settings, **client_args: Any) -> AsyncIterator[Served]:
    """`create_app(RunService)` over a real SQLite file, served by uvicorn on 127.0.0.1:<free>
    inside this event loop, with an httpx client; everything is closed on exit."""
    service = await RunService.open(settings)
    try:
        async with HttpServer(create_app(service)) as server:
            client_args.setdefault("timeout", 15)
            async with httpx.AsyncClient(base_url=server.url, **client_args) as client:
                yield Served(service, server, client)
    finally:
        await service.close()


async def wait_for_run(
    client: httpx.AsyncClient,
    run_id: str,
    until: Any = None,
    timeout: float = 15,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll GET /runs/{id} until `until(run)` holds (default: the run is terminal)."""
    check = until or (lambda run: run["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/runs/{run_id}", headers=headers)
        if response.status_code == 200 and check(response.json()):
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never got there: {response.text}")
        await asyncio.sleep(0.02)


async def wait_for_approval(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    """Poll until the run waits for a decision (its own request or one in its tree)."""
    run = await wait_for_run(client, run_id, lambda r: r["approval"] is not None)
    return run["approval"]


# -- `loom-ops serve` as a process ------------------------------------------------------------


def poll_run(
    client: httpx.Client, run_id: str, until: Any = None, timeout: float = 15
) -> dict[str, Any]:
    """Blocking twin of `wait_for_run`, for a server in another process."""
    check = until or (lambda run: run["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/runs/{run_id}")
        if response.status_code == 200 and check(response.json()):
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never got there: {response.text}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`loom-ops serve` in a child process over one workspace and database file."""

    def __init__(self, workspace: Path, db: Path | str, port: int, *args: str, **env: str) -> None:
        self.workspace = workspace
        self.db = db
        self.port = port
        self.args = args  # more flags for `serve`, e.g. --no-worker
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log = workspace.parent / f"serve-{port}.log"

    def start(self, **extra_env: str) -> ServeProcess:
        """Start the process and wait until /healthz answers."""
        env = cli_env(
            LOOM_OPS_MOCK_LLM="1",
            LOOM_OPS_DB=str(self.db),
            LOOM_OPS_WORKSPACE=str(self.workspace),
            **{**self.env, **extra_env},
        )
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [LOOM_OPS, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                cwd=self.workspace,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not come up: {self.output()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 20) -> int:
        """Wait until the process has exited; its return code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM (it shuts down cleanly), SIGKILL if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def output(self) -> str:
        """What the process wrote so far."""
        return self.log.read_text() if self.log.exists() else ""
