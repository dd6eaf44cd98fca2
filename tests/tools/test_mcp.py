"""MCP tools through the official SDK: steps and health checks, dry-run, crash, hang, env; the
standard `mcpServers` config, one-line config errors, start-up failures, the output cap, and
the `tools/list` check of `runbooks validate` and `loom-ops doctor`."""

from __future__ import annotations

import asyncio
import gc
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
        run = await service.start("m", "mcp-drill")
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
        "server": None,  # the config cannot be read: dry-run shows what it can, and goes on
        "server_tool": None,
        "config_error": f"{workspace / 'ops.mcp.json'}: not valid JSON: Expecting value "
        "(line 1, column 1)",
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
    assert act["error"].endswith("; server 'ops' exited with status 3; its stderr was empty")


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


@pytest.mark.parametrize(
    ("protocol_error", "tool", "mapped"),
    [
        pytest.param(False, "ops.cat", "", id="error-result"),
        pytest.param(True, "read_motd", " (mapped from 'read_motd')", id="json-rpc-error"),
    ],
)
async def test_a_live_call_of_a_tool_the_server_does_not_offer_says_what_it_offers(
    settings: Settings, workspace: Path, protocol_error: bool, tool: str, mapped: str
) -> None:
    # The server answers with an error result (this SDK) or the JSON-RPC error -32602 (others):
    # either way the step says what `runbooks validate` says.
    _workspace(workspace, tool)
    config = json.loads((workspace / "ops.mcp.json").read_text())
    config["tools"]["read_motd"] = {"server": "ops", "tool": "cat"}
    if protocol_error:
        config["servers"]["ops"]["args"].append("--unknown-tool-is-a-protocol-error")
    (workspace / "ops.mcp.json").write_text(json.dumps(config))
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert act["error"] == f"MCP server 'ops' offers no tool 'cat'{mapped}; it offers: {OPS_TOOLS}"


async def test_a_bad_config_is_an_error_outcome(settings: Settings, workspace: Path) -> None:
    _workspace(workspace, "restart_service")
    (workspace / "ops.mcp.json").write_text('{"servers": {}, "tools": {"x": {"server": "nope"')
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert act["error"].startswith(f"{workspace / 'ops.mcp.json'}: not valid JSON: ")


