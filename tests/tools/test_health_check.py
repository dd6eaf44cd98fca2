"""check_health against a real HTTP server on 127.0.0.1 (one that never answers included), and
its marked dry-run stand-in."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.records import RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.support import open_service


class _Health(BaseHTTPRequestHandler):
    """GET /ok answers 200, /down 503, /slow 200 after 300 ms."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(0.3)
        status = 503 if self.path == "/down" else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def server() -> Iterator[str]:
    """A local HTTP server on a free port; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _checks_runbook(workspace: Path, base: str, path: str, max_ms: int = 2000) -> None:
    (workspace / "runbooks" / "probe.yaml").write_text(
        "id: probe\ntitle: Probe\ntriggers: [probe health]\nsteps:\n"
        f"  - id: check\n    title: Check\n    check:\n      url: {base}{path}\n"
        f"      expect_status: 200\n      max_latency_ms: {max_ms}\n"
    )


async def _check_outcome(settings: Settings) -> tuple[RunStatus, str, dict[str, object]]:
    service = await RunService.open(settings)
    try:
        run = await service.start("probe", "probe health")
        call = next(c for c in await service.store.list_tool_calls("probe") if c.step_id)
        assert call.tool == "check_health" and call.outcome is not None
        return run.status, call.status, call.outcome
    finally:
        await service.close()


@pytest.mark.parametrize(
    ("path", "max_ms", "run_status", "call_status", "error"),
    [
        ("/ok", 2000, RunStatus.SUCCEEDED, "ok", None),
        ("/down", 2000, RunStatus.FAILED, "error", "status 503, expected 200"),
        ("/slow", 100, RunStatus.FAILED, "error", "over 100 ms"),
    ],
)
async def test_live_check_reports_status_and_latency(
    workspace: Path,
    settings: Settings,
    server: str,
    path: str,
    max_ms: int,
    run_status: RunStatus,
    call_status: str,
    error: str | None,
) -> None:
    _checks_runbook(workspace, server, path, max_ms)
    live = settings.model_copy(update={"live_checks": True})
    status, call, outcome = await _check_outcome(live)
    assert (status, call) == (run_status, call_status)
    assert outcome["url"] == f"{server}{path}"
    assert "synthetic" not in outcome
    assert isinstance(outcome["latency_ms"], float)
    if error is None:
        assert outcome["ok"] is True and outcome["status_code"] == 200
    else:
        assert error in str(outcome["error"])


async def test_dry_run_check_is_synthetic_and_says_so(
    workspace: Path, settings: Settings, server: str
) -> None:
    # The URL would fail for real; in dry-run nothing is sent and the result is marked.
    _checks_runbook(workspace, server, "/down")
    status, call, outcome = await _check_outcome(settings)
    assert (status, call) == (RunStatus.SUCCEEDED, "ok")
    assert outcome["synthetic"] is True and outcome["dry_run"] is True


# A hung health check: HTTP here; an MCP `check` goes through the same timeout.
HUNG_CHECK_RUNBOOK = """\
id: hung-check
title: Hung check drill
triggers: [hung check drill]
steps:
  - id: probe
    title: Health endpoint that never answers
    timeout: 0.5
    check:
      url: http://127.0.0.1:{port}/healthz
"""


async def test_a_hanging_health_check_obeys_the_step_timeout(
    settings: Settings, workspace: Path
) -> None:
    """An endpoint that accepts the connection and never answers: the check ends at the step's
    timeout (0.5 s) and the run fails, instead of hanging until the run's deadline."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (workspace / "runbooks" / "hung-check.yaml").write_text(HUNG_CHECK_RUNBOOK.format(port=port))
    configured = settings.model_copy(update={"live_checks": True, "run_deadline": 60.0})
    try:
        async with open_service(configured) as service:
            run = await asyncio.wait_for(service.start("hc", "hung check drill"), timeout=2.5)
        assert run.status == RunStatus.FAILED
    finally:
        server.close()
