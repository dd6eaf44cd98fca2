"""HttpServer against clients that send too slowly or lie: every request must arrive whole
within the read timeout, or its connection is closed (and a handler awaiting its body ends)."""

from __future__ import annotations

import asyncio
import socket
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agent.http_server import HttpServer

TIMEOUT = 0.5


def _app(ended: list[str]) -> Starlette:
    async def echo(request: Request) -> PlainTextResponse:
        try:
            body = await request.body()
        finally:
            ended.append(request.method)  # the handler ended, one way or the other
        return PlainTextResponse(f"{len(body)} bytes")

    return Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])


async def _closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock` (reads until EOF); fails after `limit`."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock.setblocking(False)
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), limit)
        except TimeoutError:
            raise AssertionError(f"still open after {limit} s") from None
        if not data:
            return time.monotonic() - started


async def test_a_client_that_stops_mid_headers_is_disconnected() -> None:
    async with HttpServer(_app([]), read_timeout=TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert await _closed_within(sock, 5) >= TIMEOUT * 0.8


async def test_a_client_that_connects_and_sends_nothing_is_disconnected() -> None:
    async with HttpServer(_app([]), read_timeout=TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            assert await _closed_within(sock, 5) >= TIMEOUT * 0.8


async def test_a_lying_content_length_ends_the_connection_and_the_handler() -> None:
    """100 bytes announced, 10 sent: the handler waiting for the rest sees the disconnect."""
    ended: list[str] = []
    async with HttpServer(_app(ended), read_timeout=TIMEOUT) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123456789"
            )
            await _closed_within(sock, 5)
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.02)
        assert ended == ["POST"]


async def test_requests_sent_slowly_but_in_time_are_served_on_one_connection() -> None:
    """Each request's deadline starts with its own first byte: a kept-alive connection
    serves one request after another, each sent in pieces within the timeout."""
    async with HttpServer(_app([]), read_timeout=TIMEOUT) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for _ in range(3):
                await asyncio.sleep(TIMEOUT * 0.6)  # idle between requests: not counted
                for piece in (b"POST / HTTP/1.1\r\nHost: x\r\n", b"Content-Length: 4\r\n\r\n"):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(TIMEOUT * 0.3)
                writer.write(b"abcd")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                assert await reader.readexactly(length) == b"4 bytes"
        finally:
            writer.close()
