"""EngineThreads: the threads a database engine runs its blocking work on.

Invariant: every function handed to `run` is run at most once, by one of the threads, and its
result or exception settles the caller's future on the caller's event loop; a function whose
caller gave up before it started is never run. One thread runs the functions in the order
they were handed over. A thread pool's future chain (`run_in_executor`) costs a hop about
half as much again: a concurrent future, its asyncio wrapper and their callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class EngineThreads:
    """`count` threads taking functions from one queue and answering each on its caller's
    event loop."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        for n in range(count):
            # Daemons: a store left open must not keep the interpreter from exiting.
            label = name if count == 1 else f"{name}-{n}"
            threading.Thread(target=self._serve, name=label, daemon=True).start()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn`; the future is answered on this event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn))
        return future

    def stop(self) -> None:
        """End the threads after the functions queued so far."""
        for _ in range(self._count):
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn = job
            if future.cancelled():  # its caller gave up before it started: never run it
                continue
            try:
                outcome: tuple[Any, BaseException | None] = (fn(), None)
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: its function ran all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
