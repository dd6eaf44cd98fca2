"""Store transactions side by side on PostgreSQL (REPEATABLE READ, no global lock at BEGIN):
the outcome of two processes' transactions that overlap is one that some order of them gives.

Each test opens two stores on one fresh PostgreSQL schema (two processes), stops a transaction
of the first one at a chosen point of its body (its snapshot already taken), runs the other
process's transactions to commit, then lets the first one go on: the exact interleaving that
concurrent workers, bots, the API and the CLI produce by chance, made deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agent.errors import LeaseLost, StoreError
from agent.records import Checkpoint, Origin, RunLimits, RunStatus
from agent.store import NewRun, NewToolCall, RunStore
from agent.store.postgres import _Statements
from bot.store import ChatStore
from tests.conftest import postgres_schema

LIMITS = RunLimits(max_steps=5, max_tool_calls=5, deadline_seconds=600)
TTL = 60.0


def _nobody_dead(_owner: str) -> bool:
    return False


class _Stopping(_Statements):
    """The store's statements, calling `before(sql)` ahead of each one and then handing it to
    the transaction's own `_Statements`, which sends them and commits."""

    __slots__ = ("before", "inner")

    def __init__(self, conn: _Statements, before: Callable[[str, _Statements], None]) -> None:
        # No `super().__init__`: everything but the hook is the inner object's.
        self.inner = conn
        self.notices = conn.notices  # the inner object sends them with its COMMIT
        self.failures = conn.failures  # and raises what a failed check of its asks for
        self.before = before

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.before(sql, self.inner)
        return self.inner.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> Any:
        self.before(sql, self.inner)
        return self.inner.executemany(sql, rows)


class Hold:
    """Stops the next transaction of `store` once, at a statement starting with `at` (or, with
    `at=None`, at the end of its body, just before COMMIT), until `release`. Every statement
    before that point is sent first (the store holds them until it needs an answer), so the
    held transaction has its snapshot and its locks, as it would if the process paused there
    between two batches."""

    def __init__(self, store: RunStore) -> None:
        self._at: str | None = None
        self._armed = False
        self._reached = threading.Event()
        self._go = threading.Event()
        original = store.db.transaction

        async def transaction(
            fn: Callable[[Any], Any], durable: bool = False, brief: bool = False
        ) -> Any:
            def body(conn: _Statements) -> Any:
                result = fn(_Stopping(conn, self._before))
                if self._at is None:
                    self._stop(conn)
                return result

            return await original(body, durable=durable, brief=brief)

        store.db.transaction = transaction  # type: ignore[method-assign]

    def arm(self, at: str | None) -> None:
        self._at, self._armed = at, True

    def _before(self, sql: str, conn: _Statements) -> None:
        if self._at is not None and sql.startswith(self._at):
            self._stop(conn)

    def _stop(self, conn: _Statements) -> None:
        if self._armed:
            conn.send()
            self._armed = False
            self._reached.set()
            assert self._go.wait(10), "never released"

    async def reached(self) -> None:
        ok = await asyncio.get_running_loop().run_in_executor(None, self._reached.wait, 10)
        assert ok, "the held transaction never got there"

    def release(self) -> None:
        self._go.set()

    async def beside(self, coro: Any) -> Any:
        """Run the other process's `coro` while this transaction is held. When the store makes
        it wait for the held transaction (a row lock), the held one is released after a
        second, so the test goes on instead of hanging."""
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if task not in done:
            self.release()
        return await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def two() -> AsyncIterator[tuple[RunStore, RunStore]]:
    """Two stores (two processes) on one fresh schema."""
    with postgres_schema() as url:
        first = await RunStore.open(url)
        second = await RunStore.open(url)
        try:
            yield first, second
        finally:
            await first.close()
            await second.close()


def _run(run_id: str, origin: Origin | None = None) -> NewRun:
    return NewRun(run_id, "supervisor", "check the disk", "cli:tester", origin or Origin(), LIMITS)