async def test_a_server_that_never_starts_costs_only_the_step_timeout(
    settings: Settings, workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _workspace(workspace, "restart_service", timeout=1)
    silent = {"command": sys.executable, "args": ["-c", "import time; time.sleep(600)"]}
    config = json.loads((workspace / "ops.mcp.json").read_text())
    config["servers"]["ops"] = silent
    (workspace / "ops.mcp.json").write_text(json.dumps(config))
    # wait_for turns a hung run into a test failure instead of a hung suite.
    status, act, _ = await asyncio.wait_for(_run(settings), timeout=60)
    assert status == RunStatus.FAILED
    assert "did not start within 1 s; its stderr was empty" in act["error"]
    gc.collect()  # an unretrieved future's exception is logged when it is collected
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


# -- the standard config format and its errors --------------------------------------------------

EXITS_AT_START = REPO / "tests" / "mcp_servers" / "exits_at_start.py"


def _standard_config(workspace: Path, **servers: dict) -> Path:
    """An `ops.mcp.json` in the shape every MCP client reads, and no `tools` map."""
    path = workspace / "ops.mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def _ops(**extra: object) -> dict:
    return {"command": sys.executable, "args": [str(SERVER)], **extra}


async def test_the_standard_mcp_servers_format_runs_server_dot_tool(
    settings: Settings, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISTED_VAR", "yes")
    monkeypatch.setenv("SECRET_TOKEN_FOR_TEST", "hunter2hunter2")
    _workspace(workspace, "ops.environment")
    env = {"LISTED_VAR": "${LISTED_VAR}", "FIXED_VAR": "1", "UNSET_VAR": "${NOT_SET_ANYWHERE}"}
    _standard_config(workspace, ops=_ops(type="stdio", env=env))
    (workspace / "runbooks" / "mcp-drill.yaml").write_text(
        RUNBOOK.format(tool="ops.environment", arguments="{}", timeout=10).replace(
            "mcp: {tool: probe}", "mcp: {tool: ops.healthy}"
        )
    )
    status, act, probe = await _run(settings)
    assert status == RunStatus.SUCCEEDED, act
    assert (act["server"], act["server_tool"]) == ("ops", "environment")
    names = act["text"].split(",")
    assert "LISTED_VAR" in names and "FIXED_VAR" in names
    assert "UNSET_VAR" not in names and "SECRET_TOKEN_FOR_TEST" not in names
    assert probe["text"] == "healthy"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"mcpServers": {"fs": {"command": "npx", "args": "-y server-filesystem"}}},
            "server 'fs': args: Input should be a valid list",
            id="standard-args",
        ),
        pytest.param(
            {"mcpServers": {"fs": {"command": "npx", "env": {"TOKEN": 42}}}},
            "server 'fs': env: the value of 'TOKEN' must be a string",
            id="standard-env",
        ),
        pytest.param(
            {"mcpServers": {"web": {"url": "https://example.invalid/mcp"}}},
            "server 'web': remote (HTTP) MCP servers are not supported: give a command",
            id="remote",
        ),
        pytest.param(
            {"servers": {"ops": {"command": "ops-mcp", "args": [1]}}},
            "server 'ops': args[0]: Input should be a valid string",
            id="ours-args-item",
        ),
        pytest.param(
            {"mcpServers": {}, "servers": {}},
            'give "mcpServers" or "servers", not both',
            id="both-keys",
        ),
        pytest.param(
            {"servers": {}, "tools": {"x": {"server": "nope", "tool": "y"}}},
            "tool 'x': server: 'nope' is not a configured server (none)",
            id="tool-server",
        ),
    ],
)
def test_a_config_error_is_one_line_naming_the_file_the_server_and_the_field(
    tmp_path: Path, document: dict, expected: str
) -> None:
    from agent.errors import ErrorKind, McpError
    from agent.tools.mcp import McpConfig

    path = tmp_path / "ops.mcp.json"
    path.write_text(json.dumps(document))
    with pytest.raises(McpError) as caught:
        McpConfig.load(path)
    assert str(caught.value) == f"{path}: {expected}"
    assert caught.value.kind == ErrorKind.INVALID


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"mcpServers": {"fs": {"comand": "npx"}}},
            "server 'fs': command is required; "
            "server 'fs': unknown field 'comand' (did you mean 'command'?)",
            id="misspelled-command",
        ),
        pytest.param(
            {"mcpServers": {"fs": {"command": "npx", "arg": ["-y"]}}},
            "server 'fs': unknown field 'arg' (did you mean 'args'?)",
            id="misspelled-args",
        ),
        pytest.param(
            {"mcpservers": {}},
            "unknown field 'mcpservers' (did you mean 'mcpServers'?)",
            id="misspelled-mcpServers",
        ),
        pytest.param(
            {"mcpServers": {"fs": {"command": "npx", "flavour": 1}}},
            "server 'fs': unknown field 'flavour'",
            id="unknown-field",
        ),
        pytest.param(
            {
                "mcpServers": {
                    "a": {"command": "a", "args": "-y"},
                    "b": {"command": "b", "startup_timout": 5},
                },
                "tools": {"t": {"server": "a", "tol": "x"}},
            },
            "server 'a': args: Input should be a valid list; "
            "server 'b': unknown field 'startup_timout' (did you mean 'startup_timeout'?); "
            "tool 't': tool is required; tool 't': unknown field 'tol' (did you mean 'tool'?)",
            id="every-problem",
        ),
        pytest.param(
            {
                "servers": {},
                "tools": {"x": {"server": "a", "tool": "y"}, "z": {"server": "b", "tool": "y"}},
            },
            "tool 'x': server: 'a' is not a configured server (none); "
            "tool 'z': server: 'b' is not a configured server (none)",
            id="every-tool-server",
        ),
    ],
)
def test_a_config_error_names_every_problem_and_the_field_a_misspelling_meant(
    tmp_path: Path, document: dict, expected: str
) -> None:
    from agent.errors import McpError
    from agent.tools.mcp import McpConfig

    path = tmp_path / "ops.mcp.json"
    path.write_text(json.dumps(document))
    with pytest.raises(McpError) as caught:
        McpConfig.load(path)
    assert str(caught.value) == f"{path}: {expected}"


