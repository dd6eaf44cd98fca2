"""The journal: each run's chained events (see `agent.chain`), and the runs' global numbering."""

from __future__ import annotations

import time
from typing import Any

from agent.events import Event
from agent.records import Claim, EventRecord, RunRecord
from agent.store.base import StoreBase
from agent.store.commands import Outcome
from agent.store.database import Connection
from agent.store.rows import EVENT_COLUMNS, SELECT_RUNS, event_from_row, run_from_row


class JournalStore(StoreBase):
    """Reading and appending a run's events."""

    async def numbered_runs(self) -> tuple[int, list[RunRecord]]:
        """For an audit of the whole store, in one snapshot: the last run number the counter
        handed out, and every run (each with its chain head) in number order."""

        def read(c: Connection) -> tuple[int, list[RunRecord]]:
            counter = c.execute("SELECT last_run_no FROM run_counter WHERE id = 1").fetchone()
            rows = c.execute(f"{SELECT_RUNS} ORDER BY run_no, id").fetchall()
            return (counter["last_run_no"] if counter else 0), [run_from_row(r) for r in rows]

        return await self._read(read)

    async def first_keyed_run(self) -> int | None:
        """The number of the first run with an event written under an audit key, if any."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT MIN(run_no) AS first FROM runs WHERE run_no IS NOT NULL AND EXISTS "
                "(SELECT 1 FROM events WHERE events.run_id = runs.id "
                "AND events.key_id IS NOT NULL)"
            ).fetchone()
        )
        return row["first"]

    async def _note(self, claim: Claim, event: Event, earlier: Outcome | None = None) -> None:
        """Append one event of a drive's own (through `Drive.note`), fenced by its claim."""
        now = time.time()

        def append(conn: Connection) -> None:
            self._fence(conn, claim, earlier)
            self._append_events(conn, claim.run_id, [event], now)

        await self._transaction(append)

    async def list_events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[EventRecord]:
        """A run's journal in order, optionally after a sequence number."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq > ? ORDER BY seq"
        params: tuple[Any, ...] = (run_id, after_seq)
        if limit is not None:
            sql += " LIMIT ?"
            params = (*params, limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [event_from_row(row) for row in rows]

    async def list_tree_events(
        self, run_id: str, after_seq: int = 0, limit: int = 500
    ) -> list[EventRecord]:
        """The journal of a run and every run below it, in the order it was written."""
        rows = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
                "SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
                f"SELECT {EVENT_COLUMNS} FROM events "
                "WHERE run_id IN (SELECT id FROM tree) AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
            ).fetchall()
        )
        return [event_from_row(row) for row in rows]

    # -- live processes ----------------------------------------------------------------------