async def test_create_run_with_a_taken_id_from_two_processes_is_run_exists(
    two: tuple[RunStore, RunStore],
) -> None:
    """Both processes check that the id is free, then insert it: one gets the run, the other
    RunExists (HTTP 409; the bot tries another id), never a raw database error."""
    first, second = two
    hold = Hold(first)
    hold.arm(at="INSERT INTO runs")
    late = asyncio.create_task(first.create_run(_run("same-id")))
    await hold.reached()  # `SELECT 1 FROM runs WHERE id = ?` found nothing
    (other,) = await hold.beside(second.create_run(_run("same-id")))
    hold.release()
    (mine,) = await asyncio.gather(late, return_exceptions=True)
    # One of them created it; the other is told RunExists (HTTP 409, the bot tries another id).
    outcomes = sorted(type(result).__name__ for result in (mine, other))
    assert outcomes == ["RunExists", "RunRecord"], (mine, other)


async def test_a_stale_owner_beginning_a_call_the_new_owner_began_loses_its_lease(
    two: tuple[RunStore, RunStore],
) -> None:
    """A stale owner and the new owner begin the same call: exactly one intent is written, and
    the stale one is told it lost the run (or the new one finds the call in doubt)."""
    first, second = two
    await first.create_run(_run("r"))
    stale = await first.claim_run("r", "w1", TTL, _nobody_dead)
    call = NewToolCall("r:1:0", 1, 0, "ops.shell", {"argv": ["df", "-h"]}, None)
    hold = Hold(first)
    hold.arm(at="WITH changed AS (INSERT INTO tool_calls")
    stale_call = asyncio.create_task(stale.begin_call(call, Checkpoint(turn=1)))
    await hold.reached()  # w1's snapshot: it still owns the run, and no intent exists

    async def take_over() -> int:
        # w1 is found dead (or its lease ran out): w2 takes the run over, replays the call.
        drive = await second.claim_run("r", "w2", TTL, lambda owner: owner == "w1")
        return (await drive.begin_call(call, Checkpoint(turn=1))).attempt

    (new_owner,) = await hold.beside(take_over())
    hold.release()
    (old_owner,) = await asyncio.gather(stale_call, return_exceptions=True)
    if new_owner == 1:  # w2 began the call: w1 must be told it lost the run, nothing else
        assert isinstance(old_owner, LeaseLost), repr(old_owner)
    else:  # w1 began it first: w2's takeover finds the call in doubt and refuses it
        assert getattr(old_owner, "attempt", None) == 1, old_owner
        assert isinstance(new_owner, StoreError), new_owner


async def test_a_run_ending_while_its_progress_entry_is_claimed_queues_a_new_one(
    two: tuple[RunStore, RunStore],
) -> None:
    """The bot claims the run's waiting progress entry while the run's end commits: the chat
    must still see the end, in the message being rendered or in a new entry."""
    worker, bot = two
    await worker.create_run(_run("r", Origin(kind="telegram", chat_id=42)))  # queues progress
    drive = await worker.claim_run("r", "w1", TTL, _nobody_dead)
    hold = Hold(worker)
    hold.arm(at=None)
    ending = asyncio.create_task(
        drive.finish(RunStatus.SUCCEEDED, Checkpoint(), "disk is fine", None)
    )
    await hold.reached()  # its snapshot saw the progress entry waiting: it queued none
    # The bot's OutboxSender._progress: claim, render from the store, send, mark delivered.
    progress = [
        m.id for m in await ChatStore(bot.db).undelivered_messages() if m.kind == "progress"
    ]
    assert len(progress) == 1
    (claimed,) = await hold.beside(ChatStore(bot.db).claim_messages(progress))
    assert claimed is None
    shown = await bot.get_run("r")  # here: rendered before the end was committed
    await ChatStore(bot.db).mark_all_delivered(progress, 1001)
    hold.release()
    await ending
    assert (await worker.get_run("r")).status == RunStatus.SUCCEEDED
    queued = [m for m in await ChatStore(bot.db).undelivered_messages() if m.kind == "progress"]
    # The chat must see the end: in the message just rendered, or in one still to send.
    assert shown.status == RunStatus.SUCCEEDED or queued, (
        f"progress was rendered with the run {shown.status} and nothing is left to show its end"
    )