async def test_a_dry_run_step_says_when_the_mcp_config_is_unusable_and_still_succeeds(
    settings: Settings, workspace: Path
) -> None:
    from agent.views.summary import summary_of

    _workspace(workspace, "ops.restart", '{service: "{{ service }}"}')
    path = _standard_config(workspace, ops=_ops(), fs={"command": "npx", "arg": ["-y"]})
    problem = f"{path}: server 'fs': unknown field 'arg' (did you mean 'args'?)"
    status, act, probe = await _run(settings, live=False)
    assert status == RunStatus.SUCCEEDED
    assert act["dry_run"] is True and act["config_error"] == problem
    assert probe["dry_run"] is True and probe["config_error"] == problem
    service = await RunService.open(settings)
    try:
        steps = {s.step_id: s.detail for s in summary_of(await service.run_tree("m")).steps}
    finally:
        await service.close()
    assert steps["act"] == (
        f'dry-run MCP ops.restart (MCP config unusable: {problem}), arguments {{"service": "api"}}'
    )
    assert steps["probe"] == f"dry-run MCP probe (MCP config unusable: {problem}), arguments {{}}"


# -- start-up failures ----------------------------------------------------------------------------


async def test_a_server_that_exits_at_start_names_its_exit_status_and_stderr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.errors import McpError
    from agent.tools.mcp import McpConfig, McpHub

    config = McpConfig.model_validate(
        {
            "mcpServers": {
                "fs": {"command": sys.executable, "args": [str(EXITS_AT_START)]},
                "gone": {"command": str(tmp_path / "no-such-server")},
            }
        }
    )
    hub = McpHub(config)
    try:
        with pytest.raises(McpError) as exited:
            await hub.call("fs.read_text_file", {}, timeout=10)
        with pytest.raises(McpError) as missing:
            await hub.call("gone.anything", {}, timeout=10)
    finally:
        await hub.close()
    assert str(exited.value) == (
        "MCP server 'fs' exited with status 3 at start; stderr: starting loom-ops test server | "
        "Error: ENOENT: no such file or directory, stat '/srv/missing'"
    )
    assert str(missing.value) == (
        f"MCP server 'gone' could not run '{tmp_path / 'no-such-server'}': "
        "No such file or directory"
    )
    gc.collect()  # an unretrieved future's exception is logged when it is collected
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text and "TaskGroup" not in caplog.text


async def test_a_start_up_failure_is_the_step_s_error_outcome(
    settings: Settings, workspace: Path
) -> None:
    _workspace(workspace, "fs.read_text_file")
    _standard_config(workspace, fs={"command": sys.executable, "args": [str(EXITS_AT_START)]})
    status, act, _ = await _run(settings)
    assert status == RunStatus.FAILED
    assert "MCP server 'fs' exited with status 3 at start" in act["error"]
    assert "stat '/srv/missing'" in act["error"]


# -- the output cap -------------------------------------------------------------------------------


async def test_a_large_result_is_capped_at_output_cap_with_a_marker(
    settings: Settings, workspace: Path
) -> None:
    size = 300_000
    _workspace(workspace, "ops.big", f"{{size: {size}}}")
    capped = settings.model_copy(update={"output_cap": 4096})
    status, act, _ = await _run(capped)
    assert status == RunStatus.SUCCEEDED
    assert act["text_bytes"] == size and act["truncated"] is True
    kept, _, marker = act["text"].rpartition("\n")
    assert kept == "x" * 4096
    assert marker == f"[… truncated: {size - 4096} more bytes of {size} (output_cap 4096)]"
    # The structured copy of the same text is over the cap: only its size is kept.
    assert "data" not in act and act["data_bytes"] > size
    assert len(json.dumps(act)) < 6000  # what is journaled, not 2 x 300 kB


def test_capping_keeps_whole_characters() -> None:
    from agent.tools.mcp import capped_result

    result = capped_result(False, "é" * 1000, None, 1025)  # 2000 bytes; byte 1025 splits an é
    kept = result.text.partition("\n")[0]
    assert kept == "é" * 512 and result.text_bytes == 2000
    assert result.text.endswith("[… truncated: 976 more bytes of 2000 (output_cap 1025)]")
    assert capped_result(False, "short", {"a": 1}, 1024).truncated is False


# -- dry-run --------------------------------------------------------------------------------------


