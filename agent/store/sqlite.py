"""SqliteDatabase: the embedded engine, one aiosqlite connection in WAL mode.

A transaction runs as one function on the connection's thread with `BEGIN IMMEDIATE`, so
writers are serialized and the journal's order is its commit order. Other processes sharing
the file are noticed by polling (the store's journal watch, the workers' claim loop).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import aiosqlite

from agent.errors import StoreError
from agent.store.database import SQLITE, Connection, migrations, too_new

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
MIGRATIONS = "agent.store.migrations"


class SqliteDatabase:
    """A SQLite file (or `:memory:`) with the store's schema."""

    dialect = SQLITE

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self._db = db
        self.path = path
        self.label = path

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
        connecting = aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db = await connecting
        except sqlite3.Error as exc:
            # aiosqlite stops its thread on failure without waiting; wait for it here, or it
            # may outlive the event loop and die noisily.
            await asyncio.get_running_loop().run_in_executor(None, connecting._thread.join, 5)
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        database = cls(db, path)
        try:
            for step in (database._check_schema, database._configure, database._migrate):
                try:
                    await database._on_thread(step)
                except sqlite3.DatabaseError as exc:
                    raise StoreError(f"{path} is not a loom-ops database: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        return database

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

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
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives any process crash; a power cut can only lose a suffix
        # of recent commits. Commits that must survive even that (the intent of a side
        # effect) ask for `durable=True`, which syncs the WAL and everything before it.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")

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
        return await self._on_thread(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    async def _on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # aiosqlite has no public way to run several statements as one unit on its thread; its
        # `_execute` is what every public method uses. One hop per transaction keeps concurrent
        # runs' statements out of each other's transactions and keeps the per-step cost low.
        return await self._db._execute(fn, self._db._conn)

    async def transaction(self, fn: Callable[[Connection], T], durable: bool = False) -> T:
        """Run `fn` as one `BEGIN IMMEDIATE` transaction on the connection's thread.

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
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")

        return await self._on_thread(run)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the connection's thread (statements outside a write see a snapshot
        each; `fn` runs between other transactions, never inside one)."""
        return await self._on_thread(fn)

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """Nothing: other processes sharing the file poll."""

    async def listen(self, on_notice: Callable[[str, str], None]) -> None:
        """Nothing to listen to on SQLite: wait until cancelled."""
        await asyncio.Event().wait()

    def leadership(self, name: str) -> LocalLeadership:
        """Leadership among processes: every process leads on SQLite."""
        return LocalLeadership()


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
