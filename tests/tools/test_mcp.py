"""MCP tools through the official SDK: steps and health checks, dry-run, crash, hang, env."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from agent.records import RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import REPO

SERVER = REPO / "tests" / "mcp_servers" / "ops_server.py"

RUNBOOK = """\
id: mcp-drill
title: MCP drill
triggers: [mcp drill]
params:
  service: {{default: api, pattern: "[a-z]+"}}
steps:
  - id: act
    title: Call the tool
    timeout: {timeout}
    mcp:
      tool: {tool}
      arguments: {arguments}
  - id: probe
    title: Health through MCP
    check:
      mcp: {{tool: probe}}
"""


def _workspace(workspace: Path, tool: str, arguments: str = "{}", timeout: float = 10) -> None:
    (workspace / "runbooks" / "mcp-drill.yaml").write_text(
        RUNBOOK.format(tool=tool, arguments=arguments, timeout=timeout)
    )
    config = {
        "servers": {
            "ops": {"command": sys.executable, "args": [str(SERVER)], "env": ["LISTED_VAR"]}
        },
        "tools": {
            name: {"server": "ops", "tool": target}
            for name, target in {
                "restart_service": "restart",
                "probe": "healthy",
                "refuse": "refuse",
                "crash": "crash",
                "hang": "hang",
                "environment": "environment",
            }.items()
        },
    }
    (workspace / "ops.mcp.json").write_text(json.dumps(config))


async def _run(settings: Settings, live: bool = True) -> tuple[RunStatus, dict, dict]:
    configured = settings.model_copy(update={"allow_mcp": live, "live_checks": live})
    service = await RunService.open(configured)
    try:
        run = await service.start("m", "mcp drill")
        calls = {c.step_id: c for c in await service.store.list_tool_calls("m") if c.step_id}
        act = calls["act"].outcome or {}
        probe = (calls["probe"].outcome or {}) if "probe" in calls else {}
        return run.status, act, probe
    finally:
        await service.close()


async def test_a_step_and_a_health_check_through_mcp(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "restart_service", '{service: "{{ service }}"}')
    status, act, probe = await _run(settings)
    assert status == RunStatus.SUCCEEDED
    assert act["mode"] == "live" and act["text"] == "restarted api"
    assert act["arguments"] == {"service": "api"}
    assert probe["text"] == "healthy" and probe["is_error"] is False


async def test_dry_run_calls_no_server(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "restart_service", '{service: "{{ service }}"}')
    (workspace / "ops.mcp.json").write_text("this would fail to parse if it were read")
    status, act, probe = await _run(settings, live=False)
    assert status == RunStatus.SUCCEEDED
    assert act == {
        "mcp_tool": "restart_service",
        "arguments": {"service": "api"},
        "mode": "dry-run",
        "dry_run": True,
    }
    assert probe["dry_run"] is True


async def test_a_tool_error_is_an_outcome(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "refuse", '{reason: "maintenance window"}')
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert act["is_error"] is True and "refuse" in act["error"]


async def test_a_crashing_server_is_a_tool_error(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "crash", timeout=5)
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert act["mode"] == "live" and "crash" in act["error"]


async def test_a_hanging_server_times_out(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "hang", timeout=3)
    # wait_for turns a hung run into a test failure instead of a hung suite.
    status, act, _ = await asyncio.wait_for(_run(settings), timeout=60)
    assert status == RunStatus.FAILED
    assert "did not answer within 3 s" in act["error"]


async def test_only_listed_variables_reach_the_server(
    settings: Settings, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISTED_VAR", "yes")
    monkeypatch.setenv("SECRET_TOKEN_FOR_TEST", "hunter2hunter2")
    _workspace(workspace, "environment")
    status, act, _ = await _run(settings)
    assert status == RunStatus.SUCCEEDED
    names = act["text"].split(",")
    assert "LISTED_VAR" in names and "SECRET_TOKEN_FOR_TEST" not in names


async def test_a_bad_config_is_an_error_outcome(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "restart_service")
    (workspace / "ops.mcp.json").write_text('{"servers": {}, "tools": {"x": {"server": "nope"')
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert "invalid MCP config" in act["error"]


async def test_a_server_that_never_starts_costs_only_the_step_timeout(
    settings: Settings, workspace: Path
) -> None:
    _workspace(workspace, "restart_service", timeout=1)
    silent = {"command": sys.executable, "args": ["-c", "import time; time.sleep(600)"]}
    config = json.loads((workspace / "ops.mcp.json").read_text())
    config["servers"]["ops"] = silent
    (workspace / "ops.mcp.json").write_text(json.dumps(config))
    # wait_for turns a hung run into a test failure instead of a hung suite.
    status, act, _ = await asyncio.wait_for(_run(settings), timeout=60)
    assert status == RunStatus.FAILED
    assert "did not start within 1 s" in act["error"]
