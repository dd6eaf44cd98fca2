"""The SQLite engine under stress: its one connection shared by the event loop's thread and
its own thread, against other processes, kills, cancellations, closes and a second loop.

Everything is real: real files, real processes (children run the engine, or hold SQLite locks
with plain sqlite3), SIGKILL, and strace where a test must see which thread syncs the disk.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.errors import StoreError
from agent.store import RunStore
from agent.store.sqlite import CHECKPOINT_EVERY
from tests.conftest import REPO
from tests.support import raw_rows

# A child process that runs the engine: `python -c ENGINE_CHILD db mode n [tag]`.
#   count:  n one-page commits, printing the event loop's thread id first;
#   big:    n commits rewriting a row of about eight pages;
#   ack:    commits forever (every tenth durable), printing each commit's counter value once
#           it returned; each commit also inserts a row named after that value;
#   mixed:  n commits from four concurrent tasks (every seventh durable), each inserting a row
#           named `tag-i` and bumping the counter, then prints "done".
ENGINE_CHILD = """
import asyncio, itertools, sys, threading
from agent.store import RunStore

INSERT = (
    "INSERT INTO processes (owner, kind, drives_runs, started_at, heartbeat_at) "
    "VALUES (?, ?, 0, 0, 0)"
)

async def main(path, mode, n, tag):
    store = await RunStore.open(path)
    db = store.db
    if mode == "count":
        print(threading.get_native_id(), flush=True)
        for _ in range(n):
            await db.transaction(
                lambda c: c.execute("UPDATE run_counter SET last_run_no = last_run_no + 1"),
                brief=True,
            )
    elif mode == "big":
        for i in range(n):
            await db.transaction(
                lambda c, i=i: c.execute(
                    INSERT + " ON CONFLICT (owner) DO UPDATE SET kind = excluded.kind",
                    (f"wal-{i % 4}", chr(65 + i % 26) * 30000),  # new text: every page written
                ),
                brief=True,
            )
    elif mode == "ack":
        def bump(c):
            value = c.execute(
                "UPDATE run_counter SET last_run_no = last_run_no + 1 RETURNING last_run_no"
            ).fetchone()[0]
            c.execute(INSERT, (f"ack-{value}", "ack"))
            return value
        for i in itertools.count():
            print(await db.transaction(bump, durable=i % 10 == 0, brief=True), flush=True)
    elif mode == "mixed":
        numbers = iter(range(n))
        async def worker():
            for i in numbers:
                def bump(c, i=i):
                    c.execute(INSERT, (f"{tag}-{i}", "mixed"))
                    c.execute("UPDATE run_counter SET last_run_no = last_run_no + 1")
                await db.transaction(bump, durable=i % 7 == 0, brief=True)
        await asyncio.gather(*(worker() for _ in range(4)))
        print("done", flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), (sys.argv[4:] or [""])[0]))
"""

# Holds SQLite's write lock (`BEGIN IMMEDIATE`) or a read snapshot (`BEGIN` and a read) on the
# file until a line arrives on stdin: `python -c HOLD db write|read`.
HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "write":
    conn.execute("BEGIN IMMEDIATE")
else:
    conn.execute("BEGIN")
    conn.execute("SELECT COUNT(*) FROM runs").fetchone()
print("holding", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def _child_env() -> dict[str, str]:
    """A child's environment: this checkout importable."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _engine(db: str, mode: str, n: int, tag: str = "") -> list[str]:
    """The command line of an engine child."""
    return [sys.executable, "-c", ENGINE_CHILD, db, mode, str(n), tag]


def _wal_size(store: RunStore) -> int:
    """The size of the store's WAL file."""
    return Path(f"{store.label}-wal").stat().st_size


def _bump(c: Any) -> int:
    """A one-page commit: the run counter, one higher."""
    return int(c.execute("UPDATE run_counter SET last_run_no = last_run_no + 1").rowcount)


def _insert(owner: str) -> Callable[[Any], None]:
    """A transaction body inserting one `processes` row named `owner` (a second insert of the
    same name would fail on its key)."""

    def insert(c: Any) -> None:
        c.execute(
            "INSERT INTO processes (owner, kind, drives_runs, started_at, heartbeat_at) "
            "VALUES (?, 'test', 0, 0, 0)",
            (owner,),
        )

    return insert


