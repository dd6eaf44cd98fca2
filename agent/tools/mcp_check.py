"""Whether the MCP tools runbooks name exist: resolvable in the MCP config (a mapped name or
`<server>.<tool>`) and offered by their server's `tools/list`. Each server a runbook uses is
started once, all of them at once, each bounded by its `startup_timeout` plus
`LIST_TIMEOUT`, and stopped again. `runbooks validate` and `loom-ops doctor` both report
these findings, in the same words.

Severities: a server that cannot start, or that does not offer a tool a runbook names, is an
error (the runbook cannot work with this config, whatever the mode); a tool the config cannot
resolve, or a config that cannot be read, is an error when a step using it calls MCP live
(`LOOM_OPS_ALLOW_MCP=1` for `mcp` steps, `LOOM_OPS_LIVE_CHECKS=1` for `check: {mcp: ...}`),
a warning while it is dry-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.errors import McpError
from agent.records import record
from agent.tools.mcp import McpConfig, no_such_tool, offered_tools

if TYPE_CHECKING:
    from agent.runbook.model import Runbook

Severity = Literal["error", "warning", "ok"]


@record
class McpUse:
    """One step's use of an MCP tool: which tool, where, and whether it is called live."""

    tool: str
    runbook_id: str
    step_id: str
    live: bool


@record
class McpFinding:
    """One line about the MCP tools runbooks use."""

    severity: Severity
    message: str
    runbooks: tuple[str, ...] = ()  # the ids of the runbooks it is about


def mcp_uses(runbooks: Sequence[Runbook], allow_mcp: bool, live_checks: bool) -> list[McpUse]:
    """Every MCP tool the runbooks name: a `mcp` step acts (live with `allow_mcp`), a
    `check: {mcp: ...}` reads (live with `live_checks`)."""
    uses = []
    for runbook in runbooks:
        for step in runbook.steps:
            if step.mcp is not None:
                uses.append(McpUse(step.mcp.tool, runbook.id, step.id, allow_mcp))
            if step.check is not None and step.check.mcp is not None:
                uses.append(McpUse(step.check.mcp.tool, runbook.id, step.id, live_checks))
    return uses


async def check_mcp_tools(path: Path, uses: Sequence[McpUse]) -> list[McpFinding]:
    """The findings about `uses` against the config at `path` (see the module's severities);
    one `ok` finding when every tool is offered. Starts the servers used (bounded)."""
    if not uses:
        return []
    live_tools = {use.tool for use in uses if use.live}
    every_runbook = tuple(dict.fromkeys(use.runbook_id for use in uses))
    try:
        config = McpConfig.load(path)
    except McpError as exc:
        severity: Severity = "error" if live_tools else "warning"
        return [McpFinding(severity, f"{exc}; fix the file", every_runbook)]
    where: dict[str, list[str]] = {}  # tool -> "runbook/step" of each use
    owners: dict[str, list[str]] = {}  # tool -> runbook ids
    for use in uses:
        for table, item in ((where, f"{use.runbook_id}/{use.step_id}"), (owners, use.runbook_id)):
            if item not in table.setdefault(use.tool, []):
                table[use.tool].append(item)
    resolved = {tool: config.resolve(tool) for tool in sorted(where)}
    findings: list[McpFinding] = []
    for tool, mapping in resolved.items():
        if mapping is None:
            findings.append(
                McpFinding(
                    "error" if tool in live_tools else "warning",
                    f"MCP tool {tool!r} (used by {', '.join(where[tool])}) is not in {path}: "
                    f'map it under "tools" (mapped: {", ".join(sorted(config.tools)) or "none"}) '
                    f"or name it <server>.<tool> "
                    f"(servers: {', '.join(sorted(config.servers)) or 'none'})",
                    tuple(owners[tool]),
                )
            )
    offered = await offered_tools(config, {m.server for m in resolved.values() if m is not None})
    for server, tools in sorted(offered.items()):
        if isinstance(tools, McpError):
            users = [t for t, m in resolved.items() if m is not None and m.server == server]
            findings.append(
                McpFinding(
                    "error",
                    f"{tools} (used for: {', '.join(users)})",
                    tuple(dict.fromkeys(r for t in users for r in owners[t])),
                )
            )
    for tool, mapping in resolved.items():
        names = offered.get(mapping.server) if mapping is not None else None
        if mapping is None or not isinstance(names, list) or mapping.tool in names:
            continue
        message = no_such_tool(mapping.server, mapping.tool, names, tool, ", ".join(where[tool]))
        findings.append(McpFinding("error", message, tuple(owners[tool])))
    if not findings:
        named = [
            tool if tool == f"{m.server}.{m.tool}" else f"{tool} ({m.server}.{m.tool})"
            for tool, m in resolved.items()
            if m is not None
        ]
        findings.append(
            McpFinding("ok", f"{path}: every MCP tool used is offered: {', '.join(named)}")
        )
    return findings
