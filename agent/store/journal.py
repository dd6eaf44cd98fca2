"""The journal: each run's hash-chained events."""

from __future__ import annotations

import time
from typing import Any

from agent.errors import RunNotFound
from agent.events import Event
from agent.records import Claim, EventRecord
from agent.store.base import StoreBase
from agent.store.commands import Outcome
from agent.store.database import Connection
from agent.store.rows import EVENT_COLUMNS, event_from_row


class JournalStore(StoreBase):
    """Reading and appending a run's events."""

    async def chain_head(self, run_id: str) -> tuple[str, int]:
        """The hash and length the run recorded for its own chain."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT last_hash, event_count FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        )
        if row is None:
            raise RunNotFound(f"unknown run id {run_id!r}")
        return row["last_hash"], row["event_count"]

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