async def test_a_dry_run_step_shows_the_server_the_tool_and_the_arguments(
    settings: Settings, workspace: Path
) -> None:
    from agent.views.summary import summary_of

    _workspace(workspace, "restart_service", '{service: "{{ service }}"}')
    service = await RunService.open(settings)
    try:
        await service.start("m", "mcp-drill")
        steps = {
            step.step_id: step.detail for step in summary_of(await service.run_tree("m")).steps
        }
    finally:
        await service.close()
    assert steps["act"] == (
        'dry-run MCP restart_service (server ops, tool restart), arguments {"service": "api"}'
    )
    assert steps["probe"] == "dry-run MCP probe (server ops, tool healthy), arguments {}"


# -- runbooks validate and doctor: tools/list -----------------------------------------------------

TOOLS_RUNBOOK = """\
id: {id}
title: Uses MCP tools
triggers: [{id}]
steps:
  - id: use
    title: Use a tool
    mcp: {{tool: {tool}}}
"""


def _tools_workspace(workspace: Path) -> None:
    runbooks = workspace / "runbooks"
    for old in runbooks.glob("*.yaml"):
        old.unlink()
    for runbook_id, tool in (
        ("good", "ops.restart"),
        ("typo", "ops.reboot"),
        ("mapped", "restart_service"),
        ("broken", "fs.read_text_file"),
    ):
        (runbooks / f"{runbook_id}.yaml").write_text(TOOLS_RUNBOOK.format(id=runbook_id, tool=tool))
    config = {
        "mcpServers": {
            "ops": _ops(),
            "fs": {"command": sys.executable, "args": [str(EXITS_AT_START)]},
        },
        "tools": {"restart_service": {"server": "ops", "tool": "restart_it"}},
    }
    (workspace / "ops.mcp.json").write_text(json.dumps(config))


OPS_TOOLS = "big, crash, environment, hang, healthy, refuse, restart"


def test_validate_gives_each_runbook_an_mcp_check_failed_an_error_row_with_the_reason(
    workspace: Path, tmp_path: Path
) -> None:
    from tests.cli_helpers import Cli

    _tools_workspace(workspace)
    result = Cli(workspace, tmp_path / "ops.sqlite")("runbooks", "validate")
    assert result.returncode == 2, result.describe()
    started = (
        "MCP server 'fs' exited with status 3 at start; stderr: starting loom-ops test server | "
        "Error: ENOENT: no such file or directory, stat '/srv/missing' "
        "(used for: fs.read_text_file)"
    )
    reboot = f"MCP server 'ops' offers no tool 'reboot', used by typo/use; it offers: {OPS_TOOLS}"
    restart_it = (
        "MCP server 'ops' offers no tool 'restart_it' (mapped from 'restart_service'), used by "
        f"mapped/use; it offers: {OPS_TOOLS}"
    )
    assert result.stdout.splitlines() == [  # one row per runbook, in the order of the files
        f"error    broken: {started}",
        "ok       good",
        f"error    mapped: {restart_it}",
        f"error    typo: {reboot}",
    ]
    assert result.stderr_lines() == [f"loom-ops: {e}" for e in (started, reboot, restart_it)]


async def test_doctor_checks_each_tool_against_tools_list(
    settings: Settings, workspace: Path
) -> None:
    from agent.frontends.doctor import diagnose

    _tools_workspace(workspace)
    findings = [f for f in await diagnose(settings) if f.check == "mcp"]
    assert [f.severity for f in findings] == ["error", "error", "error"]
    assert "MCP server 'fs' exited with status 3 at start" in findings[0].message
    assert findings[1].message.startswith("MCP server 'ops' offers no tool 'reboot'")
    assert "(mapped from 'restart_service')" in findings[2].message


# -- a reference server from PyPI -------------------------------------------------------------


async def test_the_reference_time_server_lists_its_tools_or_says_why_it_cannot_start() -> None:
    pytest.importorskip("mcp_server_time", reason="mcp-server-time is not installed")
    from agent.tools.mcp import McpConfig, offered_tools

    time_server = [sys.executable, "-m", "mcp_server_time"]
    config = McpConfig.model_validate(
        {
            "mcpServers": {
                "time": {"command": sys.executable, "args": time_server[1:]},
                "mars": {
                    "command": sys.executable,
                    "args": [*time_server[1:], "--local-timezone=Mars/Olympus"],
                },
            }
        }
    )
    offered = await offered_tools(config, ["time", "mars"])
    assert "get_current_time" in offered["time"]
    assert str(offered["mars"]) == (
        "MCP server 'mars' exited with status 1 at start; stderr: Error: invalid "
        "--local-timezone 'Mars/Olympus': not a known IANA timezone name"
    )
