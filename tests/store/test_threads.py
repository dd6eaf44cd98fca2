"""EngineThreads: the threads an engine runs its blocking work on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agent.store.threads import EngineThreads


def _threads_named(name: str) -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith(name)}


async def test_one_callers_functions_keep_to_the_thread_that_went_idle_last() -> None:
    """Functions handed over one after another all run on one thread of four (the one that
    went idle last), not on each in turn."""
    threads = EngineThreads(4, "test-warm")
    try:
        ran_on = {await threads.run(threading.get_ident) for _ in range(20)}
    finally:
        threads.stop()
    assert len(ran_on) == 1


async def test_functions_wait_for_a_free_thread_and_one_thread_runs_them_in_order() -> None:
    """Handed over faster than they run, functions wait their turn; with one thread they run
    in the order they were handed over; with two, both threads take part."""
    one = EngineThreads(1, "test-order")
    seen: list[int] = []
    try:
        await asyncio.gather(*(one.run(lambda n=n: seen.append(n)) for n in range(200)))
    finally:
        one.stop()
    assert seen == list(range(200))

    two = EngineThreads(2, "test-both")
    try:
        ran_on = await asyncio.gather(
            *(two.run(lambda: (time.sleep(0.02), threading.get_ident())[1]) for _ in range(6))
        )
    finally:
        two.stop()
    assert len(set(ran_on)) == 2


async def test_a_function_whose_caller_gave_up_before_it_started_never_runs() -> None:
    """A caller cancelled while its function waits for a thread: the function is skipped and
    the thread goes on with the next one."""
    threads = EngineThreads(1, "test-cancel")
    started, go = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        busy = threads.run(lambda: (started.set(), go.wait(5), ran.append("busy")))
        skipped = threads.run(lambda: ran.append("skipped"))
        after = threads.run(lambda: ran.append("after"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        skipped.cancel()
        go.set()
        await busy
        await after
    finally:
        threads.stop()
    assert ran == ["busy", "after"]


async def test_stop_ends_the_threads_after_the_functions_handed_over() -> None:
    """`stop` while functions still wait: every one of them runs, then every thread ends; a
    function handed over after `stop` is refused at once instead of waiting forever."""
    threads = EngineThreads(2, "test-stop")
    mine = _threads_named("test-stop")
    assert len(mine) == 2
    pending = [threads.run(lambda n=n: (time.sleep(0.01), n)[1]) for n in range(5)]
    threads.stop()
    with pytest.raises(RuntimeError, match="the test-stop threads are stopped"):
        await threads.run(lambda: "too late")
    assert await asyncio.gather(*pending) == list(range(5))
    for thread in mine:
        thread.join(5)
    assert not any(thread.is_alive() for thread in mine)
