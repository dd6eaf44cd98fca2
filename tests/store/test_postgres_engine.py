"""The PostgreSQL engine's transactions: statements bound in this process and sent in batches,
each statement still answered with its own rows and row count."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from agent.errors import StoreError
from agent.store.database import Connection
from agent.store.postgres import PostgresDatabase
from bench.roundtrips import RoundTrips, count_postgres
from tests.conftest import postgres_schema


async def test_a_batch_answers_each_statement_with_its_own_rows_and_count() -> None:
    """Statements held until a result is read go out together: a closing `-- comment`, a
    trailing `;`, quotes and semicolons inside a bound value, and an executemany (its row
    count added up) all keep to their own statement; a read sees the writes held before it;
    the read and the commit are the transaction's only round trips."""

    def body(conn: Connection) -> tuple[Any, ...]:
        conn.execute("CREATE TABLE t (id INTEGER, note TEXT)")
        conn.execute("INSERT INTO t VALUES (1, 'one') -- a closing comment")
        many = conn.executemany("INSERT INTO t VALUES (?, ?);", [(2, "two"), (3, "three")])
        echoed = conn.execute("SELECT ? AS text, ? AS n", ("it's; -- not a comment", 7))
        changed = conn.execute("UPDATE t SET note = note || '!' WHERE id > ?", (1,))
        rows = conn.execute("SELECT id, note FROM t ORDER BY id")
        later = conn.execute("DELETE FROM t WHERE id = ?", (3,))  # sent with the COMMIT
        return (
            [(row["id"], row["note"]) for row in rows],
            many.rowcount,
            echoed.fetchone()["text"],
            changed.rowcount,
            later,
        )

    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        counts = RoundTrips()
        uncount = count_postgres(counts)
        try:
            rows, inserted, text, updated, later = await db.transaction(body)
        finally:
            uncount()
        try:
            assert rows == [(1, "one"), (2, "two!"), (3, "three!")]
            assert (inserted, text, updated, later.rowcount) == (2, "it's; -- not a comment", 2, 1)
            assert counts.total_wire == 2, counts.lines(2)  # the read, then the rest and COMMIT
            left = await db.read(lambda c: c.execute("SELECT id FROM t ORDER BY id").fetchall())
            assert [row["id"] for row in left] == [1, 2]
        finally:
            await db.close()


async def test_a_body_that_fails_before_it_reads_sends_nothing() -> None:
    """A transaction body that raises with writes still held has sent none of them: nothing to
    roll back, nothing written, no round trip."""

    def body(conn: Connection) -> None:
        conn.execute("UPDATE run_counter SET last_run_no = last_run_no + 100")
        raise ValueError("changed my mind")

    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        before = await db.read(
            lambda c: c.execute("SELECT last_run_no FROM run_counter").fetchone()
        )
        counts = RoundTrips()
        uncount = count_postgres(counts)
        try:
            with pytest.raises(ValueError, match="changed my mind"):
                await db.transaction(body)
        finally:
            uncount()
        try:
            assert counts.total_wire == 0, counts.lines(1)
            after = await db.read(
                lambda c: c.execute("SELECT last_run_no FROM run_counter").fetchone()
            )
            assert after["last_run_no"] == before["last_run_no"]
        finally:
            await db.close()


async def test_values_bound_here_keep_the_types_the_server_would_give_them() -> None:
    """Values are written into the statement as literals of the type server-side binding
    gives them: a float stays a float8 (not a numeric: rounding, sign of zero), a negative
    number keeps its sign before a cast, and quotes, backslashes and comment marks inside a
    string stay data."""
    text = "back\\slash 'quoted' $$; DROP TABLE runs; -- not a comment"

    def body(conn: Connection) -> Any:
        return conn.execute(
            "SELECT ? AS f, CAST(? AS INTEGER) AS i, CAST(? AS TEXT) AS z, ?::text AS neg, "
            "? AS inf, ? AS s",
            (1.5, 2.5, -0.0, -1, float("inf"), text),
        ).fetchone()

    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        try:
            row = await db.transaction(body)
            # The string stayed data: the table it names is still there.
            assert await db.read(lambda c: c.execute("SELECT count(*) AS n FROM runs").fetchone())
        finally:
            await db.close()
    assert type(row["f"]) is float and row["f"] == 1.5
    assert (row["i"], row["z"], row["neg"], row["inf"], row["s"]) == (
        2,
        "-0",
        "-1",
        float("inf"),
        text,
    )


async def test_a_statement_that_is_not_exactly_one_fails_its_transaction() -> None:
    """Every held statement must give one answer: a statement that is only a comment (none)
    or two statements in one string (two) would hand the next statement's answer to the
    wrong reader, so the batch fails with StoreError instead and nothing is written."""

    def none_then_read(conn: Connection) -> Any:
        conn.execute("UPDATE run_counter SET last_run_no = last_run_no + 100")
        conn.execute("-- only a comment")
        return conn.execute("SELECT 2 AS two").fetchall()

    def two_in_one(conn: Connection) -> Any:
        conn.execute("UPDATE run_counter SET last_run_no = last_run_no + 100")
        conn.execute("SELECT 1 AS a; SELECT 99 AS b")
        return conn.execute("SELECT 2 AS two").fetchall()

    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        try:
            for body in (none_then_read, two_in_one):
                with pytest.raises(StoreError, match="statements gave"):
                    await db.transaction(body)
            row = await db.read(
                lambda c: c.execute("SELECT last_run_no FROM run_counter").fetchone()
            )
            assert row["last_run_no"] == 0
        finally:
            await db.close()


async def test_a_transaction_that_only_announces_still_sends_its_notice() -> None:
    """A transaction whose body only notifies (no statement) still commits its notice."""
    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            await listener.execute("LISTEN loom_ops_probe")
            await db.transaction(lambda c: db.notify(c, "loom_ops_probe", "hello"))
            notices = [n.payload async for n in listener.notifies(timeout=5, stop_after=1)]
        finally:
            await listener.close()
            await db.close()
    assert notices == ["hello"]


async def test_a_transaction_on_a_closed_database_fails_as_on_sqlite() -> None:
    """After close, a transaction or read is refused at once with the store's own error (its
    threads are gone: nothing would ever answer it)."""
    with postgres_schema() as url:
        db = await PostgresDatabase.open(url)
        await db.close()
        for attempt in (db.transaction(lambda c: None), db.read(lambda c: None)):
            with pytest.raises(StoreError, match="is closed"):
                await asyncio.wait_for(attempt, 5)