async def _hold(db: str, what: str) -> asyncio.subprocess.Process:
    """A process holding the write lock (`write`) or a read snapshot (`read`) on the file
    until a line is written to its stdin."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD, db, what,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None
    assert await holder.stdout.readline() == b"holding\n"
    return holder


async def _release(holder: asyncio.subprocess.Process) -> None:
    """Let a holder commit and exit."""
    assert holder.stdin is not None
    if holder.returncode is None:
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
    assert await holder.wait() == 0


def _strace_works() -> bool:
    """Whether strace is installed and may trace a child here (ptrace is often denied)."""
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True)
    return done.returncode == 0


# -- what the disk, the WAL and close() see -----------------------------------------------------


@pytest.mark.skipif(not _strace_works(), reason="needs strace and ptrace")
def test_commits_on_the_event_loop_thread_never_sync_the_disk(tmp_path: Path) -> None:
    """A commit that runs on the event loop's thread syncs nothing (what must reach the disk,
    a durable commit or a checkpoint, waits on the engine's thread), so a slow disk never
    stalls the loop. The first commit after each checkpoint restarts the WAL, which writes and
    syncs its header: that one must not run on the loop either."""
    db = str(tmp_path / "store.sqlite")
    trace = tmp_path / "syncs.trace"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
         *_engine(db, "count", 3 * CHECKPOINT_EVERY)],
        env=_child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loop_thread = done.stdout.split()[0]
    syncs = trace.read_text().splitlines()
    assert any("sync(" in line for line in syncs), "strace saw no sync at all"
    on_the_loop = [line for line in syncs if line.split()[0] == loop_thread]
    assert on_the_loop == [], f"the event loop's thread synced the disk: {on_the_loop}"


async def test_the_wal_stays_bounded_when_only_short_lived_processes_write(
    tmp_path: Path,
) -> None:
    """While a long-lived process keeps the file open without writing (a bot at rest, a reader),
    short-lived processes (CLI commands) that each commit fewer than CHECKPOINT_EVERY times
    still keep the WAL about CHECKPOINT_EVERY commits long: the last one's close does not
    checkpoint (the file is still open), so someone must."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    try:
        writer = _engine(store.label, "big", CHECKPOINT_EVERY - 1)
        subprocess.run(writer, env=_child_env(), check=True, timeout=120)
        one_process = _wal_size(store)
        for _ in range(4):
            subprocess.run(writer, env=_child_env(), check=True, timeout=120)
        grown = _wal_size(store)
        assert grown <= 2.5 * one_process, (
            f"the WAL grew from {one_process} to {grown} bytes over five short-lived writers"
        )
    finally:
        await store.close()


async def test_closing_a_sqlite_store_twice_is_harmless(tmp_path: Path) -> None:
    """A second `close` does nothing (as on PostgreSQL, and as before the engine owned its
    thread): shutdown paths that close what they opened may meet an already closed store."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    await store.close()
    await store.close()


async def test_a_transaction_issued_on_a_closing_or_closed_store_fails_as_on_a_closed_database(
    tmp_path: Path,
) -> None:
    """A transaction that reaches the engine after `close` (queued behind it while another
    process held the lock, or issued later) fails as a closed database does, with
    sqlite3.ProgrammingError or a StoreError, not with an AttributeError on a None connection
    or the executor's "cannot schedule new futures"; the one in flight before `close` commits."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    db = store.label
    holder = await _hold(db, "write")
    try:
        # Refused the lock on the loop, it waits on the engine's thread for the holder.
        in_flight = asyncio.create_task(store.db.transaction(_insert("in-flight"), brief=True))
        await asyncio.sleep(0)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
        queued = asyncio.create_task(store.db.transaction(_insert("queued"), brief=True))
        await asyncio.sleep(0)
        await _release(holder)
        await in_flight
        await closing
        with pytest.raises((StoreError, sqlite3.ProgrammingError)):
            await queued
        with pytest.raises((StoreError, sqlite3.ProgrammingError)):
            await store.db.read(lambda c: c.execute("SELECT 1").fetchone())
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    assert raw_rows(db, "SELECT owner FROM processes ORDER BY owner") == [("in-flight",)]


