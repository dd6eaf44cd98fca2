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
from psycopg.adapt import Transformer
from psycopg.types.string import StrDumper

from agent.errors import StoreError, StoreUnavailable
from agent.store.database import (
    POSTGRES,
    Connection,
    migrations,
    redact_url,
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
            # No server-side prepared statements: a transaction's statements go as text
            # (`_Statements`), and a PREPARE dropped with an aborted transaction, though
            # psycopg counted it as done, fails every later use of its query on the
            # connection ("prepared statement ... does not exist").
            kwargs={"autocommit": True, "prepare_threshold": None},
            configure=_configure,
            open=False,
            timeout=CONNECT_TIMEOUT,
            name="loom-ops",
        )
        self._threads = EngineThreads(pool_size, "loom-ops-pg")
        self._closed = False
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
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._pool.close)
        finally:
            self._threads.stop()

    async def _on_thread(self, fn: Callable[[], T]) -> T:
        if self._closed:  # as on SQLite
            raise StoreError(f"database {self.label} is closed")
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
        """Run `fn` between `begin` and COMMIT, its statements sent in batches (`_Statements`):
        the connection waits only where `fn` reads a result (a row, a row count) and at the
        commit, which goes out with whatever is still pending."""
        for attempt in range(1, RETRIES + 1):
            with self._pool.connection() as raw:
                statements = _Statements(raw, begin)
                try:
                    result = fn(statements)
                    statements.commit()
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
_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK


class _Statements:
    """A transaction's connection for the store's SQL (`?` placeholders): each statement is
    bound here, its values written as literals the way psycopg's client-side binding writes
    them, and held until the body reads a result (a row, a row count) or the transaction
    commits; then everything held goes out as one message of the simple query protocol, and
    comes back as one. A pipeline sends, and parses, every statement on its own, at about
    25 µs of this process's CPU each; a step makes about seven.

    It also holds the notifications the transaction sends when it commits, and what each of its
    checks raises when it fails (`PostgresDatabase.expect`)."""

    __slots__ = ("_held", "_literal", "_raw", "_sent", "failures", "notices")

    def __init__(self, raw: psycopg.Connection[Any], begin: Sequence[str]) -> None:
        self._raw = raw
        # The connection's adapters (and so its StrEnum dumper), as ClientCursor uses them.
        self._literal = Transformer(raw).as_literal
        self._held: list[tuple[bytes, _Result | None]] = [(s.encode(), None) for s in begin]
        self._sent = False  # anything sent yet: else there is nothing to commit
        self.notices: set[tuple[str, str]] = set()
        self.failures: list[Callable[[], Exception]] = []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        result = _Result(self)
        self._held.append((self._bind(_template(sql), params), result))
        return result

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Result:
        result = _Result(self)  # one result for all: its row count is theirs added up
        template = _template(sql)
        self._held.extend((self._bind(template, row), result) for row in rows)
        return result

    def _bind(self, template: bytes, params: Sequence[Any]) -> bytes:
        return template % tuple(map(self._value, params))

    def _value(self, value: Any) -> bytes:
        """`value` as a literal of the type server-side binding gives it."""
        if value is None:
            return b"NULL"
        if type(value) is float:  # psycopg writes `1.5`, a numeric: keep it a float8
            return b"'%r'::float8" % value
        if type(value) is int and value < 0:  # `-1::text` would read as `-(1::text)`
            return b"(%d)" % value
        return self._literal(value)

    def send(self) -> None:
        """Send what is held, wait for the answer, and hand each statement its result (the
        first failed statement raises, and the server skips the rest)."""
        held, self._held = self._held, []
        if not held:
            return
        self._sent = True
        # A line break before each `;`: a statement's closing `-- comment` ends there.
        cursor = self._raw.execute(b"\n;".join(sql for sql, _ in held))
        for n, (_, result) in enumerate(held):
            if n and not cursor.nextset():
                raise StoreError(f"a batch of {len(held)} statements gave {n} results")
            if result is not None:
                rows = cursor.fetchall() if cursor.pgresult.status == _TUPLES_OK else []
                result.answered(rows, cursor.rowcount)
        if cursor.nextset():  # a statement of two, or one that gave none: answers misplaced
            raise StoreError(f"a batch of {len(held)} statements gave more results")

    def commit(self) -> None:
        """Send what is held, the notifications and COMMIT, together (nothing if the body
        neither read, wrote nor announced anything)."""
        if not self._sent and not self.notices and all(r is None for _, r in self._held):
            return  # only its BEGIN: nothing was read, written or announced
        for channel, payload in sorted(self.notices):
            self.execute("SELECT pg_notify(?, ?)", (channel, payload))
        self._held.append((b"COMMIT", None))
        self.send()


# The SQLSTATE of a failed check (migration 0024): its message is the check's token.
_EXPECTATION_FAILED = "LO001"


def _failed_expectation(exc: BaseException, statements: _Statements) -> Exception | None:
    """The error a transaction's check asked for, when `exc` is that check failing."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate != _EXPECTATION_FAILED:
        return None
    return statements.failures[int(exc.diag.message_primary or "")]()


class _Result:
    """A statement's rows and row count, there once its batch was sent: reading them first
    sends what the transaction holds (`_Statements.send`)."""

    __slots__ = ("_answers", "_count", "_read", "_rows", "_statements")

    def __init__(self, statements: _Statements) -> None:
        self._statements = statements
        self._rows: list[Any] = []
        self._read = 0  # rows handed out
        self._count = 0
        self._answers = 0  # statements answered (executemany: one per row)

    def answered(self, rows: list[Any], count: int) -> None:
        """Take one statement's answer."""
        self._rows.extend(rows)
        self._count += max(count, 0)
        self._answers += 1

    def _wait(self) -> None:
        if not self._answers:
            self._statements.send()

    @property
    def rowcount(self) -> int:
        """Rows the statement changed (or returned)."""
        self._wait()
        return self._count

    def fetchone(self) -> Any:
        """The next row, or None."""
        self._wait()
        if self._read == len(self._rows):
            return None
        self._read += 1
        return self._rows[self._read - 1]

    def fetchall(self) -> list[Any]:
        """Every remaining row."""
        self._wait()
        rows = self._rows[self._read :]
        self._read = len(self._rows)
        return rows

    def __iter__(self) -> Any:
        return iter(self.fetchall())


@lru_cache(maxsize=1024)
def _template(sql: str) -> bytes:
    """The statement as a bytes %-template of its values' literals (`?` becomes `%b`)."""
    # The store's SQL has no `?` or `%` inside literals; it is all ours, never user input.
    # One statement each (SQLite's `execute` takes no more): a trailing `;` would send an
    # empty statement in a batch, whose answer would go to the next statement's result.
    return sql.rstrip().rstrip(";").replace("%", "%%").replace("?", "%b").encode()


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
def _row_class(names: tuple[bytes | None, ...]) -> type[_Row]:
    index = {(name or b"").decode(): i for i, name in enumerate(names)}
    return type("Row", (_Row,), {"__slots__": (), "_index": index})


def _named_rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], _Row]:
    """psycopg's row factory for the store: rows readable by column name, as on SQLite.

    It runs for every result of a batch, read or not (a check's, a notification's), so it
    takes the names from the result itself: `cursor.description` builds a Column per column."""
    result = cursor.pgresult
    if result is None or not result.nfields:
        return tuple  # type: ignore[return-value]  # a statement without rows
    return _row_class(tuple(result.fname(i) for i in range(result.nfields)))


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
