"""MCP tools over stdio through the official `mcp` SDK: configured servers, started lazily,
shared by every run of the process, closed at exit. A crashed or hanging server is a tool error
with a timeout, never a hung run.

The config file (`LOOM_OPS_MCP_CONFIG`, default `<workspace>/ops.mcp.json`):

    {"servers": {"ops": {"command": "ops-mcp", "args": ["--stdio"], "env": ["KUBECONFIG"]}},
     "tools": {"restart_service": {"server": "ops", "tool": "restart"}}}

A runbook names the mapped tool (`restart_service`); only the variables listed in `env` are
passed to the server (beside the SDK's minimal default environment: PATH, HOME, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import McpError


class McpServerConfig(BaseModel):
    """How to start one MCP server."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)  # names of variables passed through
    startup_timeout: float = Field(default=20.0, gt=0, le=300)


class McpToolMapping(BaseModel):
    """A runbook-facing tool name mapped onto a server's tool."""

    model_config = ConfigDict(extra="forbid")

    server: str
    tool: str


class McpConfig(BaseModel):
    """The whole MCP config file."""

    model_config = ConfigDict(extra="forbid")

    servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    tools: dict[str, McpToolMapping] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> McpConfig:
        """Read the config; a missing file means no MCP tools."""
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise McpError(f"{path}: {exc.strerror or exc}") from None
        try:
            config = cls.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise McpError(f"{path}: invalid MCP config: {first}") from None
        for name, mapping in config.tools.items():
            if mapping.server not in config.servers:
                raise McpError(f"{path}: tool {name!r} maps to unknown server {mapping.server!r}")
        return config


@dataclass(frozen=True)
class McpResult:
    """What a tool call returned: whether the server flagged an error, its text and data."""

    is_error: bool
    text: str
    data: Any


class _Server:
    """One running server: a task holds its stdio transport and session open until closed."""

    def __init__(self, name: str, config: McpServerConfig) -> None:
        self.name = name
        self.config = config
        self.session: Any = None
        self._ready: asyncio.Future[Any] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = asyncio.create_task(self._hold(), name=f"mcp:{self.name}")
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout=timeout)
        except TimeoutError:
            await self.close()
            raise McpError(f"MCP server {self.name!r} did not start within {timeout:g} s") from None

    async def _hold(self) -> None:
        # Imported here: the SDK is only needed by workspaces that configure MCP servers.
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        assert self._ready is not None
        env = {k: os.environ[k] for k in self.config.env if k in os.environ}
        params = StdioServerParameters(command=self.config.command, args=self.config.args, env=env)
        try:
            # The server's stderr is not ours to print.
            with open(os.devnull, "w") as quiet:
                async with (
                    stdio_client(params, errlog=quiet) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    self.session = session
                    self._ready.set_result(session)
                    await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(
                    McpError(f"MCP server {self.name!r} failed to start: {exc}")
                )
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self.session is not None

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            # A server that never finished starting cannot shut down politely: cancel it.
            grace = 5 if self.session is not None else 0.01
            try:
                await asyncio.wait_for(self._task, timeout=grace)
            except (TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task


class McpHub:
    """The process's MCP servers: each started on first use, restarted after a crash."""

    def __init__(self, config: McpConfig) -> None:
        self.config = config
        self._servers: dict[str, _Server] = {}
        self._lock = asyncio.Lock()

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> McpResult:
        """Call a mapped tool; any failure (unknown, crash, hang) raises McpError."""
        mapping = self.config.tools.get(tool)
        if mapping is None:
            known = ", ".join(sorted(self.config.tools)) or "none"
            raise McpError(f"unknown MCP tool {tool!r} (configured: {known})")
        # Starting a server counts against the call's own timeout, not only the server's.
        startup = min(self.config.servers[mapping.server].startup_timeout, timeout)
        session = await self._session(mapping.server, startup)
        try:
            result = await asyncio.wait_for(
                session.call_tool(mapping.tool, arguments, read_timeout_seconds=timeout),
                timeout=timeout + 1,
            )
        except Exception as exc:  # timed out, or the transport broke (the server crashed)
            await self._drop(mapping.server)  # restarted on the next call
            if isinstance(exc, TimeoutError) or _is_timeout(exc):
                raise McpError(f"MCP tool {tool!r} did not answer within {timeout:g} s") from None
            raise McpError(f"MCP tool {tool!r} failed: {type(exc).__name__}: {exc}") from None
        text = "\n".join(getattr(part, "text", "") for part in result.content).strip()
        return McpResult(bool(result.is_error), text, result.structured_content)

    async def _session(self, name: str, startup_timeout: float) -> Any:
        async with self._lock:
            server = self._servers.get(name)
            if server is not None and server.alive:
                return server.session
            if server is not None:
                await server.close()
            server = _Server(name, self.config.servers[name])
            self._servers[name] = server
            return await server.start(startup_timeout)

    async def _drop(self, name: str) -> None:
        async with self._lock:
            server = self._servers.pop(name, None)
        if server is not None:
            await server.close()

    async def close(self) -> None:
        """Stop every server this process started."""
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await server.close()


def _is_timeout(exc: BaseException) -> bool:
    """The SDK reports its own read timeout as an error with the JSON-RPC timeout code."""
    from mcp.shared.exceptions import MCPError
    from mcp_types import REQUEST_TIMEOUT

    return isinstance(exc, MCPError) and exc.error.code == REQUEST_TIMEOUT
