"""SqliteDatabase: the embedded engine, one sqlite3 connection in WAL mode.

A transaction runs as one function with `BEGIN IMMEDIATE`, so writers are serialized and the
journal's order is its commit order. A `brief` one (a run's step: bounded writes) runs right
on the event loop's thread, without a hop to another thread (most of a dry-run step's cost was
that hop), when the connection is free and the write lock is had without waiting (the
connection has no busy timeout); its commit syncs nothing. Everything else runs on the
engine's own thread: a brief transaction that found a lock another process holds (run again
there, again and again for up to BUSY_TIMEOUT_MS), a synced (`durable`) commit, the WAL
checkpoint, which SQLite would otherwise run inside some commit on the loop, the first commit
after it (which starts the WAL over and syncs its header), and every transaction or read that
is not brief: their work has no bound. One sync can still land on the loop: a brief commit
right after another process checkpointed the whole WAL starts it over, and this process cannot
see that cheaply. Other processes sharing the file are noticed by polling (the store's journal
watch, the workers' claim loop).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import StoreError
from agent.store.database import SQLITE, Connection, migrations, too_new
from agent.store.threads import EngineThreads

T = TypeVar("T")
log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
MIGRATIONS = "agent.store.migrations"
# Commits between two WAL checkpoints on the engine's thread (SQLite's own automatic
# checkpoint is off: it would run inside a commit on the event loop). A step writes about 8
# pages, so the WAL stays near SQLite's default of 1,000 pages.
CHECKPOINT_EVERY = 100


class SqliteDatabase:
    """A SQLite file (or `:memory:`) with the store's schema."""

    dialect = SQLITE

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        self._conn: sqlite3.Connection | None = None
        self._thread = EngineThreads(1, "loom-ops-sqlite")
        # The connection serves one function at a time, on whichever thread runs it.
        self._lock = threading.Lock()
        self._commits = 0  # since the last checkpoint (changed under `_lock`)
        # The next commit may start the WAL over (a new file, or one just checkpointed whole),
        # which writes and syncs its header: it runs on the engine's thread.
        self._restart_due = True
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> SqliteDatabase:
        """Open (creating if needed) the file and bring its schema up to date."""
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot open database {path}: {exc.strerror or exc}") from exc
        if Path(path).is_dir():
            raise StoreError(f"cannot open database {path}: it is a directory")
        database = cls(path)
        try:
            await database._waiting(database._connect)
            for step in (database._check_schema, database._configure, database._migrate):
                try:
                    await database._waiting(step)
                except sqlite3.DatabaseError as exc:
                    raise StoreError(f"{path} is not a loom-ops database: {exc}") from exc
        except BaseException:
            await database.close()
            raise
        return database

    async def close(self) -> None:
        """Checkpoint what this process wrote, close the connection and stop the engine's
        thread (a second close does nothing; a cancelled one still happens)."""

        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    # Another process may keep the file open, so SQLite would not checkpoint
                    # at close: short-lived writers (CLI commands) would grow the WAL forever.
                    if self._commits:
                        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self._conn.close()
                    self._conn = None

        if self._closed:
            return
        self._closed = True
        try:
            # Shielded: a caller that gives up waiting must not take the close out of the
            # queue (the connection would stay open, its WAL never checkpointed).
            await asyncio.shield(self._thread.run(close))
        finally:
            self._thread.stop()  # after the close, which is queued ahead of it

    def _connect(self, _: None) -> None:
        try:
            # Used from the loop's thread and the engine's, never both at once (`_lock`).
            # No busy timeout: the loop's thread never waits, the engine's waits its own way
            # (`_retrying_while_busy`).
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=0, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Refuse, before writing anything, a database that is newer or not ours."""
        known = migrations(MIGRATIONS)[-1][0]
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > known:
            raise too_new(self.label, current, known)
        if current == 0:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY name LIMIT 5"
                )
            ]
            if tables:
                raise StoreError(
                    f"{self.label} is not a loom-ops database (it has tables "
                    f"{', '.join(tables)}); refusing to add ours to it"
                )

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row  # rows read by column name, as on PostgreSQL
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives any process crash; a power cut can only lose a suffix
        # of recent commits. Commits that must survive even that (the intent of a side
        # effect) ask for `durable=True`, which syncs the WAL and everything before it.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_EVERY

    def _migrate(self, conn: sqlite3.Connection) -> None:
        shipped = migrations(MIGRATIONS)
        known = shipped[-1][0]
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > known:
                raise too_new(self.label, current, known)
            for number, sql in shipped:
                if number > current:
                    for statement in split_sql(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        """The schema version the file is at."""
        return await self.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    async def transaction(
        self, fn: Callable[[Connection], T], durable: bool = False, brief: bool = False
    ) -> T:
        """Run `fn` as one `BEGIN IMMEDIATE` transaction: on the loop's thread when `brief` and
        nothing makes it wait (`fn` may then run again, on the engine's thread), else there.

        `durable` syncs the commit to disk (synchronous=FULL) before returning. The WAL is
        sequential, so a durable commit also makes every earlier commit durable: after a power
        cut the database holds a prefix of the commits that includes every durable one.
        """

        def run(conn: sqlite3.Connection) -> T:
            if durable:
                conn.execute("PRAGMA synchronous = FULL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # (a failed COMMIT leaves it open)
                        conn.execute("ROLLBACK")
                    raise
                self._commits += 1
                self._restart_due = False
                return result
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")

        if not brief or durable or self._restart_due or self._commits >= CHECKPOINT_EVERY:
            return await self._waiting(run)
        return await self._at_once(run)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` between other transactions, never inside one (statements outside a write
        see a snapshot each), on the engine's thread: a read has no bound on its size (an
        export, a long run's journal), and SQLite lets the loop run while it reads there."""
        return await self._waiting(fn)

    async def _at_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` here and now if the connection is free and no lock makes it wait;
        otherwise on the engine's thread."""
        self._check_open()
        conn = self._conn
        if conn is not None and self._lock.acquire(blocking=False):
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                # Another process holds the lock: wait for it off the loop (`fn` rolled back).
            finally:
                self._lock.release()
        return await self._waiting(fn)

    async def _waiting(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the engine's thread, where it may wait for locks and the disk; then
        checkpoint the WAL if enough commits have accumulated."""
        self._check_open()

        def run() -> T:
            with self._lock:
                conn = self._conn
                if conn is None:
                    self._check_open()  # (closed while this waited for the lock)
                    return fn(conn)  # type: ignore[arg-type]  # opening: `_connect`
                result = _retrying_while_busy(fn, conn)
                if self._commits >= CHECKPOINT_EVERY:
                    self._commits = 0
                    self._restart_due = True
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:  # housekeeping: `fn`'s commit stands
                        log.warning("checkpoint of %s failed: %s", self.label, exc)
                return result

        return await self._thread.run(run)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.label} is closed")

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """Nothing: other processes sharing the file poll."""

    def expect(
        self,
        conn: Connection,
        sql: str,
        params: Sequence[Any],
        rows: int,
        otherwise: Callable[[], Exception],
    ) -> None:
        """In a transaction: run `sql`, which must change exactly `rows` rows (checked now:
        SQLite answers at once)."""
        if conn.execute(sql, params).rowcount != rows:
            raise otherwise()

    async def listen(self, on_notice: Callable[[str, str], None], channels: Sequence[str]) -> None:
        """Nothing to listen to on SQLite: wait until cancelled."""
        await asyncio.Event().wait()

    def leadership(self, name: str) -> LocalLeadership:
        """Leadership among processes: every process leads on SQLite."""
        return LocalLeadership()


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLite said another connection holds a lock this needs (SQLITE_BUSY and its kinds)."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _retrying_while_busy(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    """`fn`, run again while another process holds a lock it needs, for up to
    BUSY_TIMEOUT_MS, pausing as SQLite's own busy handler does (the connection has none: the
    loop's thread must never wait; `fn` may run again, as on PostgreSQL)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            return fn(conn)
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class LocalLeadership:
    """SQLite serves one machine's processes: every instance leads (run one bot)."""

    async def acquire(self) -> None:
        """Return at once."""

    async def lost(self) -> None:
        """Never: wait until cancelled."""
        await asyncio.Event().wait()

    async def release(self) -> None:
        """Nothing to let go."""


def split_sql(script: str) -> Iterable[str]:
    """Split a migration into statements; triggers keep their inner semicolons."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()