async def test_a_close_cancelled_while_it_waits_still_closes_the_database(
    tmp_path: Path,
) -> None:
    """A shutdown that gives up on `close` (its task cancelled while a transaction ahead of it
    waits for another process's lock) still checkpoints and closes the connection and stops
    the engine's thread once that transaction is done: the WAL is gone, no thread is left."""
    others = set(threading.enumerate())
    store = await RunStore.open(tmp_path / "store.sqlite")
    db = store.label
    await store.db.transaction(_insert("before"), brief=True)
    threads = {t for t in set(threading.enumerate()) - others if t.name == "loom-ops-sqlite"}
    assert len(threads) == 1
    holder = await _hold(db, "write")
    try:
        in_flight = asyncio.create_task(store.db.transaction(_insert("in-flight"), brief=True))
        await asyncio.sleep(0)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.05)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await _release(holder)
        await in_flight
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    for _ in range(200):
        left = {t for t in threading.enumerate() if t.name == "loom-ops-sqlite"} & threads
        if not left and not Path(f"{db}-wal").exists():
            break
        await asyncio.sleep(0.01)
    assert not left, "the engine's thread is still running"
    assert not Path(f"{db}-wal").exists(), "the connection was not closed"
    assert raw_rows(db, "SELECT owner FROM processes ORDER BY owner") == [
        ("before",),
        ("in-flight",),
    ]


# -- other processes, kills, cancellation and a second event loop ----------------------------


async def test_concurrent_writers_in_two_processes_lose_and_duplicate_no_commit(
    tmp_path: Path,
) -> None:
    """Two processes, each with four concurrent tasks, commit into one file at once (some
    durable): every transaction that returned is there exactly once, and its two statements
    together (a refused lock sends a transaction from the loop to the engine's thread; it must
    not run there a second time after committing on the loop)."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    n = 3 * CHECKPOINT_EVERY
    try:
        children = [
            await asyncio.create_subprocess_exec(
                *_engine(store.label, "mixed", n, tag),
                env=_child_env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for tag in ("a", "b")
        ]
        for index in range(n):  # this process writes meanwhile too
            await store.db.transaction(_insert(f"parent-{index}"), brief=True)
        for child in children:
            out, err = await child.communicate()
            assert child.returncode == 0, err.decode()
            assert out == b"done\n"
        owners = raw_rows(store.label, "SELECT owner FROM processes")
        assert len(owners) == 3 * n
        assert {owner for (owner,) in owners} == {
            f"{tag}-{index}" for tag in ("a", "b", "parent") for index in range(n)
        }
        assert raw_rows(store.label, "SELECT last_run_no FROM run_counter") == [(2 * n,)]
    finally:
        await store.close()


@pytest.mark.parametrize("acknowledged", [1, 57, CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY + 33])
async def test_a_process_killed_mid_commit_leaves_every_acknowledged_commit_whole(
    tmp_path: Path, acknowledged: int
) -> None:
    """SIGKILL at any point of a stream of commits (durable or not, between the engine's
    checkpoints, with SQLite's own checkpoint off) leaves a sound file that holds every commit
    that returned, each whole, and at most the one in flight besides."""
    db = str(tmp_path / "store.sqlite")
    child = await asyncio.create_subprocess_exec(
        *_engine(db, "ack", 0), env=_child_env(), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    last = 0
    try:
        while last < acknowledged:
            last = int(await child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        # It went on committing while this read: every commit it printed counts as returned.
        for line in (await child.stdout.read()).split():
            last = int(line)
        await child.wait()
    store = await RunStore.open(db)  # recovers the WAL the killed process left
    try:
        checked = await store.db.read(lambda c: c.execute("PRAGMA integrity_check").fetchall())
        assert [tuple(row) for row in checked] == [("ok",)]
        counter = await store.db.read(
            lambda c: c.execute("SELECT last_run_no FROM run_counter").fetchone()[0]
        )
        rows = await store.db.read(
            lambda c: c.execute("SELECT COUNT(*) FROM processes WHERE kind = 'ack'").fetchone()[0]
        )
        assert last <= counter <= last + 1
        assert rows == counter  # each commit whole: its row and its count together
        assert await store.db.transaction(_bump, brief=True) == 1  # and the store writes on
    finally:
        await store.close()


async def test_a_cancelled_transaction_runs_to_its_commit_or_not_at_all_and_the_store_goes_on(
    tmp_path: Path,
) -> None:
    """Callers cancelled while their transactions are on the engine's thread: the one already
    running there commits (once, whole), the one queued behind it never runs, and the store
    neither deadlocks nor stays locked afterwards."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    started, proceed = threading.Event(), threading.Event()

    def slow(c: Any) -> None:  # holds the engine's thread (a durable commit runs there)
        started.set()
        proceed.wait(60)  # only a bound on a broken test; the test sets it
        _insert("running")(c)

    try:
        running = asyncio.create_task(store.db.transaction(slow, durable=True))
        assert await asyncio.to_thread(started.wait, 60)
        queued = asyncio.create_task(store.db.transaction(_insert("queued"), brief=True))
        await asyncio.sleep(0)  # it finds the connection taken and waits for the engine
        running.cancel()
        queued.cancel()
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        proceed.set()
        await store.db.transaction(_insert("after"), brief=True)
        owners = await store.db.read(
            lambda c: sorted(row[0] for row in c.execute("SELECT owner FROM processes"))
        )
        assert owners == ["after", "running"]
    finally:
        proceed.set()
        await store.close()


def test_two_event_loops_in_two_threads_share_one_store(tmp_path: Path) -> None:
    """A store used at once from two threads, each with its own event loop (both may run
    transactions on their own thread; either may hand them to the engine's), commits every
    transaction once."""
    store = asyncio.run(RunStore.open(tmp_path / "store.sqlite"))
    n = 2 * CHECKPOINT_EVERY + 10
    failures: list[BaseException] = []

    async def write(tag: str) -> None:
        for index in range(n):
            await store.db.transaction(
                _insert(f"{tag}-{index}"), durable=index % 9 == 0, brief=True
            )

    def thread(tag: str) -> None:
        try:
            asyncio.run(write(tag))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=thread, args=(tag,)) for tag in ("one", "two")]
    for each in threads:
        each.start()
    for each in threads:
        each.join()
    try:
        assert failures == []
        assert raw_rows(store.label, "SELECT COUNT(*), COUNT(DISTINCT owner) FROM processes") == [
            (2 * n, 2 * n)
        ]
    finally:
        asyncio.run(store.close())


