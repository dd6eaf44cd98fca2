"""HttpServer: an ASGI app served by uvicorn inside this process's event loop, for the
duration of an `async with` block (the HTTP API, the Bot API stand-in, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the host process owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serve `app` on host:port (0: a free port) until the block ends."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        before_stop: Callable[[], None] | None = None,
        graceful_seconds: float = 2,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._before_stop = before_stop  # e.g. release long polls so shutdown is quick
        self._graceful = graceful_seconds
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
