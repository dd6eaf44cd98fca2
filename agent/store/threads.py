"""EngineThreads: the threads a database engine runs its blocking work on.

Invariant: every function handed to `run` is run at most once, by one of the threads, and its
result or exception settles the caller's future on the caller's event loop; a function whose
caller gave up before it started is never run. With one thread, functions run one after
another in the order they were handed over. A function goes to the thread that went idle
last: a store used by one run at a time keeps one thread, its caches and its pooled
connection warm, where a shared queue would wake the thread idle longest, each in turn. A
thread pool's future chain (`run_in_executor`) costs a hop about half as much again: a
concurrent future, its asyncio wrapper and their callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class EngineThreads:
    """`count` threads running the functions handed to `run`, each answered on its caller's
    event loop."""

    def __init__(self, count: int, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        # Each idle thread's inbox, the last to go idle on top; jobs no thread was free for.
        self._idle: list[queue.SimpleQueue[_Job | None]] = []
        self._waiting: deque[_Job] = deque()
        self._stopped = False
        for n in range(count):
            # Daemons: a store left open must not keep the interpreter from exiting.
            label = name if count == 1 else f"{name}-{n}"
            threading.Thread(target=self._serve, name=label, daemon=True).start()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Hand `fn` to a thread; the future is answered on this event loop (at once, with
        RuntimeError, once the threads are stopped)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = (loop, future, fn)
        with self._lock:
            if self._stopped:  # no thread would ever answer it
                future.set_exception(RuntimeError(f"the {self._name} threads are stopped"))
            elif self._idle:
                self._idle.pop().put(job)
            else:
                self._waiting.append(job)
        return future

    def stop(self) -> None:
        """End the threads after the functions handed over so far."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)

    def _serve(self) -> None:
        inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        job = self._next(inbox)
        while job is not None or (job := inbox.get()) is not None:
            loop, future, fn = job
            if future.cancelled():  # its caller gave up before it started: never run it
                job = self._next(inbox)
                continue
            try:
                outcome: tuple[Any, BaseException | None] = (fn(), None)
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (None, exc)
            # Idle again before the caller hears: its next function comes back here.
            job = self._next(inbox)
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_settle, future, *outcome)

    def _next(self, inbox: queue.SimpleQueue[_Job | None]) -> _Job | None:
        """A function that waited for a thread, or None having put `inbox` on the idle stack
        (None as well once stopped: `inbox` then gets the None that ends the thread)."""
        with self._lock:
            if self._waiting:
                return self._waiting.popleft()
            if self._stopped:
                inbox.put(None)
            else:
                self._idle.append(inbox)
            return None


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: its function ran all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
