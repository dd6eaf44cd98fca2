"""A small MCP server for the tests, built with the official SDK, spoken to over stdio.

With `--unknown-tool-is-a-protocol-error` it answers a call of a tool it does not offer with
the JSON-RPC error -32602 (as servers of other SDKs do), not with an error result."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

app = MCPServer("loom-ops-test")


@app.tool()
def restart(service: str) -> str:
    """Pretend to restart a service."""
    return f"restarted {service}"


@app.tool()
def healthy() -> str:
    """A health probe that passes."""
    return "healthy"


@app.tool()
def refuse(reason: str) -> str:
    """A tool that fails the way tools do: an error result."""
    raise ValueError(f"refused: {reason}")


@app.tool()
def crash() -> str:
    """The server process dies mid-call."""
    os._exit(3)


@app.tool()
def hang() -> str:
    """The server never answers."""
    time.sleep(600)
    return "too late"


@app.tool()
def big(size: int) -> str:
    """A result of `size` bytes, as a read of a large file returns."""
    return "x" * size


@app.tool()
def environment() -> str:
    """The names of the variables this server was given."""
    return ",".join(sorted(os.environ))


if "--unknown-tool-is-a-protocol-error" in sys.argv:
    answer_tools = app.call_tool

    async def _call_tool(name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        if name not in {tool.name for tool in await app.list_tools()}:
            raise MCPError(code=INVALID_PARAMS, message=f"Tool {name} not found")
        return await answer_tools(name, arguments, context)

    app.call_tool = _call_tool  # type: ignore[method-assign]


if __name__ == "__main__":
    app.run()
