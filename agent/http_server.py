"""HttpServer: an ASGI app served by uvicorn inside this process's event loop, for the
duration of an `async with` block (the HTTP API, the Bot API stand-in, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from types import TracebackType

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Seconds a client has to send a request's headers and body (from its first byte, or from
# connecting). uvicorn bounds none of it: a client that stops mid-headers, or sends less body
# than its Content-Length, holds the connection (and the handler awaiting the body) forever,
# before any authentication.
READ_TIMEOUT = 30.0


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the host process owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _ReadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request: a client too slow to
    send its headers and body is disconnected (its handler sees the disconnect)."""

    read_timeout = READ_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None
    _reading = False  # a request's first byte came and the request is not whole yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing at all is cut off too

    def data_received(self, data: bytes) -> None:
        if not self._reading:  # a request's first bytes: its deadline starts now, once
            self._reading = True
            self._arm()
        super().data_received(data)
        self._check_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may go on with a request pipelined behind it
        self._check_read()

    def _check_read(self) -> None:
        """Keep the deadline while a request is arriving (headers in part: IDLE with bytes
        read or buffered; its body: SEND_BODY); drop it once the request is whole (DONE) or
        the connection ends. Between requests, uvicorn's keep-alive timeout rules."""
        state = self.conn.their_state
        arriving = state is h11.SEND_BODY or (
            state is h11.IDLE and (self._reading or bool(self.conn.trailing_data[0]))
        )
        if arriving and not self._reading:
            self._reading = True
            self._arm()
        elif not arriving and state is not h11.IDLE:
            self._reading = False
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.warning(
                "closed a connection from %s: no whole request within %g s",
                self.client, self.read_timeout,
            )  # fmt: skip
            self.transport.close()


class HttpServer:
    """Serve `app` on host:port (0: a free port) until the block ends; a client has
    `read_timeout` seconds to send each request whole."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        before_stop: Callable[[], None] | None = None,
        graceful_seconds: float = 2,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._before_stop = before_stop  # e.g. release long polls so shutdown is quick
        self._graceful = graceful_seconds
        # The protocol class carries the timeout: uvicorn builds one per connection.
        self._protocol = type(
            "ReadDeadlineH11", (_ReadDeadlineH11,), {"read_timeout": read_timeout}
        )
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The server's root URL, e.g. `http://127.0.0.1:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def start(self) -> None:
        """Bind and start serving (what `async with` does); OSError when the port is taken."""
        # Binding here (not inside uvicorn) turns "port in use" into an OSError for the caller
        # rather than uvicorn's sys.exit inside a background task. The protocol is named so
        # that asyncio sets TCP_NODELAY on accepted connections (it checks proto ==
        # IPPROTO_TCP); without it every keep-alive request waits ~40 ms for a delayed ACK.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # leave the host process's logging configuration alone
            timeout_graceful_shutdown=self._graceful,  # a stuck request must not hold shutdown
            http=self._protocol,
        )
        self._server = _EmbeddedUvicorn(config)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        try:
            # uvicorn offers a `started` flag, not an awaitable, so poll it briefly.
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("the HTTP server stopped during startup")
                await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (within the grace period), return."""
        if self._server is None or self._task is None:
            return
        if self._before_stop is not None:
            self._before_stop()
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = self._task = None
