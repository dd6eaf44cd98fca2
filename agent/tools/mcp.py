"""MCP tools over stdio through the official `mcp` SDK: configured servers, started lazily,
shared by every run of the process, closed at exit. A crashed or hanging server is a tool error
with a timeout, never a hung run; a server that cannot start is one error naming it, its exit
status and the last words of its stderr.

The config file (`LOOM_OPS_MCP_CONFIG`, default `<workspace>/ops.mcp.json`) takes the shape
every MCP client reads, with an optional `tools` map of runbook-facing names:

    {"mcpServers": {"fs": {"command": "npx",
                           "args": ["-y", "@modelcontextprotocol/server-filesystem", "/srv"],
                           "env": {"KUBECONFIG": "${KUBECONFIG}"}}},
     "tools": {"read_file": {"server": "fs", "tool": "read_text_file"}}}

`"servers"` is the same map under loom-ops's older key (one model reads both). A runbook names
a tool as `<server>.<tool>` (`fs.read_text_file`) or by a name mapped under `tools`. A server
gets the SDK's minimal default environment (PATH, HOME, ...) plus its `env`: a list of names
passed through from loom-ops's environment, or an object of values, where a value `${NAME}`
is taken from loom-ops's environment (and the variable left out when it is unset).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ErrorKind, McpError
from agent.records import record

STDERR_KEPT = 8192  # bytes of a server's stderr kept: its last words explain a failure
_STDERR_SHOWN = 400  # characters of them quoted in an error line
_STDERR_EOF_WAIT = 1.0  # seconds to wait for a dead server's stderr to close (a child holds it)
LIST_TIMEOUT = 10.0  # seconds a started server has to answer `tools/list`
_SHOWN = 12  # tool names listed in one error: a filesystem server offers a dozen or more
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class McpServerConfig(BaseModel):
    """How to start one stdio MCP server; an entry of `mcpServers` (or `servers`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["stdio"] = "stdio"  # the standard format's transport: only stdio here
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    # A list of names passed through, or an object of values (`${NAME}` taken from ours).
    env: list[str] | dict[str, str] = Field(default_factory=list)
    cwd: str | None = None
    startup_timeout: float = Field(default=20.0, gt=0, le=300)

    @model_validator(mode="before")
    @classmethod
    def _stdio_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" in data and "command" not in data:
            raise ValueError("remote (HTTP) MCP servers are not supported: give a command")
        return data

    @field_validator("env", mode="before")
    @classmethod
    def _env_shape(cls, value: Any) -> Any:
        # Checked before the union is tried: pydantic would report both failed alternatives.
        if isinstance(value, list):
            if not all(isinstance(name, str) for name in value):
                raise ValueError("env: a list of variable names (strings)")
        elif isinstance(value, dict):
            wrong = [name for name, v in value.items() if not isinstance(v, str)]
            if wrong:
                raise ValueError(f"the value of {wrong[0]!r} must be a string")
        else:
            raise ValueError("a list of variable names or an object of name: value")
        return value

    def environment(self) -> dict[str, str]:
        """The variables given to the server beside the SDK's default ones."""
        if isinstance(self.env, list):
            return {name: os.environ[name] for name in self.env if name in os.environ}
        given: dict[str, str] = {}
        for name, value in self.env.items():
            reference = _REFERENCE.fullmatch(value)
            if reference is None:
                given[name] = value
            elif reference[1] in os.environ:
                given[name] = os.environ[reference[1]]
        return given


class McpToolMapping(BaseModel):
    """A runbook-facing tool name mapped onto a server's tool."""

    model_config = ConfigDict(extra="forbid")

    server: str
    tool: str


class McpConfig(BaseModel):
    """The whole MCP config file: servers (standard `mcpServers` or `servers`) and tools."""

    model_config = ConfigDict(extra="forbid")

    servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    tools: dict[str, McpToolMapping] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _standard_shape(cls, data: Any) -> Any:
        # The standard `mcpServers` map is our `servers` map under another key.
        if isinstance(data, dict) and "mcpServers" in data:
            if "servers" in data:
                raise ValueError('give "mcpServers" or "servers", not both')
            data = {("servers" if k == "mcpServers" else k): v for k, v in data.items()}
        return data

    @classmethod
    def load(cls, path: Path) -> McpConfig:
        """Read the config; a missing file means no MCP tools. McpError (kind INVALID) is one
        line naming the file and every problem of it ("; " between them), each with the
        server or tool and the field: `unknown field 'arg' (did you mean 'args'?)`."""
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise McpError(f"{path}: {exc.strerror or exc}") from None
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise McpError(
                f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                kind=ErrorKind.INVALID,
            ) from None
        try:
            config = cls.model_validate(document)
        except ValidationError as exc:
            problems = "; ".join(_problem(error) for error in exc.errors())
            raise McpError(f"{path}: {problems}", kind=ErrorKind.INVALID) from None
        servers = ", ".join(sorted(config.servers)) or "none"
        unknown = [
            f"tool {name!r}: server: {mapping.server!r} is not a configured server ({servers})"
            for name, mapping in config.tools.items()
            if mapping.server not in config.servers
        ]
        if unknown:
            raise McpError(f"{path}: {'; '.join(unknown)}", kind=ErrorKind.INVALID)
        return config

    def resolve(self, name: str) -> McpToolMapping | None:
        """The server and tool a runbook's tool name means: a name mapped under `tools`, or
        `<server>.<tool>` (the longest configured server name wins); None when neither."""
        mapped = self.tools.get(name)
        if mapped is not None:
            return mapped
        prefixes = [s for s in self.servers if name.startswith(f"{s}.") and len(name) > len(s) + 1]
        if not prefixes:
            return None
        server = max(prefixes, key=len)
        return McpToolMapping(server=server, tool=name[len(server) + 1 :])


def _problem(error: Any) -> str:
    """One validation error as a person reads it: `server 'fs': args: Input should be a valid
    list`, `server 'fs': unknown field 'arg' (did you mean 'args'?)`, `server 'fs': command
    is required`."""
    loc = list(error["loc"])
    where: list[str] = []
    if len(loc) >= 2 and loc[0] in ("servers", "tools"):
        where.append(f"{'server' if loc[0] == 'servers' else 'tool'} {loc[1]!r}")
        loc = loc[2:]
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if error["type"] == "extra_forbidden" and error["loc"]:
        return ": ".join([*where, _unknown_field(error["loc"])])
    if error["type"] == "missing" and field:
        return ": ".join([*where, f"{field} is required"])
    if field:
        where.append(field)
    return ": ".join([*where, str(error["msg"]).removeprefix("Value error, ")])


def _unknown_field(loc: Sequence[Any]) -> str:
    """`unknown field 'arg' (did you mean 'args'?)`, as agent.people words it: the nearest
    field of the entry (a server, a tool mapping, or the file, with its standard key)."""
    if len(loc) == 1:
        known = ["mcpServers", *McpConfig.model_fields]
    else:
        model = McpServerConfig if loc[0] == "servers" else McpToolMapping
        known = list(model.model_fields)
    name = str(loc[-1])
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def no_such_tool(
    server: str, tool: str, offered: Sequence[str], name: str | None = None, used_by: str = ""
) -> str:
    """Why a tool cannot be called, as `runbooks validate` and a live call both say it:
    `MCP server 'fs' offers no tool 'cat', used by read-motd/read; it offers: ...`. `name` is
    the runbook's name for it (said when a `tools` mapping gave another one)."""
    mapped = "" if name in (None, f"{server}.{tool}") else f" (mapped from {name!r})"
    used = f", used by {used_by}" if used_by else ""
    listing = _listing(offered)
    return f"MCP server {server!r} offers no tool {tool!r}{mapped}{used}; it offers: {listing}"


def _listing(names: Sequence[str]) -> str:
    shown = sorted(names)
    if not shown:
        return "none"
    more = f", … ({len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
    return ", ".join(shown[:_SHOWN]) + more


@record
class McpResult:
    """What a tool call returned: whether the server flagged an error, its text and data, as
    kept under the output cap: `text_bytes` is the whole text's size, `data_bytes` the
    structured data's (JSON) size when it was dropped for being over the cap."""

    is_error: bool
    text: str
    data: Any
    text_bytes: int = 0
    truncated: bool = False
    data_bytes: int | None = None


def capped_result(is_error: bool, text: str, data: Any, cap: int) -> McpResult:
    """A result kept within `cap` bytes per part, as shell output is: the text's first `cap`
    bytes (whole characters) and a marker saying how much was cut; structured data whose JSON
    is over `cap` is dropped (half a JSON value is no value) and only its size kept."""
    encoded = text.encode("utf-8")
    truncated = len(encoded) > cap
    if truncated:
        kept = encoded[:cap].decode("utf-8", errors="ignore")
        cut = len(encoded) - len(kept.encode("utf-8"))
        text = f"{kept}\n[… truncated: {cut} more bytes of {len(encoded)} (output_cap {cap})]"
    data_bytes = None
    if data is not None:
        size = len(json.dumps(data, ensure_ascii=False, default=str).encode("utf-8"))
        if size > cap:
            data, data_bytes, truncated = None, size, True
    return McpResult(is_error, text, data, len(encoded), truncated, data_bytes)


# -- one server ---------------------------------------------------------------------------------


class _StderrTail(asyncio.Protocol):
    """The read end of a server's stderr pipe: keeps its last STDERR_KEPT bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.data = bytearray()
        self.closed: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        del self.data[:-STDERR_KEPT]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def last_words(self) -> str:
        """The end of stderr on one line: its last non-blank lines, at most _STDERR_SHOWN."""
        lines = [line.strip() for line in self.data.decode("utf-8", "replace").splitlines()]
        text = " | ".join(line for line in lines if line)
        return text if len(text) <= _STDERR_SHOWN else "…" + text[-_STDERR_SHOWN:]


# The SDK does not hand out the process it spawns; its exit status is what tells "exited at
# start" apart. A wrapper around its spawn function records the process for the task that
# asked (a context variable: servers start concurrently). Without the hook (another SDK
# version), the status is just not reported.
_spawned: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "loom_ops_mcp_spawned", default=None
)


def _record_spawns() -> None:
    from mcp.client import stdio

    original = getattr(stdio, "_create_platform_compatible_process", None)
    if original is None or getattr(original, "loom_ops_records", False):
        return

    async def spawn(*args: Any, **kwargs: Any) -> Any:
        process = await original(*args, **kwargs)
        box = _spawned.get()
        if box is not None:
            box.append(process)
        return process

    spawn.loom_ops_records = True  # type: ignore[attr-defined]
    stdio._create_platform_compatible_process = spawn


class _Server:
    """One running server: a task holds its stdio transport and session open until closed.

    Invariant: `_ready` only ever holds a result (the session, or the McpError saying why it
    did not start), never an exception, so nothing is left unretrieved when nobody waits."""

    def __init__(self, name: str, config: McpServerConfig) -> None:
        self.name = name
        self.config = config
        self.session: Any = None
        self.tools: list[str] | None = None  # what `tools/list` answered this session
        self.exit_status: int | None = None
        self._stderr: _StderrTail | None = None
        self._ready: asyncio.Future[Any] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> Any:
        """The server's initialized session; McpError when it exits, fails or takes longer
        than `timeout` to start (the message names it, its exit status and stderr's end)."""
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._hold(), name=f"mcp:{self.name}")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(self._ready), timeout=timeout)
        except TimeoutError:
            await self.close()
            raise McpError(
                f"MCP server {self.name!r} did not start within {timeout:g} s{self._said()}"
            ) from None
        if isinstance(outcome, McpError):
            await self.close()
            raise outcome
        return outcome

    async def _hold(self) -> None:
        # Imported here: the SDK is only needed by workspaces that configure MCP servers.
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        assert self._ready is not None
        _record_spawns()
        spawned: list[Any] = []
        _spawned.set(spawned)  # this task's own context
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        tail = _StderrTail(loop)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: tail, os.fdopen(read_fd, "rb", buffering=0)
            )
        except BaseException:
            os.close(write_fd)
            raise
        self._stderr = tail
        params = StdioServerParameters(
            command=self.config.command,
            args=self.config.args,
            env=self.config.environment(),
            cwd=self.config.cwd,
        )
        failure: BaseException | None = None
        try:
            # The server's stderr goes to a pipe whose end we keep (bounded), not to ours.
            with os.fdopen(write_fd, "w") as errlog:
                async with (
                    stdio_client(params, errlog=errlog) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    self.session = session
                    self._ready.set_result(session)
                    await self._stop.wait()
        except BaseException as exc:
            failure = exc
        finally:
            self.session = None
            # Our end of the pipe is closed: EOF comes once the server (and any child of its)
            # let go of stderr; bounded, as a child may keep it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tail.closed), _STDERR_EOF_WAIT)
            transport.close()
            if spawned:
                self.exit_status = spawned[0].returncode
        if not self._ready.done():
            self._ready.set_result(self._start_failure(failure))
        if isinstance(failure, asyncio.CancelledError):
            raise failure

    def _start_failure(self, failure: BaseException | None) -> McpError:
        """Why the server did not start, in one line."""
        name, command = self.name, self.config.command
        leaf = _leaf(failure) if failure is not None else None
        if isinstance(leaf, OSError) and self.exit_status is None:
            reason = leaf.strerror or str(leaf)
            return McpError(f"MCP server {name!r} could not run {command!r}: {reason}")
        if self.exit_status is not None:
            return McpError(f"MCP server {name!r} {self._exit()} at start{self._said()}")
        detail = f"{type(leaf).__name__}: {leaf}" if leaf is not None else "it stopped"
        return McpError(f"MCP server {name!r} failed to start: {detail}{self._said()}")

    def _exit(self) -> str:
        status = self.exit_status
        if status is not None and status < 0:
            return f"was killed by signal {-status}"
        return f"exited with status {status}"

    def _said(self) -> str:
        words = self._stderr.last_words() if self._stderr is not None else ""
        return f"; stderr: {words}" if words else "; its stderr was empty"

    def death(self) -> str:
        """After close: how the server ended, when it ended by itself ("" otherwise)."""
        if self.exit_status is None or self.exit_status < 0:
            return ""
        return f"; server {self.name!r} {self._exit()}{self._said()}"

    @property
    def alive(self) -> bool:
        """Whether the session is up and its task still holds it."""
        return self._task is not None and not self._task.done() and self.session is not None

    async def close(self) -> None:
        """Stop the server: politely when it runs, by cancelling its start otherwise."""
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


def _leaf(error: BaseException) -> BaseException:
    """The first real error inside task-group wrappers (the SDK's transport runs in one)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


# -- the process's servers ----------------------------------------------------------------------


class McpHub:
    """The process's MCP servers: each started on first use, restarted after a crash."""

    def __init__(self, config: McpConfig) -> None:
        self.config = config
        self._servers: dict[str, _Server] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # per server: one slow start blocks no other

    async def call(
        self, tool: str, arguments: dict[str, Any], timeout: float, output_cap: int = 64 * 1024
    ) -> McpResult:
        """Call a tool (mapped, or `<server>.<tool>`); any failure (unknown, crash, hang)
        raises McpError. The result is capped at `output_cap` bytes (see capped_result)."""
        mapping = self.config.resolve(tool)
        if mapping is None:
            known = ", ".join(sorted(self.config.tools)) or "none"
            servers = ", ".join(sorted(self.config.servers)) or "none"
            raise McpError(
                f"unknown MCP tool {tool!r} (mapped: {known}; or name it <server>.<tool>, "
                f"servers: {servers})"
            )
        # Starting a server counts against the call's own timeout, not only the server's.
        startup = min(self.config.servers[mapping.server].startup_timeout, timeout)
        session = await self._session(mapping.server, startup)
        try:
            result = await asyncio.wait_for(
                session.call_tool(mapping.tool, arguments, read_timeout_seconds=timeout),
                timeout=timeout + 1,
            )
        except Exception as exc:  # timed out, or the transport broke (the server crashed)
            if _is_invalid_params(exc):  # answered, so alive: an unknown tool, or bad arguments
                await self._unknown_tool(tool, mapping, timeout)
                raise McpError(f"MCP tool {tool!r} failed: {type(exc).__name__}: {exc}") from None
            death = await self._drop(mapping.server)  # restarted on the next call
            if isinstance(exc, TimeoutError) or _is_timeout(exc):
                raise McpError(f"MCP tool {tool!r} did not answer within {timeout:g} s") from None
            leaf = _leaf(exc)
            raise McpError(
                f"MCP tool {tool!r} failed: {type(leaf).__name__}: {leaf}{death}"
            ) from None
        if result.is_error:  # some servers answer an unknown tool so ("Unknown tool: cat")
            await self._unknown_tool(tool, mapping, timeout)
        text = "\n".join(getattr(part, "text", "") for part in result.content).strip()
        return capped_result(bool(result.is_error), text, result.structured_content, output_cap)

    async def _unknown_tool(self, name: str, mapping: McpToolMapping, timeout: float) -> None:
        """After a failed call: McpError in `runbooks validate`'s words when the server does
        not offer the tool (its `tools/list`, asked once per server session); nothing when it
        does, or cannot say (the call's own error stands then: no server is started to ask)."""
        server = self._servers.get(mapping.server)
        if server is None or not server.alive:
            return
        offered = server.tools
        if offered is None:
            try:
                offered = await self.list_tools(mapping.server, min(timeout, LIST_TIMEOUT))
            except McpError:
                return
        if mapping.tool not in offered:
            raise McpError(no_such_tool(mapping.server, mapping.tool, offered, name))

    async def list_tools(self, server: str, timeout: float = LIST_TIMEOUT) -> list[str]:
        """The names of the tools `server` offers (`tools/list`, every page), starting it
        first (within its startup_timeout); McpError when it cannot start or answer."""
        session = await self._session(server, self.config.servers[server].startup_timeout)
        names: list[str] = []
        cursor: str | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    params = _page(cursor)
                    listing = await session.list_tools(params=params)
                    names += [tool.name for tool in listing.tools]
                    cursor = listing.next_cursor
                    if not cursor:
                        break
        except Exception as exc:
            death = await self._drop(server)
            if isinstance(exc, TimeoutError):
                raise McpError(
                    f"MCP server {server!r} did not list its tools within {timeout:g} s"
                ) from None
            leaf = _leaf(exc)
            raise McpError(
                f"MCP server {server!r} failed to list its tools: {type(leaf).__name__}: "
                f"{leaf}{death}"
            ) from None
        running = self._servers.get(server)
        if running is not None and running.session is session:
            running.tools = names  # for the words of a call of a tool it does not offer
        return names

    async def _session(self, name: str, startup_timeout: float) -> Any:
        async with self._locks.setdefault(name, asyncio.Lock()):
            server = self._servers.get(name)
            if server is not None and server.alive:
                return server.session
            if server is not None:
                await server.close()
            server = _Server(name, self.config.servers[name])
            self._servers[name] = server
            return await server.start(startup_timeout)

    async def _drop(self, name: str) -> str:
        """Stop a server after a failure; how it ended, for the error ("" when we stopped it)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            server = self._servers.pop(name, None)
        if server is None:
            return ""
        await server.close()
        return server.death()

    async def close(self) -> None:
        """Stop every server this process started."""
        servers, self._servers = list(self._servers.values()), {}
        await asyncio.gather(*(server.close() for server in servers))


def _page(cursor: str | None) -> Any:
    from mcp_types import PaginatedRequestParams

    return PaginatedRequestParams(cursor=cursor) if cursor else None


def _is_invalid_params(exc: BaseException) -> bool:
    """Whether the server answered with the JSON-RPC error -32602 (invalid params): the MCP
    spec's answer to a call of a tool it does not offer, or of arguments it refuses."""
    from mcp.shared.exceptions import MCPError
    from mcp_types import INVALID_PARAMS

    return isinstance(exc, MCPError) and exc.error.code == INVALID_PARAMS


def _is_timeout(exc: BaseException) -> bool:
    """The SDK reports its own read timeout as an error with the JSON-RPC timeout code."""
    from mcp.shared.exceptions import MCPError
    from mcp_types import REQUEST_TIMEOUT

    return isinstance(exc, MCPError) and exc.error.code == REQUEST_TIMEOUT


async def offered_tools(
    config: McpConfig, servers: Iterable[str]
) -> dict[str, list[str] | McpError]:
    """Each named server's tools, or the McpError saying why it could not start or list
    them: the servers start at once and stop after, each bounded by its startup_timeout plus
    LIST_TIMEOUT."""
    hub = McpHub(config)
    names = sorted(set(servers))

    async def one(name: str) -> list[str] | McpError:
        try:
            return await hub.list_tools(name)
        except McpError as exc:
            return exc

    try:
        found = await asyncio.gather(*(one(name) for name in names))
    finally:
        await hub.close()
    return dict(zip(names, found, strict=True))