async def test_reads_go_on_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """Reads, one statement or a held snapshot, run while another process holds the write
    lock (WAL readers never wait for a writer): they return before the holder lets go."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    await store.db.transaction(_insert("before"), brief=True)
    holder = await _hold(store.label, "write")
    try:
        owners = await store.db.read(lambda c: c.execute("SELECT owner FROM processes").fetchall())
        assert [tuple(row) for row in owners] == [("before",)]
        assert (await store.audit_anchor()) is not None  # a snapshot: BEGIN … COMMIT
        assert holder.returncode is None  # still holding: the reads did not wait for it
    finally:
        await _release(holder)
        await store.close()


async def test_the_wal_is_reused_from_its_start_once_a_long_reader_in_another_process_ends(
    tmp_path: Path,
) -> None:
    """A reader in another process holding a snapshot keeps checkpoints from finishing (the
    WAL grows meanwhile, and commits go on); once it ends, the engine's next checkpoint
    finishes and later commits write the WAL from its start again instead of growing it."""
    store = await RunStore.open(tmp_path / "store.sqlite")
    reader = await _hold(store.label, "read")
    try:
        for _ in range(3 * CHECKPOINT_EVERY):
            await store.db.transaction(_bump, brief=True)
        await _release(reader)
        for _ in range(3 * CHECKPOINT_EVERY):  # a whole checkpoint, and the WAL's restart
            await store.db.transaction(_bump, brief=True)
        caught_up = _wal_size(store)
        for _ in range(3 * CHECKPOINT_EVERY):
            await store.db.transaction(_bump, brief=True)
        assert _wal_size(store) <= caught_up
        counter = await store.db.read(
            lambda c: c.execute("SELECT last_run_no FROM run_counter").fetchone()[0]
        )
        assert counter == 9 * CHECKPOINT_EVERY
    finally:
        if reader.returncode is None:
            reader.kill()
            await reader.wait()
        await store.close()


async def test_a_memory_store_takes_durable_commits_and_checkpoints_on_either_thread() -> None:
    """`:memory:` (no WAL, one connection) works through both paths: commits on the loop,
    durable ones and checkpoints on the engine's thread, all on the same database; two
    in-memory stores are two databases."""
    first = await RunStore.open(":memory:")
    second = await RunStore.open(":memory:")
    try:
        for index in range(2 * CHECKPOINT_EVERY + 5):
            await first.db.transaction(_insert(f"m-{index}"), durable=index % 5 == 0, brief=True)
        count = await first.db.read(
            lambda c: c.execute("SELECT COUNT(*) FROM processes").fetchone()[0]
        )
        assert count == 2 * CHECKPOINT_EVERY + 5
        assert (
            await second.db.read(
                lambda c: c.execute("SELECT COUNT(*) FROM processes").fetchone()[0]
            )
            == 0
        )
        assert await first.schema_version() == await second.schema_version()
    finally:
        await first.close()
        await second.close()
