"""A small MCP server for the tests, built with the official SDK, spoken to over stdio."""

from __future__ import annotations

import os
import time

from mcp.server.mcpserver import MCPServer

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


if __name__ == "__main__":
    app.run()
