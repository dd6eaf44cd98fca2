"""PostgresDatabase: the shared engine, for several processes on several machines.

psycopg 3, because one driver gives both halves we need: its plain (blocking) connections run
the store's transaction functions unchanged on pool threads, exactly as the SQLite engine runs
them on its connection, and its async connection receives LISTEN/NOTIFY. (asyncpg would have
meant a second, async copy of every transaction in the store.)

Transactions run at REPEATABLE READ: each sees one snapshot, and two that write the same row
conflict, the later one being run again (so a read-then-write of a row is never lost). The
one anomaly left, two transactions each missing the other's write to a different row, is what
the store's family wake-ups could hit; they write the parent's row first (`_touch_family`),
which turns it into such a conflict. An event's `seq` is given at commit, under an advisory
lock held to the end of the commit (see the migration), so seq order is commit order: an SSE
reader resuming after seq N never misses a later commit with a lower seq. Only that instant of
each commit queues behind others. Notifications go out with the COMMIT, in the same round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.types.string import StrDumper

from agent.errors import StoreError, StoreUnavailable
from agent.store.database import (
    POSTGRES,
    Connection,
    migrations,
    too_new,
)
from agent.store.threads import EngineThreads

T = TypeVar("T")
log = logging.getLogger(__name__)

MIGRATIONS = "agent.store.migrations.postgres"
CONNECT_TIMEOUT = 10.0
# Serialization conflicts between workers are expected now and then: run the function again,
# after a short, growing, jittered pause so that the same two do not collide again.
RETRIES = 30
LISTEN_RETRY_DELAY = 1.0
IDLE_IN_TRANSACTION_MS = 60_000


class PostgresDatabase:
    """A PostgreSQL database (the schema on the URL's search_path) with the store's tables."""

    dialect = POSTGRES

    def __init__(self, url: str, pool_size: int) -> None:
        self.url = url
        self.label = redact_url(url)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            # No server-side prepared statements: a pipeline aborted by a serialization
            # conflict can drop a PREPARE psycopg has already counted as done, and every later
            # use of that query on the connection then fails ("prepared statement ... does
            # not exist"), long after the conflict that caused it.
            kwargs={"autocommit": True, "prepare_threshold": None},
            configure=_configure,
            open=False,
            timeout=CONNECT_TIMEOUT,
            name="loom-ops",
        )
        self._threads = EngineThreads(pool_size, "loom-ops-pg")
        # What a durable commit waits for: the server's (or the role's, or the URL's)
        # synchronous_commit, read at open; the pool's connections turn it off for the rest.
        self._durable_commit = "on"

    @classmethod
    async def open(cls, url: str, pool_size: int = 4) -> PostgresDatabase:
        """Connect, then create or bring the schema up to date (one process at a time)."""
        database = cls(url, pool_size)
        try:
            await database._on_thread(database._open)
        except BaseException:
            await database.close()
            raise
        return database

    def _open(self) -> None:
        # One plain connection first: it fails at once with libpq's own reason (a wrong
        # password, no such database), where the pool would retry quietly until its timeout.
        try:
            with psycopg.connect(
                self.url, connect_timeout=int(CONNECT_TIMEOUT), autocommit=True
            ) as first:
                self._durable_commit = _configured_commit(first)
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            reason = scrub(_why(exc), self.url)
            # A server that refused us by name (password, database, role) is a setting to
            # fix; one that is away, starting or full may answer later.
            error = StoreUnavailable if _away(exc) else StoreError
            raise error(f"cannot connect to database {self.label}: {reason}") from None
        with self._pool.connection() as conn:
            row = conn.execute("SELECT current_schema()").fetchone()
            if row is None or row[0] is None:
                raise StoreError(f"database {self.label} has no schema on its search_path")
            self._migrate(conn, row[0])

    def _migrate(self, conn: psycopg.Connection[Any], schema: str) -> None:
        shipped = migrations(MIGRATIONS)
        known = shipped[-1][0]
        # Several workers starting at once: one migrates, the others wait and find it done.
        key = "hashtextextended(current_schema() || '/loom-ops/ddl', 0)"
        conn.execute(f"SELECT pg_advisory_lock({key})")
        try:
            with conn.transaction():
                # A schema change is durable.
                conn.execute(f"SET LOCAL synchronous_commit = {self._durable_commit}")
                current = self._version(conn, schema)
                if current > known:
                    raise too_new(self.label, current, known)
                for number, sql in shipped:
                    if number > current:
                        conn.execute(sql.encode())  # several statements: the simple protocol
                        conn.execute("UPDATE loom_ops_schema SET version = %s", (number,))
        finally:
            conn.execute(f"SELECT pg_advisory_unlock({key})")

    def _version(self, conn: psycopg.Connection[Any], schema: str) -> int:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "ORDER BY table_name",
                (schema,),
            )
        ]
        if "loom_ops_schema" in tables:
            row = conn.execute("SELECT version FROM loom_ops_schema").fetchone()
            return int(row[0]) if row else 0
        if tables:
            raise StoreError(
                f"{self.label} is not a loom-ops database (schema {schema} has tables "
                f"{', '.join(tables[:5])}); refusing to add ours to it"
            )
        conn.execute("CREATE TABLE loom_ops_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO loom_ops_schema (version) VALUES (0)")
        return 0

    async def schema_version(self) -> int:
        """The schema version the database is at."""
        row = await self.read(lambda c: c.execute("SELECT version FROM loom_ops_schema").fetchone())
        return int(row[0])

    async def close(self) -> None:
        """Close the pool and its threads."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._pool.close)
        finally:
            self._threads.stop()

    async def _on_thread(self, fn: Callable[[], T]) -> T:
        return await self._threads.run(fn)

    async def transaction(
        self, fn: Callable[[Connection], T], durable: bool = False, brief: bool = False
    ) -> T:
        """Run `fn` as one transaction on a pool thread (again after a write conflict; every
        transaction waits on the network, `brief` or not).

        Not `durable`: the commit does not wait for the WAL flush (the connections'
        synchronous_commit is off), which a crash of this process cannot lose; a crash of the
        server may lose a suffix of recent commits, never a durable one or anything before it,
        as on SQLite. A durable one waits as the server's configuration says (`on`, or what
        the operator chose: `remote_apply`, `local`...).
        """
        begin = ["BEGIN ISOLATION LEVEL REPEATABLE READ"]
        if durable:
            begin.append(f"SET LOCAL synchronous_commit = {self._durable_commit}")
        return await self._on_thread(lambda: self._run(fn, begin))

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` over one snapshot (repeatable read, read only) on a pool thread."""
        return await self._on_thread(
            lambda: self._run(fn, ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"])
        )

    def _run(self, fn: Callable[[Connection], T], begin: list[str]) -> T:
        """Run `fn` between `begin` and COMMIT as one pipeline: statements go out without
        waiting for each other's results, and the connection waits only where `fn` reads a
        result (a row, a row count) and at the commit."""
        for attempt in range(1, RETRIES + 1):
            with self._pool.connection() as raw:
                statements: _Statements | None = None
                try:
                    with raw.pipeline() as pipeline:
                        for statement in begin:
                            raw.execute(statement.encode())
                        statements = _Statements(raw, pipeline)
                        result = fn(statements)
                        for channel, payload in sorted(statements.notices):
                            raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))
                        raw.execute(b"COMMIT")
                    return result
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    if raw.info.transaction_status != _IDLE:  # (a failed COMMIT has ended it)
                        raw.execute("ROLLBACK")
                    if attempt == RETRIES:
                        raise
                except BaseException as exc:
                    if not raw.closed and raw.info.transaction_status != _IDLE:
                        raw.execute("ROLLBACK")
                    failed = _failed_expectation(exc, statements)
                    if failed is not None:
                        raise failed from None
                    raise
            time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """In a transaction: announce `channel` to listening processes at commit."""
        assert isinstance(conn, _Statements)
        conn.notices.add((channel, payload))

    def expect(
        self,
        conn: Connection,
        sql: str,
        params: Sequence[Any],
        rows: int,
        otherwise: Callable[[], Exception],
    ) -> None:
        """In a transaction: run `sql` with a check of its row count on the server (migration
        0024's `loom_ops_expect`), which fails the transaction with `otherwise()` if it is not
        `rows`; nothing waits for the statement's answer."""
        assert isinstance(conn, _Statements)
        token = len(conn.failures)
        conn.failures.append(otherwise)
        conn.execute(
            f"WITH changed AS ({sql} RETURNING 1) "
            f"SELECT loom_ops_expect((SELECT count(*) FROM changed), {rows:d}, '{token:d}')",
            params,
        )

    async def listen(self, on_notice: Callable[[str, str], None], channels: Sequence[str]) -> None:
        """Pass every notice on `channels` to `on_notice` until cancelled; after a lost
        connection, report each channel once (something may have been missed)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
                ) as conn:
                    for channel in channels:
                        await conn.execute(f"LISTEN {channel}")
                    for channel in channels:
                        on_notice(channel, "")
                    async for notice in conn.notifies():
                        on_notice(notice.channel, notice.payload)
            except psycopg.Error as exc:
                log.warning("listening for other processes failed (%s); reconnecting", _why(exc))
            await asyncio.sleep(LISTEN_RETRY_DELAY)

    def leadership(self, name: str) -> PostgresLeadership:
        """The right to be the one process that does `name` (e.g. poll Telegram)."""
        return PostgresLeadership(self.url, name)


class PostgresLeadership:
    """A session-level advisory lock on a connection of its own: held while the connection
    lives, so it is released the moment the holder dies (the server sees its socket close)."""

    def __init__(self, url: str, name: str, retry: float = LISTEN_RETRY_DELAY) -> None:
        self._url = url
        self._name = name
        self._retry = retry
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def acquire(self) -> None:
        """Wait until this process holds the lock (trying again every `retry` seconds)."""
        key = "hashtextextended(current_schema() || '/loom-ops/leader/' || %s, 0)"
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    # Keepalives: a partition must end the lead within seconds, not hours.
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url,
                        autocommit=True,
                        connect_timeout=int(CONNECT_TIMEOUT),
                        keepalives=1,
                        keepalives_idle=5,
                        keepalives_interval=2,
                        keepalives_count=3,
                    )
                cursor = await self._conn.execute(
                    f"SELECT pg_try_advisory_lock({key})", (self._name,)
                )
                row = await cursor.fetchone()
                if row is not None and row[0]:
                    return
            except psycopg.Error as exc:
                log.warning("cannot reach the database to lead %s: %s", self._name, _why(exc))
                await self.release()
            await asyncio.sleep(self._retry)

    async def lost(self) -> None:
        """Return when the lock can no longer be trusted: its connection failed."""
        while True:
            await asyncio.sleep(self._retry)
            try:
                assert self._conn is not None
                async with asyncio.timeout(self._retry * 5):
                    await self._conn.execute("SELECT 1")
            except (psycopg.Error, AssertionError, TimeoutError) as exc:
                log.warning("lost the lead of %s: %s", self._name, _why(exc))
                await self.release()
                return

    async def release(self) -> None:
        """Let go (closing the connection releases the lock)."""
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


_IDLE = psycopg.pq.TransactionStatus.IDLE


class _Statements:
    """A pipelined psycopg connection that takes the store's SQL (`?` placeholders), the
    notifications its transaction will send when it commits, and what each of its checks
    raises when it fails (`PostgresDatabase.expect`)."""

    __slots__ = ("_pipeline", "_raw", "failures", "notices")

    def __init__(self, raw: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> None:
        self._raw = raw
        self._pipeline = pipeline
        self.notices: set[tuple[str, str]] = set()
        self.failures: list[Callable[[], Exception]] = []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        return _Result(self._raw.execute(_placeholders(sql), params), self._pipeline)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Result:
        cursor = self._raw.cursor()
        cursor.executemany(_placeholders(sql), list(rows))
        return _Result(cursor, self._pipeline, many=True)


# The SQLSTATE of a failed check (migration 0024): its message is the check's token.
_EXPECTATION_FAILED = "LO001"


def _failed_expectation(exc: BaseException, statements: _Statements | None) -> Exception | None:
    """The error a transaction's check asked for, when `exc` is that check failing."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate != _EXPECTATION_FAILED:
        return None
    assert statements is not None, "a check failed in a transaction that made none"
    return statements.failures[int(exc.diag.message_primary or "")]()


class _Result:
    """A pipelined statement's cursor: reading its rows or its row count waits for it (psycopg
    syncs the pipeline for rows by itself, not for `rowcount`)."""

    __slots__ = ("_cursor", "_many", "_pipeline")

    def __init__(
        self, cursor: psycopg.Cursor[Any], pipeline: psycopg.Pipeline, many: bool = False
    ) -> None:
        self._cursor = cursor
        self._pipeline = pipeline
        self._many = many  # executemany counts up as results arrive: 0 says nothing yet

    @property
    def rowcount(self) -> int:
        """Rows the statement changed (or returned)."""
        if self._many or self._cursor.rowcount < 0:
            self._pipeline.sync()
            self._many = False
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        """The next row, or None."""
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        """Every remaining row."""
        return self._cursor.fetchall()

    def __iter__(self) -> Any:
        return iter(self._cursor)


@lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    # The store's SQL has no `?` or `%` inside literals; it is all ours, never user input.
    return sql.replace("%", "%%").replace("?", "%s")


class _Row(tuple):
    """A row read by column name (`row["status"]`) or position, like SQLite's `sqlite3.Row`."""

    __slots__ = ()
    _index: dict[str, int] = {}  # noqa: RUF012 - set per column list by `_row_class`

    def __getitem__(self, key: Any) -> Any:
        if key.__class__ is str:
            key = self._index[key]
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self._index)


@lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[_Row]:
    return type("Row", (_Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _named_rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], _Row]:
    """psycopg's row factory for the store: rows readable by column name, as on SQLite."""
    description = cursor.description
    if description is None:
        return tuple  # type: ignore[return-value]  # a statement without rows
    return _row_class(tuple(column.name for column in description))


# synchronous_commit's values (PostgreSQL 9.6 and later).
_COMMIT_LEVELS = frozenset({"on", "off", "local", "remote_write", "remote_apply"})


def _configured_commit(conn: psycopg.Connection[Any]) -> str:
    """The synchronous_commit a new connection of ours starts with (`on` if unknown)."""
    row = conn.execute("SHOW synchronous_commit").fetchone()
    value = str(row[0]) if row is not None else "on"
    return value if value in _COMMIT_LEVELS else "on"


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.row_factory = _named_rows  # type: ignore[assignment]
    # Statuses are StrEnums: store their values ("queued"), as sqlite3 does, not their names.
    conn.adapters.register_dumper(StrEnum, StrDumper)
    # No transaction of ours waits on anything but the database: one idle this long belongs
    # to a stopped process (SIGSTOP, a debugger), and must not hold the others' locks.
    conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
    # Most commits (a step's) need not wait for the WAL flush; a durable one says so itself
    # (`PostgresDatabase.transaction`): one statement fewer in every other transaction.
    conn.execute("SET synchronous_commit = off")


def redact_url(url: str) -> str:
    """The URL with its password hidden (`user:***@`, `password=***`), for messages and logs."""
    hidden = re.sub(r"(://[^:/@]*):[^/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", hidden)


def scrub(text: str, url: str) -> str:
    """`text` (a driver's error) without the URL's password, which libpq may quote."""
    for secret in _passwords(url):
        text = text.replace(secret, "***")
    return text


def _passwords(url: str) -> list[str]:
    found = re.findall(r"://[^:/@]*:([^/?#]*)@", url) + re.findall(r"[?&]password=([^&#]*)", url)
    return [secret for secret in found if secret]


# What libpq says when no server answered (refused, unreachable, timed out, dropped), and what
# a server says when it takes no logins for now (starting, stopping, recovering, full). A
# connection failure carries no SQLSTATE, only these words (libpq's own are English unless
# it was built to translate them; anything unmatched counts as a setting to fix).
_AWAY = re.compile(
    r"connection refused|timeout expired|timed out|could not translate host name|"
    r"no route to host|network is unreachable|could not connect to server|"
    r"temporary failure in name resolution|"
    r"server closed the connection unexpectedly|the database system is (?:starting up|"
    r"shutting down|in recovery mode|not yet accepting connections)|too many clients|"
    r"remaining connection slots are reserved",
    re.IGNORECASE,
)


def _away(exc: BaseException) -> bool:
    """Whether a failed connection says the server is away or takes no logins for now,
    rather than that it refused this login (password, database, role): trying later may
    work."""
    return isinstance(exc, psycopg_pool.PoolTimeout) or _AWAY.search(str(exc)) is not None


def _why(exc: BaseException) -> str:
    """The first line of a driver error."""
    cause = exc.__cause__ or exc
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0]
